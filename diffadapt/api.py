"""The public verbs. ``diffadapt/__init__.py`` re-exports them."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from . import backends, io
from .backends.storage import check_backup
from .errors import AdapterNotFoundError, NameInUseError
from .info import summarize
from .keys import build_spec
from .mixing import adapter_names, component_counts
from .pipeline import Loaded, check_into, registry, resolve, routed, tensor_bound
from .spec import AdapterInfo, AdapterSpec
from .transaction import writing
from .weights import validate as validate_weight


def read_spec(source: Any, *, allow_pickle: bool = False, target: Any = None) -> AdapterSpec:
    """Read and parse a source into the canonical spec (no model needed). With ``target``, tensors larger
    than any of its layers could use are refused from the file's header, before the data is read."""
    if isinstance(source, AdapterSpec):
        return source
    # a bare module may be given a whole pipeline's file (components that do not fit are skipped): no bound
    bound = None if target is None or isinstance(target, nn.Module) else tensor_bound(target)
    return build_spec(io.read(source, allow_pickle=allow_pickle, max_numel=bound))


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
    into: str | None = None,
) -> AdapterInfo:
    """Load an adapter into a pipeline or module; returns its summary. A failed load changes nothing.

    ``backup`` (patch mode): where the originals of modules patched for the first time are kept — "host",
    "device" or "none" (no unload); default from :func:`diffadapt.configure`, else "host".
    ``into``: the denoiser component that takes the file's denoiser keys, e.g. ``"transformer_2"`` for the
    low-noise half of a Wan 2.2 LoRA pair (diffusers' ``load_into_transformer_2=True``); default the pipeline's
    denoiser. Text-encoder keys still go to the text encoders.
    """
    backend = backends.get(mode)
    extra = {} if backup is None else {"backup": check_backup(backup)}
    reg = registry(target)
    with reg.lock:  # an early answer, before reading a file; checked again when writing
        if name is not None and name in reg.adapters:
            raise NameInUseError(f"an adapter named '{name}' is already loaded; unload it or use hotswap")
    into = check_into(target, into)
    weight = validate_weight(weight, where="weight", counts=component_counts(target))
    spec = read_spec(source, allow_pickle=allow_pickle, target=target)  # file and hub I/O: outside the lock
    with reg.lock:
        if name is not None and name in reg.adapters:
            raise NameInUseError(f"an adapter named '{name}' is already loaded; unload it or use hotswap")
        targets = resolve(target, spec, strict=strict, into=into)
        name = name or _default_name(source, reg.adapters)
        info = summarize(spec, name=name)
        info.weight, info.mode, info.components = weight, mode, routed(info.components, into, targets)
        loaded = Loaded(name=name, spec=spec, info=info, targets=targets, mode=backend.NAME, weight=weight,
                        extra=extra, into=into)
        with writing(reg) as tx:
            tx.apply(loaded)
            reg.adapters[name] = loaded
        return info


def unload(target: Any, *names: str, name: str | None = None) -> None:
    """Remove the named adapters (all when none is named); base weights come back bit-exactly.

    Names are checked before anything is removed, and a failed unload changes nothing. ``name=`` is the old
    keyword, still accepted.
    """
    if name is not None:
        warnings.warn("unload(target, name=...) is deprecated; pass names positionally: unload(target, *names)",
                      DeprecationWarning, stacklevel=2)
        names = (*names, name)
    reg = registry(target)
    with reg.lock:
        wanted = adapter_names(names) or list(reg.adapters)
        missing = [n for n in wanted if n not in reg.adapters]
        if missing:
            raise AdapterNotFoundError(f"no adapter named {missing} is loaded (loaded: {sorted(reg.adapters)})")
        wanted = [n for n in reg.adapters if n in set(wanted)]  # load order
        with writing(reg) as tx:
            for n in reversed(wanted):  # newest first: each removal sees the stack it was loaded onto
                tx.remove(reg.adapters[n])
            for n in wanted:
                del reg.adapters[n]


def adapters(target: Any) -> dict[str, AdapterInfo]:
    """Loaded adapters by name, each with its current weight and mode."""
    reg = registry(target)
    out = {}
    with reg.lock:
        for n, loaded in reg.adapters.items():
            loaded.info.weight, loaded.info.enabled, loaded.info.mode = loaded.weight, loaded.enabled, loaded.mode
            out[n] = loaded.info
    return out


def get_weights(target: Any) -> dict[str, Any]:
    """{name: weight} — shorthand for ``{n: info.weight for n, info in adapters(target).items()}``."""
    return {n: info.weight for n, info in adapters(target).items()}
