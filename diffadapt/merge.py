"""Merging several loaded adapters into one LoRA that every tool can load.

Methods (``weights`` as in ``diffadapt.weights``: per adapter, component or block):
  cat     exact: ranks concatenated (LoRA family only, Tucker cores block-diagonal);
  svd     the stack's own ΔW per module — compose(W0, sources at their weights, in load order) − W0, so
          transforms (OFT, DoRA) act on the sum exactly as in the stacked model — truncated SVD to ``rank``
          (default: the sources' ranks added up, lossless for LoRA sources); any mix of methods;
  linear  peft's factor-wise rule (``add_weighted_adapter(combination_type="linear")``, same-rank LoRAs):
          A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ — not the stack (cross terms);
  ties / dare   peft's ``merge_utils`` TIES / DARE-linear on the task vectors τᵢ = compose(W0, [sourceᵢ]) − W0
          with weights wᵢ (as peft's ``ties_svd`` / ``dare_linear_svd``), then SVD to ``rank``.
The recorded error (``diffadapt_merge_rel_error``) is always measured against the stack the merge replaces,
‖ΔW_merged − ΔW_stack‖/‖ΔW_stack‖ over all modules; ``…_svd_error`` is the truncation error alone. Modules
go in the model's order and DARE draws its masks under ``torch.random.fork_rng`` seeded with ``seed``, so the
same seed gives peft's masks, and no random state (CPU or any CUDA device) changes.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .compose import Term, composed_delta
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


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Every RNG (CPU and each CUDA device) seeded inside, restored after: the caller's streams stay as they were."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _device(base: torch.Tensor) -> torch.device | None:
    return base.device if base.device.type != "meta" else None


def _terms(sources: list[Source], *, unit: bool = False) -> list[Term]:
    return [Term(s.params.to(device=_device(s.base), dtype=torch.float32), 1.0 if unit else s.strength)
            for s in sources]


def _stack_delta(sources: list[Source]) -> torch.Tensor:
    """ΔW of the whole stack on this module; transforms need the base model's values."""
    terms = _terms(sources)
    if any(not t.params.is_additive for t in terms) and sources[0].base.device.type == "meta":
        kinds = sorted({type(t.params).__name__ for t in terms if not t.params.is_additive})
        raise UnsupportedError(f"merging {', '.join(kinds)} (OFT / DoRA) needs the base model's weights; "
                               "pass a real model")
    if any(t.params.bias_delta() is not None for t in terms):
        raise UnsupportedError("an adapter with a bias delta ('diff_b') cannot be merged into a LoRA, which has "
                               "no bias; merge without it")
    return composed_delta(sources[0].base, sources[0].base.shape, terms)


def _task_vectors(sources: list[Source]) -> list[torch.Tensor]:
    """τᵢ = compose(W0, [sourceᵢ at strength 1]) − W0, the task vectors peft's TIES / DARE weight."""
    base = sources[0].base
    return [composed_delta(base, base.shape, [t]) for t in _terms(sources, unit=True)]


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
    """peft's ``combination_type="linear"``: √|w·s| on both factors, the sign on A."""
    if not all(isinstance(s.params, LoRAParams) and s.params.mid is None and s.params.is_additive for s in sources):
        raise UnsupportedError("merge 'linear' combines LoRA factors; every adapter must be a plain LoRA")
    ranks = {s.params.rank for s in sources}
    if len(ranks) > 1:
        raise UnsupportedError(f"merge 'linear' needs equal ranks, got {sorted(ranks)}; use 'cat' or 'svd'")
    ps = [s.params.to(dtype=torch.float32) for s in sources]
    ws = [s.strength * p.scale for p, s in zip(ps, sources)]
    down = sum(math.copysign(math.sqrt(abs(w)), w) * p.down for p, w in zip(ps, ws))
    up = sum(math.sqrt(abs(w)) * p.up for p, w in zip(ps, ws))
    return LoRAParams(down=down, up=up, alpha_value=float(down.shape[0]))


def _task_merge(method: str, sources: list[Source], *, density: float) -> torch.Tensor:
    from peft.utils import merge_utils

    weights = torch.tensor([s.strength for s in sources], dtype=torch.float32)
    tasks = _task_vectors(sources)
    if method == "ties":
        return merge_utils.ties(tasks, weights.to(tasks[0].device), density)
    return merge_utils.dare_linear(tasks, weights.to(tasks[0].device), density)


@dataclass
class MergeResult:
    params: dict[tuple[str, str], LoRAParams]
    error: float  # against the stack, all modules together
    worst: float  # against the stack, the worst module
    svd_error: float  # the SVD truncation alone (0 for cat / linear)

    def metadata(self) -> dict[str, str]:
        return {
            "diffadapt_merge_rel_error": f"{self.error:.6g}",
            "diffadapt_merge_worst_module_error": f"{self.worst:.6g}",
            "diffadapt_merge_svd_error": f"{self.svd_error:.6g}",
        }


