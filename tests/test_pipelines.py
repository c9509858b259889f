"""Pipeline-level behaviour on the tiny SD1, SDXL and DiT pipelines, and parity with diffusers' own loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffadapt as da
from diffadapt.fixtures import lycoris_file
from diffadapt.keys.kohya import diffusers_to_ldm
from diffadapt.testing import generate, param_hashes, tiny_dit_pipeline, tiny_sd1_pipeline, tiny_sdxl_pipeline

BUILDERS = {"sd1": tiny_sd1_pipeline, "sdxl": tiny_sdxl_pipeline, "dit": tiny_dit_pipeline}
PREFIXES = {
    "sd1": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "dit": {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}


def kohya_file(pipe, family: str, *, algo: str = "lora", ldm_names: bool = False, **kw) -> dict:
    """One kohya-named file over every adaptable component, made by LyCORIS."""
    sd = {}
    for i, (component, prefix) in enumerate(PREFIXES[family].items()):
        part, _ = lycoris_file(getattr(pipe, component), algo=algo, prefix=prefix, seed=i, **kw)
        sd.update(part)
    if ldm_names:
        sd = to_ldm_names(pipe.unet, sd)
    return sd


def to_ldm_names(unet, sd: dict) -> dict:
    """Rename lora_unet_ keys to the original SDXL block names, as kohya's SDXL scripts write them."""
    lpb = unet.config.layers_per_block

    def has_attn(b):
        return hasattr(unet.up_blocks[b], "attentions")

    out = {}
    for key, value in sd.items():
        if key.startswith("lora_unet_"):
            module, _, suffix = key[len("lora_unet_"):].partition(".")
            ldm = diffusers_to_ldm(module, layers_per_block=lpb, up_has_attention=has_attn)
            assert ldm is not None, module
            key = f"lora_unet_{ldm}.{suffix}"
        out[key] = value
    return out


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_load_generate_unload_is_bit_identical(family, algo):
    pipe = BUILDERS[family]()
    base_image, hashes = generate(pipe), param_hashes(pipe)
    sd = kohya_file(pipe, family, algo=algo, std=0.3 if algo == "loha" else 0.1)
    info = da.load(pipe, sd, "style")
    assert set(info.components) == set(PREFIXES[family])
    assert info.base_family == family
    image = generate(pipe)
    assert np.isfinite(image).all() and np.abs(image - base_image).max() > 1e-3
    da.unload(pipe)
    assert param_hashes(pipe) == hashes
    assert np.array_equal(generate(pipe), base_image)


def test_two_adapters_add_and_unload_one(tmp_path):
    pipe = tiny_sd1_pipeline()
    a = kohya_file(pipe, "sd1")
    b, _ = lycoris_file(pipe.unet, algo="loha", prefix="lora_unet", seed=7, std=0.3)
    da.load(pipe, a, "a")
    only_a = param_hashes(pipe)
    da.load(pipe, b, "b", weight=0.5)
    assert list(da.adapters(pipe)) == ["a", "b"] and da.adapters(pipe)["b"].weight == 0.5
    da.unload(pipe, "b")
    assert param_hashes(pipe) == only_a


def test_half_precision_pipeline_loads_and_restores():
    pipe = tiny_sd1_pipeline(dtype=torch.bfloat16)
    hashes = param_hashes(pipe)
    sd = kohya_file(tiny_sd1_pipeline(), "sd1")
    da.load(pipe, sd)
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16
    assert param_hashes(pipe) != hashes
    da.unload(pipe)
    assert param_hashes(pipe) == hashes


# -- parity with diffusers' own kohya loader ---------------------------------------------------------


def _components_out(pipe):
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[0, 5, 9, 14, 22, 31, 2]])
    outs = {"text_encoder": pipe.text_encoder(ids)[0]}
    if getattr(pipe, "text_encoder_2", None) is not None:
        outs["text_encoder_2"] = pipe.text_encoder_2(ids)[0]
    unet = pipe.unet
    x = torch.randn(1, 4, 8, 8, generator=g)
    c = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=g),
            "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]]),
        }
    outs["unet"] = unet(x, torch.tensor([500]), c, **kwargs).sample
    return outs


@pytest.mark.parametrize("family,ldm", [("sd1", False), ("sdxl", True), ("sdxl", False)])
def test_kohya_lora_matches_diffusers_loader(family, ldm, tmp_path):
    """diffusers' load_lora_weights + fuse_lora is the reference for kohya LoRA (and its SDXL name table)."""
    ours, ref = BUILDERS[family](), BUILDERS[family]()
    sd = kohya_file(ours, family, ldm_names=ldm)
    path = tmp_path / "lora.safetensors"
    save_file(sd, str(path))
    ref.load_lora_weights(str(path), adapter_name="x")
    ref.fuse_lora(components=[c for c in PREFIXES[family]])
    info = da.load(ours, str(path))
    assert info.name == "lora" and info.base_family == family
    with torch.no_grad():
        got, expected = _components_out(ours), _components_out(ref)
    for component in expected:
        err = (got[component] - expected[component]).abs().max().item()
        assert err <= 1e-5, f"{component}: {err}"
    # every module diffusers adapted, we adapted with the same weight
    for component in PREFIXES[family]:
        theirs = {n.replace(".base_layer", ""): q for n, q in getattr(ref, component).named_parameters()
                  if "lora_" not in n}
        for name, p in getattr(ours, component).named_parameters():
            assert (p - theirs[name]).abs().max().item() <= 1e-5, f"{component}.{name}"
