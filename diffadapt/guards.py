"""Result checks for patch-mode writes: a module's new weight must be finite and inside its dtype's range.

Inputs are already finite (factors at parse time, configs when read, weights when validated), so only the
arithmetic can overflow: finite factors whose product exceeds float32, or an adapter that pushes an fp16
weight past 65504. Checking every written value with ``isfinite`` would cost about a load again, so the common
case is proven from a bound instead: for a stack of low-rank adapters |ΔW| ≤ Σ |sᵢ|·rᵢ·max|Uᵢ|·max|Dᵢ|
(factors only, microseconds; LoHa and LoKr give theirs through ``Params.abs_bound``), and the weight cannot
leave the range when that plus max|W0| stays below it. max|W0| is measured once per module (one ``aminmax``
pass), and only for dtypes whose range an adapter can plausibly reach (fp16, fp8); for float32/bfloat16 the
base weights are taken to be below 2¹²⁰. What the bound does not cover (OFT, DoRA, full/diff, Tucker
LoHa/LoKr, a large bound) is checked after the write: a sum over the written values (one read pass), and a
value scan only when that sum is not finite.
"""

from __future__ import annotations

import math

import torch

from .errors import NonFiniteError
from .methods.base import product_bound

WIDE = 2.0 ** 120  # a base weight above this is not a model a float32/bfloat16 adapter is written for


def _range(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float8 has no reductions on CPU: such weights are read in float32."""
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def _w0_max(slot) -> float:
    cached = getattr(slot, "_w0_absmax", None)
    if cached is None:
        w0 = _wide(slot.original.detach())
        lo, hi = torch.aminmax(w0) if w0.numel() else (torch.zeros(()), torch.zeros(()))  # one pass, no |W0| copy
        cached = max(-float(lo), float(hi))
        slot._w0_absmax = cached
    return cached


def _bound(live) -> float | None:
    """An upper bound of |ΔW| for a stack of low-rank additive entries; None when one is not low-rank."""
    total = 0.0
    for e in live:
        if not e.params.is_additive or e.params.bias_delta() is not None:
            return None
        f = e.params.lowrank()
        if f is not None:
            u, d = f
            total += abs(e.strength) * product_bound(u, d)
            continue
        b = e.params.abs_bound()  # LoHa, LoKr: from their factors
        if b is None:
            return None
        total += abs(e.strength) * b
    return total


def _finite(t: torch.Tensor) -> bool:
    """A finite sum proves every value finite (one read pass, no mask); only a non-finite sum needs the scan."""
    t = _wide(t)
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def needs_scan(slot) -> bool:
    """Before a write (W0 still readable): False when the bound proves the result finite and in range."""
    live = [e for e in slot.entries if e.strength != 0.0]
    if not live:
        return False
    limit = _range(slot.original.dtype)
    bound = _bound(live)
    if bound is None or not math.isfinite(bound):
        return True
    base = _w0_max(slot) if limit < WIDE * 2 else WIDE
    return not bound + base < 0.5 * limit


def check_written(slot, weight: torch.Tensor, bias: torch.Tensor | None, *, scan: bool = True) -> None:
    """After a write: with ``scan`` (from :func:`needs_scan`), raise NonFiniteError naming the module if
    ``weight`` (or ``bias``) is not finite in the model's dtype."""
    if not scan or (_finite(weight) and (bias is None or _finite(bias))):
        return
    names = ", ".join(sorted({e.name for e in slot.entries if e.strength != 0.0}))
    raise NonFiniteError(
        f"{getattr(slot, 'label', '') or type(slot.module).__name__}: adapter(s) {names} would write "
        f"values that are not finite in {str(slot.original.dtype).removeprefix('torch.')} "
        f"(overflow: factors or weights too large for the model's dtype); nothing was changed"
    )
