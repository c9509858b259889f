"""The training run: checks, model, adapters, accelerate, the step loop, checkpoints, validation, export.

Reproducibility: every random draw of a micro-batch (VAE sample, noise, offset noise, timestep) comes from a
generator seeded by (seed, micro-batch, rank), the global RNG (dropout) is reseeded from the same key, and data
order/augmentation come from (seed, epoch, index) — so a run resumed from a checkpoint (adapters, optimizer,
LR schedule restored by accelerate) continues bit for bit as the uninterrupted run would, and every rank draws
its own noise.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, data, export, families, flow
from .adapters import inject, peft_config
from .args import TrainConfig
from .checks import Plan, check
from .families import CLIP_TARGETS


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # per optimizer step, averaged over processes
    written: list[str] = field(default_factory=list)
    seed: int = 0
    family: str = ""
    steps: int = 0


def _seed(config: TrainConfig, plan: Plan, accelerator) -> int:
    if plan.resume is not None:
        return int(checkpoint.read_progress(plan.resume)["seed"])
    if config.seed is not None:
        return config.seed
    from accelerate.utils import broadcast_object_list

    drawn = [int.from_bytes(os.urandom(4), "little") >> 1]
    broadcast_object_list(drawn)
    return drawn[0]


def _accelerator(config: TrainConfig, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    AcceleratorState._reset_state()  # a process-wide singleton: each run picks its own precision
    log_with = None if config.report_to == "none" else config.report_to
    # torchrun without GPUs: accelerate only goes multi-process on CPU (gloo) when told it is on CPU
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # SDXL/SD3 condition on the penultimate CLIP layer: the last layer's text-encoder adapters get no gradient
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.train_text_encoder)
    return Accelerator(cpu=cpu, kwargs_handlers=[ddp], gradient_accumulation_steps=config.gradient_accumulation_steps,
                       mixed_precision=config.mixed_precision, log_with=log_with,
                       project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                           logging_dir=str(output_dir / config.logging_dir)))


def _prepare_output(config: TrainConfig, plan: Plan, accelerator) -> None:
    if accelerator.is_main_process:
        out = plan.output_dir
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_partial(out)
        shutil.rmtree(out / ".export.tmp", ignore_errors=True)
        if config.overwrite:  # a previous run's adapter must never mix into this one
            stale = [out / n for n in export.OUTPUT_NAMES]
            if plan.resume is None:
                stale += checkpoint.checkpoints(out)
            for p in stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def _class_images(config: TrainConfig, plan: Plan, pipe, accelerator, seed: int, weight_dtype) -> list[Path]:
    if plan.class_dir is None:
        return []
    have = data.list_images(plan.class_dir, what="--class_data_dir", allow_missing=True)
    if len(have) < config.num_class_images:
        precision = config.prior_generation_precision
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            precision or ("fp16" if accelerator.device.type == "cuda" else "fp32"), torch.float32)
        gen_pipe = pipe if dtype == weight_dtype else families.load_pipeline(  # never round-trip base weights
            plan.family, config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant,
            torch_dtype=dtype)
        gen_pipe.to(accelerator.device)
        data.generate_class_images(gen_pipe, folder=plan.class_dir, prompt=config.class_prompt,
                                   wanted=config.num_class_images, have=len(have),
                                   batch_size=config.sample_batch_size, resolution=config.resolution, seed=seed,
                                   rank=accelerator.process_index, world=accelerator.num_processes,
                                   show=accelerator.is_local_main_process)
        del gen_pipe
        accelerator.wait_for_everyone()
        have = data.list_images(plan.class_dir, what="--class_data_dir")
    return have[: config.num_class_images]


def _denoiser_targets(config: TrainConfig, family, denoiser: torch.nn.Module) -> list[str]:
    """--lora_layers (each must name a Linear or Conv layer of the denoiser), or the family's defaults."""
    if config.lora_layers is None:
        return list(family.targets)
    wanted = [t.strip() for t in config.lora_layers.split(",") if t.strip()]
    layers = [n for n, m in denoiser.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in layers)]
    if not wanted or missing:
        raise data.TrainInputError(f"--lora_layers {config.lora_layers!r}: {', '.join(missing) or 'empty'} names no "
                                   f"Linear/Conv layer of the {family.denoiser}")
    return wanted


