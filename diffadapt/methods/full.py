"""LyCORIS full / diff: the file stores ΔW itself (``diff``) and optionally Δb (``diff_b``).

W' = W + w·diff and b' = b + w·diff_b, which is LyCORIS's own multiplier semantics for ``algo=full``.
The delta is dense, so it has no low-rank form to stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import FormatError, ShapeError
from .base import MethodDef, ParseContext, Params, PeftEntry, expect_fit, refuse, require, reshape_to


@dataclass
class FullParams(Params):
    diff: torch.Tensor | None  # ΔW, the weight's shape (Linear ↔ 1×1 conv reshapes; 1-D for norm scales)
    diff_b: torch.Tensor | None = None  # Δb, (out,); alone when a trainer only moved the bias

    additive: ClassVar[bool] = True

    def check(self, shape: torch.Size, *, where: str) -> None:
        if self.diff is not None and (self.diff.dim() == 1 or len(shape) == 1):
            if tuple(self.diff.shape) != tuple(shape):
                raise ShapeError(f"{where}: full diff is {tuple(self.diff.shape)}, the module weight is {tuple(shape)}")
        elif self.diff is not None:
            expect_fit(self.diff.shape[0], self.diff[0].numel(), shape, where=where, what="full diff")
        if self.diff is not None and self.diff.dim() > 2 and len(shape) > 2 and tuple(self.diff.shape) != tuple(shape):
            raise ShapeError(f"{where}: full diff is {tuple(self.diff.shape)}, the module weight is {tuple(shape)}")
        if self.diff_b is not None and self.diff_b.numel() != shape[0]:
            raise ShapeError(
                f"{where}: 'diff_b' has {self.diff_b.numel()} values, the module weight {tuple(shape)} has "
                f"{shape[0]} outputs"
            )

    def delta(self, shape: torch.Size) -> torch.Tensor:
        if self.diff is None:
            return torch.zeros(shape, dtype=self.diff_b.dtype, device=self.diff_b.device)
        return reshape_to(self.diff, shape)

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.diff_b is None else self.diff_b.reshape(-1)

    kohya_algo: ClassVar[str] = "full"

    def to_kohya(self, *, ndim: int | None, where: str) -> dict[str, torch.Tensor]:
        return ({"diff": self.diff} if self.diff is not None else {}) | (
            {"diff_b": self.diff_b} if self.diff_b is not None else {})

    def to_peft(self, *, kind: str | None, shape: tuple[int, ...] | None, where: str, inject: bool) -> PeftEntry:
        raise refuse(where, "full/diff weights (LyCORIS 'full') have no peft tuner")


def parse(t: dict[str, torch.Tensor], ctx: ParseContext) -> FullParams:
    """``diff`` [+ ``diff_b``] as LyCORIS ``FullModule.custom_state_dict`` writes them; ComfyUI-format files
    (Wan) also carry 1-D ``diff`` on norm scales (a ``diff_b`` alone is :func:`parse_bias`)."""
    require(t, ("diff",), where=ctx.where, method="full")
    diff, diff_b = t["diff"], t.get("diff_b")
    if diff.dim() < 1:
        raise FormatError(f"{ctx.where}: 'diff' should be a weight (out, in[, *k]) or a norm scale, got a scalar")
    if diff_b is not None and diff_b.numel() != diff.shape[0]:
        raise FormatError(
            f"{ctx.where}: 'diff_b' has {diff_b.numel()} values, 'diff' {tuple(diff.shape)} has {diff.shape[0]} outputs"
        )
    if not math.prod(diff.shape):
        raise FormatError(f"{ctx.where}: 'diff' is empty {tuple(diff.shape)}")
    return FullParams(diff=diff, diff_b=diff_b)


def parse_bias(t: dict[str, torch.Tensor], ctx: ParseContext) -> FullParams:
    """A ``diff_b`` with no ``diff``: ComfyUI-format files (Wan) for layers whose bias alone was trained."""
    require(t, ("diff_b",), where=ctx.where, method="full")
    if t["diff_b"].dim() != 1:
        raise FormatError(f"{ctx.where}: 'diff_b' should be a bias (out,), got shape {tuple(t['diff_b'].shape)}")
    return FullParams(diff=None, diff_b=t["diff_b"])


METHOD = MethodDef(
    name="full",
    suffixes=frozenset({"diff", "diff_b"}),
    markers=frozenset({"diff"}),
    parse=parse,
)


# -- fused projections (keys/fused.py): the rows of ΔW one model module takes ------------------------


def take_rows(p: FullParams, rows: torch.Tensor, shape: torch.Size, *, where: str) -> FullParams:
    """ΔW and Δb are stored whole: their rows are the module's."""
    return FullParams(diff=None if p.diff is None else p.diff[rows],
                      diff_b=None if p.diff_b is None else p.diff_b.reshape(-1)[rows])
