"""Hotswap for inject-mode adapters without recompiling a ``torch.compile``d model.

Dynamo guards a peft layer on its factors' shapes and on float scalings by value, so a swap to another rank or
alpha would recompile. :func:`prepare` (``da.prepare_hotswap``: after loading, before compiling) therefore pads every LoRA /
LoHa factor of the adapter to ``max_rank`` with zeros — exact: zero rank components add nothing, and for
LoHa each Hadamard half ``w_a @ w_b`` is unchanged — and turns each ``scaling[adapter]`` into a 0-dim tensor,
so later swaps and re-weights are value writes. Prepared adapters stay active at strength 0 (a zero scaling),
since dropping them from the active list would change the graph.

:func:`hotswap` checks the new targets against the prepared layers first (same method and structure, rank
≤ ``max_rank``, no module the adapter does not already hold) and raises ``UnsupportedError`` changing nothing;
then copies the factors in place and zeroes those of modules the new file leaves out. Rank and alpha come per
module from the file (its rank / alpha pattern), so swaps are exact where peft's own hotswap is not (issue 3738).
LoKr, OFT, WaveFT and DoRA are refused: their structure (Kronecker split, blocks, spectrum, magnitude folding)
cannot be padded to one shape for all files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedError
from .. import peft_bridge as pl
from ..methods.base import PeftEntry
from ..peft_bridge import module_kind



@dataclass
class Prepared:
    """On a prepared adapter's state: its factors are padded to ``max_rank`` and its scalings are tensors."""

    max_rank: int


# peft tensor (checkpoint suffix) → axis that holds the rank
RANK_AXES = {"LORA": {"lora_A.weight": 0, "lora_B.weight": 1},
             "LOHA": {"hada_w1_a": 1, "hada_w1_b": 0, "hada_w2_a": 1, "hada_w2_b": 0}}
ALPHA = {"LORA": "lora_alpha", "LOHA": "alpha"}
HINT = "use mode='patch' for hotswaps of any method, or unload and load (a compiled model recompiles)"


def _unsupported(entry: PeftEntry) -> str | None:
    """Why an entry cannot be held in padded layers, or None."""
    if entry.peft_type not in RANK_AXES:
        return f"{entry.peft_type} (only LoRA and LoHa pad to one shape)"
    if "lora_magnitude_vector" in entry.tensors or entry.shared.get("use_dora", (False,))[0]:
        return "DoRA (its magnitude is folded per strength)"
    if set(entry.tensors) != set(RANK_AXES[entry.peft_type]):
        return f"{entry.peft_type} with Tucker cores"
    return None


def _get(layer: nn.Module, n: str, key: str) -> nn.Parameter:
    if key.endswith(".weight"):
        return getattr(layer, key.split(".")[0])[n].weight
    return getattr(layer, key)[n]


def _set(layer: nn.Module, n: str, key: str, value: torch.Tensor, axis: int) -> None:
    old = _get(layer, n, key)
    param = nn.Parameter(value, requires_grad=old.requires_grad)
    if not key.endswith(".weight"):
        getattr(layer, key)[n] = param
        return
    sub = getattr(layer, key.split(".")[0])[n]
    sub.weight = param
    size = value.shape[axis]
    for attr in (("out_features", "out_channels") if axis == 0 else ("in_features", "in_channels")):
        if hasattr(sub, attr):
            setattr(sub, attr, size)


def _rank(s) -> int:
    axis_key, axis = next(iter(RANK_AXES[s.peft_type].items()))
    return int(_get(s.layer, s.peft_name, axis_key).shape[axis])


# -- prepare ---------------------------------------------------------------------------------------------


def prepare(loaded_list, *, max_rank: int) -> None:
    """Pad these inject-mode adapters to ``max_rank`` (the backend hook behind ``da.prepare_hotswap``).

    Call it after loading and before ``torch.compile``: it changes parameter shapes and scaling types.
    Everything is checked before any layer is touched.
    """
    if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
    for loaded in loaded_list:
        if loaded.mode != "inject" or loaded.state is None:
            raise UnsupportedError(f"adapter '{loaded.name}' is not loaded with mode='inject'; patch-mode "
                                   "adapters hotswap without preparation")
        for s in loaded.state.sites:
            why = _unsupported(s.entry)
            if why is not None:
                raise UnsupportedError(f"{s.where}: inject-mode hotswap cannot hold {why}; {HINT}")
            base = pl.unwrap(s.layer)
            if getattr(base, "groups", 1) != 1:
                raise UnsupportedError(f"{s.where}: grouped convolution; {HINT}")
            if _rank(s) > max_rank:
                raise UnsupportedError(f"{s.where}: rank {_rank(s)} is above max_rank={max_rank}")
    for loaded in loaded_list:
        _prepare(loaded, max_rank)


