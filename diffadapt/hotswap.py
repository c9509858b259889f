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
from .api import read_spec
from .fusing import prepare_hotswap  # noqa: F401  (inject mode: pad before compiling)
from .errors import AdapterNotFoundError, UnsupportedError
from .info import summarize
from .mixing import component_counts
from .pipeline import Loaded, Target, check_into, registry, resolve, routed
from .spec import AdapterInfo, AdapterSpec
from .transaction import Transaction, writing
from .weights import validate as validate_weight


def _swapper(loaded: Loaded):
    swap = getattr(backends.get(loaded.mode), "hotswap", None)
    if swap is None:
        raise UnsupportedError(
            f"adapter '{loaded.name}' is loaded with mode={loaded.mode!r}, whose backend cannot hotswap; "
            f"load it with mode='patch' (any method, any modules), or unload and load (a compiled model recompiles)"
        )
    return swap


def _summary(loaded: Loaded, spec: AdapterSpec, into: str | None = None, targets: list[Target] = ()) -> AdapterInfo:
    """The record's summary for a new file — built before any write (hostile metadata fails here)."""
    info = summarize(spec, name=loaded.name)
    info.weight, info.enabled, info.mode = loaded.weight, loaded.enabled, loaded.mode
    info.components = routed(info.components, into, list(targets))
    return info


def _swap(tx: Transaction, loaded: Loaded, spec: AdapterSpec, targets: list[Target], info: AdapterInfo) -> None:
    """Hand the resolved targets to the backend, then make the record describe the new file."""
    tx.hotswap(loaded, targets)
    loaded.spec, loaded.targets, loaded.info = spec, targets, info


def _loaded(target: Any, name: str) -> Loaded:
    reg = registry(target)
    if name not in reg.adapters:
        raise AdapterNotFoundError(f"no adapter named '{name}' is loaded (loaded: {sorted(reg.adapters)})")
    return reg.adapters[name]


def hotswap(target: Any, source: Any, name: str, *, allow_pickle: bool = False, strict: bool = True,
            into: str | None = None) -> AdapterInfo:
    """Replace the weights of loaded adapter ``name`` with those of ``source``; its weight and state stay.

    Arguments in ``load``'s order. The new file is read, mapped, checked and summarised before anything is
    written, and a failure while writing is rolled back, so a failed hotswap changes nothing. It may use another
    method, rank or alpha, and target other modules (text encoders included). The old order
    ``hotswap(target, name, source)`` is still understood (with a DeprecationWarning) when ``source`` names a
    loaded adapter and ``name`` does not. ``into`` as in ``load``; by default the component the adapter was
    loaded into (a Wan 2.2 low-noise adapter swaps within ``transformer_2``).
    """
    reg = registry(target)
    if isinstance(source, str) and source in reg.adapters and not (isinstance(name, str) and name in reg.adapters):
        warnings.warn("hotswap(target, name, source) is deprecated; use load's order: hotswap(target, source, name)",
                      DeprecationWarning, stacklevel=2)
        source, name = name, source
    into = check_into(target, into)
    with reg.lock:
        _swapper(_loaded(target, name))  # answer early, before reading a file
    spec = read_spec(source, allow_pickle=allow_pickle, target=target)  # file and hub I/O: outside the lock
    with reg.lock:
        loaded = _loaded(target, name)
        _swapper(loaded)
        where = loaded.into if into is None else into
        targets = resolve(target, spec, strict=strict, into=where)
        info = _summary(loaded, spec, where, targets)
        with writing(reg) as tx:
            _swap(tx, loaded, spec, targets, info)
            loaded.into = where
        return info


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
    swapped: list[tuple[Loaded, AdapterSpec, list[Target], AdapterInfo]] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)


def _read(target: Any, stack: dict[str, Any], *, allow_pickle: bool) -> dict[str, tuple[Any, Any]]:
    """(spec or None, weight or None) per stack item; every file is read here, before taking the lock."""
    plan = {}
    for name, value in stack.items():
        source, weight = _split(value)
        plan[name] = (None if source is None else read_spec(source, allow_pickle=allow_pickle, target=target), weight)
    return plan


def _apply(target: Any, items: dict[str, tuple[Any, Any]], undo: _Undo, *, exclusive: bool) -> None:
    reg = registry(target)
    counts = component_counts(target)
    plan: dict[str, tuple[Any, Any]] = {}
    for name, (spec, weight) in items.items():  # validate, map and summarise the whole request first
        if weight is not None:
            weight = validate_weight(weight, where=f"weight of '{name}'", counts=counts)
        loaded = reg.adapters.get(name)
        if spec is None and loaded is None:
            raise AdapterNotFoundError(f"no adapter named '{name}' is loaded (loaded: {sorted(reg.adapters)})")
        if spec is not None:
            if loaded is not None:
                _swapper(loaded)
                targets = resolve(target, spec, into=loaded.into)
                spec = (spec, targets, _summary(loaded, spec, loaded.into, targets))
            else:
                info = summarize(spec, name=name)
                info.weight, info.mode = 1.0 if weight is None else weight, "patch"
                spec = (spec, resolve(target, spec), info)
        plan[name] = (spec, weight)

    wanted = {}
    for name, loaded in reg.adapters.items():
        if name in plan:
            weight = plan[name][1]
            wanted[name] = (loaded.weight if weight is None else weight, True)
        elif exclusive:
            wanted[name] = (loaded.weight, False)

    with writing(reg) as tx:
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
            spec, targets, info = source
            loaded = reg.adapters.get(name)
            if loaded is None:
                new = Loaded(name=name, spec=spec, info=info, targets=targets, mode="patch",
                             weight=1.0 if weight is None else weight)
                tx.apply(new)
                reg.adapters[name] = new
                undo.temporary.append(name)
            else:
                undo.swapped.append((loaded, loaded.spec, loaded.targets, loaded.info))
                info.weight, info.enabled = loaded.weight, loaded.enabled
                _swap(tx, loaded, spec, targets, info)
                swapped.add(name)
        tx.refresh([a for a in changed if a.name not in swapped])


def _restore(target: Any, undo: _Undo) -> None:
    reg = registry(target)
    with writing(reg) as tx:
        for name in reversed(undo.temporary):
            if name in reg.adapters:
                tx.remove(reg.adapters[name])
                del reg.adapters[name]
        live = dict(reg.adapters)  # the block itself may have unloaded some
        for name, (weight, enabled) in undo.state.items():
            if name in live:
                live[name].weight, live[name].enabled = weight, enabled
        swapped = set()
        for loaded, spec, targets, info in reversed(undo.swapped):
            if live.get(loaded.name) is loaded:
                _swap(tx, loaded, spec, targets, info)
                swapped.add(loaded.name)
        tx.refresh([live[n] for n in undo.state if n in live and n not in swapped])


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
    items = _read(target, stack, allow_pickle=allow_pickle)  # file and hub I/O: before taking the lock
    lock = registry(target).lock
    if not lock.acquire(timeout=-1 if timeout is None else timeout):
        raise TimeoutError(f"the adapters of this pipeline stayed busy for {timeout} s")
    try:
        undo = _Undo()
        _apply(target, items, undo, exclusive=exclusive)  # all or nothing: a failure here changes nothing
        try:
            yield
        finally:
            _restore(target, undo)
    finally:
        lock.release()
