"""Merging loaded adapters into one LoRA: exactness of cat, error behaviour of svd, ties/dare seeding."""

from __future__ import annotations

import pytest
import torch

import diffadapt as da
from diffadapt.fixtures import lycoris_file
from diffadapt.testing import param_hashes, tiny_sd1_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


@pytest.fixture(scope="module")
def files(pipe):
    spec = {"a": dict(algo="lora", rank=4), "b": dict(algo="lora", rank=2, seed=1),
            "t": dict(algo="lora", rank=2, use_tucker=True, seed=2), "t2": dict(algo="lora", rank=3, use_tucker=True, seed=3),
            "loha": dict(algo="loha", std=0.3, seed=4), "oft": dict(algo="diag-oft", block_size=4, seed=5),
            "dora": dict(algo="lora", weight_decompose=True, seed=6)}
    out = {}
    for name, kw in spec.items():
        unet, _ = lycoris_file(pipe.unet, prefix="lora_unet", **kw)
        te, _ = lycoris_file(pipe.text_encoder, prefix="lora_te", **{**kw, "seed": kw.get("seed", 0) + 50})
        out[name] = {**unet, **te}
    return out


def params(pipe):
    return {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder")
            for n, p in getattr(pipe, c).named_parameters()}


def stacked(pipe, files, weights):
    for n, w in weights.items():
        da.load(pipe, files[n], n, weight=w)
    return params(pipe)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("names", [("a", "b"), ("t", "t2"), ("a", "b", "t")])
def test_cat_is_exact(pipe, files, names):
    weights = {n: w for n, w in zip(names, (0.6, -0.4, 1.3))}
    hashes = param_hashes(pipe)
    try:
        expected = stacked(pipe, files, weights)
        if len({files[n].get("lora_unet_conv_in.lora_mid.weight") is None for n in names}) > 1:
            with pytest.raises(da.UnsupportedError, match="Tucker"):
                da.merge(pipe, weights, "m", method="cat")
            return
        info = da.merge(pipe, weights, "m", method="cat")
        assert not any(da.adapters(pipe)[n].enabled for n in names) and da.adapters(pipe)["m"].enabled
        assert max_diff(params(pipe), expected) <= 2e-6
        assert float(info.metadata["diffadapt_merge_rel_error"]) <= 1e-6
        assert set(info.ranks) == {sum(int(files[n]["lora_unet_conv_in.lora_down.weight"].shape[0]) for n in names)}
    finally:
        da.unload(pipe)
    assert param_hashes(pipe) == hashes


def test_svd_error_decreases_with_rank_and_default_rank_is_lossless_for_lora(pipe, files):
    weights = {"a": 0.7, "b": 0.5}
    try:
        expected = stacked(pipe, files, weights)
        errors = []
        for rank in (1, 2, 4):
            info = da.merge(pipe, weights, f"r{rank}", method="svd", rank=rank)
            errors.append(float(info.metadata["diffadapt_merge_rel_error"]))
            da.unload(pipe, f"r{rank}")
            da.enable(pipe, "a", "b")
        assert errors[0] > errors[1] > errors[2] > 0
        info = da.merge(pipe, weights, "full", method="svd")
        assert float(info.metadata["diffadapt_merge_rel_error"]) <= 1e-5
        assert max_diff(params(pipe), expected) <= 1e-5
    finally:
        da.unload(pipe)


def measured_error(merged, stack, base):
    """‖W_merged − W_stack‖ / ‖W_stack − W0‖ over every parameter, read off the two models."""
    num = sum(float((merged[k] - stack[k]).square().sum()) for k in stack)
    den = sum(float((stack[k] - base[k]).square().sum()) for k in stack)
    return (num / den) ** 0.5


@pytest.mark.parametrize("mix", [("a", "loha"), ("loha", "oft"), ("a", "dora", "oft"), ("oft", "a"), ("dora", "b")])
def test_svd_merge_equals_the_stack_it_replaces(pipe, files, mix):
    """Transforms act on the sum of the additive adapters (and on each other, in load order): the merge
    targets that stack, so a full-rank merge *is* the stacked model and a low-rank one reports its true error."""
    weights = {n: w for n, w in zip(mix, (0.8, 0.6, 1.1))}
    base = params(pipe)
    try:
        expected = stacked(pipe, files, weights)
        info = da.merge(pipe, weights, "full", method="svd", rank=10_000)
        assert info.methods == {"lora": info.modules}
        assert max_diff(params(pipe), expected) <= 1e-5
        assert float(info.metadata["diffadapt_merge_rel_error"]) <= 1e-5
        da.unload(pipe, "full")
        da.enable(pipe, *mix)
        info = da.merge(pipe, weights, "low", method="svd", rank=2)
        recorded = float(info.metadata["diffadapt_merge_rel_error"])
        assert recorded > 1e-3
        assert recorded == pytest.approx(measured_error(params(pipe), expected, base), rel=1e-3)
    finally:
        da.unload(pipe)


def test_linear_needs_equal_ranks(pipe, files):
    try:
        stacked(pipe, files, {"a": 1.0, "b": 1.0})
        with pytest.raises(da.UnsupportedError, match="equal ranks"):
            da.merge(pipe, {"a": 0.5, "b": 0.5}, "m", method="linear")
        info = da.merge(pipe, {"a": 0.25}, "m", method="linear")  # one source: exactly 0.25·ΔW
        assert float(info.metadata["diffadapt_merge_rel_error"]) <= 1e-6
    finally:
        da.unload(pipe)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_are_seeded(pipe, files, method):
    try:
        stacked(pipe, files, {"a": 1.0, "b": 1.0})
        da.merge(pipe, {"a": 0.6, "b": 0.4}, "m1", method=method, rank=4, density=0.5, seed=3)
        first = params(pipe)
        da.unload(pipe, "m1")
        da.merge(pipe, {"a": 0.6, "b": 0.4}, "m2", method=method, rank=4, density=0.5, seed=3)
        assert max_diff(params(pipe), first) == 0.0
        rng = torch.get_rng_state()
        da.unload(pipe, "m2")
        da.merge(pipe, {"a": 0.6, "b": 0.4}, "m3", method=method, rank=4, density=0.5, seed=4)
        assert torch.equal(rng, torch.get_rng_state())  # the global RNG is left alone
        if method == "dare":
            assert max_diff(params(pipe), first) > 0
    finally:
        da.unload(pipe)


def test_merge_errors_change_nothing(pipe, files):
    try:
        stacked(pipe, files, {"a": 1.0, "loha": 1.0})
        hashes = param_hashes(pipe)
        for kwargs, err in [(dict(method="cat"), da.UnsupportedError), (dict(method="nope"), da.DiffAdaptError)]:
            with pytest.raises(err):
                da.merge(pipe, {"a": 0.5, "loha": 0.5}, "m", **kwargs)
            assert param_hashes(pipe) == hashes and set(da.adapters(pipe)) == {"a", "loha"}
            assert all(i.enabled for i in da.adapters(pipe).values())
        with pytest.raises(da.AdapterNotFoundError):
            da.merge(pipe, {"zz": 1.0}, "m")
    finally:
        da.unload(pipe)
