"""LoHa: ΔW = s·(w1a@w1b) ⊙ (w2a@w2b), Tucker halves for conv kernels, optional DoRA (LyCORIS "DoHa").

Formats: LyCORIS/kohya (``hada_*`` + ``alpha``, s = alpha/r with r = ``hada_w1_b.shape[0]``) and PEFT
(same suffixes, s = alpha/r from the adapter config). LyCORIS' ``merge_to``/``get_diff_weight`` apply
alpha/r twice; the math here follows its module forward, which applies it once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import FormatError, ShapeError
from .base import (AlphaOverRank, MethodDef, ParseContext, Params, PeftEntry, expect_fit, kernel, kernel_of,
                   kohya_scalar, peft_tensors, refuse, require, reshape_to, scalar)
from .dora import DoRA, dora_on_out


# -- pure math ---------------------------------------------------------------------------------------


def hada_delta(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float
) -> torch.Tensor:
    """(out, in·k) = s·(w1a@w1b) ⊙ (w2a@w2b); conv kernels ride flattened in the b factors."""
    return (w1a.flatten(1) @ w1b.flatten(1)) * (w2a.flatten(1) @ w2b.flatten(1)) * scale


def hada_add(
    w: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, value: float,
    *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """w + value·(w1a@w1b) ⊙ (w2a@w2b) in one fused pass over W (``addcmul``), no ΔW buffer."""
    rows = w.shape[0]
    dst = None if out is None else out.view(rows, -1)
    a, b = w1a.flatten(1) @ w1b.flatten(1), w2a.flatten(1) @ w2b.flatten(1)
    return torch.addcmul(w.reshape(rows, -1), a, b, value=value, out=dst).reshape(w.shape)


def tucker_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """(out, in, *k) from a Tucker core t (r, r', *k), wa (r, out), wb (r', in)."""
    return torch.einsum("ij...,jr,ip->pr...", t, wb, wa)


def hada_tucker_delta(
    t1: torch.Tensor,
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    t2: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """(out, in, *k) = s·rebuild(t1, w1a, w1b) ⊙ rebuild(t2, w2a, w2b)."""
    return tucker_rebuild(t1, w1a, w1b) * tucker_rebuild(t2, w2a, w2b) * scale


# -- params ------------------------------------------------------------------------------------------


@dataclass
class LoHaParams(DoRA, AlphaOverRank, Params):
    w1_a: torch.Tensor  # (out, r) — (r, out) with Tucker
    w1_b: torch.Tensor  # (r, in·k) — (r, in) with Tucker
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None  # (r, r, *k): Tucker conv
    t2: torch.Tensor | None = None
    alpha_value: float | None = None  # None ⇒ alpha = r (scale 1)
    magnitude: torch.Tensor | None = None  # DoRA m (LyCORIS dora_scale)
    dora_on_out: bool = True
    dora_eps: float = 0.0

    additive: ClassVar[bool] = True

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def tucker(self) -> bool:
        return self.t1 is not None

    @property
    def kernel_size(self) -> tuple[int, ...] | None:
        """The Tucker cores' kernel; None when the kernel (if any) is flattened into the b factors."""
        return kernel_of(self.t1.shape[2:]) if self.t1 is not None else None

    @property
    def out_features(self) -> int:
        return int(self.w1_a.shape[1] if self.tucker else self.w1_a.shape[0])

    def _in_numel(self) -> int:
        if self.t1 is None:
            return self.w1_b[0].numel()
        return self.w1_b.shape[1] * math.prod(self.t1.shape[2:])

    def check(self, shape: torch.Size, *, where: str) -> None:
        what = f"LoHa (rank {self.rank}, w1_a {tuple(self.w1_a.shape)}, w1_b {tuple(self.w1_b.shape)})"
        expect_fit(self.out_features, self._in_numel(), shape, where=where, what=what)
        if self.t1 is not None and (self.w1_b.shape[1] != shape[1] or self.kernel_size != kernel_of(shape[2:])):
            raise ShapeError(
                f"{where}: LoHa Tucker core {tuple(self.t1.shape)} with w1_b {tuple(self.w1_b.shape)} gives "
                f"(in={self.w1_b.shape[1]}, kernel={self.kernel_size}); module weight is {tuple(shape)}"
            )
        self.check_magnitude(shape, where=where)

    def delta(self, shape: torch.Size) -> torch.Tensor:
        if self.t1 is None:
            d = hada_delta(self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.scale)
        else:
            d = hada_tucker_delta(self.t1, self.w1_a, self.w1_b, self.t2, self.w2_a, self.w2_b, self.scale)
        return reshape_to(d, shape)

    def add_to(self, w: torch.Tensor, strength: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.t1 is not None:
            return super().add_to(w, strength, out=out)
        return hada_add(w, self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.scale * strength, out=out)

    # -- writers -------------------------------------------------------------------------------------
    kohya_algo: ClassVar[str] = "loha"

    def to_kohya(self, *, ndim: int | None, where: str) -> dict[str, torch.Tensor]:
        t = {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}
        if self.t1 is not None:
            t.update(hada_t1=self.t1, hada_t2=self.t2)
        return t | {"alpha": kohya_scalar(self.alpha)} | self.kohya_dora(ndim or 2)

    def to_peft(self, *, kind: str | None, shape: tuple[int, ...] | None, where: str, inject: bool) -> PeftEntry:
        if self.magnitude is not None:
            raise refuse(where, "LoHa with DoRA weight decomposition has no peft layer")
        if int(self.w2_b.shape[0]) != self.rank:
            raise refuse(where, f"LoHa halves of ranks {self.rank} and {int(self.w2_b.shape[0])}; peft uses one rank")
        big_kernel = any(x != 1 for x in kernel(shape))
        if self.tucker and shape is not None and not big_kernel:
            raise refuse(where, "LoHa Tucker cores on a 1×1 kernel; peft keeps Tucker only for larger kernels")
        tensors = {f"hada_{n}": getattr(self, n) for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
        if self.tucker:
            tensors.update(hada_t1=self.t1, hada_t2=self.t2)
        shared = {"use_effective_conv2d": (self.tucker,)} if big_kernel or self.tucker else {}
        return PeftEntry("LOHA", tensors, {"r": self.rank, "alpha": self.alpha}, shared)

    def weight_shape(self) -> tuple[int, ...]:
        tail = self.t1.shape[2:] if self.t1 is not None else ()
        return (self.out_features, self.w1_b.shape[1], *tail)



def _validate(t: dict[str, torch.Tensor], where: str) -> None:
    w1a, w1b, w2a, w2b = (t[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    t1, t2 = t.get("hada_t1"), t.get("hada_t2")
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(t.items()) if k.startswith("hada_"))
    if (t1 is None) != (t2 is None):
        raise FormatError(f"{where}: LoHa Tucker needs both hada_t1 and hada_t2 ({shapes})")
    if t1 is None:
        a1, b1, a2, b2 = (x.flatten(1) if x.dim() >= 2 else x for x in (w1a, w1b, w2a, w2b))
        ok = all(x.dim() == 2 for x in (a1, b1, a2, b2)) and a1.shape[1] == b1.shape[0] and a2.shape[1] == b2.shape[0]
        ok = ok and (a1.shape[0], b1.shape[1]) == (a2.shape[0], b2.shape[1])
    else:
        ok = all(x.dim() == 2 for x in (w1a, w1b, w2a, w2b)) and t1.dim() >= 3 and t2.dim() == t1.dim()
        ok = ok and t1.shape[:2] == (w1a.shape[0], w1b.shape[0]) and t2.shape[:2] == (w2a.shape[0], w2b.shape[0])
        ok = ok and t1.shape[2:] == t2.shape[2:] and w1a.shape[1] == w2a.shape[1] and w1b.shape[1] == w2b.shape[1]
    if not ok:
        raise FormatError(f"{where}: LoHa factor shapes do not fit together: {shapes}")


def parse(t: dict[str, torch.Tensor], ctx: ParseContext) -> LoHaParams:
    """Build LoHa params from LyCORIS/kohya or PEFT tensors (same suffixes; told apart by ``peft_tensors``)."""
    require(t, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), where=ctx.where, method="LoHa")
    _validate(t, ctx.where)
    rank = int(t["hada_w1_b"].shape[0])
    if peft_tensors(t, ctx):
        cfg = ctx.config
        if "dora_scale" in t:
            raise FormatError(f"{ctx.where}: PEFT LoHa has no DoRA, yet the module has 'dora_scale'")
        if cfg is None or "alpha" not in cfg:
            raise FormatError(f"{ctx.where}: a PEFT LoHa needs its adapter config (alpha, r)")
        r = int(cfg.get("r", rank))
        if r != rank:
            raise FormatError(f"{ctx.where}: PEFT config gives r={r} for this module but its tensors have rank {rank}")
        # peft: scaling = alpha / r (LoHaLayer.update_layer), applied once in get_delta_weight
        return LoHaParams(
            w1_a=t["hada_w1_a"], w1_b=t["hada_w1_b"], w2_a=t["hada_w2_a"], w2_b=t["hada_w2_b"],
            t1=t.get("hada_t1"), t2=t.get("hada_t2"), alpha_value=float(cfg["alpha"]),
        )
    alpha = scalar(t.get("alpha"), where=ctx.where)
    mag = t.get("dora_scale")
    w1a = t["hada_w1_a"]
    out = w1a.shape[1] if "hada_t1" in t else w1a.shape[0]
    return LoHaParams(
        w1_a=w1a, w1_b=t["hada_w1_b"], w2_a=t["hada_w2_a"], w2_b=t["hada_w2_b"],
        t1=t.get("hada_t1"), t2=t.get("hada_t2"),
        alpha_value=None if not alpha else alpha,  # LyCORIS reads alpha 0 as "alpha = r"
        magnitude=mag,
        dora_on_out=True if mag is None else dora_on_out(mag, out),
        dora_eps=torch.finfo(torch.float32).eps,
    )


METHOD = MethodDef(
    name="loha",
    suffixes=frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"}),
    markers=frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    parse=parse,
    peft_type="LOHA",
)


# -- fused projections (keys/fused.py): the rows of ΔW one model module takes ------------------------


def take_rows(p: LoHaParams, rows: torch.Tensor, shape: torch.Size, *, where: str) -> LoHaParams:
    """ΔW[rows] = s·(w1a[rows]@w1b) ⊙ (w2a[rows]@w2b): each Hadamard factor keeps its rows (Tucker: the a
    factors are (r, out), so their columns). DoRA as LoRA: output-row magnitudes slice, input-column ones do not."""
    import dataclasses

    if p.magnitude is not None and not p.dora_on_out:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"{where}: DoRA normalised over input columns (old layout) spans all the fused "
                               "modules' rows; it cannot be split into them")
    mag = None if p.magnitude is None else p.magnitude[rows]
    if p.t1 is not None:
        return dataclasses.replace(p, w1_a=p.w1_a[:, rows], w2_a=p.w2_a[:, rows], magnitude=mag)
    return dataclasses.replace(p, w1_a=p.w1_a[rows], w2_a=p.w2_a[rows], magnitude=mag)
