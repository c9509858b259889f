"""Hotswap benchmark on the real-size SD1.5 UNet: ``da.hotswap`` against unload + load and diffusers' hotswap.

Two kohya LoRAs made by LyCORIS on every attention, resnet, sampler, conv_in/out and time-embedding layer
(A: rank 16, alpha 8, seed 0; B: rank 8, alpha 4, seed 1), saved with safetensors. Timed, each as the median
of ``--repeats`` rounds after one warm-up round (diffadapt's two sides interleaved), a round swapping
A → B and B → A:

* diffadapt: ``da.hotswap(pipe, path, "x")`` (patch mode: the fused weights are rewritten in place);
* diffadapt: ``da.unload(pipe, "x")`` + ``da.load(pipe, path, "x")``;
* diffadapt: ``da.hotswap`` of the same files loaded with ``mode="inject"`` after ``da.prepare_hotswap(pipe,
  max_rank=16)`` (unfused peft layers: the factors are copied into zero-padded rank-16 parameters);
* diffusers: ``pipe.load_lora_weights(path, adapter_name="x", hotswap=True)`` after
  ``pipe.enable_lora_hotswap(target_rank=16)`` (its LoRA stays unfused: only the small factors are copied).

Targets: hotswap ≤ 1.0 × diffusers' hotswap and ≤ 0.1 × diffadapt's unload + load. Because diffusers leaves the
LoRA unfused, every denoising step pays for it; ``--step`` also times one UNet step (32×32 latent) with
diffusers' LoRA enabled and disabled (= fused weights), interleaved, to show when fused swapping pays back.
A check compares diffadapt's swapped weights with a fresh load of the same file, and the output of a few LoRA
layers with diffusers'.

Run: ``python bench/hotswap.py [--repeats N] [--step] [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import common
import torch

import diffadapt as da
from diffadapt import testing
from diffadapt.backends import patch
from diffadapt.pipeline import registry

FILES = {"a": dict(algo="lora", rank=16, alpha=8, seed=0), "b": dict(algo="lora", rank=8, alpha=4, seed=1)}
TARGETS = {"vs diffusers hotswap": 1.0, "vs unload + load": 0.1, "inject vs diffusers hotswap": 1.0}
CHECKED = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.proj_in",
           "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"]


def swap_rounds(sides: dict, paths: dict) -> dict[str, float]:
    """Median seconds per swap for each side (rounds interleaved); a round swaps to B and back to A."""
    def round_(swap):
        def run(times):
            for to in ("b", "a"):
                with common.timed(times, to):
                    swap(paths[to])
        return run

    samples = common.run_rounds({side: round_(swap) for side, swap in sides.items()}, repeats=ARGS.repeats)
    return {side: (common.median(t["a"]) + common.median(t["b"])) / 2 for side, t in samples.items()}


def reload(pipe, path) -> None:
    da.unload(pipe, "x")
    da.load(pipe, path, "x")


def step_rounds(pipe) -> dict[str, float]:
    """One UNet step (32×32 latent) with diffusers' LoRA disabled (the cost of fused weights) and enabled."""
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)

    def round_(enabled: bool):
        def run(times):
            pipe.enable_lora() if enabled else pipe.disable_lora()
            with torch.no_grad(), common.timed(times, "step"):
                pipe.unet(x, torch.tensor([500]), c)
        return run

    samples = common.run_rounds({"fused": round_(False), "unfused": round_(True)}, repeats=ARGS.repeats)
    pipe.enable_lora()
    return {side: common.median(t["step"]) for side, t in samples.items()}


def layer_outputs(unet) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    out = {}
    with torch.no_grad():
        for name in CHECKED:
            m = unet.get_submodule(name)
            w = getattr(m, "base_layer", m).weight
            x = torch.randn(2, *w.shape[1:2], *([1, 1] if w.dim() == 4 else []), generator=g)
            out[name] = m(x)
    return out