@torch.no_grad()
def _prepare(loaded, max_rank: int) -> None:
    layers = {}
    with torch.inference_mode(False), torch.no_grad():
        for s in loaded.state.sites:
            layer, n = s.layer, s.peft_name
            for key, axis in RANK_AXES[s.peft_type].items():
                old = _get(layer, n, key)
                if old.shape[axis] != max_rank:
                    shape = list(old.shape)
                    shape[axis] = max_rank
                    new = old.new_zeros(shape)
                    new.narrow(axis, 0, old.shape[axis]).copy_(old)
                    _set(layer, n, key, new, axis)
            if hasattr(layer, "r"):
                layer.r[n] = max_rank
            scaling = layer.scaling[n]
            if not isinstance(scaling, torch.Tensor):
                device = _get(layer, n, next(iter(RANK_AXES[s.peft_type]))).device
                layer.scaling[n] = torch.tensor(float(scaling), dtype=torch.float32, device=device)
            pl.set_strength(s, s.strength)  # strength 0: a zero scaling, the adapter kept active
            layers[id(layer)] = layer
    for layer in layers.values():
        pl.activate(layer)
    loaded.state.hotswap = Prepared(max_rank)


# -- hotswap ---------------------------------------------------------------------------------------------


def _plan(loaded, targets) -> list[tuple[Any, PeftEntry | None, Any]]:
    """(site, new entry or None for 'zero it', new target) per site; raises before anything is written."""
    prepared = loaded.state.hotswap if loaded.state is not None else None
    if prepared is None:
        raise UnsupportedError(f"adapter '{loaded.name}' (mode='inject') was not prepared for hotswap: call "
                               "da.prepare_hotswap(pipe, max_rank=...) after loading it and before torch.compile")
    max_rank = prepared.max_rank
    sites = {(s.component, s.module_name): s for s in loaded.state.sites}
    new: dict[tuple[str, str], tuple[PeftEntry, Any]] = {}
    outside, problems = [], []
    for t in targets:
        key = (t.component, t.module_name)
        where = f"{t.component + '.' if t.component else ''}{t.module_name}"
        if key not in sites:
            outside.append(where)
            continue
        s = sites[key]
        try:
            entry = t.patch.params.to_peft(kind=module_kind(t.module), shape=tuple(t.module.weight.shape),
                            where=where, inject=True)
        except UnsupportedError as e:
            problems.append(str(e))
            continue
        why = _unsupported(entry)
        if why is not None:
            problems.append(f"{where}: {why}")
        elif entry.peft_type != s.peft_type:
            problems.append(f"{where}: {entry.peft_type} where the adapter holds {s.peft_type} layers")
        elif int(entry.values["r"]) > max_rank:
            problems.append(f"{where}: rank {entry.values['r']} is above the prepared max_rank={max_rank}")
        else:
            problems.extend(_fits(s, entry, where))
        new[key] = (entry, t)
    if outside:
        problems.insert(0, f"{len(outside)} modules the adapter has no layer on (new layers would change the "
                           f"compiled graph): {outside[:8]}")
    if problems:
        raise UnsupportedError(f"cannot hotswap inject-mode adapter '{loaded.name}' in place: "
                               + "; ".join(problems[:6]) + f"; {HINT}")
    return [(s, *new.get(k, (None, None))) for k, s in sites.items()]


def _fits(s, entry: PeftEntry, where: str) -> list[str]:
    out = []
    r = int(entry.values["r"])
    for key, axis in RANK_AXES[s.peft_type].items():
        shape = list(_get(s.layer, s.peft_name, key).shape)
        shape[axis] = r
        if entry.tensors[key].numel() != torch.Size(shape).numel():
            out.append(f"{where}: {key} of shape {tuple(entry.tensors[key].shape)} does not fit the layer's "
                       f"{tuple(shape)}")
    return out


@torch.no_grad()
def hotswap(loaded, targets) -> None:
    """Write ``targets`` (a new file's resolved targets) into the prepared layers of ``loaded`` in place."""
    plan = _plan(loaded, targets)
    with torch.inference_mode(False), torch.no_grad():
        for s, entry, t in plan:
            layer, n = s.layer, s.peft_name
            for key, axis in RANK_AXES[s.peft_type].items():
                param = _get(layer, n, key)
                param.zero_()
                if entry is not None:
                    r = int(entry.values["r"])
                    shape = list(param.shape)
                    shape[axis] = r
                    param.narrow(axis, 0, r).copy_(entry.tensors[key].reshape(shape))
            if entry is None:  # a module the new file leaves out: zero factors, kept for the compiled graph
                s.base_scaling = 0.0
            else:
                s.entry, s.params = entry, t.patch.params
                s.base_scaling = float(entry.values[ALPHA[s.peft_type]]) / float(entry.values["r"])
            s.strength = loaded.strength(s.component, s.module_name)
            pl.set_strength(s, s.strength)
