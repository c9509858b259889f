"""Patch backend: write W = W0 ⊕ Σ wᵢ·Δᵢ into the module's weight, keeping W0 for an exact restore.

Order of composition on one module (documented in docs/design.md):
  1. every additive adapter (LoRA, LoHa, LoKr, WaveFT, full) is summed onto W0 — low-rank ones in one
     ``addmm`` over their concatenated factors;
  2. transforms (OFT rotations, DoRA re-normalisation) then act on that sum, in load order.
Math runs in float32 on the weight's device; the result is cast to the weight's dtype.

The original tensor object is kept, not copied: the first patch swaps ``param.data`` to a new tensor
(with the original's strides) and a restore swaps the original back, so unloading is bit-exact and costs no
copy. Between the two, every rewrite — another adapter, a weight change, a hotswap — goes in place into that
buffer. torch.compile guards a parameter's dtype, device, shape, strides and requires_grad but not its storage,
so neither the swaps nor the in-place writes recompile; keeping the buffer also spares CUDA graphs a re-record.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compose import compose
from ..errors import UnsupportedError
from ..guards import check_written, needs_scan
from ..methods.base import Params


@dataclass
class Entry:
    """One adapter on one module, with its current effective strength."""

    name: str
    params: Params  # on the module's device, float32
    strength: float = 1.0


@dataclass
class Slot:
    """A patched module: its original tensors and the adapters stacked on it."""

    module: nn.Module
    original: torch.Tensor
    original_bias: torch.Tensor | None
    entries: list[Entry] = field(default_factory=list)
    label: str = ""  # "component.module", for errors

    # -- composition ---------------------------------------------------------------------------------
    def compute(self, *, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) for the current stack, in the original dtype; originals when nothing applies.

        ``out`` (a float32 buffer of the weight's shape, not the original) takes the first additive step
        straight into the live weight: a single ``addmm`` for low-rank stacks, a fused ``addcmul`` for
        LoHa/LoKr — one pass over W, no intermediate ΔW or copy.
        """
        return compose(self.original, self.entries, bias=self.original_bias, out=out)

    @torch.inference_mode(False)  # an inference tensor in a parameter would fail compiled code's guards
    @torch.no_grad()
    def write(self, *, inplace: bool = False) -> None:
        """Recompute and store. ``inplace`` keeps the current storage (what torch.compile sees)."""
        current = self.module.weight.data
        buffer = current if inplace and not _same(current, self.original) else None
        scan = needs_scan(self)  # decided while W0 is intact: the bound on the factors, or a scan after
        weight, bias = self.compute(out=buffer)
        check_written(self, weight, bias, scan=scan)  # an overflow raises; the caller's rollback rewrites it
        if buffer is None or not _same(weight, buffer):
            _store(self.module.weight, weight, self.original, inplace=inplace)
        if self.original_bias is not None:
            _store(self.module.bias, bias, self.original_bias, inplace=inplace)

    def restore(self) -> None:
        self.module.weight.data = self.original
        if self.original_bias is not None:
            self.module.bias.data = self.original_bias


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same storage (``param.data`` makes a new alias object on every access)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def _store(param: torch.Tensor, value: torch.Tensor, original: torch.Tensor, *, inplace: bool) -> None:
    current = param.data
    if inplace and not _same(current, original):
        current.copy_(value)  # keep the patched buffer: compiled graphs keep pointing at it
    elif not _same(current, value):
        if value.stride() != original.stride():  # e.g. channels_last: compiled code guards the strides
            value = torch.empty_like(original).copy_(value)
        param.data = value


# Slots live as long as their module; every registry that patches a module shares its slot.
_SLOTS: "weakref.WeakKeyDictionary[nn.Module, Slot]" = weakref.WeakKeyDictionary()


def slot_for(module: nn.Module) -> Slot:
    slot = _SLOTS.get(module)
    if slot is None:
        bias = module.bias.data if isinstance(getattr(module, "bias", None), torch.Tensor) else None
        slot = _SLOTS[module] = Slot(module=module, original=module.weight.data, original_bias=bias)
    return slot


def existing_slot(module: nn.Module) -> Slot | None:
    return _SLOTS.get(module)


def drop_slot(module: nn.Module) -> None:
    slot = _SLOTS.pop(module, None)
    if slot is not None:
        slot.restore()


def snapshot(modules):
    """A function putting these modules' slots back as they are now (entries, strengths, buffers), bit-exactly.

    Used by ``diffadapt.transaction`` to roll back any patch-mode write; only modules whose state changed
    are rewritten.
    """
    saved = []
    for module in dict.fromkeys(modules):
        slot = _SLOTS.get(module)
        bias = module.bias.data if isinstance(getattr(module, "bias", None), torch.Tensor) else None
        entries = None if slot is None else [(e, e.strength) for e in slot.entries]
        saved.append((module, slot, entries, module.weight.data, bias))

    def restore() -> None:
        for module, slot, entries, weight, bias in saved:
            now = _SLOTS.get(module)
            if slot is None:
                if now is not None:
                    drop_slot(module)
                continue
            same = (now is slot and len(slot.entries) == len(entries)
                    and all(e is e0 and e.strength == s0 for e, (e0, s0) in zip(slot.entries, entries))
                    and _same(module.weight.data, weight))
            if same:
                continue
            if now is not None and now is not slot:
                drop_slot(module)
            _SLOTS[module] = slot
            slot.entries = [e for e, _ in entries]
            for e, s in entries:
                e.strength = s
            module.weight.data = weight  # the buffer it had (or the original): compiled graphs read it
            if bias is not None:
                module.bias.data = bias
            slot.write(inplace=True)

    return restore