def _optimizer(config: TrainConfig, groups: dict[str, list[torch.nn.Parameter]], lr: float, *, denoiser: str):
    """AdamW over the denoiser's adapter and, in their own group, the text encoders' (diffusers' scripts:
    --text_encoder_lr / --adam_weight_decay_text_encoder, which SD1 leaves at the denoiser's values)."""
    te = [p for name, group in groups.items() if name != denoiser for p in group]
    param_groups = [{"params": groups[denoiser], "lr": lr, "weight_decay": config.adam_weight_decay}]
    if te:
        param_groups.append({"params": te, "lr": lr if config.text_encoder_lr is None else config.text_encoder_lr,
                             "weight_decay": config.adam_weight_decay if config.adam_weight_decay_text_encoder is None
                             else config.adam_weight_decay_text_encoder})
    kwargs = dict(lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    return torch.optim.AdamW(param_groups, **kwargs)


def _cache_latents(dataset: data.DreamBoothDataset, vae, *, batch: int, flips: bool, device, dtype,
                   show: bool) -> None:
    """VAE distributions of every image (and its mirror image with --random_flip), computed once."""
    from tqdm.auto import tqdm

    keys = [(kind, j, path, flip) for kind, j, path in dataset.sources() for flip in ((False, True) if flips
                                                                                       else (False,))]
    cache = {}
    for start in tqdm(range(0, len(keys), batch), desc="cache latents", disable=not show):
        chunk = keys[start:start + batch]
        preps = [dataset.fixed_crop(kind, j, path, flip) for kind, j, path, flip in chunk]
        with torch.no_grad():
            dist = vae.encode(torch.stack([p.pixels for p in preps]).to(device, dtype)).latent_dist
        for (kind, j, _, flip), prep, mean, std in zip(chunk, preps, dist.mean.float().cpu(), dist.std.float().cpu()):
            cache[(kind, j, flip)] = (mean, std, prep)
    dataset.cache = cache


def _encode(family, encoders, ids, joint_dim, t5_length, *, grad: bool) -> dict[str, torch.Tensor]:
    with torch.set_grad_enabled(grad):
        return families.encode(family, encoders, ids, joint_dim=joint_dim, t5_length=t5_length or 256)


def _loss(config: TrainConfig, plan: Plan, scheduler, pred: torch.Tensor, noised: families.Noised,
          n: int) -> torch.Tensor:
    """diffusers' DreamBooth loss: batch = n instance examples, then class examples (prior preservation)."""
    if plan.family.flow:
        return flow.loss(plan.flow, pred, noisy=noised.noisy, latents=noised.latents, noise=noised.noise,
                         sigmas=noised.sigmas, n_instance=n, prior_loss_weight=config.prior_loss_weight)
    pred, target = pred.float(), noised.target.float()
    if config.snr_gamma is not None:  # Min-SNR on the instance part (train_text_to_image_lora*.py's weights)
        weights = families.snr_weights(scheduler, noised.timesteps[:n], config.snr_gamma)
        per = F.mse_loss(pred[:n], target[:n], reduction="none").mean(dim=list(range(1, pred.ndim)))
        loss = (per * weights).mean()
    else:
        loss = F.mse_loss(pred[:n], target[:n])
    if pred.shape[0] > n:
        loss = loss + config.prior_loss_weight * F.mse_loss(pred[n:], target[n:])
    return loss


def _validate(config: TrainConfig, pipe, accelerator, *, step: int, seed: int, models, tag: str) -> None:
    """Images from --validation_prompt with the adapters being trained; saved and sent to the trackers."""
    import numpy as np

    for m in models:
        m.eval()
    images = []
    with torch.no_grad(), accelerator.autocast():
        for i in range(config.num_validation_images):
            gen = torch.Generator("cpu").manual_seed(data.torch_seed(seed, 5, i))
            t5 = {} if config.max_sequence_length is None else {"max_sequence_length": config.max_sequence_length}
            images += pipe(prompt=config.validation_prompt, generator=gen, height=config.resolution,
                           width=config.resolution, **t5).images  # conditioned as in training
    folder = Path(config.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(folder / f"{tag}-{i}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(img) for img in images]), step,
                                      dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(img, caption=f"{i}: {config.validation_prompt}")
                                        for i, img in enumerate(images)]}, step=step)
    for m in models:
        m.train()


