"""What the safety checks of a load cost: result finiteness (``diffadapt.guards``), header bounds, undo log.

On the real-size SD1.5 UNet (random weights) with a rank-16 LyCORIS-made LoRA on every layer, times a
patch-mode load (median of interleaved rounds) and, separately and free of the noise of whole loads, each
piece of added work: the per-module bound checks of one load, the header pass that refuses oversized
tensors, the model bound it needs, the transaction's slot snapshot — and, for comparison, what checking
every written value (``torch.isfinite(weight).all()`` per module) would cost instead of the bound.
Target: the added work ≤ 3 % of a load.
Usage: ``python bench/guards.py [--repeats 5] [--dtype fp32|fp16] [--algo lora|loha]``.
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
from diffadapt.pipeline import tensor_bound  # noqa: E402
from bench import common  # noqa: E402


def _full_scan(slot, weight, bias, **_) -> None:
    if not bool(torch.isfinite(weight).all()):
        raise da.NonFiniteError("not finite")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--algo", choices=["lora", "loha"], default="lora",
                    help="loha: a stack the bound does not cover, so every written value is scanned")
    args = ap.parse_args()
    common.quiet()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    pipe = common.sd15_pipeline(common.sd15_unet(dtype=dtype))
    with tempfile.TemporaryDirectory() as tmp:
        scratch = common.empty_like_model(testing.sd15_unet)
        path = common.make_lycoris_files(scratch, {"lora": dict(prefix="lora_unet", algo=args.algo, rank=16 if args.algo == "lora" else 8, alpha=8)}, tmp)["lora"]
        del scratch

        def round_(times):
            with common.timed(times, "load"):
                da.load(pipe, path, "x")
            da.unload(pipe, "x")

        load_s = common.median(common.run_rounds({"load": round_}, repeats=args.repeats)["load"]["load"])
        da.load(pipe, path, "x")
        slots = [patch.existing_slot(m) for m in pipe.unet.modules() if patch.existing_slot(m) is not None]
        parts = {}
        for slot in slots:  # as on a first load: max|W0| (fp16) not measured yet
            slot.__dict__.pop("_w0_absmax", None)
        with common.timed(parts, "bound checks"):
            for slot in slots:
                patch.check_written(slot, slot.module.weight.data, None, scan=patch.needs_scan(slot))
        with common.timed(parts, "full scan (not used)"):
            for slot in slots:
                _full_scan(slot, slot.module.weight.data, None)
        with common.timed(parts, "undo-log snapshot"):
            patch.snapshot([slot.module for slot in slots])
        da.unload(pipe, "x")
        with common.timed(parts, "model bound"):
            tensor_bound(pipe)
        reads = {"with": [], "without": []}
        for _ in range(5):  # interleaved, best of 5: the difference is small against a read
            for key, kw in (("with", {"target": pipe}), ("without", {})):
                t = time.perf_counter()
                da.api.read_spec(path, **kw)
                reads[key].append(time.perf_counter() - t)
    parts["header bounds"] = max(0.0, min(reads["with"]) - min(reads["without"]) - parts["model bound"])
    print(f"patch-mode load of a {args.algo} on every layer of the SD1.5 UNet ({args.dtype}, 1 thread): "
          f"{load_s:.3f} s (median of {args.repeats}); {len(slots)} modules")
    for k, v in parts.items():
        print(f"  {k:22s} {v * 1e3:8.1f} ms  {v / load_s * 100:6.2f} % of a load")
    added = sum(v for k, v in parts.items() if "not used" not in k)
    print(f"  {'added in all':22s} {added * 1e3:8.1f} ms  {added / load_s * 100:6.2f} % of a load")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
