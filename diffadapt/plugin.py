"""``da.plugin(pipe)``: the pipeline's own diffusers LoRA API, for every adapter format diffadapt loads.

After ``da.plugin(pipe)``, existing diffusers code — ``pipe.load_lora_weights(…)``, ``set_adapters``,
``fuse_lora``, ``unfuse_lora``, ``unload_lora_weights``, ``delete_adapters``, ``get_active_adapters``,
``get_list_adapters``, ``enable_lora`` / ``disable_lora``, ``enable_lora_hotswap``, ``set_lora_device``, the
per-call ``pipe(…, cross_attention_kwargs={"scale": s})`` (``plugin_call.py``) and the denoiser's own
``pipe.unet.set_adapters`` & co. (``plugin_models.py``) — takes LoHa, LoKr, OFT, full, DoRA and Tucker files
in kohya, LyCORIS, PEFT and diffusers layouts, state dicts, folders and hub ids. Methods are bound on the
instances only (``pipe.__dict__``, the denoiser's ``__dict__``; ``pipe(…)`` needs a same-named subclass of
the pipeline's class for this one instance); diffusers' classes are never touched, and ``da.unplug(pipe)``
undoes it all.

Mapping onto diffadapt. Every adapter is loaded in patch mode (any method, any mix, zero cost per step,
exact restore). diffusers' state is kept here (``plugin_state.py``), per adapter and component — the
``set_adapters`` weight, the ``fuse_lora(lora_scale=)`` multiplier still in force, the weight frozen by a
fuse — plus the active list (per component once a component-level call set it), the disabled components and
the per-call scale; each call turns that state into diffadapt weights and rewrites only the adapters whose
weight changed. So the semantics are diffusers', including its less obvious ones:

* a load makes the new adapter the only active one; names default to ``default_<n>``;
  ``load_into_transformer_2=True`` (Wan 2.2) loads the file's denoiser keys into the low-noise expert;
* ``set_adapters(names, weights)`` activates exactly ``names``; a weight is a number, a per-component dict
  (missing components: 1.0) or, for a UNet, diffusers' per-block dict, expanded by diffusers' own
  ``_maybe_expand_lora_scales`` and resolved per module by diffusers' rule;
* ``fuse_lora(components, lora_scale, adapter_names)`` multiplies each component's active adapters' scale by
  ``lora_scale`` (this stays after ``unfuse_lora``, as in diffusers, until ``set_adapters``) and freezes
  the fused adapters' contribution: later ``set_adapters`` calls and per-call scales do not move it;
* a layer holding a fused adapter runs no unfused one (peft's merged layers run their base layer only);
* ``unfuse_lora(components)`` returns those components to the unfused state (current weights);
* ``unload_lora_weights()`` removes every adapter; contributions still fused stay in the weights (the
  documented fuse → unload → ``save_pretrained`` workflow); anything unfused comes back bit-exactly;
* ``get_active_adapters()`` answers as diffusers does: the active list of the last LoRA component with adapters.

Where diffusers' peft layers would leave a residue (``unfuse_lora`` after a ``set_adapters`` while fused
subtracts the new scale; a call with ``scale=0`` resets every active weight to 1) the plugin restores
exactly. A fused adapter removed by ``delete_adapters`` leaves nothing behind. Unknown adapter names raise
``AdapterNotFoundError`` where diffusers' model-level methods would silently activate or skip them.
Not covered: a scale passed to the denoiser called directly (``pipe.unet(…, cross_attention_kwargs=…)``
outside ``pipe(…)``), the text encoders' own transformers adapter methods, and model-level ``fuse_lora`` /
``load_lora_adapter`` (diffusers' own: they see no peft layers). On a plugged pipeline the diffusers calls own
the weights: one set with ``da.set_weights`` is replaced by the plugin's state at its next rewrite (a
``set_adapters``, or a call with a scale).
"""

from __future__ import annotations

import inspect
import logging
import os
import types
from pathlib import Path
from typing import Any

import torch

