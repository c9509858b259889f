"""Params → kohya / LyCORIS single files, as A1111, ComfyUI and kohya's sd-scripts read and write them.

Keys: ``lora_unet_`` / ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` for SDXL and SD3) / ``lora_transformer_`` +
the module path with '.' → '_'. CLIP text-encoder paths carry ``text_model_`` (kohya wrote them with
transformers 4 names, and A1111 / ComfyUI map exactly those). SDXL UNets use the original (ldm/sgm) block
names, as sd-scripts' SDXL trainer writes them (``input_blocks_4_1_…``); SD1 files keep diffusers names.

Scales follow the LyCORIS forward each loader implements: alpha/r for LoRA and LoHa; for LoKr alpha/r only
when a factor is decomposed, so a PEFT LoKr with two whole factors gets its scale baked into ``lokr_w1``.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable

import torch

from ..errors import UnsupportedError
from ..keys.kohya import (
    COMPONENT_PREFIX, FLUX_COMPONENT_PREFIX, SDXL_COMPONENT_PREFIX, diffusers_to_ldm, is_ldm_unet_name,
)
from ..methods.full import FullParams
from ..methods.loha import LoHaParams
from ..methods.lokr import LoKrParams
from ..methods.lora import LoRAParams
from ..methods.oft import OFTParams, PeftOFTParams
from ..methods.waveft import WaveFTParams
from . import Item, cast

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _scalar(v: float) -> torch.Tensor:
    return torch.tensor(float(v), dtype=torch.float32)


def _dora(m: torch.Tensor, *, on_out: bool, ndim: int) -> torch.Tensor:
    """LyCORIS ≥ 4 layout: (out, 1, …) on the output axis, (1, in, …) on the input axis."""
    return m.reshape(-1, *[1] * (ndim - 1)) if on_out else m.reshape(1, -1, *[1] * (ndim - 2))


def kohya_tensors(params: Any, *, ndim: int | None, where: str) -> dict[str, torch.Tensor]:
    """Suffix → tensor for one module; ``ndim`` is the module weight's (for rescale / dora_scale shapes)."""
    if isinstance(params, LoRAParams):
        t = {"lora_down.weight": params.down, "lora_up.weight": params.up}
        if params.mid is not None:
            t["lora_mid.weight"] = params.mid
        t["alpha"] = _scalar(params.alpha)
        if params.magnitude is not None:
            t["dora_scale"] = _dora(params.magnitude, on_out=params.dora_on_out, ndim=ndim or params.up.dim())
        if params.bias is not None:
            t["diff_b"] = params.bias
        return t
    if isinstance(params, LoHaParams):
        t = {"hada_w1_a": params.w1_a, "hada_w1_b": params.w1_b, "hada_w2_a": params.w2_a, "hada_w2_b": params.w2_b}
        if params.t1 is not None:
            t.update(hada_t1=params.t1, hada_t2=params.t2)
        t["alpha"] = _scalar(params.alpha)
        if params.magnitude is not None:
            t["dora_scale"] = _dora(params.magnitude, on_out=params.dora_on_out, ndim=ndim or 2)
        return t
    if isinstance(params, LoKrParams):
        return _lokr(params, ndim=ndim, where=where)
    if isinstance(params, OFTParams):
        t = {"oft_blocks": params.blocks, "alpha": _scalar(params.constraint)}
        if params.rescale is not None:
            t["rescale"] = params.rescale.reshape(-1, *[1] * ((ndim or 2) - 1))
        return t
    if isinstance(params, FullParams):
        return ({"diff": params.diff} if params.diff is not None else {}) | (
            {"diff_b": params.diff_b} if params.diff_b is not None else {})
    if isinstance(params, PeftOFTParams):
        raise UnsupportedError(f"{where}: PEFT OFT rotates the input side; LyCORIS OFT (the only OFT kohya files "
                               "hold) rotates the output side — save it in PEFT format")
    if isinstance(params, WaveFTParams):
        raise UnsupportedError(f"{where}: WaveFT has no kohya/LyCORIS form — save it in PEFT format")
    raise UnsupportedError(f"{where}: {type(params).__name__} has no kohya/LyCORIS form")


def _lokr(p: LoKrParams, *, ndim: int | None, where: str) -> dict[str, torch.Tensor]:
    if p.peft_kron and p.w2 is not None and p.w2.dim() == 3:
        raise UnsupportedError(f"{where}: peft's Conv1d LoKr with a whole w2 (make_kron layout) has no LyCORIS "
                               "equivalent — save it in PEFT format")
    t: dict[str, torch.Tensor] = {}
    w1 = p.w1
    decomposed = p.w1 is None or p.w2 is None
    if not decomposed and p.scale != 1.0:
        w1 = p.w1 * p.scale  # LyCORIS applies no scale to two whole factors: bake it in
    if w1 is not None:
        t["lokr_w1"] = w1
    else:
        t.update(lokr_w1_a=p.w1_a, lokr_w1_b=p.w1_b)
    if p.w2 is not None:
        t["lokr_w2"] = p.w2
    else:
        t.update(lokr_w2_a=p.w2_a, lokr_w2_b=p.w2_b)
        if p.t2 is not None:
            t["lokr_t2"] = p.t2
    if decomposed:  # LyCORIS: s = alpha / r, r from the first decomposed factor
        r = int(p.w1_b.shape[0]) if p.w1 is None else int(p.w2_b.shape[0])
        t["alpha"] = _scalar(p.scale * r)
    else:
        t["alpha"] = _scalar(p.rank_value if p.rank_value is not None else (p.alpha_value or 1.0))
    if p.magnitude is not None:
        t["dora_scale"] = _dora(p.magnitude, on_out=p.dora_on_out, ndim=ndim or 2)
    return t


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
_ALGO = {LoRAParams: "locon", LoHaParams: "loha", LoKrParams: "lokr", OFTParams: "diag-oft", FullParams: "full"}
PEFT_ONLY_METADATA = ("peft_config", "lora_adapter_metadata")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def kohya_metadata(items: list[Item], *, family: str, title: str, source: dict[str, str]) -> dict[str, str]:
    """The source's metadata (minus PEFT configs) plus the ``ss_*`` / ``modelspec.*`` fields it lacks."""
    meta = {k: v for k, v in source.items() if k not in PEFT_ONLY_METADATA}
    params = [it.params for it in items]
    plain = all(isinstance(p, LoRAParams) and p.mid is None and p.magnitude is None for p in params)
    ranks = Counter(p.rank for p in params if p.rank is not None)
    alphas = Counter(p.alpha for p in params if p.alpha is not None)
    computed = {
        "ss_network_module": "networks.lora" if plain else "lycoris.kohya",
        "ss_network_dim": _num(ranks.most_common(1)[0][0]) if ranks else "1",
        "ss_network_alpha": _num(alphas.most_common(1)[0][0]) if alphas else "1",
    }
    if not plain:
        algos = Counter(_ALGO.get(type(p), "lora") for p in params)
        args = {"algo": algos.most_common(1)[0][0]}
        if any(getattr(p, "magnitude", None) is not None for p in params):
            args["dora_wd"] = "True"
        if any(getattr(p, "mid", None) is not None or getattr(p, "t1", None) is not None
               or getattr(p, "t2", None) is not None for p in params):
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
