"""Model families: what to read from the model folder, which modules to adapt, how to encode prompts and how
the denoiser is called and supervised.

SD1/SD2 and SDXL are DDPM models (epsilon or v-prediction from the scheduler config; SDXL adds its pooled text
embedding and size/crop time ids); SD3 and Flux are flow-matching transformers (the target is the velocity
``noise - latents``; timesteps from the scheduler's shifted table, drawn and weighted as in ``flow``). Prompt
encoding follows each pipeline's own ``encode_prompt`` (a test checks they agree) but runs through the
accelerate-prepared text encoders, so their adapters train under DDP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import flow
from .data import TrainInputError

CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
MMDIT_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                 "attn.add_v_proj", "attn.to_add_out"]
# the Flux script also adapts the double blocks' feed-forwards
FLUX_TARGETS = MMDIT_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


@dataclass(frozen=True)
class Family:
    name: str
    denoiser: str  # "unet" | "transformer"
    targets: tuple[str, ...]
    text_encoders: tuple[str, ...]  # pipeline attributes of the encoders, in encode order
    trainable_encoders: tuple[str, ...]  # CLIP encoders adapted with --train_text_encoder
    flow: bool


FAMILIES = {
    "StableDiffusionPipeline": Family("sd1", "unet", tuple(UNET_TARGETS), ("text_encoder",), ("text_encoder",), False),
    "StableDiffusionXLPipeline": Family("sdxl", "unet", tuple(UNET_TARGETS), ("text_encoder", "text_encoder_2"),
                                        ("text_encoder", "text_encoder_2"), False),
    "StableDiffusion3Pipeline": Family("sd3", "transformer", tuple(MMDIT_TARGETS),
                                       ("text_encoder", "text_encoder_2", "text_encoder_3"),
                                       ("text_encoder", "text_encoder_2"), True),
    "FluxPipeline": Family("flux", "transformer", tuple(FLUX_TARGETS), ("text_encoder", "text_encoder_2"),
                           ("text_encoder",), True),
}


def model_index(name_or_path: str, *, revision: str | None) -> dict[str, Any]:
    """model_index.json of a local folder, or fetched alone from the hub (honours HF_HUB_OFFLINE)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TrainInputError(f"{path}: not a diffusers model folder (a single checkpoint file? convert it "
                                  "with diffusers' scripts first)")
        index = path / "model_index.json"
        if not index.is_file():
            raise TrainInputError(f"{path}: not a diffusers model folder (no model_index.json)")
    else:
        try:
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(name_or_path, "model_index.json", revision=revision))
        except Exception as e:  # noqa: BLE001 - any hub failure is the same user error
            raise TrainInputError(f"{name_or_path}: no such folder, and not reachable as a hub model "
                                  f"({type(e).__name__})") from None
    try:
        data = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainInputError(f"{index}: malformed ({e})") from None
    return data


def detect(index: dict[str, Any], *, where: str) -> Family:
    cls = index.get("_class_name")
    family = FAMILIES.get(cls)
    if family is None:
        known = ", ".join(f"{f.name} ({c})" for c, f in FAMILIES.items())
        raise TrainInputError(f"{where}: unsupported model family {cls!r}; training supports {known}")
    return family


