"""How long requests wait for a pipeline: ``da.using`` from 32 threads on the tiny SD1 pipeline.

Each thread runs a few requests (a per-request weight stack plus a short hold standing for a denoising call);
the wait of each request is the time from asking to entering the block. Compares diffadapt's lock
(``FairRLock``: first come, first served) with a plain ``threading.RLock`` swapped in, in the same process, and
prints the median, 95th percentile and maximum wait of each. A FIFO lock bounds every wait by the queue ahead
of it; an unfair one lets some threads win repeatedly while others starve.
Usage: ``python bench/lock.py [--threads 32] [--requests 4] [--hold 0.005]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import diffadapt as da  # noqa: E402
from diffadapt.fixtures import lycoris_file  # noqa: E402
from diffadapt.pipeline import registry  # noqa: E402
from diffadapt.testing import tiny_sd1_pipeline  # noqa: E402


def waits(pipe, *, threads: int, requests: int, hold: float) -> list[float]:
    out: list[float] = []
    start = threading.Barrier(threads)

    def worker(i: int) -> None:
        start.wait()
        for r in range(requests):
            t0 = time.perf_counter()
            with da.using(pipe, {"a": 0.1 + (i % 7) / 10, "b": 0.5}):
                out.append(time.perf_counter() - t0)
                time.sleep(hold)  # the denoising call, lock held

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--hold", type=float, default=0.005)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = tiny_sd1_pipeline()
    for name, seed in (("a", 1), ("b", 2)):
        da.load(pipe, lycoris_file(pipe.unet, prefix="lora_unet", seed=seed)[0], name)
    reg = registry(pipe)
    fair = reg.lock
    print(f"{args.threads} threads × {args.requests} requests, {args.hold * 1e3:.0f} ms held per request")
    for label, lock in (("FairRLock (diffadapt)", fair), ("threading.RLock", threading.RLock())):
        reg.lock = lock
        w = sorted(waits(pipe, threads=args.threads, requests=args.requests, hold=args.hold))
        p95 = w[int(0.95 * (len(w) - 1))]
        print(f"  {label:22s} wait median {statistics.median(w) * 1e3:7.1f} ms   p95 {p95 * 1e3:7.1f} ms   "
              f"max {w[-1] * 1e3:7.1f} ms")
    reg.lock = fair


if __name__ == "__main__":
    main()
