"""SD3 MMDiT names, DiT text encoders (CLIP-L, CLIP-G, T5), the oldest diffusers text-encoder keys, and the
errors a user sees for files of another family — all against diffusers or whole-matrix references."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import diffadapt as da
from diffadapt.testing import param_hashes, tiny_sd1_pipeline
from dit_files import effective_weights, lora_file, method_file, native_modules, reference_weights
from test_dit_layouts import load_unload, lora_deltas


def sd3_deltas(model, sd):
    out = {}
    for native in native_modules(model, "sd3"):
        k = "lora_unet_" + native.replace(".", "_")
        if f"{k}.lora_down.weight" not in sd:
            continue
        d, u = sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"]
        out[native] = float(sd[f"{k}.alpha"]) / d.shape[0] * u.flatten(1) @ d.flatten(1)
    return out


@pytest.mark.parametrize("mode", ["patch", "inject"])
def test_sd3_kohya_every_module(sd3, mode):
    """joint_blocks x/context qkv (fused), proj, mlp, adaLN (the last context block and final layer as
    AdaLayerNormContinuous: halves exchanged), embedders incl. the patch conv. diffusers reads none of it."""
    pipe = copy.deepcopy(sd3)
    sd = lora_file(pipe.transformer, "sd3", "kohya", alpha=2.0)
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight" in sd
    assert "lora_unet_x_embedder_proj.lora_down.weight" in sd
    ref = reference_weights(pipe.transformer, "sd3", sd3_deltas(pipe.transformer, sd))
    info = load_unload(pipe, sd, ref, mode=mode)
    assert info.base_family == "sd3" and info.format == "kohya"
    assert da.inspect(dict(sd)).summary().count("sd3") == 1


FAMILY_METHODS = {  # family → (fixture, layout spelling, native modules to adapt)
    "sd3": ("sd3", "kohya", r"attn\.qkv|adaLN"),  # fused qkv, modulations (last block: halves exchanged)
    "wan": ("wan", "bfl", r"self_attn\.[qo]$|cross_attn\.v$|ffn\.2"),  # ComfyUI names
}


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr", "full", "oft"])
@pytest.mark.parametrize("family", list(FAMILY_METHODS))
def test_methods_on_native_names(request, family, method):
    fixture, layout, only = FAMILY_METHODS[family]
    base = request.getfixturevalue(fixture)
    pipe = copy.deepcopy(base)
    sd, changes = method_file(pipe.transformer, family, layout, method, only=only)
    assert sd
    load_unload(pipe, sd, reference_weights(pipe.transformer, family, changes), mode="patch")


def te_file(module, key, *, seed=0, rank=2, alpha=1.0):
    g = torch.Generator().manual_seed(seed)
    sd, ref = {}, {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers.0." in name or "block.0." in name and isinstance(m, torch.nn.Linear):
            k = key(name)
            down, up = torch.randn(rank, m.in_features, generator=g) * 0.2, torch.randn(m.out_features, rank, generator=g) * 0.2
            sd |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(alpha)}
            ref[name] = m.weight.detach() + alpha / rank * up @ down
    return sd, ref


def check_component(pipe, component, ref, base):
    mods = dict(getattr(pipe, component).named_modules())
    g = torch.Generator().manual_seed(0)
    for name, w in ref.items():
        x = torch.randn(2, w.shape[1], generator=g)
        with torch.no_grad():
            assert (mods[name](x) - torch.nn.functional.linear(x, w, mods[name].bias)).abs().max() <= 1e-5, name
    for name, w in base.items():
        if name not in ref:
            assert torch.equal(effective_weights(getattr(pipe, component))[name], w)


LAYOUT_TE = {  # layout → (CLIP-L key, T5 key)
    "kohya": (lambda n: "lora_te1_" + n.replace(".", "_"), lambda n: "lora_te3_" + n.replace(".", "_")),
    "comfyui": (lambda n: "text_encoders.clip_l.transformer." + n, lambda n: "text_encoders.t5xxl.transformer." + n),
}


@pytest.mark.parametrize("mode", ["patch", "inject"])
@pytest.mark.parametrize("layout", list(LAYOUT_TE))
def test_flux_text_encoders_clip_l_and_t5(flux, layout, mode):
    pipe = copy.deepcopy(flux)
    clip_key, t5_key = LAYOUT_TE[layout]
    sd1, ref1 = te_file(pipe.text_encoder, clip_key, seed=1)
    sd2, ref2 = te_file(pipe.text_encoder_2, t5_key, seed=2)
    sd3_, ref3 = lora_file(pipe.transformer, "flux", "kohya" if layout == "kohya" else "bfl", only="img_attn"), None
    before = param_hashes(pipe)
    bases = {c: effective_weights(getattr(pipe, c)) for c in ("text_encoder", "text_encoder_2")}
    info = da.load(pipe, {**sd1, **sd2, **sd3_}, name="x", mode=mode)
    assert info.components == {"text_encoder": len(ref1), "text_encoder_3": len(ref2), "transformer": 4}
    check_component(pipe, "text_encoder", ref1, bases["text_encoder"])
    check_component(pipe, "text_encoder_2", ref2, bases["text_encoder_2"])  # T5 sits in Flux's text_encoder_2
    da.unload(pipe)
    assert param_hashes(pipe) == before


def test_flux_clip_l_matches_diffusers(flux):
    sd, _ = te_file(flux.text_encoder, LAYOUT_TE["kohya"][0], seed=4, alpha=1.0)
    sd |= lora_file(flux.transformer, "flux", "kohya", only="img_mlp")
    ref = copy.deepcopy(flux)
    ref.load_lora_weights({k: v.clone() for k, v in sd.items()})  # diffusers scales some tensors in place
    ref.fuse_lora(components=["transformer", "text_encoder"])
    theirs = effective_weights(ref.text_encoder)
    pipe = copy.deepcopy(flux)
    base = effective_weights(pipe.text_encoder)
    changed = {k: v for k, v in theirs.items() if not torch.equal(v, base[k])}
    assert changed
    da.load(pipe, dict(sd), name="x")
    check_component(pipe, "text_encoder", changed, base)


def test_sd3_text_encoders_clip_l_clip_g(sd3):
    pipe = copy.deepcopy(sd3)
    sd1, ref1 = te_file(pipe.text_encoder, lambda n: "lora_te1_" + n.replace(".", "_"), seed=5)
    sd2, ref2 = te_file(pipe.text_encoder_2, lambda n: "text_encoders.clip_g.transformer." + n, seed=6)
    bases = {c: effective_weights(getattr(pipe, c)) for c in ("text_encoder", "text_encoder_2")}
    before = param_hashes(pipe)
    da.load(pipe, {**sd1, **sd2}, name="x")
    check_component(pipe, "text_encoder", ref1, bases["text_encoder"])
    check_component(pipe, "text_encoder_2", ref2, bases["text_encoder_2"])
    da.unload(pipe)
    assert param_hashes(pipe) == before


def test_oldest_diffusers_text_encoder_keys_match_diffusers():
    """diffusers 0.17–0.19 wrote 'text_encoder.….self_attn.to_q_lora.down.weight' for CLIP's q_proj."""
    base_pipe = tiny_sd1_pipeline()
    g = torch.Generator().manual_seed(7)
    sd = {}
    for layer in range(2):
        for proj, width in (("to_q", 32), ("to_k", 32), ("to_v", 32), ("to_out", 32)):
            k = f"text_encoder.text_model.encoder.layers.{layer}.self_attn.{proj}_lora"
            sd[f"{k}.down.weight"] = torch.randn(4, width, generator=g) * 0.2
            sd[f"{k}.up.weight"] = torch.randn(width, 4, generator=g) * 0.2
    ref = copy.deepcopy(base_pipe)
    ref.load_lora_weights({k: v.clone() for k, v in sd.items()})  # diffusers scales some tensors in place
    ref.fuse_lora()
    theirs = effective_weights(ref.text_encoder)
    base = effective_weights(base_pipe.text_encoder)
    changed = {k: v for k, v in theirs.items() if not torch.equal(v, base[k])}
    assert len(changed) == 8
    pipe = copy.deepcopy(base_pipe)
    info = da.load(pipe, dict(sd), name="x")
    assert info.components == {"text_encoder": 8}
    check_component(pipe, "text_encoder", changed, base)


