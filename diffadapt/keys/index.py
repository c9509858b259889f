"""Resolve a file's module keys to a model's modules with dictionary look-ups built once per model."""

from __future__ import annotations

from torch import nn

from .kohya import is_ldm_unet_name, ldm_to_diffusers

_TM = "text_model"


class ModuleIndex:
    """Every module of one component, by dotted name and by kohya's flat ('_') name."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules: dict[str, nn.Module] = dict(model.named_modules())
        self.flat: dict[str, str] = {}
        for name in self.modules:
            self.flat.setdefault(name.replace(".", "_"), name)
        lpb = getattr(getattr(model, "config", None), "layers_per_block", 2)
        self.layers_per_block = int(lpb[0] if isinstance(lpb, (list, tuple)) else lpb)

    def find(self, key: str, *, dotted: bool) -> str | None:
        """The model's module name for a file's module key, or None."""
        if dotted:
            for cand in (key, _strip(key, _TM + "."), f"{_TM}.{key}"):
                if cand in self.modules:
                    return cand
            return None
        for cand in (key, _strip(key, _TM + "_"), f"{_TM}_{key}"):
            if cand in self.flat:
                return self.flat[cand]
        if is_ldm_unet_name(key):
            mapped = ldm_to_diffusers(key, layers_per_block=self.layers_per_block)
            if mapped in self.flat:
                return self.flat[mapped]
        return None


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key
