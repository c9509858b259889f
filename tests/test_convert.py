"""Saving and converting: kohya/LyCORIS ↔ PEFT (folder or single file), dtype, exclude, names, CLI, errors.

Round trips A → B → A give the same tensors (key for key) and the same outputs, for every method both formats
express; where one side rewrites the layout exactly (Tucker LoCon folded into lora_A for PEFT), outputs are
compared instead. Formats that cannot express a method refuse it before writing anything.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffadapt as da
from diffadapt.cli import main
from diffadapt.fixtures import lycoris_file, randomize_
from diffadapt.testing import sd15_unet, tiny_sd1_pipeline

import peft  # noqa: E402
from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, WaveFTConfig  # noqa: E402

TOL = 1e-5
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


def outputs(pipe):
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), c).sample, pipe.text_encoder(torch.tensor([[0, 5, 9, 2]]))[0]


def loaded_outputs(pipe, source, **kw):
    da.load(pipe, source, "x", **kw)
    try:
        return outputs(pipe)
    finally:
        da.unload(pipe)


def close(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def same_tensors(a: dict, b: dict) -> bool:
    """Same keys, dtypes, shapes and values; scalars (alpha) by value: diffadapt writes them as float32."""
    def same(x, y):
        if x.dim() == 0 and y.dim() == 0:
            return float(x) == float(y)
        return x.dtype == y.dtype and torch.equal(x, y)
    return set(a) == set(b) and all(same(a[k], b[k]) for k in a)


def kohya_src(pipe, tmp_path, **kw):
    unet, _ = lycoris_file(pipe.unet, prefix="lora_unet", seed=1, **kw)
    te, _ = lycoris_file(pipe.text_encoder, prefix="lora_te", seed=2, **kw)
    te = {k.replace("lora_te_encoder_", "lora_te_text_model_encoder_"): v for k, v in te.items()}  # kohya's names
    path = tmp_path / "src.safetensors"
    save_file({**unet, **te}, path, metadata={"ss_tag_frequency": json.dumps({"x": {"sks cat": 3}})})
    return path


def peft_src(pipe, tmp_path, config, component="unet", std=0.1):
    ref = peft.get_peft_model(copy.deepcopy(getattr(pipe, component)), config)
    randomize_(((n, p) for n, p in ref.named_parameters() if ".default" in n), seed=3, std=std)
    ref.save_pretrained(tmp_path / "src" / component)
    return tmp_path / "src"


# -- kohya → PEFT → kohya ---------------------------------------------------------------------------

KOHYA = {
    "lora": dict(algo="lora"),
    "dora": dict(algo="lora", weight_decompose=True),
    "loha": dict(algo="loha", std=0.3),
    "loha-tucker": dict(algo="loha", use_tucker=True, std=0.3),
    "lokr": dict(algo="lokr", std=0.2),
    "lokr-both": dict(algo="lokr", decompose_both=True, factor=4, rank=2, std=0.2, target_names=[]),
    "locon-tucker": dict(algo="lora", use_tucker=True),  # PEFT folds lora_mid into lora_A: outputs, not tensors
}


ROUND_TRIPS = [(c, "folder") for c in KOHYA] + [(c, "file") for c in ("lora", "dora", "loha", "lokr-both")]


@pytest.mark.parametrize("case, peft_layout", ROUND_TRIPS)
def test_kohya_peft_kohya_round_trip(pipe, tmp_path, case, peft_layout):
    src = kohya_src(pipe, tmp_path, **KOHYA[case])
    mid = tmp_path / ("peft.safetensors" if peft_layout == "file" else "peft")
    da.convert(src, mid, format="peft", model=pipe)
    da.convert(mid, tmp_path / "back.safetensors", format="kohya")
    original, back = load_file(src), load_file(tmp_path / "back.safetensors")
    expected = loaded_outputs(pipe, src)
    assert close(loaded_outputs(pipe, mid), expected) <= TOL
    assert close(loaded_outputs(pipe, tmp_path / "back.safetensors"), expected) <= TOL
    if case == "lokr":  # alpha of two whole LoKr factors is unused by every loader and not kept by PEFT
        both_full = {k.rsplit(".", 1)[0] for k in original if k.endswith("lokr_w1")} & \
            {k.rsplit(".", 1)[0] for k in original if k.endswith("lokr_w2")}
        original = {k: v for k, v in original.items() if not (k.endswith(".alpha") and k[:-6] in both_full)}
        back = {k: v for k, v in back.items() if k in original}
    if case != "locon-tucker":
        assert same_tensors(original, back)
    info = da.inspect(mid)
    assert info.format in ("peft", "diffusers") and set(info.components) == {"unet", "text_encoder"}


KOHYA_ONLY = {
    "diag-oft": dict(algo="diag-oft", block_size=4, constraint=1e-4, rescaled=True),
    "boft": dict(algo="boft", block_size=4, target_modules=["Transformer2DModel", "ResnetBlock2D"]),
    "full": dict(algo="full", std=0.01),
    "dora-in-axis": dict(algo="lora", weight_decompose=True, wd_on_out=False),
    "loha-dora": dict(algo="loha", weight_decompose=True, std=0.3),
    "lokr-dora": dict(algo="lokr", weight_decompose=True, std=0.2),
}


@pytest.mark.parametrize("case", list(KOHYA_ONLY))
def test_kohya_only_methods_rewrite_identically(pipe, tmp_path, case):
    """No model: names, shapes (rescale / dora_scale (out, 1, …)), metadata kept; fp16 and back is exact."""
    src = kohya_src(pipe, tmp_path, **KOHYA_ONLY[case])
    da.convert(src, tmp_path / "a.safetensors", format="kohya")
    assert same_tensors(load_file(tmp_path / "a.safetensors"), load_file(src))
    assert close(loaded_outputs(pipe, tmp_path / "a.safetensors"), loaded_outputs(pipe, src)) == 0.0


# -- PEFT → kohya → PEFT, and PEFT-only methods through PEFT files ----------------------------------

PEFT = {
    "lora-patterns": (LoraConfig(r=4, lora_alpha=8, target_modules=ATTN + ["conv1"], init_lora_weights=False,
                                 rank_pattern={"to_q": 2, "conv1": 6}, alpha_pattern={"to_k": 3}), "kohya"),
    "dora": (LoraConfig(r=4, lora_alpha=8, target_modules=ATTN + ["conv1"], use_dora=True,
                        init_lora_weights=False), "kohya"),
    "loha": (LoHaConfig(r=4, alpha=8, target_modules=ATTN + ["conv1"], init_weights=False), "kohya"),
    "lokr": (LoKrConfig(r=4, alpha=4, target_modules=ATTN + ["conv1"], init_weights=False), "kohya"),
    # two whole factors at alpha ≠ r: LyCORIS has no scale for them, so kohya files carry it baked into w1
    "lokr-scaled": (LoKrConfig(r=4, alpha=8, target_modules=ATTN + ["conv1"], init_weights=False), "kohya"),
    "oft": (OFTConfig(r=0, oft_block_size=4, target_modules=ATTN, init_weights=False), "peft.safetensors"),
    "waveft": (WaveFTConfig(n_frequency=40, scaling=25.0, target_modules=ATTN, init_weights=False),
               "peft.safetensors"),
}


@pytest.mark.parametrize("case", list(PEFT))
def test_peft_round_trip(pipe, tmp_path, case):
    config, via = PEFT[case]
    src = peft_src(pipe, tmp_path, config, std=0.01 if case == "waveft" else 0.1)
    mid = tmp_path / ("mid.safetensors" if via == "kohya" else via)
    da.convert(src, mid, format="kohya" if via == "kohya" else "peft")
    da.convert(mid, tmp_path / "back", format="peft", model=pipe)
    original = load_file(src / "unet" / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "unet" / "adapter_model.safetensors")
    expected = loaded_outputs(pipe, src)
    for path in (mid, tmp_path / "back"):
        assert close(loaded_outputs(pipe, path), expected) <= TOL
    if case != "lokr-scaled":
        assert same_tensors(original, back)
    if via != "kohya":  # the single file carries its config: it loads by itself, in both modes
        with safe_open(str(mid), "pt") as f:
            assert config.peft_type.value in f.metadata()["peft_config"]
        assert close(loaded_outputs(pipe, mid, mode="inject"), expected) <= TOL


@pytest.mark.parametrize("case, to, reason", [
    ("diag-oft", "peft", "output side"),
    ("full", "peft", "full/diff"),
    ("dora-in-axis", "peft", "input axis"),
    ("peft-oft", "kohya", "input side"),
    ("waveft", "kohya", "WaveFT"),
])
def test_what_a_format_cannot_express_is_refused_before_writing(pipe, tmp_path, case, to, reason):
    if case.startswith(("peft", "waveft")):
        cfg = PEFT["oft"][0] if case == "peft-oft" else PEFT["waveft"][0]
        src = peft_src(pipe, tmp_path, cfg)
    else:
        kw = {"diag-oft": dict(algo="diag-oft", block_size=4), "full": dict(algo="full"),
              "dora-in-axis": dict(algo="lora", weight_decompose=True, wd_on_out=False)}[case]
        src = kohya_src(pipe, tmp_path, **kw)
    dest = tmp_path / "out"
    with pytest.raises(da.UnsupportedError, match=reason):
        da.convert(src, dest, format=to, model=pipe)
    assert not dest.exists()


# -- dtype, exclude, metadata, names ----------------------------------------------------------------


@pytest.mark.parametrize("dtype, torch_dtype",
                         [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dtype_control(pipe, tmp_path, dtype, torch_dtype):
    src = kohya_src(pipe, tmp_path)
    for to, dest in (("kohya", tmp_path / "k.safetensors"), ("peft", tmp_path / "p.safetensors")):
        da.convert(src, dest, format=to, dtype=dtype, model=pipe)
        out = load_file(dest)
        assert {v.dtype for k, v in out.items() if not k.endswith("alpha")} == {torch_dtype}
    original, kohya = load_file(src), load_file(tmp_path / "k.safetensors")
    assert all(torch.equal(kohya[k], v.to(torch_dtype)) for k, v in original.items() if not k.endswith("alpha"))
    assert all(kohya[k].dtype == torch.float32 for k in kohya if k.endswith("alpha"))  # scales stay exact


def test_exclude_patterns_and_kohya_metadata(pipe, tmp_path):
    src = kohya_src(pipe, tmp_path)
    keys = set(load_file(src))
    da.convert(src, tmp_path / "a.safetensors", format="kohya", exclude=["text_encoder*", "*down_blocks_0_*"])
    out = load_file(tmp_path / "a.safetensors")
    assert set(out) == {k for k in keys if not k.startswith("lora_te_") and "down_blocks_0_" not in k}
    da.convert(src, tmp_path / "b", format="peft", model=pipe, exclude=["lora_unet_*"])
    assert not (tmp_path / "b" / "unet").exists() and (tmp_path / "b" / "text_encoder").is_dir()
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2" and meta["ss_base_model_version"] == "sd_v1"
    assert "sks cat" in meta["ss_tag_frequency"] and meta["modelspec.architecture"].endswith("/lora")
    with pytest.raises(da.DiffAdaptError, match="no modules left"):
        da.convert(src, tmp_path / "c.safetensors", format="kohya", exclude=["*"])


def test_kohya_names_resolve_against_the_real_size_architecture(tmp_path):
    """No model given: SD1 kohya names become PEFT's dotted ones through the meta-device SD1.5 UNet."""
    unet = sd15_unet(device="meta")
    names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.resnets.0.conv1", "conv_in"]
    g = torch.Generator().manual_seed(0)
    sd = {}
    for n in names:
        w = unet.get_submodule(n).weight
        k = "lora_unet_" + n.replace(".", "_")
        sd[f"{k}.lora_down.weight"] = torch.randn(4, *w.shape[1:], generator=g)
        sd[f"{k}.lora_up.weight"] = torch.randn(w.shape[0], 4, *([1] * (w.dim() - 2)), generator=g)
        sd[f"{k}.alpha"] = torch.tensor(2.0)
    save_file(sd, tmp_path / "sd15.safetensors")
    da.convert(tmp_path / "sd15.safetensors", tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "unet" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(names) and cfg["r"] == 4 and cfg["lora_alpha"] == 2
    da.convert(tmp_path / "peft", tmp_path / "back.safetensors", format="kohya")
    assert same_tensors(load_file(tmp_path / "back.safetensors"), sd)


def test_sdxl_kohya_files_use_ldm_block_names(tmp_path):
    """kohya's SDXL trainer writes input_blocks_… and lora_te1_/lora_te2_ names; a PEFT file maps to them."""
    from diffadapt.conversion import architecture

    arch = architecture("sdxl").components
    mods = {"unet": ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.0.resnets.2.conv1"],
            "text_encoder_2": ["text_model.encoder.layers.3.self_attn.q_proj"]}
    sd, configs = {}, {}
    for comp, names in mods.items():
        for n in names:
            w = arch[comp].get_submodule(n).weight
            sd[f"{comp}.{n}.lora_A.weight"] = torch.randn(2, *w.shape[1:])
            sd[f"{comp}.{n}.lora_B.weight"] = torch.randn(w.shape[0], 2, *([1] * (w.dim() - 2)))
        configs[comp] = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": names}
    save_file(sd, tmp_path / "xl.safetensors", metadata={"peft_config": json.dumps(configs)})
    da.convert(tmp_path / "xl.safetensors", tmp_path / "k.safetensors", format="kohya")
    keys = {k.split(".", 1)[0] for k in load_file(tmp_path / "k.safetensors")}
    assert keys == {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                    "lora_unet_output_blocks_2_0_in_layers_2", "lora_te2_text_model_encoder_layers_3_self_attn_q_proj"}
    da.convert(tmp_path / "k.safetensors", tmp_path / "back.safetensors", format="peft")
    back = load_file(tmp_path / "back.safetensors")
    assert same_tensors(back, sd)


# -- save, CLI, errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["patch", "inject"])
def test_save_a_loaded_adapter(pipe, tmp_path, mode):
    src = kohya_src(pipe, tmp_path, algo="loha", std=0.3)
    da.load(pipe, src, "s", mode=mode, weight=0.3)  # the weight is not saved: files hold the adapter as loaded
    try:
        da.save(pipe, "s", tmp_path / "s.safetensors")
        da.save(pipe, "s", tmp_path / "s_peft", format="peft", dtype="fp16")
    finally:
        da.unload(pipe)
    assert same_tensors(load_file(tmp_path / "s.safetensors"), load_file(src))
    assert close(loaded_outputs(pipe, tmp_path / "s_peft"), loaded_outputs(pipe, src)) <= 5e-3  # fp16 factors
    with pytest.raises(da.AdapterNotFoundError):
        da.save(pipe, "nope", tmp_path / "n.safetensors")


def test_cli_convert_and_inspect(pipe, tmp_path, capsys):
    src = peft_src(pipe, tmp_path, PEFT["loha"][0])
    dest = tmp_path / "k.safetensors"
    assert main(["convert", str(src), str(dest), "--to", "kohya", "--dtype", "bf16", "--exclude", "*attn2*"]) == 0
    out = load_file(dest)
    assert out and all("attn2" not in k for k in out)
    assert {v.dtype for k, v in out.items() if "alpha" not in k} == {torch.bfloat16}
    assert main(["convert", str(src), str(tmp_path / "p.safetensors"), "--to", "peft", "--exclude", "*attn2*"]) == 0
    assert main(["inspect", "--json", str(tmp_path / "p.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 2)[2])
    assert info["methods"] == {"loha": len(out) // 5} and info["dtype"] == "float32"
    assert main(["convert", str(dest), str(dest), "--to", "kohya"]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err


def test_errors_come_first_and_name_the_file(pipe, tmp_path):
    dest = tmp_path / "out.safetensors"
    with pytest.raises(da.SourceError, match="no such file"):
        da.convert(tmp_path / "missing.safetensors", dest, format="kohya")
    with pytest.raises(da.DiffAdaptError, match="format 'ckpt'"):
        da.convert(tmp_path / "missing.safetensors", dest, format="ckpt")
    with pytest.raises(da.DiffAdaptError, match="dtype='fp8'"):
        da.convert(tmp_path / "missing.safetensors", dest, format="kohya", dtype="fp8")
    assert not dest.exists()
    src = peft_src(pipe, tmp_path, PEFT["lora-patterns"][0])
    cfg = src / "unet" / "adapter_config.json"
    cfg.write_text("{not json")
    with pytest.raises(da.FormatError, match="adapter_config.json"):
        da.convert(src, dest, format="kohya")
    cfg.write_text(json.dumps({"peft_type": "LORA", "r": "four"}))
    with pytest.raises(da.FormatError, match="'r' must be a number"):
        da.convert(src, dest, format="kohya")
    bad = tmp_path / "bad.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 4), "unet.x.lora_B.weight": torch.zeros(4, 2)}, bad,
              metadata={"peft_config": "{oops"})
    with pytest.raises(da.FormatError, match="bad.safetensors.*peft_config"):
        da.convert(bad, dest, format="kohya")
    assert not dest.exists()
    assert main(["convert", str(tmp_path / "missing"), str(dest), "--to", "peft"]) == 2