from . import plugin_call, plugin_models
from .api import load as _load, unload as _unload
from .errors import AdapterNotFoundError, ComponentError, NameInUseError, UnsupportedError
from .hotswap import hotswap as _hotswap
from .mixing import set_weights as _set_weights
from .pipeline import components, registry
from .plugin_state import MERGED, MISSING, STATE, Adapter, State, apply, comps_of, component_weight, get_state, \
    loadable, on_component, sync, times
from .weights import WeightError

logger = logging.getLogger(__name__)

METHODS = (
    "load_lora_weights", "set_adapters", "fuse_lora", "unfuse_lora", "unload_lora_weights", "delete_adapters",
    "get_active_adapters", "get_list_adapters", "enable_lora", "disable_lora", "enable_lora_hotswap",
    "set_lora_device",
)
# lora_state_dict's download options: huggingface_hub's defaults (cache, login token) serve them
_IGNORED = {"cache_dir", "force_download", "proxies", "local_files_only", "token", "use_safetensors",
            "low_cpu_mem_usage", "unet_config", "return_lora_metadata", "metadata", "network_alphas", "prefix"}


# -- install -----------------------------------------------------------------------------------------


def plugin(pipe: Any) -> Any:
    """Make ``pipe``'s diffusers LoRA methods load every format diffadapt reads; returns ``pipe``."""
    if not isinstance(getattr(pipe, "components", None), dict):
        raise TypeError(f"da.plugin expects a diffusers pipeline, got {type(pipe).__name__}")
    if STATE in pipe.__dict__:
        return pipe
    state = State()
    for name in METHODS + (MERGED,):
        state.saved[name] = pipe.__dict__.get(name, MISSING)
    for name in METHODS:
        pipe.__dict__[name] = types.MethodType(globals()[f"_{name}"], pipe)
    pipe.__dict__[MERGED] = set()
    pipe.__dict__[STATE] = state
    plugin_models.install(pipe, state, loadable(pipe))
    plugin_call.install(pipe)
    sync(pipe, state)
    return pipe


def unplug(pipe: Any) -> Any:
    """Put diffusers' own methods back; loaded adapters stay as they are (``da.adapters`` lists them)."""
    state = pipe.__dict__.pop(STATE, None)
    if state is None:
        return pipe
    plugin_call.uninstall(pipe)
    plugin_models.uninstall(state)
    for name, value in state.saved.items():
        if value is MISSING:
            pipe.__dict__.pop(name, None)
        else:
            pipe.__dict__[name] = value
    return pipe


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
    into = "transformer_2" if kwargs.pop("load_into_transformer_2", False) else None  # Wan 2.2's low-noise expert
    source = _source(pretrained_model_name_or_path_or_dict, kwargs)
    with registry(self).lock:
        state = get_state(self)
        if hotswap:
            if adapter_name not in registry(self).adapters:
                raise AdapterNotFoundError(
                    f"Trying to hotswap adapter '{adapter_name}' but there is no existing adapter by that name "
                    f"(loaded: {sorted(registry(self).adapters)}); pass hotswap=False to load a new one")
            _hotswap(self, source, adapter_name, allow_pickle=allow_pickle, into=into)
            return
        if adapter_name in registry(self).adapters:
            raise NameInUseError(f"Adapter name {adapter_name} already in use in the pipeline - please select a "
                                 "new adapter name." + (" An adapter is one name across both experts: name the "
                                                        "low-noise half of a pair differently (e.g. "
                                                        f"'{adapter_name}_2')." if into else ""))
        name = adapter_name or _default_name(self)
        before = state.active, dict(state.component_active)
        held = {c: state.active_on(c) for c in components(self) if on_component(state, registry(self).adapters, c)}
        state.set_active([name])  # diffusers activates the adapter it just loaded, and only it, where it lands
        state.adapters[name] = Adapter()
        try:
            info = _load(self, source, name, mode="patch", allow_pickle=allow_pickle, into=into)
        except BaseException:  # nothing was written: put the state back
            state.adapters.pop(name, None)
            state.active, state.component_active = before
            raise
        landed = comps_of(registry(self).adapters[name])
        state.adapters[name].weight = {c: 1.0 for c in landed}
        # components the file has no keys for keep their active adapters (Wan 2.2: a low-noise file loaded into
        # transformer_2 leaves the high-noise adapter running in transformer)
        state.component_active = {c: names for c, names in held.items() if c not in landed}
        apply(self, state)


