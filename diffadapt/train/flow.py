"""Flow-matching timesteps and loss (SD3, Flux), as diffusers' ``train_dreambooth_lora_sd3.py`` and
``train_dreambooth_lora_flux.py`` do them, through diffusers' own ``training_utils`` functions:

- ``u`` from ``compute_density_for_timestep_sampling`` (``--weighting_scheme`` logit_normal / mode draw
  non-uniformly; the others uniformly), indexing the scheduler's ``timesteps`` / ``sigmas`` tables;
- the loss weighted per element by ``compute_loss_weighting_for_sd3`` (sigma_sqrt, cosmap; 1 otherwise),
  on the instance and the prior-preservation halves alike;
- ``--precondition_outputs`` (SD3's default): the prediction ``v`` becomes ``x_t - sigma * v`` (EDM section 5)
  and is compared with the clean latents, which is the velocity loss scaled by ``sigma**2``.

The defaults differ per family exactly as the two scripts' defaults do. The draw takes the caller's generator,
so a resumed run draws the same timesteps as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
FLAGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs")


@dataclass(frozen=True, kw_only=True)
class FlowOptions:
    weighting_scheme: str
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False


# diffusers' defaults: the SD3 script samples logit-normal and preconditions; the Flux script samples uniformly
DEFAULTS = {"sd3": FlowOptions(weighting_scheme="logit_normal", precondition_outputs=True),
            "flux": FlowOptions(weighting_scheme="none", precondition_outputs=False)}


def options(family: str, config) -> FlowOptions:
    """The family's defaults overridden by the flags given (``None`` = not given)."""
    base = DEFAULTS[family]
    given = {k: getattr(config, k) for k in FLAGS if getattr(config, k) is not None}
    if "precondition_outputs" in given:
        given["precondition_outputs"] = bool(given["precondition_outputs"])
    return FlowOptions(**{**vars(base), **given})


def draw(opts: FlowOptions, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``u`` per sample (in [0, 1]) from diffusers' density, drawn from ``generator`` on the CPU."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling(
        weighting_scheme=opts.weighting_scheme, batch_size=batch, logit_mean=opts.logit_mean,
        logit_std=opts.logit_std, mode_scale=opts.mode_scale, device="cpu", generator=generator)


def table_index(scheduler, u: torch.Tensor) -> torch.Tensor:
    """The scripts' ``(u * num_train_timesteps).long()``, kept inside the table (``mode`` can reach u = 1)."""
    n = scheduler.config.num_train_timesteps
    return (u * n).long().clamp_(0, n - 1)


def weighting(opts: FlowOptions, sigmas: torch.Tensor) -> torch.Tensor:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme=opts.weighting_scheme, sigmas=sigmas)


def loss(opts: FlowOptions, pred: torch.Tensor, *, noisy: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
         sigmas: torch.Tensor, n_instance: int, prior_loss_weight: float) -> torch.Tensor:
    """The scripts' loss: weighted per-sample mean square error, instance mean + weight x class mean."""
    pred = pred.float()
    if opts.precondition_outputs:
        pred, target = pred * (-sigmas) + noisy, latents
    else:
        target = noise - latents
    w = weighting(opts, sigmas).float()
    per = torch.mean((w * (pred - target.float()) ** 2).reshape(pred.shape[0], -1), 1)
    out = per[:n_instance].mean()
    if pred.shape[0] > n_instance:
        out = out + prior_loss_weight * per[n_instance:].mean()
    return out