def train(config: TrainConfig) -> TrainResult:
    """Run DreamBooth training as configured; returns the per-step losses and the files written."""
    plan = check(config)  # everything that can fail before the model loads
    config = plan.config  # the family's defaults filled in
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    accelerator = _accelerator(config, plan.output_dir)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    seed = _seed(config, plan, accelerator)
    set_seed(seed)
    _prepare_output(config, plan, accelerator)
    family, device = plan.family, accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    show = accelerator.is_local_main_process

    # frozen weights are loaded straight in the autocast precision (no fp32 copy of a large model in memory)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = families.load_pipeline(family, config.pretrained_model_name_or_path, revision=config.revision,
                                  variant=config.variant, torch_dtype=weight_dtype)
    classes = _class_images(config, plan, pipe, accelerator, seed, weight_dtype)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.to(device)
    if family.name == "sdxl" and weight_dtype == torch.float16:
        pipe.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16 (diffusers' SDXL scripts do the same)

    denoiser = getattr(pipe, family.denoiser)
    encoders = [getattr(pipe, n, None) for n in family.text_encoders]
    trained = {family.denoiser: denoiser}
    if config.train_text_encoder:
        trained.update({n: getattr(pipe, n) for n in family.trainable_encoders if getattr(pipe, n, None) is not None})
    peft_configs, groups = {}, {}
    for name, module in trained.items():
        targets = _denoiser_targets(config, family, module) if name == family.denoiser else CLIP_TARGETS
        peft_configs[name] = peft_config(config.method, rank=config.rank, alpha=config.network_alpha,
                                         targets=targets, model=module, dropout=config.lora_dropout)
        groups[name] = inject(module, peft_configs[name])
    params = [p for group in groups.values() for p in group]
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for name in trained:
            if name != family.denoiser:
                enc = trained[name]  # transformers >= 5 renamed it (the old name warns, and goes in v6)
                enable = getattr(enc, "activation_checkpointing_enable", None) or enc.gradient_checkpointing_enable
                enable()

    dataset = data.DreamBoothDataset(instance=plan.instance_images, classes=classes, resolution=config.resolution,
                                     center_crop=config.center_crop, random_flip=config.random_flip, seed=seed)
    batches = data.BatchPlan(n_items=len(dataset), batch_size=config.train_batch_size, world=world, rank=rank,
                             seed=seed)
    ga = config.gradient_accumulation_steps
    windows = data.Accumulation(per_epoch=batches.per_epoch, steps=ga)
    max_steps = config.max_train_steps or config.num_train_epochs * windows.steps_per_epoch
    lr = config.learning_rate * (ga * config.train_batch_size * world if config.scale_lr else 1)
    optimizer = _optimizer(config, groups, lr, denoiser=family.denoiser)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * world,
                                 num_training_steps=max_steps * world, num_cycles=config.lr_num_cycles,
                                 power=config.lr_power)
    prepared = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    models, optimizer, lr_scheduler = list(prepared[: len(trained)]), prepared[-2], prepared[-1]
    checkpoint.register_hooks(accelerator, dict(trained))

    # conditioning and latents that do not change during training
    joint_dim = getattr(getattr(pipe, "transformer", None), "config", None)
    joint_dim = getattr(joint_dim, "joint_attention_dim", None)
    run_encoders = [models[list(trained).index(n)] if n in trained else e
                    for n, e in zip(family.text_encoders, encoders)]
    t5_length = config.max_sequence_length
    ids = {"instance": families.tokenize(family, pipe, config.instance_prompt, max_sequence_length=t5_length)}
    if classes:
        ids["class"] = families.tokenize(family, pipe, config.class_prompt or config.instance_prompt,
                                         max_sequence_length=t5_length)
    fixed = None
    if not config.train_text_encoder:
        with accelerator.autocast():
            fixed = {k: _encode(family, run_encoders, v, joint_dim, t5_length, grad=False) for k, v in ids.items()}
    vae, vae_config = pipe.vae, pipe.vae.config
    vae_scale = 2 ** (len(vae_config.block_out_channels) - 1)
    if config.cache_latents:
        _cache_latents(dataset, vae, batch=config.train_batch_size, flips=config.random_flip, device=device,
                       dtype=vae.dtype, show=show)
        if config.validation_prompt is None:  # nothing else needs the VAE (or frozen text encoders)
            vae.to_empty(device="meta")
            if fixed is not None:
                for e in encoders:
                    if e is not None:
                        e.to_empty(device="meta")
    scheduler = families.noise_scheduler(family, pipe)

    global_step = 0
    if plan.resume is not None:
        accelerator.load_state(str(plan.resume))
        global_step = int(checkpoint.read_progress(plan.resume)["step"])
        accelerator.print(f"resumed from {plan.resume} at step {global_step}")
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("dreambooth-diffadapt", config={
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(config).items()})

    result = TrainResult(seed=seed, family=family.name)
    bar = tqdm(total=max_steps, initial=global_step, desc="train", disable=not show)
    for m in models:
        m.train()
    accum: list[torch.Tensor] = []
    start, stop = windows.first_micro(global_step), windows.first_micro(max_steps)
    stream = data.loader(dataset, batches, start=start, stop=stop,
                         workers=config.dataloader_num_workers)
    for micro, batch in zip(range(start, stop), stream):
        index, last = windows.position(micro)
        accelerator.step = ga - 1 if last else index  # accumulate() then syncs exactly at the window's end
        with accelerator.accumulate(*models):
            gen = torch.Generator("cpu").manual_seed(data.torch_seed(seed, 4, micro, rank))
            torch.manual_seed(data.torch_seed(seed, 6, micro, rank))  # what draws from the global RNG (dropout)
            if "pixels" in batch:
                with torch.no_grad():
                    dist = vae.encode(batch["pixels"].to(device, vae.dtype)).latent_dist
                mean, std = dist.mean.float(), dist.std.float()
            else:
                mean, std = batch["mean"].to(device), batch["std"].to(device)
            sample = mean + std * torch.randn(mean.shape, generator=gen).to(device)
            latents = families.to_latents(family, vae_config, sample)
            noise = torch.randn(latents.shape, generator=gen)
            if config.noise_offset:
                noise += config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
            b = latents.shape[0]
            u = flow.draw(plan.flow, b, gen) if family.flow else torch.rand(b, generator=gen)
            noised = families.add_noise(family, scheduler, latents, noise.to(device), u.to(device))
            n = batch["n_instance"]
            conds = fixed or {k: _encode(family, run_encoders, v, joint_dim, t5_length, grad=True)
                              for k, v in ids.items()}
            cond = {k: torch.cat([conds["instance"][k].expand(n, *conds["instance"][k].shape[1:])]
                                 + ([conds["class"][k].expand(latents.shape[0] - n, *conds["class"][k].shape[1:])]
                                    if latents.shape[0] > n else []))
                    for k in conds["instance"]}
            with accelerator.autocast():
                pred = families.predict(family, models[0], noised, cond, batch=batch, resolution=config.resolution,
                                        vae_scale=vae_scale, guidance=config.guidance_scale, dtype=weight_dtype)
            loss = _loss(config, plan, scheduler, pred, noised, n)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        accum.append(loss.detach())
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        step_loss = accelerator.reduce(torch.stack(accum).mean(), reduction="mean").item()
        accum.clear()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"step {global_step}: loss is {step_loss} (lower --learning_rate, or use bf16 "
                                     "instead of fp16)")
        result.losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
        if global_step % config.checkpointing_steps == 0:
            checkpoint.save(accelerator, plan.output_dir, global_step,
                            {"step": global_step, "seed": seed, "world": world, "micro_batch": micro + 1,
                             "epoch": (micro + 1) // batches.per_epoch,
                             "settings": checkpoint.settings(config, family.name)},
                            total_limit=config.checkpoints_total_limit)
        end_of_epoch = (micro + 1) % batches.per_epoch == 0
        epoch = (micro + 1) // batches.per_epoch - 1
        if config.validation_prompt and end_of_epoch and epoch % config.validation_epochs == 0:
            if accelerator.is_main_process:
                _validate(config, pipe, accelerator, step=global_step, seed=seed, models=models,
                          tag=f"step-{global_step}")
            accelerator.wait_for_everyone()
    bar.close()

    accelerator.wait_for_everyone()
    adapters = export.gather(accelerator, dict(zip(trained, models)))
    if accelerator.is_main_process:
        meta = export.metadata(config, n_images=len(plan.instance_images), seed=seed, family=family.name,
                               steps=max_steps)
        result.written = export.write(adapters, peft_configs, output_dir=plan.output_dir,
                                      formats=config.save_format, meta=meta, pipe=pipe)
        if config.validation_prompt:
            _validate(config, pipe, accelerator, step=global_step, seed=seed, models=models, tag="final")
    result.steps = global_step
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
