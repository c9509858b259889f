"""Component-level adapter methods of a plugged pipeline: ``pipe.unet.set_adapters(…)``, ``pipe.transformer.…``.

diffusers' models (``PeftAdapterMixin``: the UNet, the DiT transformers) carry their own ``set_adapters``,
``set_adapter``, ``active_adapters``, ``enable_adapters`` / ``disable_adapters``, ``enable_lora`` /
``disable_lora`` and ``delete_adapters``; its docs use them (``pipeline.unet.set_adapters([...], weights=[...])``,
``pipeline.unet.disable_lora()``). On a plugged pipeline they are bound on each such model instance and act on
the plugin's state for that one component, so pipeline- and component-level calls agree. The text encoders
(transformers models) keep their own methods: diffusers routes text-encoder LoRA through the pipeline.
"""

from __future__ import annotations

import functools
import types
from typing import Any

from .api import unload as _unload
from .errors import AdapterNotFoundError
from .pipeline import registry
from .plugin_state import MISSING, State, apply, comps_of, component_weight, get_state, on_component
from .weights import WeightError

METHODS = ("set_adapters", "set_adapter", "active_adapters", "enable_adapters", "disable_adapters", "enable_lora",
           "disable_lora", "delete_adapters")


def install(pipe: Any, state: State, comps: list[str]) -> None:
    from diffusers.loaders.peft import PeftAdapterMixin

    for comp in comps:
        model = getattr(pipe, comp, None)
        model = getattr(model, "_orig_mod", model)  # a torch.compile'd component: the module it wraps
        if not isinstance(model, PeftAdapterMixin):
            continue
        for name in METHODS:
            state.saved_models.append((model, name, model.__dict__.get(name, MISSING)))
            model.__dict__[name] = _Bound(globals()[f"_{name}"], pipe, comp, getattr(type(model), name))


def uninstall(state: State) -> None:
    for model, name, old in reversed(state.saved_models):
        if old is MISSING:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = old
    state.saved_models.clear()


class _Bound:
    """One component-level method: ``fn(pipe, comp, …)`` under the registry lock."""

    def __init__(self, fn, pipe: Any, comp: str, original) -> None:
        self.fn, self.pipe, self.comp = fn, pipe, comp
        functools.update_wrapper(self, original)

    def __deepcopy__(self, memo: dict) -> Any:
        """A copied pipeline's denoiser calls into the copy; a denoiser copied alone gets diffusers' method."""
        pipe = memo.get(id(self.pipe))
        if pipe is not None:
            return _Bound(self.fn, pipe, self.comp, self.__wrapped__)
        model = memo.get(id(getattr(self.pipe, self.comp, None)))
        return types.MethodType(self.__wrapped__, model) if model is not None else self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with registry(self.pipe).lock:
            return self.fn(self.pipe, self.comp, *args, **kwargs)


def after_delete(active: list[str], names: list[str], left: list[str]) -> list[str]:
    """peft's rule when layers' adapters are deleted: the other active ones stay; none left active: the first
    adapter still on the layers."""
    kept = [n for n in active if n not in names]
    if kept or not any(n in names for n in active):
        return kept
    return left[:1]


def _on(pipe: Any, comp: str, names: Any) -> tuple[State, list[str]]:
    state = get_state(pipe)
    names = [names] if isinstance(names, str) else list(names)
    there = on_component(state, registry(pipe).adapters, comp)
    missing = [n for n in names if n not in there]
    if missing:
        raise AdapterNotFoundError(f"adapter(s) {missing} not found in {comp} (its adapters: {there})")
    return state, names


def _set_adapters(pipe: Any, comp: str, adapter_names: list[str] | str, weights: Any = None) -> None:
    """Activate exactly ``adapter_names`` on this component at ``weights`` (number or per-block dict each)."""
    state, names = _on(pipe, comp, adapter_names)
    weights = weights if isinstance(weights, list) else [weights] * len(names)
    if len(names) != len(weights):
        raise WeightError(f"Length of adapter names {len(names)} is not equal to the length of their weights "
                          f"{len(weights)}.")
    loaded = registry(pipe).adapters
    per = {n: component_weight(pipe, loaded[n], comp, w) for n, w in zip(names, weights)}
    for n, w in per.items():
        a = state.adapters[n]
        a.weight[comp] = w
        a.scale.pop(comp, None)  # peft's set_scale replaces any fuse_lora(lora_scale=) multiplier
    state.component_active[comp] = list(dict.fromkeys(names))
    apply(pipe, state)


def _set_adapter(pipe: Any, comp: str, adapter_name: list[str] | str) -> None:
    """Activate exactly ``adapter_name`` (one or a list) on this component, at the weights they have."""
    state, names = _on(pipe, comp, adapter_name)
    state.component_active[comp] = list(dict.fromkeys(names))
    apply(pipe, state)


def _active_adapters(pipe: Any, comp: str) -> list[str]:
    state = get_state(pipe)
    if not on_component(state, registry(pipe).adapters, comp):
        raise ValueError("No adapter loaded. Please load an adapter first.")
    return list(state.active_on(comp))


def _switch(pipe: Any, comp: str, enabled: bool) -> None:
    state = get_state(pipe)
    if enabled:
        state.disabled.discard(comp)
    else:
        state.disabled.add(comp)
    apply(pipe, state)


def _enable_adapters(pipe: Any, comp: str) -> None:
    _switch(pipe, comp, True)


def _disable_adapters(pipe: Any, comp: str) -> None:
    _switch(pipe, comp, False)


def _enable_lora(pipe: Any, comp: str) -> None:
    _switch(pipe, comp, True)


def _disable_lora(pipe: Any, comp: str) -> None:
    _switch(pipe, comp, False)


def _delete_adapters(pipe: Any, comp: str, adapter_names: list[str] | str) -> None:
    """Take ``adapter_names`` off this component only (their fused part too); elsewhere they stay loaded."""
    state, names = _on(pipe, comp, adapter_names)
    loaded = registry(pipe).adapters
    left = [n for n in on_component(state, loaded, comp) if n not in names]
    state.component_active[comp] = after_delete(state.active_on(comp), names, left)
    gone = []
    for n in names:
        a = state.adapters[n]
        a.deleted.add(comp)
        a.fused.pop(comp, None)
        if a.deleted >= set(comps_of(loaded[n])):
            gone.append(n)
    apply(pipe, state)
    if gone:  # off every component: unloaded for good
        _unload(pipe, *gone)
        get_state(pipe)
