"""Every source layout reads to the same adapter.

One kohya LoRA (made by LyCORIS on the tiny SD1 UNet + text encoder) and one PEFT LoRA (made and saved by
peft itself) are laid out as users find them: a file, a state dict, folders, the diffusers file name, PEFT
folders (single and DreamBooth ``unet/`` + ``text_encoder/``), a hub id served from an offline cache, old
text-encoder and attention-processor key names. Each must load to the same weights / outputs and inspect to
the same summary; outputs are checked against the reference forward (LyCORIS or peft, max |Δ| ≤ 1e-5).
"""

from __future__ import annotations

import copy
import json
import re
import shutil

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

import diffadapt as da
from diffadapt.fixtures import lycoris_file
from diffadapt.testing import param_hashes, tiny_sd1_pipeline, tiny_sdxl_pipeline

import peft  # noqa: E402

TOL = 1e-5
TAGS = json.dumps({"10_ohwx dog": {"ohwx dog": 12, "grass": 3}})
META = {"ss_tag_frequency": TAGS, "ss_network_module": "networks.lora"}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def base_pipe():
    return tiny_sd1_pipeline()


@pytest.fixture
def pipe(base_pipe):
    return copy.deepcopy(base_pipe)


@pytest.fixture(scope="module")
def inputs(base_pipe):
    g = torch.Generator().manual_seed(0)
    ids = base_pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g), ids


def outputs(unet, te, inputs):
    """(UNet forward, text-encoder forward) on fixed inputs; None for a missing part."""
    x, t, ehs, ids = inputs
    with torch.no_grad():
        return (unet(x, t, encoder_hidden_states=ehs).sample if unet is not None else None,
                te(ids)[0] if te is not None else None)


def assert_close(got, ref, base):
    assert (ref - base).abs().max() > 0.05, "the adapter should change the output"
    err = (got - ref).abs().max().item()
    assert err <= TOL, f"max |Δ| = {err:.3g}"


# -- kohya: file, dict, folders, hub -------------------------------------------------------------------


@pytest.fixture(scope="module")
def kohya(base_pipe):
    """(state dict, LyCORIS reference UNet, LyCORIS reference text encoder)."""
    unet, ref_unet = lycoris_file(base_pipe.unet, prefix="lora_unet", seed=1)
    te, ref_te = lycoris_file(base_pipe.text_encoder, prefix="lora_te", seed=2)
    return {**unet, **te}, ref_unet, ref_te


@pytest.fixture(scope="module")
def layout(kohya, tmp_path_factory):
    """The kohya file in every on-disk layout, and a hub cache holding it as user/ink."""
    sd, root = kohya[0], tmp_path_factory.mktemp("layouts")
    for path in ("ink.safetensors", "folder/ink.safetensors", "diffusers/pytorch_lora_weights.safetensors",
                 f"hub/models--user--ink/snapshots/{COMMIT}/adapter.safetensors"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(root / path), metadata=META)
    (root / "diffusers" / "README.md").write_text("# a LoRA\n")
    (root / "hub/models--user--ink/refs").mkdir()
    (root / "hub/models--user--ink/refs/main").write_text(COMMIT)
    return root


