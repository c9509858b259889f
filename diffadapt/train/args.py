"""Command-line options: diffusers' DreamBooth flag names (so an existing command line runs unchanged) plus
diffadapt's own (``--method``, ``--alpha``, ``--cache_latents``, ``--snr_gamma``, ``--noise_offset``,
``--save_format``, ``--overwrite``). Dashes and underscores are both accepted (``--max-train-steps``)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields, replace

from .flow import SCHEMES

METHODS = ("lora", "loha", "lokr", "oft", "waveft")
SAVE_FORMATS = ("diffusers", "kohya", "peft")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "piecewise_constant", "cosine_with_min_lr", "warmup_stable_decay")


# defaults of diffusers' train_dreambooth_lora.py (SD1/SD2) and train_dreambooth_lora_{sdxl,sd3,flux}.py; an SD1
# text encoder shares the denoiser's LR and weight decay (one parameter group in that script); alpha is the rank
# but for Flux, whose script's --lora_alpha defaults to 4 whatever the rank
_DIT = {"learning_rate": 1e-4, "adam_weight_decay": 1e-4, "text_encoder_lr": 5e-6,
        "adam_weight_decay_text_encoder": 1e-3}
# T5 prompt length: the pipelines' own default (diffusers' SD3 script trains with 77 but its pipeline infers with 256)
FAMILY_DEFAULTS = {"sd1": {"learning_rate": 5e-4, "adam_weight_decay": 1e-2, "resolution": 512},
                   "sdxl": {**_DIT, "resolution": 1024},
                   "sd3": {**_DIT, "resolution": 512, "max_sequence_length": 256},
                   "flux": {**_DIT, "resolution": 512, "max_sequence_length": 512, "guidance_scale": 3.5,
                            "alpha": 4.0}}


@dataclass(kw_only=True)
class TrainConfig:
    """Every option of ``diffadapt train``; field names are the flag names."""

    pretrained_model_name_or_path: str
    instance_data_dir: str
    instance_prompt: str
    output_dir: str = "lora-dreambooth-model"
    revision: str | None = None
    variant: str | None = None
    # data
    resolution: int | None = None  # None: the family's default (FAMILY_DEFAULTS)
    center_crop: bool = False
    random_flip: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    with_prior_preservation: bool = False
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    sample_batch_size: int = 4
    prior_generation_precision: str | None = None
    dataloader_num_workers: int = 0
    cache_latents: bool = False
    # adapter
    method: str = "lora"
    rank: int = 4
    alpha: float | None = None
    lora_dropout: float = 0.0
    lora_layers: str | None = None
    train_text_encoder: bool = False
    # optimisation
    train_batch_size: int = 4
    num_train_epochs: int = 1
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float | None = None
    text_encoder_lr: float | None = None
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    use_8bit_adam: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float | None = None
    adam_weight_decay_text_encoder: float | None = None
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    guidance_scale: float | None = None
    max_sequence_length: int | None = None
    # flow matching (SD3, Flux); None: the family's default (diffusers' SD3 / Flux script)
    weighting_scheme: str | None = None
    logit_mean: float | None = None
    logit_std: float | None = None
    mode_scale: float | None = None
    precondition_outputs: int | None = None
    mixed_precision: str | None = None
    allow_tf32: bool = False
    seed: int | None = None
    # checkpoints, validation, logging
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_epochs: int = 50
    report_to: str = "none"
    logging_dir: str = "logs"
    # output
    save_format: list[str] = field(default_factory=lambda: ["diffusers", "kohya"])
    overwrite: bool = False
    local_rank: int = -1

    def with_family_defaults(self, family: str) -> TrainConfig:
        """A copy with the options left unset given the default of diffusers' script for ``family``."""
        return replace(self, **{k: v for k, v in FAMILY_DEFAULTS[family].items() if getattr(self, k) is None})

    @property
    def network_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def build_parser(prog: str = "diffadapt train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="DreamBooth-train a LoRA, LoHa, LoKr, OFT or WaveFT adapter on a diffusers model "
        "folder (SD1/SD2, SDXL, SD3, Flux). Launch with `accelerate launch` for several GPUs or nodes.")
    add = p.add_argument

    g = p.add_argument_group("model and data")
    add = g.add_argument
    add("--pretrained_model_name_or_path", required=True, help="diffusers model folder (or hub id) to train on")
    add("--revision", help="hub revision of the model")
    add("--variant", help="weights variant to load, e.g. fp16")
    add("--instance_data_dir", required=True, help="folder of the subject's images")
    add("--instance_prompt", required=True, help="prompt with the identifier of the subject, e.g. 'a photo of sks "
        "dog'; stored as the adapter's trigger phrase")
    add("--resolution", type=int, help="images are resized (short side) and cropped to this size (default: 1024 "
        "for SDXL, else 512)")
    add("--center_crop", action="store_true", help="crop the centre (default: a random crop)")
    add("--random_flip", action="store_true", help="flip images horizontally at random")
    add("--with_prior_preservation", action="store_true", help="add the prior-preservation loss on class images")
    add("--class_data_dir", help="folder of class images; missing ones are generated with the model itself")
    add("--class_prompt", help="prompt of the class, e.g. 'a photo of dog' (to generate class images)")
    add("--num_class_images", type=int, default=100, help="class images wanted (generated when fewer exist)")
    add("--prior_loss_weight", type=float, default=1.0, help="weight of the prior-preservation loss")
    add("--sample_batch_size", type=int, default=4, help="batch size when generating class images")
    add("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"],
        help="precision of class-image generation (default: fp16 on GPU, else fp32)")
    add("--dataloader_num_workers", type=int, default=0, help="data-loading worker processes")
    add("--cache_latents", action="store_true", help="encode every image with the VAE once before training "
        "(both flips with --random_flip; the random crop is then drawn once per image)")

    g = p.add_argument_group("adapter")
    add = g.add_argument
    add("--method", choices=METHODS, default="lora", help="adapter type")
    add("--rank", type=int, default=4, help="rank (LoRA/LoHa/LoKr), block size (OFT; must divide the layer "
        "widths), or for WaveFT the coefficient count of a rank-r LoRA")
    add("--alpha", "--lora_alpha", type=float, dest="alpha", help="LoRA/LoHa/LoKr alpha (scale alpha/rank; "
        "default: the rank, for Flux 4 as its diffusers script)")
    add("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branch's input (LoRA only)")
    add("--lora_layers", help="comma-separated denoiser modules to adapt, matched by name suffix, e.g. "
        "'attn.to_k,attn.to_q,attn.to_v,attn.to_out.0' (default: the family's attention projections, for Flux "
        "also the double blocks' feed-forwards, as diffusers' scripts)")
    add("--train_text_encoder", action="store_true", help="also train the CLIP text encoder(s)")

    g = p.add_argument_group("optimisation")
    add = g.add_argument
    add("--train_batch_size", type=int, default=4, help="batch size per process")
    add("--num_train_epochs", type=int, default=1, help="epochs to train (ignored when --max_train_steps is set)")
    add("--max_train_steps", type=int, help="optimizer steps to train")
    add("--gradient_accumulation_steps", type=int, default=1, help="batches accumulated per optimizer step")
    add("--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory")
    add("--learning_rate", type=float, help="peak learning rate (default: 5e-4 for SD1/SD2, else 1e-4)")
    add("--text_encoder_lr", type=float, help="learning rate of the text encoders' adapters, not scaled by "
        "--scale_lr (default: 5e-6 for SDXL/SD3/Flux; SD1/SD2: --learning_rate)")
    add("--scale_lr", action="store_true", help="multiply the LR by processes x batch size x accumulation")
    add("--lr_scheduler", choices=SCHEDULERS, default="constant", help="learning-rate schedule (diffusers')")
    add("--lr_warmup_steps", type=int, default=500, help="warmup steps of the schedule")
    add("--lr_num_cycles", type=int, default=1, help="hard restarts of cosine_with_restarts")
    add("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    add("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (needs bitsandbytes)")
    add("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    add("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    add("--adam_weight_decay", type=float, help="AdamW weight decay (default: 1e-2 for SD1/SD2, else 1e-4)")
    add("--adam_weight_decay_text_encoder", type=float, help="AdamW weight decay of the text encoders' adapters "
        "(default: 1e-3 for SDXL/SD3/Flux; SD1/SD2: --adam_weight_decay)")
    add("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    add("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0: no clipping)")
    add("--snr_gamma", type=float, help="Min-SNR loss weighting gamma (SD1/SDXL; 5.0 is usual)")
    add("--noise_offset", type=float, default=0.0, help="offset noise strength (e.g. 0.05)")
    add("--guidance_scale", type=float, help="Flux guidance value fed to guidance-distilled models (default 3.5; "
        "models without a guidance embedding ignore it)")
    add("--max_sequence_length", type=int, help="T5 prompt tokens of SD3/Flux (default: the pipeline's, 256 for "
        "SD3 and 512 for Flux, so training conditions as inference does)")

    g = p.add_argument_group("flow matching (SD3, Flux; defaults as diffusers' SD3 / Flux scripts)")
    add = g.add_argument
    add("--weighting_scheme", choices=SCHEMES, help="timestep density and loss weighting: logit_normal and mode "
        "draw timesteps non-uniformly, sigma_sqrt and cosmap weight the loss, none is uniform and unweighted "
        "(default: logit_normal for SD3, none for Flux)")
    add("--logit_mean", type=float, help="mean of the logit_normal density (default 0.0)")
    add("--logit_std", type=float, help="std of the logit_normal density (default 1.0)")
    add("--mode_scale", type=float, help="scale of the mode density (default 1.29)")
    add("--precondition_outputs", type=int, choices=[0, 1], help="1: supervise x_t - sigma * prediction with the "
        "clean latents (EDM preconditioning; the velocity loss scaled by sigma^2). Default: 1 for SD3, 0 for Flux")
    add("--mixed_precision", choices=["no", "fp16", "bf16"],
        help="autocast precision; frozen weights are stored in it (default: accelerate's config)")
    add("--allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere+ GPUs")
    add("--seed", type=int, help="seed of all training randomness (default: drawn and recorded)")

    g = p.add_argument_group("checkpoints, validation, logging")
    add = g.add_argument
    add("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    add("--checkpoints_total_limit", type=int, help="keep at most N checkpoints (oldest removed)")
    add("--resume_from_checkpoint", help="'latest' or a checkpoint folder to continue from")
    add("--validation_prompt", help="generate images with this prompt every --validation_epochs epochs")
    add("--num_validation_images", type=int, default=4, help="images per validation")
    add("--validation_epochs", type=int, default=50, help="validate every N epochs")
    add("--report_to", default="none", choices=["none", "tensorboard", "wandb", "all"],
        help="experiment tracker for losses, LR and validation images")
    add("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")

    g = p.add_argument_group("output")
    add = g.add_argument
    add("--output_dir", default="lora-dreambooth-model", help="where checkpoints and the adapter are written")
    add("--save_format", nargs="+", choices=SAVE_FORMATS, default=["diffusers", "kohya"],
        help="diffusers: pytorch_lora_weights.safetensors; kohya: adapter.safetensors (LoRA/LoHa/LoKr); peft: "
             "one folder per component")
    add("--overwrite", action="store_true", help="replace a previous run's outputs in --output_dir")
    add("--local_rank", type=int, default=-1, help="set by torch.distributed launchers")
    return p


def _normalise(argv: list[str]) -> list[str]:
    """Accept ``--max-train-steps`` for ``--max_train_steps`` (option names only, never values)."""
    out = []
    for a in argv:
        if a.startswith("--") and not a.startswith("---"):
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


def parse_args(argv: list[str] | None = None, *, prog: str = "diffadapt train") -> TrainConfig:
    ns = build_parser(prog).parse_args(_normalise(sys.argv[1:] if argv is None else list(argv)))
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(ns).items() if k in names})