def main() -> None:
    common.quiet()
    t_start = time.perf_counter()
    pipe = common.sd15_pipeline(common.sd15_unet())
    with tempfile.TemporaryDirectory(prefix="diffadapt-bench-") as tmp:
        scratch = common.empty_like_model(testing.sd15_unet)
        paths = common.make_lycoris_files(scratch, {k: dict(prefix="lora_unet", **v) for k, v in FILES.items()}, tmp)
        del scratch
        sizes = {k: os.path.getsize(p) / common.MB for k, p in paths.items()}

        da.load(pipe, paths["a"], "x")
        touched = {t.module for t in registry(pipe).adapters["x"].targets}
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in touched)
        timing = swap_rounds({"hotswap": lambda p: da.hotswap(pipe, p, "x"), "reload": lambda p: reload(pipe, p)},
                             paths)
        ours, ours_reload = timing["hotswap"], timing["reload"]
        print(f"  diffadapt hotswap, unload + load done ({time.perf_counter() - t_start:.0f} s)", flush=True)

        def copy_round(times):  # the floor of any fused swap: one pass over the touched weights
            with common.timed(times, "copy"):
                for m in touched:
                    m.weight.data.copy_(patch.existing_slot(m).original)
        floor = common.median(common.run_rounds({"copy": copy_round}, repeats=ARGS.repeats)["copy"]["copy"])

        da.hotswap(pipe, paths["b"], "x")  # check: swapped weights == a fresh load; keep layer outputs
        swapped = {n: pipe.unet.get_submodule(n).weight.detach().clone() for n in CHECKED}
        ours_out = layer_outputs(pipe.unet)
        reload(pipe, paths["b"])
        delta_fresh = max((pipe.unet.get_submodule(n).weight - w).abs().max().item() for n, w in swapped.items())
        da.unload(pipe)

        da.load(pipe, paths["a"], "x", mode="inject")
        da.prepare_hotswap(pipe, max_rank=16)
        inject = swap_rounds({"inject": lambda p: da.hotswap(pipe, p, "x")}, paths)["inject"]
        da.unload(pipe)
        print(f"  diffadapt inject-mode hotswap done ({time.perf_counter() - t_start:.0f} s)", flush=True)

        pipe.enable_lora_hotswap(target_rank=16)
        pipe.load_lora_weights(paths["a"], adapter_name="x")
        ref = swap_rounds({"diffusers": lambda p: pipe.load_lora_weights(p, adapter_name="x", hotswap=True)},
                          paths)["diffusers"]
        print(f"  diffusers hotswap done ({time.perf_counter() - t_start:.0f} s)", flush=True)
        pipe.load_lora_weights(paths["b"], adapter_name="x", hotswap=True)
        delta_ref = max((ours_out[n] - out).abs().max().item() for n, out in layer_outputs(pipe.unet).items())
        steps = step_rounds(pipe) if ARGS.step else None
        pipe.unload_lora_weights()

    ratios = {"vs diffusers hotswap": ours / ref, "vs unload + load": ours / ours_reload,
              "inject vs diffusers hotswap": inject / ref}
    rows = [["diffadapt hotswap (fused, in place)", f"{ours:.3f}", "-", "-"],
            ["diffadapt unload + load", f"{ours_reload:.3f}", f"{ratios['vs unload + load']:.3f}",
             f"<= {TARGETS['vs unload + load']}"],
            ["diffusers load_lora_weights(hotswap=True)", f"{ref:.3f}", f"{ratios['vs diffusers hotswap']:.3f}",
             f"<= {TARGETS['vs diffusers hotswap']}"],
            ["diffadapt hotswap (inject, prepared; ÷ diffusers)", f"{inject:.3f}",
             f"{ratios['inject vs diffusers hotswap']:.3f}", f"<= {TARGETS['inject vs diffusers hotswap']}"]]
    print(common.fmt_table(rows, ["case", "seconds / swap", "diffadapt hotswap ÷ this", "target"]))
    print(f"LoRA files {sizes['a']:.1f} MB (rank 16) and {sizes['b']:.1f} MB (rank 8); diffadapt rewrites "
          f"{len(touched)} fused weights per swap ({nbytes / 1e9:.2f} GB); a plain copy of them takes {floor:.3f} s "
          f"(the floor of any fused swap; hotswap = {ours / floor:.2f}× that)")
    print("caveat: diffusers' hotswap copies LoRA factors into unfused peft layers; every UNet step then also "
          "runs the LoRA branch, while diffadapt's swapped weights are fused (no per-step cost)")
    if steps:
        extra = steps["unfused"] - steps["fused"]
        payback = ""
        if extra > 0 < ours - ref:
            payback = f"; diffadapt's slower swap is paid back after {(ours - ref) / extra:.1f} steps"
        print(f"one UNet step (32×32 latent): fused weights {steps['fused']:.2f} s, diffusers' unfused LoRA "
              f"{steps['unfused']:.2f} s ({extra:+.2f} s per step){payback}")
    print(f"check: max |Δ| swapped vs fresh load {delta_fresh:.3g}; layer outputs vs diffusers {delta_ref:.3g}")
    verdict = "PASS" if all(ratios[k] <= t for k, t in TARGETS.items()) else "FAIL"
    print(f"targets: {verdict}   (median of {ARGS.repeats} rounds after 1 warm-up, "
          f"{torch.get_num_threads()} threads; bench took {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per side (median); default 3")
    ap.add_argument("--step", action="store_true", help="also time one UNet step with each side's LoRA")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    ARGS = ap.parse_args()
    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    main()
