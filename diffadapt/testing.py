"""Deterministic random-weight diffusers pipelines, built entirely in code.

The test-suite, demos and benchmarks need real diffusers objects (so adapter
key names, module types and forward passes are exactly those of production
models) but cannot download anything from the Hub.  Everything here is built
from configs written below and filled from a seeded ``torch.Generator``:

* the same seed gives bit-identical weights, on any machine and independent of
  library weight-init code or the global RNG (which is left untouched);
* models are constructed with parameters on the meta device and materialised
  one tensor at a time, so even the real-size UNets build in seconds and never
  hold two copies of their weights.

Tiny pipelines (SD1, SDXL, SD3-style DiT, Flux, Wan 2.1 and 2.2, Qwen-Image) build in a fraction of a second and
run a 2-step generation in well under a second on CPU.  Real-size builders live in
:mod:`diffadapt.architectures` (:func:`sd15_unet`, :func:`sd15_text_encoder`, :func:`sdxl_unet` are
re-exported here); pass ``device="meta"`` to get an architecture without allocating any weights.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import math
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPImageProcessorPil,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .architectures import _build, sd15_text_encoder, sd15_unet, sdxl_unet  # noqa: F401  (real-size: re-exported)

__all__ = [
    "tiny_sd1_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_dit_pipeline",
    "tiny_flux_pipeline",
    "tiny_wan_pipeline",
    "tiny_wan_i2v_pipeline",
    "tiny_qwen_image_pipeline",
    "sd15_unet",
    "sd15_text_encoder",
    "sdxl_unet",
    "generate",
    "param_hashes",
]

# --------------------------------------------------------------------------- tokenizer

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_WORDS = """
a an the of in on at with and by for from to is this that photo photograph picture image
painting drawing sketch illustration portrait landscape render style art artwork cat dog
bird horse fox man woman girl boy person face eyes hair red green blue black white gold
dark bright light colorful detailed high quality best masterpiece realistic anime cartoon
ink watercolor oil pencil digital cinematic lighting sunset night forest city street mountain
sea sky beach house castle flower tree garden snow rain lora lycoris trigger token sks
""".split()


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP-style BPE of one word: repeatedly merge the lowest-ranked adjacent pair."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == math.inf:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.cache
def _tokenizer_dir() -> str:
    """Write a tiny byte-level BPE vocabulary once per process.

    All 256 byte symbols (bare and with the ``</w>`` word-end mark) are present,
    so any text tokenizes without unknown tokens.  Merges are appended until
    every word in ``_WORDS`` is a single token; a merge appended later can
    never split a word that already resolves, so the loop is order-safe.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(symbol, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        while len(parts := _bpe(word, ranks)) > 1:
            ranks[parts[0], parts[1]] = len(ranks)
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    vocab.setdefault(_BOS, len(vocab))
    vocab.setdefault(_EOS, len(vocab))
    path = tempfile.mkdtemp(prefix="diffadapt-clip-vocab-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    with open(f"{path}/vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(f"{path}/merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranks))
    return path


@functools.cache
def _vocab() -> dict[str, int]:
    with open(f"{_tokenizer_dir()}/vocab.json", encoding="utf-8") as f:
        return json.load(f)


def _tokenizer(*, pad_token: str = _EOS) -> CLIPTokenizer:
    """A fresh tokenizer per pipeline: textual-inversion loading mutates it."""
    return CLIPTokenizer.from_pretrained(_tokenizer_dir(), pad_token=pad_token, model_max_length=77)


def _clip_config(*, hidden: int, projection: int, pad_token: str = _EOS) -> CLIPTextConfig:
    vocab = _vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection, hidden_act="quick_gelu",
        bos_token_id=vocab[_BOS], eos_token_id=vocab[_EOS], pad_token_id=vocab[pad_token],
    )


@functools.cache
def _t5_vocab() -> list[tuple[str, float]]:
    """A SentencePiece-style unigram vocabulary: T5's special ids first, whole words, then single characters."""
    import string

    chars = sorted(set(string.printable) - set(string.whitespace))
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *(("\u2581" + w, -1.0) for w in _WORDS),
            ("\u2581", -2.0), *((c, -5.0) for c in chars)]


def _t5_tokenizer(*, max_length: int = 512) -> T5TokenizerFast:
    """A T5 tokenizer (``</s>`` appended, ``<pad>`` = 0) built in code from :func:`_t5_vocab`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(_t5_vocab(), unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def _t5_config(*, d_model: int) -> T5Config:
    return T5Config(vocab_size=len(_t5_vocab()), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                    is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)


# --------------------------------------------------------------------------- tiny pipelines

_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading")


def _tiny_vae(*, latent_channels: int = 4, **extra) -> dict[str, Any]:
    """Two-level VAE (scale factor 2): the smallest that still has up/down samplers."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16, **extra,
    )


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd1_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> StableDiffusionPipeline:
    """SD1-shaped pipeline: attention in the outer level, plain resnets in the inner one.

    ``layers_per_block=2`` like SD1 so ``down_blocks.N.{resnets,attentions}.1`` exist
    and kohya/diffusers key mapping is exercised on realistic names.  Default image 16x16.
    """
    build = functools.partial(_build, seed=seed, dtype=dtype, device=device)

    unet = build("unet", lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ))
    text_encoder = build("text_encoder", lambda: CLIPTextModel(_clip_config(hidden=32, projection=32)))
    vae = build("vae", lambda: AutoencoderKL(**_tiny_vae()))
    return _finish(StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(**_SD_BETAS), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ))


