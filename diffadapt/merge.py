"""Merging several loaded adapters into one LoRA that every tool can load.

Methods (``weights`` as in ``diffadapt.weights``: per adapter, component or block):
  cat     exact: ranks concatenated (LoRA family only, Tucker cores block-diagonal);
  svd     ΔW = Σ wᵢ·ΔWᵢ per module, truncated SVD to ``rank`` (default: the sources' ranks added up,
          lossless for LoRA sources) — any mix of methods;
  linear  peft's factor-wise combination (same rank LoRAs): A = Σ √wᵢ·sᵢ·Aᵢ, B = Σ √wᵢ·Bᵢ — approximate;
  ties / dare   peft's TIES / DARE on the per-module ΔW, then SVD to ``rank`` (dare is seeded).
Transforms (OFT, DoRA) enter svd/ties/dare through their effective delta on the base weight,
apply(W0) − W0. Every merge reports its relative approximation error ‖ΔW − ΔW'‖/‖ΔW‖ (for ties/dare,
against their own merged ΔW).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DiffAdaptError, UnsupportedError
from .methods.lora import LoRAParams
from .spec import AdapterSpec, ModulePatch
from .weights import resolve as resolve_weight

METHODS = ("cat", "svd", "linear", "ties", "dare")


@dataclass
class Source:
    """One module's adapter in a merge: its params, strength and the base weight it adapts."""

    params: Any
    strength: float
    base: torch.Tensor  # the module's base weight (for transforms and shapes)


def _delta(src: Source) -> torch.Tensor:
    """The source's ΔW at its strength; only transforms need the base values (not just its shape)."""
    if src.params.is_additive:
        device = src.base.device if src.base.device.type != "meta" else None
        return src.strength * src.params.to(device=device, dtype=torch.float32).delta(src.base.shape)
    if src.base.device.type == "meta":
        raise UnsupportedError(
            f"merging a {type(src.params).__name__} (OFT / DoRA) needs the base model's weights; pass a real model"
        )
    base = src.base.detach().float()
    return src.params.to(device=base.device, dtype=torch.float32).apply(base, src.strength) - base


def _lora_from_matrix(delta: torch.Tensor, rank: int) -> tuple[LoRAParams, float]:
    """Best rank-r LoRA of ΔW (truncated SVD), and its relative error."""
    shape = delta.shape
    m = delta.reshape(shape[0], -1)
    rank = max(1, min(rank, *m.shape))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).contiguous()
    down = (root[:, None] * vh[:rank]).contiguous()
    total = float(s.square().sum())
    err = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
    if len(shape) > 2:
        up = up.reshape(shape[0], rank, *[1] * (len(shape) - 2))
        down = down.reshape(rank, *shape[1:])
    return LoRAParams(down=down, up=up, alpha_value=float(rank)), err


def _cat(sources: list[Source]) -> LoRAParams:
    if not all(isinstance(s.params, LoRAParams) and s.params.is_additive for s in sources):
        raise UnsupportedError("merge 'cat' is exact only for LoRA/LoCon adapters (no DoRA); use 'svd'")
    tucker = {s.params.mid is not None for s in sources}
    if len(tucker) > 1:
        raise UnsupportedError("merge 'cat' cannot mix Tucker (lora_mid) and plain LoCon on one module; use 'svd'")
    ps = [s.params.to(dtype=torch.float32) for s in sources]
    ups = [p.up * (s.strength * p.scale) for p, s in zip(ps, sources)]
    up, down = torch.cat(ups, dim=1), torch.cat([p.down for p in ps], dim=0)
    mid = None
    if tucker == {True}:
        mid = torch.zeros(up.shape[1], down.shape[0], *ps[0].mid.shape[2:])
        o = 0
        for p in ps:
            r = p.rank
            mid[o:o + r, o:o + r] = p.mid
            o += r
    return LoRAParams(down=down, up=up, mid=mid, alpha_value=float(down.shape[0]))


