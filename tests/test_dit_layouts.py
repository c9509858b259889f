"""Flux files in every layout their tools write, each method split over fused projections, patch and inject.

References: diffusers' own ``load_lora_weights`` + ``fuse_lora`` on an identical pipeline where diffusers reads
the layout (kohya / BFL / XLabs double blocks, diffusers names with alpha tensors), else the whole native
module's ΔW (or W') from LyCORIS' functional forms, stacked over the diffusers modules and sliced.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import diffadapt as da
from diffadapt.api import read_spec
from diffadapt.pipeline import resolve
from diffadapt.testing import param_hashes
from dit_files import effective_weights, lora_file, method_file, native_modules, reference_weights, shapes

TOL = 1e-5


def fresh(pipe):
    return copy.deepcopy(pipe)


def lora_deltas(model, layout, sd, family="flux"):
    """{native: alpha/r · up @ down} read straight off the file's tensors."""
    from dit_files import PREFIX

    name, (dn, up) = PREFIX[layout]
    out = {}
    for native in native_modules(model, family, xlabs=layout == "xlabs"):
        k = name(native)
        if f"{k}.{dn}" not in sd:
            continue
        d, u = sd[f"{k}.{dn}"], sd[f"{k}.{up}"]
        a = float(sd[f"{k}.alpha"]) if f"{k}.alpha" in sd else d.shape[0]
        out[native] = a / d.shape[0] * u.flatten(1) @ d.flatten(1)
    return out


def check(pipe, ref: dict[str, torch.Tensor], base: dict[str, torch.Tensor], component: str = "transformer"):
    """Each module's output equals a plain layer with the reference weight (others: the base weight).
    Comparing outputs covers both modes: patch writes W, inject runs peft's unfused layers."""
    model = getattr(pipe, component)
    mods = dict(model.named_modules())
    assert ref
    g = torch.Generator().manual_seed(0)
    for name, w0 in base.items():
        m = mods[name]
        layer = getattr(m, "base_layer", m)
        w = ref.get(name, w0)
        x = torch.randn(3, w.shape[1], *([4] * (w.dim() - 2)), generator=g)
        with torch.no_grad():
            want = layer._conv_forward(x, w, layer.bias) if isinstance(layer, torch.nn.modules.conv._ConvNd) else \
                torch.nn.functional.linear(x, w, layer.bias)
            err = (m(x) - want).abs().max().item()
        assert err <= TOL, (name, err)


def load_unload(pipe, sd, ref, *, mode):
    before, base = param_hashes(pipe), effective_weights(pipe.transformer)
    info = da.load(pipe, dict(sd), name="x", mode=mode)
    check(pipe, ref, base)
    assert mode == "inject" or all(torch.equal(effective_weights(pipe.transformer)[k], base[k]) for k in base
                                   if k not in ref)
    da.unload(pipe, "x")
    assert param_hashes(pipe) == before
    return info


LAYOUTS = {"kohya": "Flux kohya", "bfl": "Flux ComfyUI/BFL", "bfl_ab": "Flux ComfyUI/BFL", "ldm": "Flux ComfyUI/BFL",
           "xlabs": "Flux XLabs"}