def tiny_sdxl_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> StableDiffusionXLPipeline:
    """SDXL-shaped pipeline: two text encoders of *different* widths (32 and 64).

    Distinct widths make a te1/te2 key mix-up fail loudly on shape.  The UNet
    mirrors SDXL's (1, 2, 10) layout as (1, 1, 2): no attention at the first
    level, then one and two transformer layers.  Default image 16x16.
    """
    build = functools.partial(_build, seed=seed, dtype=dtype, device=device)

    time_dim, te2_proj = 8, 64
    unet = build("unet", lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=32 + 64, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=time_dim * 6 + te2_proj, norm_num_groups=8,
    ))
    text_encoder = build("text_encoder", lambda: CLIPTextModel(_clip_config(hidden=32, projection=32)))
    text_encoder_2 = build("text_encoder_2", lambda: CLIPTextModelWithProjection(
        _clip_config(hidden=64, projection=te2_proj, pad_token="!")))
    vae = build("vae", lambda: AutoencoderKL(**_tiny_vae()))
    return _finish(StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(pad_token="!"), unet=unet, scheduler=EulerDiscreteScheduler(**_SD_BETAS),
        add_watermarker=False,
    ))


def tiny_dit_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> StableDiffusion3Pipeline:
    """SD3-shaped (MMDiT) pipeline with two CLIP encoders and no T5.

    ``StableDiffusion3Pipeline`` substitutes zeros for the T5 embeddings when
    ``text_encoder_3`` is None, so joint attention still sees a text stream of
    77 + 256 tokens.  16 latent channels and flow matching, as in SD3.  Default image 16x16.
    """
    build = functools.partial(_build, seed=seed, dtype=dtype, device=device)

    transformer = build("transformer", lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=128, pooled_projection_dim=32 + 64,
        pos_embed_max_size=16,
    ))
    text_encoder = build("text_encoder", lambda: CLIPTextModelWithProjection(_clip_config(hidden=32, projection=32)))
    text_encoder_2 = build("text_encoder_2", lambda: CLIPTextModelWithProjection(
        _clip_config(hidden=64, projection=64)))
    vae = build("vae", lambda: AutoencoderKL(**_tiny_vae(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035)))
    return _finish(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    ))


def tiny_flux_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> FluxPipeline:
    """Flux-dev-shaped pipeline: CLIP-L-like ``text_encoder``, T5 ``text_encoder_2``, guidance embedding.

    Two double-stream and two single-stream blocks (width 16, 2 heads of 8), so the fused projections of
    Flux files (``img_attn.qkv`` → ``to_q/k/v``, single ``linear1`` → ``to_q/k/v`` + ``proj_mlp`` of width 64)
    are exercised on every block kind. The VAE has 4 latent channels (16 after Flux's 2×2 packing).
    Default image 16×16; pass ``max_sequence_length`` (≤ 512) to shorten the T5 stream.
    """
    build = functools.partial(_build, seed=seed, dtype=dtype, device=device)

    transformer = build("transformer", lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ))
    text_encoder = build("text_encoder", lambda: CLIPTextModel(_clip_config(hidden=32, projection=32)))
    text_encoder_2 = build("text_encoder_2", lambda: T5EncoderModel(_t5_config(d_model=32)))
    vae = build("vae", lambda: AutoencoderKL(**_tiny_vae(
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
        tokenizer=_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=_t5_tokenizer(), transformer=transformer,
    )
    pipe.default_sample_size = 8  # the pipeline's default image is default_sample_size × vae scale factor
    return _finish(pipe)


def tiny_wan_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> WanPipeline:
    """Wan-2.1-shaped text-to-video pipeline: T5 text encoder, 3-D VAE, two Wan blocks (2 heads of 12).

    Pass ``height=16, width=16, num_frames=5`` to generate (the pipeline's defaults are Wan's real sizes).
    """
    build = functools.partial(_build, seed=seed, dtype=dtype, device=device)
    return _finish(WanPipeline(tokenizer=_t5_tokenizer(), text_encoder=_wan_t5(build), transformer=_wan_expert(
        build, "transformer"), vae=_wan_vae(build), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0)))


def tiny_wan22_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu",
                        boundary_ratio: float = 0.5) -> WanPipeline:
    """Wan-2.2-A14B-shaped text-to-video pipeline: :func:`tiny_wan_pipeline` with two experts of the same shape
    and different weights — ``transformer`` denoises the high-noise steps (timestep ≥ ``boundary_ratio`` × 1000),
    ``transformer_2`` the low-noise ones after the boundary.

    Pass ``height=16, width=16, num_frames=5`` and ``num_inference_steps`` ≥ 2 so both experts run.
    """
    build = functools.partial(_build, seed=seed, dtype=dtype, device=device)
    return _finish(WanPipeline(
        tokenizer=_t5_tokenizer(), text_encoder=_wan_t5(build), transformer=_wan_expert(build, "transformer"),
        transformer_2=_wan_expert(build, "transformer_2"), vae=_wan_vae(build),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), boundary_ratio=boundary_ratio))


