"""One patched module: its originals (W0) and the stack of adapters written into its weight in place.

A :class:`Slot` composes the stack (``compose.py``) from W0 into the live weight's own storage, checks the result
(``guards.py``) and restores W0 bit-exactly; where W0 is kept is ``storage.py``'s business. The patch backend
(``patch.py``) keeps one slot per module and drives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import storage
from .storage import SideCopies
from ..compose import compose
from ..guards import check_written, needs_scan
from ..methods.base import Params

FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
               if hasattr(torch, n))


@dataclass
class Entry:
    """One adapter on one module, with its current effective strength."""

    name: str
    params: Params  # on the module's device, float32
    strength: float = 1.0


@dataclass(eq=False)
class Slot:
    """A patched module: where its originals are kept and the adapters stacked on it.

    ``backup`` holds W0 (None with backup="none"); ``clean``: the live weight and bias hold the originals bit
    for bit, so a write may read W0 from them; ``mapped``: the parameter was mapped memory the process must not
    write, so it got a private copy and ``backup`` *is* the mapped original. ``baked`` counts the entries
    already in the live weight of a slot without backup.
    """

    module: nn.Module
    backup: torch.Tensor | None = None
    backup_bias: torch.Tensor | None = None
    entries: list[Entry] = field(default_factory=list)
    clean: bool = True
    mapped: bool = False
    mapped_bias: bool = False
    baked: int = 0
    where: str = "host"
    copies: SideCopies | None = field(default=None, repr=False)  # the pending copy of W0 into ``backup``
    rounding: float = 0.0  # relative error of the last write into float8 storage
    stamp: tuple | None = field(default=None, repr=False)  # the clean weight as last seen (see ``_stamp``)
    w0: torch.Tensor | None = field(default=None, repr=False)  # W0 as compute reads it during a write
    b0: torch.Tensor | None = field(default=None, repr=False)
    label: str = ""  # "component.module", for errors

    @property
    def original(self) -> torch.Tensor:
        if self.w0 is not None:
            return self.w0
        if self.copies is not None:
            self.copies.wait(id(self))
            self.copies = None
        return self.backup if self.backup is not None else self.module.weight.data

    @property
    def original_bias(self) -> torch.Tensor | None:
        if self.b0 is not None:
            return self.b0
        if self.backup_bias is not None:
            return self.backup_bias
        bias = getattr(self.module, "bias", None)
        return bias.data if isinstance(bias, torch.Tensor) else None

    # -- composition ---------------------------------------------------------------------------------
    def compute(self, *, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) for the current stack, in the original dtype; originals when nothing applies.

        ``out`` (a float32 buffer of the weight's shape, not the original) takes the first additive step
        straight into the live weight: a single ``addmm`` for low-rank stacks, a fused ``addcmul`` for
        LoHa/LoKr — one pass over W, no intermediate ΔW or copy.
        """
        return compose(self.original, self.entries, bias=self.original_bias, out=out)

    @property
    def fixed(self) -> bool:
        """No copy of the originals (backup="none", or released with bake=True): only new adapters may be added."""
        return self.backup is None

    @torch.inference_mode(False)  # an inference tensor in a parameter would fail compiled code's guards
    @torch.no_grad()
    def write(self) -> None:
        """Recompute the stack into the live weight (and bias), in place."""
        if self.fixed:
            return self._bake()
        if self.copies is not None:
            self.copies.wait(id(self))
            self.copies = None
        active = any(e.strength != 0.0 for e in self.entries)
        if not active and self.clean:
            return
        live, live_bias = self.module.weight.data, _bias(self.module)
        if self.clean and not _unchanged(self.stamp, _stamp(self.module)):
            self._rebase()
            live, live_bias = self.module.weight.data, _bias(self.module)
        if any(e.params.bias_delta() is not None for e in self.entries):
            self._back_up_bias()
        scan = needs_scan(self)  # decided while W0 is readable: the bound on the factors, or a scan after
        was_clean, self.clean, self.stamp = self.clean, False, None  # from here on the live values may change
        self.w0 = live if was_clean else _on(self.backup, live)
        self.b0 = None if self.backup_bias is None else live_bias if was_clean else _on(self.backup_bias, live_bias)
        try:
            weight, bias = self._compose(out=live, dtype=live.dtype)
            check_written(self, weight, bias, scan=scan)  # an overflow raises; the rollback rewrites from W0
        finally:
            self.w0 = self.b0 = None
        if not _same(weight, live):
            live.copy_(weight)
        if bias is not None and live_bias is not None and not _same(bias, live_bias):
            live_bias.copy_(bias)
        self.clean = not active
        self.stamp = _stamp(self.module) if self.clean else None

    def _rebase(self) -> None:
        """The idle weight was changed outside diffadapt (edited, reloaded, recast): it is the new W0."""
        self.__dict__.pop("_w0_absmax", None)  # guards' cached max|W0|
        live, live_bias = self.module.weight.data, _bias(self.module)
        maps = storage.memory_map() if live.device.type == "cpu" else None
        if maps is not None and live_bias is not None and not maps.writable(live_bias):  # e.g. reloaded with mmap
            self.backup_bias, self.mapped_bias = _private(self.module.bias), True
            live_bias = None
        if maps is not None and not maps.writable(live):
            self.backup, self.mapped = _private(self.module.weight), True
            live = None
        elif self.mapped or (self.backup.dtype, self.backup.shape) != (live.dtype, live.shape):
            self.backup, self.mapped = storage.allocate([live], self.where)[0], False
        if live is not None:
            self.backup.copy_(live)
        if self.backup_bias is not None and live_bias is not None:
            if self.mapped_bias or (self.backup_bias.dtype, self.backup_bias.shape) != (live_bias.dtype, live_bias.shape):
                self.backup_bias, self.mapped_bias = storage.allocate([live_bias], self.where)[0], False
            self.backup_bias.copy_(live_bias)

    def _compose(self, *, out: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``compute`` (into ``out`` when given); float8 storage: in float32 from an upcast W0, rounding measured."""
        if dtype not in FLOAT8:
            return self.compute(out=out)
        self.w0 = self.w0.float()
        self.b0 = None if self.b0 is None else self.b0.float()
        exact, bias = self.compute()
        weight = exact.to(dtype)
        norm = exact.norm().item()
        self.rounding = (weight.float() - exact).norm().item() / norm if norm > 0 else 0.0
        return weight, None if bias is None else bias.to(dtype)

    def _bake(self) -> None:
        """No backup: compose the entries not yet in the weight onto it (as diffusers' fuse_lora does)."""
        pending = self.entries[self.baked:]
        if any(e.strength != 0.0 for e in pending):
            live, live_bias = self.module.weight.data, _bias(self.module)
            view = Slot(self.module, entries=pending, w0=live, b0=live_bias, label=self.label)
            scan = needs_scan(view)
            weight, bias = view._compose(out=None, dtype=live.dtype)  # new tensors: a failure writes nothing
            check_written(view, weight, bias, scan=scan)
            self.rounding = view.rounding
            live.copy_(weight)
            if bias is not None and live_bias is not None and not _same(bias, live_bias):
                live_bias.copy_(bias)
            self.clean = False
        self.baked = len(self.entries)

    @torch.inference_mode(False)
    @torch.no_grad()
    def _back_up_bias(self) -> None:
        """Biases change only with full/diff adapters: their originals are copied when one first arrives."""
        bias = _bias(self.module)
        if self.backup_bias is None and bias is not None:
            self.backup_bias = storage.allocate([bias], self.where)[0].copy_(bias)

    def restore(self) -> None:
        """The originals back into the live weight and bias (nothing applied)."""
        saved, self.entries = self.entries, []
        try:
            self.write()
        finally:
            self.entries = saved


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.data if isinstance(bias, torch.Tensor) else None


def _stamp(module: nn.Module) -> tuple:
    """What tells an idle (restored) weight from one changed since: storage, version, dtype, shape, and 256
    values spread over it (an in-place edit through ``.data`` bumps no version; a fine-tune or reload changes them)."""
    out = []
    for p in (module.weight, getattr(module, "bias", None)):
        if not isinstance(p, torch.Tensor):
            continue
        t, n = p.data, p.numel()
        if n and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):  # dense: sample storage
            sample = t.as_strided((min(n, 256),), (max(1, n // 256),), t.storage_offset()).clone()
        else:
            sample = t.detach().reshape(-1)[:: max(1, n // 256)].clone()
        out.append(((t.data_ptr(), p._version, t.dtype, tuple(t.shape)), sample))
    return tuple(out)


def _unchanged(old: tuple | None, new: tuple) -> bool:
    return old is not None and len(old) == len(new) and all(
        a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(old, new))


def _on(backup: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """W0 where the write runs: the backup itself, or — a host backup of an accelerator weight — staged into
    the live buffer (the write then reads and overwrites it in place; no device memory is allocated)."""
    if backup.device == live.device:
        return backup
    return live.copy_(backup, non_blocking=backup.is_pinned())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same storage (``param.data`` makes a new alias object on every access)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


@torch.inference_mode(False)
@torch.no_grad()
def _private(param: torch.Tensor) -> torch.Tensor:
    """Give ``param`` a private copy of its values; returns the mapped original."""
    mapped = param.data
    param.data = torch.empty_like(mapped).copy_(mapped)  # empty_like keeps the strides compiled code guards
    return mapped
