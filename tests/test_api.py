"""The public verbs read alike: argument order, names, the format keyword, exported errors, old forms."""

from __future__ import annotations

import inspect
import warnings

import pytest
from safetensors.torch import load_file

import diffadapt as da
from diffadapt import errors
from diffadapt.fixtures import lycoris_file
from diffadapt.testing import param_hashes, tiny_sd1_pipeline


@pytest.fixture(scope="module")
def setup():
    pipe = tiny_sd1_pipeline()
    files = {algo: lycoris_file(pipe.text_encoder, prefix="lora_te", algo=algo, std=0.2)[0]
             for algo in ("lora", "loha")}
    return pipe, files


def test_every_error_class_is_exported():
    classes = {n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, Exception)}
    assert classes <= set(da.__all__) and all(getattr(da, n) is getattr(errors, n) for n in classes)
    assert {"WeightError", "PromptError", "NameInUseError"} <= classes
    assert issubclass(da.AdapterNotFoundError, KeyError) and issubclass(da.AdapterNotFoundError, ValueError)
    assert da.get_weights is da.api.get_weights  # one definition: a view of da.adapters


def test_names_are_handled_alike(setup):
    pipe, files = setup
    hashes = param_hashes(pipe)
    for name in "abc":
        da.load(pipe, files["lora"], name)
    with pytest.raises(da.NameInUseError, match="'a'"):
        da.load(pipe, files["lora"], "a")
    with pytest.raises(da.AdapterNotFoundError, match="nope"):  # checked before anything is removed
        da.unload(pipe, "a", "nope")
    assert list(da.adapters(pipe)) == ["a", "b", "c"]
    da.disable(pipe, ["a", "b"])
    assert [i.enabled for i in da.adapters(pipe).values()] == [False, False, True]
    da.enable(pipe, "a", "b")
    da.unload(pipe, "a", "b")
    assert list(da.adapters(pipe)) == ["c"]
    with pytest.warns(DeprecationWarning, match="positionally"):
        da.unload(pipe, name="c")
    assert da.adapters(pipe) == {} and param_hashes(pipe) == hashes


def test_hotswap_takes_loads_order(setup):
    pipe, files = setup
    da.load(pipe, files["lora"], "x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(da.hotswap(pipe, files["loha"], "x").methods) == {"loha"}
        assert set(da.hotswap(pipe, source=files["lora"], name="x").methods) == {"lora"}
    da.load(pipe, files["loha"], "y")
    with pytest.warns(DeprecationWarning, match="load's order"):  # the old (pipe, name, source) order
        assert set(da.hotswap(pipe, "x", files["loha"]).methods) == {"loha"}
    with pytest.raises(da.AdapterNotFoundError):
        da.hotswap(pipe, files["loha"], "nope")
    da.unload(pipe)


def test_format_keyword_for_save_and_convert(setup, tmp_path):
    pipe, files = setup
    da.convert(files["loha"], tmp_path / "new.safetensors", format="kohya")
    with pytest.warns(DeprecationWarning, match="format="):
        da.convert(files["loha"], tmp_path / "old.safetensors", to="kohya")
    new, old = load_file(str(tmp_path / "new.safetensors")), load_file(str(tmp_path / "old.safetensors"))
    assert new.keys() == old.keys() and all(new[k].equal(old[k]) for k in new)
    with pytest.raises(da.DiffAdaptError, match="disagree"), pytest.warns(DeprecationWarning):
        da.convert(files["loha"], tmp_path / "x.safetensors", format="kohya", to="peft")
    with pytest.raises(da.DiffAdaptError, match="format="):
        da.convert(files["loha"], tmp_path / "x.safetensors")
    assert "format" in inspect.signature(da.save).parameters