def _take_off(module: nn.Module, name: str, *, park: bool = False) -> None:
    """Take adapter ``name`` off the module; the originals come back bit-exactly when none is left.

    ``park`` keeps an emptied slot and its buffer, holding a copy of the original values, so that a later
    hotswap back onto the module writes in place again (see :func:`hotswap`).
    """
    slot = _SLOTS.get(module)
    if slot is None:
        return
    slot.entries = [e for e in slot.entries if e.name != name]
    if slot.entries or park:
        slot.write(inplace=True)
    else:
        drop_slot(module)


def _label(t) -> str:
    return f"{t.component}.{t.module_name}" if t.component else t.module_name


# -- the backend interface (see backends/__init__.py) --------------------------------------------------

NAME = "patch"


def _check_order(targets) -> None:
    """A transform (OFT, DoRA) must act on the sum of every additive adapter. Injected adapters sit in peft
    layers *outside* the patched weight, so a patched transform would rotate only part of that sum."""
    for t in targets:
        if t.patch.params.is_additive or t.root is None:
            continue
        wrapper = t.root.get_submodule(t.module_name)
        if wrapper is not t.module:
            raise UnsupportedError(
                f"{t.patch.original_key}: a {t.patch.method} transform loaded in patch mode onto "
                f"{t.component + '.' if t.component else ''}{t.module_name}, which already holds inject-mode "
                "adapters, would leave them out of the rotation; load it with mode='inject', or fuse first"
            )


def apply(loaded) -> None:
    """Patch every target of ``loaded``; on any failure the modules already patched are rolled back."""
    _check_order(loaded.targets)
    done: list[nn.Module] = []
    try:
        for t in loaded.targets:
            w = t.module.weight
            params = t.patch.params.to(device=w.device, dtype=torch.float32)
            slot = slot_for(t.module)
            slot.label = slot.label or _label(t)
            slot.entries.append(Entry(name=loaded.name, params=params, strength=loaded.strength(t.component, t.module_name)))
            done.append(t.module)
            slot.write(inplace=True)
    except BaseException:
        for module in done:
            _take_off(module, loaded.name)
        raise


def remove(loaded) -> None:
    for t in loaded.targets:
        _take_off(t.module, loaded.name)
    _unpark(loaded.extra.pop(PARKED, ()))


def refresh(loaded_list, *, inplace: bool = True) -> None:
    """Re-read the strengths of these adapters and rewrite each touched module once."""
    slots: dict[int, Slot] = {}
    for loaded in loaded_list:
        for t in loaded.targets:
            slot = _SLOTS.get(t.module)
            if slot is None:
                continue
            s = loaded.strength(t.component, t.module_name)
            for e in slot.entries:
                if e.name == loaded.name:
                    e.strength = s
            slots[id(slot)] = slot
    for slot in slots.values():
        slot.write(inplace=inplace)


# -- hotswap -------------------------------------------------------------------------------------------

PARKED = "patch.parked"  # Loaded.extra key: modules a hotswap left without entries, buffers kept


def _unpark(modules) -> None:
    for module in modules:
        slot = _SLOTS.get(module)
        if slot is not None and not slot.entries:
            drop_slot(module)


def _replace(entries: list[Entry], name: str, new: list[Entry]) -> list[Entry]:
    """``entries`` with adapter ``name``'s replaced by ``new`` at the same place in the stack (load order)."""
    at = next((i for i, e in enumerate(entries) if e.name == name), len(entries))
    rest = [e for e in entries if e.name != name]
    return rest[:at] + new + rest[at:]


def hotswap(loaded, targets) -> None:
    """Replace ``loaded``'s entries with ones for ``targets`` (resolved from another file), in place.

    Modules already patched are rewritten in their current buffer; newly targeted modules get a slot; a
    module no longer targeted loses the entry and, when none is left, is *parked*: its buffer stays and
    receives a copy of the original values (bit-exact), so swapping back later is again an in-place write.
    Parked slots are dropped by :func:`remove`. A failure while writing rolls every touched module back.
    """
    name = loaded.name
    new: dict[nn.Module, list[Entry]] = {}
    for t in targets:  # every conversion before the first write
        params = t.patch.params.to(device=t.module.weight.device, dtype=torch.float32)
        new.setdefault(t.module, []).append(Entry(name, params, loaded.strength(t.component, t.module_name)))
    labels = {t.module: _label(t) for t in targets}
    old = list(dict.fromkeys(t.module for t in loaded.targets))
    parked = [m for m in loaded.extra.get(PARKED, ()) if m not in new]
    touched = list(dict.fromkeys([*new, *old]))
    saved = {m: list(_SLOTS[m].entries) for m in touched if m in _SLOTS}
    try:
        for module, entries in new.items():
            slot = slot_for(module)
            slot.label = slot.label or labels[module]
            slot.entries = _replace(slot.entries, name, entries)
            slot.write(inplace=True)
        for module in old:
            if module not in new:
                _take_off(module, name, park=True)
                parked.append(module)
    except BaseException:
        for module in touched:
            if module in saved:
                slot = slot_for(module)
                slot.entries = saved[module]
                slot.write(inplace=True)
            else:
                drop_slot(module)
        raise
    loaded.extra[PARKED] = list(dict.fromkeys(m for m in parked if m in _SLOTS and not _SLOTS[m].entries))
