"""Stack a LoRA, a LoHa and a LoKr on the embedded tiny SD1 pipeline, generate, and restore the base.

Runs anywhere in a few seconds: the pipeline and the adapters are random and built in code (no download).
Writes out/demo.png (base | adapted) and prints what was loaded.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import save_file

import diffadapt as da
from diffadapt.fixtures import lycoris_file
from diffadapt.testing import generate, param_hashes, tiny_sd1_pipeline


def main(out: str = "out/demo.png") -> None:
    pipe = tiny_sd1_pipeline()
    base = generate(pipe, "a photo of a cat", steps=4, size=64)
    hashes = param_hashes(pipe)

    tmp = Path(tempfile.mkdtemp())
    for algo, std in (("lora", 0.1), ("loha", 0.3), ("lokr", 0.1)):
        sd, _ = lycoris_file(pipe.unet, algo=algo, prefix="lora_unet", std=std, seed=len(algo))
        te, _ = lycoris_file(pipe.text_encoder, algo=algo, prefix="lora_te", std=std, seed=len(algo) + 1)
        save_file({**sd, **te}, str(tmp / f"{algo}_style.safetensors"))

    print(da.inspect(tmp / "loha_style.safetensors").summary(), "\n")
    da.load(pipe, tmp / "lora_style.safetensors", weight=0.8)
    da.load(pipe, tmp / "loha_style.safetensors", weight=0.5)
    da.load(pipe, tmp / "lokr_style.safetensors", weight={"unet": 0.6, "text_encoder": 0.3})
    for name, info in da.adapters(pipe).items():
        print(f"{name:14s} {', '.join(info.methods)}  modules={info.modules}  weight={info.weight}")
    adapted = generate(pipe, "a photo of a cat", steps=4, size=64)

    da.unload(pipe)
    assert param_hashes(pipe) == hashes, "unload must restore the base weights bit-exactly"
    print(f"\nmean |adapted - base| = {np.abs(adapted - base).mean():.4f}; base weights restored bit-exactly")

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    strip = np.concatenate([base[0], adapted[0]], axis=1)
    Image.fromarray((strip * 255).round().astype(np.uint8)).resize((256, 128), Image.NEAREST).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
