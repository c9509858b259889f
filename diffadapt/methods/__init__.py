"""The method registry: one module per adapter method, one entry per module in ``METHODS``."""

from __future__ import annotations

from ..errors import FormatError
from .base import MethodDef, ParseContext, Params
from .lora import METHOD as LORA

METHODS: list[MethodDef] = [LORA]

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
