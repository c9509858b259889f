"""How fast bad sources are refused: a file of unknown keys, and a hub id with the Hub unreachable.

1. A safetensors file of N one-value tensors under keys no adapter method knows (a model checkpoint given by
   mistake): ``da.inspect`` refuses it from the header; the reference is what reading it costs at all
   (``safetensors.torch.load_file``), which any check after the read would pay first. Also a valid adapter
   header of the same size, to show the header pass is linear.
2. A hub file id with nothing cached and ``HF_ENDPOINT`` on a closed local port: ``da.inspect`` against
   ``huggingface_hub.hf_hub_download`` itself (which retries with back-off).

Usage: ``python bench/refuse.py [--keys 50000] [--repeats 3] [--no-hub]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def header_file(path: Path, names: list[str]) -> Path:
    header = json.dumps({n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
                         for i, n in enumerate(names)}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4 * len(names)))
    return path


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 — the refusal is what is timed
            pass
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hub", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(tmp / "hub"), HF_HUB_OFFLINE="0")

    import huggingface_hub
    from safetensors.torch import load_file

    import diffadapt as da

    unknown = header_file(tmp / "unknown.safetensors", [f"model.layers.{i}.weight" for i in range(args.keys)])
    half = args.keys // 2
    known = header_file(tmp / "known.safetensors", [f"lora_unet_m{i}.lora_{s}.weight" for i in range(half)
                                                    for s in ("down", "up")] + ["model.extra"])
    ref = best(lambda: load_file(unknown), args.repeats)
    for name, path in (("unknown keys", unknown), ("one unknown among known", known)):
        t = best(lambda: da.inspect(path), args.repeats)
        print(f"refuse {args.keys:,} keys, {name:24s} inspect {t * 1e3:7.1f} ms   reading the file "
              f"{ref * 1e3:7.1f} ms   ratio {t / ref:.2f}")
    if args.no_hub:
        return
    t = best(lambda: da.inspect("user/ink/adapter.safetensors"), 1)
    r = best(lambda: huggingface_hub.hf_hub_download("user/ink", "adapter.safetensors"), 1)
    print(f"hub unreachable, nothing cached: inspect {t:.2f} s   hf_hub_download {r:.2f} s   ratio {t / r:.3f}")


if __name__ == "__main__":
    main()
