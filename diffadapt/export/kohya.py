"""Params → kohya / LyCORIS single files, as A1111, ComfyUI and kohya's sd-scripts read and write them.

Keys: ``lora_unet_`` / ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` for SDXL and SD3) / ``lora_transformer_`` +
the module path with '.' → '_'. CLIP text-encoder paths carry ``text_model_`` (kohya wrote them with
transformers 4 names, and A1111 / ComfyUI map exactly those). SDXL UNets use the original (ldm/sgm) block
names, as sd-scripts' SDXL trainer writes them (``input_blocks_4_1_…``); SD1 files keep diffusers names.

Each module's tensors come from its method (``Params.to_kohya``), following the LyCORIS forward each loader
implements; this module only names them and writes the metadata.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Callable

import torch

from ..errors import UnsupportedError
from ..keys.kohya import (
    COMPONENT_PREFIX, FLUX_COMPONENT_PREFIX, SDXL_COMPONENT_PREFIX, diffusers_to_ldm, is_ldm_unet_name,
)
from ..methods.base import Params
from . import Item, cast

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def kohya_tensors(params: Params, *, ndim: int | None, where: str) -> dict[str, torch.Tensor]:
    """Suffix → tensor for one module; ``ndim`` is the module weight's (for rescale / dora_scale shapes)."""
    return params.to_kohya(ndim=ndim, where=where)


# -- names -------------------------------------------------------------------------------------------


def _guess_prefix(names: list[str]) -> str:
    """A bare module's component from its module names (A1111 / ComfyUI need one)."""
    text = " ".join(names[:50])
    if "down_blocks" in text or "input_blocks" in text or "mid_block" in text:
        return "lora_unet_"
    if "encoder.layers" in text or "encoder_layers" in text or "text_model" in text:
        return "lora_te_"
    if "transformer_blocks" in text:
        return "lora_transformer_"
    return "lycoris_"


def sdxl_ldm(flat: str) -> str | None:
    """SDXL base UNet: 2 layers per block, attention in up blocks 0 and 1."""
    return diffusers_to_ldm(flat, layers_per_block=2, up_has_attention=lambda b: b < 2)


def kohya_key(item: Item, *, family: str, bare_prefix: str = "lycoris_",
              to_ldm: Callable[[str], str | None] | None = None) -> str:
    """The kohya module key (without suffix) of one item."""
    table = FLUX_COMPONENT_PREFIX if family == "flux" else \
        SDXL_COMPONENT_PREFIX if family in ("sdxl", "dit", "sd3") else COMPONENT_PREFIX
    prefix = table.get(item.component, bare_prefix)
    flat = item.module.replace(".", "_") if item.dotted else item.module
    if (item.component in TEXT_ENCODERS or prefix.startswith("lora_te")) and flat.startswith("encoder_layers_"):
        flat = "text_model_" + flat
    if prefix == "lora_unet_" and to_ldm is not None and not is_ldm_unet_name(flat):
        flat = to_ldm(flat) or flat
    return prefix + flat


# -- metadata and file -------------------------------------------------------------------------------

_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "dit": "sd3", "sd3": "sd3",
                 "flux": "flux1"}
_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base",
         "dit": "stable-diffusion-3-medium", "sd3": "stable-diffusion-3-medium", "flux": "flux-1-dev"}
PEFT_ONLY_METADATA = ("peft_config", "lora_adapter_metadata")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def kohya_metadata(items: list[Item], *, family: str, title: str, source: dict[str, str]) -> dict[str, str]:
    """The source's metadata (minus PEFT configs) plus the ``ss_*`` / ``modelspec.*`` fields it lacks."""
    meta = {k: v for k, v in source.items() if k not in PEFT_ONLY_METADATA}
    params = [it.params for it in items]
    plain = all(p.kohya_plain for p in params)
    ranks = Counter(p.rank for p in params if p.rank is not None)
    alphas = Counter(p.alpha for p in params if p.alpha is not None)
    computed = {
        "ss_network_module": "networks.lora" if plain else "lycoris.kohya",
        "ss_network_dim": _num(ranks.most_common(1)[0][0]) if ranks else "1",
        "ss_network_alpha": _num(alphas.most_common(1)[0][0]) if alphas else "1",
    }
    if not plain:
        algos = Counter(p.kohya_algo or "lora" for p in params)
        args = {"algo": algos.most_common(1)[0][0]}
        if any(getattr(p, "magnitude", None) is not None for p in params):
            args["dora_wd"] = "True"
        if any(p.tucker for p in params):
            args["use_tucker"] = "True"
        computed["ss_network_args"] = json.dumps(args)
    if family in _BASE_VERSION:
        kind = "lora" if plain else "lycoris"
        computed.update({
            "ss_base_model_version": _BASE_VERSION[family],
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{_ARCH[family]}/{kind}",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
            else "diffusers",
            "modelspec.title": title,
        })
    fresh = not any(k.startswith("ss_network") for k in meta)
    for k, v in computed.items():
        if fresh or k not in meta:
            meta[k] = v
    return meta


def kohya_state_dict(items: list[Item], *, family: str, dtype: torch.dtype | None = None,
                     to_ldm: Callable[[str], str | None] | None = None, where: str = "") -> dict[str, torch.Tensor]:
    """All items as one kohya state dict; every item is converted before anything is returned."""
    bare = _guess_prefix([it.module for it in items]) if any(it.component in ("", "*") for it in items) else ""
    out: dict[str, torch.Tensor] = {}
    for it in items:
        key = kohya_key(it, family=family, bare_prefix=bare or "lycoris_", to_ldm=to_ldm)
        for suffix, t in kohya_tensors(it.params, ndim=it.weight_ndim, where=f"{where}: {key}").items():
            full = f"{key}.{suffix}"
            if full in out:
                raise UnsupportedError(f"{where}: two modules map to the kohya key '{full}'")
            out[full] = cast(t, None if suffix == "alpha" else dtype)
    if not out:
        raise UnsupportedError(f"{where}: nothing to write (every module excluded?)")
    return out
