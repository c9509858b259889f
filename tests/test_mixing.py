"""Weighted stacking: sums of individually applied adapters, per-component and per-block weights."""

from __future__ import annotations

import pytest
import torch

import diffadapt as da
from diffadapt.fixtures import pipeline_file
from diffadapt.testing import param_hashes, tiny_sd1_pipeline
from diffadapt.weights import WeightError, block_of

ALGOS = {"lora": dict(algo="lora"), "loha": dict(algo="loha", std=0.3), "lokr": dict(algo="lokr"),
         "full": dict(algo="full", std=0.01), "dora": dict(algo="lora", weight_decompose=True),
         "oft": dict(algo="diag-oft", block_size=4)}
ADDITIVE = ("lora", "loha", "lokr", "full")


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


@pytest.fixture(scope="module")
def files(pipe):
    return {name: pipeline_file(pipe, seed=10 * i, **kw) for i, (name, kw) in enumerate(ALGOS.items())}


def weights_of(pipe):
    return {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder")
            for n, p in getattr(pipe, c).named_parameters()}


def single(pipe, sd, weight=1.0):
    da.load(pipe, sd, "single", weight=weight)
    try:
        return weights_of(pipe)
    finally:
        da.unload(pipe)


@pytest.mark.parametrize("pair", [("lora", "loha"), ("loha", "lokr"), ("lora", "full"), ("lokr", "lora")])
@pytest.mark.parametrize("wa,wb", [(1.0, 1.0), (0.6, 0.4), (-0.5, 1.5)])
def test_additive_stack_is_the_weighted_sum(pipe, files, pair, wa, wb):
    base = weights_of(pipe)
    da_a, da_b = single(pipe, files[pair[0]]), single(pipe, files[pair[1]])
    da.load(pipe, files[pair[0]], "a", weight=wa)
    da.load(pipe, files[pair[1]], "b", weight=wb)
    try:
        got = weights_of(pipe)
    finally:
        da.unload(pipe)
    for k, w0 in base.items():
        expected = w0 + wa * (da_a[k] - w0) + wb * (da_b[k] - w0)
        assert (got[k] - expected).abs().max().item() <= 2e-6, k


@pytest.mark.parametrize("transform", ["oft", "dora"])
def test_transforms_act_on_the_sum_of_additive_adapters(pipe, files, transform):
    """Documented order: additive deltas first, then OFT rotations / DoRA re-normalisation."""
    da.load(pipe, files["lora"], "a", weight=0.7)
    da.load(pipe, files[transform], "t", weight=1.0)
    try:
        got = weights_of(pipe)
        reg = da.adapters(pipe)
        assert set(reg) == {"a", "t"}
    finally:
        da.unload(pipe)
    # the same composition built by hand from the parsed params
    from diffadapt.api import read_spec
    from diffadapt.pipeline import resolve

    lora = {t.module_name: t.patch.params for t in resolve(pipe, read_spec(files["lora"])) if t.component == "unet"}
    for t in resolve(pipe, read_spec(files[transform])):
        if t.component != "unet":
            continue
        w = t.module.weight.detach().float()
        if t.module_name in lora:
            w = lora[t.module_name].apply(w, 0.7)
        w = t.patch.params.apply(w, 1.0)
        assert (got[f"unet.{t.module_name}.weight"] - w).abs().max().item() <= 2e-6


@pytest.mark.parametrize("name", list(ALGOS))
def test_weight_zero_is_identity_and_negative_mirrors(pipe, files, name):
    hashes = param_hashes(pipe)
    da.load(pipe, files[name], "x", weight=0.0)
    assert param_hashes(pipe) == hashes
    if name in ADDITIVE:
        base = weights_of(pipe)
        da.set_weights(pipe, {"x": 1.0})
        plus = weights_of(pipe)
        da.set_weights(pipe, {"x": -1.0})
        minus = weights_of(pipe)
        for k in base:
            assert (minus[k] - (2 * base[k] - plus[k])).abs().max().item() <= 2e-6
    da.unload(pipe)
    assert param_hashes(pipe) == hashes


