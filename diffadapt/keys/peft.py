"""PEFT adapter configs: per-module values from ``rank_pattern`` / ``alpha_pattern`` and friends."""

from __future__ import annotations

import json
from typing import Any

from peft.utils.other import get_pattern_key

from ..errors import FormatError, NonFiniteError

# pattern field → the config fields it overrides per module
PATTERNS: dict[str, tuple[str, ...]] = {
    "rank_pattern": ("r",),
    "alpha_pattern": ("lora_alpha", "alpha"),
    "n_frequency_pattern": ("n_frequency",),
}


def check_config(config: Any, *, where: str) -> dict[str, Any]:
    """Validate the parts of a PEFT config that loading relies on."""
    if not isinstance(config, dict):
        raise FormatError(f"{where}: adapter config must be a JSON object, got {type(config).__name__}")
    for field in PATTERNS:
        value = config.get(field)
        if value is not None and not isinstance(value, dict):
            raise FormatError(f"{where}: '{field}' must be an object mapping module patterns to numbers")
        for pattern, v in (value or {}).items():
            _number(v, where=where, field=f"{field}[{pattern!r}]")
    for field in ("r", "lora_alpha", "alpha", "n_frequency"):
        if config.get(field) is not None:
            _number(config[field], where=where, field=field)
    return config


_FLOAT32_MAX = 3.4028234663852886e38


def _number(value: Any, *, where: str, field: str) -> None:
    """A config number must be a finite float32 (the math runs in float32): NaN, Infinity, 1e308 are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{where}: '{field}' must be a number, got {value!r}")
    if not abs(value) <= _FLOAT32_MAX:  # also False for NaN
        raise NonFiniteError(f"{where}: '{field}' = {value!r} is not a finite float32 number")


def resolve(config: dict[str, Any] | None, module: str) -> dict[str, Any] | None:
    """The config with pattern overrides applied for ``module`` (a dotted path inside the component)."""
    if config is None:
        return None
    out = dict(config)
    for field, targets in PATTERNS.items():
        pattern = config.get(field) or {}
        if not pattern:
            continue
        key = get_pattern_key(list(pattern), module)
        if key in pattern:
            for target in targets:
                if target in config or target == targets[0]:
                    out[target] = pattern[key]
    return out


def configs_from_metadata(metadata: dict[str, str], *, where: str) -> dict[str, dict[str, Any]]:
    """Configs carried inside a safetensors file's metadata.

    diffusers writes ``lora_adapter_metadata`` = JSON of ``{"unet.r": 4, "unet.lora_alpha": 4, …}``;
    diffadapt's own single-file PEFT export writes ``peft_config`` = JSON of ``{component: config}``.
    """
    out: dict[str, dict[str, Any]] = {}
    if "peft_config" in metadata:
        data = _json(metadata["peft_config"], where=f"{where} (metadata 'peft_config')")
        for comp, cfg in data.items():
            out[comp] = check_config(cfg, where=f"{where} (metadata 'peft_config' → {comp})")
    if "lora_adapter_metadata" in metadata:
        data = _json(metadata["lora_adapter_metadata"], where=f"{where} (metadata 'lora_adapter_metadata')")
        for key, value in data.items():
            comp, _, field = key.partition(".")
            if not field:
                comp, field = "", key
            out.setdefault(comp, {})[field] = value
        for comp, cfg in out.items():
            check_config(cfg, where=f"{where} (metadata 'lora_adapter_metadata' → {comp or 'root'})")
    return out


def _json(text: str, *, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, 5000-digit integers, nesting too deep
        raise FormatError(f"{where}: malformed JSON: {type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(data, dict):
        raise FormatError(f"{where}: expected a JSON object")
    return data
