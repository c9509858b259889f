"""The one place diffadapt meets peft's tuner machinery: configs from per-module entries, layers, strength.

Below both ``export`` (the PEFT writer builds layers around empty modules to learn peft's key names and
shapes) and ``backends`` (the inject backend builds live layers); it imports only ``methods`` and ``errors``.

* Configs: each method's ``Params.to_peft`` gives a :class:`~diffadapt.methods.base.PeftEntry` per module
  (PEFT-suffixed tensors, per-module values that become ``rank_pattern`` / ``alpha_pattern`` /
  ``n_frequency_pattern``, and the config fields every module of one config must share);
  :func:`group_entries` puts the modules into as few configs as those shared fields allow.
* Layers: :func:`build` injects one group around a list of modules with ``peft.inject_adapter_in_model(...,
  low_cpu_mem_usage=True, state_dict=...)``. The root peft sees is a *proxy* holding only those modules (named
  ``m0, m1, …``), so peft neither scans the whole component nor changes anything outside the targets; the new
  layers are moved into the real parents only once everything succeeded.
* Strength (:func:`set_strength`) and the active-adapter list (:func:`activate`) are diffadapt's: peft has no
  strength for OFT, WaveFT or DoRA, and its ``set_adapter`` would switch the other adapters of a layer off.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import DiffAdaptError, UnsupportedError
from .methods.base import PeftEntry

KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}
PATTERNS = {"r": "rank_pattern", "lora_alpha": "alpha_pattern", "alpha": "alpha_pattern",
            "n_frequency": "n_frequency_pattern"}


def module_kind(module: nn.Module) -> str | None:
    """linear | conv1d | conv2d | conv3d: the layer kinds peft's tuners distinguish."""
    for cls, kind in KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


@dataclass
class Group:
    """Modules that one peft config (one peft adapter name) holds."""

    peft_type: str
    shared: dict[str, tuple]
    modules: dict[str, PeftEntry] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        return {k: v[0] for k, v in self.shared.items()}


# -- grouping and configs ----------------------------------------------------------------------------


def group_entries(entries: dict[str, PeftEntry]) -> list[Group]:
    """Fewest configs: each module joins the first group of its peft type whose shared fields it can take."""
    groups: list[Group] = []
    for name, entry in entries.items():
        for g in groups:
            if g.peft_type != entry.peft_type:
                continue
            merged = dict(g.shared)
            for k, allowed in entry.shared.items():
                both = tuple(v for v in merged.get(k, allowed) if v in allowed)
                if not both:
                    break
                merged[k] = both
            else:
                g.shared = merged
                g.modules[name] = entry
                break
        else:
            groups.append(Group(entry.peft_type, dict(entry.shared), {name: entry}))
    return groups


