"""What a pipeline (or bare module) holds, where each patch goes, and the registry of loaded adapters."""

from __future__ import annotations

import threading
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import weights
from .errors import KeyMappingError, ShapeError
from .info import guess_family
from .keys import ANY, ModuleIndex
from .spec import COMPONENTS, AdapterInfo, AdapterSpec, ModulePatch

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
PATCHABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def components(target: Any) -> dict[str, nn.Module]:
    """The adaptable modules of a pipeline by component name; a bare module is the single component ''."""
    if isinstance(target, nn.Module):
        return {"": target}
    comps = getattr(target, "components", None)
    if not isinstance(comps, dict):
        raise TypeError(f"expected a diffusers pipeline or an nn.Module, got {type(target).__name__}")
    return {k: v for k, v in comps.items() if k in COMPONENTS and isinstance(v, nn.Module)}


def pipeline_family(target: Any) -> str:
    comps = components(target)
    if "transformer" in comps:
        return "dit"
    if "text_encoder_2" in comps:
        return "sdxl"
    if "unet" in comps:
        return "sd1"
    return "unknown"


@dataclass
class Target:
    """A resolved patch: which component and module it adapts."""

    patch: ModulePatch
    component: str
    module_name: str
    module: nn.Module


def _candidates(component: str, comps: dict[str, nn.Module]) -> list[str]:
    if "" in comps:
        return [""]
    if component in comps:
        return [component]
    if component in DENOISERS:
        return [c for c in DENOISERS if c in comps]
    if component == ANY:
        return [c for c in DENOISERS + TEXT_ENCODERS if c in comps]
    return []


def resolve(target: Any, spec: AdapterSpec, *, strict: bool = True) -> list[Target]:
    """Map every patch to a module and check shapes; raises before anything is written."""
    comps = components(target)
    indexes = {name: ModuleIndex(m) for name, m in comps.items()}
    found: list[Target] = []
    missing: dict[str, list[ModulePatch]] = defaultdict(list)
    for patch in spec.patches:
        hit = None
        for comp in _candidates(patch.component, comps):
            name = indexes[comp].find(patch.module_key, dotted=patch.dotted)
            if name is not None:
                hit = (comp, name)
                break
        if hit is None:
            missing[patch.component].append(patch)
            continue
        comp, name = hit
        module = indexes[comp].modules[name]
        where = f"{spec.source}: '{patch.original_key}' → {comp + '.' if comp else ''}{name}"
        if not isinstance(module, PATCHABLE):
            raise ShapeError(f"{where}: a {type(module).__name__} cannot be adapted (Linear and Conv only)")
        patch.params.check(module.weight.shape, where=where)
        found.append(Target(patch=patch, component=comp, module_name=name, module=module))
    if missing:
        _report_missing(target, spec, found, missing, strict=strict)
    return found


def _report_missing(target, spec, found, missing, *, strict: bool) -> None:
    resolved_comps = Counter(t.patch.component for t in found)
    bare = isinstance(target, nn.Module)
    # A bare module takes the components of the file that fit it; others are skipped, not errors.
    if bare and found and all(resolved_comps.get(c, 0) == 0 for c in missing):
        warnings.warn(f"{spec.source}: skipped components {sorted(missing)} that do not fit this module", stacklevel=4)
        return
    keys = [p.original_key for ps in missing.values() for p in ps]
    file_family, model_family = guess_family(spec), pipeline_family(target)
    hint = ""
    if file_family != "unknown" and model_family != "unknown" and file_family != model_family:
        hint = f" The file looks made for {file_family}; the model looks like {model_family}."
    elif file_family != "unknown":
        hint = f" The file looks made for {file_family}."
    msg = (
        f"{spec.source}: {len(keys)} of {len(spec.patches)} adapter modules match no module of the model "
        f"(components {sorted(missing)}), e.g. {keys[:5]}.{hint}"
    )
    if strict:
        raise KeyMappingError(msg + " Pass strict=False to load the rest.")
    warnings.warn(msg, stacklevel=4)


# -- registry ----------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A loaded adapter: its spec, where it went, its weight and state."""

    name: str
    spec: AdapterSpec
    info: AdapterInfo
    targets: list[Target]
    mode: str = "patch"
    weight: Any = 1.0  # validated by diffadapt.weights: a number, per component, or per block
    enabled: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def strength(self, component: str, module: str = "") -> float:
        """The effective strength of this adapter on one module of one component."""
        if not self.enabled:
            return 0.0
        return weights.resolve(self.weight, component, module)


@dataclass
class Registry:
    adapters: dict[str, Loaded] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __deepcopy__(self, memo):  # a copied model keeps its (patched) weights but starts a fresh registry
        return Registry()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


_ATTR = "_diffadapt_registry"


def registry(target: Any) -> Registry:
    reg = target.__dict__.get(_ATTR)
    if reg is None:
        reg = Registry()
        target.__dict__[_ATTR] = reg
    return reg


def module_device(module: nn.Module) -> torch.device:
    return module.weight.device
