"""DreamBooth adapter training (LoRA, LoHa or LoKr) for SD1-style diffusers pipelines.

Trains peft adapter layers on the UNet attention projections (and, with
``--train-text-encoder``, on the text encoder's) to reconstruct the noise added
to the instance images under the instance prompt.  ``accelerate`` handles the
device, mixed precision and gradient accumulation; the noise schedule is the
pipeline's own (as a ``DDPMScheduler``), so the loss matches the model's
prediction type (epsilon or v-prediction).

Output: PEFT's DreamBooth layout (``unet/`` and ``text_encoder/`` with
``adapter_config.json``) and/or one kohya ``adapter.safetensors`` written by
``diffadapt.convert``, with the instance prompt as trigger-phrase metadata.
Both load with ``diffadapt.load``.

Limitations: no prior-preservation (class images) loss, no augmentation, one
instance prompt for all images, SD1-style pipelines only (no SDXL's second
text encoder or added conditioning).

    python training/train_dreambooth.py --tiny --instance-dir imgs --instance-prompt "a photo of sks dog" \
        --resolution 16 --max-steps 100 --output-dir out/sks
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass(kw_only=True)
class TrainConfig:
    instance_dir: str
    instance_prompt: str
    output_dir: str
    model: str | None = None
    tiny: bool = False
    method: str = "lora"
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    lr: float = 1e-4
    max_steps: int = 400
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0
    mixed_precision: str = "no"
    gradient_accumulation: int = 1
    train_text_encoder: bool = False
    save_format: str = "both"


def load_pipeline(config: TrainConfig):
    """The tiny embedded pipeline, or a diffusers folder / hub id (HF_HUB_OFFLINE is honoured by the hub client)."""
    if config.tiny:
        from diffadapt.testing import tiny_sd1_pipeline

        return tiny_sd1_pipeline(seed=config.seed)
    if not config.model:
        raise SystemExit("pass --model or --tiny")
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(config.model, safety_checker=None, requires_safety_checker=False)


def load_images(folder: str, resolution: int) -> torch.Tensor:
    """Resize the short side and centre-crop to ``resolution``; values in [-1, 1] as the VAE expects."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    out = []
    for path in paths:
        img = Image.open(path).convert("RGB")
        scale = resolution / min(img.size)
        img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                         Image.BICUBIC)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


def adapter_config(*, method: str, rank: int, alpha: float, targets: list[str]):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    if method == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, init_weights=True)
    if method == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, init_weights=True)
    raise SystemExit(f"unknown method {method!r} (lora, loha, lokr)")


