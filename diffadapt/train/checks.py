"""Every check that can fail without the model runs here, before anything heavy is loaded: a typo, a missing
folder or a corrupt photo is a one-line error (exit code 2), not a traceback an hour into a run."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import math

from . import checkpoint, flow
from .adapters import KOHYA_METHODS
from .args import TrainConfig
from .data import TrainInputError, check_images, list_images
from .families import Family, detect, model_index


@dataclass
class Plan:
    family: Family
    output_dir: Path
    instance_images: list[Path]
    class_dir: Path | None
    resume: Path | None
    config: TrainConfig  # with the family's defaults filled in
    flow: flow.FlowOptions | None = None  # SD3/Flux timestep density and loss weighting


def _positive(config: TrainConfig) -> None:
    if config.max_train_steps is not None and config.max_train_steps < 1:
        raise TrainInputError(f"--max_train_steps {config.max_train_steps}: must be at least 1")
    for flag in ("num_train_epochs", "rank", "train_batch_size", "gradient_accumulation_steps",
                 "checkpointing_steps", "sample_batch_size", "num_validation_images", "validation_epochs"):
        if getattr(config, flag) < 1:
            raise TrainInputError(f"--{flag} {getattr(config, flag)}: must be at least 1")
    if config.checkpoints_total_limit is not None and config.checkpoints_total_limit < 1:
        raise TrainInputError(f"--checkpoints_total_limit {config.checkpoints_total_limit}: must be at least 1")
    if config.with_prior_preservation and config.num_class_images < 1:
        raise TrainInputError(f"--num_class_images {config.num_class_images}: must be at least 1")
    if config.resolution is not None and config.resolution < 1:
        raise TrainInputError(f"--resolution {config.resolution}: must be at least 1")
    for flag in ("learning_rate", "text_encoder_lr"):
        if getattr(config, flag) is not None and not getattr(config, flag) > 0:
            raise TrainInputError(f"--{flag} {getattr(config, flag)}: must be positive")
    for flag in ("lr_warmup_steps", "dataloader_num_workers", "max_grad_norm", "noise_offset", "prior_loss_weight",
                 "adam_weight_decay", "adam_weight_decay_text_encoder"):
        if getattr(config, flag) is not None and getattr(config, flag) < 0:
            raise TrainInputError(f"--{flag} {getattr(config, flag)}: must not be negative")


def _packages(config: TrainConfig) -> None:
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise TrainInputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    wanted = {"all": ["tensorboard", "wandb"], "none": []}.get(config.report_to, [config.report_to])
    for name in wanted:
        if importlib.util.find_spec(name) is None:
            raise TrainInputError(f"--report_to {config.report_to} needs the '{name}' package: pip install {name}")


def _latent_grid(path: Path, family: Family, resolution: int) -> None:
    """SD3/Flux pack 2x2 latent patches: the latent side must be even."""
    vae_config = path / "vae" / "config.json"
    if not family.flow or not vae_config.is_file():
        return
    try:
        scale = 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return
    if resolution % (2 * scale):
        raise TrainInputError(f"--resolution {resolution}: {family.name} needs a multiple of {2 * scale}")


def _output(config: TrainConfig, output_dir: Path) -> Path | None:
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainInputError(f"--output_dir {output_dir}: exists and is not a folder")
    resume = checkpoint.resolve(output_dir, config.resume_from_checkpoint)
    entries = [p for p in output_dir.iterdir()] if output_dir.is_dir() else []
    if entries and not config.overwrite and config.resume_from_checkpoint is None:
        raise TrainInputError(f"--output_dir {output_dir}: not empty ({', '.join(sorted(p.name for p in entries)[:4])}"
                              f"…); pass --overwrite to replace a previous run, or --resume_from_checkpoint latest")
    return resume


def _flow(config: TrainConfig, family: Family) -> flow.FlowOptions | None:
    given = [f"--{k}" for k in flow.FLAGS if getattr(config, k) is not None]
    if not family.flow:
        if given:
            raise TrainInputError(f"{', '.join(given)}: flow-matching options (SD3, Flux); {family.name} is a DDPM "
                                  "model (its loss weighting is --snr_gamma)")
        return None
    opts = flow.options(family.name, config)
    if not (math.isfinite(opts.logit_std) and opts.logit_std > 0) or not math.isfinite(opts.logit_mean):
        raise TrainInputError(f"--logit_mean {opts.logit_mean} --logit_std {opts.logit_std}: need finite values "
                              "and a positive std")
    if not -1.0 <= opts.mode_scale <= 2 / (math.pi - 2):  # SD3 paper, sec. 3.1: else the density leaves [0, 1]
        raise TrainInputError(f"--mode_scale {opts.mode_scale}: must be in [-1, {2 / (math.pi - 2):.4f}]")
    return opts


def _text_options(config: TrainConfig, family: Family) -> None:
    length = config.max_sequence_length
    if config.guidance_scale is not None and family.name != "flux":
        raise TrainInputError(f"--guidance_scale: the guidance value of Flux's guidance-distilled models; "
                              f"{family.name} trains without one")
    if length is None:
        return
    if not family.flow:
        raise TrainInputError(f"--max_sequence_length: the T5 prompt length of SD3/Flux; {family.name} has no T5")
    if length < 1:
        raise TrainInputError(f"--max_sequence_length {length}: must be at least 1")
    if family.name == "flux" and length > 512:  # FluxPipeline refuses more too
        raise TrainInputError(f"--max_sequence_length {length}: Flux takes at most 512")


def check(config: TrainConfig) -> Plan:
    _positive(config)
    if not 0 <= config.lora_dropout < 1:
        raise TrainInputError(f"--lora_dropout {config.lora_dropout}: must be in [0, 1)")
    if config.lora_dropout and config.method != "lora":
        raise TrainInputError(f"--lora_dropout: LoRA only; {config.method} has no such dropout")
    if "kohya" in config.save_format and config.method not in KOHYA_METHODS:
        raise TrainInputError(f"--save_format kohya: {config.method} has no kohya/LyCORIS form (only "
                              f"{', '.join(KOHYA_METHODS)}); use --save_format diffusers and/or peft")
    _packages(config)
    instance = list_images(config.instance_data_dir, what="--instance_data_dir")
    check_images(instance)
    class_dir = None
    if config.with_prior_preservation:
        if not config.class_data_dir:
            raise TrainInputError("--with_prior_preservation needs --class_data_dir")
        class_dir = Path(config.class_data_dir).expanduser()
        existing = list_images(class_dir, what="--class_data_dir", allow_missing=True)
        if len(existing) < config.num_class_images and not config.class_prompt:
            raise TrainInputError(f"--class_data_dir {class_dir}: {len(existing)} of {config.num_class_images} "
                                  "class images; pass --class_prompt to generate the rest")
        check_images(existing[: config.num_class_images])
    index = model_index(config.pretrained_model_name_or_path, revision=config.revision)
    family = detect(index, where=config.pretrained_model_name_or_path)
    if config.snr_gamma is not None and family.flow:
        raise TrainInputError(f"--snr_gamma: Min-SNR weighting is for DDPM models; {family.name} uses flow matching")
    flow_options = _flow(config, family)
    _text_options(config, family)
    config = config.with_family_defaults(family.name)
    _latent_grid(Path(config.pretrained_model_name_or_path).expanduser(), family, config.resolution)
    output_dir = Path(config.output_dir).expanduser()
    resume = _output(config, output_dir)
    if resume is not None:
        checkpoint.check_compatible(resume, checkpoint.settings(config, family.name))
    return Plan(family=family, output_dir=output_dir, instance_images=instance, class_dir=class_dir, resume=resume,
                config=config, flow=flow_options)
