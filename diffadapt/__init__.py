"""diffadapt: load, mix and hot-swap any diffusion adapter in diffusers pipelines."""

from .api import adapters, inspect, load, unload
from .conversion import convert, save
from .fusing import fuse, unfuse
from .hotswap import hotswap, prepare_hotswap, using
from .merge import merge
from .mixing import disable, enable, get_weights, set_weights
from .errors import (
    AdapterNotFoundError,
    DiffAdaptError,
    FormatError,
    KeyMappingError,
    NonFiniteError,
    PickleRefusedError,
    ShapeError,
    SourceError,
    UnsupportedError,
    WriteError,
)
from .spec import AdapterInfo

__version__ = "0.1.0"

__all__ = [
    "save", "convert", "fuse", "unfuse",
    "load", "unload", "adapters", "inspect", "AdapterInfo", "set_weights", "get_weights", "enable", "disable", "merge",
    "hotswap", "prepare_hotswap", "using",
    "DiffAdaptError", "SourceError", "FormatError", "PickleRefusedError", "KeyMappingError", "ShapeError",
    "NonFiniteError", "UnsupportedError", "AdapterNotFoundError", "WriteError",
]