def _set_adapters(self, adapter_names: list[str] | str, adapter_weights: Any = None) -> None:
    """Activate exactly ``adapter_names`` with ``adapter_weights`` (number, per-component or per-block dict)."""
    with registry(self).lock:
        state = get_state(self)
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
        lora_comps = set(loadable(self))
        new = {}
        for name, weight in zip(names, weights):
            comps = comps_of(loaded[name])
            if isinstance(weight, dict):
                unknown = sorted(set(weight) - lora_comps)
                if unknown:
                    logger.warning("components %s in `adapter_weights` are not LoRA components of this pipeline "
                                   "(%s); they are ignored", unknown, sorted(lora_comps))
                extra = sorted(set(weight) & lora_comps - set(comps))
                if extra:
                    logger.warning("adapter '%s' has no weights for %s; those entries are ignored", name, extra)
                per = {c: component_weight(self, loaded[name], c, weight.get(c)) for c in comps}
            else:
                per = {c: component_weight(self, loaded[name], c, weight) for c in comps}
            new[name] = per
        for name, per in new.items():
            state.adapters[name].weight, state.adapters[name].scale = per, {}
        state.set_active(names)
        apply(self, state)


def _default_components(pipe: Any, method: str) -> list[str]:
    """The ``components`` default of the pipeline class's own ``fuse_lora`` / ``unfuse_lora``."""
    fn = getattr(type(pipe), method, None)
    try:
        default = inspect.signature(fn).parameters["components"].default
    except (TypeError, ValueError, KeyError):
        default = inspect.Parameter.empty
    if isinstance(default, (list, tuple)) and default:
        return list(default)
    return loadable(pipe)


def _check_components(pipe: Any, comps: Any) -> list[str]:
    comps = [comps] if isinstance(comps, str) else list(comps or [])
    if not comps:
        raise ComponentError("`components` cannot be an empty list.")
    lora = loadable(pipe)
    bad = [c for c in comps if c not in lora]
    if bad:
        raise ComponentError(f"{bad} not found in the pipeline's LoRA components {lora}")
    return [c for c in comps if getattr(pipe, c, None) is not None]


def _fuse_lora(self, components: list[str] | None = MISSING, lora_scale: float = 1.0,  # type: ignore[assignment]
               safe_fusing: bool = False, adapter_names: list[str] | None = None, **kwargs: Any) -> None:
    """Fuse ``adapter_names`` (default: the active ones) into ``components`` at their current weight × ``lora_scale``.

    ``safe_fusing`` is accepted: diffadapt refuses non-finite tensors when it loads a file.
    """
    with registry(self).lock:
        state = get_state(self)
        comps = _check_components(self, _default_components(self, "fuse_lora") if components is MISSING
                                  else components)
        given = None if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        missing = [n for n in given or () if n not in state.adapters]
        if missing:
            raise AdapterNotFoundError(f"no adapter named {missing} is loaded (loaded: {sorted(state.adapters)})")
        if isinstance(lora_scale, bool) or not isinstance(lora_scale, (int, float)):
            raise WeightError(f"lora_scale: expected a number, got {lora_scale!r}")
        loaded = registry(self).adapters
        for comp in comps:  # each component merges its own active adapters unless names are given
            names = state.active_on(comp) if given is None else given
            if lora_scale != 1.0:  # diffusers scales the active adapters' layers first (scale_layer)
                for n in state.active_on(comp):
                    if comp in comps_of(loaded[n]):
                        a = state.adapters[n]
                        a.scale[comp] = a.scale.get(comp, 1.0) * float(lora_scale)
            for n in names:
                a = state.adapters[n]
                if comp in comps_of(loaded[n]) and comp not in a.fused:
                    a.fused[comp] = times(a.weight.get(comp, 1.0), a.scale.get(comp, 1.0))
        apply(self, state)