def config_dict(group: Group, names: dict[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments of the peft config for ``group``; ``names`` renames modules (e.g. proxy names)."""
    names = names or {m: m for m in group.modules}
    kwargs: dict[str, Any] = {"target_modules": [names[m] for m in group.modules], **group.settings()}
    fields = {k for e in group.modules.values() for k in e.values}
    for f in sorted(fields):
        counts = Counter(e.values[f] for e in group.modules.values())
        default = counts.most_common(1)[0][0]
        kwargs[f] = default
        pattern = {names[m]: e.values[f] for m, e in group.modules.items() if e.values[f] != default}
        if pattern:
            kwargs.setdefault(PATTERNS[f], {}).update(pattern)
    if "oft_size" in kwargs:  # OFT: one (r, oft_block_size) pair that peft adjusts to each module's blocks
        kwargs["r"], kwargs["oft_block_size"] = kwargs.pop("oft_size")
    return kwargs


def make_config(group: Group, names: dict[str, str] | None = None):
    """The peft config object for ``group`` (inference defaults: no dropout, no bias)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING[group.peft_type](**config_dict(group, names))


def config_json(config) -> dict[str, Any]:
    """A peft config as adapter_config.json holds it (what ``save_pretrained`` writes)."""
    data = config.to_dict()
    for k, v in list(data.items()):
        if isinstance(v, set):
            data[k] = sorted(v)
        elif hasattr(v, "value"):  # enums
            data[k] = v.value
    return data


# -- layers ----------------------------------------------------------------------------------------


def tuner_layer_cls():
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def is_layer(module: nn.Module) -> bool:
    return isinstance(module, tuner_layer_cls())


def unwrap(module: nn.Module) -> nn.Module:
    """The original module under any peft wrappers."""
    while is_layer(module):
        module = module.base_layer
    return module


def chain(module: nn.Module) -> list[nn.Module]:
    """The peft layers wrapping a module, outermost first."""
    out = []
    while is_layer(module):
        out.append(module)
        module = module.base_layer
    return out


# -- building ----------------------------------------------------------------------------------------


def build(modules: list[nn.Module], names: list[str], group: Group, adapter: str, *, load: bool = True):
    """Inject ``group`` (modules in ``names`` order) around ``modules``; returns (layers, checkpoint state dict).

    ``load`` also assigns the tensors (``set_peft_model_state_dict``); without it only keys and shapes are
    checked. Raises DiffAdaptError if peft expects other tensors than the group provides.
    """
    from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

    proxy = nn.Module()
    alias = {n: f"m{i}" for i, n in enumerate(names)}
    for n, m in zip(names, modules):
        proxy._modules[alias[n]] = m
    sd = {f"{alias[n]}.{suffix}": t for n in names for suffix, t in group.modules[n].tensors.items()}
    config = make_config(group, alias)
    grads = [(p, p.requires_grad) for p in proxy.parameters()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inject_adapter_in_model(config, proxy, adapter_name=adapter, low_cpu_mem_usage=True, state_dict=sd)
        # the keys and shapes peft itself would save for this adapter (not for others nested in the same modules)
        own = {k: v for k, v in proxy.state_dict(keep_vars=True).items()
               if f".{adapter}." in k or k.endswith(f".{adapter}")}
        expected = {k: v.shape for k, v in get_peft_model_state_dict(proxy, own, adapter_name=adapter).items()}
        _fit(sd, expected, group, names, alias)
        if load:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = set_peft_model_state_dict(proxy, sd, adapter_name=adapter, low_cpu_mem_usage=True)
            if result.unexpected_keys:
                raise DiffAdaptError(f"peft did not take the tensors {result.unexpected_keys[:5]}")
            left = [n for n, p in proxy.named_parameters() if adapter in n and p.device.type == "meta"]
            if left:
                raise DiffAdaptError(f"peft left adapter parameters unloaded: {left[:5]}")
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
    layers = [proxy._modules[alias[n]] for n in names]
    back = {v: k for k, v in alias.items()}
    return layers, {_rename(k, back): v for k, v in sd.items()}


def _rename(key: str, back: dict[str, str]) -> str:
    head, _, rest = key.partition(".")
    return f"{back[head]}.{rest}"


def _fit(sd: dict, expected: dict, group: Group, names: list[str], alias: dict[str, str]) -> None:
    """Reshape the tensors to peft's parameter shapes; any missing, extra or misfitting tensor is an error."""
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        back = {v: k for k, v in alias.items()}
        raise DiffAdaptError(
            f"peft's {group.peft_type} layers expect other tensors: missing {[_rename(k, back) for k in missing[:4]]}, "
            f"unexpected {[_rename(k, back) for k in extra[:4]]}"
        )
    for key, shape in expected.items():
        t = sd[key]
        if tuple(t.shape) != tuple(shape):
            if t.numel() != math.prod(shape):
                raise DiffAdaptError(f"{key}: peft expects shape {tuple(shape)}, the adapter has {tuple(t.shape)}")
            sd[key] = t.reshape(shape)


# -- what strength rules keep per site ---------------------------------------------------------------


@dataclass
class OftSkew:
    """A PEFT OFT adapter's skew vectors: as loaded, and the (COFT-projected) ones strength scales."""

    vec0: torch.Tensor
    vec: torch.Tensor
    coft: bool


@dataclass
class DoraFold:
    """A DoRA adapter's loaded lora_B and magnitude, which strength rewrites (see :func:`_dora_strength`)."""

    params: Any  # the method params (float32), for ΔW
    lora_B: torch.Tensor
    magnitude: torch.Tensor


# -- state after building ----------------------------------------------------------------------------

# strength of each diffadapt-managed adapter on each layer; other adapters on the layer are left as they are
_STRENGTH: "weakref.WeakKeyDictionary[nn.Module, dict[str, float]]" = weakref.WeakKeyDictionary()


def adapter_names(layer: nn.Module) -> list[str]:
    """The adapters a layer holds, in the order they were added."""
    for attr in ("scaling", "waveft_scaling"):
        d = getattr(layer, attr, None)
        if isinstance(d, dict) and d:
            return list(d)
    seen: dict[str, None] = {}
    for attr in layer.adapter_layer_names:
        d = getattr(layer, attr, None)
        if isinstance(d, (nn.ModuleDict, nn.ParameterDict)):
            seen.update(dict.fromkeys(d.keys()))
    return list(seen)


def is_oft(layer: nn.Module) -> bool:
    return hasattr(layer, "oft_R")


def activate(layer: nn.Module, foreign_active: list[str] | None = None) -> None:
    """Active = managed adapters with a non-zero strength (plus any active foreign ones), in load order.

    An OFT layer applies its adapters to the input one after the other, so the last loaded must act
    first for the rotations to compose as in patch mode (W·R₁ᵀ·R₂ᵀ): its list is reversed.
    """
    managed = _STRENGTH.get(layer, {})
    foreign = set(layer.active_adapters if foreign_active is None else foreign_active)
    names = [n for n in adapter_names(layer)
             if ((managed[n] != 0.0 or _tensor_scaling(layer, n)) if n in managed else n in foreign)]
    layer._active_adapter = names[::-1] if is_oft(layer) else names


def _tensor_scaling(layer: nn.Module, adapter: str) -> bool:
    """Prepared for compiled hotswap (``inject_hotswap``): strength is a value in a 0-dim tensor, and the
    adapter stays active at 0, since leaving the active list would change a compiled graph."""
    scaling = getattr(layer, "scaling", None)
    return isinstance(scaling, dict) and isinstance(scaling.get(adapter), torch.Tensor)


def record(layer: nn.Module, adapter: str, strength: float) -> None:
    _STRENGTH.setdefault(layer, {})[adapter] = strength


def forget(layer: nn.Module, adapter: str) -> None:
    d = _STRENGTH.get(layer)
    if d is not None:
        d.pop(adapter, None)


def is_empty(layer: nn.Module) -> bool:
    return not layer._get_available_adapters() and not adapter_names(layer)


# -- strength ----------------------------------------------------------------------------------------


@torch.no_grad()
def set_strength(site, s: float) -> None:
    """Make the layer compute W + s·Δ (or the method's strength rule) for this adapter: exact, in place."""
    layer, n = site.layer, site.peft_name
    record(layer, n, s)
    if _tensor_scaling(layer, n):
        layer.scaling[n].fill_(site.base_scaling * s)
        return
    if s == 0.0:
        return  # inactive: the layer skips it (see activate)
    if site.oft is not None:
        if site.oft.coft and abs(s) > 1:
            raise UnsupportedError(f"{site.where}: COFT re-projects |Q| at every forward, so weight {s} "
                                   "(|w| > 1) cannot be held by peft's layer; use mode='patch'")
        layer.oft_R[n].weight.copy_(site.oft.vec0 if s == 1.0 else site.oft.vec * s)
    elif site.peft_type == "WAVEFT":
        layer.waveft_scaling[n] = site.base_scaling * s
    elif site.dora is not None:
        if s == 1.0:
            restore_originals(site)
        else:
            _dora_strength(site, s)
    else:
        layer.scaling[n] = site.base_scaling * s


def _dora_strength(site, s: float) -> None:
    """W + s·(m·(W+Δ)/‖W+Δ‖ − W) with peft's DoRA layer: fold s into lora_B rows and the magnitude.

    peft computes g·(W + sc·B·A) with g = m/‖W + sc·B·A‖ per output row. With g₁ = m/‖W+Δ‖, the target row
    is g'·W + s·g₁·Δ, g' = 1 − s + s·g₁; so B' = (s·g₁/g')·B and m' = g'·‖W + (s·g₁/g')·Δ‖. The base weight
    is read now: a later patch-mode change to the same module's weight needs the weight set again.
    """
    layer, n = site.layer, site.peft_name
    b0, m0 = site.dora.lora_B, site.dora.magnitude
    w = layer.get_base_layer().weight.float()
    shape = w.shape
    delta = site.dora.params.delta(shape).to(w.device)
    rows = (shape[0],) + (1,) * (w.dim() - 1)
    g1 = m0.float().reshape(-1) / (w + delta).flatten(1).norm(dim=1)
    g = 1 - s + s * g1
    if bool((g.abs() < 1e-6).any()):
        raise UnsupportedError(f"{site.where}: DoRA at weight {s} cancels a row of the weight; use mode='patch'")
    c = s * g1 / g
    m = g * (w + c.reshape(rows) * delta).flatten(1).norm(dim=1)
    lora_b = layer.lora_B[n].weight
    lora_b.copy_((b0.float() * c.reshape((-1,) + (1,) * (b0.dim() - 1))).reshape(lora_b.shape))
    mag = layer.lora_magnitude_vector[n].weight
    mag.copy_(m.reshape(mag.shape))


@torch.no_grad()
def restore_originals(site) -> None:
    """Put back the tensors strength rules rewrite (OFT skew, DoRA lora_B and magnitude)."""
    layer, n = site.layer, site.peft_name
    if site.oft is not None:
        layer.oft_R[n].weight.copy_(site.oft.vec0)
    elif site.dora is not None:
        layer.lora_B[n].weight.copy_(site.dora.lora_B.reshape(layer.lora_B[n].weight.shape))
        mag = layer.lora_magnitude_vector[n].weight
        mag.copy_(site.dora.magnitude.reshape(mag.shape))
