"""Wan image-to-video files: the image cross-attention (``cross_attn.k_img`` / ``v_img`` / ``norm_k_img``) and the
image embedder (``img_emb.proj.*``), ComfyUI and musubi-tuner names, against diffusers' own loader on a tiny
Wan-2.1-I2V transformer, patch and inject; unload bit-exact."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from PIL import Image

import diffadapt as da
from diffadapt.testing import param_hashes, tiny_wan_i2v_pipeline
from dit_files import effective_weights, lora_file
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
    spelling = {"comfyui": "bfl", "comfyui_ab": "bfl_ab"}[layout]  # lora_down/up or lora_A/B
    return lora_file(model, "wan", spelling, alpha=2.0, only=r"^blocks") | lora_file(
        model, "wan", spelling, alpha=None, only=r"^img_emb", seed=1)


def i2v_frames(pipe):
    """Two steps from a fixed image and text embedding (the pipeline's own prompt cleaning needs ftfy); diffusers'
    Wan attention takes the text as the last 512 context tokens, so the embedding has 512."""
    image = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8"))
    with torch.no_grad():
        return pipe(image=image, prompt_embeds=torch.ones(1, 512, 32) * 0.1, guidance_scale=1.0, height=16, width=16,
                    num_frames=5, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).frames


def test_tiny_wan_i2v_pipeline(i2v):
    assert type(i2v).__name__ == "WanImageToVideoPipeline" and i2v.transformer.config.image_dim == 16
    assert param_hashes(i2v.transformer) == param_hashes(tiny_wan_i2v_pipeline().transformer)
    frames = i2v_frames(i2v)
    assert frames.shape == (1, 5, 16, 16, 3) and np.isfinite(frames).all()
    pipe = copy.deepcopy(i2v)  # the image cross-attention is live: a LoRA on it alone changes the video
    da.load(pipe, lora_file(pipe.transformer, "wan", "bfl", only=r"k_img|v_img"), name="x")
    assert np.abs(i2v_frames(pipe) - frames).max() > 1e-4


I2V_MODULES = {"blocks.0.attn2.add_k_proj", "blocks.1.attn2.add_v_proj"}
EMBEDDER = {"condition_embedder.image_embedder.ff.net.0.proj", "condition_embedder.image_embedder.ff.net.2"}


@pytest.mark.parametrize("mode", ["patch", "inject"])
@pytest.mark.parametrize("layout", ["comfyui", "comfyui_ab", "musubi"])
def test_wan_i2v_layouts_match_diffusers(i2v, layout, mode):
    sd = i2v_file(i2v.transformer, layout)
    assert any("cross_attn_k_img" in k or "cross_attn.k_img" in k for k in sd)
    ref = diffusers_reference(i2v, sd)
    # diffusers read the image projections (and, from ComfyUI names, the image embedder) rather than dropping them
    assert I2V_MODULES <= set(ref) and (layout == "musubi" or EMBEDDER <= set(ref))
    pipe = copy.deepcopy(i2v)
    info = load_unload(pipe, sd, ref, mode=mode)
    assert info.layout == ("Wan musubi-tuner" if layout == "musubi" else "Wan ComfyUI")
    assert info.modules == len(ref) and info.base_family == "wan"


def test_wan_i2v_bias_and_head_diffs_match_diffusers(i2v):
    """ComfyUI distillation files: 'diff_b' beside every LoRA (image projections and embedder included) and a
    whole 'head.head.diff' + 'diff_b' — diffusers reads them as lora_B.bias and an identity-up LoRA."""
    sd = i2v_file(i2v.transformer, "comfyui")
    g = torch.Generator().manual_seed(5)
    for k in [k for k in sd if k.endswith(".lora_up.weight")]:
        sd[k.replace(".lora_up.weight", ".diff_b")] = torch.randn(sd[k].shape[0], generator=g) * 0.1
    head = i2v.transformer.proj_out
    sd["diffusion_model.head.head.diff"] = torch.randn(head.weight.shape, generator=g) * 0.1
    sd["diffusion_model.head.head.diff_b"] = torch.randn(head.bias.shape, generator=g) * 0.1
    ref = copy.deepcopy(i2v)
    ref.load_lora_weights({k: v.clone() for k, v in sd.items()})
    ref.fuse_lora()
    theirs = {k.replace(".base_layer", ""): v for k, v in ref.transformer.named_parameters() if "lora_" not in k}
    pipe = copy.deepcopy(i2v)
    before, base = param_hashes(pipe), dict(i2v.transformer.named_parameters())
    info = da.load(pipe, dict(sd), name="x")
    assert info.layout == "Wan ComfyUI" and info.methods == {"lora": info.modules - 1, "full": 1}
    ours = dict(pipe.transformer.named_parameters())
    moved = {k for k in ours if not torch.equal(ours[k], base[k])}
    assert {"blocks.0.attn2.add_k_proj.bias", "condition_embedder.image_embedder.ff.net.2.bias", "proj_out.weight",
            "proj_out.bias"} <= moved
    assert moved == {k for k in theirs if not torch.equal(theirs[k], base[k])}
    assert max((ours[k] - theirs[k]).abs().max().item() for k in moved) <= 1e-5
    da.unload(pipe)
    assert param_hashes(pipe) == before


NORM_DIFFS = {  # native module → diffusers module, for the scale/shift deltas diffusers' converter drops
    "blocks.{i}.norm3": "blocks.{i}.norm2",
    "blocks.{i}.self_attn.norm_q": "blocks.{i}.attn1.norm_q",
    "blocks.{i}.cross_attn.norm_k_img": "blocks.{i}.attn2.norm_added_k",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "patch_embedding": "patch_embedding",
    "time_projection.1": "condition_embedder.time_proj",
}


@pytest.mark.parametrize("layout", ["comfyui", "musubi"])
def test_wan_i2v_norm_and_embedding_diffs_whole_matrix(i2v, layout):
    """'diff' / 'diff_b' on norms, the image embedder's LayerNorms, the Conv3d patch embedding and a lone bias:
    W + diff, b + diff_b on the diffusers parameter (reference written here from the model's own tensors)."""
    pipe = copy.deepcopy(i2v)
    mods = dict(pipe.transformer.named_modules())
    key = (lambda n: "diffusion_model." + n) if layout == "comfyui" else (lambda n: "lora_unet_" + n.replace(".", "_"))
    g = torch.Generator().manual_seed(7)
    sd, want = {}, {}
    for native, name in NORM_DIFFS.items():
        for i in ("0", "1") if "{i}" in native else ("",):
            n, m = native.replace("{i}", i), mods[name.replace("{i}", i)]
            for suffix, p in (("diff", "weight"), ("diff_b", "bias")):
                t = getattr(m, p, None)
                if t is None or (native == "time_projection.1" and p == "weight"):
                    continue
                d = torch.randn(t.shape, generator=g) * 0.1
                sd[f"{key(n)}.{suffix}"] = d
                want[f"{name.replace('{i}', i)}.{p}"] = t.detach() + d
    before = param_hashes(pipe)
    info = da.load(pipe, dict(sd), name="x")
    assert set(info.methods) == {"full"} and info.modules == 10 and info.base_family == "wan"
    params = dict(pipe.transformer.named_parameters())
    assert max((params[k] - v).abs().max().item() for k, v in want.items()) <= 1e-6
    assert {k for k, h in param_hashes(pipe).items() if h != before[k]} == {f"transformer.{k}" for k in want}
    da.unload(pipe)
    assert param_hashes(pipe) == before


MODULATION = {  # how ComfyUI-format files name a delta on an adaLN table → the diffusers parameter
    "diffusion_model.blocks.1.diff_m": "blocks.1.scale_shift_table",
    "diffusion_model.blocks.0.modulation.diff": "blocks.0.scale_shift_table",
    "diffusion_model.head.modulation.diff": "scale_shift_table",
    "lora_unet_blocks_1_modulation.diff": "blocks.1.scale_shift_table",
}


@pytest.mark.parametrize("key", list(MODULATION))
def test_wan_modulation_diffs_on_scale_shift_tables(i2v, key):
    """Wan's adaLN tables (native 'modulation', same (shift, scale, gate …) order) are bare parameters in diffusers
    (its converter drops these deltas): W + w·diff in patch mode, two adapters on one table unload in any order
    bit-exactly; inject mode and a LoRA on a table are refused by name."""
    param = MODULATION[key]
    pipe = copy.deepcopy(i2v)
    table = pipe.transformer.get_parameter(param)
    w0 = table.detach().clone()
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(table.shape, generator=g) * 0.1 for _ in range(2))
    before = param_hashes(pipe)
    info = da.load(pipe, {key: a}, name="a", weight=0.5)
    assert info.methods == {"full": 1} and info.layout.startswith("Wan")
    assert torch.allclose(table, w0 + 0.5 * a, atol=1e-7, rtol=0)
    da.load(pipe, {key: b}, name="b")
    assert torch.allclose(table, w0 + 0.5 * a + b, atol=1e-7, rtol=0)
    assert {k for k, h in param_hashes(pipe).items() if h != before[k]} == {f"transformer.{param}"}
    da.unload(pipe, "a")
    assert torch.allclose(table, w0 + b, atol=1e-7, rtol=0)
    da.unload(pipe, "b")
    assert param_hashes(pipe) == before
    with pytest.raises(da.UnsupportedError, match=rf"{re.escape(param)}.*mode='patch'"):
        da.load(pipe, {key: a}, name="a", mode="inject")
    lora = {key.replace(".diff_m", ".modulation.diff").removesuffix(".diff") + s: t for s, t in (
        (".lora_down.weight", torch.ones(2, 24)), (".lora_up.weight", torch.ones(6, 2)))}
    with pytest.raises(da.ShapeError, match=rf"→ transformer\.{re.escape(param)}: .*only a full diff, not lora"):
        da.load(pipe, lora, name="a")
    with pytest.raises(da.KeyMappingError, match=r"match no module.*'transformer\.proj_out\.weight'"):
        da.load(pipe, {"transformer.proj_out.weight.diff": torch.ones(64, 24)}, name="a")  # a module's own weight
    assert param_hashes(pipe) == before



def test_wan22_second_expert_as_a_bare_transformer(i2v):
    """Wan 2.2 A14B pipelines hold a second expert (``transformer_2``) that no component name covers: a file for it
    loads onto that module directly, as diffusers' load_into_transformer_2 does."""
    expert = copy.deepcopy(i2v.transformer)
    sd = i2v_file(expert, "comfyui") | {"diffusion_model.blocks.0.diff_m": torch.ones(1, 6, 24) * 0.1}
    ref = diffusers_reference(i2v, {k: v for k, v in sd.items() if "diff_m" not in k})
    before, table = param_hashes(expert), expert.blocks[0].scale_shift_table.detach().clone()
    info = da.load(expert, dict(sd), name="low_noise")
    assert info.layout == "Wan ComfyUI" and info.methods == {"lora": len(ref), "full": 1}
    ours = effective_weights(expert)
    assert max((ours[k] - w).abs().max().item() for k, w in ref.items()) <= 1e-6
    assert torch.allclose(expert.blocks[0].scale_shift_table, table + 0.1, atol=1e-7, rtol=0)
    da.unload(expert)
    assert param_hashes(expert) == before


def test_wan_t2v_file_on_i2v_model_matches_diffusers(i2v):
    """diffusers pads a text-to-video LoRA with zero image projections on an i2v model: the same weights."""
    sd = lora_file(i2v.transformer, "wan", "bfl", alpha=2.0, only=r"^blocks\.\{i\}\.(self|cross)_attn\.[qkvo]$")
    assert not any("_img" in k for k in sd)
    ref = diffusers_reference(i2v, sd)
    assert not I2V_MODULES & set(ref)
    load_unload(copy.deepcopy(i2v), sd, ref, mode="patch")


@pytest.mark.parametrize("layout", ["comfyui", "musubi"])
def test_i2v_file_on_a_t2v_model_says_so(i2v, wan, layout):
    """The image-branch keys match nothing on a text-to-video model: the error says why, and nothing changes."""
    sd = i2v_file(i2v.transformer, layout)
    before = param_hashes(wan)
    with pytest.raises(da.KeyMappingError, match="image-to-video") as info:
        da.load(wan, sd, name="x")
    assert "strict=False" in str(info.value) and param_hashes(wan) == before and not da.adapters(wan)
