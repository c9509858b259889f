"""``fuse`` / ``unfuse``: move loaded adapters between inject mode (peft layers) and patch mode (fused weights);
``prepare_hotswap``: get inject-mode layers ready for in-place swaps under ``torch.compile``.

Fusing removes an adapter's peft layers and patches the same spec into the weights; unfusing takes the patch
off (the base comes back bit-exactly) and injects the spec again, so a fuse → unfuse round trip leaves the
same layers with the same tensors. Weights, enabled state and names are kept; a failure switches back
whatever was already switched.
"""

from __future__ import annotations

from typing import Any

from . import backends
from .errors import AdapterNotFoundError, UnsupportedError
from .pipeline import Loaded, registry
from .transaction import Transaction, writing


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
                a.fused = True
        return [a.name for a in items]


def unfuse(target: Any, *names: str) -> list[str]:
    """Back to peft layers: the adapters ``fuse`` fused (or the named patch-mode ones); returns the names moved."""
    reg = registry(target)
    with reg.lock:
        items = _select(target, names, lambda a, named: a.mode == "patch" and (named or a.fused))
        with writing(reg) as tx:
            _switch(tx, items, "inject")
            for a in items:
                a.fused = False
        return [a.name for a in items]


def prepare_hotswap(target: Any, *, max_rank: int, names: list[str] | None = None) -> list[str]:
    """Pad the named inject-mode adapters (all when None) to ``max_rank`` for in-place hotswaps under
    ``torch.compile``; returns the names prepared. Call it after loading and before compiling: it changes
    parameter shapes and scaling types. Everything is checked before any layer is touched."""
    if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
    reg = registry(target)
    with reg.lock:
        if names is None:
            items = [a for a in reg.adapters.values() if a.mode == "inject"]
        else:
            items = _select(target, tuple(names), lambda a, named: True)
        by_mode: dict[str, list[Loaded]] = {}
        for a in items:
            by_mode.setdefault(a.mode, []).append(a)
        for mode, group in by_mode.items():
            hook = getattr(backends.get(mode), "prepare_hotswap", None)
            if hook is None:
                raise UnsupportedError(f"adapter '{group[0].name}' is not loaded with mode='inject'; {mode}-mode "
                                       "adapters hotswap without preparation")
        for mode, group in by_mode.items():
            backends.get(mode).prepare_hotswap(group, max_rank=max_rank)
        return [a.name for a in items]
