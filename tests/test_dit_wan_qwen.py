"""Wan and Qwen-Image files: ComfyUI/native (``diffusion_model.…``) and musubi-tuner (``lora_unet_…``) names,
against diffusers' own loader on identical tiny pipelines, patch and inject; unload bit-exact."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import diffadapt as da
from diffadapt.testing import param_hashes
from diffusers import WanVACETransformer3DModel

from dit_files import effective_weights, lora_file, reference_weights
from test_dit_layouts import load_unload, lora_deltas


def diffusers_reference(pipe, sd):
    ref = copy.deepcopy(pipe)
    ref.load_lora_weights({k: v.clone() for k, v in sd.items()})  # diffusers scales some tensors in place
    ref.fuse_lora()
    theirs, base = effective_weights(ref.transformer), effective_weights(pipe.transformer)
    changed = {k: v for k, v in theirs.items() if not torch.equal(v, base[k])}
    assert changed
    return changed


WAN = {"comfyui": "bfl", "musubi": "kohya"}  # layout → lora_file spelling (diffusion_model.… / lora_unet_…)


@pytest.mark.parametrize("mode", ["patch", "inject"])
@pytest.mark.parametrize("layout", list(WAN))
def test_wan_layouts_match_diffusers(wan, layout, mode):
    """Transformer blocks: diffusers' converters refuse alphas on top-level modules and the patch conv."""
    sd = lora_file(wan.transformer, "wan", WAN[layout], alpha=2.0, only=r"^blocks")
    info = da.inspect(dict(sd))
    assert info.base_family == "wan" and info.components == {"transformer": len(sd) // 3}
    pipe = copy.deepcopy(wan)
    load_unload(pipe, sd, diffusers_reference(wan, sd), mode=mode)


@pytest.mark.parametrize("layout", list(WAN))
def test_wan_every_module_whole_matrix(wan, layout):
    """Embedders, time projection, head and the Conv3d patch embedding too, with alphas: W + alpha/r·up@down."""
    pipe = copy.deepcopy(wan)
    sd = lora_file(pipe.transformer, "wan", WAN[layout], alpha=2.0)
    assert "patch_embedding" in "".join(sd)
    ref = reference_weights(pipe.transformer, "wan", lora_deltas(pipe.transformer, WAN[layout], sd, family="wan"))
    load_unload(pipe, sd, ref, mode="patch")


def qwen_file(model, key, *, seed=0, rank=4, alpha=2.0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            k = key(name)
            sd[f"{k}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.2
            sd[f"{k}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.2
            sd[f"{k}.alpha"] = torch.tensor(alpha)
    return sd


QWEN = {"comfyui": lambda n: "diffusion_model." + n, "musubi": lambda n: "lora_unet_" + n.replace(".", "_")}


@pytest.mark.parametrize("mode", ["patch", "inject"])
@pytest.mark.parametrize("layout", list(QWEN))
def test_qwen_image_layouts_match_diffusers(qwen, layout, mode):
    sd = qwen_file(qwen.transformer, QWEN[layout])
    if layout == "musubi":  # diffusers' name splitter handles block modules and a fixed top-level list
        sd = {k: v for k, v in sd.items() if "transformer_blocks" in k or "img_in" in k or "proj_out" in k}
    info = da.inspect(dict(sd))
    assert info.base_family == "qwen"
    pipe = copy.deepcopy(qwen)
    load_unload(pipe, sd, diffusers_reference(qwen, sd), mode=mode)


def test_wan_file_on_qwen_names_both(wan, qwen):
    pipe = copy.deepcopy(qwen)
    sd = lora_file(wan.transformer, "wan", "kohya", only=r"^blocks")
    before = param_hashes(pipe)
    with pytest.raises(da.KeyMappingError, match=r"Wan musubi-tuner layout.*transformer.*Wan; the model is Qwen-Image"):
        da.load(pipe, sd)
    assert param_hashes(pipe) == before


def test_wan_lora_with_bias_deltas_matches_diffusers(wan):
    """ComfyUI-format Wan files carry 'diff_b' beside a LoRA (diffusers: lora_B.bias); Δb is added as written."""
    sd = lora_file(wan.transformer, "wan", "bfl", alpha=2.0, only=r"^blocks\.\{i\}\.(self|cross)_attn")
    g = torch.Generator().manual_seed(9)
    for k in [k for k in sd if k.endswith(".lora_up.weight")]:
        sd[k.replace(".lora_up.weight", ".diff_b")] = torch.randn(sd[k].shape[0], generator=g) * 0.1
    ref = copy.deepcopy(wan)
    ref.load_lora_weights({k: v.clone() for k, v in sd.items()})
    ref.fuse_lora()
    pipe = copy.deepcopy(wan)
    before = param_hashes(pipe)
    da.load(pipe, dict(sd), name="x")
    ours = dict(pipe.transformer.named_parameters())
    theirs = {k.replace(".base_layer", ""): v for k, v in ref.transformer.named_parameters()}
    biases = [k for k in ours if k.endswith(".bias") and ("attn1" in k or "attn2" in k) and "norm" not in k]
    base = dict(wan.transformer.named_parameters())
    assert biases and all(not torch.equal(ours[k], base[k]) for k in biases)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in biases) <= 1e-6
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours if k.endswith("weight")) <= 1e-5
    with pytest.raises(da.UnsupportedError, match="diff_b"):
        da.load(copy.deepcopy(wan), dict(sd), name="y", mode="inject")
    da.unload(pipe)
    assert param_hashes(pipe) == before


def test_wan_comfyui_norm_and_bias_diffs(wan):
    """Distillation LoRAs for Wan (ComfyUI format) also move norm scales ('norm3.diff', 'self_attn.norm_q.diff')
    and lone biases ('ffn.0.diff_b'): W + diff, b + diff_b; diffusers skips the norm diffs."""
    pipe = copy.deepcopy(wan)
    mods = dict(pipe.transformer.named_modules())
    g = torch.Generator().manual_seed(11)
    sd, want = {}, {}
    for i in range(2):
        for native, name in ((f"blocks.{i}.norm3", f"blocks.{i}.norm2"),
                             (f"blocks.{i}.self_attn.norm_q", f"blocks.{i}.attn1.norm_q"),
                             (f"blocks.{i}.cross_attn.norm_k", f"blocks.{i}.attn2.norm_k")):
            d = torch.randn(mods[name].weight.shape, generator=g) * 0.1
            sd[f"diffusion_model.{native}.diff"] = d
            want[f"{name}.weight"] = mods[name].weight.detach() + d
        b = torch.randn(mods[f"blocks.{i}.ffn.net.0.proj"].bias.shape, generator=g) * 0.1
        sd[f"diffusion_model.blocks.{i}.ffn.0.diff_b"] = b
        want[f"blocks.{i}.ffn.net.0.proj.bias"] = mods[f"blocks.{i}.ffn.net.0.proj"].bias.detach() + b
    before = param_hashes(pipe)
    info = da.load(pipe, sd, name="x")
    assert info.methods == {"full": 8} and info.base_family == "wan"  # 2 blocks × (3 norms + 1 bias)
    params = dict(pipe.transformer.named_parameters())
    assert max((params[k] - v).abs().max().item() for k, v in want.items()) <= 1e-6
    changed = {k for k, h in param_hashes(pipe).items() if h != before[k]}
    assert changed == {f"transformer.{k}" for k in want}
    da.unload(pipe)
    assert param_hashes(pipe) == before


@pytest.fixture(scope="module")
def vace():
    """A tiny Wan-VACE transformer (two VACE blocks beside two Wan blocks) in a minimal pipeline-like holder."""
    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32, vace_layers=[0, 1],
        vace_in_channels=8)
    return SimpleNamespace(transformer=model, components={"transformer": model})


@pytest.mark.parametrize("mode", ["patch", "inject"])
@pytest.mark.parametrize("layout", list(WAN))
def test_wan_vace_blocks_whole_matrix(vace, layout, mode):
    """VACE's blocks (native 'vace_blocks.{i}', with 'before_proj' / 'after_proj') and its patch embedding:
    W + alpha/r·up@down (diffusers' Wan converter reads no VACE keys)."""
    pipe = copy.deepcopy(vace)
    sd = lora_file(pipe.transformer, "wan", WAN[layout], alpha=2.0, only=r"^vace_")
    names = "".join(sd).replace("_", ".")
    assert all(n in names for n in ("vace.blocks.0.before.proj", "vace.blocks.1.after.proj", "vace.patch.embedding"))
    ref = reference_weights(pipe.transformer, "wan", lora_deltas(pipe.transformer, WAN[layout], sd, family="wan"))
    assert "vace_blocks.1.attn2.to_out.0" in ref and "vace_blocks.0.proj_in" in ref
    info = load_unload(pipe, sd, ref, mode=mode)
    assert info.layout == {"comfyui": "Wan ComfyUI", "musubi": "Wan musubi-tuner"}[layout]
