"""LoRA / LoCon: low-rank ΔW = (alpha/r)·up@down, with Tucker conv (``lora_mid``) and DoRA.

Formats: kohya / LyCORIS (``lora_down``/``lora_up``/``lora_mid``/``alpha``/``dora_scale``),
PEFT and diffusers (``lora_A``/``lora_B``, alpha from the adapter config, ``lora_magnitude_vector``),
old diffusers attention processors (``lora.down``/``lora.up``), rewritten to kohya names by ``keys``.

DoRA with strength w: W' = W + w·(m·(W+Δ)/‖W+Δ‖ − W) — exact at 1, the identity at 0 (as ComfyUI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import FormatError, ShapeError
from .base import AlphaOverRank, MethodDef, ParseContext, Params, expect_fit, require, reshape_to, scalar


# -- pure math ---------------------------------------------------------------------------------------


def lora_factors(up: torch.Tensor, down: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, D) of a plain (non-Tucker) LoRA: ΔW.flatten(1) = U @ D, scale folded into U."""
    return up.flatten(1) * scale, down.flatten(1)


def lora_delta(
    up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """ΔW for LoRA/LoCon. Conv: ``down`` carries the kernel, ``up`` is 1×1; Tucker: ``mid`` carries it."""
    if mid is None:
        u, d = lora_factors(up, down, scale)
        delta = u @ d
        return delta.reshape(up.shape[0], *down.shape[1:])
    # up (out, r), mid (r, r, *k), down (r, in): ΔW[o, i, *k] = Σ up[o,a] mid[a,b,*k] down[b,i]
    delta = torch.einsum("ab...,bi,oa->oi...", mid, down.flatten(1), up.flatten(1))
    return delta * scale


def dora_norm(w: torch.Tensor, *, on_out: bool, eps: float) -> torch.Tensor:
    """‖W‖ per output row (on_out) or per input column, broadcastable against W."""
    if on_out:
        return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1)) + eps
    wt = w.transpose(0, 1)
    n = wt.reshape(wt.shape[0], -1).norm(dim=1).reshape(wt.shape[0], *[1] * (w.dim() - 1))
    return n.transpose(0, 1) + eps


def dora_apply(
    w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, weight: float, *, on_out: bool, eps: float
) -> torch.Tensor:
    """W + weight·(m·(W+Δ)/‖W+Δ‖ − W)."""
    merged = w + delta
    target = merged * (magnitude.reshape(_mag_shape(magnitude, w, on_out)) / dora_norm(merged, on_out=on_out, eps=eps))
    return w + weight * (target - w)


def _mag_shape(m: torch.Tensor, w: torch.Tensor, on_out: bool) -> tuple[int, ...]:
    if on_out:
        return (w.shape[0],) + (1,) * (w.dim() - 1)
    return (1, w.shape[1]) + (1,) * (w.dim() - 2)


class DoRA:
    """DoRA on top of an additive method (LoRA; LyCORIS "DoHa"/"DoKr"). The dataclass using it declares
    ``magnitude`` (None: plain method), ``dora_on_out`` and ``dora_eps``."""

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


# -- params ------------------------------------------------------------------------------------------


@dataclass
class LoRAParams(DoRA, AlphaOverRank, Params):
    down: torch.Tensor  # (r, in[, *k]) — or (r, in, 1, 1) with Tucker
    up: torch.Tensor  # (out, r[, 1, 1])
    mid: torch.Tensor | None = None  # (r, r, *k): Tucker LoCon
    alpha_value: float | None = None  # None ⇒ alpha = r
    magnitude: torch.Tensor | None = None  # DoRA m; (out,…) or (1, in,…)
    dora_on_out: bool = True
    dora_eps: float = 0.0
    bias: torch.Tensor | None = None  # Δb written beside the LoRA ('diff_b', ComfyUI / Wan trainers); not scaled

    additive: ClassVar[bool] = True

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.reshape(-1)

    def _in_numel(self) -> int:
        if self.mid is None:
            return self.down[0].numel()
        return self.down.shape[1] * math.prod(self.mid.shape[2:])

    def check(self, shape: torch.Size, *, where: str) -> None:
        expect_fit(self.up.shape[0], self._in_numel(), shape, where=where, what=f"LoRA (rank {self.rank})")
        self.check_magnitude(shape, where=where)
        if self.bias is not None and self.bias.numel() != shape[0]:
            raise ShapeError(f"{where}: 'diff_b' has {self.bias.numel()} values, the module has {shape[0]} outputs")

    def delta(self, shape: torch.Size) -> torch.Tensor:
        return reshape_to(lora_delta(self.up, self.down, self.mid, self.scale), shape)

    def lowrank(self):
        if self.mid is not None:
            return None
        return lora_factors(self.up, self.down, self.scale)