# -- errors ------------------------------------------------------------------------------------------


def test_flux_file_on_sd3_names_layout_and_families(sd3, flux):
    pipe = copy.deepcopy(sd3)
    sd = lora_file(flux.transformer, "flux", "kohya") | te_file(flux.text_encoder, LAYOUT_TE["kohya"][0])[0]
    before = param_hashes(pipe)
    for strict in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(da.KeyMappingError) as e:
                da.load(pipe, dict(sd), strict=strict)
        msg = str(e.value)
        assert msg.count("Flux kohya layout") == 1 and "the model is SD3" in msg and "'unet'" not in msg
        assert param_hashes(pipe) == before and not da.adapters(pipe)


def test_strict_false_never_loads_only_the_text_encoder(flux, sd3):
    """A file whose transformer part matches nothing must not load its text-encoder part silently."""
    pipe = copy.deepcopy(flux)
    sd = lora_file(sd3.transformer, "sd3", "kohya") | te_file(flux.text_encoder, LAYOUT_TE["kohya"][0])[0]
    before = param_hashes(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(da.KeyMappingError, match=r"SD3 kohya layout.*transformer.*nothing was loaded"):
            da.load(pipe, dict(sd), strict=False)
    assert param_hashes(pipe) == before


def test_fused_module_of_wrong_width_is_a_shape_error(flux):
    pipe = copy.deepcopy(flux)
    sd = lora_file(flux.transformer, "flux", "kohya", only=r"img_attn\.qkv")
    sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.randn(40, 4)
    before = param_hashes(pipe)
    with pytest.raises(da.ShapeError, match=r"lora_unet_double_blocks_0_img_attn_qkv.*to_q \(16\) \+ .*to_v \(16\)"):
        da.load(pipe, sd)
    assert param_hashes(pipe) == before


def test_names_shared_by_families_follow_the_model(flux, sd3):
    """'final_layer.linear' / 'context_embedder' exist in Flux and SD3 files alike: the model decides."""
    for pipe, family in ((flux, "flux"), (sd3, "sd3")):
        pipe = copy.deepcopy(pipe)
        sd = lora_file(pipe.transformer, family, "kohya", only=r"^final_layer|^context_embedder|^txt_in")
        assert da.inspect(dict(sd)).base_family == "dit"
        deltas = {n: d for n, d in sd3_or_flux_deltas(pipe.transformer, family, sd).items()}
        load_unload(pipe, sd, reference_weights(pipe.transformer, family, deltas), mode="patch")


def sd3_or_flux_deltas(model, family, sd):
    return sd3_deltas(model, sd) if family == "sd3" else lora_deltas(model, "kohya", sd)


def test_sd35_medium_dual_attention_and_qk_norms():
    """SD3.5 Medium's MMDiT-X blocks: x_block.attn2.qkv (fused) → attn2.to_q/k/v, on a bare transformer."""
    from diffusers import SD3Transformer2DModel

    from diffadapt.architectures import _build

    model = _build("transformer", lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,)), seed=0, dtype=torch.float32,
        device="cpu")
    sd = lora_file(model, "sd3", "kohya", alpha=2.0, only=r"x_block\.attn2|x_block\.attn\.qkv")
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight" in sd
    ref = reference_weights(model, "sd3", sd3_deltas(model, sd))
    before = param_hashes(model)
    base = effective_weights(model)
    da.load(model, dict(sd), name="x")
    ours = effective_weights(model)
    assert max((ours[k] - v).abs().max().item() for k, v in ref.items()) <= 1e-5
    assert all(torch.equal(ours[k], base[k]) for k in base if k not in ref)
    da.unload(model)
    assert param_hashes(model) == before
    check_norm_diffs(model, "joint_blocks.{i}.", {
        "x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k", "x_block.attn2.ln_q": "attn2.norm_q",
        "x_block.attn2.ln_k": "attn2.norm_k", "context_block.attn.ln_q": "attn.norm_added_q",
        "context_block.attn.ln_k": "attn.norm_added_k"}, "transformer_blocks.{i}.", blocks=1)


