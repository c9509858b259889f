"""The DiT-era tiny pipelines: right classes, deterministic, runnable."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from diffadapt.testing import generate, param_hashes, tiny_flux_pipeline


def test_flux_pipeline_shape(flux):
    assert type(flux) is FluxPipeline
    assert type(flux.text_encoder_2).__name__ == "T5EncoderModel"
    names = dict(flux.transformer.named_modules())
    # the modules Flux files fuse: qkv of both streams, and the single blocks' linear1
    for n in ("transformer_blocks.1.attn.add_v_proj", "single_transformer_blocks.1.proj_mlp",
              "time_text_embed.guidance_embedder.linear_1", "norm_out.linear"):
        assert n in names
    assert names["single_transformer_blocks.0.proj_mlp"].out_features == 4 * names["single_transformer_blocks.0.attn.to_q"].out_features


def test_flux_deterministic_and_runs(flux):
    assert param_hashes(flux) == param_hashes(tiny_flux_pipeline())
    img = generate(flux, steps=2, max_sequence_length=16)
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()
    np.testing.assert_array_equal(img, generate(flux, steps=2, max_sequence_length=16))
    mine, other = param_hashes(flux.transformer), param_hashes(tiny_flux_pipeline(seed=1).transformer)
    assert mine.keys() == other.keys() and all(mine[k] != other[k] for k in mine)


def test_flux_t5_tokenizer_pads_and_ends(flux):
    ids = flux.tokenizer_2("a photo of a cat", padding="max_length", max_length=8).input_ids
    assert ids[-1] == 0 and 1 in ids and 2 not in ids  # </s> appended, <pad> = 0, no unknowns
    assert torch.is_tensor(flux.text_encoder_2(torch.tensor([ids])).last_hidden_state)


@pytest.mark.parametrize("build, params, module", [
    ("flux_dev_transformer", 11_901_408_320, "single_transformer_blocks.37.proj_mlp"),
    ("sd35_large_transformer", 8_056_627_520, "transformer_blocks.37.attn.add_q_proj"),
    ("sd35_medium_transformer", 2_243_171_520, "transformer_blocks.12.attn2.to_q"),
])
def test_real_size_dit_architectures_on_meta(build, params, module):
    from diffadapt import architectures

    model = getattr(architectures, build)(device="meta")
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(p.device.type == "meta" for p in model.parameters()) and module in dict(model.named_modules())


def test_real_width_slice_and_reexports():
    from diffadapt import architectures, testing

    block = architectures.flux_dev_transformer(device="meta", num_layers=1, num_single_layers=1)
    assert dict(block.named_modules())["transformer_blocks.0.attn.to_q"].weight.shape == (3072, 3072)
    assert testing.sd15_unet is architectures.sd15_unet and testing.sdxl_unet is architectures.sdxl_unet


def test_wan_and_qwen_pipelines():
    from diffadapt.testing import tiny_qwen_image_pipeline, tiny_wan_pipeline

    wan, qwen = tiny_wan_pipeline(), tiny_qwen_image_pipeline()
    assert type(wan.transformer).__name__ == "WanTransformer3DModel"
    assert param_hashes(wan.transformer) == param_hashes(tiny_wan_pipeline().transformer)
    img = generate(qwen, steps=2, max_sequence_length=32)
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()
