"""Wan image-to-video files: the image cross-attention (``cross_attn.k_img`` / ``v_img`` / ``norm_k_img``) and the
image embedder (``img_emb.proj.*``), ComfyUI and musubi-tuner names, against diffusers' own loader on a tiny
Wan-2.1-I2V transformer, patch and inject; unload bit-exact."""

from __future__ import annotations

import copy

import pytest
import torch

import diffadapt as da
from diffadapt.testing import tiny_wan_i2v_pipeline
from dit_files import lora_file
from test_dit_layouts import load_unload
from test_dit_wan_qwen import diffusers_reference


@pytest.fixture(scope="module")
def i2v():
    return tiny_wan_i2v_pipeline()


def i2v_file(model, layout: str) -> dict[str, torch.Tensor]:
    """Every block module with alphas; ComfyUI files also the image embedder (diffusers' converter reads no alpha
    there, and its musubi converter reads block modules only)."""
    if layout == "musubi":
        return lora_file(model, "wan", "kohya", alpha=2.0, only=r"^blocks")
    return lora_file(model, "wan", "bfl", alpha=2.0, only=r"^blocks") | lora_file(
        model, "wan", "bfl", alpha=None, only=r"^img_emb", seed=1)


I2V_MODULES = {"blocks.0.attn2.add_k_proj", "blocks.1.attn2.add_v_proj"}
EMBEDDER = {"condition_embedder.image_embedder.ff.net.0.proj", "condition_embedder.image_embedder.ff.net.2"}


@pytest.mark.parametrize("mode", ["patch", "inject"])
@pytest.mark.parametrize("layout", ["comfyui", "musubi"])
def test_wan_i2v_layouts_match_diffusers(i2v, layout, mode):
    sd = i2v_file(i2v.transformer, layout)
    assert any("cross_attn_k_img" in k or "cross_attn.k_img" in k for k in sd)
    ref = diffusers_reference(i2v, sd)
    # diffusers read the image projections (and, from ComfyUI names, the image embedder) rather than dropping them
    assert I2V_MODULES <= set(ref) and (layout == "musubi" or EMBEDDER <= set(ref))
    pipe = copy.deepcopy(i2v)
    info = load_unload(pipe, sd, ref, mode=mode)
    assert info.layout == {"comfyui": "Wan ComfyUI", "musubi": "Wan musubi-tuner"}[layout]
    assert info.modules == len(ref) and info.base_family == "wan"
