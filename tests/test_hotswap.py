"""Hotswap in patch mode: equal to a fresh load, failure-atomic, any method and module set, no recompilation."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import save_file

import diffadapt as da
from diffadapt import backends
from diffadapt.backends import patch
from diffadapt.fixtures import pipeline_file
from diffadapt.pipeline import registry
from diffadapt.testing import param_hashes, tiny_sd1_pipeline

ATTN, RESNETS = dict(target_modules=["Transformer2DModel"], target_names=[]), dict(target_modules=["ResnetBlock2D"])
FILES = {  # name: (lycoris_network kwargs, components)
    "lora": (dict(algo="lora", rank=4, alpha=2), ("unet", "text_encoder")),
    "lora8": (dict(algo="lora", rank=8, alpha=1), ("unet", "text_encoder")),
    "loha": (dict(algo="loha", std=0.3), ("unet", "text_encoder")),
    "lokr": (dict(algo="lokr", std=0.2), ("unet", "text_encoder")),
    "oft": (dict(algo="diag-oft", block_size=4), ("unet", "text_encoder")),
    "full": (dict(algo="full", std=0.01), ("unet", "text_encoder")),
    "dora": (dict(algo="lora", weight_decompose=True), ("unet",)),
    "attn": (dict(algo="lora", **ATTN), ("unet",)),
    "resnets": (dict(algo="loha", std=0.3, **RESNETS), ("unet",)),
    "te": (dict(algo="lokr", std=0.2), ("text_encoder",)),
    "rotate": (dict(algo="diag-oft", block_size=4, **ATTN), ("unet",)),
}
TOL = 1e-6


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


@pytest.fixture(scope="module")
def files(pipe):
    return {name: pipeline_file(pipe, components=comps, seed=10 * i, **kw)
            for i, (name, (kw, comps)) in enumerate(FILES.items())}


def weights_of(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder")
            for n, p in getattr(pipe, c).named_parameters()}


def assert_close(got: dict, expected: dict, tol: float = TOL) -> None:
    bad = [k for k in expected if (got[k] - expected[k]).abs().max().item() > tol]
    assert not bad, f"{len(bad)} parameters differ, e.g. {bad[:3]}"


def fresh(pipe, stack: list[tuple[str, dict, float]]) -> dict[str, torch.Tensor]:
    """Weights after loading ``stack`` (name, file, weight) in order on a clean pipeline; left clean again."""
    for name, sd, w in stack:
        da.load(pipe, sd, name, weight=w)
    try:
        return weights_of(pipe)
    finally:
        da.unload(pipe)


def slots(pipe) -> list:
    return [m for c in (pipe.unet, pipe.text_encoder) for m in c.modules() if patch.existing_slot(m) is not None]


# -- eager ---------------------------------------------------------------------------------------------

SWAPS = [("lora", "lora8"), ("lora", "loha"), ("loha", "lokr"), ("lokr", "oft"), ("oft", "full"), ("full", "dora"),
         ("lora", "attn"), ("attn", "resnets"), ("lora", "te"), ("te", "lora"), ("dora", "oft")]


@pytest.mark.parametrize("a,b", SWAPS)
def test_hotswap_equals_fresh_load_and_unloads_bit_exactly(pipe, files, a, b):
    """Another method, rank, alpha or module set; the swapped adapter keeps its weight and stack position."""
    base = param_hashes(pipe)
    da.load(pipe, files[a], "x", weight=0.7)
    da.load(pipe, files["rotate"], "y")  # a transform after x: order matters
    info = da.hotswap(pipe, files[b], "x")
    got = weights_of(pipe)
    assert info.methods == da.inspect(files[b]).methods and da.adapters(pipe)["x"].weight == 0.7
    assert list(da.adapters(pipe)) == ["x", "y"]
    da.unload(pipe)
    assert param_hashes(pipe) == base and not slots(pipe)
    assert_close(got, fresh(pipe, [("x", files[b], 0.7), ("y", files["rotate"], 1.0)]))


def test_modules_left_untargeted_keep_their_buffer_and_get_the_originals(pipe, files):
    base, originals = param_hashes(pipe), {n: p.data_ptr() for n, p in pipe.text_encoder.named_parameters()}
    da.load(pipe, files["lora"], "x")
    patched = {n: p.data_ptr() for n, p in pipe.text_encoder.named_parameters()}
    assert patched == originals  # written in place
    for step in ["attn", "te", "attn", "lora"]:  # TE: parked, patched, parked, patched — always in place
        da.hotswap(pipe, files[step], "x")
        te = {k: v for k, v in param_hashes(pipe).items() if k.startswith("text_encoder.")}
        assert (te == {k: base[k] for k in te}) == (step == "attn"), step
        assert {n: p.data_ptr() for n, p in pipe.text_encoder.named_parameters()} == patched, step
    got = weights_of(pipe)
    da.unload(pipe)
    assert param_hashes(pipe) == base and not slots(pipe)
    assert {n: p.data_ptr() for n, p in pipe.text_encoder.named_parameters()} == originals
    assert_close(got, fresh(pipe, [("x", files["lora"], 1.0)]))


def first(sd: dict, suffix: str) -> str:
    return next(k for k in sd if k.endswith(suffix))


def widened(sd: dict) -> dict:
    """Consistent LoHa factors with one output row too many for their module."""
    k = first(sd, "hada_w1_a")
    return {**sd, **{x: torch.zeros(sd[x].shape[0] + 1, sd[x].shape[1]) for x in (k, k.replace("w1_a", "w2_a"))}}


def written(sd: dict, path, *, cut: bool = False):
    torch.save(sd, path) if path.suffix == ".ckpt" else save_file(sd, path)
    if cut:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


BAD = {  # what goes wrong: (a bad source made from a valid LoHa state dict and a folder, the error)
    "missing": (lambda sd, tmp: tmp / "missing.safetensors", da.SourceError),
    "keys": (lambda sd, tmp: {k.replace("lora_unet_", "lora_unet_nowhere_"): v for k, v in sd.items()},
             da.KeyMappingError),
    "shape": (lambda sd, tmp: widened(sd), da.ShapeError),
    "nan": (lambda sd, tmp: {**sd, first(sd, "w1_a"): sd[first(sd, "w1_a")] * float("nan")}, da.NonFiniteError),
    "pickle": (lambda sd, tmp: written(sd, tmp / "a.ckpt"), da.PickleRefusedError),
    "truncated": (lambda sd, tmp: written(sd, tmp / "a.safetensors", cut=True), da.FormatError),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_failed_hotswap_changes_nothing(pipe, files, tmp_path, kind):
    da.load(pipe, files["lora"], "x", weight=0.5)
    try:
        before, record = param_hashes(pipe), vars(registry(pipe).adapters["x"]).copy()
        make, error = BAD[kind]
        with pytest.raises(error):
            da.hotswap(pipe, make(files["loha"], tmp_path), "x")
        assert param_hashes(pipe) == before and vars(registry(pipe).adapters["x"]) == record
    finally:
        da.unload(pipe)


def test_failure_while_writing_rolls_back(pipe, files, monkeypatch):
    base = param_hashes(pipe)
    da.load(pipe, files["lora"], "x")
    before, calls, write = param_hashes(pipe), [], patch.Slot.write

    def flaky(self, **kw):
        calls.append(1)
        if len(calls) == 20:
            raise RuntimeError("out of memory")
        return write(self, **kw)

    monkeypatch.setattr(patch.Slot, "write", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        da.hotswap(pipe, files["resnets"], "x")
    assert param_hashes(pipe) == before and da.adapters(pipe)["x"].methods == da.inspect(files["lora"]).methods
    da.hotswap(pipe, files["resnets"], "x")
    da.unload(pipe)
    assert param_hashes(pipe) == base and not slots(pipe)


def test_other_modes_dispatch_to_their_backend_or_refuse(pipe, files, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(NAME="fake", apply=lambda loaded: None, remove=lambda loaded: None,
                                 refresh=lambda loaded_list: None)
    monkeypatch.setitem(backends.BACKENDS, "fake", fake)
    da.load(pipe, files["lora"], "x", mode="fake")
    try:
        with pytest.raises(da.UnsupportedError, match="mode='fake'"):
            da.hotswap(pipe, files["loha"], "x")
        fake.hotswap = lambda loaded, targets: calls.append((loaded.name, len(targets)))
        info = da.hotswap(pipe, files["loha"], "x")
        assert calls == [("x", len(registry(pipe).adapters["x"].targets))] and info.methods == {"loha": calls[0][1]}
        with pytest.raises(da.AdapterNotFoundError):
            da.hotswap(pipe, files["loha"], "nope")
    finally:
        da.unload(pipe)


# -- under torch.compile -------------------------------------------------------------------------------

STEPS = [("swap", "lora8"), ("swap", "loha"), ("swap", "lokr"), ("swap", "oft"), ("swap", "full"), ("swap", "dora"),
         ("swap", "attn"), ("swap", "te"), ("swap", "resnets"), ("weight", 0.4), ("swap", "lora"),
         ("weight", {"unet": -0.5, "text_encoder": 1.5}), ("weight", 0.0), ("weight", 1.0), ("unload", None)]
G = torch.Generator().manual_seed(1)
UNET_IN = (torch.randn(1, 4, 8, 8, generator=G), torch.tensor([500]), torch.randn(1, 7, 32, generator=G))
TE_IN = torch.tensor([[0, 5, 9, 14, 22, 31, 2]])


def outputs(unet, te) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return unet(*UNET_IN).sample, te(TE_IN)[0]


def counting(backend: str, counter: list):
    compiler = torch._dynamo.lookup_backend(backend)

    def compile_(gm, example_inputs):
        counter.append(gm)
        return compiler(gm, example_inputs)

    return compile_


def compiled(pipe, backend: str, counter: list, *, text_encoder: bool = True):
    """Compile as diffusers users do (``pipe.unet = torch.compile(pipe.unet)``); adapters then go through it."""
    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, backend=counting(backend, counter))
    if text_encoder:
        pipe.text_encoder = torch.compile(pipe.text_encoder, backend=counting(backend, counter))
    return pipe.unet, pipe.text_encoder


def run_steps(pipe, ref, files, unet, te, steps, *, tol: float) -> None:
    """Apply each step to the compiled pipeline; compare with a fresh eager load of the same state on ``ref``."""
    current, weight = "lora", 1.0
    for kind, arg in steps:
        if kind == "load":
            with torch.inference_mode():  # servers often load under inference mode: no inference tensor may leak
                da.load(pipe, files[arg], "x")
            current = arg
        elif kind == "swap":
            da.hotswap(pipe, files[arg], "x")
            current = arg
        elif kind == "weight":
            da.set_weights(pipe, {"x": arg})
            weight = arg
        else:
            da.unload(pipe)
        if kind != "unload":
            da.load(ref, files[current], "x", weight=weight)
        expected = outputs(ref.unet, ref.text_encoder)
        da.unload(ref)
        for got, want, what in zip(outputs(unet, te), expected, ("unet", "text encoder")):
            assert (got - want).abs().max().item() <= tol, f"{kind} {arg}: {what}"


@pytest.mark.parametrize("when", ["compiled with the adapter", "compiled before loading, channels_last"])
def test_compiled_swaps_reweights_and_unload_never_recompile(files, when):
    pipe, ref, counter = tiny_sd1_pipeline(), tiny_sd1_pipeline(), []
    before = when.startswith("compiled before")
    if before:
        pipe.unet.to(memory_format=torch.channels_last)
    else:
        da.load(pipe, files["lora"], "x")
    unet, te = compiled(pipe, "eager", counter)  # guards are dynamo's whatever the backend: the cheapest one
    outputs(unet, te)
    graphs = len(counter)
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_steps(pipe, ref, files, unet, te, [("load", "lora")] * before + STEPS, tol=1e-5)
    assert len(counter) == graphs


@pytest.mark.slow
def test_inductor_swaps_never_recompile(files):
    pipe, ref, counter = tiny_sd1_pipeline(), tiny_sd1_pipeline(), []
    da.load(pipe, files["lora"], "x")
    unet, te = compiled(pipe, "inductor", counter, text_encoder=False)
    outputs(unet, te)
    graphs = len(counter)
    steps = [("swap", "loha"), ("swap", "attn"), ("weight", 0.5), ("swap", "oft"), ("unload", None)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_steps(pipe, ref, files, unet, te, steps, tol=1e-4)
    assert len(counter) == graphs
