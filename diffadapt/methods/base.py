"""What every adapter method provides, and helpers they share.

A method is one small module in this package holding all of it:
  * its math as pure functions on tensors (tested against the reference implementations),
  * a typed ``Params`` dataclass (the tensors of one adapted module) with the math, strength, and the
    method's writers to the other formats: ``to_kohya`` (kohya / LyCORIS suffix tensors) and ``to_peft``
    (a :class:`PeftEntry`: what peft's own tuner layer needs to hold it exactly),
  * ``parse`` from the file's tensors and a :class:`MethodDef` registered in ``methods/__init__.py``.

Backends and writers never look inside a method: they call ``params.check(shape)``, ``params.delta(shape)``
(additive methods), ``params.lowrank()`` (fast path for stacking), ``params.apply(W, weight)``,
``params.to_kohya(...)`` and ``params.to_peft(...)``. A format a method has no exact form in raises
``UnsupportedError`` naming the module; nothing is approximated.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..errors import FormatError, ShapeError, UnsupportedError


@dataclass(frozen=True)
class ParseContext:
    """What a method's parser may know besides the tensors."""

    where: str  # "<file>: <module key>" for error messages
    fmt: str  # kohya | lycoris | peft | diffusers
    config: dict[str, Any] | None = None  # PEFT config, rank/alpha patterns already resolved for the module


@dataclass
class PeftEntry:
    """One module in peft terms: what ``to_peft`` gives and ``peft_bridge`` turns into configs and layers."""

    peft_type: str  # LORA | LOHA | LOKR | OFT | WAVEFT
    tensors: dict[str, torch.Tensor]  # PEFT checkpoint suffix → tensor (reshaped to peft's layout on build)
    values: dict[str, Any] = field(default_factory=dict)  # per-module config values (become patterns)
    shared: dict[str, tuple] = field(default_factory=dict)  # config field → values it may take, preferred first


