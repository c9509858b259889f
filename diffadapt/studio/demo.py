"""Demo adapters for the studio's ``--demo`` mode, written by diffadapt itself (kohya/LyCORIS key layout).

Three random adapters over the UNet's attention and feed-forward layers and the text encoder — a LoRA
(with LoCon on the resnet convolutions), a LoHa and a LoKr — so the studio runs offline on the tiny
pipeline of :mod:`diffadapt.testing` and every method path is exercised. Each file carries kohya metadata
(output name, trigger phrase) and gets an A1111 preview image next to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import write_safetensors

_UNET = re.compile(r"(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2)|proj_(in|out))$")
_CONV = re.compile(r"resnets\.\d+\.conv[12]$")
_TEXT = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    method: str  # lora | loha | lokr
    trigger: str
    rank: int = 4
    std: float = 0.35
    seed: int = 0


DEMO_ADAPTERS = (
    DemoAdapter("ink", "lora", "ink wash", seed=1),
    DemoAdapter("film", "loha", "film grain", seed=2, std=0.6),
    DemoAdapter("grain", "lokr", "grainy texture", seed=3, std=0.5),
)


def _factor(n: int) -> int:
    """A small factor of ``n`` for LoKr's Kronecker split (4, 2 or 1)."""
    return next(f for f in (4, 2, 1) if n % f == 0)


def _tensors(module: nn.Module, spec: DemoAdapter, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One module's tensors (without the kohya prefix) for ``spec.method``."""
    w = module.weight
    out_f, in_f, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    r, std = spec.rank, spec.std

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    alpha = torch.tensor(float(r))
    if spec.method == "lora":
        return {"lora_down.weight": rand(r, in_f, *kernel) / max(1, in_f * int(torch.tensor(kernel).prod())) ** 0.5,
                "lora_up.weight": rand(out_f, r, *(1 for _ in kernel)), "alpha": alpha}
    if spec.method == "loha":
        return {"hada_w1_a": rand(out_f, r), "hada_w1_b": rand(r, in_f) / in_f ** 0.25,
                "hada_w2_a": rand(out_f, r), "hada_w2_b": rand(r, in_f) / in_f ** 0.25, "alpha": alpha}
    a, c = _factor(out_f), _factor(in_f)
    return {"lokr_w1": rand(a, c) / std, "lokr_w2_a": rand(out_f // a, r),
            "lokr_w2_b": rand(r, in_f // c) / (in_f // c) ** 0.5, "alpha": alpha}


def demo_state_dict(pipe: Any, spec: DemoAdapter) -> dict[str, torch.Tensor]:
    """A kohya-named state dict of random ``spec.method`` layers for ``pipe``'s UNet and text encoder."""
    g = torch.Generator().manual_seed(spec.seed)
    sd: dict[str, torch.Tensor] = {}
    for component, prefix in PREFIXES.items():
        for name, module in getattr(pipe, component).named_modules():
            linear = isinstance(module, nn.Linear) and (_UNET if component == "unet" else _TEXT).search(name)
            conv = spec.method == "lora" and isinstance(module, nn.Conv2d) and _CONV.search(name)
            if not (linear or conv):
                continue
            key = f"{prefix}_{name.replace('.', '_')}"
            sd.update({f"{key}.{k}": v.contiguous() for k, v in _tensors(module, spec, g).items()})
    return sd


def write_demo_adapters(folder: str | Path, pipe: Any) -> list[Path]:
    """Write the demo adapters into ``folder`` (files already there are kept); returns their paths."""
    folder = Path(folder)
    paths = []
    for spec in DEMO_ADAPTERS:
        path = folder / f"{spec.name}.safetensors"
        if not path.exists():
            metadata = {"ss_output_name": spec.name, "modelspec.trigger_phrase": spec.trigger,
                        "modelspec.title": f"diffadapt demo {spec.method}", "ss_network_module": spec.method,
                        "ss_base_model_version": "sd_v1"}
            write_safetensors(path, demo_state_dict(pipe, spec), metadata)
        paths.append(path)
    return paths


def demo_studio(adapter_dir: str | Path | None = None, *, previews: bool = True, **kwargs: Any):
    """The tiny random SD1 pipeline with the demo adapters (and their preview images) in ``adapter_dir``."""
    import tempfile

    from ..testing import tiny_sd1_pipeline
    from .core import Request, Studio

    pipe = tiny_sd1_pipeline()
    folder = Path(adapter_dir) if adapter_dir is not None else Path(tempfile.mkdtemp(prefix="diffadapt-studio-"))
    folder.mkdir(parents=True, exist_ok=True)
    write_demo_adapters(folder, pipe)
    studio = Studio(pipe, adapter_dir=folder, **kwargs)
    for spec in DEMO_ADAPTERS:
        preview = folder / f"{spec.name}.preview.png"
        if previews and not preview.exists():
            studio.generate(Request(f"a photo of a cat, {spec.trigger}", seed=0, steps=2), {spec.name: 1.0})[0] \
                .image.save(preview)
    return studio
