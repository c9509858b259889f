"""Checks the patch backend runs on a load's targets before its first write."""

from __future__ import annotations

import torch

from ..errors import UnsupportedError


def where(t) -> str:
    return f"{t.component + '.' if t.component else ''}{t.module_name}"


def check_order(targets) -> None:
    """A transform (OFT, DoRA) must act on the sum of every additive adapter. Injected adapters sit in peft
    layers *outside* the patched weight, so a patched transform would rotate only part of that sum."""
    for t in targets:
        if t.patch.params.is_additive or t.root is None:
            continue
        wrapper = t.root.get_submodule(t.module_name)
        if wrapper is not t.module:
            raise UnsupportedError(
                f"{t.patch.original_key}: a {t.patch.method} transform loaded in patch mode onto "
                f"{where(t)}, which already holds inject-mode "
                "adapters, would leave them out of the rotation; load it with mode='inject', or fuse first"
            )


def check_storage(targets) -> None:
    """Patch mode writes dense floating-point weights; quantized ones (bitsandbytes, torchao) are refused."""
    for t in targets:
        w = getattr(t.module, "weight", None)
        data = w.data if isinstance(w, torch.Tensor) else None
        if data is None:
            problem = "missing"
        elif type(data) is not torch.Tensor:
            problem = f"a {type(data).__name__} (a quantized tensor subclass)"
        elif not data.is_floating_point():
            problem = f"stored as {data.dtype} (quantized)"
        elif data.device.type == "meta":
            problem = "on the meta device (not loaded)"
        else:
            continue
        raise UnsupportedError(
            f"{where(t)} ({type(t.module).__name__}): its weight is {problem}; patch mode writes dense floating-point "
            "weights in place — load the adapter with mode='inject' (peft's layers run over quantized bases), "
            "or dequantize the model first")