def _unfuse_lora(self, components: list[str] | None = MISSING, **kwargs: Any) -> None:  # type: ignore[assignment]
    """Return ``components`` to the unfused state: every adapter at its current weight, as set."""
    with registry(self).lock:
        state = get_state(self)
        comps = _check_components(self, _default_components(self, "unfuse_lora") if components is MISSING
                                  else components)
        for a in state.adapters.values():
            for comp in comps:
                a.fused.pop(comp, None)
        state.baked.clear()
        apply(self, state)


def _unload_lora_weights(self, *args: Any, **kwargs: Any) -> None:
    """Remove every adapter; fused contributions stay in the weights, the rest comes back bit-exactly."""
    with registry(self).lock:
        state = get_state(self)
        loaded = registry(self).adapters
        baked: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        if any(a.fused for a in state.adapters.values()):
            only_fused = {n: {c: state.adapters[n].fused.get(c, 0.0) for c in comps_of(item)}
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
        state.set_active([])
        state.disabled.clear()  # diffusers' enable flags go with its layers
        self.__dict__[MERGED] = set(state.baked)


def _delete_adapters(self, adapter_names: list[str] | str) -> None:
    """Unload ``adapter_names`` (their fused part too); if the active ones all go, the first left becomes active."""
    with registry(self).lock:
        state = get_state(self)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in state.adapters]
        if missing:
            raise AdapterNotFoundError(f"no adapter named {missing} is loaded (loaded: {sorted(state.adapters)})")
        loaded = registry(self).adapters
        left = {c: [n for n in on_component(state, loaded, c) if n not in names] for c in components(self)}
        per_comp = {c: plugin_models.after_delete(state.active_on(c), names, left[c])
                    for c in components(self) if on_component(state, loaded, c)}
        was_active = any(n in state.active for n in names)
        _unload(self, *names)
        sync(self, state)
        if was_active and not state.active and state.adapters:
            state.active = [next(iter(state.adapters))]
        state.component_active = {c: a for c, a in per_comp.items() if a != state.active}
        apply(self, state)


def _get_active_adapters(self) -> list[str]:
    """diffusers' answer: the active adapters of the last LoRA component that holds adapter layers."""
    state = get_state(self)
    loaded = registry(self).adapters
    holding = [c for c in loadable(self) if on_component(state, loaded, c)]
    return list(state.active_on(holding[-1]) if holding else state.active)


def _get_list_adapters(self) -> dict[str, list[str]]:
    """{component: adapter names on it}, components in the pipeline's LoRA order."""
    out: dict[str, list[str]] = {}
    loaded = registry(self).adapters
    for comp in loadable(self) + [c for c in components(self) if c not in loadable(self)]:
        names = on_component(get_state(self), loaded, comp)
        if names:
            out[comp] = names
    return out


def _enable_lora(self) -> None:
    with registry(self).lock:
        state = get_state(self)
        state.disabled.clear()
        apply(self, state)


def _disable_lora(self) -> None:
    with registry(self).lock:
        state = get_state(self)
        state.disabled = set(components(self))
        apply(self, state)


def _enable_lora_hotswap(self, **kwargs: Any) -> None:
    """Nothing to prepare: a patch-mode hotswap rewrites weights in place, so it never recompiles."""
    get_state(self)


def _set_lora_device(self, adapter_names: list[str], device: Any) -> None:
    """Nothing to move: a patch-mode adapter lives in the component's weights, on the component's device.

    diffusers moves peft's separate ``lora_A`` / ``lora_B`` layers (and the adapter cannot run until moved back);
    here the contribution is already written into the weights, and the factors kept for exact rewrites stay
    next to the weights they rewrite. The names and the device are checked, so a typo still fails loudly; to
    free the memory an adapter holds, ``delete_adapters`` it.
    """
    state = get_state(self)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    missing = [n for n in names if n not in state.adapters]
    if missing:
        raise AdapterNotFoundError(f"no adapter named {missing} is loaded (loaded: {sorted(state.adapters)})")
    torch.device(device)  # diffusers' accepted forms: a torch.device, a str or an int
    logger.info("set_lora_device(%s, %s): adapters loaded by diffadapt live in the weights; nothing to move",
                names, device)
