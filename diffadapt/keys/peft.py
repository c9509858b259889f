"""PEFT adapter configs: per-module values from ``rank_pattern`` / ``alpha_pattern`` and friends."""

from __future__ import annotations

import json
from typing import Any

from peft.utils.other import get_pattern_key

from ..errors import FormatError

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
    for field in ("r", "lora_alpha", "alpha", "n_frequency"):
        value = config.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise FormatError(f"{where}: '{field}' must be a number, got {value!r}")
    return config


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
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: malformed JSON: {e}") from e
    if not isinstance(data, dict):
        raise FormatError(f"{where}: expected a JSON object")
    return data
