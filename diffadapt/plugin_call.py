"""The per-call LoRA scale of a plugged pipeline: ``pipe(…, cross_attention_kwargs={"scale": s})``.

Under peft, diffusers scales LoRA layers for one call in two places, and the plugin follows both:

* the denoiser: its ``forward`` is wrapped by diffusers' ``apply_lora_scale(<kwargs name>)``, which pops
  ``"scale"`` from that kwargs dict (``cross_attention_kwargs`` for UNets, ``joint_attention_kwargs`` for SD3 /
  Flux, ``attention_kwargs`` for Wan / Qwen-Image …) and scales the model's active LoRA layers for the pass;
  the pipeline hands its own kwargs dict of the same name to it at every step;
* the text encoders: the pipeline passes that ``"scale"`` as ``encode_prompt(lora_scale=)``, which scales the
  encoders its code names (``scale_lora_layers(self.text_encoder…)``; SD3's T5 is never scaled).

Patched weights have no layer to scale, so the scale goes into the plugin's state for the call: each unfused
active adapter's effective weight on those components is multiplied by ``s``; fused ones are not (peft's merged
layers run their base layer only). The weights are rewritten before the call and, in a ``finally``, rewritten
back — from W0, so bit-identical — also when the call raises or is interrupted. ``pipe(…)`` looks ``__call__``
up on the class, so the plugged instance gets a subclass of its own class (same name, module and qualname;
nothing else added) whose ``__call__`` and ``encode_prompt`` do this; ``da.unplug`` gives it its class back.

Not as diffusers: after a call with ``scale=0``, diffusers' ``unscale_lora_layers`` resets every active
adapter's weight to 1 (losing ``set_adapters`` weights); here the weights before the call come back exactly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from typing import Any, Iterator

from .pipeline import components, registry
from .plugin_state import STATE, State, apply, sync
from .weights import WeightError

_BASE = "_diffadapt_base"  # on the plugged subclass: the class it stands for
_SUBCLASSES: dict[type, type] = {}


def install(pipe: Any) -> None:
    cls = type(pipe)
    if _BASE not in cls.__dict__:
        pipe.__class__ = _subclass(cls)


def uninstall(pipe: Any) -> None:
    base = type(pipe).__dict__.get(_BASE)
    if base is not None:
        pipe.__class__ = base


def _subclass(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is not None:
        return sub
    ns: dict[str, Any] = {_BASE: cls, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                          "__doc__": cls.__doc__}
    call = next((k.__dict__["__call__"] for k in cls.__mro__ if "__call__" in k.__dict__), None)
    if call is not None:  # (``cls.__call__`` of a class without one would be the metaclass's: instantiation)
        call_sig = inspect.signature(call)

        @functools.wraps(call)
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            scales = _denoiser_scales(self, call_sig, args, kwargs)
            with scaled(self, scales):
                return call(self, *args, **kwargs)

        ns["__call__"] = __call__
    encoders = _encoders(cls)
    if encoders:
        encode_sig = inspect.signature(cls.encode_prompt)

        @functools.wraps(cls.encode_prompt)
        def encode_prompt(self, *args: Any, **kwargs: Any) -> Any:
            s = _argument(encode_sig, self, args, kwargs, "lora_scale")
            scales = {} if s is None else {c: _number(s, "lora_scale") for c in encoders
                                           if getattr(self, c, None) is not None}
            with scaled(self, scales):
                return cls.encode_prompt(self, *args, **kwargs)

        ns["encode_prompt"] = encode_prompt
    sub = _SUBCLASSES[cls] = type(cls)(cls.__name__, (cls,), ns)
    return sub


@functools.cache
def _encoders(cls: type) -> tuple[str, ...]:
    """The components ``cls.encode_prompt`` scales by ``lora_scale``, read from diffusers' own code."""
    fn = getattr(cls, "encode_prompt", None)
    if fn is None or "lora_scale" not in inspect.signature(fn).parameters:
        return ()
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):  # no source shipped: the text encoders diffusers' LoRA mixins load into
        return tuple(c for c in getattr(cls, "_lora_loadable_modules", ()) if c.startswith("text_encoder"))
    return tuple(dict.fromkeys(re.findall(r"(?<!un)scale_lora_layers\(\s*self\.(\w+)", source)))


@functools.cache
def _wrapper_code():
    from diffusers.utils.peft_utils import apply_lora_scale

    return apply_lora_scale("cross_attention_kwargs")(lambda self: None).__code__


def scale_kwarg(model: Any) -> str | None:
    """The kwargs dict whose ``"scale"`` diffusers applies to ``model``'s LoRA layers."""
    return _scale_kwarg(type(model))


@functools.cache
def _scale_kwarg(cls: type) -> str | None:
    fn = getattr(cls, "forward", None)
    while fn is not None:  # diffusers' ``apply_lora_scale(name)`` wrapper: the name is in its closure
        if getattr(fn, "__code__", None) is _wrapper_code():
            cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
            return cells.get("kwargs_name")
        fn = getattr(fn, "__wrapped__", None)
    try:  # a few models scale inline: ``lora_scale = attention_kwargs.pop("scale", 1.0)``
        source = inspect.getsource(cls.forward)
    except (AttributeError, OSError, TypeError):
        return None
    found = re.search(r"(\w+)\.pop\(\s*[\"']scale[\"']", source)
    return found.group(1) if found and "scale_lora_layers(self" in source else None


def _argument(sig: inspect.Signature, self: Any, args: tuple, kwargs: dict, name: str) -> Any:
    try:
        return sig.bind_partial(self, *args, **kwargs).arguments.get(name)
    except TypeError:  # diffusers' own call raises the proper error
        return None


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise WeightError(f"{what}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise WeightError(f"{what}: expected a number, got {value!r}") from None


def _denoiser_scales(pipe: Any, sig: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for comp, model in components(pipe).items():
        name = scale_kwarg(model)
        given = _argument(sig, pipe, args, kwargs, name) if name else None
        if isinstance(given, dict) and "scale" in given:
            out[comp] = _number(given["scale"], f'{name}["scale"]')
    return out


@contextlib.contextmanager
def scaled(pipe: Any, scales: dict[str, float]) -> Iterator[None]:
    """Run the block with ``scales`` ({component: s}) applied to the plugged pipeline's unfused adapters."""
    state: State | None = pipe.__dict__.get(STATE)
    scales = {c: s for c, s in scales.items() if s != 1.0}
    if state is None or not scales:
        yield
        return
    reg = registry(pipe)
    with reg.lock:
        state.calls.append(scales)
        try:
            apply(pipe, sync(pipe, state))
        except BaseException:
            _remove(state, scales)
            raise
    try:
        yield
    finally:
        with reg.lock:
            _remove(state, scales)
            apply(pipe, sync(pipe, state))


def _remove(state: State, scales: dict[str, float]) -> None:
    state.calls[:] = [c for c in state.calls if c is not scales]
