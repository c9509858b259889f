"""WaveFT (PEFT only): a sparse set of trained wavelet coefficients, inverse-transformed into ΔW.

Only ``waveft_spectrum`` (n_frequency,) is stored. Where the coefficients sit comes from
``torch.randperm(out·in, generator seeded with random_loc_seed)[:n_frequency]``, so the adapter config
(``random_loc_seed``, ``wavelet_family``, ``use_idwt``, ``scaling``) is part of the adapter: a missing field is a
FormatError, not a default. ΔW = scaling · IDWT(spectrum scattered into a padded grid), centre-cropped to
(out, in); without ``use_idwt`` the scattered grid is ΔW. nn.Linear only, as in peft.

The inverse transform and the per-family padding table are peft's own (``peft.tuners.waveft``, vendored from
PyTorch-Wavelet-Toolbox); the scatter / pad / crop around them mirrors ``WaveFTLayer.get_delta_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import FormatError, ShapeError, UnsupportedError
from .base import MethodDef, ParseContext, Params, PeftEntry, config_value, refuse, require


def _wavelets():
    try:
        from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
        from peft.tuners.waveft.waverec2d import waverec2d
    except ImportError as e:  # peft < 0.18 has no WaveFT
        raise UnsupportedError(f"WaveFT needs peft >= 0.18 (peft.tuners.waveft): {e}") from None
    return WAVELET_REDUCTIONS, waverec2d


def waveft_positions(out_features: int, in_features: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the n coefficients, as peft draws them at layer creation."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(out_features * in_features, generator=generator)[:n]
    return idx // in_features, idx % in_features


def waveft_delta(
    spectrum: torch.Tensor, out_features: int, in_features: int, *, seed: int, wavelet: str, use_idwt: bool,
    scaling: float,
) -> torch.Tensor:
    rows, cols = waveft_positions(out_features, in_features, spectrum.numel(), seed)
    rows, cols = rows.to(spectrum.device), cols.to(spectrum.device)
    if not use_idwt:
        dense = torch.zeros(out_features, in_features, dtype=spectrum.dtype, device=spectrum.device)
        dense[rows, cols] = spectrum
        return dense * scaling
    reductions, waverec2d = _wavelets()
    pad_r, pad_c = reductions[wavelet]
    h, w = out_features + pad_r, in_features + pad_c
    h, w = h + h % 2, w + w % 2  # the transform works on even sizes
    dense = torch.zeros(h, w, dtype=spectrum.dtype, device=spectrum.device)
    dense[rows + (h - out_features) // 2, cols + (w - in_features) // 2] = spectrum
    h2, w2 = h // 2, w // 2
    coeffs = (dense[:h2, :w2], (dense[:h2, w2:], dense[h2:, :w2], dense[h2:, w2:]))
    delta = waverec2d(coeffs, wavelet) * scaling
    top, left = (delta.shape[0] - out_features) // 2, (delta.shape[1] - in_features) // 2
    return delta[top : top + out_features, left : left + in_features]


@dataclass
class WaveFTParams(Params):
    spectrum: torch.Tensor  # (n_frequency,)
    scaling: float
    wavelet_family: str
    use_idwt: bool
    random_loc_seed: int

    additive: ClassVar[bool] = True

    def check(self, shape: torch.Size, *, where: str) -> None:
        if len(shape) != 2:
            raise ShapeError(f"{where}: WaveFT adapts nn.Linear weights only; the module weight is {tuple(shape)}")
        if self.spectrum.numel() > shape[0] * shape[1]:
            raise ShapeError(
                f"{where}: WaveFT has {self.spectrum.numel()} coefficients, more than the {tuple(shape)} weight holds"
            )

    def delta(self, shape: torch.Size) -> torch.Tensor:
        if len(shape) != 2:
            raise ShapeError(f"WaveFT adapts nn.Linear weights only; the module weight is {tuple(shape)}")
        return waveft_delta(
            self.spectrum.float(), shape[0], shape[1], seed=self.random_loc_seed, wavelet=self.wavelet_family,
            use_idwt=self.use_idwt, scaling=self.scaling,
        )

    def apply(self, w: torch.Tensor, weight: float) -> torch.Tensor:
        if weight == 0:
            return w.clone()
        return (w.float() + weight * self.delta(w.shape)).to(w.dtype)

    def to_kohya(self, *, ndim: int | None, where: str) -> dict[str, torch.Tensor]:
        raise refuse(where, "WaveFT has no kohya/LyCORIS form — save it in PEFT format")

    def to_peft(self, *, kind: str | None, shape: tuple[int, ...] | None, where: str, inject: bool) -> PeftEntry:
        if kind not in (None, "linear"):
            raise refuse(where, "peft's WaveFT adapts nn.Linear only")
        shared = {"scaling": (self.scaling,), "wavelet_family": (self.wavelet_family,), "use_idwt": (self.use_idwt,),
                  "random_loc_seed": (self.random_loc_seed,)}
        return PeftEntry("WAVEFT", {"waveft_spectrum": self.spectrum}, {"n_frequency": int(self.spectrum.numel())},
                         shared)

    def weight_shape(self) -> tuple[int, ...]:
        return (1, int(self.spectrum.numel()))


_WHY = " (needed to place and scale the coefficients)"


def parse(t: dict[str, torch.Tensor], ctx: ParseContext) -> WaveFTParams:
    """``waveft_spectrum`` + the peft WaveFT config (from adapter_config.json or the file's metadata)."""
    require(t, ("waveft_spectrum",), where=ctx.where, method="WaveFT")
    spectrum = t["waveft_spectrum"]
    if spectrum.dim() != 1 or spectrum.numel() == 0:
        raise FormatError(f"{ctx.where}: 'waveft_spectrum' should be (n_frequency,), got {tuple(spectrum.shape)}")
    cfg = ctx.config or {}
    if not cfg:
        raise FormatError(
            f"{ctx.where}: WaveFT needs its config (random_loc_seed, wavelet_family, use_idwt, scaling) "
            "from adapter_config.json or the file's metadata"
        )
    params = WaveFTParams(
        spectrum=spectrum,
        scaling=config_value(cfg, "scaling", float, where=ctx.where, why=_WHY),
        wavelet_family=config_value(cfg, "wavelet_family", str, where=ctx.where, why=_WHY),
        use_idwt=config_value(cfg, "use_idwt", bool, where=ctx.where, why=_WHY),
        random_loc_seed=config_value(cfg, "random_loc_seed", int, where=ctx.where, why=_WHY),
    )
    if params.use_idwt and params.wavelet_family not in _wavelets()[0]:
        raise FormatError(f"{ctx.where}: unknown WaveFT wavelet_family {params.wavelet_family!r}")
    n = cfg.get("n_frequency")
    per_module = not cfg.get("proportional_parameters") and not cfg.get("n_frequency_pattern")
    if n is not None and per_module and int(n) != spectrum.numel():
        raise FormatError(
            f"{ctx.where}: config n_frequency={n} but 'waveft_spectrum' has {spectrum.numel()} coefficients"
        )
    return params


METHOD = MethodDef(
    name="waveft",
    suffixes=frozenset({"waveft_spectrum"}),
    markers=frozenset({"waveft_spectrum"}),
    parse=parse,
    peft_type="WAVEFT",
)


# -- fused projections (keys/fused.py): the rows of ΔW one model module takes ------------------------


def take_rows(p: WaveFTParams, rows, shape: torch.Size, *, where: str):
    """The spectrum's positions are drawn over the whole matrix: the exact rows of ΔW, as ``full`` params."""
    from .full import FullParams

    return FullParams(diff=p.delta(shape)[rows])
