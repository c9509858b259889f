"""``fuse`` / ``unfuse``: move loaded adapters between inject mode (peft layers) and patch mode (fused weights).

Fusing removes an adapter's peft layers and patches the same spec into the weights; unfusing takes the patch
off (the base comes back bit-exactly) and injects the spec again, so a fuse → unfuse round trip leaves the
same layers with the same tensors. Weights, enabled state and names are kept; a failure switches back
whatever was already switched.
"""

from __future__ import annotations

from typing import Any

from .errors import AdapterNotFoundError
from .pipeline import Loaded, registry
from .transaction import Transaction, writing

FUSED = "fused_from_inject"  # Loaded.extra flag: fuse() moved this adapter out of inject mode


def _select(target: Any, names: tuple[str, ...], keep) -> list[Loaded]:
    reg = registry(target)
    missing = [n for n in names if n not in reg.adapters]
    if missing:
        raise AdapterNotFoundError(f"no adapter named {missing} is loaded (loaded: {sorted(reg.adapters)})")
    chosen = [reg.adapters[n] for n in names] if names else list(reg.adapters.values())
    return [a for a in chosen if keep(a, bool(names))]


def _switch(tx: Transaction, items: list[Loaded], to: str) -> None:
    """Move each adapter to backend ``to``; the transaction undoes every move if one fails."""
    for loaded in reversed(items):  # take off the outermost (last loaded) first
        tx.remove(loaded)
    for loaded in items:
        loaded.mode = to
        tx.apply(loaded)


def fuse(target: Any, *names: str) -> list[str]:
    """Fuse inject-mode adapters (all when none named) into the weights; returns the names moved."""
    reg = registry(target)
    with reg.lock:
        items = _select(target, names, lambda a, named: a.mode == "inject")
        with writing(reg) as tx:
            _switch(tx, items, "patch")
            for a in items:
                a.extra[FUSED] = True
        return [a.name for a in items]


def unfuse(target: Any, *names: str) -> list[str]:
    """Back to peft layers: the adapters ``fuse`` fused (or the named patch-mode ones); returns the names moved."""
    reg = registry(target)
    with reg.lock:
        items = _select(target, names, lambda a, named: a.mode == "patch" and (named or a.extra.get(FUSED)))
        with writing(reg) as tx:
            _switch(tx, items, "inject")
            for a in items:
                a.extra.pop(FUSED, None)
        return [a.name for a in items]
