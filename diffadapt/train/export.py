"""The trained adapter on disk: gathered from every process (full state dicts under FSDP/DeepSpeed), written
once by the main process as PEFT folders in a staging area, then converted by diffadapt's own writers to

- ``pytorch_lora_weights.safetensors``: diffusers' layout (``unet.<module>.lora_A.weight`` …), which stock
  ``pipe.load_lora_weights(output_dir)`` reads for LoRA; other methods keep PEFT's suffixes and their configs
  in the metadata (``da.load`` reads them all);
- ``adapter.safetensors``: kohya/LyCORIS (LoRA, LoHa, LoKr) for A1111, ComfyUI and kohya tools;
- ``unet/`` / ``transformer/`` / ``text_encoder*/``: PEFT folders (``--save_format peft``).

The instance prompt is the trigger phrase in every file's metadata.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "adapter.safetensors"
OUTPUT_NAMES = (DIFFUSERS_FILE, KOHYA_FILE, "unet", "transformer", "text_encoder", "text_encoder_2", "validation")


def gather(accelerator, trained: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """{component: adapter tensors} on the main process (empty elsewhere); every process must call it."""
    from peft import get_peft_model_state_dict

    out = {}
    for name, model in trained.items():
        full = accelerator.get_state_dict(model)  # gathers shards; on non-main ranks may be None/partial
        if accelerator.is_main_process:
            state = get_peft_model_state_dict(accelerator.unwrap_model(model), state_dict=full)
            out[name] = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    return out


def metadata(config, *, n_images: int, seed: int, family: str, steps: int) -> dict[str, str]:
    """Trigger phrase and training settings in the fields kohya tools and UIs read."""
    return {
        "modelspec.trigger_phrase": config.instance_prompt,
        "ss_tag_frequency": json.dumps({Path(config.instance_data_dir).name: {config.instance_prompt: n_images}}),
        "ss_max_train_steps": str(steps),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        **({"ss_text_encoder_lr": str(config.text_encoder_lr or config.learning_rate)}
           if config.train_text_encoder else {}),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_seed": str(seed),
        "ss_num_train_images": str(n_images),
        "ss_batch_size_per_device": str(config.train_batch_size),
        "ss_mixed_precision": str(config.mixed_precision or "no"),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_prior_loss_weight": str(config.prior_loss_weight if config.with_prior_preservation else 0.0),
        "ss_training_comment": json.dumps({"trainer": "diffadapt", "family": family, "method": config.method,
                                           "rank": config.rank, "alpha": config.network_alpha,
                                           "train_text_encoder": config.train_text_encoder}),
    }


def write(adapters: dict[str, dict[str, torch.Tensor]], peft_configs: dict, *, output_dir: Path, formats: list[str],
          meta: dict[str, str], pipe) -> list[str]:
    """Write every requested format (main process only); returns the paths written."""
    import diffadapt as da
    from diffadapt.api import read_spec
    from safetensors.torch import save_file

    stage = output_dir / ".export.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    peft_dir = stage / "peft"
    for name, state in adapters.items():
        (peft_dir / name).mkdir(parents=True)
        save_file({f"base_model.model.{k}": v for k, v in state.items()},
                  str(peft_dir / name / "adapter_model.safetensors"), metadata={"format": "pt", **meta})
        peft_configs[name].save_pretrained(str(peft_dir / name))
    spec = read_spec(peft_dir)
    spec.metadata.update(meta)
    made = []
    if "diffusers" in formats:
        da.convert(spec, stage / DIFFUSERS_FILE, format="peft", model=pipe, single_file=True)
        made.append(DIFFUSERS_FILE)
    if "kohya" in formats:
        da.convert(spec, stage / KOHYA_FILE, format="kohya", model=pipe)
        made.append(KOHYA_FILE)
    if "peft" in formats:
        for name in adapters:
            os.replace(peft_dir / name, stage / name)
            made.append(name)
    written = []
    for name in made:
        dest = output_dir / name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(stage / name, dest)
        written.append(str(dest))
    shutil.rmtree(stage, ignore_errors=True)
    return written
