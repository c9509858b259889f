"""The method registry: one module per adapter method, one entry per module in ``METHODS``."""

from __future__ import annotations

from ..errors import FormatError
from .base import MethodDef, ParseContext, Params
from .full import METHOD as FULL
from .loha import METHOD as LOHA
from .lokr import METHOD as LOKR
from .lora import METHOD as LORA
from .oft import METHOD as OFT
from .oft import PEFT_METHOD as PEFT_OFT
from .waveft import METHOD as WAVEFT

METHODS: list[MethodDef] = [LORA, LOHA, LOKR, OFT, PEFT_OFT, WAVEFT, FULL]

BY_NAME: dict[str, MethodDef] = {m.name: m for m in METHODS}
ALL_SUFFIXES: tuple[str, ...] = tuple(sorted({s for m in METHODS for s in m.suffixes}, key=len, reverse=True))


def detect(suffixes: set[str], *, where: str) -> MethodDef:
    """The one method whose marker suffixes appear among a module's keys."""
    found = [m for m in METHODS if m.markers & suffixes]
    if len(found) == 1:
        return found[0]
    if not found:
        raise FormatError(f"{where}: no adapter method recognises the keys {sorted(suffixes)}")
    raise FormatError(f"{where}: keys {sorted(suffixes)} mix methods {[m.name for m in found]}")


__all__ = ["METHODS", "BY_NAME", "ALL_SUFFIXES", "MethodDef", "ParseContext", "Params", "detect"]
