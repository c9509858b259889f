"""Block presets per model family, built from the block kinds the loaded denoiser really has.

A preset is a :mod:`diffadapt.weights` block dict for the denoiser, times a slot's weight: the blocks it names
keep the weight, the other blocks get 0, and modules outside any block (embeddings, ``conv_in``, ``proj_out``…)
keep the weight. A UNet offers its down/mid/up kinds and their pairs; Flux its ``blocks`` (double-stream) and
``single_blocks``; a transformer with one kind of block (SD3, Wan, Qwen-Image) the first or second half of them.
Text encoders take the slot's text-encoder weight as one number: presets never reach them.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

from ..weights import block_counts

ORDER = ("down", "mid", "up", "blocks", "single_blocks")
Preset = dict[str, Any]  # {block kind: 0/1, or a 0/1 list per block}


def block_kinds(denoiser: Any) -> dict[str, int]:
    """{block kind: number of blocks} of a denoiser, in ORDER (``mid`` counts as one)."""
    names = {n: None for n, _ in denoiser.named_modules()}
    counts = block_counts(names)
    if any(n.startswith("mid_block.") for n in names):
        counts["mid"] = 1
    return {k: counts[k] for k in ORDER if counts.get(k)}


def _span(kind: str, a: int, b: int) -> str:
    return f"{kind} {a} only" if a == b else f"{kind} {a}-{b} only"


def presets_for(denoiser: Any) -> dict[str, Preset | None]:
    """The presets that mean something on ``denoiser``: "all" first, then per kind (see the module doc)."""
    kinds = block_kinds(denoiser)
    out: dict[str, Preset | None] = {"all": None}
    names = list(kinds)
    if len(names) >= 2:
        for size in range(1, len(names)):
            for chosen in combinations(names, size):
                label = " + ".join(chosen) + (" only" if size == 1 else "")
                out[label] = {k: 1.0 if k in chosen else 0.0 for k in names}
    elif names and kinds[names[0]] >= 2:
        kind, n = names[0], kinds[names[0]]
        half = n // 2
        out[_span(kind, 0, half - 1)] = {kind: [1.0] * half + [0.0] * (n - half)}
        out[_span(kind, half, n - 1)] = {kind: [0.0] * half + [1.0] * (n - half)}
    return out


def scaled(preset: Preset, weight: float) -> dict[str, Any]:
    """The denoiser's weight dict for ``preset`` at ``weight`` (outside any block: ``weight``)."""
    out: dict[str, Any] = {k: [weight * x for x in v] if isinstance(v, list) else weight * v for k, v in preset.items()}
    out["default"] = float(weight)
    return out
