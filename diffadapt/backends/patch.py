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

import torch
from torch import nn

from . import storage
from .patch_checks import check_order, check_storage, where as _where
from .slot import FLOAT8, Entry, Slot, _private, _stamp
from .storage import SideCopies, check_backup, nbytes, settings_of
from ..errors import DiffAdaptError, UnsupportedError

__all__ = ["FLOAT8", "Entry", "Slot", "NAME", "apply", "remove", "refresh", "hotswap", "snapshot",
           "existing_slot", "release_module"]

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

    @storage.one_reading()
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


def _new_slots(modules: list[nn.Module], backup: str) -> tuple[list[Slot], list[SideCopies]]:
    """Slots for modules patched for the first time; their backups come from one allocation per device."""
    maps = storage.memory_map() if any(m.weight.device.type == "cpu" for m in modules) else None
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


@storage.one_reading()
def apply(loaded) -> None:
    """Patch every target of ``loaded``; on any failure the modules already patched are rolled back."""
    check_order(loaded.targets)
    check_storage(loaded.targets)
    new = _entries(loaded, loaded.targets)
    created, copies = _new_slots([m for m in new if m not in _SLOTS], _mode(loaded))
    _label(loaded.targets)
    _rewrite([(_SLOTS[m], [*_SLOTS[m].entries, *es]) for m, es in new.items()], created, copies, loaded.name)
    _report_rounding(loaded, [_SLOTS[m] for m in new])


@storage.one_reading()
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


@storage.one_reading()
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


@storage.one_reading()
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
