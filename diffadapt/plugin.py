"""``da.plugin(pipe)``: the pipeline's own diffusers LoRA API, for every adapter format diffadapt loads.

After ``da.plugin(pipe)``, existing diffusers code — ``pipe.load_lora_weights(…)``, ``set_adapters``,
``fuse_lora``, ``unfuse_lora``, ``unload_lora_weights``, ``delete_adapters``, ``get_active_adapters``,
``get_list_adapters``, ``enable_lora`` / ``disable_lora``, ``enable_lora_hotswap`` — takes LoHa, LoKr, OFT,
full, DoRA and Tucker files in kohya, LyCORIS, PEFT and diffusers layouts, state dicts, folders and hub ids.
The methods are bound on the instance only (``pipe.__dict__``); diffusers' classes are never touched, and
``da.unplug(pipe)`` puts the class methods back.

Mapping onto diffadapt. Every adapter is loaded in patch mode (any method, any mix, zero cost per step,
exact restore). diffusers' state is kept here, per adapter and component — the ``set_adapters`` weight,
the ``fuse_lora(lora_scale=)`` multiplier still in force, and the weight frozen by a fuse — plus the
active list and the global enable flag; each call turns that state into diffadapt weights and rewrites only
the adapters whose weight changed. So the semantics are diffusers', including its less obvious ones:

* a load makes the new adapter the only active one; names default to ``default_<n>``;
* ``set_adapters(names, weights)`` activates exactly ``names``; a weight is a number, a per-component dict
  (missing components: 1.0) or, for a UNet, diffusers' per-block dict, expanded by diffusers' own
  ``_maybe_expand_lora_scales`` and resolved per module by diffusers' rule;
* ``fuse_lora(components, lora_scale, adapter_names)`` multiplies the active adapters' scale by
  ``lora_scale`` (this stays after ``unfuse_lora``, as in diffusers, until ``set_adapters``) and freezes
  the fused adapters' contribution: later ``set_adapters`` calls do not move fused weights;
* a layer holding a fused adapter runs no unfused one (peft's merged layers run their base layer only);
* ``unfuse_lora(components)`` returns those components to the unfused state (current weights);
* ``unload_lora_weights()`` removes every adapter; contributions still fused stay in the weights (the
  documented fuse → unload → ``save_pretrained`` workflow); anything unfused comes back bit-exactly.

Where diffusers' peft layers would leave a residue (``unfuse_lora`` after a ``set_adapters`` while fused
subtracts the new scale), the plugin restores exactly. A fused adapter removed by ``delete_adapters`` leaves
nothing behind. A per-call ``cross_attention_kwargs={"scale": s}`` is not applied: patched weights have no
layer to scale at run time — use ``set_adapters`` weights. ``set_lora_device`` stays diffusers' own (a no-op:
there are no adapter layers to move). Component-level methods (``pipe.unet.set_adapters``) are not plugged.
"""

from __future__ import annotations

import inspect
import logging
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .api import load as _load, unload as _unload
from .errors import AdapterNotFoundError, ComponentError, DiffAdaptError, NameInUseError, UnsupportedError
from .hotswap import hotswap as _hotswap
from .mixing import set_weights as _set_weights
from .pipeline import Loaded, components, registry
from .weights import WeightError

logger = logging.getLogger(__name__)

METHODS = (
    "load_lora_weights", "set_adapters", "fuse_lora", "unfuse_lora", "unload_lora_weights", "delete_adapters",
    "get_active_adapters", "get_list_adapters", "enable_lora", "disable_lora", "enable_lora_hotswap",
)
_STATE = "_diffadapt_plugin"
_MERGED = "_merged_adapters"  # read by diffusers' ``fused_loras`` / ``num_fused_loras`` properties
_MISSING = object()
# lora_state_dict's download options: huggingface_hub's defaults (cache, login token) serve them
_IGNORED = {"cache_dir", "force_download", "proxies", "local_files_only", "token", "use_safetensors",
            "low_cpu_mem_usage", "unet_config", "return_lora_metadata", "metadata", "network_alphas", "prefix"}


