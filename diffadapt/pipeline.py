"""What a pipeline (or bare module) holds, where each patch goes, and the registry of loaded adapters."""

from __future__ import annotations

import math
import re
import threading
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import weights
from .errors import ComponentError, FormatError, KeyMappingError, ShapeError
from .info import guess_family
from .peft_bridge import unwrap
from .keys import ANY, ModuleIndex, dit, fused
from .transaction import FairRLock
from .spec import COMPONENTS, AdapterInfo, AdapterSpec, ModulePatch

DENOISERS = ("unet", "transformer")
EXPERTS = DENOISERS + ("transformer_2",)  # what ``into=`` may name: Wan 2.2's low-noise expert is transformer_2
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


def check_into(target: Any, into: str | None) -> str | None:
    """``into``, checked: a denoiser component this pipeline has (None: the default denoiser)."""
    if into is None:
        return None
    if isinstance(target, nn.Module):
        raise ComponentError(f"into={into!r} names a pipeline component; a bare {type(target).__name__} is adapted "
                             "as a whole (pass the pipeline, or the expert module itself)")
    have = [c for c in EXPERTS if c in components(target)]
    if into not in have:
        raise ComponentError(f"into={into!r}: {type(target).__name__} has no such denoiser component; it has {have}"
                             + (" (transformer_2 is Wan 2.2's low-noise expert)" if into == "transformer_2" else ""))
    return into


def routed(counts: dict[str, int], into: str | None, targets: list[Target]) -> dict[str, int]:
    """A file's {component: modules} as loaded with ``into``: its denoiser part is counted under ``into``, modules
    whose component the file did not name under the one they resolved in."""
    if into is None:
        return dict(counts)
    out: dict[str, int] = {}
    for comp, n in counts.items():
        if comp != ANY:
            key = into if comp in DENOISERS else comp
            out[key] = out.get(key, 0) + n
    unnamed = {t.patch.original_key: t.component for t in targets if t.patch.component == ANY}
    for comp in unnamed.values():
        out[comp] = out.get(comp, 0) + 1
    return out


