"""The in-code model builders other tests rely on: determinism, runnability, shapes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from diffadapt.testing import (
    generate,
    param_hashes,
    sd15_text_encoder,
    sd15_unet,
    sdxl_unet,
    tiny_dit_pipeline,
    tiny_sd1_pipeline,
    tiny_sdxl_pipeline,
)

# builder, pipeline class, denoiser component, tokenizer components
TINY = [
    pytest.param(tiny_sd1_pipeline, StableDiffusionPipeline, "unet", ["tokenizer"], id="sd1"),
    pytest.param(tiny_sdxl_pipeline, StableDiffusionXLPipeline, "unet", ["tokenizer", "tokenizer_2"], id="sdxl"),
    pytest.param(tiny_dit_pipeline, StableDiffusion3Pipeline, "transformer", ["tokenizer", "tokenizer_2"], id="dit"),
]
BUILDERS = [pytest.param(p.values[0], id=p.id) for p in TINY]


@pytest.mark.parametrize("build, cls, denoiser, tokenizers", TINY)
def test_builds_expected_pipeline(build, cls, denoiser, tokenizers):
    pipe = build()
    assert type(pipe) is cls
    assert isinstance(getattr(pipe, denoiser), torch.nn.Module)
    for name in tokenizers:
        assert getattr(pipe, name).model_max_length == 77
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in getattr(pipe, denoiser).parameters())


@pytest.mark.parametrize("build", BUILDERS)
def test_same_seed_is_bit_identical(build):
    assert param_hashes(build(seed=3)) == param_hashes(build(seed=3))


@pytest.mark.parametrize("build", BUILDERS)
def test_different_seed_changes_every_parameter(build):
    a, b = build(seed=0), build(seed=1)
    ha, hb = param_hashes(a), param_hashes(b)
    assert ha.keys() == hb.keys()
    params = {
        f"{comp}.{name}"
        for comp, module in a.components.items()
        if isinstance(module, torch.nn.Module)
        for name, _ in module.named_parameters()
    }
    assert params and all(ha[k] != hb[k] for k in params)
    assert all(ha[k] == hb[k] for k in ha.keys() - params)  # buffers are computed, not random


@pytest.mark.parametrize("build", BUILDERS)
def test_build_leaves_global_rng_alone(build):
    state = torch.get_rng_state()
    build(seed=5)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("build", BUILDERS)
def test_generate_is_finite_deterministic_and_prompt_dependent(build):
    pipe = build()
    image = generate(pipe)
    assert image.shape == (1, 16, 16, 3)
    assert np.isfinite(image).all() and 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0.01
    assert np.array_equal(image, generate(pipe))
    assert not np.array_equal(image, generate(pipe, seed=1))
    assert not np.array_equal(image, generate(pipe, "a photo of a dog"))


@pytest.mark.parametrize("build", BUILDERS)
def test_generate_size(build):
    assert generate(build(), size=32, steps=1).shape == (1, 32, 32, 3)


@pytest.mark.parametrize("build, cls, denoiser, tokenizers", TINY)
def test_tokenizers_round_trip(build, cls, denoiser, tokenizers):
    pipe = build()
    prompt = "a photo of a cat dog in the style of ink"
    for name in tokenizers:
        tok = getattr(pipe, name)
        encoder = getattr(pipe, name.replace("tokenizer", "text_encoder"))
        ids = tok(prompt).input_ids
        assert ids[0] == tok.bos_token_id == encoder.config.bos_token_id
        assert ids[-1] == tok.eos_token_id == encoder.config.eos_token_id
        assert tok.pad_token_id == encoder.config.pad_token_id
        assert tok.decode(ids, skip_special_tokens=True) == prompt
        assert tok.tokenize(prompt) == [w + "</w>" for w in prompt.split()]
        ids = tok("a photo of a cat <lora:x:1>").input_ids
        assert tok.unk_token_id not in ids[1:-1]
        assert max(ids) < encoder.config.vocab_size
        batch = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert batch.input_ids.shape == (1, 77)


def test_tokenizers_are_not_shared():
    a, b = tiny_sd1_pipeline(), tiny_sd1_pipeline()
    a.tokenizer.add_tokens(["<emb>"])
    assert len(b.tokenizer) == len(a.tokenizer) - 1


def test_sdxl_unet_has_one_and_two_layer_transformers():
    unet = tiny_sdxl_pipeline().unet
    depths = {len(m.transformer_blocks) for m in unet.modules() if isinstance(m, Transformer2DModel)}
    assert depths == {1, 2}
    assert unet.config.addition_embed_type == "text_time"
    assert len(unet.down_blocks[1].resnets) == 2


def test_sd1_unet_layout():
    unet = tiny_sd1_pipeline().unet
    names = dict(unet.named_modules())
    for name in ["down_blocks.0.attentions.1", "down_blocks.0.downsamplers.0", "mid_block.attentions.0",
                 "up_blocks.1.attentions.2", "up_blocks.0.upsamplers.0", "time_embedding.linear_1"]:
        assert name in names


@pytest.mark.parametrize("build", BUILDERS)
def test_bf16_build(build):
    pipe = build(dtype=torch.bfloat16)
    hashes = param_hashes(pipe)
    assert all(p.dtype == torch.bfloat16 for p in pipe.vae.parameters())
    assert hashes == param_hashes(build(dtype=torch.bfloat16))
    assert hashes != param_hashes(build())


def test_param_hashes_detect_single_element_change():
    pipe = tiny_sd1_pipeline()
    before = param_hashes(pipe)
    assert "unet.conv_in.weight" in before and "text_encoder.embeddings.position_ids" in before
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] += 1e-3
    after = param_hashes(pipe)
    assert {k for k in before if before[k] != after[k]} == {"unet.conv_in.weight"}
    assert param_hashes(pipe.unet)["conv_in.weight"] == after["unet.conv_in.weight"]


def test_param_hashes_see_dtype_not_just_bytes():
    module = torch.nn.Module()
    module.register_buffer("x", torch.zeros(4, dtype=torch.float32))
    before = param_hashes(module)
    module.x = torch.zeros(4, dtype=torch.int32)  # same 16 zero bytes
    assert param_hashes(module) != before


@pytest.mark.parametrize(
    "build, count",
    [(sd15_unet, 859_520_964), (sd15_text_encoder, 123_060_480), (sdxl_unet, 2_567_463_684)],
    ids=["sd15_unet", "sd15_text_encoder", "sdxl_unet"],
)
def test_real_size_parameter_counts_on_meta(build, count):
    model = build(device="meta")
    assert sum(p.numel() for p in model.parameters()) == count
    assert all(p.device.type == "meta" for p in model.parameters())


def test_sdxl_unet_config():
    cfg = sdxl_unet(device="meta").config
    assert tuple(cfg.transformer_layers_per_block) == (1, 2, 10)
    assert cfg.projection_class_embeddings_input_dim == 2816 and cfg.cross_attention_dim == 2048


_REAL_SD15 = """
import json, resource, torch
from diffadapt.testing import sd15_unet
unet = sd15_unet(seed=0)
with torch.no_grad():
    out = unet(torch.randn(1, 4, 8, 8), 500, encoder_hidden_states=torch.randn(1, 77, 768)).sample
print(json.dumps({"params": sum(p.numel() for p in unet.parameters()), "finite": bool(out.isfinite().all()),
                  "std": float(out.std()), "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


@pytest.mark.slow
def test_sd15_unet_materialises_within_memory_budget():
    # A fresh interpreter, so peak RSS measures this build alone.
    proc = subprocess.run([sys.executable, "-c", _REAL_SD15], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["params"] == 859_520_964
    assert result["finite"] and result["std"] > 0
    assert result["peak_gb"] < 4.0
