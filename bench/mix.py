"""Mixing benchmark: re-weighting a stack of 3 rank-16 LoRAs, and the step time with them loaded.

Real-size SD1.5 UNet (random weights, fp32, CPU), one process, three LyCORIS-made kohya LoRAs (rank 16,
alpha 8, every attention/resnet/sampler layer):

* re-weight: diffadapt ``set_weights`` of all three (patch mode: one vectorised recompute per touched
  module, written in place) against diffusers ``set_adapters`` + ``fuse_lora`` of the same three — the same
  end state, fused weights. Target: ≤ 0.05×. Also the time to change one adapter's weight.
* step time: one UNet forward on a 32×32 latent (batch 2, as with CFG) — base, patch mode with the 3
  adapters (target: = base), inject mode with the 3 adapters when that backend is present (target ≤ 1.10×),
  and diffusers with the 3 LoRAs unfused, for reference.

Run: ``python bench/mix.py [--repeats N] [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import tempfile

import common
import torch

import diffadapt as da
from diffadapt import backends, testing

NAMES = ("a", "b", "c")
WEIGHTS = [{"a": 0.7, "b": 0.5, "c": 0.3}, {"a": 0.6, "b": 0.4, "c": 0.2}]


def step(unet, inputs) -> None:
    with torch.no_grad():
        unet(*inputs[:2], encoder_hidden_states=inputs[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    common.quiet()
    torch.manual_seed(0)
    pipe = common.sd15_pipeline()
    unet = pipe.unet
    tmp = tempfile.mkdtemp()
    scratch = common.empty_like_model(testing.sd15_unet)
    paths = common.make_lycoris_files(
        scratch, {n: dict(algo="lora", prefix="lora_unet", rank=16, alpha=8, seed=i) for i, n in enumerate(NAMES)},
        tmp)
    del scratch
    inputs = (torch.randn(2, 4, 32, 32), torch.tensor([500, 500]), torch.randn(2, 77, 768))
    rows = []

    # -- re-weighting ----------------------------------------------------------------------------------
    for n in NAMES:
        da.load(pipe, paths[n], n)

    def ours(times):
        with common.timed(times, "all three"):
            da.set_weights(pipe, WEIGHTS[0])
        with common.timed(times, "one"):
            da.set_weights(pipe, {"a": 0.9})
        da.set_weights(pipe, WEIGHTS[1])

    ours_samples = common.run_rounds({"ours": ours}, repeats=repeats)["ours"]
    da.set_weights(pipe, WEIGHTS[0])
    ours_fused = {k: p.detach().clone() for k, p in unet.named_parameters()}
    da.unload(pipe)

    for n in NAMES:
        pipe.load_lora_weights(paths[n], adapter_name=n)

    def theirs(times):
        with common.timed(times, "fuse"):
            pipe.set_adapters(list(WEIGHTS[0]), list(WEIGHTS[0].values()))
            pipe.fuse_lora(components=["unet"])
        pipe.unfuse_lora(components=["unet"])

    theirs_samples = common.run_rounds({"theirs": theirs}, repeats=max(1, repeats - 1))["theirs"]
    pipe.set_adapters(list(WEIGHTS[0]), list(WEIGHTS[0].values()))
    pipe.fuse_lora(components=["unet"])
    theirs_fused = {k.replace(".base_layer", ""): p for k, p in unet.named_parameters() if "lora_" not in k}
    err = max((ours_fused[k] - theirs_fused[k]).abs().max().item() for k in ours_fused)
    pipe.unfuse_lora(components=["unet"])
    fuse_t = common.median(theirs_samples["fuse"])
    all_t, one_t = common.median(ours_samples["all three"]), common.median(ours_samples["one"])
    rows.append(["re-weight 3 LoRAs vs set_adapters+fuse", f"{fuse_t:.2f}", f"{all_t:.3f}", f"{all_t / fuse_t:.3f}",
                 "<= 0.05"])
    rows.append(["re-weight 1 of 3 LoRAs", f"{fuse_t:.2f}", f"{one_t:.3f}", f"{one_t / fuse_t:.3f}", ""])

    # -- step time -------------------------------------------------------------------------------------
    def steps(label):
        def run(times):
            with common.timed(times, label):
                step(unet, inputs)
        return run

    diffusers_step = common.median(common.run_rounds({"d": steps("s")}, repeats=repeats)["d"]["s"])
    pipe.unload_lora_weights()
    base_step = common.median(common.run_rounds({"b": steps("s")}, repeats=repeats)["b"]["s"])
    step_rows = [["base step (batch 2, 32×32)", f"{base_step:.3f}", "", "1.00", ""],
                 ["diffusers, 3 LoRAs unfused", f"{base_step:.3f}", f"{diffusers_step:.3f}",
                  f"{diffusers_step / base_step:.2f}", ""]]
    for mode, target in (("patch", "= 1.00"), ("inject", "<= 1.10")):
        if mode not in backends.BACKENDS:
            step_rows.append([f"{mode} mode, 3 adapters", "", "n/a", "", target])
            continue
        for n in NAMES:
            da.load(pipe, paths[n], n, mode=mode, weight=WEIGHTS[0][n])
        t = common.median(common.run_rounds({"m": steps("s")}, repeats=repeats)["m"]["s"])
        da.unload(pipe)
        step_rows.append([f"{mode} mode, 3 adapters", f"{base_step:.3f}", f"{t:.3f}", f"{t / base_step:.2f}", target])

    print(common.fmt_table(rows, ["case", "reference (s)", "diffadapt (s)", "ratio", "target"]))
    print(f"max |Δ| between diffadapt's and diffusers' fused weights: {err:.2e}")
    print()
    print(common.fmt_table(step_rows, ["step time", "base (s)", "with adapters (s)", "ratio", "target"]))
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
