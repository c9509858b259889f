"""kohya / LyCORIS key names: component prefixes and the SDXL ldm (sgm) → diffusers UNet names.

kohya writes the module path with '.' replaced by '_'; those names are resolved against a table built
from the model (see ``keys.index``), never by guessing where the dots were. SDXL files use the
original Stability block names (``input_blocks_4_1_…``), translated here to diffusers' flat names.
"""

from __future__ import annotations

import re

# prefix → component; longest first so 'lora_te1_' wins over 'lora_te_'
PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_transformer_", "transformer"),
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("lycoris_", "*"),  # LyCORIS standalone: a bare module, whichever component it resolves in
)

COMPONENT_PREFIX = {"unet": "lora_unet_", "transformer": "lora_transformer_", "text_encoder": "lora_te_",
                    "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
SDXL_COMPONENT_PREFIX = {**COMPONENT_PREFIX, "text_encoder": "lora_te1_"}
# sd-scripts' Flux: CLIP-L is te1, T5 te3 (Flux pipelines keep T5 in text_encoder_2)
FLUX_COMPONENT_PREFIX = {**SDXL_COMPONENT_PREFIX, "text_encoder_2": "lora_te3_"}


def split_prefix(name: str) -> tuple[str, str] | None:
    """'lora_unet_down_blocks_0_…' → ('unet', 'down_blocks_0_…')."""
    for prefix, component in PREFIXES:
        if name.startswith(prefix):
            return component, name[len(prefix):]
    return None


_RESNET = (
    ("in_layers_0", "norm1"), ("in_layers_2", "conv1"), ("out_layers_0", "norm2"), ("out_layers_3", "conv2"),
    ("emb_layers_1", "time_emb_proj"), ("skip_connection", "conv_shortcut"),
)
_TOP = (
    ("time_embed_0", "time_embedding_linear_1"), ("time_embed_2", "time_embedding_linear_2"),
    ("label_emb_0_0", "add_embedding_linear_1"), ("label_emb_0_2", "add_embedding_linear_2"),
    ("input_blocks_0_0", "conv_in"), ("out_0", "conv_norm_out"), ("out_2", "conv_out"),
)
_INPUT = re.compile(r"^input_blocks_(\d+)_(\d+)(?:_(.*))?$")
_OUTPUT = re.compile(r"^output_blocks_(\d+)_(\d+)(?:_(.*))?$")
_MIDDLE = re.compile(r"^middle_block_(\d+)(?:_(.*))?$")


def _resnet_inner(rest: str) -> str:
    for old, new in _RESNET:
        if rest == old or rest.startswith(old + "_"):
            return new + rest[len(old):]
    return rest


def _join(*parts: str | None) -> str:
    return "_".join(p for p in parts if p)


def is_ldm_unet_name(flat: str) -> bool:
    return bool(_INPUT.match(flat) or _OUTPUT.match(flat) or _MIDDLE.match(flat)) or any(
        flat == old or flat.startswith(old + "_") for old, _ in _TOP
    )


def ldm_to_diffusers(flat: str, *, layers_per_block: int) -> str | None:
    """Translate an ldm/sgm UNet flat name to diffusers' flat name; None if it is not an ldm name."""
    lpb = layers_per_block
    for old, new in _TOP:
        if flat == old or flat.startswith(old + "_"):
            return new + flat[len(old):]
    if m := _INPUT.match(flat):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        block, idx = (i - 1) // (lpb + 1), (i - 1) % (lpb + 1)
        if idx == lpb:  # the downsampler: input_blocks_3_0_op
            return _join(f"down_blocks_{block}_downsamplers_0_conv", None if rest == "op" else rest)
        if j == 0:
            return _join(f"down_blocks_{block}_resnets_{idx}", _resnet_inner(rest or ""))
        return _join(f"down_blocks_{block}_attentions_{idx}", rest)
    if m := _MIDDLE.match(flat):
        j, rest = int(m[1]), m[2]
        if j == 1:
            return _join("mid_block_attentions_0", rest)
        return _join(f"mid_block_resnets_{j // 2}", _resnet_inner(rest or ""))
    if m := _OUTPUT.match(flat):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        block, idx = i // (lpb + 1), i % (lpb + 1)
        if j == 0:
            return _join(f"up_blocks_{block}_resnets_{idx}", _resnet_inner(rest or ""))
        if j == 2 or rest == "conv":  # the upsampler follows the attention, or the resnet directly
            return _join(f"up_blocks_{block}_upsamplers_0", rest)
        return _join(f"up_blocks_{block}_attentions_{idx}", rest)
    return None


_DIFFUSERS_BLOCK = re.compile(r"^(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)(?:_(.*))?$")
_MID = re.compile(r"^mid_block_(resnets|attentions)_(\d+)(?:_(.*))?$")


def _resnet_inner_inverse(rest: str) -> str:
    for old, new in _RESNET:
        if rest == new or rest.startswith(new + "_"):
            return old + rest[len(new):]
    return rest


def diffusers_to_ldm(flat: str, *, layers_per_block: int, up_has_attention) -> str | None:
    """The inverse of :func:`ldm_to_diffusers` (for writing SDXL files as A1111/ComfyUI expect them).

    ``up_has_attention(b)`` tells whether up block b has attentions (its upsampler is then index 2).
    """
    lpb = layers_per_block
    for old, new in _TOP:
        if flat == new or flat.startswith(new + "_"):
            return old + flat[len(new):]
    if m := _MID.match(flat):
        kind, k, rest = m[1], int(m[2]), m[3]
        j = 1 if kind == "attentions" else 2 * k
        return _join(f"middle_block_{j}", rest if kind == "attentions" else _resnet_inner_inverse(rest or ""))
    m = _DIFFUSERS_BLOCK.match(flat)
    if not m:
        return None
    side, b, kind, k, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if side == "down":
        if kind == "downsamplers":
            return _join(f"input_blocks_{(b + 1) * (lpb + 1)}_0_op", None if rest == "conv" else rest)
        i = 1 + b * (lpb + 1) + k
        if kind == "resnets":
            return _join(f"input_blocks_{i}_0", _resnet_inner_inverse(rest or ""))
        return _join(f"input_blocks_{i}_1", rest)
    if kind == "upsamplers":
        return _join(f"output_blocks_{b * (lpb + 1) + lpb}_{2 if up_has_attention(b) else 1}", rest)
    i = b * (lpb + 1) + k
    if kind == "resnets":
        return _join(f"output_blocks_{i}_0", _resnet_inner_inverse(rest or ""))
    return _join(f"output_blocks_{i}_1", rest)
