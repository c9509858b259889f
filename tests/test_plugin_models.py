"""Component-level adapter methods (``pipe.unet.set_adapters`` …) and ``set_lora_device`` on a plugged pipeline.

Reference: stock diffusers on an identical unplugged pipeline with the same kohya LoRA files, call by call:
outputs of every component, active and listed adapters, fused adapters.
"""

from __future__ import annotations

import copy

import pytest
import torch

import diffadapt as da
from diffadapt.testing import param_hashes
from test_plugin import _pair, max_err, outputs


def _unet_active(pipe):
    try:
        return pipe.unet.active_adapters()
    except ValueError as e:
        return str(e)


STEPS = [
    ("load a", lambda p, f: p.load_lora_weights(f[0], adapter_name="a")),
    ("load b", lambda p, f: p.load_lora_weights(f[1], adapter_name="b")),
    ("unet.set_adapters", lambda p, f: p.unet.set_adapters(["a", "b"], weights=[0.5, 0.7])),
    ("unet per block", lambda p, f: p.unet.set_adapters(
        ["a", "b"], weights=[{"down": 0.2, "mid": 0.6, "up": {"block_1": [0.1, 0.5, 0.9]}}, None])),
    ("unet.set_adapter", lambda p, f: p.unet.set_adapter("a")),
    ("unet.disable_lora", lambda p, f: p.unet.disable_lora()),
    ("unet.enable_lora", lambda p, f: p.unet.enable_lora()),
    ("unet.disable_adapters", lambda p, f: p.unet.disable_adapters()),
    ("pipeline set while unet off", lambda p, f: p.set_adapters(["a", "b"], [0.4, 0.9])),
    ("unet.enable_adapters", lambda p, f: p.unet.enable_adapters()),
    ("unet only b", lambda p, f: p.unet.set_adapters("b", 1.2)),
    ("fuse: each component its own active", lambda p, f: p.fuse_lora()),
    ("unfuse", lambda p, f: p.unfuse_lora()),
    ("unet.delete_adapters a", lambda p, f: p.unet.delete_adapters("a")),
    ("pipeline set both", lambda p, f: p.set_adapters(["a", "b"], [0.6, 0.3])),
    ("pipeline delete b", lambda p, f: p.delete_adapters("b")),
    ("unload", lambda p, f: p.unload_lora_weights()),
]


def test_component_methods_match_stock_diffusers(tmp_path):
    stock, ours, files = _pair(tmp_path)
    hashes = param_hashes(ours)
    for step, call in STEPS:
        call(stock, files)
        call(ours, files)
        err = max_err(outputs(ours), outputs(stock))
        assert err <= 1e-5, f"{step}: {err}"
        assert ours.get_active_adapters() == stock.get_active_adapters(), step
        assert ours.get_list_adapters() == stock.get_list_adapters(), step
        assert ours.fused_loras == stock.fused_loras, step
        if step != "unload":  # diffusers keeps stale names on its emptied layers
            assert _unet_active(ours) == _unet_active(stock), step
    assert param_hashes(ours) == hashes


def test_component_methods_errors_unplug_and_set_lora_device(tmp_path):
    _, pipe, files = _pair(tmp_path)
    pipe.load_lora_weights(files[0], adapter_name="a")
    pipe.load_lora_weights(files[1], adapter_name="b")
    hashes = param_hashes(pipe)
    with pytest.raises(da.AdapterNotFoundError, match="zz"):  # diffusers would activate a name it does not have
        pipe.unet.set_adapters(["a", "zz"])
    with pytest.raises(da.AdapterNotFoundError, match="zz"):
        pipe.unet.delete_adapters("zz")
    with pytest.raises(da.WeightError, match="Length"):
        pipe.unet.set_adapters(["a", "b"], weights=[0.5])
    # set_lora_device: the adapters live in the weights; nothing moves, nothing changes, bad names still fail
    pipe.set_lora_device(["a", "b"], "cpu")
    pipe.set_lora_device(["a"], torch.device("cpu"))
    with pytest.raises(da.AdapterNotFoundError, match="zz"):
        pipe.set_lora_device(["zz"], "cpu")
    with pytest.raises(RuntimeError):
        pipe.set_lora_device(["a"], "no-such-device")
    assert param_hashes(pipe) == hashes and pipe.get_active_adapters() == ["b"]
    # a component deleted from every component is unloaded
    pipe.unet.delete_adapters("a")
    assert "a" in da.adapters(pipe) and pipe.get_list_adapters() == {"unet": ["b"], "text_encoder": ["a", "b"]}
    copied = copy.deepcopy(pipe)  # its denoiser speaks for the copy, which starts with no adapters
    with pytest.raises(da.AdapterNotFoundError):
        copied.unet.set_adapters("b")
    da.unplug(copied)
    assert "set_adapters" not in copied.unet.__dict__ and "_diffadapt_base" not in type(copied).__dict__
    da.unplug(pipe)
    assert type(pipe) is type(copied)
    unet_cls = type(pipe.unet)
    for name in ("set_adapters", "active_adapters", "delete_adapters", "disable_lora"):
        assert name not in pipe.unet.__dict__ and getattr(pipe.unet, name).__func__ is getattr(unet_cls, name)
    da.unload(pipe)
