"""Patch backend: write W = W0 ⊕ Σ wᵢ·Δᵢ into the module's weight in place, keeping W0 for an exact restore.

Order of composition on one module (documented in docs/design.md):
  1. every additive adapter (LoRA, LoHa, LoKr, WaveFT, full) is summed onto W0 — low-rank ones in one
     ``addmm`` over their concatenated factors;
  2. transforms (OFT rotations, DoRA re-normalisation) then act on that sum, in load order.
Math runs in float32 on the weight's device; the result is cast to the weight's dtype (float8 storage: the
rounding error is measured and reported).

Storage never moves: every write — a load, a weight change, a hotswap, an unload — goes into the parameter's
own buffer, so compiled graphs and CUDA graphs keep their inputs. W0 is read from the slot's backup
(``backends/storage.py``: host, device or none), or from the live weight itself while that still holds W0, so
repeated writes never accumulate error and an unload copies the originals back bit for bit. A module is
backed up once; its slot, emptied by an unload, stays (idle) until released, so the next load is one fused
write per module.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from . import storage
from .patch_checks import check_order, check_storage, where as _where
from .storage import MemoryMap, SideCopies, check_backup, nbytes, settings_of
from ..compose import compose
from ..errors import DiffAdaptError, UnsupportedError
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
        maps = MemoryMap() if live.device.type == "cpu" else None
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


# Slots live as long as their module; every registry that patches a module shares its slot.
_SLOTS: "weakref.WeakKeyDictionary[nn.Module, Slot]" = weakref.WeakKeyDictionary()


def existing_slot(module: nn.Module) -> Slot | None:
    """The slot of a module an adapter patches now (idle slots, kept for their backups, are not reported)."""
    slot = _SLOTS.get(module)
    return slot if slot is not None and slot.entries else None


def snapshot(modules):
    """A function putting these modules' slots back as they are now (entries and strengths), bit-exactly.

    Used by ``diffadapt.transaction`` to roll back any patch-mode write: each changed module is rewritten from
    its backup (storage never moves); a slot made since is emptied and released. Modules without a backup
    (backup="none") cannot be rewritten: only their records go back.
    """
    saved = []
    for module in dict.fromkeys(modules):
        slot = _SLOTS.get(module)
        saved.append((module, slot, None if slot is None else [(e, e.strength) for e in slot.entries],
                      0 if slot is None else slot.baked))

    def restore() -> None:
        for module, slot, entries, baked in saved:
            now = _SLOTS.get(module)
            if slot is None:
                if now is not None and not now.fixed:
                    now.entries = []
                    release_module(module)
                continue
            if now is slot and len(slot.entries) == len(entries) and all(
                    e is e0 and e.strength == s0 for e, (e0, s0) in zip(slot.entries, entries)):
                continue
            _SLOTS[module] = slot
            slot.entries = [e for e, _ in entries]
            for e, s in entries:
                e.strength = s
            if slot.fixed:
                slot.baked = min(slot.baked, baked)
            else:
                slot.write()

    return restore


@torch.inference_mode(False)
@torch.no_grad()
def _private(param: torch.Tensor) -> torch.Tensor:
    """Give ``param`` a private copy of its values; returns the mapped original."""
    mapped = param.data
    param.data = torch.empty_like(mapped).copy_(mapped)  # empty_like keeps the strides compiled code guards
    return mapped


def _new_slots(modules: list[nn.Module], backup: str) -> tuple[list[Slot], list[SideCopies]]:
    """Slots for modules patched for the first time; their backups come from one allocation per device."""
    maps = MemoryMap() if any(m.weight.device.type == "cpu" for m in modules) else None
    slots, groups = [], {}
    for module in modules:
        where = "device" if backup == "device" and module.weight.device.type != "cpu" else "host"
        slot = _SLOTS[module] = Slot(module=module, where=where)
        slots.append(slot)
        bias = getattr(module, "bias", None)
        if maps is not None and isinstance(bias, torch.Tensor) and not maps.writable(bias.data):
            slot.backup_bias, slot.mapped_bias = _private(bias), True
        if maps is not None and not maps.writable(module.weight.data):
            slot.backup, slot.mapped = _private(module.weight), True  # the mapped original is the backup
        elif backup != "none":
            groups.setdefault(module.weight.device, []).append(slot)
        slot.stamp = _stamp(module)
    copies = []
    for device, group in groups.items():
        lives = [s.module.weight.data for s in group]
        side = SideCopies(device)
        for slot, buf, live in zip(group, storage.allocate(lives, group[0].where), lives):
            slot.backup, slot.copies = buf, side
            side.start(id(slot), buf, live)
        copies.append(side)
    return slots, copies


def release_module(module: nn.Module, *, bake: bool = False) -> int:
    """Free one module's backup (see :func:`diffadapt.release`); returns the bytes no longer held."""
    slot = _SLOTS.get(module)
    if slot is None or (slot.entries and not bake) or slot.fixed:
        return 0
    if slot.copies is not None:
        slot.copies.wait(id(slot))
        slot.copies = None
    freed = (0 if slot.mapped else nbytes(slot.backup)) + (0 if slot.mapped_bias else nbytes(slot.backup_bias))
    if slot.entries:  # bake: the adapters stay in the weight for good
        slot.backup = slot.backup_bias = None
        slot.mapped = slot.mapped_bias = False
        slot.baked = len(slot.entries)
        return freed
    slot.restore()
    with torch.inference_mode(False):
        if slot.mapped:  # back to the mapped original; the private copy is freed
            module.weight.data = slot.backup
        if slot.mapped_bias:
            module.bias.data = slot.backup_bias
    del _SLOTS[module]
    return freed


