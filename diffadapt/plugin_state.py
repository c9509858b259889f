"""diffusers' adapter state as ``da.plugin`` keeps it, and how it becomes diffadapt weights.

Shared by the pipeline-level methods (``plugin.py``), the component-level ones (``plugin_models.py``) and the
per-call scale (``plugin_call.py``): each changes this state, then ``apply`` rewrites only the adapters whose
diffadapt weight no longer matches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import DiffAdaptError
from .mixing import set_weights
from .pipeline import Loaded, components, registry
from .weights import WeightError

STATE = "_diffadapt_plugin"
MERGED = "_merged_adapters"  # read by diffusers' ``fused_loras`` / ``num_fused_loras`` properties


class _Missing:
    """"No instance attribute was there" — the same object in copies of a plugged pipeline's state."""

    def __repr__(self) -> str:
        return "MISSING"

    def __copy__(self) -> _Missing:
        return self

    def __deepcopy__(self, memo: dict) -> _Missing:
        return self

    def __reduce__(self) -> str:
        return "MISSING"


MISSING = _Missing()


@dataclass
class Adapter:
    """diffusers' view of one adapter: per component, its weight, scale multiplier and frozen fused weight."""

    weight: dict[str, Any] = field(default_factory=dict)  # component -> number | {"modules": …}
    scale: dict[str, float] = field(default_factory=dict)  # fuse_lora(lora_scale=) multipliers in force
    fused: dict[str, Any] = field(default_factory=dict)  # component -> weight frozen by fuse_lora
    deleted: set[str] = field(default_factory=set)  # components a model-level delete_adapters took it from


@dataclass
class State:
    adapters: dict[str, Adapter] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)  # set by the pipeline-level methods, for every component
    component_active: dict[str, list[str]] = field(default_factory=dict)  # model-level set_adapters since then
    disabled: set[str] = field(default_factory=set)  # components whose adapters are switched off
    calls: list[dict[str, float]] = field(default_factory=list)  # per-call scales in force, innermost last
    saved: dict[str, Any] = field(default_factory=dict)  # instance attributes the plugin replaced
    saved_models: list[tuple[Any, str, Any]] = field(default_factory=list)  # (model, attribute, old value)
    baked: set[str] = field(default_factory=set)  # fused, then unloaded: in the weights for good

    def fused_names(self) -> set[str]:
        return self.baked | {n for n, a in self.adapters.items() if a.fused}

    def active_on(self, comp: str) -> list[str]:
        return self.component_active.get(comp, self.active)

    def call_scale(self, comp: str) -> float:
        """The per-call scale of ``comp``: the innermost call that sets one (each call removes its own entry, so
        calls that overlap in other threads never leave a scale behind)."""
        return next((c[comp] for c in reversed(self.calls) if comp in c), 1.0)

    def set_active(self, names: list[str]) -> None:
        """A pipeline-level activation: every component runs exactly ``names``."""
        self.active = list(dict.fromkeys(names))
        self.component_active.clear()


def get_state(pipe: Any) -> State:
    state = pipe.__dict__.get(STATE)
    if state is None:
        raise DiffAdaptError("this pipeline is not plugged in; call da.plugin(pipe) first")
    return sync(pipe, state)


def sync(pipe: Any, state: State) -> State:
    """Follow loads and unloads made with ``da.load`` / ``da.unload`` on the same pipeline."""
    loaded = registry(pipe).adapters
    for name in [n for n in state.adapters if n not in loaded]:
        del state.adapters[name]
    state.active = [n for n in state.active if n in loaded]
    for comp, names in state.component_active.items():
        state.component_active[comp] = [n for n in names if n in loaded]
    for name, item in loaded.items():
        if name not in state.adapters:
            w = item.weight
            state.adapters[name] = Adapter(weight={c: w.get(c, w.get("default", 1.0)) if isinstance(w, dict) else w
                                                   for c in comps_of(item)})
            if item.enabled:
                state.active.append(name)
                for names in state.component_active.values():
                    names.append(name)
    pipe.__dict__[MERGED] = state.fused_names()
    return state


def comps_of(loaded: Loaded) -> list[str]:
    return list(dict.fromkeys(t.component for t in loaded.targets))


def on_component(state: State, loaded: dict[str, Loaded], comp: str) -> list[str]:
    """The adapters with layers in ``comp`` (diffusers: its ``peft_config``), in load order."""
    return [n for n, item in loaded.items() if comp in comps_of(item) and comp not in state.adapters[n].deleted]


def times(value: Any, s: float) -> Any:
    if isinstance(value, dict):
        return {k: times(v, s) for k, v in value.items()}
    if isinstance(value, list):
        return [x * s for x in value]
    return float(value) * s


def _merged_modules(state: State, loaded: dict[str, Loaded]) -> dict[str, set[str]]:
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


def effective(state: State, name: str, loaded: Loaded, merged: dict[str, set[str]]) -> dict[str, Any]:
    """The diffadapt weight that reproduces diffusers' state for one adapter, per component.

    A layer that holds a fused adapter runs no unfused one: peft's merged layers call their base layer only —
    which is also why a per-call scale leaves fused contributions alone.
    """
    a = state.adapters[name]
    out = {}
    for comp in comps_of(loaded):
        if comp in state.disabled:
            out[comp] = 0.0
        elif comp in a.fused:
            out[comp] = a.fused[comp]
        elif comp not in a.deleted and name in state.active_on(comp):
            value = times(a.weight.get(comp, 1.0), a.scale.get(comp, 1.0) * state.call_scale(comp))
            blocked = [t.module_name for t in loaded.targets
                       if t.component == comp and t.module_name in merged.get(comp, ())]
            out[comp] = _without(value, blocked)
        else:
            out[comp] = 0.0
    return out


def apply(pipe: Any, state: State) -> None:
    """Rewrite the adapters whose diffadapt weight differs from what the state asks for."""
    loaded = registry(pipe).adapters
    merged = _merged_modules(state, loaded)
    changed = {}
    for name, item in loaded.items():
        want = effective(state, name, item, merged)
        if want != item.weight:
            changed[name] = want
    if changed:
        set_weights(pipe, changed)
    pipe.__dict__[MERGED] = state.fused_names()


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


def component_weight(pipe: Any, loaded: Loaded, comp: str, value: Any) -> Any:
    """One ``set_adapters`` weight for one component: a number, or a per-block dict expanded as diffusers does."""
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


def loadable(pipe: Any) -> list[str]:
    comps = getattr(type(pipe), "_lora_loadable_modules", None)
    return list(comps) if comps else list(components(pipe))