@dataclass
class _Adapter:
    """diffusers' view of one adapter: per component, its weight, scale multiplier and frozen fused weight."""

    weight: dict[str, Any] = field(default_factory=dict)  # component -> number | {"modules": …}
    scale: dict[str, float] = field(default_factory=dict)  # fuse_lora(lora_scale=) multipliers in force
    fused: dict[str, Any] = field(default_factory=dict)  # component -> weight frozen by fuse_lora


@dataclass
class _State:
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    enabled: bool = True
    saved: dict[str, Any] = field(default_factory=dict)  # instance attributes the plugin replaced
    baked: set[str] = field(default_factory=set)  # fused, then unloaded: in the weights for good

    def fused_names(self) -> set[str]:
        return self.baked | {n for n, a in self.adapters.items() if a.fused}


# -- install -----------------------------------------------------------------------------------------


def plugin(pipe: Any) -> Any:
    """Make ``pipe``'s diffusers LoRA methods load every format diffadapt reads; returns ``pipe``."""
    if not isinstance(getattr(pipe, "components", None), dict):
        raise TypeError(f"da.plugin expects a diffusers pipeline, got {type(pipe).__name__}")
    if _STATE in pipe.__dict__:
        return pipe
    state = _State()
    for name in METHODS + (_MERGED,):
        state.saved[name] = pipe.__dict__.get(name, _MISSING)
    for name in METHODS:
        pipe.__dict__[name] = types.MethodType(globals()[f"_{name}"], pipe)
    pipe.__dict__[_MERGED] = set()
    pipe.__dict__[_STATE] = state
    _sync(pipe, state)
    return pipe


def unplug(pipe: Any) -> Any:
    """Put diffusers' own methods back; loaded adapters stay as they are (``da.adapters`` lists them)."""
    state = pipe.__dict__.pop(_STATE, None)
    if state is None:
        return pipe
    for name, value in state.saved.items():
        if value is _MISSING:
            pipe.__dict__.pop(name, None)
        else:
            pipe.__dict__[name] = value
    return pipe


def _state(pipe: Any) -> _State:
    state = pipe.__dict__.get(_STATE)
    if state is None:
        raise DiffAdaptError("this pipeline is not plugged in; call da.plugin(pipe) first")
    return _sync(pipe, state)


def _sync(pipe: Any, state: _State) -> _State:
    """Follow loads and unloads made with ``da.load`` / ``da.unload`` on the same pipeline."""
    loaded = registry(pipe).adapters
    for name in [n for n in state.adapters if n not in loaded]:
        del state.adapters[name]
    state.active = [n for n in state.active if n in loaded]
    for name, item in loaded.items():
        if name not in state.adapters:
            w = item.weight
            state.adapters[name] = _Adapter(weight={c: w.get(c, w.get("default", 1.0)) if isinstance(w, dict) else w
                                                    for c in _comps(item)})
            if item.enabled:
                state.active.append(name)
    pipe.__dict__[_MERGED] = state.fused_names()
    return state


# -- weights -----------------------------------------------------------------------------------------


def _comps(loaded: Loaded) -> list[str]:
    return list(dict.fromkeys(t.component for t in loaded.targets))


def _times(value: Any, s: float) -> Any:
    if isinstance(value, dict):
        return {k: _times(v, s) for k, v in value.items()}
    if isinstance(value, list):
        return [x * s for x in value]
    return float(value) * s


def _merged_modules(state: _State, loaded: dict[str, Loaded]) -> dict[str, set[str]]:
    """{component: modules holding a fused adapter} — peft's merged layers."""
    out: dict[str, set[str]] = {}
    for name, a in state.adapters.items():
        for t in loaded[name].targets if name in loaded else ():
            if t.component in a.fused:
                out.setdefault(t.component, set()).add(t.module_name)
    return out


def _without(value: Any, modules: list[str]) -> Any:
    """``value`` with weight 0 on ``modules``."""
    if not modules:
        return value
    if isinstance(value, dict):
        return {**value, "modules": {**value.get("modules", {}), **dict.fromkeys(modules, 0.0)}}
    return {"modules": dict.fromkeys(modules, 0.0), "default": value}


