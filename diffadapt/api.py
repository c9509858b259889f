"""The public verbs. ``diffadapt/__init__.py`` re-exports them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import backends, io
from .backends.storage import check_backup
from .errors import AdapterNotFoundError, DiffAdaptError
from .info import summarize
from .keys import build_spec
from .mixing import component_counts
from .pipeline import Loaded, registry, resolve
from .spec import AdapterInfo, AdapterSpec
from .weights import validate as validate_weight


def read_spec(source: Any, *, allow_pickle: bool = False) -> AdapterSpec:
    """Read and parse a source into the canonical spec (no model needed)."""
    if isinstance(source, AdapterSpec):
        return source
    return build_spec(io.read(source, allow_pickle=allow_pickle))


def inspect(source: Any, *, allow_pickle: bool = False) -> AdapterInfo:
    """Summarise an adapter file, folder, hub id or state dict without loading it into a model."""
    return summarize(read_spec(source, allow_pickle=allow_pickle))


def _default_name(source: Any, taken: dict[str, Loaded]) -> str:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        base = p.stem if p.suffix else p.name
        if base in ("adapter_model", "pytorch_lora_weights"):
            base = p.parent.name or base
    else:
        base = "adapter"
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def load(
    target: Any,
    source: Any,
    name: str | None = None,
    *,
    weight: float | dict[str, float] = 1.0,
    mode: str = "patch",
    allow_pickle: bool = False,
    strict: bool = True,
    backup: str | None = None,
) -> AdapterInfo:
    """Load an adapter into a pipeline or module; returns its summary. A failed load changes nothing.

    ``backup`` (patch mode): where the originals of modules patched for the first time are kept — "host",
    "device" or "none" (no unload); default from :func:`diffadapt.configure`, else "host".
    """
    backend = backends.get(mode)
    reg = registry(target)
    with reg.lock:
        if name is not None and name in reg.adapters:
            raise DiffAdaptError(f"an adapter named '{name}' is already loaded; unload it or use hotswap")
        weight = validate_weight(weight, where="weight", counts=component_counts(target))
        extra = {} if backup is None else {"backup": check_backup(backup)}
        spec = read_spec(source, allow_pickle=allow_pickle)
        targets = resolve(target, spec, strict=strict)
        name = name or _default_name(source, reg.adapters)
        info = summarize(spec, name=name)
        loaded = Loaded(name=name, spec=spec, info=info, targets=targets, mode=mode, weight=weight, extra=extra)
        backend.apply(loaded)
        reg.adapters[name] = loaded
        info.weight, info.mode = weight, mode
        return info


def unload(target: Any, name: str | None = None) -> None:
    """Remove one adapter (or all); base weights come back bit-exactly."""
    reg = registry(target)
    with reg.lock:
        names = list(reg.adapters) if name is None else [name]
        for n in names:
            loaded = reg.adapters.get(n)
            if loaded is None:
                raise AdapterNotFoundError(f"no adapter named '{n}' is loaded (loaded: {sorted(reg.adapters)})")
            backends.get(loaded.mode).remove(loaded)
            del reg.adapters[n]


def adapters(target: Any) -> dict[str, AdapterInfo]:
    """Loaded adapters by name, each with its current weight and mode."""
    reg = registry(target)
    out = {}
    for n, loaded in reg.adapters.items():
        loaded.info.weight, loaded.info.enabled, loaded.info.mode = loaded.weight, loaded.enabled, loaded.mode
        out[n] = loaded.info
    return out