def merge_modules(
    groups: dict[tuple[str, str], list[Source]], *, method: str, rank: int | None, density: float, seed: int
) -> MergeResult:
    """Merge per module (``groups`` in the model's module order, sources in load order)."""
    if method not in METHODS:
        raise DiffAdaptError(f"merge method {method!r}: choose one of {METHODS}")
    out: dict[tuple[str, str], LoRAParams] = {}
    num = den = worst = snum = sden = 0.0
    with seeded(seed):
        for key, sources in groups.items():
            stack = _stack_delta(sources)
            fitted = stack
            if method == "cat":
                merged = _cat(sources)
            elif method == "linear":
                merged = _linear(sources)
            else:
                # default rank: the sources' ranks added up, which keeps a LoRA-only svd lossless
                default = sum((s.params.rank or 16) for s in sources)
                if method != "svd":
                    fitted = _task_merge(method, sources, density=density)
                merged, _ = _lora_from_matrix(fitted, rank or default)
            approx = merged.to(device=stack.device).delta(stack.shape)
            e2, t2 = float((approx - stack).square().sum()), float(stack.square().sum())
            num, den = num + e2, den + t2
            worst = max(worst, math.sqrt(e2 / t2) if t2 > 0 else 0.0)
            snum += float((approx - fitted).square().sum())
            sden += float(fitted.square().sum())
            out[key] = merged.to(device="cpu")
    return MergeResult(out, math.sqrt(num / den) if den > 0 else 0.0, worst,
                       math.sqrt(snum / sden) if sden > 0 else 0.0)


def collect(loaded_list: list[Any], weights: dict[str, Any]) -> dict[tuple[str, str], list[Source]]:
    """Group the loaded adapters' targets by module, weights resolved per module: modules in the model's
    order (component by component, as ``named_modules`` lists them), sources in ``loaded_list``'s order."""
    groups: dict[tuple[str, str], list[Source]] = defaultdict(list)
    order: dict[tuple[str, str], int] = {}
    roots: dict[int, dict[str, int]] = {}
    for loaded in loaded_list:
        for t in loaded.targets:
            w = resolve_weight(weights[loaded.name], t.component, t.module_name)
            if w == 0.0:
                continue
            key = (t.component, t.module_name)
            if key not in order:
                index = roots.get(id(t.root)) if t.root is not None else None
                if index is None and t.root is not None:
                    index = roots[id(t.root)] = {n: i for i, (n, _) in enumerate(t.root.named_modules())}
                order[key] = (index or {}).get(t.module_name, 0)
            groups[key].append(Source(params=t.patch.params, strength=w, base=_base_weight(t.module)))
    comps = list(dict.fromkeys(k[0] for k in order))
    return dict(sorted(groups.items(), key=lambda kv: (comps.index(kv[0][0]), order[kv[0]])))


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
    records the method, sources, rank and the relative error against the stack the sources made
    (compose(W0, sources in load order at these weights)).
    """
    from . import mixing
    from .info import summarize
    from .pipeline import Loaded, registry, resolve
    from .transaction import writing
    from .weights import validate

    reg = registry(target)
    with reg.lock:
        order = list(reg.adapters)  # load order: the order the stack composes in
        loaded = sorted(mixing.lookup(target, list(weights)), key=lambda a: order.index(a.name))
        if name in reg.adapters:
            raise DiffAdaptError(f"an adapter named '{name}' is already loaded")
        counts = mixing.component_counts(target)
        checked = {n: validate(w, where=f"merge weight of '{n}'", counts=counts) for n, w in weights.items()}
        result = merge_modules(collect(loaded, checked), method=method, rank=rank, density=density, seed=seed)
        if not result.params:
            raise DiffAdaptError("nothing to merge: every weight is 0")
        ranks = sorted({p.rank for p in result.params.values()})
        metadata = {
            "diffadapt_merge_method": method,
            "diffadapt_merge_sources": ", ".join(f"{a.name}:{weights[a.name]}" for a in loaded),
            "diffadapt_merge_rank": ",".join(map(str, ranks)),
            **result.metadata(),
        }
        spec = to_spec(result.params, source=f"merge({', '.join(weights)})", metadata=metadata)
        targets = resolve(target, spec)
        info = summarize(spec, name=name)
        info.weight, info.mode = 1.0, "patch"
        new = Loaded(name=name, spec=spec, info=info, targets=targets)
        with writing(reg) as tx:  # disabling the sources and loading the merge: both or neither
            if disable_sources:
                sources = [a for a in loaded if a.enabled]
                for a in sources:
                    a.enabled = False
                tx.refresh(sources)
            tx.apply(new)
            reg.adapters[name] = new
        return info


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

    Module names are resolved against ``model`` (a pipeline, module, or a built-in family name: 'sd1', 'sdxl',
    'flux', 'sd3'), by default the
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
    result = merge_modules(collect(loaded, weights), method=method, rank=rank, density=density, seed=seed)
    if not result.params:
        raise DiffAdaptError("nothing to merge: every weight is 0")
    metadata = {
        "diffadapt_merge_method": method,
        "diffadapt_merge_sources": ", ".join(f"{Path(p).name}:{w}" for p, w in sources.items()),
        **result.metadata(),
    }
    spec = to_spec(result.params, source="merge", metadata=metadata)
    return convert(spec, dest, format=to, dtype=dtype, model=target, overwrite=overwrite), result.error