def load_pipeline(family: Family, name_or_path: str, *, revision: str | None, variant: str | None,
                  torch_dtype: torch.dtype | None = None):
    from diffusers import DiffusionPipeline

    extra = {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd1" else {}
    index = Path(name_or_path).expanduser() / "model_index.json"
    if index.is_file():  # components saved as absent (SD3 without T5) must be passed as None explicitly
        entries = json.loads(index.read_text())
        extra.update({k: None for k, v in entries.items()
                      if isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None})
    if torch_dtype is not None:
        extra["torch_dtype"] = torch_dtype
    pipe = DiffusionPipeline.from_pretrained(name_or_path, revision=revision, variant=variant, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise_scheduler(family: Family, pipe):
    """The training schedule: DDPM with the model's betas, or the model's flow-matching schedule."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if family.flow:
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return DDPMScheduler.from_config(pipe.scheduler.config)


# --------------------------------------------------------------------------- prompts


def tokenize(family: Family, pipe, prompt: str, *, max_sequence_length: int | None = None
             ) -> list[torch.Tensor | None]:
    """Token ids per text encoder (None where the pipeline has no such encoder); T5 prompts padded to
    ``max_sequence_length`` (default: the pipeline's, 256 for SD3 and 512 for Flux)."""
    out = []
    for i, name in enumerate(family.text_encoders):
        tok = getattr(pipe, "tokenizer" if i == 0 else f"tokenizer_{i + 1}", None)
        if getattr(pipe, name, None) is None or tok is None:
            out.append(None)
            continue
        t5 = (family.name == "sd3" and i == 2) or (family.name == "flux" and i == 1)
        length = (max_sequence_length or min(tok.model_max_length, 256 if family.name == "sd3" else 512)) if t5 \
            else tok.model_max_length
        out.append(tok(prompt, padding="max_length", max_length=length, truncation=True,
                       return_tensors="pt").input_ids)
    return out


def encode(family: Family, encoders: list, ids: list[torch.Tensor | None], *, joint_dim: int | None = None,
           t5_length: int = 256) -> dict[str, torch.Tensor]:
    """Conditioning for one prompt (batch 1): ``hidden`` and, for SDXL/SD3/Flux, ``pooled``."""
    if family.name == "sd1":
        return {"hidden": encoders[0](ids[0].to(_device(encoders[0])))[0]}
    if family.name == "sdxl":
        hidden, pooled = [], None
        for enc, tok_ids in zip(encoders, ids):
            out = enc(tok_ids.to(_device(enc)), output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}
    if family.name == "sd3":
        clips, pooled = [], []
        for enc, tok_ids in zip(encoders[:2], ids[:2]):
            out = enc(tok_ids.to(_device(enc)), output_hidden_states=True)
            pooled.append(out[0])
            clips.append(out.hidden_states[-2])
        clip = torch.cat(clips, dim=-1)
        if encoders[2] is not None:
            t5 = encoders[2](ids[2].to(_device(encoders[2])))[0]
        else:  # the pipeline's own stand-in when the model ships without T5
            t5 = torch.zeros(1, t5_length, joint_dim, dtype=clip.dtype, device=clip.device)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"hidden": torch.cat([clip, t5.to(clip.dtype)], dim=-2), "pooled": torch.cat(pooled, dim=-1)}
    # flux
    pooled = encoders[0](ids[0].to(_device(encoders[0])), output_hidden_states=False).pooler_output
    t5 = encoders[1](ids[1].to(_device(encoders[1])), output_hidden_states=False)[0]
    return {"hidden": t5, "pooled": pooled}


def _device(module) -> torch.device:
    return next(module.parameters()).device


# --------------------------------------------------------------------------- denoising


def to_latents(family: Family, vae_config, sample: torch.Tensor) -> torch.Tensor:
    shift = vae_config.get("shift_factor") or 0.0
    if family.flow:
        return (sample - shift) * vae_config["scaling_factor"]
    return sample * vae_config["scaling_factor"]


@dataclass
class Noised:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor  # DDPM: noise or velocity; flow: the velocity noise - latents
    latents: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor | None = None  # flow: (B, 1, 1, 1)


def add_noise(family: Family, scheduler, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> Noised:
    """``u`` in [0, 1] per sample picks the timestep (the caller draws it from its own generator)."""
    if family.flow:  # diffusers' SD3/Flux scripts: timesteps[idx], get_sigmas, (1 - sigma) x + sigma noise
        idx = flow.table_index(scheduler, u).to(scheduler.timesteps.device)
        timesteps = scheduler.timesteps[idx].to(latents.device)
        sigma = scheduler.sigmas.to(device=latents.device, dtype=latents.dtype)[idx.to(latents.device)]
        sigma = sigma.view(-1, *([1] * (latents.ndim - 1)))
        return Noised((1.0 - sigma) * latents + sigma * noise, timesteps, noise - latents, latents, noise, sigma)
    n = scheduler.config.num_train_timesteps
    timesteps = (u * n).long().clamp_(max=n - 1).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return Noised(noisy, timesteps, target, latents, noise)


def predict(family: Family, denoiser, noised: Noised, cond: dict[str, torch.Tensor], *, batch: dict,
            resolution: int, vae_scale: int, guidance: float | None, dtype: torch.dtype) -> torch.Tensor:
    x, t = noised.noisy.to(dtype), noised.timesteps
    hidden = cond["hidden"].to(dtype)
    if family.name == "sd1":
        return denoiser(x, t, hidden).sample
    if family.name == "sdxl":
        size = torch.full((x.shape[0], 2), float(resolution))
        time_ids = torch.cat([batch["original_size"], batch["crop"], size], dim=1).to(x.device, dtype)
        return denoiser(x, t, hidden, added_cond_kwargs={"text_embeds": cond["pooled"].to(dtype),
                                                         "time_ids": time_ids}).sample
    if family.name == "sd3":
        return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=hidden,
                        pooled_projections=cond["pooled"].to(dtype), return_dict=False)[0]
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
    txt_ids = torch.zeros(hidden.shape[1], 3, device=x.device, dtype=dtype)
    config = getattr(denoiser, "module", denoiser).config
    g = torch.full((b,), guidance, device=x.device, dtype=torch.float32) if config.guidance_embeds else None
    out = denoiser(hidden_states=packed, timestep=t / 1000, guidance=g,
                   pooled_projections=cond["pooled"].to(dtype), encoder_hidden_states=hidden, txt_ids=txt_ids,
                   img_ids=img_ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * vae_scale, w * vae_scale, vae_scale)


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR weighting (Hang et al. 2023), as diffusers' scripts apply it."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    w = torch.clamp(snr, max=gamma) / snr
    if scheduler.config.prediction_type == "v_prediction":
        w = torch.clamp(snr, max=gamma) / (snr + 1)
    return w