def _effective(state: _State, name: str, loaded: Loaded, merged: dict[str, set[str]]) -> dict[str, Any]:
    """The diffadapt weight that reproduces diffusers' state for one adapter, per component.

    A layer that holds a fused adapter runs no unfused one: peft's merged layers call their base layer only.
    """
    a = state.adapters[name]
    out = {}
    for comp in _comps(loaded):
        if not state.enabled:
            out[comp] = 0.0
        elif comp in a.fused:
            out[comp] = a.fused[comp]
        elif name in state.active:
            value = _times(a.weight.get(comp, 1.0), a.scale.get(comp, 1.0))
            blocked = [t.module_name for t in loaded.targets
                       if t.component == comp and t.module_name in merged.get(comp, ())]
            out[comp] = _without(value, blocked)
        else:
            out[comp] = 0.0
    return out


def _apply(pipe: Any, state: _State) -> None:
    """Rewrite the adapters whose diffadapt weight differs from what the state asks for."""
    loaded = registry(pipe).adapters
    merged = _merged_modules(state, loaded)
    changed = {}
    for name, item in loaded.items():
        want = _effective(state, name, item, merged)
        if want != item.weight:
            changed[name] = want
    if changed:
        _set_weights(pipe, changed)
    pipe.__dict__[_MERGED] = state.fused_names()


def _module_weight(expanded: dict[str, Any], module: str) -> float:
    """diffusers' rule (``set_weights_and_activate_adapters``): the first layer key inside the module path,
    else the attention block of the same index; modules outside blocks take 1.0."""
    for layer, w in expanded.items():
        if layer in module:
            return w
    parts = module.split(".")
    if len(parts) < 4:
        return 1.0
    return expanded.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)


def _component_weight(pipe: Any, loaded: Loaded, comp: str, value: Any) -> Any:
    if value is None:
        return 1.0
    if not isinstance(value, dict):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WeightError(f"weight of '{loaded.name}' for {comp}: expected a number or a dict, got {value!r}")
        return float(value)
    from diffusers.loaders.peft import _SET_ADAPTER_SCALE_FN_MAPPING

    model = components(pipe)[comp]
    try:
        expanded = _SET_ADAPTER_SCALE_FN_MAPPING[type(model).__name__](model, [value])[0]
    except ValueError as e:
        raise WeightError(f"weight of '{loaded.name}' for {comp}: {e}") from None
    if not isinstance(expanded, dict):
        return float(expanded)
    names = [t.module_name for t in loaded.targets if t.component == comp]
    return {"modules": {m: float(_module_weight(expanded, m)) for m in names}}


# -- the diffusers methods -----------------------------------------------------------------------------


def _source(source: Any, kwargs: dict[str, Any]) -> Any:
    weight_name, subfolder = kwargs.pop("weight_name", None), kwargs.pop("subfolder", None)
    revision = kwargs.pop("revision", None)
    if revision not in (None, "main"):
        raise UnsupportedError(f"revision={revision!r}: hub sources are read at their default revision")
    for key in _IGNORED & kwargs.keys():
        kwargs.pop(key)
    if kwargs:
        raise TypeError(f"load_lora_weights() got unexpected keyword arguments {sorted(kwargs)}")
    if not isinstance(source, (str, os.PathLike)) or not (weight_name or subfolder):
        return source
    parts = [p for p in (subfolder, weight_name) if p]
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser().joinpath(*parts)
    return "/".join([str(source).rstrip("/"), *parts])  # hub id: repo/subfolder/file


def _default_name(pipe: Any) -> str:
    taken = registry(pipe).adapters
    i = len(taken)
    while f"default_{i}" in taken:
        i += 1
    return f"default_{i}"


