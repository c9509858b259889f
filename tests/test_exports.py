"""Every export read back by an independent reader, compared with diffadapt's patch-mode load of the source.

  * PEFT output (folders, one per component) → peft itself: ``inject_adapter_in_model`` with the written
    adapter_config.json, ``set_peft_model_state_dict`` with the written tensors (no key left over, none missing),
    peft's own forward;
  * kohya / LyCORIS output → lycoris-lora: ``create_lycoris_from_weights`` + ``apply_to`` + ``load_state_dict``,
    LyCORIS's own forward;
  * LoRA in kohya form and in diffusers form (one PEFT-keyed ``.safetensors``) → diffusers'
    ``pipe.load_lora_weights``.

Sources are made by the reference libraries (peft for PEFT adapters, LyCORIS for kohya files) on the tiny SD1
UNet and text encoder, so every export crosses a format boundary or rewrites a layout.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris_from_weights
from peft import (LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftConfig, WaveFTConfig, get_peft_model,
                  inject_adapter_in_model, set_peft_model_state_dict)
from safetensors.torch import load_file, save_file
from torch import nn

import diffadapt as da
from diffadapt.fixtures import lycoris_file, randomize_
from diffadapt.testing import tiny_sd1_pipeline

pytestmark = pytest.mark.filterwarnings("ignore:Invalid `:UserWarning")  # peft adjusting OFT sizes, as asked

TOL = 1e-5
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP = ["q_proj", "k_proj", "v_proj", "out_proj"]
COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te"}

# PEFT-made adapters: (unet config, text encoder config, init std)
PEFT_MADE = {
    "lora": (LoraConfig(r=4, lora_alpha=8, target_modules=ATTN + ["conv1"], rank_pattern={"to_q": 2},
                        alpha_pattern={"to_k": 3}), LoraConfig(r=2, lora_alpha=4, target_modules=CLIP), 0.1),
    "dora": (LoraConfig(r=4, lora_alpha=8, target_modules=ATTN + ["conv1"], use_dora=True),
             LoraConfig(r=2, lora_alpha=2, target_modules=CLIP, use_dora=True), 0.1),
    "loha": (LoHaConfig(r=4, alpha=8, target_modules=ATTN + ["conv1"]), LoHaConfig(r=2, alpha=4, target_modules=CLIP),
             0.1),
    "lokr": (LoKrConfig(r=4, alpha=4, target_modules=ATTN + ["conv1"]), LoKrConfig(r=2, alpha=4, target_modules=CLIP),
             0.1),
    # r given, not oft_block_size: peft picks each module's block size (16 … 64; fc2's 37 inputs: one block)
    "oft": (OFTConfig(r=2, oft_block_size=0, target_modules=ATTN),
            OFTConfig(r=4, oft_block_size=0, target_modules=CLIP + ["fc1", "fc2"]), 0.1),
    "oft-blocks": (OFTConfig(r=0, oft_block_size=6, target_modules=ATTN, use_cayley_neumann=False),
                   OFTConfig(r=0, oft_block_size=8, target_modules=CLIP + ["fc1"], coft=True), 0.1),
    "waveft": (WaveFTConfig(n_frequency=40, scaling=25.0, target_modules=ATTN),
               WaveFTConfig(n_frequency=30, scaling=25.0, target_modules=CLIP), 0.01),
}

# diffusers 0.42 reads a kohya file's per-module alphas under keys its alpha_pattern never matches, so a file
# whose alphas differ between modules loads there with the most common alpha everywhere: ranks vary here, alphas not
PEFT_MADE["lora-ranks"] = (LoraConfig(r=4, lora_alpha=8, target_modules=ATTN + ["conv1"], rank_pattern={"to_q": 2}),
                           LoraConfig(r=2, lora_alpha=8, target_modules=CLIP), 0.1)

# LyCORIS-made kohya files (LyCORIS kwargs)
LYCORIS_MADE = {
    "lora": dict(algo="lora"),
    "locon-tucker": dict(algo="lora", use_tucker=True),
    "dora": dict(algo="lora", weight_decompose=True),
    "loha": dict(algo="loha", use_tucker=True, std=0.3),
    "lokr": dict(algo="lokr", std=0.2),
}


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 7, 32, generator=g)


IDS = torch.tensor([[0, 5, 9, 2]])


@torch.no_grad()
def run(component: str, module: nn.Module) -> torch.Tensor:
    if component == "unet":
        x, t, c = inputs()
        return module(x, t, c).sample
    return module(IDS)[0]


@pytest.fixture(scope="module")
def sources(pipe, tmp_path_factory):
    """{(origin, case): (path, {component: diffadapt's patch-mode output})}, built on first use."""
    tmp = tmp_path_factory.mktemp("sources")
    cache = {}

    def get(origin: str, case: str):
        if (origin, case) in cache:
            return cache[(origin, case)]
        path = tmp / f"{origin}-{case}"
        if origin == "peft":
            *configs, std = PEFT_MADE[case]
            for i, (comp, cfg) in enumerate(zip(COMPONENTS, configs)):
                model = get_peft_model(copy.deepcopy(getattr(pipe, comp)), copy.deepcopy(cfg))
                randomize_(((n, p) for n, p in model.named_parameters() if ".default" in n), seed=3 + i, std=std)
                model.save_pretrained(path / comp)
        else:
            sd = {}
            for i, comp in enumerate(COMPONENTS):
                part, _ = lycoris_file(getattr(pipe, comp), prefix=KOHYA_PREFIX[comp], seed=1 + i, **LYCORIS_MADE[case])
                sd.update(part)
            path = path.with_suffix(".safetensors")
            save_file(sd, str(path))
        da.load(pipe, path, "src")
        try:
            cache[(origin, case)] = path, {c: run(c, getattr(pipe, c)) for c in COMPONENTS}
        finally:
            da.unload(pipe)
        return cache[(origin, case)]

    return get


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- PEFT output → peft ------------------------------------------------------------------------------

# LyCORIS' plain LoRA is covered by its DoRA file's factors (and peft's LoRA), so it goes only to diffusers below
TO_PEFT = [("peft", c) for c in PEFT_MADE if c != "lora-ranks"] + [("lycoris", c) for c in LYCORIS_MADE if c != "lora"]


@pytest.mark.parametrize("origin, case", TO_PEFT)
def test_peft_export_is_read_by_peft(pipe, sources, tmp_path, origin, case):
    src, expected = sources(origin, case)
    dest = tmp_path / "out"
    da.convert(src, dest, format="peft", model=pipe)
    for comp in COMPONENTS:
        folder = dest / comp
        config = PeftConfig.from_pretrained(str(folder))
        model = inject_adapter_in_model(config, copy.deepcopy(getattr(pipe, comp)), adapter_name="default")
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, tensors, adapter_name="default")
        assert not result.unexpected_keys
        saved = {k.removeprefix("base_model.model.") for k in tensors}  # peft saves "…lora_A.weight" for
        unfilled = [n for n, _ in model.named_parameters()  # the parameter "…lora_A.default.weight"
                    if ".default" in n and not {n.replace(".default", ""),
                                                n.replace(".default", "").removesuffix(".weight")} & saved]
        assert not unfilled
        assert close(run(comp, model), expected[comp]) <= TOL, comp


# -- kohya output → LyCORIS --------------------------------------------------------------------------


class _Named(nn.Module):
    """Presents the text encoder under ``text_model``: kohya / A1111 / ComfyUI key CLIP as
    ``lora_te_text_model_…``, while transformers 5's CLIPTextModel has no such level."""

    def __init__(self, te: nn.Module):
        super().__init__()
        self.text_model = te


def lycoris_read(component: nn.Module, prefix: str, sd: dict) -> nn.Module:
    model = copy.deepcopy(component)
    named = _Named(model) if prefix == "lora_te" else model
    saved = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = prefix
    try:
        network, weights = create_lycoris_from_weights(1.0, "", named, weights_sd=sd)
    finally:
        LycorisNetwork.LORA_PREFIX = saved
    network.apply_to()
    result = network.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    assert len(network.loras) == len({k.split(".")[0] for k in sd})
    return model


TO_KOHYA = [("peft", c) for c in ("lora", "dora", "loha", "lokr")] + [("lycoris", "locon-tucker")]


@pytest.mark.parametrize("origin, case", TO_KOHYA)
def test_kohya_export_is_read_by_lycoris(pipe, sources, tmp_path, origin, case):
    src, expected = sources(origin, case)
    dest = tmp_path / "out.safetensors"
    da.convert(src, dest, format="kohya")
    sd = load_file(str(dest))
    for comp in COMPONENTS:
        prefix = KOHYA_PREFIX[comp]
        part = {k: v for k, v in sd.items() if k.startswith(prefix + "_")}
        assert part, comp
        assert close(run(comp, lycoris_read(getattr(pipe, comp), prefix, part)), expected[comp]) <= TOL, comp


# -- LoRA → diffusers' own loader --------------------------------------------------------------------


@pytest.mark.parametrize("origin, to, dest", [
    ("peft", "kohya", "out.safetensors"),
    ("peft", "peft", "out.safetensors"),  # diffusers form: unet.<module>.lora_A.weight + lora_adapter_metadata
    ("lycoris", "peft", "out.safetensors"),
])
def test_lora_export_is_read_by_diffusers(pipe, sources, tmp_path, origin, to, dest):
    src, expected = sources(origin, "lora-ranks" if origin == "peft" else "lora")
    da.convert(src, tmp_path / dest, format=to, model=pipe)
    reader = copy.deepcopy(pipe)
    reader.load_lora_weights(str(tmp_path / dest))
    assert set(reader.get_active_adapters()) and not da.adapters(reader)
    for comp in COMPONENTS:
        assert close(run(comp, getattr(reader, comp)), expected[comp]) <= TOL, comp
    if to == "peft":
        from safetensors import safe_open

        with safe_open(str(tmp_path / dest), "pt") as f:
            assert json.loads(f.metadata()["lora_adapter_metadata"])


def test_sdxl_kohya_export_with_ldm_names_is_read_by_diffusers(tmp_path):
    """SDXL kohya files name UNet blocks the ldm way (``input_blocks_4_1_…``); diffusers' loader maps them back."""
    from diffadapt.fixtures import pipeline_file
    from diffadapt.testing import tiny_sdxl_pipeline

    xl = tiny_sdxl_pipeline()
    src = tmp_path / "src.safetensors"
    save_file(pipeline_file(xl, components=("unet", "text_encoder", "text_encoder_2"), algo="lora",
                            target_modules=["Transformer2DModel", "CLIPAttention", "CLIPSdpaAttention"],
                            target_names=[]), str(src))
    da.load(xl, src, "src")
    try:
        x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 7, xl.unet.config.cross_attention_dim)
        cond = {"text_embeds": torch.randn(1, xl.text_encoder_2.config.projection_dim), "time_ids": torch.randn(1, 6)}
        with torch.no_grad():
            expected = [xl.unet(x, t, c, added_cond_kwargs=cond).sample, xl.text_encoder_2(IDS)[0]]
    finally:
        da.unload(xl)
    dest = tmp_path / "out.safetensors"
    da.convert(src, dest, format="kohya", model=xl)
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(str(dest)))
    reader = copy.deepcopy(xl)
    reader.load_lora_weights(str(dest))
    with torch.no_grad():
        got = [reader.unet(x, t, c, added_cond_kwargs=cond).sample, reader.text_encoder_2(IDS)[0]]
    assert max(close(a, b) for a, b in zip(got, expected)) <= TOL


@pytest.mark.parametrize("case", ["oft", "waveft", "loha"])
def test_peft_single_file_export_is_read_by_peft(pipe, sources, tmp_path, case):
    """One .safetensors with ``unet.``/``text_encoder.`` keys; its metadata's ``peft_config`` holds each config."""
    from peft import PeftConfig as Config
    from safetensors import safe_open

    src, expected = sources("peft", case)
    dest = tmp_path / "out.safetensors"
    da.convert(src, dest, format="peft")
    with safe_open(str(dest), "pt") as f:
        configs = json.loads(f.metadata()["peft_config"])
    tensors = load_file(str(dest))
    for comp in COMPONENTS:
        config = Config.from_peft_type(**configs[comp])
        model = inject_adapter_in_model(config, copy.deepcopy(getattr(pipe, comp)), adapter_name="default")
        part = {k.removeprefix(comp + "."): v for k, v in tensors.items() if k.startswith(comp + ".")}
        result = set_peft_model_state_dict(model, part, adapter_name="default")
        assert not result.unexpected_keys
        assert close(run(comp, model), expected[comp]) <= TOL, comp
