"""Hotswap and per-request adapter stacks, for servers that compile once and switch adapters per request.

``hotswap`` replaces the weights of a loaded adapter with another file's. In patch mode that is a rewrite of
weight values in buffers the compiled graph already reads (see ``backends/patch.py``), so any method and any
set of target modules swaps without a recompilation. Other modes swap through their backend's ``hotswap``.

``using`` applies a request's stack under the pipeline's lock and restores the previous state on exit.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from . import backends
from .api import load, read_spec, unload
from .fusing import prepare_hotswap  # noqa: F401  (inject mode: pad before compiling)
from .errors import AdapterNotFoundError, UnsupportedError
from .info import summarize
from .mixing import refresh, component_counts
from .pipeline import Loaded, Target, registry, resolve
from .spec import AdapterInfo, AdapterSpec
from .weights import validate as validate_weight


def _swapper(loaded: Loaded):
    swap = getattr(backends.get(loaded.mode), "hotswap", None)
    if swap is None:
        raise UnsupportedError(
            f"adapter '{loaded.name}' is loaded with mode={loaded.mode!r}, whose backend cannot hotswap; "
            f"load it with mode='patch' (any method, any modules), or unload and load (a compiled model recompiles)"
        )
    return swap


def _swap(loaded: Loaded, spec: AdapterSpec, targets: list[Target]) -> AdapterInfo:
    """Hand the resolved targets to the backend, then make the record describe the new file."""
    _swapper(loaded)(loaded, targets)
    info = summarize(spec, name=loaded.name)
    info.weight, info.enabled, info.mode = loaded.weight, loaded.enabled, loaded.mode
    loaded.spec, loaded.targets, loaded.info = spec, targets, info
    return info


def _loaded(target: Any, name: str) -> Loaded:
    reg = registry(target)
    if name not in reg.adapters:
        raise AdapterNotFoundError(f"no adapter named '{name}' is loaded (loaded: {sorted(reg.adapters)})")
    return reg.adapters[name]


def hotswap(target: Any, source: Any, name: str, *, allow_pickle: bool = False, strict: bool = True) -> AdapterInfo:
    """Replace the weights of loaded adapter ``name`` with those of ``source``; its weight and state stay.

    Arguments in ``load``'s order. The new file is read, mapped and checked before anything is written, so a
    failed hotswap changes nothing. It may use another method, rank or alpha, and target other modules
    (text encoders included). The old order ``hotswap(target, name, source)`` is still understood (with a
    DeprecationWarning) when ``source`` names a loaded adapter and ``name`` does not.
    """
    reg = registry(target)
    if isinstance(source, str) and source in reg.adapters and not (isinstance(name, str) and name in reg.adapters):
        warnings.warn("hotswap(target, name, source) is deprecated; use load's order: hotswap(target, source, name)",
                      DeprecationWarning, stacklevel=2)
        source, name = name, source
    with reg.lock:
        loaded = _loaded(target, name)
        _swapper(loaded)
        spec = read_spec(source, allow_pickle=allow_pickle)
        return _swap(loaded, spec, resolve(target, spec, strict=strict))


# -- per-request stacks --------------------------------------------------------------------------------


def _is_weight(value: Any) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return isinstance(value, dict) and not any(isinstance(v, torch.Tensor) for v in value.values())


def _split(value: Any) -> tuple[Any, Any]:
    """(source or None, weight or None) of one stack item."""
    if isinstance(value, tuple) and len(value) == 2:
        return value
    if _is_weight(value):
        return None, value
    if isinstance(value, (str, os.PathLike, dict, AdapterSpec)):
        return value, None
    raise TypeError(f"a stack item is a weight, a source, or (source, weight); got {type(value).__name__}")


@dataclass
class _Undo:
    state: dict[str, tuple[Any, bool]] = field(default_factory=dict)  # name -> (weight, enabled) before
    swapped: list[tuple[Loaded, AdapterSpec, list[Target]]] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)


def _apply(target: Any, stack: dict[str, Any], undo: _Undo, *, exclusive: bool, allow_pickle: bool) -> None:
    reg = registry(target)
    counts = component_counts(target)
    plan: dict[str, tuple[Any, Any]] = {}
    for name, value in stack.items():  # validate the whole request first
        source, weight = _split(value)
        if weight is not None:
            weight = validate_weight(weight, where=f"weight of '{name}'", counts=counts)
        if source is None and name not in reg.adapters:
            raise AdapterNotFoundError(f"no adapter named '{name}' is loaded (loaded: {sorted(reg.adapters)})")
        if source is not None:
            if name in reg.adapters:
                _swapper(reg.adapters[name])
            spec = read_spec(source, allow_pickle=allow_pickle)
            source = (spec, resolve(target, spec))
        plan[name] = (source, weight)

    wanted = {}
    for name, loaded in reg.adapters.items():
        if name in plan:
            weight = plan[name][1]
            wanted[name] = (loaded.weight if weight is None else weight, True)
        elif exclusive:
            wanted[name] = (loaded.weight, False)
    changed = []
    for name, (weight, enabled) in wanted.items():
        loaded = reg.adapters[name]
        if (loaded.weight, loaded.enabled) != (weight, enabled):
            undo.state[name] = (loaded.weight, loaded.enabled)
            loaded.weight, loaded.enabled = weight, enabled
            changed.append(loaded)

    swapped = set()
    for name, (source, weight) in plan.items():
        if source is None:
            continue
        spec, targets = source
        loaded = reg.adapters.get(name)
        if loaded is None:
            undo.temporary.append(name)
            load(target, spec, name, weight=1.0 if weight is None else weight)
        else:
            old = (loaded, loaded.spec, loaded.targets)
            _swap(loaded, spec, targets)
            undo.swapped.append(old)
            swapped.add(name)
    refresh([a for a in changed if a.name not in swapped])


def _restore(target: Any, undo: _Undo) -> None:
    reg = registry(target)
    for name in reversed(undo.temporary):
        if name in reg.adapters:
            unload(target, name)
    live = {n: a for n, a in reg.adapters.items()}  # the block itself may have unloaded some
    for name, (weight, enabled) in undo.state.items():
        if name in live:
            live[name].weight, live[name].enabled = weight, enabled
    swapped = set()
    for loaded, spec, targets in reversed(undo.swapped):
        if live.get(loaded.name) is loaded:
            _swap(loaded, spec, targets)
            swapped.add(loaded.name)
    refresh([live[n] for n in undo.state if n in live and n not in swapped])


@contextlib.contextmanager
def using(
    target: Any,
    stack: dict[str, Any],
    *,
    exclusive: bool = True,
    timeout: float | None = None,
    allow_pickle: bool = False,
) -> Iterator[None]:
    """Apply one request's adapter stack for a ``with`` block, holding the pipeline's lock throughout.

    ``stack`` maps adapter names to a weight (an adapter already loaded), a source (hotswapped onto the
    loaded adapter of that name for the block, or loaded for the block if there is none), or
    ``(source, weight)``. With ``exclusive`` the adapters not named are off inside the block. On exit —
    also on an exception — every weight, swap and temporary load is undone. Other threads' ``using``,
    ``load``, ``unload``, ``hotswap`` and ``set_weights`` on the same pipeline wait for the block; the same
    thread may nest blocks. ``timeout`` (seconds) raises TimeoutError instead of waiting longer.
    """
    lock = registry(target).lock
    if not lock.acquire(timeout=-1 if timeout is None else timeout):
        raise TimeoutError(f"the adapters of this pipeline stayed busy for {timeout} s")
    try:
        undo = _Undo()
        try:
            _apply(target, stack, undo, exclusive=exclusive, allow_pickle=allow_pickle)
            yield
        finally:
            _restore(target, undo)
    finally:
        lock.release()
