"""Params → peft: the tensors and config values peft's own tuner layers need to hold an adapter exactly.

Used twice: by the inject backend (build peft layers from a loaded file) and by the PEFT writer (the same
layers, built around empty modules, give the exact key names and shapes peft saves). Per module, a
:class:`PeftEntry` carries the PEFT-suffixed tensors, the values that become ``rank_pattern`` /
``alpha_pattern`` / ``n_frequency_pattern``, and the config fields every module of one config must share.
Modules are then grouped into as few configs as those shared fields allow (:func:`group_entries`).

Where peft's layer layout differs from the file's but the function is the same, the tensors are rewritten
exactly (Tucker ``lora_mid`` folded into ``lora_A``; LoKr factors recomposed where peft's rank rule wants a
full factor); where peft computes something else, :class:`~diffadapt.errors.UnsupportedError` says why.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnsupportedError
from ..methods.full import FullParams
from ..methods.loha import LoHaParams
from ..methods.lokr import LoKrParams, lokr_factor, lokr_tucker
from ..methods.lora import LoRAParams
from ..methods.oft import OFTParams, PeftOFTParams
from ..methods.waveft import WaveFTParams

PATTERNS = {"r": "rank_pattern", "lora_alpha": "alpha_pattern", "alpha": "alpha_pattern",
            "n_frequency": "n_frequency_pattern"}


@dataclass
class PeftEntry:
    """One module in peft terms."""

    peft_type: str  # LORA | LOHA | LOKR | OFT | WAVEFT
    tensors: dict[str, torch.Tensor]  # PEFT checkpoint suffix → tensor (reshaped to peft's layout on build)
    values: dict[str, Any] = field(default_factory=dict)  # per-module config values (become patterns)
    shared: dict[str, tuple] = field(default_factory=dict)  # config field → values it may take, preferred first


@dataclass
class Group:
    """Modules that one peft config (one peft adapter name) holds."""

    peft_type: str
    shared: dict[str, tuple]
    modules: dict[str, PeftEntry] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        return {k: v[0] for k, v in self.shared.items()}


# -- per method --------------------------------------------------------------------------------------


def _kernel(shape: tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(shape[2:]) if shape is not None and len(shape) > 2 else ()


def to_peft(params: Any, *, kind: str | None, shape: tuple[int, ...] | None, where: str, inject: bool) -> PeftEntry:
    """The peft form of one module's params; ``UnsupportedError`` when peft cannot hold them exactly."""
    for cls, fn in _CONVERTERS.items():
        if isinstance(params, cls):
            return fn(params, kind, shape, where, inject)
    raise UnsupportedError(f"{where}: {type(params).__name__} has no peft tuner")


def _fail(where: str, reason: str) -> UnsupportedError:
    return UnsupportedError(f"{where}: {reason}")


def _lora(p: LoRAParams, kind, shape, where, inject) -> PeftEntry:
    if p.bias is not None:
        raise _fail(where, "a LoRA with a bias delta ('diff_b'); peft's lora_bias scales it with the LoRA")
    if p.magnitude is not None and not p.dora_on_out:
        raise _fail(where, "DoRA normalised over the input axis (older LyCORIS/kohya files); peft's DoRA "
                           "normalises each output row")
    # Tucker LoCon: ΔW = up · (mid ×₂ down), so mid folds into a conv-shaped lora_A with the same function
    a = p.down if p.mid is None else torch.einsum("ab...,bi->ai...", p.mid, p.down.flatten(1))
    tensors = {"lora_A.weight": a, "lora_B.weight": p.up}
    if p.magnitude is not None:
        tensors["lora_magnitude_vector"] = p.magnitude.reshape(-1)
    return PeftEntry("LORA", tensors, {"r": p.rank, "lora_alpha": p.alpha}, {"use_dora": (p.magnitude is not None,)})


