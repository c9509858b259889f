"""Loader-level parity: a file made by the reference tool, loaded by diffadapt, equals the reference forward.

Table: method × component (UNet: Linear + Conv 1×1 + Conv 3×3; text encoder: Linear) × format
(LyCORIS/kohya files from ``lycoris``' own modules, PEFT folders from ``peft``'s own layers).
"""

from __future__ import annotations

import copy

import pytest
import torch

import diffadapt as da
from diffadapt.fixtures import UNET_MODULES, lycoris_file, randomize_
from diffadapt.testing import param_hashes, tiny_sd1_pipeline

TOL = 1e-5


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


def unet_out(unet):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    c = torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), c).sample


def te_out(te):
    ids = torch.tensor([[0, 5, 9, 14, 22, 31, 2]])
    with torch.no_grad():
        return te(ids)[0]


COMPONENTS = {"unet": ("lora_unet", unet_out), "text_encoder": ("lora_te", te_out)}

LYCORIS = {
    "lora": dict(algo="lora"),
    "locon-tucker": dict(algo="lora", use_tucker=True),
    "dora-out": dict(algo="lora", weight_decompose=True),
    "dora-in": dict(algo="lora", weight_decompose=True, wd_on_out=False),
    "loha": dict(algo="loha", std=0.3),
    "loha-tucker": dict(algo="loha", use_tucker=True, std=0.3),
    "lokr-full": dict(algo="lokr", std=0.2),
    "lokr-decomposed": dict(algo="lokr", decompose_both=True, factor=4, rank=2, std=0.2),
    "lokr-tucker": dict(algo="lokr", use_tucker=True, factor=4, rank=2, std=0.2),
    "diag-oft": dict(algo="diag-oft", block_size=4),
    "diag-oft-constrained": dict(algo="diag-oft", block_size=4, constraint=1e-4, rescaled=True),
    # BOFT needs widths with a power-of-two factor: the TE's MLP (37 wide) is left out
    "boft": dict(algo="boft", block_size=4, target_modules=UNET_MODULES + ["CLIPAttention", "CLIPSdpaAttention"]),
    "full": dict(algo="full", std=0.01),
}


@pytest.mark.parametrize("component", list(COMPONENTS))
@pytest.mark.parametrize("case", list(LYCORIS))
def test_lycoris_file_matches_lycoris_forward(pipe, case, component):
    prefix, run = COMPONENTS[component]
    module = getattr(pipe, component)
    base = run(module)
    hashes = param_hashes(pipe)
    sd, ref = lycoris_file(module, prefix=prefix, **LYCORIS[case])
    expected = run(ref)
    assert (expected - base).abs().max() > 1e-3, "the adapter must change the output"
    info = da.load(pipe, sd, "x")
    try:
        assert info.components == {component: info.modules}
        got = run(module)
        assert (got - expected).abs().max().item() <= TOL
    finally:
        da.unload(pipe)
    assert param_hashes(pipe) == hashes


def _peft_configs():
    from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, WaveFTConfig

    attn = ["to_q", "to_k", "to_v", "to_out.0"]
    convs = ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out"]
    te = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    return {
        "lora": ("unet", LoraConfig(r=4, lora_alpha=8, target_modules=attn + convs, init_lora_weights=False)),
        "lora-patterns": ("unet", LoraConfig(
            r=4, lora_alpha=8, target_modules=attn + convs, init_lora_weights=False,
            rank_pattern={"to_q": 2, "conv1": 6}, alpha_pattern={"to_k": 3, "conv2": 1})),
        "lora-rslora": ("unet", LoraConfig(r=4, lora_alpha=8, target_modules=attn, use_rslora=True,
                                           init_lora_weights=False)),
        "dora": ("unet", LoraConfig(r=4, lora_alpha=8, target_modules=attn + ["conv1"], use_dora=True,
                                    init_lora_weights=False)),
        "lora-te": ("text_encoder", LoraConfig(r=4, lora_alpha=4, target_modules=te, init_lora_weights=False)),
        "loha": ("unet", LoHaConfig(r=4, alpha=8, target_modules=attn + convs, init_weights=False)),
        "lokr": ("unet", LoKrConfig(r=4, alpha=8, target_modules=attn + convs, init_weights=False)),
        "lokr-decompose-both": ("unet", LoKrConfig(r=2, alpha=4, target_modules=attn, decompose_both=True,
                                                   decompose_factor=4, init_weights=False)),
        "oft-neumann": ("unet", OFTConfig(r=0, oft_block_size=4, target_modules=attn, init_weights=False)),
        "oft-exact": ("unet", OFTConfig(r=0, oft_block_size=4, target_modules=attn + ["fc1"],
                                        use_cayley_neumann=False, init_weights=False)),
        "oft-te": ("text_encoder", OFTConfig(r=0, oft_block_size=8, target_modules=te, init_weights=False)),
        "waveft": ("unet", WaveFTConfig(n_frequency=40, scaling=25.0, target_modules=attn, init_weights=False)),
    }


PEFT_CASES = [
    "lora", "lora-patterns", "lora-rslora", "dora", "lora-te", "loha", "lokr", "lokr-decompose-both",
    "oft-neumann", "oft-exact", "oft-te", "waveft",
]


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_folder_matches_peft_forward(pipe, case, tmp_path):
    from peft import get_peft_model

    component, config = _peft_configs()[case]
    run = COMPONENTS[component][1]
    module = getattr(pipe, component)
    base = run(module)
    hashes = param_hashes(pipe)
    ref = get_peft_model(copy.deepcopy(module), config)
    std = 0.01 if case == "waveft" else 0.1  # WaveFT's scaling (25) already amplifies its spectrum
    randomize_(((n, p) for n, p in ref.named_parameters() if ".default" in n), seed=3, std=std)
    expected = run(ref)
    assert (expected - base).abs().max() > 1e-3
    ref.save_pretrained(tmp_path / component)
    da.load(pipe, tmp_path, "x")  # PEFT DreamBooth layout: <dir>/<component>/adapter_config.json
    try:
        assert (run(module) - expected).abs().max().item() <= TOL
    finally:
        da.unload(pipe)
    assert param_hashes(pipe) == hashes
