"""Backends put a resolved adapter into a model. Each module here provides the same four names:

``NAME``; ``apply(loaded)`` — put every target of a :class:`~diffadapt.pipeline.Loaded` in place, rolling
back on failure; ``remove(loaded)`` — take it out, the base coming back bit-exactly; and
``refresh(loaded_list)`` — re-read each adapter's ``strength(component, module)`` after a weight change.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import UnsupportedError
from . import inject, patch

BACKENDS: dict[str, ModuleType] = {patch.NAME: patch, inject.NAME: inject}


def get(mode: str) -> ModuleType:
    try:
        return BACKENDS[mode]
    except KeyError:
        raise UnsupportedError(f"mode={mode!r}: choose one of {sorted(BACKENDS)}") from None