def _linear(sources: list[Source]) -> LoRAParams:
    if not all(isinstance(s.params, LoRAParams) and s.params.mid is None and s.params.is_additive for s in sources):
        raise UnsupportedError("merge 'linear' combines LoRA factors; every adapter must be a plain LoRA")
    ranks = {s.params.rank for s in sources}
    if len(ranks) > 1:
        raise UnsupportedError(f"merge 'linear' needs equal ranks, got {sorted(ranks)}; use 'cat' or 'svd'")
    if any(s.strength < 0 for s in sources):
        raise UnsupportedError("merge 'linear' takes √weight of each factor; negative weights need 'cat' or 'svd'")
    ps = [s.params.to(dtype=torch.float32) for s in sources]
    down = sum(math.sqrt(s.strength) * p.scale * p.down for p, s in zip(ps, sources))
    up = sum(math.sqrt(s.strength) * p.up for p, s in zip(ps, sources))
    return LoRAParams(down=down, up=up, alpha_value=float(down.shape[0]))


def _task_merge(method: str, deltas: list[torch.Tensor], *, density: float) -> torch.Tensor:
    from peft.utils import merge_utils

    ones = torch.ones(len(deltas))  # strengths are already in the deltas
    if method == "ties":
        return merge_utils.ties(deltas, ones, density)
    return merge_utils.dare_linear(deltas, ones, density)


def merge_modules(
    groups: dict[tuple[str, str], list[Source]], *, method: str, rank: int | None, density: float, seed: int
) -> tuple[dict[tuple[str, str], LoRAParams], float, float]:
    """Merge per module; returns (LoRA params by (component, module), relative error, worst module error)."""
    if method not in METHODS:
        raise DiffAdaptError(f"merge method {method!r}: choose one of {METHODS}")
    out: dict[tuple[str, str], LoRAParams] = {}
    num = den = worst = 0.0
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for key, sources in groups.items():
            deltas = [_delta(s) for s in sources]
            target = sum(deltas)
            if method == "cat":
                merged = _cat(sources)
            elif method == "linear":
                merged = _linear(sources)
            else:
                # default rank: the sources' ranks added up, which keeps a LoRA-only svd lossless
                default = sum((s.params.rank or 16) for s in sources)
                if method != "svd":  # the error then measures the SVD of the TIES/DARE result
                    target = _task_merge(method, deltas, density=density)
                merged, _ = _lora_from_matrix(target, rank or default)
            approx = merged.delta(target.shape)
            e2, t2 = float((approx - target).square().sum()), float(target.square().sum())
            num, den = num + e2, den + t2
            worst = max(worst, math.sqrt(e2 / t2) if t2 > 0 else 0.0)
            out[key] = merged
    finally:
        torch.random.set_rng_state(gen_state)
    return out, (math.sqrt(num / den) if den > 0 else 0.0), worst


def collect(loaded_list: list[Any], weights: dict[str, Any]) -> dict[tuple[str, str], list[Source]]:
    """Group the loaded adapters' targets by module with the merge weights resolved per module."""
    groups: dict[tuple[str, str], list[Source]] = defaultdict(list)
    for loaded in loaded_list:
        for t in loaded.targets:
            w = resolve_weight(weights[loaded.name], t.component, t.module_name)
            if w == 0.0:
                continue
            slot_base = _base_weight(t.module)
            groups[(t.component, t.module_name)].append(Source(params=t.patch.params, strength=w, base=slot_base))
    return groups


def _base_weight(module: torch.nn.Module) -> torch.Tensor:
    from .backends.patch import existing_slot

    slot = existing_slot(module)
    return slot.original if slot is not None else module.weight.data


def to_spec(merged: dict[tuple[str, str], LoRAParams], *, source: str, metadata: dict[str, str]) -> AdapterSpec:
    patches = [
        ModulePatch(component=c, module_key=m, method="lora", params=p, fmt="diffusers", dotted=True,
                    original_key=f"{c + '.' if c else ''}{m}")
        for (c, m), p in merged.items()
    ]
    return AdapterSpec(patches=patches, fmt="diffusers", source=source, metadata=metadata)


