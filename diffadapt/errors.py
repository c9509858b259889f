"""Errors raised by diffadapt.

Every error names the file, key or module it is about, so a user can act on it without a debugger.
A load that raises leaves the model untouched.
"""

from __future__ import annotations


class DiffAdaptError(Exception):
    """Base class of every error diffadapt raises on purpose."""


class SourceError(DiffAdaptError, FileNotFoundError):
    """The adapter source cannot be found or opened (missing path, unknown hub id, offline)."""


class FormatError(DiffAdaptError, ValueError):
    """The file or its metadata/config is malformed, truncated, empty, or of an unknown layout."""


class PickleRefusedError(FormatError):
    """A pickle-based checkpoint was given without ``allow_pickle=True``."""


class KeyMappingError(DiffAdaptError, KeyError):
    """Adapter keys name modules that the model does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ShapeError(DiffAdaptError, ValueError):
    """Adapter tensors do not fit the module they target."""


class NonFiniteError(DiffAdaptError, ValueError):
    """Adapter tensors contain NaN or Inf."""


class UnsupportedError(DiffAdaptError, NotImplementedError):
    """A valid request that this backend or method cannot honour exactly (e.g. inject-mode LyCORIS OFT)."""


class WriteError(DiffAdaptError, OSError):
    """A file or folder could not be written (disk full, permissions, a library error); nothing was left behind."""


class AdapterNotFoundError(DiffAdaptError, KeyError, ValueError):
    """No adapter of that name is loaded (also a ValueError, which diffusers raises for unknown names)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NameInUseError(DiffAdaptError, ValueError):
    """An adapter of that name is already loaded (unload it, or hotswap onto it)."""


class WeightError(DiffAdaptError, ValueError):
    """A weight specification that cannot be applied."""


class PromptError(DiffAdaptError, ValueError):
    """A ``<lora:…>`` tag whose arguments cannot be read (not a number, no name)."""


class ComponentError(DiffAdaptError, ValueError):
    """A pipeline component that does not exist or takes no adapters (e.g. in ``fuse_lora(components=…)``)."""