def _wan_expert(build, name: str) -> WanTransformer3DModel:
    """Two Wan blocks, 2 heads of 12; its seed comes from ``name``, so the two experts differ."""
    return build(name, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ))


def _wan_t5(build) -> T5EncoderModel:
    return build("text_encoder", lambda: T5EncoderModel(_t5_config(d_model=32)))


def _wan_vae(build) -> AutoencoderKLWan:
    return build("vae", lambda: AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                 temperal_downsample=[False, True, True]))


def tiny_wan_i2v_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32,
                          device="cpu") -> WanImageToVideoPipeline:
    """Wan-2.1-I2V-shaped image-to-video pipeline: :func:`tiny_wan_pipeline`'s sizes plus a CLIP vision encoder
    (width 16) whose features feed the image embedder (``img_emb``) and each block's image cross-attention
    (``cross_attn.k_img`` / ``v_img`` / ``norm_k_img`` → ``attn2.add_k_proj`` / ``add_v_proj`` / ``norm_added_k``).
    The transformer takes the noise, the encoded first frame and its 4-channel mask: 36 input channels.

    Pass ``image=`` (a PIL image), ``height=16, width=16, num_frames=5`` to generate; text embeddings passed as
    ``prompt_embeds`` need 512 tokens (diffusers' Wan attention splits image from text context at 512).
    """
    build = functools.partial(_build, seed=seed, dtype=dtype, device=device)

    transformer = build("transformer", lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, image_dim=16, added_kv_proj_dim=24,
    ))
    text_encoder = build("text_encoder", lambda: T5EncoderModel(_t5_config(d_model=32)))
    image_encoder = build("image_encoder", lambda: CLIPVisionModel(CLIPVisionConfig(
        hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16)))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    vae = build("vae", lambda: AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                temperal_downsample=[False, True, True]))
    return _finish(WanImageToVideoPipeline(
        tokenizer=_t5_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(
            shift=5.0), image_processor=processor, image_encoder=image_encoder, transformer=transformer))


_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE over the 256 byte symbols plus Qwen's chat markers (the pipeline's prompt template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_QWEN_SPECIALS))
    return Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                          bos_token=None)


def tiny_qwen_image_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32,
                             device="cpu") -> QwenImagePipeline:
    """Qwen-Image-shaped pipeline: a two-layer Qwen2.5-VL text encoder (width 16), two Qwen-Image blocks.

    Default image 16×16.
    """
    build = functools.partial(_build, seed=seed, dtype=dtype, device=device)
    tokenizer = _qwen_tokenizer()
    n = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=n, rope_theta=1e6,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                         bos_token_id=None, eos_token_id=n - 1, pad_token_id=n - 3),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=n, vision_start_token_id=n, image_token_id=n, video_token_id=n,
        vision_end_token_id=n,
    )
    transformer = build("transformer", lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ))
    text_encoder = build("text_encoder", lambda: Qwen2_5_VLForConditionalGeneration(config))
    vae = build("vae", lambda: AutoencoderKLQwenImage(base_dim=4 * 6, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                                      temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                                      latents_std=[1.0] * 4))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)
    pipe.default_sample_size = 4  # default image: 4 × vae scale factor (4) = 16
    return _finish(pipe)


# --------------------------------------------------------------------------- helpers


def generate(pipe, prompt: str = "a photo of a cat", *, steps: int = 2, seed: int = 0, size: int | None = None,
             **kwargs) -> np.ndarray:
    """Run ``pipe`` reproducibly and return images as a float array ``(batch, H, W, 3)`` in [0, 1].

    A CPU generator is used whatever the pipeline device so results do not
    depend on where it runs.  ``size`` defaults to the pipeline's native size.
    """
    if size is not None:
        kwargs.setdefault("height", size)
        kwargs.setdefault("width", size)
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        out = pipe(prompt, num_inference_steps=steps, generator=generator, output_type="np", **kwargs)
    return np.asarray(out.images)


def param_hashes(obj) -> dict[str, str]:
    """Map each parameter and buffer to a hash of its dtype, shape and raw bytes.

    Comparing two snapshots proves that an operation (e.g. a failed load) left
    a model bit-for-bit unchanged.  Pipelines are keyed ``"component.name"``;
    a bare module is keyed by its own parameter names.
    """
    if isinstance(obj, torch.nn.Module):
        modules = {"": obj}
    else:
        modules = {k: v for k, v in obj.components.items() if isinstance(v, torch.nn.Module)}
    hashes = {}
    for prefix, module in modules.items():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            t = tensor.detach()
            digest = hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.device.type != "meta":
                digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            hashes[f"{prefix}.{name}" if prefix else name] = digest.hexdigest()
    return hashes