# -- the backend interface (see backends/__init__.py) --------------------------------------------------

NAME = "patch"
BACKUP = "backup"  # Loaded.extra key: the backup mode asked for by load(..., backup=...)


def _label(targets) -> None:
    for t in targets:
        slot = _SLOTS[t.module]
        slot.label = slot.label or _where(t)


def _refuse_fixed(slots_where: list[tuple[Slot, str]], name: str, what: str) -> None:
    fixed = [w for slot, w in slots_where if slot.fixed]
    if fixed:
        raise UnsupportedError(
            f"cannot {what} adapter '{name}': the original weights of {len(fixed)} modules (e.g. {fixed[0]}) were "
            "not kept (backup='none', or released with bake=True), as after diffusers' fuse_lora without unfuse; "
            "reload the model, and load with backup='host' or 'device' to be able to undo")


def _mode(loaded) -> str:
    asked = loaded.extra.get(BACKUP)
    if asked is not None:
        return check_backup(asked)
    roots = [t.root for t in loaded.targets if t.root is not None]
    return settings_of(roots[0] if roots else None).backup


def _entries(loaded, targets) -> dict[nn.Module, list[Entry]]:
    """Every conversion before the first write."""
    out: dict[nn.Module, list[Entry]] = {}
    for t in targets:
        params = t.patch.params.to(device=t.module.weight.device, dtype=torch.float32)
        out.setdefault(t.module, []).append(Entry(loaded.name, params, loaded.strength(t.component, t.module_name)))
    return out


def _finish(copies: list[SideCopies]) -> None:
    for side in copies:
        side.finish()


def _report_rounding(loaded, slots) -> None:
    low = [s.rounding for s in slots if s.module.weight.dtype in FLOAT8]
    if low:
        worst = max(low)
        loaded.extra["patch.rounding"] = worst
        warnings.warn(f"adapter '{loaded.name}': {len(low)} weights are stored in float8; the patched weights were "
                      f"rounded back to it (relative error up to {worst:.2%} per weight, float8's own precision); "
                      "unload restores the float8 originals exactly", stacklevel=4)


def _rewrite(pairs: list[tuple[Slot, list[Entry]]], created: list[Slot], copies: list[SideCopies], name: str) -> None:
    """Set each slot's entries and write it; on failure every slot gets its old entries back (exact: W0 comes
    from the backup) and new slots are dropped. Slots without backup cannot be undone: that is reported."""
    saved = [(slot, list(slot.entries), slot.baked) for slot, _ in pairs]
    done: list[Slot] = []
    try:
        for slot, entries in pairs:
            slot.entries = entries
            done.append(slot)
            slot.write()
    except BaseException as exc:
        before = {id(slot): baked for slot, _, baked in saved}
        stuck = [s for s in done[:-1] if s.fixed and s.baked > before[id(s)]]
        for slot, entries, baked in saved:
            if not slot.fixed:
                slot.entries = entries
                slot.write()
            elif slot not in stuck:
                slot.entries, slot.baked = entries, baked
        for slot in created:
            if not slot.entries:
                release_module(slot.module)
        _finish(copies)
        if stuck:
            raise DiffAdaptError(f"writing adapter '{name}' failed after {len(stuck)} modules without a backup "
                                 "(backup='none') had taken it; reload the model") from exc
        raise
    _finish(copies)


