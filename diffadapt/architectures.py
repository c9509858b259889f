"""Real-size diffusion architectures with deterministic random weights, built in code (no hub).

Benchmarks need the exact shapes of production models; conversions need their module trees. Each builder
takes the published config and fills the weights from a seeded generator, one tensor at a time, without ever
holding two copies; ``device="meta"`` gives the architecture with no weights at all (module names and shapes,
in well under a second even for Flux-dev's 12 B parameters). Keyword overrides (``num_layers=1`` …) give
real-width slices of the big transformers for machines that cannot hold them whole.
"""

from __future__ import annotations

import math
import zlib

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

__all__ = ["sd15_unet", "sd15_text_encoder", "sdxl_unet", "flux_dev_transformer", "sd35_large_transformer",
           "sd35_medium_transformer", "t5_xxl_encoder"]

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
    normally by the constructor.  ``device="meta"`` skips materialisation, buffers included.
    """
    meta = torch.device(device).type == "meta"
    # on meta, buffers too (SD3.5's sin-cos position table alone is 0.9 GB); otherwise computed as usual
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=meta):
        model = factory()
    model.eval()
    if meta:
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


_FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
_SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                   num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
_SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                    dual_attention_layers=tuple(range(13)))


def flux_dev_transformer(*, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device="cpu",
                         **overrides) -> FluxTransformer2DModel:
    """FLUX.1-dev transformer (11,901,408,320 parameters; 19 double + 38 single blocks, width 3072).

    ``device="meta"`` for the architecture alone; ``num_layers=1, num_single_layers=1`` for a real-width slice.
    """
    return _build("transformer", lambda: FluxTransformer2DModel(**{**_FLUX_DEV, **overrides}), seed=seed,
                  dtype=dtype, device=device)


def sd35_large_transformer(*, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device="cpu",
                           **overrides) -> SD3Transformer2DModel:
    """Stable Diffusion 3.5 Large MMDiT (8,056,627,520 parameters; 38 joint blocks, width 2432, RMS q/k norms)."""
    return _build("transformer", lambda: SD3Transformer2DModel(**{**_SD35_LARGE, **overrides}), seed=seed,
                  dtype=dtype, device=device)


def sd35_medium_transformer(*, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device="cpu",
                            **overrides) -> SD3Transformer2DModel:
    """Stable Diffusion 3.5 Medium MMDiT-X (2,243,171,520 parameters; 24 joint blocks, width 1536, dual
    attention in the first 13)."""
    return _build("transformer", lambda: SD3Transformer2DModel(**{**_SD35_MEDIUM, **overrides}), seed=seed,
                  dtype=dtype, device=device)


_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
               use_cache=False, dropout_rate=0.0)


def t5_xxl_encoder(*, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device="cpu") -> T5EncoderModel:
    """The T5-XXL v1.1 encoder of Flux and SD3 (4,893,906,944 parameters); ``device="meta"`` for names and shapes."""
    return _build("text_encoder_3", lambda: T5EncoderModel(T5Config(**_T5_XXL)), seed=seed, dtype=dtype,
                  device=device)
