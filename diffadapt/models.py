"""Base models and samplers, shared by ``diffadapt generate`` and the studio.

``load_model`` opens a diffusers folder, hub id or single ``.safetensors``/``.ckpt`` checkpoint (or, with no
model, the embedded tiny SD1 pipeline). Samplers go by their A1111 names, so an infotext written here says
``Sampler: DPM++ 2M, Schedule type: Karras`` as the webui does, and a sampler name read from one maps back
to a diffusers scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SourceError, UnsupportedError

__all__ = ["TINY_MODEL", "SAMPLERS", "Sampler", "SAMPLER_CHOICES", "load_model", "sampler_name", "samplers_for",
           "make_scheduler", "native_size", "denoiser"]

TINY_MODEL = "diffadapt-tiny-sd1"

SAMPLERS = {  # diffusers scheduler class -> A1111 sampler name, for the infotext
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a", "DDIMScheduler": "DDIM",
    "DPMSolverMultistepScheduler": "DPM++ 2M", "PNDMScheduler": "PLMS", "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun", "UniPCMultistepScheduler": "UniPC", "FlowMatchEulerDiscreteScheduler": "Euler",
    "DPMSolverSinglestepScheduler": "DPM++ SDE", "KDPM2DiscreteScheduler": "DPM2",
}


@dataclass(frozen=True)
class Sampler:
    """A choice in a sampler menu: the A1111 name, the diffusers class, and the options that make it so."""

    label: str
    scheduler: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def infotext(self) -> tuple[str, str | None]:
        """(Sampler, Schedule type) as A1111 writes them."""
        return SAMPLERS.get(self.scheduler, self.scheduler), ("Karras" if self.options.get("use_karras_sigmas") else None)


SAMPLER_CHOICES = {s.label: s for s in (
    Sampler("Euler", "EulerDiscreteScheduler"),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler"),
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    Sampler("DDIM", "DDIMScheduler"),
    Sampler("UniPC", "UniPCMultistepScheduler"),
    Sampler("Heun", "HeunDiscreteScheduler"),
    Sampler("LMS", "LMSDiscreteScheduler"),
    Sampler("PLMS", "PNDMScheduler"),
)}


def sampler_name(scheduler: Any) -> tuple[str, str | None]:
    """(A1111 sampler name, schedule type or None) of a diffusers scheduler instance."""
    cls = type(scheduler).__name__
    karras = bool(getattr(scheduler, "config", {}).get("use_karras_sigmas"))
    return SAMPLERS.get(cls, cls), ("Karras" if karras else None)


def samplers_for(scheduler: Any) -> list[str]:
    """The sampler labels that can replace ``scheduler`` (its compatibles; flow-matching models keep their own)."""
    compatible = {c.__name__ for c in getattr(scheduler, "compatibles", [])} | {type(scheduler).__name__}
    if type(scheduler).__name__.startswith("FlowMatch"):
        return [sampler_name(scheduler)[0]]
    return [label for label, s in SAMPLER_CHOICES.items() if s.scheduler in compatible]


def make_scheduler(scheduler: Any, label: str | None) -> Any:
    """A fresh scheduler for ``label`` built from ``scheduler``'s config (``None``: a copy of ``scheduler``)."""
    import diffusers

    if label is None:
        return type(scheduler).from_config(scheduler.config)
    if label not in samplers_for(scheduler):
        raise UnsupportedError(f"sampler '{label}' is not available for this model "
                               f"(choose one of {samplers_for(scheduler)})")
    choice = SAMPLER_CHOICES.get(label)
    if choice is None or type(scheduler).__name__.startswith("FlowMatch"):  # flow matching keeps its own
        return type(scheduler).from_config(scheduler.config)
    cls = getattr(diffusers, choice.scheduler)
    config = {k: v for k, v in scheduler.config.items() if k != "use_karras_sigmas"}
    return cls.from_config(config, **choice.options)


def denoiser(pipe: Any) -> Any:
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def native_size(pipe: Any, model_name: str | None = None) -> int:
    """The image size a model was made for; 64 px on the tiny model (its 16 px is too small to look at)."""
    if model_name == TINY_MODEL:
        return 64
    return int(denoiser(pipe).config.sample_size * pipe.vae_scale_factor)


def load_model(model: str | None, device: str):
    """(pipeline, model name, model hash) — the embedded tiny SD1 pipeline when no model is given."""
    import torch

    if model is None:
        from .testing import tiny_sd1_pipeline

        return tiny_sd1_pipeline(device=device), TINY_MODEL, None
    import diffusers

    kw = {"torch_dtype": torch.float16} if device.startswith("cuda") else {}
    try:
        if model.lower().endswith((".safetensors", ".ckpt")):
            from safetensors import safe_open

            from .infotext import adapter_hash

            sdxl = False
            if model.lower().endswith(".safetensors"):
                with safe_open(model, "pt") as f:
                    sdxl = any(k.startswith("conditioner.embedders.1.") for k in f.keys())
            cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
            pipe = cls.from_single_file(model, **kw)
            name, digest = Path(model).stem, adapter_hash(model, full_file=True, length=10)
        else:  # local folder or hub id; HF_HUB_OFFLINE=1 keeps it to the cache
            pipe = diffusers.DiffusionPipeline.from_pretrained(model, **kw)
            name, digest = Path(model).name if Path(model).exists() else model, None
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot load model '{model}': {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), name, digest
