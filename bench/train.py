"""Training benchmark: ``diffadapt train`` against diffusers' ``examples/dreambooth/train_dreambooth_lora.py``.

Both train a rank-``--rank`` LoRA on the UNet attention projections of the real-size SD1.5 architecture
(random weights: UNet, CLIP ViT-L text encoder and the SD VAE, saved once as a diffusers folder under
``--workdir``) with the same images, resolution, batch size, steps, learning rate, precision and seed. Each
side runs in its own fresh process; the diffusers script is imported as a module with a small torchvision
shim (PIL-based Resize / CenterCrop / RandomCrop / ToTensor / Normalize) installed in ``sys.modules`` by this
bench — the project itself needs no torchvision.

Measured per side: seconds per optimizer step (median interval between consecutive ``AdamW.step`` calls,
so model loading, the first step's warm-up and the export are excluded), in wall time and in the process's
CPU time (which load from other processes on a shared machine barely moves), and the process's peak RSS
(``getrusage`` ``ru_maxrss``: the kernel's own high-water mark, load included). Ratios are diffadapt /
diffusers. Targets: ≤ 0.8x time with ``--cache_latents`` (latents and, with a frozen text encoder, prompt
embeddings are computed once), ≤ 1.0x memory.

The diffusers script is not part of diffusers' wheel: pass its path (``--reference``), e.g. from a clone
of https://github.com/huggingface/diffusers (``examples/dreambooth/train_dreambooth_lora.py``).

Measured (2-core shared VM, ``--resolution 256 --steps 4 --threads 1``; several threads on a busy machine make
OpenMP spin-waits dominate): diffusers 13.9 s/step, 5158 MB; diffadapt 9.3 s/step (0.66x), 5174 MB (1.00x);
diffadapt --cache_latents 6.2 s/step (0.44x), 4667 MB (0.90x).

Run (heavy: ~4.3 GB model folder, several GB of RAM per side):
``flock /tmp/heavy.lock python bench/train.py --reference PATH [--steps 4] [--resolution 256] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"diffusers": [], "diffadapt": [], "diffadapt --cache_latents": ["--cache_latents"]}


# --------------------------------------------------------------------------- inputs


def build_model(folder: Path) -> None:
    """The SD1.5 architecture with random weights, as a diffusers folder (tiny tokenizer vocabulary)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from diffadapt import testing

    vae = testing._build("vae", lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
        norm_num_groups=32, sample_size=512, scaling_factor=0.18215), seed=0, dtype=torch.float32, device="cpu")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=testing.sd15_text_encoder(), tokenizer=testing._tokenizer(), unet=testing.sd15_unet(),
        scheduler=DDIMScheduler(**testing._SD_BETAS, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def build_images(folder: Path, n: int = 4) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(folder / f"{i}.png")


# --------------------------------------------------------------------------- one side (child process)


def torchvision_shim() -> types.ModuleType:
    """The five transforms the diffusers script uses, on PIL images, with torchvision's semantics."""
    import numpy as np
    import torch
    from PIL import Image

    class InterpolationMode:
        NEAREST, BILINEAR, BICUBIC, LANCZOS = Image.NEAREST, Image.BILINEAR, Image.BICUBIC, Image.LANCZOS

    class Compose:
        def __init__(self, fns):
            self.fns = fns

        def __call__(self, x):
            for fn in self.fns:
                x = fn(x)
            return x

    class Resize:  # the shorter side to `size`, aspect kept
        def __init__(self, size, interpolation=Image.BILINEAR):
            self.size, self.interpolation = size, interpolation

        def __call__(self, img):
            w, h = img.size
            s = self.size / min(w, h)
            return img.resize((max(self.size, int(w * s)), max(self.size, int(h * s))), self.interpolation)

    class CenterCrop:
        def __init__(self, size):
            self.size = size

        def __call__(self, img):
            left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
            return img.crop((left, top, left + self.size, top + self.size))

    class RandomCrop(CenterCrop):
        def __call__(self, img):
            top = int(torch.randint(0, img.height - self.size + 1, ()))
            left = int(torch.randint(0, img.width - self.size + 1, ()))
            return img.crop((left, top, left + self.size, top + self.size))

    class ToTensor:
        def __call__(self, img):
            return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean[0], std[0]

        def __call__(self, x):
            return (x - self.mean) / self.std

    tv = types.ModuleType("torchvision")
    tv.transforms = types.SimpleNamespace(InterpolationMode=InterpolationMode, Compose=Compose, Resize=Resize,
                                          CenterCrop=CenterCrop, RandomCrop=RandomCrop, ToTensor=ToTensor,
                                          Normalize=Normalize)
    return tv


def run_side(side: str, argv: list[str], reference: str | None, result: Path) -> None:
    import torch

    stamps: list[tuple[float, float]] = []
    threads: set[int] = set()
    step = torch.optim.AdamW.step

    def timed_step(self, *a, **k):
        out = step(self, *a, **k)
        stamps.append((time.perf_counter(), time.process_time()))
        threads.add(torch.get_num_threads())
        return out

    torch.optim.AdamW.step = timed_step
    if side == "diffusers":
        import diffusers  # noqa: F401 - settle their "is torchvision installed" checks before the shim exists
        import transformers  # noqa: F401

        sys.modules["torchvision"] = torchvision_shim()
        spec = importlib.util.spec_from_file_location("train_dreambooth_lora", reference)
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        script.args = script.parse_args(argv)  # its dataset reads the module-level `args` of a __main__ run
        script.main(script.args)
    else:
        sys.path.insert(0, str(ROOT))
        from diffadapt.train import main

        if main(argv + SIDES[side]) != 0:
            raise SystemExit(f"{side}: training failed")
    def median_gap(i: int) -> float | None:
        gaps = sorted(b[i] - a[i] for a, b in zip(stamps, stamps[1:]))
        return gaps[len(gaps) // 2] if gaps else None

    result.write_text(json.dumps({"steps": len(stamps), "s_per_step": median_gap(0), "cpu_s_per_step": median_gap(1),
                                  "threads": sorted(threads),
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


# --------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", help="path to diffusers' examples/dreambooth/train_dreambooth_lora.py")
    p.add_argument("--workdir", default="/tmp/diffadapt-bench-train", help="model folder, images and outputs")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per side (the first is not timed)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per side (1: no OpenMP spin-waits on a busy machine)")
    p.add_argument("--model", help="a diffusers SD1 folder to use instead of the SD1.5-size random one")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    if sys.argv[1:2] == ["--side"]:  # child: everything after its own four options goes to the trainer
        child = argparse.ArgumentParser()
        for name in ("--side", "--result", "--threads", "--reference"):
            child.add_argument(name)
        own, rest = child.parse_known_args(sys.argv[1:9])
        import torch

        torch.set_num_threads(int(own.threads))
        run_side(own.side, rest + sys.argv[9:], own.reference, Path(own.result))
        return
    args = p.parse_args()

    if "diffusers" in args.sides and not (args.reference and Path(args.reference).is_file()):
        raise SystemExit("pass --reference PATH to diffusers' examples/dreambooth/train_dreambooth_lora.py "
                         "(or --sides diffadapt 'diffadapt --cache_latents' to time diffadapt alone)")
    work = Path(args.workdir)
    model, images = Path(args.model) if args.model else work / "sd15-random", work / "images"
    if not (model / "model_index.json").is_file():
        print("building the SD1.5-size random model folder …", flush=True)
        build_model(model)
    if not images.is_dir():
        build_images(images)
    common = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
              "--instance_prompt", "a photo of sks dog", "--resolution", str(args.resolution),
              "--train_batch_size", "1", "--max_train_steps", str(args.steps), "--rank", str(args.rank),
              "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--checkpointing_steps", "100000",
              "--seed", "0", "--mixed_precision", "no", "--center_crop"]
    results = {}
    for side in args.sides:
        out = work / ("out-" + side.replace(" ", "").replace("-", ""))
        extra = ["--report_to", "tensorboard" if side == "diffusers" else "none", "--output_dir", str(out)]
        if side != "diffusers":
            extra.append("--overwrite")
        result = work / "result.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--side", side, "--result", str(result), "--threads", str(args.threads),
               "--reference", args.reference or "", *common, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
        results[side] = {**json.loads(result.read_text()), "wall_s": time.perf_counter() - t0}
        r = results[side]
        print(f"{side:28s} {r['s_per_step']:.2f} s/step (CPU time {r['cpu_s_per_step']:.2f} s/step)  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB  ({r['steps']} steps, {r['wall_s']:.0f} s in all)", flush=True)
    ref = results.get("diffusers")
    if ref:
        for side, r in results.items():
            if side != "diffusers":
                print(f"{side:28s} time {r['s_per_step'] / ref['s_per_step']:.2f}x "
                      f"(CPU time {r['cpu_s_per_step'] / ref['cpu_s_per_step']:.2f}x)  "
                      f"memory {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x  of diffusers'")


if __name__ == "__main__":
    main()
