"""Orthogonal fine-tuning: LyCORIS Diag-OFT / BOFT (``oft``) and PEFT's OFT (``peft_oft``).

They are different adapters that share a name:
  * LyCORIS ``oft_blocks`` (n, b, b): Q = B − Bᵀ, clamped to ‖Q‖ ≤ alpha·out when alpha > 0,
    R = (I+Q)(I−Q)⁻¹, W' = rescale ⊙ blockdiag(R)ᵀ·W — the OUTPUT axis is rotated.
    4-D ``oft_blocks`` (m, n, b, b) is BOFT: m butterfly stages, each W ← R_i·W on permuted output rows.
  * PEFT ``oft_R.weight`` (n, b(b−1)/2): the upper triangle of skew Q, R from peft's Cayley (exact solve, or
    its Cayley–Neumann series), W' = W_flat·blockdiag(R)ᵀ with W_flat = W.reshape(out, in·kh·kw) — the INPUT
    axis (peft rotates x, or the unfolded conv patch) is rotated.

Strength w (no reference defines one): Q is scaled by w before the Cayley transform (after LyCORIS's norm
clamp and PEFT's COFT projection), and LyCORIS ``rescale`` becomes 1 + w·(rescale − 1). So w = 1 is the
trained adapter, w = 0 the identity, and every w gives an orthogonal R (up to Neumann truncation).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from packaging.version import InvalidVersion, Version

from ..errors import FormatError, ShapeError, UnsupportedError
from .base import MethodDef, ParseContext, Params, PeftEntry, config_value, kernel, kohya_scalar, refuse, require, \
    scalar

# -- LyCORIS math ------------------------------------------------------------------------------------


def lycoris_rotations(blocks: torch.Tensor, constraint: float, weight: float) -> torch.Tensor:
    """R = (I+Q)(I−Q)⁻¹ per block, Q = w·clamp(B − Bᵀ); the clamp is over the whole tensor, as LyCORIS."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * constraint / norm
    q = q * weight
    eye = torch.eye(blocks.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def diag_oft_weight(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """blockdiag(R)ᵀ·W on the output axis: W'[k·b+m] = Σ_n R[k,n,m]·W[k·b+n]."""
    n, b, _ = r.shape
    return torch.einsum("knm,kn...->km...", r, w.reshape(n, b, *w.shape[1:])).reshape(w.shape)


def butterfly_weight(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """BOFT: stage i permutes output rows with stride 2^i·b/2, applies R_i blockwise, and permutes back."""
    m, _, b, _ = r.shape
    x = w
    for i in range(m):
        k = 2**i * (b // 2)
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("bij,bj...->bi...", r[i], x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return x


# -- PEFT math ---------------------------------------------------------------------------------------


def peft_skew(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """(n, b(b−1)/2) upper triangles → (n, b, b) skew-symmetric Q."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    q = torch.zeros(vec.shape[0], block_size, block_size, dtype=vec.dtype, device=vec.device)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def coft_project(q: torch.Tensor, eps: float) -> torch.Tensor:
    """COFT: each block's ‖Q‖ is limited to eps/√n (peft's ``_project_batch``)."""
    limit = eps * 1 / torch.sqrt(torch.tensor(float(q.shape[0]), device=q.device))
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    return torch.where(norm <= limit, q, limit * (q / norm))


def peft_cayley(q: torch.Tensor, *, neumann: bool, terms: int, legacy: bool = False) -> torch.Tensor:
    """peft's R: exact (I−Q)(I+Q)⁻¹, or its truncated series for (I+Q)(I−Q)⁻¹, term for term.

    peft ≥ 0.18: I + 2Q + 2Q² + … + 2Q^(t−2) + Q^(t−1), where t = 3 gives the same as t = 4;
    ``legacy`` (peft 0.16–0.17): I + 2Q + … + 2Q^(t−1).
    """
    n, b, _ = q.shape
    if not neumann:
        eye = torch.eye(b, dtype=q.dtype, device=q.device).unsqueeze(0).expand(n, b, b)
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = torch.eye(b, dtype=q.dtype, device=q.device).repeat(n, 1, 1)
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            power = torch.bmm(q, q)
            r = r + 2.0 * power
            for _ in range(3, terms if legacy else terms - 1):
                power = torch.bmm(power, q)
                r = r + 2.0 * power
            if not legacy:
                r = r + torch.bmm(power, q)
    return r


def input_rotated_weight(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """W_flat·blockdiag(R)ᵀ: W'[o, k·b+j] = Σ_i W[o, k·b+i]·R[k, j, i]."""
    n, b, _ = r.shape
    return torch.einsum("oki,kji->okj", w.reshape(w.shape[0], n, b), r).reshape(w.shape)


# -- params ------------------------------------------------------------------------------------------


@dataclass
class OFTParams(Params):
    """LyCORIS Diag-OFT (3-D ``blocks``) or BOFT (4-D ``blocks``)."""

    blocks: torch.Tensor  # (n, b, b) or (m, n, b, b)
    constraint: float = 0.0  # the file's ``alpha``; the norm limit is constraint·out
    rescale: torch.Tensor | None = None  # (out,)

    additive: ClassVar[bool] = False

    @property
    def butterfly(self) -> bool:
        return self.blocks.dim() == 4

    @property
    def out_features(self) -> int:
        return self.blocks.shape[-3] * self.blocks.shape[-1]

    @property
    def rank(self) -> int:
        return int(self.blocks.shape[-3])

    @property
    def alpha(self) -> float:
        return self.constraint

    def check(self, shape: torch.Size, *, where: str) -> None:
        if self.out_features != shape[0]:
            kind = "BOFT" if self.butterfly else "OFT"
            raise ShapeError(
                f"{where}: {kind} blocks {tuple(self.blocks.shape)} rotate {self.out_features} output channels, "
                f"the module weight is {tuple(shape)} (out={shape[0]})"
            )

    def apply(self, w: torch.Tensor, weight: float) -> torch.Tensor:
        if weight == 0:
            return w.clone()
        w32 = w.float()
        r = lycoris_rotations(self.blocks.float(), self.constraint * self.out_features, weight)
        out = butterfly_weight(w32, r) if self.butterfly else diag_oft_weight(w32, r)
        if self.rescale is not None:
            scale = 1 + weight * (self.rescale.float() - 1)
            out = out * scale.reshape(-1, *[1] * (w.dim() - 1))
        return out.to(w.dtype)

    # -- writers -------------------------------------------------------------------------------------
    @property
    def kohya_algo(self) -> str:
        return "boft" if self.butterfly else "diag-oft"

    def to_kohya(self, *, ndim: int | None, where: str) -> dict[str, torch.Tensor]:
        t = {"oft_blocks": self.blocks, "alpha": kohya_scalar(self.constraint)}
        if self.rescale is not None:
            t["rescale"] = self.rescale.reshape(-1, *[1] * ((ndim or 2) - 1))
        return t

    def to_peft(self, *, kind: str | None, shape: tuple[int, ...] | None, where: str, inject: bool) -> PeftEntry:
        raise refuse(where, f"LyCORIS {'BOFT' if self.butterfly else 'Diag-OFT'} rotates the output side; peft's "
                            "OFT rotates the input side")


@dataclass
class PeftOFTParams(Params):
    """PEFT OFT: ``vec`` holds each block's upper triangle; rotates the (flattened) input axis."""

    vec: torch.Tensor  # (n, b(b−1)/2); n = 1 with block_share
    block_size: int
    use_cayley_neumann: bool
    num_cayley_neumann_terms: int = 5
    neumann_legacy: bool = False  # series of peft < 0.18
    block_share: bool = False
    coft: bool = False
    eps: float = 6e-5

    additive: ClassVar[bool] = False

    @property
    def rank(self) -> int:
        return int(self.vec.shape[0])

    def _blocks(self, in_numel: int) -> int:
        return in_numel // self.block_size if self.block_share else self.rank

    def check(self, shape: torch.Size, *, where: str) -> None:
        in_numel = math.prod(shape[1:])
        n = self._blocks(in_numel)
        if n * self.block_size != in_numel:
            layout = f"shared block of {self.block_size}" if self.block_share else f"{n} blocks of {self.block_size}"
            raise ShapeError(
                f"{where}: PEFT OFT with {layout} (oft_R {tuple(self.vec.shape)}) does not tile the module's "
                f"input of {in_numel} (weight {tuple(shape)})"
            )

    def rotations(self, in_numel: int, weight: float) -> torch.Tensor:
        q = peft_skew(self.vec.float(), self.block_size)
        if self.coft:
            q = coft_project(q, self.eps)
        r = peft_cayley(
            q * weight, neumann=self.use_cayley_neumann, terms=self.num_cayley_neumann_terms, legacy=self.neumann_legacy
        )
        return r.repeat(self._blocks(in_numel), 1, 1) if self.block_share else r

    def apply(self, w: torch.Tensor, weight: float) -> torch.Tensor:
        if weight == 0:
            return w.clone()
        r = self.rotations(math.prod(w.shape[1:]), weight)
        return input_rotated_weight(w.float(), r).to(w.dtype)

    # -- writers -------------------------------------------------------------------------------------
    def to_kohya(self, *, ndim: int | None, where: str) -> dict[str, torch.Tensor]:
        raise refuse(where, "PEFT OFT rotates the input side; LyCORIS OFT (the only OFT kohya files hold) rotates "
                            "the output side — save it in PEFT format")

    def to_peft(self, *, kind: str | None, shape: tuple[int, ...] | None, where: str, inject: bool) -> PeftEntry:
        """peft has no per-module pattern for OFT: one config's ``r`` / ``oft_block_size`` must give every module
        its block size through peft's own adjustment (``adjust_oft_parameters``), so the entry offers every
        setting that does (``oft_size``: (r, oft_block_size) pairs, this module's exact block size first)."""
        if self.neumann_legacy:
            raise refuse(where, "the Cayley-Neumann series of peft < 0.18; current peft computes another rotation")
        if kind not in (None, "linear", "conv2d"):
            raise refuse(where, f"peft's OFT has no {kind} layer")
        if inject and any(x != 1 for x in kernel(shape)):
            raise refuse(where, "peft's unmerged OFT forward on a k×k convolution is not the rotation it merges "
                                "(not even the identity at init)")
        n = math.prod(shape[1:]) if shape is not None else self.block_size * (1 if self.block_share else self.rank)
        shared = {"oft_size": oft_sizes(n, self.block_size), "use_cayley_neumann": (self.use_cayley_neumann,),
                  "num_cayley_neumann_terms": (self.num_cayley_neumann_terms,), "block_share": (self.block_share,),
                  "coft": (self.coft,), "eps": (self.eps,)}
        return PeftEntry("OFT", {"oft_R.weight": self.vec}, {}, shared)

    def weight_shape(self) -> tuple[int, ...]:
        return (1, self.block_size * (1 if self.block_share else self.rank))


def _nearest_divisor_inputs(n: int, target: int) -> list[int]:
    """Every value v that peft turns into ``target`` for a layer of n inputs: v itself when it divides n (and
    v ≤ n), else ``adjust_oft_parameters``' nearest divisor (ties go down; v ≥ n gives n)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    i = divisors.index(target)
    below = divisors[i - 1] if i else None
    above = divisors[i + 1] if i + 1 < len(divisors) else None
    out = [target]
    if below is not None:
        out += [v for v in range(target - 1, below, -1) if target - v < v - below]
    if above is not None:
        out += [v for v in range(target + 1, above) if v - target <= above - v]
    elif target == n:
        out.append(n + 1)
    return out


@functools.lru_cache(maxsize=1024)
def oft_sizes(n: int, block: int) -> tuple[tuple[int, int], ...]:
    """(r, oft_block_size) config pairs under which peft gives a layer of n inputs blocks of ``block``."""
    if n % block:
        return ((0, block),)  # not a layout peft makes; the layer build reports the mismatch
    return tuple([(0, v) for v in _nearest_divisor_inputs(n, block)] +
                 [(v, 0) for v in _nearest_divisor_inputs(n, n // block)])


# -- parsing -----------------------------------------------------------------------------------------


def parse(t: dict[str, torch.Tensor], ctx: ParseContext) -> OFTParams:
    """LyCORIS ``oft_blocks`` [+ ``alpha`` = constraint, ``rescale``]."""
    require(t, ("oft_blocks",), where=ctx.where, method="OFT")
    blocks = t["oft_blocks"]
    if blocks.dim() not in (3, 4) or blocks.shape[-1] != blocks.shape[-2] or blocks.shape[-1] < 1:
        raise FormatError(
            f"{ctx.where}: 'oft_blocks' should be (blocks, b, b) for Diag-OFT or (stages, blocks, b, b) for BOFT, "
            f"got {tuple(blocks.shape)}"
        )
    if blocks.dim() == 4:
        m, n, b, _ = blocks.shape
        if b % 2 or n % 2 ** (m - 1):
            raise FormatError(
                f"{ctx.where}: BOFT 'oft_blocks' {tuple(blocks.shape)}: {m} butterfly stages need an even block "
                f"size and a block count divisible by {2 ** (m - 1)}"
            )
    out = blocks.shape[-3] * blocks.shape[-1]
    rescale = t.get("rescale")
    if rescale is not None:
        if rescale.numel() != out:
            raise FormatError(
                f"{ctx.where}: 'rescale' has {rescale.numel()} values, 'oft_blocks' {tuple(blocks.shape)} rotates {out}"
            )
        rescale = rescale.reshape(out)
    constraint = scalar(t.get("alpha"), where=ctx.where) or 0.0
    return OFTParams(blocks=blocks, constraint=constraint, rescale=rescale)


def _older_than(version: Any, target: str) -> bool:
    """peft's own test: a config without ``peft_version`` predates 0.18, which added the field."""
    try:
        return Version(str(version).partition("@")[0]) < Version(target) if version else True
    except InvalidVersion:
        return True


def parse_peft(t: dict[str, torch.Tensor], ctx: ParseContext) -> PeftOFTParams:
    """PEFT ``oft_R.weight``; the Cayley variant, COFT and block sharing come from the adapter config."""
    if "oft_r" in t or "oft_s" in t:
        raise UnsupportedError(
            f"{ctx.where}: 'oft_r'/'oft_s' is the OFT layout of peft < 0.14, which current peft cannot load either"
        )
    require(t, ("oft_R.weight",), where=ctx.where, method="PEFT OFT")
    vec = t["oft_R.weight"]
    if ctx.config is None:
        raise FormatError(f"{ctx.where}: PEFT OFT needs its adapter config (use_cayley_neumann, coft, block_share)")
    cfg, where = ctx.config, ctx.where
    if vec.dim() != 2 or vec.shape[0] < 1:
        raise FormatError(f"{where}: 'oft_R.weight' should be (blocks, b(b-1)/2), got {tuple(vec.shape)}")
    b = (1 + math.isqrt(1 + 8 * vec.shape[1])) // 2
    if b * (b - 1) // 2 != vec.shape[1]:
        raise FormatError(f"{where}: 'oft_R.weight' rows have {vec.shape[1]} values, not b(b-1)/2 for any b")
    neumann = config_value(cfg, "use_cayley_neumann", bool, where=where)
    legacy = neumann and _older_than(cfg.get("peft_version"), "0.18")
    if legacy:
        warnings.warn("Cayley-Neumann OFT from peft < 0.18 (no or old 'peft_version'): using that version's series")
    return PeftOFTParams(
        vec=vec,
        block_size=b,
        use_cayley_neumann=neumann,
        num_cayley_neumann_terms=config_value(cfg, "num_cayley_neumann_terms", int, where=where, default=5),
        neumann_legacy=legacy,
        block_share=config_value(cfg, "block_share", bool, where=where, default=False),
        coft=config_value(cfg, "coft", bool, where=where, default=False),
        eps=config_value(cfg, "eps", float, where=where, default=6e-5),
    )


METHOD = MethodDef(
    name="oft",
    suffixes=frozenset({"oft_blocks", "rescale", "alpha"}),
    markers=frozenset({"oft_blocks"}),
    parse=parse,
)

PEFT_METHOD = MethodDef(
    name="peft_oft",
    suffixes=frozenset({"oft_R.weight", "oft_r", "oft_s"}),
    markers=frozenset({"oft_R.weight", "oft_r"}),
    parse=parse_peft,
    peft_type="OFT",
)


# -- fused projections (keys/fused.py): the rows of ΔW one model module takes ------------------------


def take_rows(p: OFTParams, rows: torch.Tensor, shape: torch.Size, *, where: str) -> OFTParams:
    """Diag-OFT rotates output rows in blocks of b: whole blocks belong to one fused module. The norm clamp
    is over the whole Q, so it is applied here (Q scales linearly with the blocks) and the parts get none."""
    import dataclasses

    if p.butterfly:
        raise UnsupportedError(f"{where}: BOFT's butterfly stages mix rows across the fused modules; "
                               "it cannot be split into them")
    n, b, _ = p.blocks.shape
    blocks = rows.reshape(-1, b) if rows.numel() % b == 0 else None
    if blocks is None or not (bool((blocks[:, 0] % b == 0).all()) and torch.equal(
            blocks - blocks[:, :1], torch.arange(b, device=rows.device).expand_as(blocks))):
        raise UnsupportedError(f"{where}: OFT blocks of {b} rows straddle the fused modules' row boundaries")
    factor = 1.0
    if p.constraint > 0:
        q = p.blocks.float() - p.blocks.float().transpose(-1, -2)
        norm, limit = float(torch.norm(q)) + 1e-8, p.constraint * p.out_features
        if norm > limit:
            factor = limit / norm
    return dataclasses.replace(p, blocks=p.blocks[blocks[:, 0] // b] * factor, constraint=0.0,
                               rescale=None if p.rescale is None else p.rescale.reshape(-1)[rows])


def take_rows_peft(p: PeftOFTParams, rows: torch.Tensor, shape: torch.Size, *, where: str) -> PeftOFTParams:
    """PEFT OFT rotates the input side (W·Rᵀ): every row keeps the same rotation."""
    return p
