"""Synthetic adapter files in the DiT tools' exact key layouts, and whole-matrix references.

Module lists come from the tiny models themselves: each native module (BFL / MMDiT / Wan names) is listed with
the diffusers modules it stands for, so a fused file module gets the stacked rows of its targets.
"""

from __future__ import annotations

import re

import torch
from diffusers.loaders.lora_conversion_utils import swap_scale_shift

from diffadapt.keys.dit import TABLES

PREFIX = {  # layout → (key of a native module path, suffix pair of down/up)
    "kohya": (lambda n: "lora_unet_" + n.replace(".", "_"), ("lora_down.weight", "lora_up.weight")),
    "bfl": (lambda n: "diffusion_model." + n, ("lora_down.weight", "lora_up.weight")),
    "bfl_ab": (lambda n: "diffusion_model." + n, ("lora_A.weight", "lora_B.weight")),
    "xlabs": (lambda n: n, ("down.weight", "up.weight")),
}


def native_modules(model, family: str, *, xlabs: bool = False, only: str | None = None) -> dict[str, list[str]]:
    """{native module path: [diffusers module paths]} for every native module the model has."""
    mods = dict(model.named_modules())
    out: dict[str, list[str]] = {}
    for rule in TABLES[family]:
        if (".processor." in rule.native) != xlabs or (only and not re.search(only, rule.native)):
            continue
        for i in range(64) if "{i}" in rule.native else [""]:
            targets = [t.replace("{i}", str(i)) for t in rule.targets]
            if all(t in mods for t in targets):
                out[rule.native.replace("{i}", str(i))] = targets
    return out


def shapes(model, targets: list[str]) -> tuple[int, tuple[int, ...]]:
    mods = dict(model.named_modules())
    ws = [mods[t].weight.shape for t in targets]
    return sum(w[0] for w in ws), tuple(ws[0][1:])


def lora_file(model, family: str, layout: str, *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
              only: str | None = None) -> dict[str, torch.Tensor]:
    """A LoRA on every native module, keys spelled as ``layout`` writes them (alpha omitted when None)."""
    name, (dn, up) = PREFIX[layout]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for native, targets in native_modules(model, family, xlabs=layout == "xlabs", only=only).items():
        out, inner = shapes(model, targets)
        k = name(native)
        sd[f"{k}.{dn}"] = torch.randn(rank, *inner, generator=g) * 0.2
        sd[f"{k}.{up}"] = torch.randn(out, rank, *([1] * len(inner[1:])), generator=g) * 0.2
        if alpha is not None:
            sd[f"{k}.alpha"] = torch.tensor(float(alpha))
    return sd


def reference_weights(model, family: str, deltas: dict[str, torch.Tensor], *, swap_continuous: bool = True):
    """W + ΔW per diffusers module from whole-matrix deltas of native modules, sliced by rows as the model
    stacks them; AdaLayerNormContinuous targets get diffusers' own swap_scale_shift of the (shift, scale) rows."""
    mods = dict(model.named_modules())
    table = {**native_modules(model, family), **native_modules(model, family, xlabs=True)}
    out = {}
    for native, delta in deltas.items():
        targets = table[native]
        start = 0
        for t in targets:
            w = mods[t].weight.detach()
            d = delta[start:start + w.shape[0]].reshape(w.shape)
            start += w.shape[0]
            parent = t.rpartition(".")[0]
            if swap_continuous and type(mods[parent]).__name__ == "AdaLayerNormContinuous":
                d = swap_scale_shift(d)
            out[t] = w + d
        assert start == delta.shape[0], native
    return out


def effective_weights(model) -> dict[str, torch.Tensor]:
    """Weights of every Linear/Conv, read through peft wrappers (fused LoRA lives in ``base_layer``)."""
    out = {}
    for name, m in model.named_modules():
        if {"base_layer", "lora_A", "lora_B", "lora_magnitude_vector"} & set(name.split(".")):
            continue
        base = getattr(m, "base_layer", m)
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            out[name] = base.weight.detach().clone()
    return out