def save_peft(model: torch.nn.Module, peft_config, folder: Path) -> None:
    """What ``PeftModel.save_pretrained`` writes: ``base_model.model.``-prefixed tensors plus the config."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model)
    save_file({f"base_model.model.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()},
              str(folder / "adapter_model.safetensors"))
    peft_config.save_pretrained(str(folder))


def train(config: TrainConfig) -> dict:
    """Train and save; returns the per-step losses and the written paths."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from peft import inject_adapter_in_model
    from tqdm.auto import tqdm

    import diffadapt as da
    from diffadapt.api import read_spec

    if config.save_format not in ("kohya", "peft", "both"):
        raise SystemExit(f"unknown save format {config.save_format!r} (kohya, peft, both)")
    AcceleratorState._reset_state()  # a process-wide singleton: let each train() call pick its own precision
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation)
    set_seed(config.seed)
    pipe = load_pipeline(config)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    alpha = float(config.rank if config.alpha is None else config.alpha)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(accelerator.device)
        if weight_dtype != torch.float32:  # frozen weights in half precision save memory; adapters stay fp32
            module.to(dtype=weight_dtype)
    trained = {"unet": (unet, adapter_config(method=config.method, rank=config.rank, alpha=alpha,
                                             targets=UNET_TARGETS))}
    if config.train_text_encoder:
        trained["text_encoder"] = (text_encoder, adapter_config(method=config.method, rank=config.rank,
                                                                alpha=alpha, targets=TEXT_TARGETS))
    params = []
    for module, peft_config in trained.values():
        inject_adapter_in_model(peft_config, module)
        for p in module.parameters():
            if p.requires_grad:  # adapters train in fp32 whatever the base dtype; autocast handles the mix
                p.data = p.data.float()
                params.append(p)
    optimizer = torch.optim.AdamW(params, lr=config.lr)

    images = load_images(config.instance_dir, config.resolution)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=config.batch_size,
                                         shuffle=True, drop_last=len(images) >= config.batch_size)
    ids = tokenizer(config.instance_prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(accelerator.device)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    if config.train_text_encoder:
        text_encoder = accelerator.prepare(text_encoder)
        text_encoder.train()
    unet.train()

    losses: list[float] = []
    bar = tqdm(total=config.max_steps, desc="train", disable=not accelerator.is_local_main_process)
    while len(losses) < config.max_steps:
        for (pixels,) in loader:
            with accelerator.accumulate(unet, *([text_encoder] if config.train_text_encoder else [])):
                with torch.no_grad():
                    latents = vae.encode(pixels.to(weight_dtype)).latent_dist.sample()
                    latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
                noisy = scheduler.add_noise(latents, noise, t)
                with torch.set_grad_enabled(config.train_text_encoder):
                    hidden = text_encoder(ids)[0].expand(latents.shape[0], -1, -1)
                with accelerator.autocast():
                    pred = unet(noisy, t, hidden).sample
                if scheduler.config.prediction_type == "v_prediction":
                    target = scheduler.get_velocity(latents, noise, t)
                else:
                    target = noise
                loss = F.mse_loss(pred.float(), target.float())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                losses.append(loss.detach().item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if len(losses) >= config.max_steps:
                    break
    bar.close()
    accelerator.wait_for_everyone()
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"non-finite loss: {losses}")

    out = Path(config.output_dir)
    written: list[str] = []
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for name, (module, peft_config) in trained.items():
            save_peft(accelerator.unwrap_model(module), peft_config, out / name)
        written += [str(out / name) for name in trained]
        if config.save_format in ("kohya", "both"):
            spec = read_spec(out)
            spec.metadata.update(_metadata(config, len(images), alpha))
            kohya = out / "adapter.safetensors"
            written += da.convert(spec, kohya, format="kohya", model=pipe, overwrite=True)
        if config.save_format == "kohya":
            for name in trained:
                shutil.rmtree(out / name)
            written = [w for w in written if w.endswith(".safetensors")]
    accelerator.end_training()
    return {"losses": losses, "written": written}


def _metadata(config: TrainConfig, n_images: int, alpha: float) -> dict[str, str]:
    """Trigger phrase and training settings in the fields kohya tools and UIs read."""
    return {
        "modelspec.trigger_phrase": config.instance_prompt,
        "ss_tag_frequency": json.dumps({Path(config.instance_dir).name: {config.instance_prompt: n_images}}),
        "ss_max_train_steps": str(config.max_steps),
        "ss_learning_rate": str(config.lr),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_seed": str(config.seed),
        "ss_num_train_images": str(n_images),
        "ss_mixed_precision": config.mixed_precision,
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation),
        "ss_training_comment": json.dumps({"method": config.method, "rank": config.rank, "alpha": alpha,
                                           "train_text_encoder": config.train_text_encoder}),
    }


def parse_args(argv: list[str] | None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers folder or hub id")
    src.add_argument("--tiny", action="store_true", help="the embedded random tiny SD1 pipeline (demos, tests)")
    p.add_argument("--instance-dir", required=True)
    p.add_argument("--instance-prompt", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--method", choices=["lora", "loha", "lokr"], default="lora")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=None, help="default: the rank")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--gradient-accumulation", type=int, default=1)
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--save-format", choices=["kohya", "peft", "both"], default="both")
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    result = main()
    print(json.dumps({"final_loss": result["losses"][-1], "written": result["written"]}, indent=1))
