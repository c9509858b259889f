"""Mixing, hotswap, save and convert on Flux files with fused projections."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import diffadapt as da
from diffadapt.testing import param_hashes
from dit_files import effective_weights, lora_file, method_file, native_modules, reference_weights
from test_dit_layouts import check, lora_deltas


def test_mix_hotswap_weights_on_fused_modules(flux):
    pipe = copy.deepcopy(flux)
    before, base = param_hashes(pipe), effective_weights(pipe.transformer)
    a = lora_file(pipe.transformer, "flux", "kohya", seed=1)
    b, changes_b = method_file(pipe.transformer, "flux", "bfl", "loha", only=r"qkv|linear1")
    da.load(pipe, dict(a), name="a")
    da.load(pipe, dict(b), name="b")
    da.set_weights(pipe, {"a": 0.5, "b": 0.0})
    ref = reference_weights(flux.transformer, "flux",
                            {k: 0.5 * v for k, v in lora_deltas(pipe.transformer, "kohya", a).items()})
    check(pipe, ref, base)
    c = lora_file(pipe.transformer, "flux", "bfl", seed=2)
    da.hotswap(pipe, dict(c), "a")  # same name, new file in another layout; weight 0.5 stays
    ref = reference_weights(flux.transformer, "flux",
                            {k: 0.5 * v for k, v in lora_deltas(pipe.transformer, "bfl", c).items()})
    check(pipe, ref, base)
    da.unload(pipe)
    assert param_hashes(pipe) == before


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_save_and_reload(flux, fmt, tmp_path):
    """kohya: the file's own sd-scripts names, fused modules whole (a ComfyUI/BFL file comes back as sd-scripts'
    lora_unet_double_blocks_0_img_attn_qkv); peft: diffusers names, split. Both reload exactly."""
    pipe = copy.deepcopy(flux)
    base = effective_weights(pipe.transformer)
    sd = lora_file(pipe.transformer, "flux", "bfl", seed=3)
    ref = reference_weights(pipe.transformer, "flux", lora_deltas(pipe.transformer, "bfl", sd))
    t5 = {"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.randn(2, 32),
          "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.randn(32, 2)}
    da.load(pipe, {**sd, **t5}, name="a")
    dest = tmp_path / ("a.safetensors" if fmt == "kohya" else "a")
    paths = da.save(pipe, "a", dest, format=fmt)
    keys = set(load_file(paths[0])) if fmt == "kohya" else None
    if keys is not None:
        assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
        assert {k.split(".")[0] for k in keys if k.startswith("lora_unet_")} == {
            "lora_unet_" + n.replace(".", "_") for n in native_modules(flux.transformer, "flux")}
        assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight" in keys  # T5, as sd-scripts
    da.unload(pipe)
    info = da.load(pipe, dest, name="b")
    assert info.modules == (len(sd) // 3 if fmt == "kohya" else len(ref)) + 1
    check(pipe, ref, base)


def test_inspect_reports_family_layout_alphas(flux):
    sd = lora_file(flux.transformer, "flux", "bfl_ab", alpha=8.0, rank=4)
    info = da.inspect(sd)
    assert (info.base_family, info.alphas, info.ranks) == ("flux", {8.0: info.modules}, {4: info.modules})
    assert info.modules == len(native_modules(flux.transformer, "flux"))


def test_convert_flux_kohya_to_peft_without_a_model(tmp_path):
    """Names resolve against the meta-device Flux-dev architecture: fused qkv/linear1 become diffusers' modules."""
    from diffadapt.architectures import flux_dev_transformer

    meta = flux_dev_transformer(device="meta", num_layers=1, num_single_layers=1)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for native, targets in native_modules(meta, "flux").items():
        mods = dict(meta.named_modules())
        out, inn = sum(mods[t].weight.shape[0] for t in targets), mods[targets[0]].weight.shape[1]
        k = "lora_unet_" + native.replace(".", "_")
        sd |= {f"{k}.lora_down.weight": torch.randn(2, inn, generator=g), f"{k}.lora_up.weight": torch.randn(out, 2, generator=g),
               f"{k}.alpha": torch.tensor(1.0)}
    src = tmp_path / "flux.safetensors"
    from safetensors.torch import save_file
    save_file(sd, src)
    paths = da.convert(src, tmp_path / "out.safetensors", format="peft")
    keys = set(load_file(paths[0]))
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in keys
    assert "transformer.norm_out.linear.lora_A.weight" in keys
    out = load_file(paths[0])
    k_up = out["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"]
    k_down = out["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"]
    whole = 0.5 * sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] @ sd[
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert (k_up @ k_down * 1.0 / 2 - whole[3072:6144]).abs().max() < 1e-5  # lora_alpha 1, r 2 in the config


@pytest.mark.parametrize("mode", ["patch", "inject"])
def test_hotswap_fused_flux_files_under_compile(flux, mode):
    """Swaps between Flux layouts (rank 4 → 2) on the split q/k/v rows: the compiled transformer never recompiles
    (patch: in-place writes; inject: prepare_hotswap's padded layers)."""
    import numpy as np

    from diffadapt.testing import generate

    pipe, eager = copy.deepcopy(flux), copy.deepcopy(flux)
    a = lora_file(pipe.transformer, "flux", "kohya", seed=1)
    b = lora_file(pipe.transformer, "flux", "bfl", seed=2, rank=2)
    da.load(pipe, dict(a), name="s", mode=mode)
    if mode == "inject":
        da.prepare_hotswap(pipe, max_rank=8)
    pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
    generate(pipe, steps=1, max_sequence_length=16)
    with torch._dynamo.config.patch(error_on_recompile=True):
        da.hotswap(pipe, dict(b), "s")
        da.set_weights(pipe, {"s": 0.5})
        got = generate(pipe, steps=1, max_sequence_length=16)
    da.load(eager, dict(b), name="s", weight=0.5)
    np.testing.assert_allclose(got, generate(eager, steps=1, max_sequence_length=16), atol=1e-5)


def test_saved_kohya_flux_file_is_read_by_diffusers(flux, tmp_path):
    """A ComfyUI/BFL Flux file saved as kohya comes out in sd-scripts' names, which diffusers' Flux loader reads
    (double blocks: its single-block split is hard-wired to Flux-dev's width): same weights after its load + fuse."""
    pipe = copy.deepcopy(flux)
    sd = lora_file(pipe.transformer, "flux", "bfl", seed=4, only=r"^double_blocks")
    da.load(pipe, dict(sd), name="a")
    path = da.save(pipe, "a", tmp_path / "a.safetensors", format="kohya")[0]
    ref = copy.deepcopy(flux)
    ref.load_lora_weights(path)
    ref.fuse_lora()
    ours, theirs = effective_weights(pipe.transformer), effective_weights(ref.transformer)
    base = effective_weights(flux.transformer)
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert len(changed) == 2 * 14  # per double block: q, k, v split, out, mlp ×2, modulation; the same for text
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5


def test_convert_comfyui_flux_to_kohya_keeps_native_names(flux, tmp_path):
    """File → file with no model: BFL names become sd-scripts names, fused modules stay whole, CLIP-L is te1."""
    from safetensors.torch import save_file

    sd = lora_file(flux.transformer, "flux", "bfl", seed=6)
    sd |= {"text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight":
           torch.randn(2, 32), "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
           ".lora_up.weight": torch.randn(32, 2)}
    save_file(sd, tmp_path / "bfl.safetensors")
    out = load_file(da.convert(tmp_path / "bfl.safetensors", tmp_path / "kohya.safetensors", format="kohya")[0])
    assert torch.equal(out["lora_unet_single_blocks_1_linear1.lora_up.weight"],
                       sd["diffusion_model.single_blocks.1.linear1.lora_up.weight"])
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in out
    pipe, base = copy.deepcopy(flux), effective_weights(flux.transformer)
    da.load(pipe, tmp_path / "kohya.safetensors")
    check(pipe, reference_weights(flux.transformer, "flux", lora_deltas(flux.transformer, "bfl", sd)), base)
