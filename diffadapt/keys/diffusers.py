"""diffusers naming: component-prefixed PEFT keys, and the legacy attention-processor layouts."""

from __future__ import annotations

import re

# 'attn1.processor.to_q_lora.down.weight' → 'attn1.to_q.lora_down.weight' (diffusers < 0.20 files)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# LoRACompatibleLinear / text-encoder monkey patch: '.lora.down.weight', '.lora_linear_layer.up.weight'
_COMPAT = re.compile(r"\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
# diffusers 0.17–0.19 text-encoder monkey patch: 'self_attn.to_q_lora.down.weight' on CLIP's q_proj …
_TE_OLD = re.compile(r"\.self_attn\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TE_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# XLabs Flux: 'double_blocks.0.processor.qkv_lora1.down.weight' (the module keeps its processor name)
_XLABS = re.compile(r"(\.processor\.(?:qkv|proj)_lora\d?)\.(down|up)\.weight$")


def rewrite_legacy(key: str) -> str:
    """Map legacy diffusers LoRA keys onto kohya-style suffixes; other keys pass unchanged."""
    m = _TE_OLD.search(key)
    if m:
        return f"{key[: m.start()]}.self_attn.{_TE_NAMES[m[1]]}.lora_{m[2]}.weight"
    m = _XLABS.search(key)
    if m:
        return f"{key[: m.start()]}{m[1]}.lora_{m[2]}.weight"
    m = _PROCESSOR.search(key)
    if m:
        target = "to_out.0" if m[1] == "to_out" else m[1]
        return f"{key[: m.start()]}.{target}.lora_{m[2]}.weight"
    m = _COMPAT.search(key)
    if m:
        return f"{key[: m.start()]}.lora_{m[1]}.weight"
    return key
