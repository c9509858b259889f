"""The one composition rule: what a stack of adapters makes of one module's weight.

Every place that needs the adapted weight calls :func:`compose` — the patch backend when it writes a module,
``merge`` for the target it approximates and the error it reports, checks that compare modes. The rule
(docs/design.md, "Composition and strength"), in float32:

  1. W = W0 + Σ sᵢ·ΔWᵢ over every additive adapter — low-rank ones in one ``addmm`` over their concatenated
     factors, LoHa / LoKr fused into the add (``addcmul``), dense ones added;
  2. then each transform (OFT rotation, DoRA re-normalisation) acts on that sum, in stack (load) order;
  3. biases: b = b0 + Σ sᵢ·Δbᵢ (full/diff ``diff_b``).

Entries with strength 0 are skipped, so a stack of zeros gives back W0 itself (the same tensor object).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from .methods.base import Params


class Layer(Protocol):
    """One adapter on one module: anything with ``params`` and ``strength`` (the patch backend's entries)."""

    params: Params
    strength: float


@dataclass
class Term:
    """A plain :class:`Layer`, for callers that have no backend entry (merge, checks)."""

    params: Params
    strength: float = 1.0


def compose(
    w0: torch.Tensor, stack: Iterable[Layer], *, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of ``stack`` applied to ``w0`` / ``bias``, in their dtypes; the originals when nothing applies.

    Params must already sit on ``w0``'s device in float32. ``out`` (a float32 contiguous buffer of the weight's
    shape, not ``w0``) receives the first additive step directly — a single ``addmm`` or ``addcmul`` pass
    over W with no ΔW buffer or copy; the caller checks whether the returned weight is ``out``.
    """
    live = [e for e in stack if e.strength != 0.0]
    if not live:
        return w0, bias
    shape = w0.shape
    acc = None if w0.dtype == torch.float32 else w0.float()  # the running weight once we own one
    dst = out if out is not None and out.dtype == torch.float32 and out.is_contiguous() else None

    def source() -> torch.Tensor:
        return w0 if acc is None else acc

    def target() -> torch.Tensor | None:
        return acc if acc is not None else dst

    factors = [(e, e.params.lowrank()) for e in live if e.params.is_additive]
    lowrank = [(e, f) for e, f in factors if f is not None]
    if lowrank:
        u = lowrank[0][1][0] * lowrank[0][0].strength if len(lowrank) == 1 else torch.cat(
            [f[0] * e.strength for e, f in lowrank], dim=1)
        d = lowrank[0][1][1] if len(lowrank) == 1 else torch.cat([f[1] for _, f in lowrank], dim=0)
        dest = target()
        acc = torch.addmm(source().reshape(shape[0], -1), u, d,
                          out=None if dest is None else dest.view(shape[0], -1)).view(shape)
    for e, f in factors:
        if f is None:
            acc = e.params.add_to(source(), e.strength, out=target())
    w = source()
    for e in live:
        if not e.params.is_additive:
            w = e.params.apply(w, e.strength)
    bias_deltas = [(e, e.params.bias_delta()) for e in live]
    if bias is not None and any(b is not None for _, b in bias_deltas):
        b = bias.float()
        for e, db in bias_deltas:
            if db is not None:
                b = b + e.strength * db
        bias = b.to(bias.dtype)
    return w.to(w0.dtype), bias


def composed_delta(w0: torch.Tensor | None, shape: torch.Size, stack: list[Layer]) -> torch.Tensor:
    """compose(W0, stack) − W0 in float32: the one ΔW that replaces the whole stack on this module.

    An additive-only stack does not depend on W0, so it is composed onto zeros (exact, and ``w0`` may be a
    meta tensor or None); a stack with a transform needs W0's values.
    """
    if all(e.params.is_additive for e in stack):
        device = None if w0 is None or w0.device.type == "meta" else w0.device
        return compose(torch.zeros(shape, device=device), stack)[0]
    base = w0.detach().float()
    return compose(base, stack)[0] - base


__all__ = ["Layer", "Term", "compose", "composed_delta"]