def _candidates(component: str, comps: dict[str, nn.Module], into: str | None = None) -> list[str]:
    if "" in comps:
        return [""]
    if into is not None and component in DENOISERS:
        return [into]
    if into is not None and component == ANY:
        return [into] + [c for c in TEXT_ENCODERS if c in comps]
    if component in comps:
        return [component]
    if component in DENOISERS:
        return [c for c in DENOISERS if c in comps]
    if component == "text_encoder_3" and _is_t5(comps.get("text_encoder_2")):
        return ["text_encoder_2"]  # kohya's lora_te3_ / ComfyUI's t5xxl: Flux keeps T5 in text_encoder_2
    if component == ANY:
        return [c for c in DENOISERS + TEXT_ENCODERS if c in comps]
    return []


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer with a learnt scale (LayerNorm, GroupNorm, RMSNorm …): full diffs may move it."""
    w = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(w, torch.Tensor) and w.dim() == 1


class ParameterSite(nn.Module):
    """A parameter that no module holds as its weight (Wan's adaLN ``scale_shift_table``), as a module whose
    ``weight`` *is* that parameter, so full diffs write it in place like any weight. One per parameter, kept
    by the module that owns it: every adapter on it shares one patch slot (one backup)."""

    def __init__(self, param: nn.Parameter):
        super().__init__()
        self.weight = param


def _parameter_site(root: nn.Module, name: str) -> ParameterSite | None:
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = root.get_submodule(owner_name)
    except AttributeError:
        return None
    param = owner._parameters.get(attr)
    if param is None or attr in ("weight", "bias"):
        return None  # a module's own weight or bias is adapted (or refused) through the module
    sites = owner.__dict__.setdefault("_diffadapt_sites", {})
    if sites.get(attr) is None or sites[attr].weight is not param:
        sites[attr] = ParameterSite(param)
    return sites[attr]


def _is_t5(module: nn.Module | None) -> bool:
    return module is not None and type(module).__name__.startswith(("T5", "UMT5"))


def _place(patch: ModulePatch, comp: str, index: ModuleIndex, root: nn.Module, source: str) -> list[Target] | None:
    """The targets of one patch in one component; None if its module(s) are not there; ShapeError on misfit."""
    names = [index.find(m, dotted=True) for m in patch.fused.modules] if patch.fused else \
        [index.find(patch.module_key, dotted=patch.dotted)]
    if any(n is None for n in names):
        site = _parameter_site(root, patch.module_key) if patch.dotted and patch.fused is None else None
        if site is None:
            return None
        where = f"{source}: '{patch.original_key}' → {comp + '.' if comp else ''}{patch.module_key}"
        if patch.method != "full":
            raise ShapeError(f"{where}: a parameter {tuple(site.weight.shape)} outside any Linear/Conv/norm module "
                             f"takes only a full diff, not {patch.method}")
        patch.params.check(site.weight.shape, where=where)
        return [Target(patch=patch, component=comp, module_name=patch.module_key, module=site, root=root)]
    modules = [unwrap(index.modules[n]) for n in names]
    label = f"{comp + '.' if comp else ''}"
    where = f"{source}: '{patch.original_key}' → {label}{names[0] if len(names) == 1 else names}"
    for module in modules:
        if not isinstance(module, PATCHABLE) and not (_is_norm(module) and patch.method == "full"):
            raise ShapeError(f"{where}: a {type(module).__name__} cannot be adapted (Linear and Conv; norm "
                             "scales only by a full diff)")
    if patch.fused is None:
        patch.params.check(modules[0].weight.shape, where=where)
        return [Target(patch=patch, component=comp, module_name=names[0], module=modules[0], root=root)]
    children = fused.split(patch, names, modules, root, where=where)
    for child, name, module in zip(children, names, modules):
        child.params.check(module.weight.shape, where=f"{source}: '{patch.original_key}' → {label}{name}")
    return [Target(patch=c, component=comp, module_name=n, module=m, root=root)
            for c, n, m in zip(children, names, modules)]


def resolve(target: Any, spec: AdapterSpec, *, strict: bool = True, into: str | None = None) -> list[Target]:
    """Map every patch to a module and check shapes; raises before anything is written.

    ``into`` (checked by :func:`check_into`): the denoiser component that takes the file's denoiser keys —
    ``"transformer_2"`` for Wan 2.2's low-noise expert; text-encoder keys still go to the text encoders.

    A patch whose component the file does not name goes to the first candidate component where the
    module exists *and* fits. A fused file module (Flux's qkv …) becomes one target per model module,
    its params sliced to that module's rows. Keys that match nothing, or only modules of another shape,
    are reported together with the file's layout and the model family.
    """
    comps = components(target)
    indexes = {name: ModuleIndex(m) for name, m in comps.items()}
    found: list[Target] = []
    missing: dict[str, list[ModulePatch]] = defaultdict(list)
    clashes: list[ShapeError] = []
    seen: dict[tuple[str, str], str] = {}
    patches = spec.patches
    if spec.family is None and (fam := model_family(target)) in dit.TABLES:
        patches = dit.translate_patches(patches, fam)  # names several families share: the model decides
    for patch in patches:
        hits, clash = None, None
        for comp in _candidates(patch.component, comps, into):
            try:
                hits = _place(patch, comp, indexes[comp], comps[comp], spec.source)
            except ShapeError as e:
                clash = clash or e
                continue
            if hits is not None:
                break
        if hits is None:
            if clash is not None:
                clashes.append(clash)
            else:
                missing[patch.component].append(patch)
            continue
        for hit in hits:
            key = (hit.component, hit.module_name)
            if key in seen:
                raise FormatError(
                    f"{spec.source}: keys '{seen[key]}' and '{patch.original_key}' both adapt "
                    f"{hit.component + '.' if hit.component else ''}{hit.module_name}"
                )
            seen[key] = patch.original_key
            found.append(hit)
    if missing or clashes:
        _report(target, spec, found, missing, clashes, strict=strict, into=into)
    return found


def model_family(target: Any) -> str:
    """flux | sd3 | wan | qwen from the denoiser's class; else :func:`pipeline_family`."""
    comps = components(target)
    for comp in ("transformer", ""):
        fam = dit.family_of_model(comps.get(comp))
        if fam:
            return fam
    return pipeline_family(target)


def _same_family(file_family: str, model: str) -> bool:
    generic = {"dit"} | set(dit.FAMILY_NAMES)
    return file_family in ("unknown", model) or model == "unknown" or (
        (file_family == "dit" and model in generic) or (model == "dit" and file_family in generic))


def _family_label(family: str) -> str:
    return dit.FAMILY_NAMES.get(family, family)


# Keys of a model variant the target lacks: said in the error, since "matches no module" alone reads like a bug.
_VARIANTS = (
    (re.compile(r"(^|[._])(k_img|v_img|norm_k_img|img_emb)([._]|$)"),
     "Its image-branch keys (k_img, v_img, img_emb) are those of a Wan image-to-video model; this model has no "
     "image branch"),
    (re.compile(r"(^|[._])vace_"), "Its vace_ keys are those of a Wan VACE model; this model has no VACE blocks"),
)


def _variant_hint(keys: list[str]) -> str:
    return "".join(f" {text}." for pattern, text in _VARIANTS if any(pattern.search(k) for k in keys))


def _report(target, spec, found, missing, clashes, *, strict: bool, into: str | None = None) -> None:
    file_family, fam = guess_family(spec), model_family(target)
    other_family = not _same_family(file_family, fam)
    if clashes and not missing and not other_family:
        raise clashes[0]  # a genuine shape error on a model the file is made for
    resolved_comps = Counter(t.patch.component for t in found)
    # A bare module takes the components of the file that fit it; others are skipped, not errors.
    if isinstance(target, nn.Module) and found and not clashes and all(resolved_comps.get(c, 0) == 0 for c in missing):
        warnings.warn(f"{spec.source}: skipped components {sorted(missing)} that do not fit this module", stacklevel=4)
        return
    comps = components(target)
    denoiser = into or next((c for c in DENOISERS if c in comps), None)

    def shown(c: str) -> str:  # kohya's lora_unet_ names the denoiser, whatever the model calls it
        if c == ANY:
            return "none named"
        if into is not None and c in DENOISERS + (ANY,):
            return f"{into} (into=)"
        return f"{denoiser} (lora_unet_ keys)" if c == "unet" and denoiser == "transformer" else c

    keys = [p.original_key for ps in missing.values() for p in ps]
    hint = f" The file looks made for {_family_label(file_family)}" if file_family != "unknown" else ""
    if hint and other_family:
        hint += f"; the model is {_family_label(fam)}"
    parts = []
    if keys:
        parts.append(f"{len(keys)} of {len(spec.patches)} adapter modules match no module of the model "
                     f"(components {sorted(shown(c) for c in missing)}), e.g. {keys[:5]}")
    if clashes:
        parts.append(f"{len(clashes)} match modules of another shape, e.g. {clashes[0]}")
    layout = f"{spec.layout} layout; " if spec.layout else ""
    msg = f"{spec.source}: {layout}" + "; ".join(parts) + "." + (hint + "." if hint else "") + _variant_hint(keys)
    # the denoiser part of the file matching nothing is not "the rest": never load only the text encoders
    denoiser_lost = any(c in DENOISERS for c in missing) and not any(
        t.component in EXPERTS for t in found) and not isinstance(target, nn.Module)
    if not found or denoiser_lost:
        raise KeyMappingError(msg + (f" None of the file's {denoiser or 'denoiser'} modules match, so nothing "
                                     "was loaded." if found else ""))
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
    into: str | None = None  # the denoiser component its denoiser keys went to (None: the default one)
    extra: dict[str, Any] = field(default_factory=dict)  # patch backend: the backup asked for, float8 rounding

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