def apply(loaded) -> None:
    """Patch every target of ``loaded``; on any failure the modules already patched are rolled back."""
    check_order(loaded.targets)
    check_storage(loaded.targets)
    new = _entries(loaded, loaded.targets)
    created, copies = _new_slots([m for m in new if m not in _SLOTS], _mode(loaded))
    _label(loaded.targets)
    _rewrite([(_SLOTS[m], [*_SLOTS[m].entries, *es]) for m, es in new.items()], created, copies, loaded.name)
    _report_rounding(loaded, [_SLOTS[m] for m in new])


def remove(loaded) -> None:
    """Take the adapter off: each module is rewritten from its backup (its last adapter gone: W0 copied back)."""
    pairs = {}
    for t in loaded.targets:
        slot = _SLOTS.get(t.module)
        if slot is not None and any(e.name == loaded.name for e in slot.entries):
            pairs[t.module] = (slot, _where(t), settings_of(t.root).release_on_unload)
    _refuse_fixed([(s, w) for s, w, _ in pairs.values()], loaded.name, "unload")
    for module, (slot, _, release) in pairs.items():
        slot.entries = [e for e in slot.entries if e.name != loaded.name]
        slot.write()
        if release and not slot.entries:
            release_module(module)


def refresh(loaded_list, *, inplace: bool = True) -> None:
    """Re-read the strengths of these adapters and rewrite each module whose stack changed, once."""
    changes: list[tuple[Entry, float]] = []
    slots: dict[int, tuple[Slot, str]] = {}
    names = set()
    for loaded in loaded_list:
        for t in loaded.targets:
            slot = _SLOTS.get(t.module)
            if slot is None:
                continue
            s = loaded.strength(t.component, t.module_name)
            for e in slot.entries:
                if e.name == loaded.name and e.strength != s:
                    changes.append((e, s))
                    slots[id(slot)] = (slot, _where(t))
                    names.add(loaded.name)
    _refuse_fixed(list(slots.values()), ", ".join(sorted(names)), "re-weight")
    for e, s in changes:
        e.strength = s
    for slot, _ in slots.values():
        slot.write()


# -- hotswap -------------------------------------------------------------------------------------------


def _replace(entries: list[Entry], name: str, new: list[Entry]) -> list[Entry]:
    """``entries`` with adapter ``name``'s replaced by ``new`` at the same place in the stack (load order)."""
    at = next((i for i, e in enumerate(entries) if e.name == name), len(entries))
    rest = [e for e in entries if e.name != name]
    return rest[:at] + new + rest[at:]


def hotswap(loaded, targets) -> None:
    """Replace ``loaded``'s entries with ones for ``targets`` (resolved from another file), in place.

    Every touched module is rewritten in its own buffer: newly targeted ones are backed up first, those no
    longer targeted get their originals back (their slots stay, idle, so swapping back is again one write).
    A failure while writing rolls every touched module back.
    """
    check_order(targets)
    check_storage(targets)
    old = {t.module: _where(t) for t in loaded.targets}
    _refuse_fixed([(_SLOTS[m], w) for m, w in old.items() if m in _SLOTS], loaded.name, "hotswap")
    new = _entries(loaded, targets)
    created, copies = _new_slots([m for m in new if m not in _SLOTS], _mode(loaded))
    _label(targets)
    pairs = [(_SLOTS[m], _replace(_SLOTS[m].entries, loaded.name, es)) for m, es in new.items()]
    pairs += [(_SLOTS[m], [e for e in _SLOTS[m].entries if e.name != loaded.name])
              for m in old if m not in new and m in _SLOTS]
    _rewrite(pairs, created, copies, loaded.name)
    _report_rounding(loaded, [_SLOTS[m] for m in new])