def test_per_component_weights_hit_only_that_component(pipe, files):
    base = weights_of(pipe)
    da.load(pipe, files["lora"], "x", weight={"unet": 0.0, "text_encoder": 1.0})
    try:
        got = weights_of(pipe)
        assert all(torch.equal(got[k], base[k]) for k in got if k.startswith("unet."))
        assert any(not torch.equal(got[k], base[k]) for k in got if k.startswith("text_encoder."))
        da.set_weights(pipe, {"x": {"default": 0.0, "unet": 0.5}})
        got = weights_of(pipe)
        assert all(torch.equal(got[k], base[k]) for k in got if k.startswith("text_encoder."))
    finally:
        da.unload(pipe)


BLOCKS = [
    ({"down": [0, 0], "mid": 0, "up": [1, 0], "default": 0}, {("up", 0)}),
    ({"down": [0, 1], "mid": 0, "up": [0, 0], "default": 0}, {("down", 1)}),
    ({"down": 0, "mid": 1, "up": 0, "default": 0}, {("mid", None)}),
    ({"down": 0, "mid": 0, "up": 0, "default": 1}, {None}),
]


@pytest.mark.parametrize("spec,changed", BLOCKS)
def test_block_weights_apply_to_every_layer_of_the_block(pipe, files, spec, changed):
    base = weights_of(pipe)
    single_ = single(pipe, files["lora"])
    da.load(pipe, files["lora"], "x", weight={"unet": spec, "text_encoder": 0})
    try:
        got = weights_of(pipe)
    finally:
        da.unload(pipe)
    kinds = set()
    for k in got:
        if not k.startswith("unet."):
            continue
        block = block_of(k[len("unet."):])
        touched = not torch.equal(single_[k], base[k])
        if block in changed or (None in changed and block is None):
            assert torch.equal(got[k], single_[k]), k  # weight 1 on that block: the full adapter
            kinds.add(("conv" if got[k].dim() == 4 else "linear") if touched else None)
        else:
            assert torch.equal(got[k], base[k]), k
    assert "conv" in kinds or changed == {("mid", None)} or "linear" in kinds


def test_enable_disable_keep_weights(pipe, files):
    hashes = param_hashes(pipe)
    da.load(pipe, files["lora"], "a", weight=0.5)
    da.load(pipe, files["lokr"], "b", weight=0.3)
    both = param_hashes(pipe)
    da.disable(pipe)
    assert param_hashes(pipe) == hashes
    assert {n: i.weight for n, i in da.adapters(pipe).items()} == {"a": 0.5, "b": 0.3} and not da.adapters(pipe)["a"].enabled
    da.enable(pipe)
    assert param_hashes(pipe) == both
    da.disable(pipe, "b")
    da.unload(pipe, "a")
    assert param_hashes(pipe) == hashes
    da.unload(pipe)


BAD = [
    ({"x": {"vae": 1.0}}, "unknown component"),
    ({"x": {"unet": {"down": [1, 1, 1]}}}, "3 values for 2 down blocks"),
    ({"x": {"unet": {"sideways": 1}}}, "unknown block kind"),
    ({"x": "strong"}, "expected a finite number"),
    ({"x": float("nan")}, "expected a finite number"),
]


@pytest.mark.parametrize("request_,message", BAD)
def test_bad_weights_are_refused_and_change_nothing(pipe, files, request_, message):
    da.load(pipe, files["lora"], "x", weight=0.5)
    try:
        hashes = param_hashes(pipe)
        with pytest.raises(WeightError, match=message):
            da.set_weights(pipe, request_)
        assert param_hashes(pipe) == hashes and da.adapters(pipe)["x"].weight == 0.5
        with pytest.raises(da.AdapterNotFoundError):
            da.set_weights(pipe, {"x": 1.0, "nope": 1.0})
        assert param_hashes(pipe) == hashes
    finally:
        da.unload(pipe)