def _load_lora_weights(self, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None = None,
                       hotswap: bool = False, **kwargs: Any) -> None:
    """diffusers' ``load_lora_weights`` for any adapter file diffadapt reads (see ``diffadapt.plugin``)."""
    allow_pickle = bool(kwargs.pop("allow_pickle", False))
    source = _source(pretrained_model_name_or_path_or_dict, kwargs)
    with registry(self).lock:
        state = _state(self)
        if hotswap:
            if adapter_name not in registry(self).adapters:
                raise AdapterNotFoundError(
                    f"Trying to hotswap adapter '{adapter_name}' but there is no existing adapter by that name "
                    f"(loaded: {sorted(registry(self).adapters)}); pass hotswap=False to load a new one")
            _hotswap(self, source, adapter_name, allow_pickle=allow_pickle)
            return
        if adapter_name in registry(self).adapters:
            raise NameInUseError(f"Adapter name {adapter_name} already in use in the pipeline - please select a "
                                 "new adapter name.")
        name = adapter_name or _default_name(self)
        before = state.active
        state.active = [name]  # diffusers activates the adapter it just loaded, and only it
        state.adapters[name] = _Adapter()
        try:
            info = _load(self, source, name, mode="patch", allow_pickle=allow_pickle)
        except BaseException:  # nothing was written: put the state back
            state.adapters.pop(name, None)
            state.active = before
            raise
        state.adapters[name].weight = {c: 1.0 for c in info.components}
        _apply(self, state)


def _set_adapters(self, adapter_names: list[str] | str, adapter_weights: Any = None) -> None:
    """Activate exactly ``adapter_names`` with ``adapter_weights`` (number, per-component or per-block dict)."""
    with registry(self).lock:
        state = _state(self)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(names) != len(weights):
            raise WeightError(f"Length of adapter names {len(names)} is not equal to the length of the weights "
                              f"{len(weights)}")
        loaded = registry(self).adapters
        missing = [n for n in names if n not in loaded]
        if missing:
            raise AdapterNotFoundError(f"Adapter name(s) {missing} not in the list of present adapters: "
                                       f"{sorted(loaded)}.")
        lora_comps = set(_loadable(self))
        new = {}
        for name, weight in zip(names, weights):
            comps = _comps(loaded[name])
            if isinstance(weight, dict):
                unknown = sorted(set(weight) - lora_comps)
                if unknown:
                    logger.warning("components %s in `adapter_weights` are not LoRA components of this pipeline "
                                   "(%s); they are ignored", unknown, sorted(lora_comps))
                extra = sorted(set(weight) & lora_comps - set(comps))
                if extra:
                    logger.warning("adapter '%s' has no weights for %s; those entries are ignored", name, extra)
                per = {c: _component_weight(self, loaded[name], c, weight.get(c)) for c in comps}
            else:
                per = {c: _component_weight(self, loaded[name], c, weight) for c in comps}
            new[name] = per
        for name, per in new.items():
            state.adapters[name].weight, state.adapters[name].scale = per, {}
        state.active = list(dict.fromkeys(names))
        _apply(self, state)


def _loadable(pipe: Any) -> list[str]:
    comps = getattr(type(pipe), "_lora_loadable_modules", None)
    return list(comps) if comps else list(components(pipe))


def _default_components(pipe: Any, method: str) -> list[str]:
    """The ``components`` default of the pipeline class's own ``fuse_lora`` / ``unfuse_lora``."""
    fn = getattr(type(pipe), method, None)
    try:
        default = inspect.signature(fn).parameters["components"].default
    except (TypeError, ValueError, KeyError):
        default = inspect.Parameter.empty
    if isinstance(default, (list, tuple)) and default:
        return list(default)
    return _loadable(pipe)


def _check_components(pipe: Any, comps: Any) -> list[str]:
    comps = [comps] if isinstance(comps, str) else list(comps or [])
    if not comps:
        raise ComponentError("`components` cannot be an empty list.")
    loadable = _loadable(pipe)
    bad = [c for c in comps if c not in loadable]
    if bad:
        raise ComponentError(f"{bad} not found in the pipeline's LoRA components {loadable}")
    return [c for c in comps if getattr(pipe, c, None) is not None]