def check_norm_diffs(model, native_block, names, block, *, blocks=2, prefix="diffusion_model."):
    """ComfyUI-format 'diff' on q/k norm scales (the single-file converters' mapping): W + diff, unload exact."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(4)
    sd, want = {}, {}
    for i in map(str, range(blocks)):
        for native, name in names.items():
            w = params[f"{block}{name}.weight".replace("{i}", i)]
            sd[f"{prefix}{native_block}{native}.diff".replace("{i}", i)] = d = torch.randn(w.shape, generator=g)
            want[f"{block}{name}.weight".replace("{i}", i)] = w.detach() + d
    before = param_hashes(model)
    info = da.load(model, sd, name="n")
    assert info.methods == {"full": len(want)}
    assert {k for k, h in param_hashes(model).items() if h != before[k]} == set(want)
    assert max((params[k] - v).abs().max().item() for k, v in want.items()) <= 1e-6
    da.unload(model, "n")
    assert param_hashes(model) == before


def test_flux_qk_norm_diffs(flux):
    check_norm_diffs(copy.deepcopy(flux.transformer), "double_blocks.{i}.", {
        "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
        "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"},
        "transformer_blocks.{i}.")
    check_norm_diffs(copy.deepcopy(flux.transformer), "single_blocks.{i}.", {
        "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}, "single_transformer_blocks.{i}.")