def merge(
    target: Any,
    weights: dict[str, Any],
    name: str,
    *,
    method: str = "svd",
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
    disable_sources: bool = True,
):
    """Merge loaded adapters into one new LoRA ``name``, loaded in patch mode; returns its AdapterInfo.

    The sources stay loaded but are disabled (so the effect is not counted twice); ``info.metadata``
    records the method, sources, rank and the relative error of the approximation.
    """
    from . import api, mixing
    from .pipeline import registry
    from .weights import validate

    reg = registry(target)
    with reg.lock:
        loaded = mixing.lookup(target, list(weights))
        if name in reg.adapters:
            raise DiffAdaptError(f"an adapter named '{name}' is already loaded")
        counts = mixing.component_counts(target)
        checked = {n: validate(w, where=f"merge weight of '{n}'", counts=counts) for n, w in weights.items()}
        merged, error, worst = merge_modules(collect(loaded, checked), method=method, rank=rank,
                                             density=density, seed=seed)
        if not merged:
            raise DiffAdaptError("nothing to merge: every weight is 0")
        ranks = sorted({p.rank for p in merged.values()})
        metadata = {
            "diffadapt_merge_method": method,
            "diffadapt_merge_sources": ", ".join(f"{n}:{w}" for n, w in weights.items()),
            "diffadapt_merge_rank": ",".join(map(str, ranks)),
            "diffadapt_merge_rel_error": f"{error:.6g}",
            "diffadapt_merge_worst_module_error": f"{worst:.6g}",
        }
        spec = to_spec(merged, source=f"merge({', '.join(weights)})", metadata=metadata)
        if disable_sources:
            mixing.disable(target, *weights)
        try:
            return api.load(target, spec, name)
        except BaseException:
            if disable_sources:
                mixing.enable(target, *weights)
            raise


def merge_files(
    sources: dict[str, Any],
    dest: Any,
    *,
    method: str = "svd",
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
    to: str = "kohya",
    dtype: Any = None,
    model: Any = None,
    overwrite: bool = False,
) -> tuple[list[str], float]:
    """Merge adapter files ``{path: weight}`` into one LoRA file without loading a pipeline.

    Module names are resolved against ``model`` (a pipeline, module, or 'sd1'/'sdxl'), by default the
    first file's guessed family built on the meta device (shapes only) — enough for every additive
    method; OFT/DoRA need a real model (their delta depends on the base weights). Returns (paths, error).
    """
    from types import SimpleNamespace

    from .api import read_spec
    from .conversion import _model, architecture, convert
    from .info import guess_family
    from .pipeline import resolve
    from .weights import validate

    if not sources:
        raise DiffAdaptError("merge: no source files")
    specs = {str(p): read_spec(p) for p in sources}
    target = _model(model) if model is not None else None
    if target is None:
        family = guess_family(next(iter(specs.values())))
        target = architecture(family)
        if target is None:
            raise DiffAdaptError(f"merge: the files look made for {family}; pass model= (CLI: --model)")
    loaded = [SimpleNamespace(name=p, targets=resolve(target, spec)) for p, spec in specs.items()]
    weights = {str(p): validate(w, where=f"merge weight of {p}") for p, w in sources.items()}
    merged, error, worst = merge_modules(collect(loaded, weights), method=method, rank=rank, density=density,
                                         seed=seed)
    if not merged:
        raise DiffAdaptError("nothing to merge: every weight is 0")
    metadata = {
        "diffadapt_merge_method": method,
        "diffadapt_merge_sources": ", ".join(f"{Path(p).name}:{w}" for p, w in sources.items()),
        "diffadapt_merge_rel_error": f"{error:.6g}",
        "diffadapt_merge_worst_module_error": f"{worst:.6g}",
    }
    spec = to_spec(merged, source="merge", metadata=metadata)
    return convert(spec, dest, format=to, dtype=dtype, model=target, overwrite=overwrite), error
