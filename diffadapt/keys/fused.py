"""Fused projections: one file module split into the model modules it stands for, exactly, per method.

Rows are assigned in the order of :class:`~diffadapt.spec.Fused` ``modules``, each module taking as many rows
as its weight has; a ``native_modulation`` file module whose target is diffusers' ``AdaLayerNormContinuous``
(which chunks (scale, shift) where the original code chunks (shift, scale)) takes its two halves exchanged.
Each method's ``take_rows`` (in ``methods/<m>.py``) returns params whose ΔW — or transform — is exactly those
rows of the whole module's.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import ShapeError, UnsupportedError
from ..methods import full, loha, lokr, lora, oft, waveft
from ..spec import ModulePatch

TAKE_ROWS = {
    lora.LoRAParams: lora.take_rows,
    loha.LoHaParams: loha.take_rows,
    lokr.LoKrParams: lokr.take_rows,
    full.FullParams: full.take_rows,
    oft.OFTParams: oft.take_rows,
    oft.PeftOFTParams: oft.take_rows_peft,
    waveft.WaveFTParams: waveft.take_rows,
}


def _continuous(root: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return type(root.get_submodule(parent)).__name__ == "AdaLayerNormContinuous" if parent else False


def split(patch: ModulePatch, names: list[str], modules: list[nn.Module], root: nn.Module, *,
          where: str) -> list[ModulePatch]:
    """One child patch per model module, params sliced to its rows; checks the whole first (ShapeError)."""
    shapes = [tuple(m.weight.shape) for m in modules]
    if len({s[1:] for s in shapes}) != 1:
        raise ShapeError(f"{where}: the fused modules {names} differ in input shape {shapes}")
    whole = torch.Size((sum(s[0] for s in shapes), *shapes[0][1:]))
    parts = " + ".join(f"{n} ({s[0]})" for n, s in zip(names, shapes))
    patch.params.check(whole, where=f"{where} (fused: {parts})")
    take = TAKE_ROWS.get(type(patch.params))
    if take is None:
        raise UnsupportedError(f"{where}: {patch.method} cannot be split into the fused modules {names}")
    children, start = [], 0
    for name, shape in zip(names, shapes):
        rows = torch.arange(start, start + shape[0])
        start += shape[0]
        if patch.fused.native_modulation and _continuous(root, name):
            half = shape[0] // 2
            rows = torch.cat([rows[half:], rows[:half]])
        params = take(patch.params, rows, whole, where=f"{where} → {name}")
        children.append(dataclasses.replace(patch, module_key=name, dotted=True, params=params, fused=None,
                                            module=name))
    return children
