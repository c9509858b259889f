"""LoKr: ΔW = s·kron(w1, w2), each factor full or a low-rank pair, Tucker ``lokr_t2`` for conv, optional DoRA.

Scale rules (the references disagree, each file follows its own trainer's forward):
  * LyCORIS/kohya: s = alpha/r only when a factor is decomposed, r = its rank (w1's first; the trained
    module's lora_dim); with two full factors s = 1 whatever alpha says (LyCORIS writes the dim there,
    other trainers ~1e10). Such params have ``rank = alpha = None``; the written value stays in ``alpha_value``.
  * PEFT: s = alpha/r with r and alpha from the (pattern-resolved) config, full factors included.
Conv kernels live in w2 (full, flattened into ``lokr_w2_b``, or in the Tucker core); w1 is broadcast over them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import FormatError, ShapeError
from .base import MethodDef, ParseContext, Params, PeftEntry, expect_fit, kernel, kernel_of, kohya_scalar, \
    abs_max, peft_tensors, product_bound, refuse, scalar
from .dora import DoRA, dora_on_out


# -- pure math ---------------------------------------------------------------------------------------


def lokr_factor(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """A Kronecker factor: stored whole, or as a @ b with any kernel dims of b kept."""
    if full is not None:
        return full
    return (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])


def lokr_tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """w2 (c, d, *k) from a Tucker core t (r, r', *k), wa (r, c), wb (r', d)."""
    return torch.einsum("ij...,ip,jr->pr...", t, wa, wb)


def lokr_add(
    w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, value: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """w + value·kron(w1, w2) in one fused pass: W viewed as (a, c, b, d·k) against broadcast factors.

    W[i·c+j, k·d+l, …] = w1[i,k]·w2[j,l,…], so the Kronecker product never materialises.
    """
    (a, b), c = w1.shape, w2.shape[0]
    dst = None if out is None else out.view(a, c, b, -1)
    v = torch.addcmul(w.reshape(a, c, b, -1), w1.reshape(a, 1, b, 1), w2.reshape(1, c, 1, -1), value=value, out=dst)
    return v.reshape(w.shape)


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float, *, peft_kron: bool = False) -> torch.Tensor:
    """s·kron(w1, w2) with w1 broadcast over w2's kernel dims.

    peft's ``make_kron`` broadcasts only over a 4-D w2; a 3-D one (Conv1d, full w2) meets w1 through
    torch.kron's leading-dim alignment instead, a different ΔW that peft's forward then reshapes and uses.
    ``peft_kron`` reproduces that so PEFT files load as peft runs them.
    """
    if not peft_kron or w2.dim() == 4:
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
    return torch.kron(w1, w2.contiguous()) * scale


# -- params ------------------------------------------------------------------------------------------


@dataclass
class LoKrParams(DoRA, Params):
    w1: torch.Tensor | None = None  # (a, b) — or w1_a (a, r) @ w1_b (r, b)
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None  # (c, d[, *k]) — or w2_a (c, r) @ w2_b (r, d·k); Tucker: (r, c), (r, d)
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None  # (r, r, *k)
    alpha_value: float | None = None  # as written / configured; None ⇒ alpha = r
    rank_value: int | None = None  # the r that s divides by; None ⇒ s = 1 (LyCORIS, two full factors)
    peft_kron: bool = False  # reproduce peft's make_kron layout (differs for Conv1d with a full w2)
    magnitude: torch.Tensor | None = None  # DoRA m (LyCORIS dora_scale)
    dora_on_out: bool = True
    dora_eps: float = 0.0

    additive: ClassVar[bool] = True

    @property
    def rank(self) -> int | None:
        return self.rank_value

    @property
    def alpha(self) -> float | None:
        if self.rank_value is None:
            return None
        return float(self.rank_value) if self.alpha_value is None else self.alpha_value

    @property
    def scale(self) -> float:
        return 1.0 if self.rank_value is None else self.alpha / self.rank_value

    @property
    def w1_decomposed(self) -> bool:
        return self.w1 is None

    @property
    def w2_decomposed(self) -> bool:
        return self.w2 is None

    @property
    def tucker(self) -> bool:
        return self.t2 is not None

    @property
    def kron_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((a, b), (c, d)): w1 is a×b, w2 c×d; out = a·c. d counts kernel taps folded into ``lokr_w2_b``."""
        a, b = self.w1.shape if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])
        if self.w2 is not None:
            c, d = self.w2.shape[:2]
        elif self.t2 is not None:
            c, d = self.w2_a.shape[1], self.w2_b.shape[1]
        else:
            c, d = self.w2_a.shape[0], self.w2_b.shape[1]
        return (int(a), int(b)), (int(c), int(d))

    @property
    def kernel_size(self) -> tuple[int, ...] | None:
        """w2's explicit kernel (full w2 or Tucker core); None when flat or flattened into ``w2_b``."""
        k = self.t2.shape[2:] if self.t2 is not None else self.w2.shape[2:] if self.w2 is not None else ()
        return kernel_of(k) or None

    def _in_numel(self) -> int:
        (_, b), (_, d) = self.kron_shapes
        if self.t2 is not None:
            return b * d * math.prod(self.t2.shape[2:])
        w2_in = self.w2[0] if self.w2 is not None else self.w2_b[0]
        return b * w2_in.numel()

    def check(self, shape: torch.Size, *, where: str) -> None:
        (a, b), (c, d) = self.kron_shapes
        what = f"LoKr (w1 {a}×{b} ⊗ w2 {c}×{d}" + (f", kernel {self.kernel_size})" if self.kernel_size else ")")
        expect_fit(a * c, self._in_numel(), shape, where=where, what=what)
        if self.kernel_size is not None and (b * d != shape[1] or self.kernel_size != kernel_of(shape[2:])):
            raise ShapeError(f"{where}: {what} gives in={b * d}, kernel {self.kernel_size}; module weight is {tuple(shape)}")
        self.check_magnitude(shape, where=where)

    def delta(self, shape: torch.Size) -> torch.Tensor:
        w1 = lokr_factor(self.w1, self.w1_a, self.w1_b)
        w2 = lokr_tucker(self.t2, self.w2_a, self.w2_b) if self.t2 is not None else lokr_factor(self.w2, self.w2_a, self.w2_b)
        d = lokr_delta(w1, w2, self.scale, peft_kron=self.peft_kron)
        if d.numel() != math.prod(shape):
            raise ShapeError(f"LoKr gives a delta of {d.numel()} values, module weight is {tuple(shape)}")
        return d.reshape(shape)  # the flat row-major layout is what both references reshape from

    def abs_bound(self) -> float | None:
        if self.t2 is not None:
            return None
        w1 = abs_max(self.w1) if self.w1 is not None else product_bound(self.w1_a, self.w1_b)
        w2 = abs_max(self.w2) if self.w2 is not None else product_bound(self.w2_a, self.w2_b)
        return abs(self.scale) * w1 * w2  # every value of kron(w1, w2) is one product w1[i]·w2[j]

    def add_to(self, w: torch.Tensor, strength: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
        w2 = lokr_tucker(self.t2, self.w2_a, self.w2_b) if self.t2 is not None else lokr_factor(self.w2, self.w2_a, self.w2_b)
        if self.peft_kron and w2.dim() == 3:  # peft's Conv1d layout is not the broadcast Kronecker product
            return super().add_to(w, strength, out=out)
        w1 = lokr_factor(self.w1, self.w1_a, self.w1_b)
        if w1.shape[0] * w2.shape[0] != w.shape[0] or w1.shape[1] * w2[0].numel() != w[0].numel():
            raise ShapeError(f"LoKr factors {tuple(w1.shape)} ⊗ {tuple(w2.shape)} do not fit a weight {tuple(w.shape)}")
        return lokr_add(w, w1, w2, self.scale * strength, out=out)

    # -- writers -------------------------------------------------------------------------------------
    kohya_algo: ClassVar[str] = "lokr"

    def to_kohya(self, *, ndim: int | None, where: str) -> dict[str, torch.Tensor]:
        """LyCORIS scales only when a factor is decomposed: two whole factors get the scale baked into w1."""
        if self.peft_kron and self.w2 is not None and self.w2.dim() == 3:
            raise refuse(where, "peft's Conv1d LoKr with a whole w2 (make_kron layout) has no LyCORIS "
                                "equivalent — save it in PEFT format")
        t: dict[str, torch.Tensor] = {}
        decomposed = self.w1 is None or self.w2 is None
        w1 = self.w1 if decomposed or self.scale == 1.0 else self.w1 * self.scale
        if w1 is not None:
            t["lokr_w1"] = w1
        else:
            t.update(lokr_w1_a=self.w1_a, lokr_w1_b=self.w1_b)
        if self.w2 is not None:
            t["lokr_w2"] = self.w2
        else:
            t.update(lokr_w2_a=self.w2_a, lokr_w2_b=self.w2_b)
            if self.t2 is not None:
                t["lokr_t2"] = self.t2
        if decomposed:  # LyCORIS: s = alpha / r, r from the first decomposed factor
            r = int(self.w1_b.shape[0]) if self.w1 is None else int(self.w2_b.shape[0])
            t["alpha"] = kohya_scalar(self.scale * r)
        else:
            t["alpha"] = kohya_scalar(self.rank_value if self.rank_value is not None else (self.alpha_value or 1.0))
        return t | self.kohya_dora(ndim or 2)

    def to_peft(self, *, kind: str | None, shape: tuple[int, ...] | None, where: str, inject: bool) -> PeftEntry:
        """peft's LoKr layer derives its layout from (out, in), r, ``decompose_factor`` and ``decompose_both``:
        pick the settings that reproduce these factors, recomposing a factor where peft's rank rule wants it whole."""
        if self.magnitude is not None:
            raise refuse(where, "LoKr with DoRA weight decomposition has no peft layer")
        (a, b), (c, d_flat) = self.kron_shapes
        if shape is None:  # no module known: read the layout as a Linear one
            shape = (a * c, b * d_flat)
        out, in_dim, k = shape[0], shape[1], kernel(shape)
        d = in_dim // b
        factors = _factors(out, in_dim, a, b, c, d) if b * d == in_dim else ()
        if not factors:
            raise refuse(where, f"LoKr factors {a}×{b} ⊗ {c}×{d} are not a split of ({out}, {in_dim}) that peft's "
                                "factorization() makes for any decompose_factor")
        w2_full = self.w2 is not None
        r = int(self.w2_b.shape[0]) if not w2_full else None
        if r is not None and r >= max(c, d) / 2:
            w2_full = True  # peft makes w2 whole at this rank: recompose it (same ΔW)
        shared: dict[str, tuple] = {"decompose_factor": factors}
        w1_keep = False
        r1 = int(self.w1_b.shape[0]) if self.w1 is None else None
        if r is None:
            if r1 is not None and max(c, d) / 2 <= r1 < max(a, b) / 2:
                r, w1_keep = r1, True
            else:  # a rank at which peft keeps w2 whole: the file's alpha when it is one (round trips keep it)
                hint = self.alpha_value if self.rank_value is None and self.alpha_value else 0
                r = int(hint) if float(hint).is_integer() and hint >= max(c, d) / 2 else max(a, b, c, d)
        elif r1 == r and r < max(a, b) / 2:
            w1_keep = True
        if w1_keep:
            shared["decompose_both"] = (True,)
        elif r < max(a, b) / 2:
            shared["decompose_both"] = (False,)
        if kind == "conv1d" and w2_full and not (self.w2 is not None and self.peft_kron):
            raise refuse(where, "a whole LoKr w2 on a Conv1d: peft's make_kron lays a 3-D w2 out differently from "
                                "LyCORIS, so the same tensors give another ΔW")
        big_kernel = any(x != 1 for x in k)
        # peft's rank-1 Conv1d Tucker LoKr fails in torch.kron; the same w2 as a plain (c, r) @ (r, d·k) pair
        untucker = self.tucker and not w2_full and kind == "conv1d" and r == 1
        if not w2_full and big_kernel:
            shared["use_effective_conv2d"] = (self.tucker and not untucker,)
        elif self.tucker and not w2_full:
            raise refuse(where, "LoKr Tucker core on a 1×1 kernel; peft keeps Tucker only for larger kernels")
        tensors: dict[str, torch.Tensor] = {}
        if w1_keep:
            tensors.update(lokr_w1_a=self.w1_a, lokr_w1_b=self.w1_b)
        else:
            tensors["lokr_w1"] = lokr_factor(self.w1, self.w1_a, self.w1_b)
        if w2_full:
            if self.w2 is not None:
                w2 = self.w2
            elif self.t2 is not None:
                w2 = lokr_tucker(self.t2, self.w2_a, self.w2_b)
            else:
                w2 = (self.w2_a @ self.w2_b.flatten(1)).reshape(c, d, *k)
            tensors["lokr_w2"] = w2
        elif untucker:  # w2[p, d, k] = Σ_i w2_a[i, p] · (Σ_j t2[i, j, k] w2_b[j, d])
            core = self.t2.reshape(*self.t2.shape[:2], -1)
            tensors.update(lokr_w2_a=self.w2_a.t(), lokr_w2_b=torch.einsum("ijk,jd->idk", core, self.w2_b).flatten(1))
        else:
            tensors.update(lokr_w2_a=self.w2_a, lokr_w2_b=self.w2_b)
            if self.t2 is not None:
                tensors["lokr_t2"] = self.t2
        return PeftEntry("LOKR", tensors, {"r": r, "alpha": self.scale * r}, shared)

    def weight_shape(self) -> tuple[int, ...]:
        (a, b), (c, d) = self.kron_shapes
        k = self.t2.shape[2:] if self.t2 is not None else self.w2.shape[2:] if self.w2 is not None else ()
        return (a * c, b * d, *k)


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



def _pair(t: dict[str, torch.Tensor], n: str, where: str, shapes: str) -> tuple:
    full, a, b = t.get(f"lokr_w{n}"), t.get(f"lokr_w{n}_a"), t.get(f"lokr_w{n}_b")
    if full is not None and (a is not None or b is not None):
        raise FormatError(f"{where}: LoKr has both lokr_w{n} and lokr_w{n}_a/_b ({shapes})")
    if full is None and (a is None or b is None):
        raise FormatError(f"{where}: LoKr needs lokr_w{n} or both lokr_w{n}_a and lokr_w{n}_b ({shapes})")
    return full, a, b


def _validate(t: dict[str, torch.Tensor], where: str) -> tuple:
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(t.items()) if k.startswith("lokr_")) or "no lokr_ keys"
    w1, w1a, w1b = _pair(t, "1", where, shapes)
    w2, w2a, w2b = _pair(t, "2", where, shapes)
    t2 = t.get("lokr_t2")
    ok = w1.dim() == 2 if w1 is not None else (w1a.dim() == 2 and w1b.dim() == 2 and w1a.shape[1] == w1b.shape[0])
    if t2 is not None:
        ok = ok and w2 is None and w2a.dim() == 2 and w2b.dim() == 2 and t2.dim() >= 3
        ok = ok and t2.shape[:2] == (w2a.shape[0], w2b.shape[0])
    elif w2 is not None:
        ok = ok and w2.dim() >= 2
    else:
        ok = ok and w2a.dim() == 2 and w2b.dim() >= 2 and w2a.shape[1] == w2b.shape[0]
    if not ok:
        raise FormatError(f"{where}: LoKr factor shapes do not fit together: {shapes}")
    return w1, w1a, w1b, w2, w2a, w2b, t2


