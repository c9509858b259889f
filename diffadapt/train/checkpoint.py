"""Resumable checkpoints through accelerate's ``save_state`` / ``load_state``: adapter weights (only those, via
state hooks — not the frozen base model), optimizer, LR scheduler, grad scaler and RNG states, plus
``progress.json`` (step, seed, data position).

A checkpoint is written into ``.checkpoint-N.tmp`` and renamed to ``checkpoint-N`` once every process has
finished writing: a kill while saving leaves only a temp folder, which is never picked as ``latest`` and is
removed by the next run. Old checkpoints are pruned only after a new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from .data import TrainInputError

PROGRESS = "progress.json"
ADAPTER = "adapter_{}.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m[1]), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and (p / PROGRESS).is_file()]
    return [p for _, p in sorted(found)]


def resolve(output_dir: Path, request: str | None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: 'latest' (None when there is none yet) or a folder."""
    if request is None:
        return None
    if request == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(request).expanduser()
    if not path.is_absolute() and not path.exists():
        path = output_dir / request
    if not (path / PROGRESS).is_file():
        raise TrainInputError(f"--resume_from_checkpoint {request}: {path} is not a complete checkpoint "
                              f"(no {PROGRESS})")
    return path


def read_progress(path: Path) -> dict:
    return json.loads((path / PROGRESS).read_text())


def settings(config, family: str) -> dict:
    """What a checkpoint's adapters are shaped and scaled by: a resume must use the same."""
    return {"family": family, "method": config.method, "rank": config.rank, "alpha": config.network_alpha,
            "train_text_encoder": config.train_text_encoder, "lora_layers": config.lora_layers}


def check_compatible(path: Path, current: dict) -> None:
    """Refuse to resume ``path`` under other adapter settings (a traceback deep in peft, or silently other
    weights, otherwise)."""
    try:
        saved = read_progress(path).get("settings")
    except (OSError, ValueError) as e:
        raise TrainInputError(f"--resume_from_checkpoint {path}: unreadable {PROGRESS} ({e})") from None
    if not saved:  # written before settings were recorded
        return
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise TrainInputError(f"--resume_from_checkpoint {path}: trained with {key} {saved[key]!r}, this run "
                                  f"has {value!r} (resume with the same options)")


def clean_partial(output_dir: Path) -> None:
    """Remove temp folders a killed save left behind."""
    if output_dir.is_dir():
        for p in output_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def register_hooks(accelerator, components: dict[str, torch.nn.Module]) -> None:
    """Save and load only the adapter tensors of the prepared models (diffusers' scripts do the same)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def name_of(model) -> str:
        inner = accelerator.unwrap_model(model)
        return next(n for n, m in components.items() if m is inner)

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                state = get_peft_model_state_dict(accelerator.unwrap_model(model))
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                          os.path.join(output_dir, ADAPTER.format(name_of(model))))
        while weights:  # accelerate must not also write the full models
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            name = name_of(model)
            state = load_file(os.path.join(input_dir, ADAPTER.format(name)))
            result = set_peft_model_state_dict(accelerator.unwrap_model(model), state)
            if result.unexpected_keys:
                raise TrainInputError(f"{input_dir}: {name} checkpoint has unexpected keys "
                                      f"{result.unexpected_keys[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save(accelerator, output_dir: Path, step: int, progress: dict, *, total_limit: int | None) -> Path:
    """Write checkpoint-``step`` atomically (all processes call this)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / PROGRESS).write_text(json.dumps(progress, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