def _loha(p: LoHaParams, kind, shape, where, inject) -> PeftEntry:
    if p.magnitude is not None:
        raise _fail(where, "LoHa with DoRA weight decomposition has no peft layer")
    if int(p.w2_b.shape[0]) != p.rank:
        raise _fail(where, f"LoHa halves of ranks {p.rank} and {int(p.w2_b.shape[0])}; peft uses one rank")
    k = _kernel(shape)
    big_kernel = any(x != 1 for x in k)
    if p.tucker and shape is not None and not big_kernel:
        raise _fail(where, "LoHa Tucker cores on a 1×1 kernel; peft keeps Tucker only for larger kernels")
    tensors = {n: getattr(p, n.removeprefix("hada_")) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    if p.tucker:
        tensors.update(hada_t1=p.t1, hada_t2=p.t2)
    shared = {"use_effective_conv2d": (p.tucker,)} if big_kernel or p.tucker else {}
    return PeftEntry("LOHA", tensors, {"r": p.rank, "alpha": p.alpha}, shared)


@functools.lru_cache(maxsize=4096)
def _factorization(dim: int, factor: int) -> tuple[int, int]:
    from peft.tuners.lokr.layer import factorization

    return factorization(dim, factor)


def _factors(out: int, in_dim: int, a: int, b: int, c: int, d: int) -> tuple[int, ...]:
    """Every ``decompose_factor`` for which peft splits (out, in) into (a·c, b·d); -1 first."""
    cands = [-1, *sorted({a, b, c, d}), *range(1, min(max(a, b, c, d), 512) + 1)]
    return tuple(dict.fromkeys(
        f for f in cands if _factorization(out, f) == (a, c) and _factorization(in_dim, f) == (b, d)
    ))


def _lokr(p: LoKrParams, kind, shape, where, inject) -> PeftEntry:
    if p.magnitude is not None:
        raise _fail(where, "LoKr with DoRA weight decomposition has no peft layer")
    (a, b), (c, d_flat) = p.kron_shapes
    if shape is None:  # no module known: read the layout as a Linear one
        shape = (a * c, b * d_flat)
    out, in_dim, kernel = shape[0], shape[1], _kernel(shape)
    d = in_dim // b
    factors = _factors(out, in_dim, a, b, c, d) if b * d == in_dim else ()
    if not factors:
        raise _fail(where, f"LoKr factors {a}×{b} ⊗ {c}×{d} are not a split of ({out}, {in_dim}) that peft's "
                           "factorization() makes for any decompose_factor")
    w2_full = p.w2 is not None
    r = int(p.w2_b.shape[0]) if not w2_full else None
    if r is not None and r >= max(c, d) / 2:
        w2_full = True  # peft makes w2 whole at this rank: recompose it (same ΔW)
    shared: dict[str, tuple] = {"decompose_factor": factors}
    w1_keep = False
    r1 = int(p.w1_b.shape[0]) if p.w1 is None else None
    if r is None:
        if r1 is not None and max(c, d) / 2 <= r1 < max(a, b) / 2:
            r, w1_keep = r1, True
        else:  # a rank at which peft keeps w2 whole: the file's alpha when it is one (round trips keep it)
            hint = p.alpha_value if p.rank_value is None and p.alpha_value else 0
            r = int(hint) if float(hint).is_integer() and hint >= max(c, d) / 2 else max(a, b, c, d)
    elif r1 == r and r < max(a, b) / 2:
        w1_keep = True
    if w1_keep:
        shared["decompose_both"] = (True,)
    elif r < max(a, b) / 2:
        shared["decompose_both"] = (False,)
    if kind == "conv1d" and w2_full and not (p.w2 is not None and p.peft_kron):
        raise _fail(where, "a whole LoKr w2 on a Conv1d: peft's make_kron lays a 3-D w2 out differently from "
                           "LyCORIS, so the same tensors give another ΔW")
    big_kernel = any(x != 1 for x in kernel)
    # peft's rank-1 Conv1d Tucker LoKr fails in torch.kron; the same w2 as a plain (c, r) @ (r, d·k) pair
    untucker = p.tucker and not w2_full and kind == "conv1d" and r == 1
    if not w2_full and big_kernel:
        shared["use_effective_conv2d"] = (p.tucker and not untucker,)
    elif p.tucker and not w2_full:
        raise _fail(where, "LoKr Tucker core on a 1×1 kernel; peft keeps Tucker only for larger kernels")
    tensors: dict[str, torch.Tensor] = {}
    if w1_keep:
        tensors.update(lokr_w1_a=p.w1_a, lokr_w1_b=p.w1_b)
    else:
        tensors["lokr_w1"] = lokr_factor(p.w1, p.w1_a, p.w1_b)
    if w2_full:
        if p.w2 is not None:
            w2 = p.w2
        elif p.t2 is not None:
            w2 = lokr_tucker(p.t2, p.w2_a, p.w2_b)
        else:
            w2 = (p.w2_a @ p.w2_b.flatten(1)).reshape(c, d, *kernel)
        tensors["lokr_w2"] = w2
    elif untucker:  # w2[p, d, k] = Σ_i w2_a[i, p] · (Σ_j t2[i, j, k] w2_b[j, d])
        core = p.t2.reshape(*p.t2.shape[:2], -1)
        tensors.update(lokr_w2_a=p.w2_a.t(), lokr_w2_b=torch.einsum("ijk,jd->idk", core, p.w2_b).flatten(1))
    else:
        tensors.update(lokr_w2_a=p.w2_a, lokr_w2_b=p.w2_b)
        if p.t2 is not None:
            tensors["lokr_t2"] = p.t2
    return PeftEntry("LOKR", tensors, {"r": r, "alpha": p.scale * r}, shared)


def _peft_oft(p: PeftOFTParams, kind, shape, where, inject) -> PeftEntry:
    if p.neumann_legacy:
        raise _fail(where, "the Cayley-Neumann series of peft < 0.18; current peft computes another rotation")
    if kind not in (None, "linear", "conv2d"):
        raise _fail(where, f"peft's OFT has no {kind} layer")
    if inject and any(x != 1 for x in _kernel(shape)):
        raise _fail(where, "peft's unmerged OFT forward on a k×k convolution is not the rotation it merges "
                           "(not even the identity at init)")
    shared = {"oft_block_size": (p.block_size,), "use_cayley_neumann": (p.use_cayley_neumann,),
              "num_cayley_neumann_terms": (p.num_cayley_neumann_terms,), "block_share": (p.block_share,),
              "coft": (p.coft,), "eps": (p.eps,)}
    return PeftEntry("OFT", {"oft_R.weight": p.vec}, {}, shared)


def _oft(p: OFTParams, kind, shape, where, inject) -> PeftEntry:
    kind_name = "BOFT" if p.butterfly else "Diag-OFT"
    raise _fail(where, f"LyCORIS {kind_name} rotates the output side; peft's OFT rotates the input side")


def _waveft(p: WaveFTParams, kind, shape, where, inject) -> PeftEntry:
    if kind not in (None, "linear"):
        raise _fail(where, "peft's WaveFT adapts nn.Linear only")
    shared = {"scaling": (p.scaling,), "wavelet_family": (p.wavelet_family,), "use_idwt": (p.use_idwt,),
              "random_loc_seed": (p.random_loc_seed,)}
    return PeftEntry("WAVEFT", {"waveft_spectrum": p.spectrum}, {"n_frequency": int(p.spectrum.numel())}, shared)


def _full(p: FullParams, kind, shape, where, inject) -> PeftEntry:
    raise _fail(where, "full/diff weights (LyCORIS 'full') have no peft tuner")


_CONVERTERS = {LoRAParams: _lora, LoHaParams: _loha, LoKrParams: _lokr, PeftOFTParams: _peft_oft, OFTParams: _oft,
               WaveFTParams: _waveft, FullParams: _full}


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
    if group.peft_type == "OFT":
        kwargs["r"] = 0
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