@pytest.fixture
def offline_hub(layout, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE → the fake cache; huggingface_hub reads both at import time."""
    cache = str(layout / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    return cache


KOHYA_SOURCES = {
    "file": lambda root, sd: root / "ink.safetensors",
    "str-path": lambda root, sd: str(root / "ink.safetensors"),
    "dict": lambda root, sd: dict(sd),
    "folder": lambda root, sd: root / "folder",
    "diffusers-folder": lambda root, sd: root / "diffusers",
    "hub-repo": lambda root, sd: "user/ink",
    "hub-file": lambda root, sd: "user/ink/adapter.safetensors",
}


@pytest.fixture
def kohya_source(request, layout, kohya):
    def get(kind):
        if kind.startswith("hub"):
            request.getfixturevalue("offline_hub")
        return KOHYA_SOURCES[kind](layout, kohya[0])
    return get


@pytest.fixture(scope="module")
def kohya_expected(base_pipe, layout, inputs):
    pipe = copy.deepcopy(base_pipe)
    da.load(pipe, layout / "ink.safetensors")
    return outputs(pipe.unet, pipe.text_encoder, inputs)


@pytest.mark.parametrize("kind", KOHYA_SOURCES)
def test_kohya_sources_give_the_same_outputs(pipe, kind, kohya_source, kohya, kohya_expected, inputs):
    base = outputs(pipe.unet, pipe.text_encoder, inputs)
    da.load(pipe, kohya_source(kind))
    got = outputs(pipe.unet, pipe.text_encoder, inputs)
    ref = outputs(kohya[1], kohya[2], inputs)
    for g, e, r, b in zip(got, kohya_expected, ref, base):
        assert torch.equal(g, e)
        assert_close(g, r, b)


def summary(info):
    return dict(methods=info.methods, modules=info.modules, ranks=info.ranks, alphas=info.alphas,
                components=info.components, base_family=info.base_family, params=info.params, format=info.format)


@pytest.mark.parametrize("kind", KOHYA_SOURCES)
def test_kohya_sources_inspect_the_same(kind, kohya_source, layout):
    info, ref = da.inspect(kohya_source(kind)), da.inspect(layout / "ink.safetensors")
    assert summary(info) == summary(ref)
    assert (info.methods, info.modules, info.ranks, info.alphas) == ({"lora": 133}, 133, {4: 133}, {2.0: 133})
    assert info.components == {"unet": 121, "text_encoder": 12}
    assert info.trigger_words == ([] if kind == "dict" else ["ohwx dog", "grass"])


@pytest.mark.parametrize("source", ["user/unknown", "user/ink/missing.safetensors"])
def test_unknown_hub_id(pipe, offline_hub, source):
    before = param_hashes(pipe)
    with pytest.raises(da.SourceError, match=re.escape(source)):
        da.load(pipe, source)
    assert param_hashes(pipe) == before and da.adapters(pipe) == {}


@pytest.mark.parametrize("metadata, expected", [
    ({"ss_tag_frequency": TAGS}, ["ohwx dog", "grass"]),
    ({"modelspec.trigger_phrase": "ohwx dog"}, ["ohwx dog"]),
    ({"modelspec.trigger_phrase": "sks style, ink", "ss_tag_frequency": TAGS},
     ["sks style", "ink", "ohwx dog", "grass"]),
    ({"ss_tag_frequency": "{not json"}, []),
], ids=["tag-frequency", "trigger-phrase", "both", "bad-json"])
def test_trigger_words(kohya, tmp_path, metadata, expected):
    sd = {k: v for k, v in kohya[0].items() if k.startswith("lora_te_encoder_layers_0_")}
    save_file(sd, str(tmp_path / "t.safetensors"), metadata=metadata)
    assert da.inspect(tmp_path / "t.safetensors").trigger_words == expected


def test_base_family_is_sd1(layout, peft_layout):
    """The tiny model's cross-attention width (32) is no known family's: the component rule decides."""
    assert da.inspect(layout / "ink.safetensors").base_family == "sd1"
    assert da.inspect(peft_layout / "dreambooth").base_family == "sd1"


# -- PEFT: folder, DreamBooth layout, diffusers file ---------------------------------------------------


@pytest.fixture(scope="module")
def peft_models(base_pipe):
    with torch.random.fork_rng(devices=[]):  # init_lora_weights=False draws B from the global RNG
        torch.manual_seed(0)
        unet = peft.get_peft_model(copy.deepcopy(base_pipe.unet), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False))
        te = peft.get_peft_model(copy.deepcopy(base_pipe.text_encoder), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TE_TARGETS, init_lora_weights=False))
    return unet.eval(), te.eval()


@pytest.fixture(scope="module")
def peft_layout(peft_models, tmp_path_factory):
    """peft's own save_pretrained layouts, and the diffusers single file (component-prefixed keys + metadata)."""
    root = tmp_path_factory.mktemp("peft")
    unet, te = peft_models
    unet.save_pretrained(str(root / "unet_only"))
    unet.save_pretrained(str(root / "dreambooth" / "unet"))
    te.save_pretrained(str(root / "dreambooth" / "text_encoder"))
    tensors, meta = {}, {}
    for comp, model in (("unet", unet), ("text_encoder", te)):
        for k, v in peft.get_peft_model_state_dict(model).items():
            tensors[f"{comp}.{k.removeprefix('base_model.model.')}"] = v.contiguous()
        meta |= {f"{comp}.r": 4, f"{comp}.lora_alpha": 8}
    (root / "diffusers").mkdir()
    save_file(tensors, str(root / "diffusers/pytorch_lora_weights.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps(meta)})
    return root


PEFT_CASES = {  # id: (source folder, load into, components adapted, warns)
    "folder→pipe": ("unet_only", "pipe", ("unet",), False),
    "folder→bare-unet": ("unet_only", "unet", ("unet",), False),
    "dreambooth→pipe": ("dreambooth", "pipe", ("unet", "text_encoder"), False),
    "dreambooth→bare-unet": ("dreambooth", "unet", ("unet",), True),
    "diffusers-file→pipe": ("diffusers", "pipe", ("unet", "text_encoder"), False),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_sources_match_peft_forward(pipe, peft_models, peft_layout, inputs, case):
    folder, into, adapted, warns = PEFT_CASES[case]
    target = pipe if into == "pipe" else pipe.unet
    base = outputs(pipe.unet, pipe.text_encoder, inputs)
    if warns:
        with pytest.warns(UserWarning, match="text_encoder"):
            da.load(target, peft_layout / folder)
    else:
        da.load(target, peft_layout / folder)
    got = outputs(pipe.unet, pipe.text_encoder, inputs)
    ref = outputs(*peft_models, inputs)
    for comp, g, r, b in zip(("unet", "text_encoder"), got, ref, base):
        if comp in adapted:
            assert_close(g, r, b)
        else:
            assert torch.equal(g, b)
    da.unload(target)
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe.unet, pipe.text_encoder, inputs), base))


def test_peft_sources_inspect_the_same(peft_layout):
    single, dreambooth, diffusers = (da.inspect(peft_layout / f) for f in ("unet_only", "dreambooth", "diffusers"))
    assert summary(dreambooth) | {"format": None} == summary(diffusers) | {"format": None}
    assert dreambooth.components == {"unet": 96, "text_encoder": 12}
    assert (dreambooth.methods, dreambooth.ranks, dreambooth.alphas) == ({"lora": 108}, {4: 108}, {8.0: 108})
    assert (single.methods, single.modules, single.ranks, single.alphas) == ({"lora": 96}, 96, {4: 96}, {8.0: 96})


def test_peft_folder_for_second_text_encoder(tmp_path, inputs):
    xl = tiny_sdxl_pipeline()
    ref = peft.get_peft_model(copy.deepcopy(xl.text_encoder_2), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    ref.save_pretrained(str(tmp_path / "te2"))
    base = outputs(None, xl.text_encoder_2, inputs)[1]
    info = da.load(xl, tmp_path / "te2")
    assert info.components == {"*": 24} or set(info.components) <= {"*", "text_encoder_2"}
    assert_close(outputs(None, xl.text_encoder_2, inputs)[1], outputs(None, ref, inputs)[1], base)


# -- old key names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["lora_te_", "lora_te_text_model_", "lora_te1_", "lora_te1_text_model_"])
def test_text_encoder_names(pipe, kohya, inputs, prefix):
    """kohya TE keys with or without ``text_model_`` (and the SDXL te1 prefix) reach the same modules."""
    sd, _, ref_te = kohya
    te = {k.replace("lora_te_", prefix, 1): v for k, v in sd.items() if k.startswith("lora_te_")}
    assert any(k.startswith(f"{prefix}encoder_layers_0_self_attn_q_proj.") for k in te)
    base = outputs(None, pipe.text_encoder, inputs)[1]
    info = da.load(pipe, te)
    assert info.components == {"text_encoder": 12}
    assert_close(outputs(None, pipe.text_encoder, inputs)[1], outputs(None, ref_te, inputs)[1], base)


_ATTN = re.compile(r"^lora_unet_(.*_attn[12])_(to_q|to_k|to_v|to_out_0)\.lora_(down|up)\.weight$")


@pytest.mark.parametrize("prefix", ["unet.", ""])
def test_legacy_attention_processor_keys(pipe, base_pipe, prefix):
    """``<path>.processor.to_q_lora.down.weight`` (no alpha ⇒ alpha = r) loads as the kohya LoRA with alpha = r."""
    sd, _ = lycoris_file(base_pipe.unet, prefix="lora_unet", seed=3, rank=4, alpha=4.0,
                         target_modules=["Transformer2DModel"])
    dotted = {n.replace(".", "_"): n for n, _ in base_pipe.unet.named_modules()}
    reference, legacy = {}, {}
    for key, value in sd.items():
        if m := _ATTN.match(key):
            module = key.split(".")[0]
            reference |= {key: value, f"{module}.alpha": sd[f"{module}.alpha"]}
            proj = "to_out" if m[2] == "to_out_0" else m[2]
            legacy[f"{prefix}{dotted[m[1]]}.processor.{proj}_lora.{m[3]}.weight"] = value
    assert len(legacy) == 96 and all(v.item() == 4.0 for k, v in reference.items() if k.endswith(".alpha"))
    before = param_hashes(pipe)
    da.load(pipe, reference, name="kohya")
    expected = param_hashes(pipe)
    da.unload(pipe, "kohya")
    info = da.load(pipe, legacy, name="legacy")
    assert info.modules == 48 and info.alphas == {4.0: 48}
    assert param_hashes(pipe) == expected != before


def test_a_file_rewritten_after_reading_changes_nothing(tmp_path):
    """Tensors are copied out of the memory-mapped file: rewriting or truncating it cannot reach them."""
    path = tmp_path / "a.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(64, 64), "lora_unet_x.lora_up.weight": torch.ones(64, 64)},
              str(path))
    raw = da.io.read(str(path))
    before = {k: v.clone() for k, v in raw.tensors.items()}
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(b"\xff" * 20000)
        f.truncate(300)
    assert all(torch.equal(raw.tensors[k], before[k]) for k in before)