@dataclass
class Params(abc.ABC):
    """Base of the typed per-module tensors. Subclasses are dataclasses whose tensor fields are the weights."""

    additive: ClassVar[bool] = True  # False: the method transforms W (OFT, DoRA) and cannot be summed
    kohya_algo: ClassVar[str | None] = None  # LyCORIS ``algo`` for ``ss_network_args``; None: no kohya form

    # -- introspection -------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @property
    def rank(self) -> int | None:
        return None

    @property
    def alpha(self) -> float | None:
        return None

    @property
    def is_additive(self) -> bool:
        return self.additive

    def to(self, device=None, dtype=None) -> "Params":
        """A copy with every tensor field moved (and floating tensors cast)."""

        def move(t):
            if not isinstance(t, torch.Tensor):
                return t
            return t.to(device=device, dtype=dtype if t.is_floating_point() and dtype is not None else t.dtype)

        return dataclasses.replace(self, **{k: move(v) for k, v in self.tensors().items()})

    # -- math ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def check(self, shape: torch.Size, *, where: str) -> None:
        """Raise ShapeError if these tensors cannot adapt a weight of ``shape``."""

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """ΔW with the given shape (float32 when the params are float32). Additive methods only."""
        raise UnsupportedError(f"{type(self).__name__} transforms the weight; it has no additive delta")

    def bias_delta(self) -> torch.Tensor | None:
        """Δb for methods that also train the bias (full/diff ``diff_b``); None otherwise."""
        return None

    def abs_bound(self) -> float | None:
        """An upper bound of max|ΔW| from the factors alone (no ΔW built), for overflow checks; None when
        there is no cheap one (the written values are then checked instead)."""
        return None

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U, D) with ΔW.flatten(1) == U @ D, when the method is low-rank; lets backends stack adapters."""
        return None

    def add_to(self, w: torch.Tensor, strength: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """w + strength·ΔW, written into ``out`` (which may be ``w`` itself) when given.

        Methods override this to fuse the delta's last step with the add (one pass over W, no ΔW buffer).
        """
        delta = self.delta(w.shape)
        return torch.add(w, delta, alpha=strength, out=out) if out is not None else w.add(delta, alpha=strength)

    def apply(self, w: torch.Tensor, weight: float) -> torch.Tensor:
        """The adapted weight for strength ``weight``: identity at 0, exact at 1."""
        return self.add_to(w, weight)

    # -- writers -------------------------------------------------------------------------------------
    @property
    def tucker(self) -> bool:
        """Whether a Tucker core carries the kernel (``use_tucker`` in LyCORIS metadata)."""
        return False

    @property
    def kohya_plain(self) -> bool:
        """A plain LoRA that ``networks.lora`` (kohya's own module) loads; anything else needs LyCORIS."""
        return False

    def to_kohya(self, *, ndim: int | None, where: str) -> dict[str, torch.Tensor]:
        """Suffix → tensor in kohya / LyCORIS form; ``ndim`` is the module weight's (for per-channel tensors)."""
        raise UnsupportedError(f"{where}: {type(self).__name__} has no kohya/LyCORIS form")

    def to_peft(self, *, kind: str | None, shape: tuple[int, ...] | None, where: str, inject: bool) -> PeftEntry:
        """The peft form; ``kind`` (linear | conv1d | conv2d | conv3d) and ``shape`` describe the module when
        known. ``inject``: for live layers (some peft forwards differ from what they merge)."""
        raise UnsupportedError(f"{where}: {type(self).__name__} has no peft tuner")

    def weight_shape(self) -> tuple[int, ...]:
        """A module weight shape these params fit, for writers that have no model (enough for peft's layouts)."""
        raise UnsupportedError(f"{type(self).__name__}: no module shape can be read off its tensors")


def abs_max(t: torch.Tensor) -> float:
    """max|t| in one pass and without an |t| copy (``aminmax``)."""
    lo, hi = torch.aminmax(t.detach())
    return max(-float(lo), float(hi))


def product_bound(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a @ b| ≤ (inner size)·max|a|·max|b| (flattened factors)."""
    return a.shape[1 if a.dim() > 1 else 0] * abs_max(a) * abs_max(b)


class AlphaOverRank:
    """kohya's rule for methods that store ``alpha_value`` and a ``rank``: scale = alpha / r, alpha = r if absent."""

    @property
    def alpha(self) -> float:
        return float(self.rank) if self.alpha_value is None else self.alpha_value

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class MethodDef:
    """A registry entry: which key suffixes a method owns and how to parse them."""

    name: str
    suffixes: frozenset[str]  # every suffix the method may own (``alpha`` is shared)
    markers: frozenset[str]  # suffixes whose presence identifies the method
    parse: Callable[[dict[str, torch.Tensor], ParseContext], Params]
    peft_type: str | None = None  # the peft tuner able to hold it exactly, if any


# -- shared helpers ----------------------------------------------------------------------------------


def kernel_of(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """Kernel dims without trailing 1s: PEFT stores Conv1d Tucker cores as (r, r, k, 1)."""
    k = list(shape)
    while k and k[-1] == 1:
        k.pop()
    return tuple(k)


def kernel(shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The kernel dims of a module weight shape; () for Linear or when unknown."""
    return tuple(shape[2:]) if shape is not None and len(shape) > 2 else ()


def peft_tensors(t: dict[str, torch.Tensor], ctx: "ParseContext") -> bool:
    """PEFT and LyCORIS share LoHa / LoKr suffixes; PEFT keeps alpha in its config, LyCORIS writes one per module."""
    return ctx.fmt == "peft" or (ctx.config is not None and "alpha" not in t)


def kohya_scalar(v: float) -> torch.Tensor:
    """kohya's per-module scalar (``alpha``): a float32 0-dim tensor."""
    return torch.tensor(float(v), dtype=torch.float32)


def refuse(where: str, reason: str) -> UnsupportedError:
    return UnsupportedError(f"{where}: {reason}")


def scalar(t: torch.Tensor | float | None, *, where: str, name: str = "alpha") -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise FormatError(f"{where}: '{name}' should be a scalar, got shape {tuple(t.shape)}")
        t = t.float().item()
    value = float(t)
    if not math.isfinite(value):
        raise FormatError(f"{where}: '{name}' is not finite ({value})")
    return value


def require(tensors: dict[str, torch.Tensor], names: tuple[str, ...], *, where: str, method: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise FormatError(f"{where}: {method} is missing {', '.join(repr(m) for m in missing)}")


def reshape_to(delta: torch.Tensor, shape: torch.Size, *, where: str = "") -> torch.Tensor:
    """Fit a delta to the weight's shape (Linear ↔ 1×1 conv, flattened kernels)."""
    if tuple(delta.shape) == tuple(shape):
        return delta
    if delta.numel() != math.prod(shape) or delta.shape[0] != shape[0]:
        raise ShapeError(f"{where}: adapter gives a delta of shape {tuple(delta.shape)}, module weight is {tuple(shape)}")
    return delta.reshape(shape)


def expect_fit(out_features: int, in_numel: int, shape: torch.Size, *, where: str, what: str) -> None:
    """Check (out, in·k) of an adapter against a weight shape; the common shape test."""
    w_out, w_in = shape[0], math.prod(shape[1:])
    if (out_features, in_numel) != (w_out, w_in):
        raise ShapeError(
            f"{where}: {what} of shape (out={out_features}, in={in_numel}) does not fit the module weight "
            f"{tuple(shape)} (out={w_out}, in={w_in})"
        )


def config_value(cfg: dict[str, Any], name: str, kind: type, *, where: str, default: Any = ..., why: str = "") -> Any:
    """A typed field of a PEFT config (JSON or safetensors-metadata strings); FormatError names the field."""
    if cfg.get(name) is None:
        if default is ...:
            raise FormatError(f"{where}: the adapter config has no '{name}'{why}")
        return default
    value = cfg[name]
    try:
        if kind is bool and isinstance(value, str):
            if value.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.strip().lower() in ("true", "1")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        out = kind(value)
        if kind is float and not math.isfinite(out):
            raise ValueError(value)
        return out
    except (TypeError, ValueError, OverflowError):
        raise FormatError(f"{where}: config field '{name}' = {value!r} is not a {kind.__name__}") from None