def _fuse_lora(self, components: list[str] | None = _MISSING, lora_scale: float = 1.0,  # type: ignore[assignment]
               safe_fusing: bool = False, adapter_names: list[str] | None = None, **kwargs: Any) -> None:
    """Fuse ``adapter_names`` (default: the active ones) into ``components`` at their current weight × ``lora_scale``.

    ``safe_fusing`` is accepted: diffadapt refuses non-finite tensors when it loads a file.
    """
    with registry(self).lock:
        state = _state(self)
        comps = _check_components(self, _default_components(self, "fuse_lora") if components is _MISSING
                                  else components)
        names = state.active if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        missing = [n for n in names if n not in state.adapters]
        if missing:
            raise AdapterNotFoundError(f"no adapter named {missing} is loaded (loaded: {sorted(state.adapters)})")
        if isinstance(lora_scale, bool) or not isinstance(lora_scale, (int, float)):
            raise WeightError(f"lora_scale: expected a number, got {lora_scale!r}")
        loaded = registry(self).adapters
        for comp in comps:
            if lora_scale != 1.0:  # diffusers scales the active adapters' layers first (scale_layer)
                for n in state.active:
                    if comp in _comps(loaded[n]):
                        a = state.adapters[n]
                        a.scale[comp] = a.scale.get(comp, 1.0) * float(lora_scale)
            for n in names:
                a = state.adapters[n]
                if comp in _comps(loaded[n]) and comp not in a.fused:
                    a.fused[comp] = _times(a.weight.get(comp, 1.0), a.scale.get(comp, 1.0))
        _apply(self, state)


def _unfuse_lora(self, components: list[str] | None = _MISSING, **kwargs: Any) -> None:  # type: ignore[assignment]
    """Return ``components`` to the unfused state: every adapter at its current weight, as set."""
    with registry(self).lock:
        state = _state(self)
        comps = _check_components(self, _default_components(self, "unfuse_lora") if components is _MISSING
                                  else components)
        for a in state.adapters.values():
            for comp in comps:
                a.fused.pop(comp, None)
        state.baked.clear()
        _apply(self, state)


def _unload_lora_weights(self, *args: Any, **kwargs: Any) -> None:
    """Remove every adapter; fused contributions stay in the weights, the rest comes back bit-exactly."""
    with registry(self).lock:
        state = _state(self)
        loaded = registry(self).adapters
        baked: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        if any(a.fused for a in state.adapters.values()):
            only_fused = {n: {c: state.adapters[n].fused.get(c, 0.0) for c in _comps(item)}
                          for n, item in loaded.items()}
            _set_weights(self, only_fused)
            modules = {id(t.module): t.module for n, item in loaded.items() for t in item.targets
                       if t.component in state.adapters[n].fused}
            baked = [(p, p.detach().clone()) for m in modules.values() for p in m.parameters(recurse=False)]
        _unload(self)
        with torch.no_grad():
            for p, value in baked:
                p.copy_(value)
        state.baked = state.fused_names()  # diffusers still lists them: they are in the weights
        state.adapters.clear()
        state.active, state.enabled = [], True  # diffusers' enable flags go with its layers
        self.__dict__[_MERGED] = set(state.baked)


def _delete_adapters(self, adapter_names: list[str] | str) -> None:
    """Unload ``adapter_names`` (their fused part too); if the active ones all go, the first left becomes active."""
    with registry(self).lock:
        state = _state(self)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in state.adapters]
        if missing:
            raise AdapterNotFoundError(f"no adapter named {missing} is loaded (loaded: {sorted(state.adapters)})")
        was_active = any(n in state.active for n in names)
        _unload(self, *names)
        _sync(self, state)
        if was_active and not state.active and state.adapters:
            state.active = [next(iter(state.adapters))]
        _apply(self, state)


def _get_active_adapters(self) -> list[str]:
    return list(_state(self).active)


def _get_list_adapters(self) -> dict[str, list[str]]:
    """{component: adapter names on it}, components in the pipeline's LoRA order."""
    _state(self)
    out: dict[str, list[str]] = {}
    loaded = registry(self).adapters
    for comp in _loadable(self) + [c for c in components(self) if c not in _loadable(self)]:
        names = [n for n, item in loaded.items() if comp in _comps(item)]
        if names:
            out[comp] = names
    return out


def _enable_lora(self) -> None:
    with registry(self).lock:
        state = _state(self)
        state.enabled = True
        _apply(self, state)


def _disable_lora(self) -> None:
    with registry(self).lock:
        state = _state(self)
        state.enabled = False
        _apply(self, state)


def _enable_lora_hotswap(self, **kwargs: Any) -> None:
    """Nothing to prepare: a patch-mode hotswap rewrites weights in place, so it never recompiles."""
    _state(self)
