"""Storage of patch-mode backups: settings, buffers, side-stream copies, and memory the process must not write.

The policy is described in ``diffadapt/backups.py`` (the verbs) and docs/design.md, "Exact restore".
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedError

BACKUPS = ("host", "device", "none")
_ATTR = "_diffadapt_patch_settings"
_ALIGN = 64  # bytes between two backups in one allocation


@dataclass
class Settings:
    """Per-component patch-mode storage options (see :func:`configure`)."""

    backup: str = "host"
    release_on_unload: bool = False


def check_backup(backup: str) -> str:
    if backup not in BACKUPS:
        raise UnsupportedError(f"backup={backup!r}: choose one of {list(BACKUPS)}")
    return backup


def settings_of(component: nn.Module | None) -> Settings:
    found = None if component is None else component.__dict__.get(_ATTR)
    return found if found is not None else Settings()


def store_settings(component: nn.Module, settings: Settings) -> None:
    component.__dict__[_ATTR] = settings


# -- memory the process must not write -----------------------------------------------------------------


class MemoryMap:
    """The process's mappings (``/proc/self/maps``), read once, to tell writable private memory from the rest."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, str, str]] = []
        if not sys.platform.startswith("linux"):
            return
        try:
            with open("/proc/self/maps") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            self.rows.append((lo, hi, parts[1], parts[5] if len(parts) > 5 else ""))
        self.rows.sort()
        self.starts = [r[0] for r in self.rows]

    def writable(self, t: torch.Tensor) -> bool:
        """Whether writing ``t`` in place stays private to this process and cannot fault.

        False for a read-only mapping and for any file or shared mapping (a mapped checkpoint: writing would
        change the file or other processes' view). Memory of unknown origin counts as writable.
        """
        if t.device.type != "cpu" or not self.rows or t.numel() == 0:
            return True
        ptr = t.untyped_storage().data_ptr()
        i = bisect.bisect_right(self.starts, ptr) - 1
        if i < 0 or not self.rows[i][0] <= ptr < self.rows[i][1]:
            return True
        _, _, perms, path = self.rows[i]
        file_backed = bool(path) and not path.startswith("[")
        return "w" in perms and perms[3] == "p" and not file_backed


_READING: contextvars.ContextVar[list | None] = contextvars.ContextVar("diffadapt_memory_map", default=None)


def memory_map() -> MemoryMap:
    """The process's mappings: read once per backend call (inside :func:`one_reading`), else read now."""
    held = _READING.get()
    if held is None:
        return MemoryMap()
    if not held:
        held.append(MemoryMap())
    return held[0]


@contextlib.contextmanager
def one_reading():
    """Every :func:`memory_map` inside shares one reading of ``/proc/self/maps``: a load checks hundreds of
    weights, and the file has thousands of lines. Mappings made meanwhile are our own private copies, which
    an older reading rightly calls writable."""
    token = _READING.set([])
    try:
        yield
    finally:
        _READING.reset(token)


# -- backup buffers ------------------------------------------------------------------------------------


@torch.inference_mode(False)  # backups are written outside inference mode later
def allocate(likes: list[torch.Tensor], where: str) -> list[torch.Tensor]:
    """Contiguous empty tensors shaped like ``likes``, carved from one allocation.

    ``where``: "host" (CPU; pinned when the weights are on a CUDA device) or "device" (the weights' device).
    """
    if not likes:
        return []
    offsets, total = [], 0
    for t in likes:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    device = likes[0].device
    if where == "device" and device.type != "cpu":
        buf = torch.empty(total, dtype=torch.uint8, device=device)
    else:
        buf = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    return [buf[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for o, t in zip(offsets, likes)]


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class SideCopies:
    """Copies of live weights into their backups; on CUDA issued on a side stream and waited for per module.

    CPU copies run when a module is first written (``wait``), so the copy and the write share the cache.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device=device)
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor, Any]] = {}

    @torch.inference_mode(False)
    @torch.no_grad()
    def start(self, key: int, backup: torch.Tensor, live: torch.Tensor) -> None:
        event = None
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                backup.copy_(live, non_blocking=True)
                if backup.device.type == "cuda":
                    backup.record_stream(self.stream)
                event = torch.cuda.Event()
                event.record(self.stream)
        self.pending[key] = (backup, live, event)

    @torch.inference_mode(False)
    @torch.no_grad()
    def wait(self, key: int) -> None:
        """Before writing the live weight: its values are in the backup."""
        item = self.pending.pop(key, None)
        if item is None:
            return
        backup, live, event = item
        if event is None:
            backup.copy_(live)
        else:
            torch.cuda.current_stream(live.device).wait_event(event)

    def finish(self) -> None:
        """Every copy done (host readers of the backups may follow)."""
        for key in list(self.pending):
            self.wait(key)
        if self.stream is not None:
            self.stream.synchronize()
