"""peft configs for the five methods, and injecting them into the modules being trained."""

from __future__ import annotations

import torch

KOHYA_METHODS = ("lora", "loha", "lokr")  # the ones with a kohya/LyCORIS form


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def peft_config(method: str, *, rank: int, alpha: float, targets: list[str], model: torch.nn.Module,
                dropout: float = 0.0):
    """The peft config of ``method``. ``rank`` is the LoRA/LoHa/LoKr rank, OFT's block size, and
    for WaveFT the number of trained coefficients of a rank-``rank`` LoRA on each layer (same budget)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, WaveFTConfig

    if method == "lora":
        # A ~ N(0, 1/r), B = 0: the init of every diffusers DreamBooth LoRA script
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                          init_lora_weights="gaussian")
    if method == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, init_weights=True)
    if method == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, init_weights=True)
    if method == "oft":
        return OFTConfig(r=0, oft_block_size=rank, target_modules=targets, init_weights=True)
    if method == "waveft":
        pattern = {}
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and _matches(name, targets):
                pattern[name] = min(rank * (m.in_features + m.out_features), m.in_features * m.out_features)
        first = next(iter(pattern.values()), rank)
        return WaveFTConfig(n_frequency=first, n_frequency_pattern=pattern, target_modules=targets,
                            init_weights=True)
    raise ValueError(method)


def inject(model: torch.nn.Module, config) -> list[torch.nn.Parameter]:
    """Add the adapter layers in place; they train in fp32 whatever the frozen weights' dtype."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    params = []
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            params.append(p)
    return params
