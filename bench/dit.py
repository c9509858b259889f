"""DiT load benchmark: a rank-16 Flux kohya LoRA (sd-scripts names, fused qkv and linear1) on real-width Flux-dev
blocks — diffadapt patch and inject mode against diffusers ``load_lora_weights`` and ``+ fuse_lora``.

The whole Flux-dev transformer (12 B parameters) does not fit this machine's memory, so the model is a
real-width slice: ``--double`` double-stream and ``--single`` single-stream blocks (default 1 and 2) of
width 3072 with Flux-dev's embedders and final layer, fp32, random weights (``diffadapt.architectures``),
inside a ``FluxPipeline`` with no text encoders or VAE. The file is written once (alpha 8, every module
sd-scripts trains in those blocks: 10 per double block, 3 per single block, qkv and linear1 fused) and both
sides load the same file in the same process, interleaved: one untimed warm-up round per side, then
``--repeats`` timed rounds (medians; the ratio is the median of per-round ratios).

Rows: patch-mode load vs diffusers load + fuse (same end state: fused weights), inject-mode load vs
diffusers load (both unfused), unload vs diffusers unfuse + unload. In the warm-up round the weights after
diffadapt's patch load and diffusers' fuse are compared (max |Δ| printed; must be ≤ 1e-4 relative to the
weights' scale, real widths accumulate rank-16 sums of 3072-long rows), so the bench cannot pass by doing less.

Run (heavy: ≈ 6 GB): ``flock /tmp/heavy.lock python bench/dit.py [--repeats N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
import time

import common
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from safetensors.torch import save_file

import diffadapt as da
from diffadapt.architectures import flux_dev_transformer

RANK, ALPHA = 16, 8.0
TOLERANCE = 1e-4
# sd-scripts' Flux LoRA modules (networks/lora_flux.py): all Linear layers of the blocks, fused as BFL has them
DOUBLE = ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
          "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin")
SINGLE = ("linear1", "linear2", "modulation_lin")


def kohya_flux_file(model, path: str) -> int:
    """Write a random rank-16 sd-scripts Flux LoRA for ``model``'s blocks; returns the file size."""
    from diffadapt.keys.dit import FLUX

    mods = dict(model.named_modules())
    g = torch.Generator().manual_seed(0)
    sd = {}
    for rule in FLUX:
        flat = rule.native.replace(".", "_")
        kind = re.sub(r"^(double|single)_blocks_\{i\}_", "", flat)
        if kind not in DOUBLE + SINGLE or ".processor." in rule.native:
            continue
        for i in range(64):
            targets = [t.replace("{i}", str(i)) for t in rule.targets]
            if not all(t in mods for t in targets):
                break
            out, inn = sum(mods[t].weight.shape[0] for t in targets), mods[targets[0]].weight.shape[1]
            k = "lora_unet_" + flat.replace("{i}", str(i))
            sd[f"{k}.lora_down.weight"] = torch.randn(RANK, inn, generator=g) / inn**0.5
            sd[f"{k}.lora_up.weight"] = torch.randn(out, RANK, generator=g) * 0.01
            sd[f"{k}.alpha"] = torch.tensor(ALPHA)
    save_file(sd, path)
    return os.path.getsize(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--double", type=int, default=1, help="double-stream blocks (Flux-dev: 19)")
    ap.add_argument("--single", type=int, default=2, help="single-stream blocks (Flux-dev: 38)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common.quiet()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    transformer = flux_dev_transformer(dtype=torch.float32, num_layers=args.double, num_single_layers=args.single)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    params = sum(p.numel() for p in transformer.parameters())
    snap = common.Snapshot(transformer)
    with tempfile.TemporaryDirectory(prefix="diffadapt-bench-") as tmp:
        path = f"{tmp}/flux_kohya_r16.safetensors"
        size = kohya_flux_file(transformer, path)
        state = {}
        # compared in the warm-up round: every module of the first double and single block (fused splits included)
        watch = [n for n, p in transformer.named_parameters() if p.dim() == 2 and n.endswith("weight")
                 and (n.startswith("transformer_blocks.0.") or n.startswith("single_transformer_blocks.0."))]

        def ours(times, mode):
            with common.timed(times, "load"):
                da.load(pipe, path, name="x", mode=mode)
            if mode == "patch" and "ours" not in state:
                params = dict(transformer.named_parameters())
                state["ours"] = {n: params[n].detach().clone() for n in watch}
            with common.timed(times, "unload"):
                da.unload(pipe, "x")

        def diffusers(times):
            with common.timed(times, "load"):
                pipe.load_lora_weights(path, adapter_name="x")
            with common.timed(times, "fuse"):
                pipe.fuse_lora()
            if "ref" not in state:
                params = {n.replace(".base_layer", ""): p for n, p in transformer.named_parameters()}
                state["ref"] = {n: params[n].detach().clone() for n in watch}
            with common.timed(times, "unfuse"):
                pipe.unfuse_lora()
            with common.timed(times, "unload"):
                pipe.unload_lora_weights()
            snap.restore()

        samples = common.run_rounds({"patch": lambda t: ours(t, "patch"), "inject": lambda t: ours(t, "inject"),
                                     "diffusers": diffusers}, repeats=args.repeats)
    med = {side: {ph: common.median(v) for ph, v in s.items()} for side, s in samples.items()}
    ref, patch, inject = med["diffusers"], med["patch"], med["inject"]
    n = len(samples["patch"]["load"])
    ratio = common.median([samples["patch"]["load"][i] / (samples["diffusers"]["load"][i] + samples["diffusers"]["fuse"][i])
                           for i in range(n)])
    inject_ratio = common.median([samples["inject"]["load"][i] / samples["diffusers"]["load"][i] for i in range(n)])
    touched = [k for k in state["ref"] if k in state["ours"] and not torch.equal(state["ref"][k], snap.saved[k])]
    delta = max((state["ours"][k] - state["ref"][k]).abs().max().item() for k in touched)
    scale = max(state["ref"][k].abs().max().item() for k in touched)
    rows = [
        ["patch load vs load_lora_weights + fuse_lora", f"{ref['load']:.2f} + {ref['fuse']:.2f}",
         f"{patch['load']:.2f}", f"{ratio:.3f}"],
        ["inject load vs load_lora_weights (unfused)", f"{ref['load']:.2f}", f"{inject['load']:.2f}",
         f"{inject_ratio:.3f}"],
        ["patch unload vs unfuse + unload", f"{ref['unfuse']:.2f} + {ref['unload']:.2f}", f"{patch['unload']:.3f}",
         f"{patch['unload'] / (ref['unfuse'] + ref['unload']):.3f}"],
    ]
    print(common.fmt_table(rows, ["Flux kohya LoRA r16", "diffusers (s)", "diffadapt (s)", "ratio"]))
    ok = delta <= TOLERANCE * max(scale, 1.0)
    print(f"model: Flux-dev width, {args.double} double + {args.single} single blocks, {params / 1e6:.0f} M params fp32; "
          f"file {size / common.MB:.0f} MB; {len(touched)} weights touched")
    print(f"max |Δ| diffadapt patch vs diffusers fuse: {delta:.3g} (weights up to {scale:.3g}) — "
          f"{'OK' if ok else 'MISMATCH'}; median of {args.repeats} rounds; bench took {time.perf_counter() - t0:.0f} s; "
          f"torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