def parse(t: dict[str, torch.Tensor], ctx: ParseContext) -> LoRAParams:
    """Build LoRA params from kohya/LyCORIS or PEFT/diffusers key suffixes."""
    if "lora_A.weight" in t or "lora_B.weight" in t:
        require(t, ("lora_A.weight", "lora_B.weight"), where=ctx.where, method="LoRA")
        down, up = t["lora_A.weight"], t["lora_B.weight"]
        cfg = ctx.config or {}
        r = down.shape[0]
        alpha = float(cfg.get("lora_alpha", cfg.get("alpha", r)))
        if cfg.get("use_rslora"):
            alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha/√r; store the alpha/r-equivalent
        if "alpha" in t:  # a per-module alpha tensor (kohya-style trainers writing diffusers names) wins
            alpha = scalar(t["alpha"], where=ctx.where)
        mag = t.get("lora_magnitude_vector", t.get("lora_magnitude_vector.weight"))
        return LoRAParams(down=down, up=up, alpha_value=alpha, magnitude=mag, dora_on_out=True, dora_eps=0.0)

    require(t, ("lora_down.weight", "lora_up.weight"), where=ctx.where, method="LoRA")
    down, up, mid = t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight")
    if down.dim() != up.dim():
        raise FormatError(f"{ctx.where}: lora_down is {down.dim()}-D but lora_up is {up.dim()}-D")
    if up.shape[1] != down.shape[0] or (mid is not None and mid.shape[:2] != (down.shape[0], up.shape[1])):
        raise FormatError(
            f"{ctx.where}: LoRA ranks disagree: down {tuple(down.shape)}, up {tuple(up.shape)}"
            + (f", mid {tuple(mid.shape)}" if mid is not None else "")
        )
    mag = t.get("dora_scale")
    on_out = True
    if mag is not None:
        # LyCORIS >= 4 and PEFT store m as (out, 1, …); older kohya/LyCORIS files as (1, in, …)
        on_out = not (mag.dim() >= 2 and mag.shape[0] == 1 and mag.shape[1] != 1 and up.shape[0] != 1)
    return LoRAParams(
        down=down,
        up=up,
        mid=mid,
        alpha_value=scalar(t.get("alpha"), where=ctx.where),
        magnitude=mag,
        dora_on_out=on_out,
        dora_eps=torch.finfo(torch.float32).eps,
        bias=t.get("diff_b"),
    )


METHOD = MethodDef(
    name="lora",
    suffixes=frozenset(
        {
            "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
            "lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_magnitude_vector.weight", "diff_b",
        }
    ),
    markers=frozenset({"lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight"}),
    parse=parse,
    peft_type="LORA",
)


# -- fused projections (keys/fused.py): the rows of ΔW one model module takes ------------------------


def take_rows(p: LoRAParams, rows: torch.Tensor, shape: torch.Size, *, where: str) -> LoRAParams:
    """ΔW[rows] = s·up[rows] @ (mid) @ down: the down factor (and a Tucker core) is shared, ``up`` is sliced.
    DoRA on output rows normalises each row alone, so its magnitude is sliced too; on input columns the norm
    mixes every fused module's rows and cannot be split."""
    if p.magnitude is not None and not p.dora_on_out:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"{where}: DoRA normalised over input columns (old layout) spans all the fused "
                               "modules' rows; it cannot be split into them")
    import dataclasses

    mag = None if p.magnitude is None else p.magnitude[rows]
    bias = None if p.bias is None else p.bias.reshape(-1)[rows]
    return dataclasses.replace(p, up=p.up[rows], magnitude=mag, bias=bias)
