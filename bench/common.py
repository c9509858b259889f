"""Shared helpers for the benchmarks in ``bench/``.

* timing: :func:`run_rounds` interleaves the sides of a comparison, untimed warm-up rounds first;
* memory: :class:`PeakRSS` samples ``/proc/self/statm`` from a background thread and reports the peak
  resident memory a block adds over the RSS at its start;
* models: :func:`sd15_unet` (the real-size SD1.5 UNet, random weights, built once per process) and
  :func:`sd15_pipeline` (a ``StableDiffusionPipeline`` around it with tiny other components);
* adapters: :func:`make_lycoris_files` writes LyCORIS-made random adapters for a model to safetensors files;
* restore: :class:`Snapshot` keeps a copy of a model's parameters to undo in-place edits by references.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import statistics
import threading
import time
from typing import Any, Callable, Iterator

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1e6

# --------------------------------------------------------------------------- timing


@contextlib.contextmanager
def timed(times: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall time of the block to ``times[phase]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[phase] = times.get(phase, 0.0) + time.perf_counter() - t0


def run_rounds(
    rounds: dict[str, Callable[[dict[str, float]], Any]], *, repeats: int, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Interleave the sides: ``warmup + repeats`` times, call every ``rounds[side](times)`` once.

    Returns ``{side: {phase: [seconds per timed round]}}``. Each round records its phases with
    :func:`timed` and must leave the model as it found it (restore work outside ``timed`` blocks is not
    counted). Interleaving makes load from other processes hit every side alike; the first touch of
    fresh memory is slow on some VMs, hence the untimed warm-up rounds.
    """
    samples: dict[str, dict[str, list[float]]] = {side: {} for side in rounds}
    for i in range(warmup + repeats):
        for side, round_fn in rounds.items():
            gc.collect()
            times: dict[str, float] = {}
            round_fn(times)
            if i >= warmup:
                for phase, t in times.items():
                    samples[side].setdefault(phase, []).append(t)
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# --------------------------------------------------------------------------- memory


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so RSS deltas count new allocations."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Peak RSS a block adds: ``with PeakRSS() as m: ...``, then ``m.added`` (bytes) and ``m.added_mb``.

    A daemon thread samples ``/proc/self/statm`` every ``interval`` seconds (it needs the GIL only for a
    few microseconds per sample); a short spike between two samples can be missed. ``trim`` first hands
    memory that the allocator keeps from earlier work back to the OS; otherwise reusing it adds no RSS.
    """

    def __init__(self, interval: float = 0.005, *, trim: bool = True):
        self.interval, self.trim = interval, trim
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        if self.trim:
            trim_heap()
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def added(self) -> int:
        return self.peak - self.start

    @property
    def added_mb(self) -> float:
        return self.added / MB


# --------------------------------------------------------------------------- models


def quiet() -> None:
    """Silence library chatter (safety checker, missing text-encoder keys, LyCORIS info)."""
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)


@functools.cache
def sd15_unet(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The real-size SD1.5 UNet with random weights (seed 0), built once per process."""
    from diffadapt import testing

    return testing.sd15_unet(dtype=dtype)


def sd15_pipeline(unet: nn.Module | None = None):
    """A ``StableDiffusionPipeline`` around the SD1.5 UNet, with the tiny SD1 text encoder, VAE and tokenizer."""
    from diffusers import StableDiffusionPipeline

    from diffadapt import testing

    comps = dict(testing.tiny_sd1_pipeline().components)
    comps["unet"] = unet if unet is not None else sd15_unet()
    comps.update(safety_checker=None, feature_extractor=None)
    return StableDiffusionPipeline(**comps, requires_safety_checker=False)


# --------------------------------------------------------------------------- adapters


def make_lycoris_files(
    scratch: nn.Module, configs: dict[str, dict[str, Any]], directory: str
) -> dict[str, str]:
    """Write one LyCORIS-made random adapter per config to ``directory/<name>.safetensors``; returns the paths.

    ``scratch`` is a model with the target architecture; its forwards are wrapped while a network is made
    and unwrapped after, and its weights are never read (an uninitialised ``to_empty`` copy is enough).
    ``configs`` are keyword arguments of :func:`diffadapt.fixtures.lycoris_network`.
    """
    from safetensors.torch import save_file

    from diffadapt import fixtures

    paths = {}
    for name, kwargs in configs.items():
        network = fixtures.lycoris_network(scratch, **kwargs)
        sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in network.state_dict().items()}
        network.restore()
        paths[name] = os.path.join(directory, f"{name}.safetensors")
        save_file(sd, paths[name])
        del network, sd
    return paths


def empty_like_model(build: Callable[..., nn.Module]) -> nn.Module:
    """The architecture of ``build(device="meta")`` with uninitialised CPU storage (pages untouched)."""
    return build(device="meta").to_empty(device="cpu")


# --------------------------------------------------------------------------- restore


class Snapshot:
    """A copy of a module's parameters by name, to undo in-place edits made by reference implementations."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved = {n: p.detach().clone() for n, p in module.named_parameters()}

    def restore(self) -> None:
        with torch.no_grad():
            for n, p in self.module.named_parameters():
                if not torch.equal(p, self.saved[n]):
                    p.copy_(self.saved[n])

    def changed(self) -> list[str]:
        """Names of the parameters that differ from the snapshot now."""
        return [n for n, p in self.module.named_parameters() if not torch.equal(p, self.saved[n])]


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), *(line(r) for r in rows)])
