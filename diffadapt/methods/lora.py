"""LoRA / LoCon: low-rank ΔW = (alpha/r)·up@down, with Tucker conv (``lora_mid``) and DoRA.

Formats: kohya / LyCORIS (``lora_down``/``lora_up``/``lora_mid``/``alpha``/``dora_scale``),
PEFT and diffusers (``lora_A``/``lora_B``, alpha from the adapter config, ``lora_magnitude_vector``),
old diffusers attention processors (``lora.down``/``lora.up``), rewritten to kohya names by ``keys``.

DoRA (``methods/dora.py``): W' = W + w·(m·(W+Δ)/‖W+Δ‖ − W) — exact at 1, the identity at 0 (as ComfyUI).
Writers: kohya keeps every layout; peft folds a Tucker core into ``lora_A`` (same ΔW) and has no input-axis DoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import FormatError, ShapeError
from .base import (AlphaOverRank, MethodDef, ParseContext, Params, PeftEntry, expect_fit, kohya_scalar, refuse,
                   require, reshape_to, scalar)
from .dora import DoRA, dora_on_out


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

    # -- writers -------------------------------------------------------------------------------------
    kohya_algo: ClassVar[str] = "locon"

    @property
    def tucker(self) -> bool:
        return self.mid is not None

    @property
    def kohya_plain(self) -> bool:
        return self.mid is None and self.magnitude is None

    def to_kohya(self, *, ndim: int | None, where: str) -> dict[str, torch.Tensor]:
        t = {"lora_down.weight": self.down, "lora_up.weight": self.up}
        if self.mid is not None:
            t["lora_mid.weight"] = self.mid
        bias = {} if self.bias is None else {"diff_b": self.bias}
        return t | {"alpha": kohya_scalar(self.alpha)} | self.kohya_dora(ndim or self.up.dim()) | bias

    def to_peft(self, *, kind: str | None, shape: tuple[int, ...] | None, where: str, inject: bool) -> PeftEntry:
        if self.bias is not None:
            raise refuse(where, "a LoRA with a bias delta ('diff_b'); peft's lora_bias scales it with the LoRA")
        if self.magnitude is not None and not self.dora_on_out:
            raise refuse(where, "DoRA normalised over the input axis (older LyCORIS/kohya files); peft's DoRA "
                                "normalises each output row")
        # Tucker LoCon: ΔW = up · (mid ×₂ down), so mid folds into a conv-shaped lora_A with the same function
        a = self.down if self.mid is None else torch.einsum("ab...,bi->ai...", self.mid, self.down.flatten(1))
        tensors = {"lora_A.weight": a, "lora_B.weight": self.up}
        if self.magnitude is not None:
            tensors["lora_magnitude_vector"] = self.magnitude.reshape(-1)
        return PeftEntry("LORA", tensors, {"r": self.rank, "lora_alpha": self.alpha},
                         {"use_dora": (self.magnitude is not None,)})

    def weight_shape(self) -> tuple[int, ...]:
        if self.mid is not None:
            return (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])
        return (self.up.shape[0], *self.down.shape[1:])


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
    on_out = True if mag is None else dora_on_out(mag, up.shape[0])
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