def parse(t: dict[str, torch.Tensor], ctx: ParseContext) -> LoKrParams:
    """Build LoKr params from LyCORIS/kohya or PEFT tensors (same suffixes; told apart by ``peft_tensors``)."""
    w1, w1a, w1b, w2, w2a, w2b, t2 = _validate(t, ctx.where)
    factors = dict(w1=w1, w1_a=w1a, w1_b=w1b, w2=w2, w2_a=w2a, w2_b=w2b, t2=t2)
    # the rank of the decomposed side, w1's first (LyCORIS: alpha/lora_dim, one dim for both sides);
    # read off the b factor, which is (r, …) in every layout, Tucker included
    tensor_rank = int(w1b.shape[0]) if w1b is not None else int(w2b.shape[0]) if w2b is not None else None
    if peft_tensors(t, ctx):
        cfg = ctx.config
        if "dora_scale" in t:
            raise FormatError(f"{ctx.where}: PEFT LoKr has no DoRA, yet the module has 'dora_scale'")
        if cfg is None or "alpha" not in cfg or "r" not in cfg:
            raise FormatError(f"{ctx.where}: a PEFT LoKr needs its adapter config (alpha, r)")
        r = int(cfg["r"])
        ranks = sorted({int(b.shape[0]) for b in (w1b, w2b) if b is not None})
        if ranks and ranks != [r]:
            raise FormatError(f"{ctx.where}: PEFT config gives r={r} for this module but its tensors have rank {ranks}")
        # peft: scaling = alpha / r (LoKrLayer.update_layer), applied by make_kron even to two full factors
        return LoKrParams(**factors, alpha_value=float(cfg["alpha"]), rank_value=r, peft_kron=True)
    alpha = scalar(t.get("alpha"), where=ctx.where)
    mag = t.get("dora_scale")
    (a, _), (c, _) = LoKrParams(**factors).kron_shapes
    return LoKrParams(
        **factors,
        alpha_value=None if not alpha else alpha,  # LyCORIS reads alpha 0 as "alpha = r"
        rank_value=tensor_rank,
        magnitude=mag,
        dora_on_out=True if mag is None else dora_on_out(mag, a * c),
        dora_eps=torch.finfo(torch.float32).eps,
    )


