"""PEFT files: a folder per component (adapter_config.json + adapter_model.safetensors, ``base_model.model.``
keys), or one diffusers-style ``.safetensors`` (``unet.<module>.lora_A.weight`` …) whose metadata carries the
configs as ``peft_config`` = JSON ``{component: config}`` — enough for WaveFT and PEFT OFT to load from the
single file. LoRA-only files also get diffusers' ``lora_adapter_metadata``, so diffusers reads their ranks.

Key names and tensor shapes are peft's own: the layers are built by peft around empty (meta) modules of
the right shape and ``get_peft_model_state_dict`` names what it would save.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedError
from ..io import PEFT_CONFIG, write_safetensors
from ..peft_bridge import build, config_json, group_entries, make_config
from . import Item, cast
from .kohya import PEFT_ONLY_METADATA

PEFT_WEIGHTS = "adapter_model.safetensors"


def _empty(shape: tuple[int, ...]) -> nn.Module:
    """A meta-device module with this weight shape, for peft to wrap."""
    if len(shape) == 2:
        return nn.Linear(shape[1], shape[0], device="meta")
    conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[len(shape)]
    return conv(shape[1], shape[0], tuple(shape[2:]), device="meta")


_KINDS = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}


def peft_parts(items: list[Item], *, where: str) -> dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """{component: (adapter_config dict, {module.suffix: tensor})}; one peft config per component."""
    by_comp: dict[str, list[Item]] = {}
    for it in items:
        by_comp.setdefault("" if it.component == "*" else it.component, []).append(it)
    out = {}
    for comp, group_items in by_comp.items():
        shapes = {it.module: it.shape or tuple(it.params.weight_shape()) for it in group_items}
        entries = {
            it.module: it.params.to_peft(kind=it.kind or _KINDS.get(len(shapes[it.module])), shape=shapes[it.module],
                                         where=f"{where}: {comp + '.' if comp else ''}{it.module}", inject=False)
            for it in group_items
        }
        groups = group_entries(entries)
        if len(groups) > 1:
            kinds = sorted({f"{g.peft_type} {g.settings()}" for g in groups})
            raise UnsupportedError(
                f"{where}: a PEFT file holds one config per component, but {comp or 'the adapter'} needs "
                f"{len(groups)} ({'; '.join(kinds)[:300]}) — save it in kohya format, or exclude some modules"
            )
        group = groups[0]
        names = list(group.modules)
        _, sd = build([_empty(shapes[n]) for n in names], names, group, "default", load=False)
        out[comp] = (config_json(make_config(group)), sd)
    return out


def write_peft(items: list[Item], dest: str | Path, *, single_file: bool, dtype: torch.dtype | None,
               metadata: dict[str, str], where: str) -> list[str]:
    """Write a PEFT folder (per component) or one file; everything is converted before the first write."""
    parts = peft_parts(items, where=where)
    dest = Path(dest)
    meta = {k: v for k, v in metadata.items() if k not in PEFT_ONLY_METADATA}
    if single_file:
        tensors = {}
        for comp, (_, sd) in parts.items():
            prefix = f"{comp}." if comp else "base_model.model."
            tensors.update({prefix + k: cast(v, dtype) for k, v in sd.items()})
        meta["peft_config"] = json.dumps({comp: cfg for comp, (cfg, _) in parts.items()})
        if all(cfg["peft_type"] == "LORA" for cfg, _ in parts.values()) and "" not in parts:
            meta["lora_adapter_metadata"] = json.dumps(
                {f"{comp}.{k}": v for comp, (cfg, _) in parts.items() for k, v in cfg.items()})
        write_safetensors(dest, tensors, meta)
        return [str(dest)]
    written = []
    for comp, (cfg, sd) in parts.items():
        folder = dest / comp if comp else dest
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        write_safetensors(folder / PEFT_WEIGHTS, {f"base_model.model.{k}": cast(v, dtype) for k, v in sd.items()},
                          {"format": "pt", **meta})
        written.append(str(folder))
    return written
