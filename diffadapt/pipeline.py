"""What a pipeline (or bare module) holds, where each patch goes, and the registry of loaded adapters."""

from __future__ import annotations

import math
import threading
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import weights
from .errors import FormatError, KeyMappingError, ShapeError
from .info import guess_family
from .peft_bridge import unwrap
from .keys import ANY, ModuleIndex
from .transaction import FairRLock
from .spec import COMPONENTS, AdapterInfo, AdapterSpec, ModulePatch

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
PATCHABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def components(target: Any) -> dict[str, nn.Module]:
    """The adaptable modules of a pipeline by component name; a bare module is the single component ''.

    A ``torch.compile``d component (``pipe.unet = torch.compile(pipe.unet)``) stands for the module it wraps.
    """
    if isinstance(target, nn.Module):
        return {"": getattr(target, "_orig_mod", target)}
    comps = getattr(target, "components", None)
    if not isinstance(comps, dict):
        raise TypeError(f"expected a diffusers pipeline or an nn.Module, got {type(target).__name__}")
    return {k: getattr(v, "_orig_mod", v) for k, v in comps.items() if k in COMPONENTS and isinstance(v, nn.Module)}


def tensor_bound(target: Any) -> int:
    """The most values one adapter tensor for this model may hold: the largest adaptable weight, or an
    OFT-style (n, b, b) block set on its widest axis. Files are checked against it from their header."""
    bound = 1
    for comp in components(target).values():
        for module in comp.modules():
            if isinstance(module, PATCHABLE):
                shape = module.weight.shape
                wide = max(shape[0], math.prod(shape[1:]))
                bound = max(bound, module.weight.numel(), wide * wide)
    return bound


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
    module: nn.Module  # the original module, under any peft wrappers inject mode put around it
    root: nn.Module | None = None  # the component the module sits in


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
    """Map every patch to a module and check shapes; raises before anything is written.

    A patch whose component the file does not name goes to the first candidate component where the
    module exists *and* fits. Keys that match nothing, or only modules of another shape, are reported
    together with a guess of the model family the file was made for.
    """
    comps = components(target)
    indexes = {name: ModuleIndex(m) for name, m in comps.items()}
    found: list[Target] = []
    missing: dict[str, list[ModulePatch]] = defaultdict(list)
    clashes: list[ShapeError] = []
    seen: dict[tuple[str, str], str] = {}
    for patch in spec.patches:
        hit, clash = None, None
        for comp in _candidates(patch.component, comps):
            name = indexes[comp].find(patch.module_key, dotted=patch.dotted)
            if name is None:
                continue
            module = unwrap(indexes[comp].modules[name])
            where = f"{spec.source}: '{patch.original_key}' → {comp + '.' if comp else ''}{name}"
            try:
                if not isinstance(module, PATCHABLE):
                    raise ShapeError(f"{where}: a {type(module).__name__} cannot be adapted (Linear and Conv only)")
                patch.params.check(module.weight.shape, where=where)
            except ShapeError as e:
                clash = clash or e
                continue
            hit = Target(patch=patch, component=comp, module_name=name, module=module, root=comps[comp])
            break
        if hit is None:
            if clash is not None:
                clashes.append(clash)
            else:
                missing[patch.component].append(patch)
            continue
        key = (hit.component, hit.module_name)
        if key in seen:
            raise FormatError(
                f"{spec.source}: keys '{seen[key]}' and '{patch.original_key}' both adapt "
                f"{hit.component + '.' if hit.component else ''}{hit.module_name}"
            )
        seen[key] = patch.original_key
        found.append(hit)
    if missing or clashes:
        _report(target, spec, found, missing, clashes, strict=strict)
    return found


def _report(target, spec, found, missing, clashes, *, strict: bool) -> None:
    file_family, model_family = guess_family(spec), pipeline_family(target)
    other_family = file_family not in ("unknown", model_family) and model_family != "unknown"
    if clashes and not missing and not other_family:
        raise clashes[0]  # a genuine shape error on a model the file is made for
    resolved_comps = Counter(t.patch.component for t in found)
    # A bare module takes the components of the file that fit it; others are skipped, not errors.
    if isinstance(target, nn.Module) and found and not clashes and all(resolved_comps.get(c, 0) == 0 for c in missing):
        warnings.warn(f"{spec.source}: skipped components {sorted(missing)} that do not fit this module", stacklevel=4)
        return
    keys = [p.original_key for ps in missing.values() for p in ps]
    hint = f" The file looks made for {file_family}" if file_family != "unknown" else ""
    if hint and other_family:
        hint += f"; the model looks like {model_family}"
    parts = []
    if keys:
        parts.append(f"{len(keys)} of {len(spec.patches)} adapter modules match no module of the model "
                     f"(components {sorted(missing)}), e.g. {keys[:5]}")
    if clashes:
        parts.append(f"{len(clashes)} match modules of another shape, e.g. {clashes[0]}")
    msg = f"{spec.source}: " + "; ".join(parts) + (hint + "." if hint else "")
    if not found:
        raise KeyMappingError(msg)
    if strict or clashes:
        raise KeyMappingError(msg + (" Pass strict=False to load the rest." if not clashes else ""))
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
    state: Any = None  # the backend's own typed record (inject: backends.inject.State); None when it keeps none
    fused: bool = False  # fuse() moved it from inject mode into the weights; unfuse() moves it back
    extra: dict[str, Any] = field(default_factory=dict)  # patch backend: modules a hotswap parked

    def strength(self, component: str, module: str = "") -> float:
        """The effective strength of this adapter on one module of one component."""
        if not self.enabled:
            return 0.0
        return weights.resolve(self.weight, component, module)


@dataclass
class Registry:
    adapters: dict[str, Loaded] = field(default_factory=dict)
    lock: FairRLock = field(default_factory=FairRLock)  # reentrant, first come first served

    def __deepcopy__(self, memo):  # a copied model keeps its (patched) weights but starts a fresh registry
        return Registry()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


_ATTR = "_diffadapt_registry"
_CREATING = threading.Lock()  # two first loads from two threads must get the same registry


def registry(target: Any) -> Registry:
    reg = target.__dict__.get(_ATTR)
    if reg is None:
        with _CREATING:
            reg = target.__dict__.get(_ATTR)
            if reg is None:
                reg = target.__dict__[_ATTR] = Registry()
    return reg


def module_device(module: nn.Module) -> torch.device:
    return module.weight.device
