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

def _select(target: Any, names: tuple[str, ...], keep) -> list[Loaded]:
    reg = registry(target)
    missing = [n for n in names if n not in reg.adapters]
    if missing:
        raise AdapterNotFoundError(f"no adapter named {missing} is loaded (loaded: {sorted(reg.adapters)})")
    chosen = [reg.adapters[n] for n in names] if names else list(reg.adapters.values())
    return [a for a in chosen if keep(a, bool(names))]


def _switch(items: list[Loaded], to: str) -> None:
    """Move each adapter to backend ``to``; on failure every moved one goes back."""
    moved: list[tuple[Loaded, str]] = []
    try:
        for loaded in reversed(items):  # take off the outermost (last loaded) first
            backends.get(loaded.mode).remove(loaded)
            moved.append((loaded, loaded.mode))
            loaded.mode = None
        for loaded in items:
            backends.get(to).apply(loaded)
            loaded.mode = to
    except BaseException:
        for loaded, _ in moved:  # newest first: undo the applies that went through
            if loaded.mode == to:
                backends.get(to).remove(loaded)
        for loaded, mode in reversed(moved):  # then back in load order
            backends.get(mode).apply(loaded)
            loaded.mode = mode
        raise


def fuse(target: Any, *names: str) -> list[str]:
    """Fuse inject-mode adapters (all when none named) into the weights; returns the names moved."""
    reg = registry(target)
    with reg.lock:
        items = _select(target, names, lambda a, named: a.mode == "inject")
        _switch(items, "patch")
        for a in items:
            a.fused = True
        return [a.name for a in items]


def unfuse(target: Any, *names: str) -> list[str]:
    """Back to peft layers: the adapters ``fuse`` fused (or the named patch-mode ones); returns the names moved."""
    reg = registry(target)
    with reg.lock:
        items = _select(target, names, lambda a, named: a.mode == "patch" and (named or a.fused))
        _switch(items, "inject")
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
