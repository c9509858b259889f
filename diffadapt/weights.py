"""Adapter weights: one number, one per component, or one per block — validated once, resolved per module.

Accepted forms (negative values allowed, 0 turns an adapter off where it applies):

    0.8                                              every module
    {"unet": 1.0, "text_encoder": 0.5}               per component; components not named keep 1.0
    {"unet": {"down": [0, .5, 1, 1], "mid": 1, "up": [1, 1, .5, 0], "default": 1}, "text_encoder": 0}
    {"transformer": {"blocks": [...], "single_blocks": [...]}, "text_encoder": {"layers": [...]}}
    {"default": 0.7, "unet": 1.0}                    "default" covers the components not named
    {"transformer": 1.0, "transformer_2": 0.5}       Wan 2.2: the high- and the low-noise expert
    {"unet": {"modules": {"down_blocks.1.attentions.0": 0.5}, "default": 1}}   per module (longest
                                                     dotted prefix wins; used by diffusers' per-layer scales)

A block weight applies to *every* layer of that block (resnets, attention, samplers), not only attention;
modules outside any block (conv_in, time embedding, conv_out, …) take the block dict's "default" (1.0).
A list may also be a single number meaning "every block of that kind".
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import WeightError

Weight = Any  # float | dict[str, float | dict[str, float | list[float]]]

# block kind → (pattern on the module path inside its component)
_BLOCKS = {
    "down": re.compile(r"^down_blocks\.(\d+)\."),
    "up": re.compile(r"^up_blocks\.(\d+)\."),
    "mid": re.compile(r"^mid_block\."),
    "blocks": re.compile(r"^transformer_blocks\.(\d+)\."),
    "single_blocks": re.compile(r"^single_transformer_blocks\.(\d+)\."),
    "layers": re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\."),
}
_COMPONENT_KEYS = ("unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2", "text_encoder_3",
                   "default")


def _number(value: Any, *, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WeightError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def validate(weight: Weight, *, where: str, counts: dict[str, dict[str, int]] | None = None) -> Weight:
    """Check a weight specification; ``counts`` gives {component: {block kind: number of blocks}}."""
    if not isinstance(weight, dict):
        return _number(weight, where=where)
    out: dict[str, Any] = {}
    for comp, value in weight.items():
        if comp not in _COMPONENT_KEYS:
            raise WeightError(f"{where}: unknown component {comp!r}; use one of {list(_COMPONENT_KEYS)}")
        if not isinstance(value, dict):
            out[comp] = _number(value, where=f"{where}[{comp!r}]")
            continue
        blocks: dict[str, Any] = {}
        for kind, v in value.items():
            w = f"{where}[{comp!r}][{kind!r}]"
            if kind == "default" or kind == "mid":
                blocks[kind] = _number(v, where=w)
            elif kind == "modules":
                if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
                    raise WeightError(f"{w}: expected {{module path: number}}, got {v!r}")
                blocks[kind] = {k: _number(x, where=f"{w}[{k!r}]") for k, x in v.items()}
            elif kind in _BLOCKS:
                if isinstance(v, (list, tuple)):
                    blocks[kind] = [_number(x, where=f"{w}[{i}]") for i, x in enumerate(v)]
                    n = (counts or {}).get(comp, {}).get(kind)
                    if n is not None and len(v) != n:
                        raise WeightError(f"{w}: {len(v)} values for {n} {kind} blocks")
                else:
                    blocks[kind] = _number(v, where=w)
            else:
                raise WeightError(f"{w}: unknown block kind; use {sorted(_BLOCKS) + ['default', 'modules']}")
        out[comp] = blocks
    return out


def block_of(module: str) -> tuple[str, int | None] | None:
    """('down', 1) for 'down_blocks.1.resnets.0.conv1'; ('mid', None); None outside any block."""
    for kind, pattern in _BLOCKS.items():
        m = pattern.match(module)
        if m:
            return kind, (int(m[1]) if m.groups() else None)
    return None


def resolve(weight: Weight, component: str, module: str) -> float:
    """The strength of a validated weight on one module of one component."""
    if not isinstance(weight, dict):
        return weight
    value = weight.get(component, weight.get("default", 1.0))
    if not isinstance(value, dict):
        return value
    if "modules" in value:
        hit = _module_weight(value["modules"], module)
        if hit is not None:
            return hit
    hit = block_of(module)
    if hit is None or hit[0] not in value:
        return value.get("default", 1.0)
    v = value[hit[0]]
    if isinstance(v, list):
        return v[hit[1]] if hit[1] is not None and hit[1] < len(v) else value.get("default", 1.0)
    return v


def _module_weight(modules: dict[str, float], module: str) -> float | None:
    """The weight of the longest dotted prefix of ``module`` named in ``modules``."""
    if module in modules:
        return modules[module]
    parts = module.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in modules:
            return modules[prefix]
    return None


def block_counts(modules: dict[str, Any]) -> dict[str, int]:
    """{block kind: number of blocks} of a component, from its module names."""
    counts: dict[str, int] = {}
    for name in modules:
        hit = block_of(name + ".")
        if hit and hit[1] is not None:
            counts[hit[0]] = max(counts.get(hit[0], 0), hit[1] + 1)
    return counts
