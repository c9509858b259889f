"""diffadapt: load, mix and hot-swap any diffusion adapter in diffusers pipelines."""

from .api import adapters, get_weights, inspect, load, unload
from .backups import configure, release
from .conversion import convert, save
from .fusing import fuse, unfuse
from .hotswap import hotswap, prepare_hotswap, using
from .merge import merge
from .mixing import disable, enable, set_weights
from .plugin import plugin, unplug
from .errors import (
    AdapterNotFoundError,
    ComponentError,
    DiffAdaptError,
    FormatError,
    KeyMappingError,
    NameInUseError,
    NonFiniteError,
    PickleRefusedError,
    PromptError,
    ShapeError,
    SourceError,
    UnsupportedError,
    WeightError,
    WriteError,
)
from .spec import AdapterInfo

__version__ = "0.1.0"

__all__ = [
    "load", "unload", "adapters", "inspect", "AdapterInfo", "set_weights", "get_weights", "enable", "disable", "merge",
    "save", "convert", "fuse", "unfuse", "hotswap", "prepare_hotswap", "using", "plugin", "unplug",
    "configure", "release",
    "DiffAdaptError", "SourceError", "FormatError", "PickleRefusedError", "KeyMappingError", "ShapeError",
    "NonFiniteError", "UnsupportedError", "AdapterNotFoundError", "NameInUseError", "WeightError", "PromptError",
    "ComponentError", "WriteError",
]
