"""From the canonical spec back to files: kohya / LyCORIS single files and PEFT folders or files.

Format plumbing only — names, metadata, dtypes, files. What a method's tensors look like in a format is the
method's own (``Params.to_kohya`` / ``Params.to_peft`` in ``methods/<m>.py``), which raises
``UnsupportedError`` when the format cannot express it exactly; nothing is approximated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ..methods.base import Params


@dataclass
class Item:
    """One module's adapter as an exporter sees it."""

    component: str  # '' for a bare module, '*' when the file did not say
    module: str  # dotted module path when ``dotted``, else the kohya flat name as written in the file
    dotted: bool
    params: Params
    kind: str | None = None  # linear | conv1d | conv2d | conv3d, when the module is known
    shape: tuple[int, ...] | None = None  # the module weight's shape, when known
    ndim: int | None = None  # the weight's rank when only the file tells (its rescale / dora_scale tensors)

    @property
    def weight_ndim(self) -> int | None:
        return len(self.shape) if self.shape is not None else self.ndim


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating tensors to ``dtype`` (None keeps them); the result is a contiguous CPU tensor."""
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.detach().to("cpu").contiguous()
