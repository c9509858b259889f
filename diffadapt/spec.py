"""The canonical, format-free description of an adapter.

``io`` reads a source into a :class:`RawAdapter`; ``keys`` splits its keys into per-module groups;
``methods`` turns each group into typed parameters. The result, :class:`AdapterSpec`, is what the
backends apply and what ``inspect`` summarises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# transformer_2: Wan 2.2's low-noise expert (a second denoiser, loaded into with ``load(…, into="transformer_2")``)
COMPONENTS = ("unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class RawAdapter:
    """Tensors and side information exactly as read from a source."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    # PEFT adapter_config.json per component ("" = the file's single, unnamed component)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # key prefix a PEFT folder implies for its keys (e.g. "unet." for a DreamBooth sub-folder)
    source: str = "<state dict>"
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fused:
    """A file module that stands for several model modules stacked along the output axis.

    Flux's ``img_attn.qkv`` is diffusers' ``to_q``, ``to_k``, ``to_v``; its single blocks' ``linear1`` is
    ``to_q, to_k, to_v, proj_mlp``; SD3's ``context_block.attn.qkv`` is ``add_q/k/v_proj``. Row counts come
    from the model at resolve time; each method slices its own tensors (``take_rows`` in ``methods/<m>.py``).
    ``native_modulation``: the file uses the original (shift, scale) order of adaLN modulations, so a target
    that diffusers builds as ``AdaLayerNormContinuous`` (scale, shift) takes the two halves exchanged.
    """

    modules: tuple[str, ...]  # model module paths (dotted, inside the component), in row order
    native_modulation: bool = False


@dataclass
class ModuleGroup:
    """All tensors of one adapted module, keyed by their suffix (``lora_down.weight``, ``alpha``, ...)."""

    component: str
    module_key: str  # as written in the file, before resolution against a model
    dotted: bool  # True when module_key uses '.' separators (PEFT/diffusers), False for kohya '_' names
    fmt: str  # kohya | lycoris | peft | diffusers
    tensors: dict[str, torch.Tensor]
    keys: dict[str, str]  # suffix -> full original key, for error messages
    config: dict[str, Any] | None = None  # PEFT config with rank/alpha patterns resolved for this module
    fused: Fused | None = None  # set by keys/dit.py when the file module is several model modules
    native: str | None = None  # the module name as the file spelt it, when keys/dit.py translated it


@dataclass
class ModulePatch:
    """One module's adapter: where it goes and its typed parameters."""

    component: str
    module_key: str
    method: str
    params: Any  # a methods.base.Params subclass
    fmt: str
    dotted: bool = True  # module_key uses '.' (PEFT/diffusers) rather than kohya '_'
    module: str | None = None  # resolved module path inside the component, once mapped to a model
    original_key: str = ""
    fused: Fused | None = None  # several model modules (rows sliced per module at resolve time)
    native: str | None = None  # the file's own module name when keys/dit.py translated it (BFL / MMDiT / Wan)


@dataclass
class AdapterSpec:
    patches: list[ModulePatch]
    fmt: str
    source: str
    metadata: dict[str, str] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    family: str | None = None  # model family the key names identify (flux, sd3, wan, qwen), if any
    layout: str | None = None  # e.g. "Flux kohya", "Wan ComfyUI": how the file names modules, for messages


@dataclass
class AdapterInfo:
    """A summary of an adapter file, or of a loaded adapter (then with its current weight)."""

    name: str | None
    source: str
    format: str
    methods: dict[str, int]  # method -> number of modules
    components: dict[str, int]  # component -> number of modules
    modules: int
    ranks: dict[int, int]  # rank -> number of modules
    alphas: dict[float, int]
    params: int
    dtype: str
    base_family: str  # sd1 | sd2 | sdxl | flux | sd3 | wan | qwen | dit (a DiT the names do not tell) | unknown
    trigger_words: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    weight: Any = 1.0
    mode: str | None = None
    enabled: bool = True
    layout: str | None = None  # DiT files: how the file names modules ("Flux kohya", "Wan ComfyUI" …)

    def summary(self) -> str:
        def fmt(d):
            return ", ".join(f"{k}: {v}" for k, v in d.items()) or "-"

        lines = [
            f"source      {self.source}",
            f"format      {self.format}" + (f" ({self.layout} layout)" if self.layout else ""),
            f"base        {self.base_family}",
            f"methods     {fmt(self.methods)}",
            f"components  {fmt(self.components)}",
            f"modules     {self.modules}",
            f"ranks       {fmt(self.ranks)}",
            f"alphas      {fmt(self.alphas)}",
            f"parameters  {self.params:,}",
            f"dtype       {self.dtype}",
        ]
        if self.trigger_words:
            lines.append(f"triggers    {', '.join(self.trigger_words)}")
        if self.name is not None:
            lines.insert(0, f"name        {self.name}")
            lines.append(f"weight      {self.weight}")
        return "\n".join(lines)
