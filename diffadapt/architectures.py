"""Real-size diffusion architectures with deterministic random weights, built in code (no hub).

Benchmarks need the exact shapes of production models; conversions need their module trees (kohya flat names
resolve against them). Each builder takes the published config and fills the weights from a seeded generator,
one tensor at a time, without ever holding two copies; ``device="meta"`` gives the architecture with no
weights at all (module names and shapes, in well under a second).
"""

from __future__ import annotations

import math
import zlib

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

__all__ = ["sd15_unet", "sd15_text_encoder", "sdxl_unet"]

# --------------------------------------------------------------------------- weights


def _component_seed(seed: int, name: str) -> int:
    """Independent stream per component, so resizing one leaves the others' weights unchanged."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _build(name: str, factory, *, seed: int, dtype: torch.dtype, device) -> torch.nn.Module:
    """Construct ``factory()`` (the component called ``name``) with meta parameters, then fill them deterministically.

    Weights (ndim >= 2) get a uniform fill with variance ``1 / fan_in`` so
    activations stay O(1) through deep stacks; norm scales are ~1 and other
    1-D tensors (biases) small but non-zero, so adapters that touch biases or
    norms are observable.  Buffers (position ids, sin-cos tables) are computed
    normally by the constructor.  ``device="meta"`` skips materialisation.
    """
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        model = factory()
    model.eval()
    if torch.device(device).type == "meta":
        return torch.nn.Module.to(model, dtype)  # ModelMixin.to warns about fp32 modules on any dtype cast
    gen = torch.Generator().manual_seed(_component_seed(seed, name))
    for full_name, param in list(model.named_parameters()):
        value = torch.empty(param.shape, dtype=torch.float32)
        if param.ndim >= 2:
            bound = math.sqrt(3.0 / (param.numel() // param.shape[0]))
            value.uniform_(-bound, bound, generator=gen)
        elif full_name.endswith("weight"):
            value.uniform_(0.9, 1.1, generator=gen)
        else:
            value.uniform_(-0.02, 0.02, generator=gen)
        owner_name, _, attr = full_name.rpartition(".")
        value = value.to(device=device, dtype=dtype)
        model.get_submodule(owner_name)._parameters[attr] = torch.nn.Parameter(value, param.requires_grad)
    return model.to(device)


# --------------------------------------------------------------------------- configs

_SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
)
_SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)
_SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)


def sd15_unet(*, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> UNet2DConditionModel:
    """Stable Diffusion 1.5 UNet (859,520,964 parameters) with random weights, for benchmarks."""
    return _build("unet", lambda: UNet2DConditionModel(**_SD15_UNET), seed=seed, dtype=dtype, device=device)


def sd15_text_encoder(*, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> CLIPTextModel:
    """SD1.5 text encoder (CLIP ViT-L/14 text tower, 123,060,480 parameters) with random weights."""
    return _build("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**_SD15_TEXT)), seed=seed, dtype=dtype,
                  device=device)


def sdxl_unet(*, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> UNet2DConditionModel:
    """SDXL base UNet (2,567,463,684 parameters); use ``device="meta"`` to inspect it without ~10 GB of RAM."""
    return _build("unet", lambda: UNet2DConditionModel(**_SDXL_UNET), seed=seed, dtype=dtype, device=device)
