"""The diffadapt studio: a Gradio app to stack adapter styles, with a documented API.

``diffadapt studio --model DIR --adapters DIR`` starts it; :class:`Studio` is the same work without a
browser. Gradio is imported only by :mod:`diffadapt.studio.app`.
"""

from .core import MERGE_METHODS, Cancelled, Request, Result, Slot, Studio
from .demo import DEMO_ADAPTERS, demo_studio, write_demo_adapters
from .presets import presets_for
from .paths import AdapterFolder, UnsafeNameError, check_name

__all__ = ["Studio", "Request", "Result", "Slot", "Cancelled", "MERGE_METHODS", "presets_for", "demo_studio",
           "write_demo_adapters", "DEMO_ADAPTERS", "AdapterFolder", "UnsafeNameError", "check_name"]
