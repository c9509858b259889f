"""Random adapters made by the reference implementations, for tests and benchmarks.

Files produced here are what users have: LyCORIS writes kohya-named state dicts (``lora_unet_…``) with
its own modules, peft writes PEFT state dicts from its own tuner layers. The reference objects are kept
so that tests can compare diffadapt's output with the reference forward. ``lycoris-lora`` is a test-only
dependency and is imported lazily.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Iterator

import torch
from torch import nn

UNET_MODULES = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
DIT_MODULES = ["SD3Transformer2DModel", "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock"]
TEXT_MODULES = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
UNET_NAMES = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]


@contextlib.contextmanager
def _preset(preset: dict[str, Any]) -> Iterator[None]:
    """LyCORIS keeps its preset in class attributes; set them for one network and put them back."""
    from lycoris import LycorisNetwork

    fields = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX", "MODULE_ALGO_MAP",
              "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {f: getattr(LycorisNetwork, f) for f in fields}
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    try:
        LycorisNetwork.apply_preset(preset)
        yield
    finally:
        for f, v in saved.items():
            setattr(LycorisNetwork, f, v)


_SCALES = ("dora_scale", "magnitude", "rescale")


def randomize_(named: Iterator[tuple[str, nn.Parameter]], *, seed: int, std: float = 0.05) -> None:
    """Give adapter parameters non-zero random values (LyCORIS and peft zero one factor at init).

    Magnitudes and rescales are perturbed around their initial value; scalars (alpha) stay as set.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named:
            if p.numel() == 1:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            p.copy_(p * (1 + 0.1 * noise) if any(s in name for s in _SCALES) else noise * std)


def lycoris_network(
    module: nn.Module,
    *,
    algo: str = "lora",
    prefix: str = "lora_unet",
    target_modules: list[str] | None = None,
    target_names: list[str] | None = None,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    std: float = 0.05,
    **kwargs: Any,
):
    """Wrap ``module`` with a LyCORIS network (``apply_to``) with random weights; returns the network.

    After this call ``module``'s forward is LyCORIS's forward; ``network.state_dict()`` is the file.
    ``kwargs`` go to ``LycorisNetwork`` (``use_tucker``, ``weight_decompose``, ``wd_on_out``, ``constraint``,
    ``rescaled``, ``decompose_both``, ``factor``, ``block_size``, ``full_matrix`` …).
    """
    from lycoris import LycorisNetwork

    preset = {
        "enable_conv": True,
        "target_module": target_modules if target_modules is not None else UNET_MODULES + TEXT_MODULES + DIT_MODULES,
        "target_name": target_names if target_names is not None else UNET_NAMES,
        "lora_prefix": prefix,
    }
    with _preset(preset):
        network = LycorisNetwork(
            module, multiplier=1.0, lora_dim=rank, conv_lora_dim=rank, alpha=alpha, conv_alpha=alpha,
            network_module=algo, warn_on_unmatched=False, **kwargs,
        )
    network.apply_to()
    randomize_(network.named_parameters(), seed=seed, std=std)
    return network


def lycoris_file(module: nn.Module, **kwargs: Any) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """(state dict as LyCORIS saves it, reference model running LyCORIS's forward) for a copy of ``module``."""
    ref = copy.deepcopy(module)
    network = lycoris_network(ref, **kwargs)
    sd = {k: v.detach().clone() for k, v in network.state_dict().items()}
    return sd, ref


def peft_file(
    module: nn.Module, config: Any, *, seed: int = 0, std: float = 0.05
) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """(PEFT state dict, reference model with peft's tuner layers) for a copy of ``module``."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    ref = inject_adapter_in_model(config, copy.deepcopy(module), adapter_name="default")
    randomize_(((n, p) for n, p in ref.named_parameters() if ".default" in n), seed=seed, std=std)
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(ref, adapter_name="default").items()}
    return sd, ref


KOHYA_PREFIXES = {"unet": "lora_unet", "transformer": "lora_transformer", "text_encoder": "lora_te",
                  "text_encoder_2": "lora_te2"}


def pipeline_file(
    pipe: Any, *, components: tuple[str, ...] = ("unet", "text_encoder"), seed: int = 0,
    prefixes: dict[str, str] | None = None, **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """One kohya-named LyCORIS file over several components of a pipeline (a different seed per component)."""
    names = {**KOHYA_PREFIXES, **(prefixes or {})}
    sd: dict[str, torch.Tensor] = {}
    for i, comp in enumerate(components):
        sd.update(lycoris_file(getattr(pipe, comp), prefix=names[comp], seed=seed + i, **kwargs)[0])
    return sd