@pytest.mark.parametrize("mode", ["patch", "inject"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flux_lora_layouts_whole_matrix(flux, layout, mode):
    pipe = fresh(flux)
    sd = lora_file(pipe.transformer, "flux", layout, alpha=None if layout == "xlabs" else 2.0)
    ref = reference_weights(pipe.transformer, "flux", lora_deltas(pipe.transformer, layout, sd), xlabs=layout == "xlabs")
    info = load_unload(pipe, sd, ref, mode=mode)
    assert info.base_family == "flux" and info.components == {"transformer": len(native_modules(
        pipe.transformer, "flux", xlabs=layout == "xlabs"))}
    assert info.alphas == ({4.0: info.modules} if layout == "xlabs" else {2.0: info.modules})  # no alpha: = r
    assert info.layout == LAYOUTS[layout] and f"({LAYOUTS[layout]} layout)" in info.summary()


@pytest.mark.parametrize("layout", ["kohya", "bfl", "xlabs"])
def test_flux_double_blocks_match_diffusers(flux, layout):
    """diffusers reads double blocks in these layouts (its single-block split is hard-wired to Flux-dev's width,
    and it drops the top-level modules), so the comparison is on the double blocks — and XLabs' single-block
    proj_lora, a LoRA on linear2 (proj_out), which diffusers does not split."""
    only = r"^double_blocks|^single_blocks.*proj_lora" if layout == "xlabs" else r"^double_blocks"
    sd = lora_file(flux.transformer, "flux", layout, alpha=None if layout == "xlabs" else 3.0, only=only)
    ref = fresh(flux)
    ref.load_lora_weights({k: v.clone() for k, v in sd.items()})  # diffusers scales some tensors in place
    ref.fuse_lora()
    theirs = effective_weights(ref.transformer)
    pipe = fresh(flux)
    base = effective_weights(pipe.transformer)
    changed = {k for k in theirs if not torch.equal(theirs[k], base[k])}
    assert len(changed) == (28 if layout != "xlabs" else 18)  # 2 blocks × (qkv split in 3, ×2 streams …)
    assert layout != "xlabs" or {"single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"} <= changed
    load_unload(pipe, sd, {k: theirs[k] for k in changed}, mode="patch")


def test_diffusers_names_with_alpha_tensors_match_diffusers(flux):
    """transformer.….lora_A/lora_B plus .alpha (ai-toolkit-style): scaled by alpha/r, as diffusers does."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp", "proj_out"):
        w = dict(flux.transformer.named_modules())[name].weight
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.2
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.2
        sd[f"transformer.{name}.alpha"] = torch.tensor(2.0)
    ref = fresh(flux)
    ref.load_lora_weights({k: v.clone() for k, v in sd.items()})  # diffusers scales some tensors in place
    ref.fuse_lora()
    theirs = effective_weights(ref.transformer)
    assert da.inspect(dict(sd)).alphas == {2.0: 3}
    pipe = fresh(flux)
    load_unload(pipe, sd, {k: theirs[k] for k in ("transformer_blocks.0.attn.to_q",
                                                   "single_transformer_blocks.1.proj_mlp", "proj_out")}, mode="patch")


# method × layout on the fused modules (qkv of both streams, single linear1) and a modulation
FUSED = r"img_attn\.qkv|txt_attn\.qkv|linear1|img_mod|final_layer\.adaLN"
METHODS = {  # method → modes that hold it exactly (inject refuses the rest by name)
    "lora": ("patch", "inject"),
    "dora": ("patch", "inject"),
    "loha": ("patch", "inject"),
    "lokr": ("patch",),  # blocks aligned with the fused rows: stays a LoKr (inject: not peft's factorization)
    "lokr_cut": ("patch",),  # blocks straddle the cuts: exact rows of ΔW, as full params
    "full": ("patch",),
    "oft": ("patch",),
}


def CUT(out: int) -> int:
    """Kronecker blocks of c rows that straddle the 16-row cuts between the tiny model's fused modules."""
    return next(c for c in (12, 14, 32) if out % c == 0)


@pytest.mark.parametrize("layout", ["kohya", "bfl"])
@pytest.mark.parametrize("method", list(METHODS))
def test_flux_methods_split_over_fused_modules(flux, method, layout):
    pipe = fresh(flux)
    kind = "lokr" if method == "lokr_cut" else method
    only = FUSED if method != "oft" else r"img_attn\.qkv|linear1|img_mod"
    sd, changes = method_file(pipe.transformer, "flux", layout, kind, only=only, lokr_c=CUT if method == "lokr_cut" else 8)
    ref = reference_weights(pipe.transformer, "flux", changes)
    if kind == "lokr":  # an aligned cut keeps the Kronecker form; a straddling one becomes exact full rows
        targets = resolve(pipe, read_spec(dict(sd)))
        assert {type(t.patch.params).__name__ for t in targets if "to_q" in t.module_name} == {
            "LoKrParams" if method == "lokr" else "FullParams"}
    for mode in ("patch", "inject"):
        if mode in METHODS[method]:
            load_unload(pipe, sd, ref, mode=mode)
        else:
            before = param_hashes(pipe)
            with pytest.raises(da.UnsupportedError) as e:
                da.load(pipe, dict(sd), name="x", mode=mode)
            assert re.search(r"transformer_blocks|single_transformer_blocks|norm", str(e.value))
            assert param_hashes(pipe) == before and not da.adapters(pipe)


def test_unsplittable_method_is_refused_by_name(flux):
    """BOFT's butterfly mixes rows across q, k and v: refused naming the file module and the target."""
    pipe = fresh(flux)
    out, (inn,) = shapes(pipe.transformer, native_modules(pipe.transformer, "flux")["double_blocks.0.img_attn.qkv"])
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.oft_blocks": torch.randn(2, out // 8, 8, 8) * 0.01}
    before = param_hashes(pipe)
    with pytest.raises(da.UnsupportedError, match=r"lora_unet_double_blocks_0_img_attn_qkv.*to_q.*BOFT"):
        da.load(pipe, sd)
    assert param_hashes(pipe) == before


def _peft_params(config):
    """A PEFT adapter on a Linear(16, 48) (a stacked q/k/v), parsed by diffadapt, with peft's layer as reference."""
    from diffadapt.fixtures import peft_file
    from diffadapt.keys import build_spec
    from diffadapt.spec import RawAdapter

    model = torch.nn.Sequential(torch.nn.Linear(16, 48))
    sd, ref = peft_file(model, config, seed=5, std=0.2)
    spec = build_spec(RawAdapter(tensors=sd, configs={"": config.to_dict()}))
    return spec.patches[0].params, ref, model[0].weight.detach()


@pytest.mark.parametrize("kind", ["peft_oft", "waveft"])
def test_peft_only_methods_split_rows_like_peft(kind):
    """PEFT OFT rotates inputs (every row keeps R); WaveFT becomes the exact rows of ΔW. Reference: peft's layer."""
    from peft import OFTConfig, WaveFTConfig

    from diffadapt.keys.fused import TAKE_ROWS

    config = (OFTConfig(target_modules=["0"], oft_block_size=4, r=0) if kind == "peft_oft"
              else WaveFTConfig(target_modules=["0"], n_frequency=64))
    params, ref, w = _peft_params(config)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x) - torch.nn.functional.linear(x, torch.zeros_like(w), ref[0].base_layer.bias)
    for start, stop in ((0, 16), (16, 32), (32, 48)):
        rows = torch.arange(start, stop)
        part = TAKE_ROWS[type(params)](params, rows, w.shape, where="x")
        got = torch.nn.functional.linear(x, part.apply(w[rows].float(), 1.0))
        assert (got - want[:, start:stop]).abs().max() <= TOL


def _lora(rows=4, cols=4):
    return {"lora_down.weight": torch.ones(2, cols), "lora_up.weight": torch.ones(rows, 2)}


@pytest.mark.parametrize("modules, layout", [
    (["diffusion_model.blocks.0.self_attn.q"], "Wan ComfyUI"),
    (["lora_unet_blocks_0_cross_attn_k_img"], "Wan musubi-tuner"),
    (["blocks.0.self_attn.q", "blocks.0.ffn.0"], "Wan native"),  # dotted native names without a prefix
    (["double_blocks.0.img_attn.proj"], "Flux native"),
    (["joint_blocks.0.x_block.attn.proj"], "SD3 native"),
    (["double_blocks_0_img_attn_proj"], "Flux kohya"),  # flat names without a prefix
    (["lycoris_double_blocks_0_img_attn_proj"], "Flux LyCORIS"),
    (["transformer.transformer_blocks.0.img_mlp.net.2"], "Qwen-Image diffusers"),
    (["transformer_blocks.0.img_mod.1"], "Qwen-Image diffusers"),  # Qwen-Image's own names are diffusers'
])
def test_layout_names(modules, layout):
    sd = {f"{m}.{s}": t for m in modules for s, t in _lora().items()}
    assert da.inspect(sd).layout == layout


def test_layout_names_lycoris_methods():
    hada = {f"hada_w{i}_{ab}": torch.ones(4, 2) if ab == "a" else torch.ones(2, 4) for i in (1, 2) for ab in "ab"}
    sd = {f"diffusion_model.double_blocks.0.img_attn.proj.{s}": t for s, t in hada.items()}
    assert da.inspect(sd).layout == "Flux ComfyUI/BFL (LyCORIS)"
    sd = {f"diffusion_model.blocks.0.self_attn.q.{s}": t for s, t in hada.items()}
    assert da.inspect(sd).layout == "Wan ComfyUI (LyCORIS)"
