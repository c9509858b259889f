"""DoRA (weight-decomposed adaptation) on top of an additive method: LoRA, LoHa ("DoHa"), LoKr ("DoKr").

W' = m·(W+ΔW)/‖W+ΔW‖, the norm over the axis the magnitude is not on. LyCORIS ≥ 4 and PEFT store m as
(out, 1, …) — one value per output row; older kohya / LyCORIS files as (1, in, …). With strength w:
W' = W + w·(m·(W+Δ)/‖W+Δ‖ − W) — exact at 1, the identity at 0 (as ComfyUI). DoRA is a transform: it acts
on the sum of every additive adapter of the module (see ``diffadapt.compose``).
"""

from __future__ import annotations

import torch

from ..errors import ShapeError


def dora_norm(w: torch.Tensor, *, on_out: bool, eps: float) -> torch.Tensor:
    """‖W‖ per output row (on_out) or per input column, broadcastable against W."""
    if on_out:
        return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1)) + eps
    wt = w.transpose(0, 1)
    n = wt.reshape(wt.shape[0], -1).norm(dim=1).reshape(wt.shape[0], *[1] * (w.dim() - 1))
    return n.transpose(0, 1) + eps


def magnitude_shape(w: torch.Tensor, on_out: bool) -> tuple[int, ...]:
    if on_out:
        return (w.shape[0],) + (1,) * (w.dim() - 1)
    return (1, w.shape[1]) + (1,) * (w.dim() - 2)


def dora_apply(
    w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, weight: float, *, on_out: bool, eps: float
) -> torch.Tensor:
    """W + weight·(m·(W+Δ)/‖W+Δ‖ − W)."""
    merged = w + delta
    target = merged * (magnitude.reshape(magnitude_shape(w, on_out)) / dora_norm(merged, on_out=on_out, eps=eps))
    return w + weight * (target - w)


def dora_on_out(magnitude: torch.Tensor, out_features: int) -> bool:
    """Which axis a file's magnitude is on: (out, 1, …) → True; older (1, in, …) → False."""
    m = magnitude
    return not (m.dim() >= 2 and m.shape[0] == 1 and m.shape[1] != 1 and out_features != 1)


def dora_scale(magnitude: torch.Tensor, *, on_out: bool, ndim: int) -> torch.Tensor:
    """The kohya / LyCORIS ``dora_scale`` tensor: (out, 1, …) on the output axis, (1, in, …) on the input axis."""
    return magnitude.reshape(-1, *[1] * (ndim - 1)) if on_out else magnitude.reshape(1, -1, *[1] * (ndim - 2))


class DoRA:
    """Mixin for the Params of an additive method. The dataclass using it declares ``magnitude`` (None: the
    plain method), ``dora_on_out`` and ``dora_eps``."""

    @property
    def is_additive(self) -> bool:
        return self.magnitude is None

    def check_magnitude(self, shape: torch.Size, *, where: str) -> None:
        if self.magnitude is None:
            return
        n = shape[0] if self.dora_on_out else shape[1]
        if self.magnitude.numel() != n:
            raise ShapeError(
                f"{where}: DoRA magnitude has {self.magnitude.numel()} values, the module weight "
                f"{tuple(shape)} has {n} on its {'out' if self.dora_on_out else 'in'} axis"
            )

    def apply(self, w: torch.Tensor, weight: float) -> torch.Tensor:
        if self.magnitude is None:
            return self.add_to(w, weight)
        return dora_apply(w, self.delta(w.shape), self.magnitude, weight, on_out=self.dora_on_out, eps=self.dora_eps)

    def kohya_dora(self, ndim: int) -> dict[str, torch.Tensor]:
        """``dora_scale`` for the kohya writer ({} without DoRA)."""
        if self.magnitude is None:
            return {}
        return {"dora_scale": dora_scale(self.magnitude, on_out=self.dora_on_out, ndim=ndim)}


__all__ = ["DoRA", "dora_apply", "dora_norm", "dora_on_out", "dora_scale", "magnitude_shape"]
