"""What the safety checks of a load cost: result finiteness (``diffadapt.guards``) and the transaction.

On the real-size SD1.5 UNet (random weights) with a rank-16 LyCORIS-made LoRA on every layer, times a
patch-mode load + unload three ways in interleaved rounds, in one process:

* ``guarded``   — as shipped: per-module bound check (factors only), undo log, header checks;
* ``unguarded`` — ``check_written`` replaced by a no-op (what the bound check costs);
* ``full scan`` — ``check_written`` replaced by ``torch.isfinite(weight).all()`` on every module (what checking
                  every written value would cost instead of the bound).

Prints the median load time of each and the ratios guarded / unguarded and full scan / unguarded
(the target for the guarded ratio is ≤ 1.03). Usage: ``python bench/guards.py [--repeats 5] [--dtype fp32|fp16]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import diffadapt as da  # noqa: E402
from diffadapt import testing  # noqa: E402
from diffadapt.backends import patch  # noqa: E402
from bench import common  # noqa: E402


def _full_scan(slot, weight, bias) -> None:
    if not bool(torch.isfinite(weight).all()):
        raise da.NonFiniteError("not finite")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    args = ap.parse_args()
    common.quiet()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    pipe = common.sd15_pipeline(common.sd15_unet(dtype=dtype))
    with tempfile.TemporaryDirectory() as tmp:
        scratch = common.empty_like_model(testing.sd15_unet)
        path = common.make_lycoris_files(scratch, {"lora": dict(prefix="lora_unet", algo="lora", rank=16, alpha=8)}, tmp)["lora"]
        del scratch
        checks = {"guarded": patch.check_written, "unguarded": lambda *a: None, "full scan": _full_scan}

        def round_for(check):
            def round_(times):
                patch.check_written = check
                try:
                    with common.timed(times, "load"):
                        da.load(pipe, path, "x")
                    da.unload(pipe, "x")
                finally:
                    patch.check_written = checks["guarded"]
            return round_

        s = common.run_rounds({k: round_for(c) for k, c in checks.items()}, repeats=args.repeats)
        # the added work by itself, free of the noise of whole loads: every check of one load, and the header pass
        da.load(pipe, path, "x")
        slots = [patch.existing_slot(m) for m in pipe.unet.modules() if patch.existing_slot(m) is not None]
        t = time.perf_counter()
        for slot in slots:
            patch.check_written(slot, slot.module.weight.data, None)
        checks_s = time.perf_counter() - t
        da.unload(pipe, "x")
        t = time.perf_counter()
        da.api.read_spec(path, target=pipe)
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        da.api.read_spec(path)
        read_plain_s = time.perf_counter() - t
    med = {k: common.median(v["load"]) for k, v in s.items()}
    print(f"patch-mode load of a rank-16 LoRA on every layer of the SD1.5 UNet ({args.dtype}, 1 thread, "
          f"median of {args.repeats}):")
    for k, v in med.items():
        print(f"  {k:10s} {v:7.3f} s   ×{v / med['unguarded']:.3f} of unguarded")
    print(f"  bound checks of {len(slots)} modules alone: {checks_s * 1e3:.1f} ms "
          f"({checks_s / med['unguarded'] * 100:.2f} % of a load)")
    print(f"  read with header bounds {read_s:.3f} s, without {read_plain_s:.3f} s")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