METHOD = MethodDef(
    name="lokr",
    suffixes=frozenset(
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"}
    ),
    markers=frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    parse=parse,
    peft_type="LOKR",
)


# -- fused projections (keys/fused.py): the rows of ΔW one model module takes ------------------------


def take_rows(p: LoKrParams, rows: torch.Tensor, shape: torch.Size, *, where: str) -> Params:
    """Rows of s·kron(w1, w2): row i·c+j is w1[i] ⊗ w2[j], so whole blocks of c rows are rows of w1 (the
    result stays a LoKr); any other cut is the exact row slice of ΔW, as ``full`` params (patch mode only)."""
    import dataclasses

    from .full import FullParams

    (_, _), (c, _) = p.kron_shapes
    aligned = rows.numel() % c == 0 and not (p.peft_kron and p.w2 is not None and p.w2.dim() == 3)
    if aligned:
        blocks = rows.reshape(-1, c)
        aligned = bool((blocks[:, 0] % c == 0).all()) and torch.equal(
            blocks - blocks[:, :1], torch.arange(c, device=rows.device).expand_as(blocks))
    mag = None if p.magnitude is None else p.magnitude[rows]
    if aligned:
        idx = rows.reshape(-1, c)[:, 0] // c
        if p.w1 is not None:
            return dataclasses.replace(p, w1=p.w1[idx], magnitude=mag)
        return dataclasses.replace(p, w1_a=p.w1_a[idx], magnitude=mag)
    if p.magnitude is not None:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"{where}: a DoRA LoKr whose Kronecker blocks ({c} rows) straddle the fused "
                               "modules cannot be split")
    return FullParams(diff=p.delta(shape)[rows])
