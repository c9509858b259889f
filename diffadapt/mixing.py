"""Re-weighting loaded adapters: ``set_weights``, ``enable``, ``disable``.

Each verb validates the whole request first, then asks each backend to rewrite only the modules of the
adapters that changed (patch mode: one vectorised recompute per touched module, in place).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterable

from .errors import AdapterNotFoundError
from .pipeline import Loaded, components, registry
from .transaction import writing
from .weights import block_counts, validate


def component_counts(target: Any) -> dict[str, dict[str, int]]:
    return {name: block_counts(dict(m.named_modules())) for name, m in components(target).items()}


def lookup(target: Any, names: Iterable[str]) -> list[Loaded]:
    """The loaded adapters of those names; AdapterNotFoundError names every missing one."""
    reg = registry(target)
    missing = [n for n in names if n not in reg.adapters]
    if missing:
        raise AdapterNotFoundError(f"no adapter named {missing} is loaded (loaded: {sorted(reg.adapters)})")
    return [reg.adapters[n] for n in names]


def refresh(changed: list[Loaded]) -> None:
    """Rewrite the modules of adapters whose weight or state changed; on failure their modules and records
    go back to how they were (callers inside a verb use their transaction's ``refresh`` instead)."""
    if changed:
        with writing(SimpleNamespace(adapters={a.name: a for a in changed})) as tx:
            tx.refresh(changed)


def adapter_names(names: Iterable[Any]) -> list[str]:
    """The names a verb was given as ``*names``: lists/tuples are flattened, ``None`` (the old "all") dropped."""
    out: list[str] = []
    for n in names:
        if n is None:
            continue
        if isinstance(n, (list, tuple)):
            out.extend(adapter_names(n))
        elif isinstance(n, str):
            out.append(n)
        else:
            raise TypeError(f"adapter names are strings, got {type(n).__name__}")
    return list(dict.fromkeys(out))


def set_weights(target: Any, weights: dict[str, Any]) -> None:
    """Set the weight of each named adapter (see ``diffadapt.weights`` for the accepted forms).

    The whole request is validated first; on any failure while writing, weights and modules stay as they were.
    """
    counts = component_counts(target)
    checked = {n: validate(w, where=f"weight of '{n}'", counts=counts) for n, w in weights.items()}
    reg = registry(target)
    with reg.lock:
        loaded = lookup(target, list(weights))
        with writing(reg) as tx:
            for item in loaded:
                item.weight = checked[item.name]
            tx.refresh(loaded)


def _set_enabled(target: Any, names: tuple[str, ...], value: bool) -> None:
    reg = registry(target)
    with reg.lock:
        loaded = lookup(target, adapter_names(names) or list(reg.adapters))
        changed = [a for a in loaded if a.enabled != value]
        with writing(reg) as tx:
            for a in changed:
                a.enabled = value
            tx.refresh(changed)


def enable(target: Any, *names: str) -> None:
    """Turn adapters (all when none named) back on at their weights."""
    _set_enabled(target, names, True)


def disable(target: Any, *names: str) -> None:
    """Turn adapters (all when none named) off without unloading them; their weights are kept."""
    _set_enabled(target, names, False)
