"""Hotswap in inject mode: prepared (padded, tensor-scaled) peft layers take other LoRA / LoHa files in place.

Eager: a swap equals a fresh inject load of the new file, unload leaves the base bit-exact, refused swaps
change nothing. Compiled (eager backend, error_on_recompile): swaps to other ranks, alphas, mixed per-module
ranks and fewer modules, and re-weights, on the UNet and on the text encoder (which diffusers cannot hotswap).
"""

from __future__ import annotations

import pytest
import torch

import diffadapt as da
from diffadapt import peft_bridge as peft_layers
from diffadapt.fixtures import pipeline_file
from diffadapt.pipeline import registry
from diffadapt.testing import param_hashes, tiny_sd1_pipeline

pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # peft's LoHa on tensor scalings

ATTN = dict(target_modules=["Transformer2DModel"], target_names=[])
FILES = {  # name: (lycoris_network kwargs, components)
    "a": (dict(algo="lora", rank=4, alpha=2), ("unet", "text_encoder")),
    "b": (dict(algo="lora", rank=8, alpha=1), ("unet", "text_encoder")),
    "c": (dict(algo="lora", rank=2, alpha=3), ("unet", "text_encoder")),
    "r16": (dict(algo="lora", rank=16, alpha=4), ("unet",)),
    "attn": (dict(algo="lora", rank=6, alpha=5, **ATTN), ("unet",)),
    "loha": (dict(algo="loha", rank=4, alpha=2, std=0.3), ("unet", "text_encoder")),
    "loha2": (dict(algo="loha", rank=2, alpha=1, std=0.3), ("unet", "text_encoder")),
    "lokr": (dict(algo="lokr", std=0.2), ("unet",)),
    "dora": (dict(algo="lora", weight_decompose=True), ("unet",)),
}
TOL = 1e-5
G = torch.Generator().manual_seed(1)
UNET_IN = (torch.randn(1, 4, 8, 8, generator=G), torch.tensor([500]), torch.randn(1, 7, 32, generator=G))
TE_IN = torch.tensor([[0, 5, 9, 14, 22, 31, 2]])


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


@pytest.fixture(scope="module")
def ref():
    return tiny_sd1_pipeline()


@pytest.fixture(scope="module")
def files(pipe):
    out = {name: pipeline_file(pipe, components=comps, seed=10 * i, **kw)
           for i, (name, (kw, comps)) in enumerate(FILES.items())}
    # mixed per-module ranks (8 and 2) and alphas: every other module from "b", the rest from "c"
    modules = sorted({k.split(".")[0] for k in out["b"]})
    pick = {m: ("b" if i % 2 else "c") for i, m in enumerate(modules)}
    out["mixed"] = {k: v for k, v in out["b"].items() if pick[k.split(".")[0]] == "b"}
    out["mixed"].update({k: v for k, v in out["c"].items() if pick[k.split(".")[0]] == "c"})
    return out


def outputs(unet, te) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return unet(*UNET_IN).sample, te(TE_IN)[0]


def fresh(ref, sd: dict, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of a fresh eager inject load of ``sd`` at ``weight``; ``ref`` is left clean."""
    da.load(ref, sd, "x", mode="inject", weight=weight)
    try:
        return outputs(ref.unet, ref.text_encoder)
    finally:
        da.unload(ref)


def assert_close(got, want, what: str) -> None:
    for g, w, part in zip(got, want, ("unet", "text encoder")):
        assert (g - w).abs().max().item() <= TOL, f"{what}: {part}"


def no_peft_left(pipe) -> bool:
    return not any(peft_layers.is_layer(m) for c in (pipe.unet, pipe.text_encoder) for m in c.modules())


# -- eager ---------------------------------------------------------------------------------------------

SWAPS = [("a", "b", 0.7), ("a", "mixed", 1.0), ("b", "attn", -0.6), ("attn", "attn", 1.3), ("loha", "loha2", 0.8),
         ("c", "a", 0.0)]


@pytest.mark.parametrize("a,b,w", SWAPS)
def test_swap_equals_fresh_inject_load_and_unloads_bit_exactly(pipe, ref, files, a, b, w):
    base = param_hashes(pipe)
    da.load(pipe, files[a], "x", mode="inject", weight=w)
    assert da.prepare_hotswap(pipe, max_rank=8) == ["x"]
    assert_close(outputs(pipe.unet, pipe.text_encoder), fresh(ref, files[a], w), "prepared")
    info = da.hotswap(pipe, files[b], "x")
    assert info.mode == "inject" and da.adapters(pipe)["x"].weight == w
    assert_close(outputs(pipe.unet, pipe.text_encoder), fresh(ref, files[b], w), "swapped")
    da.set_weights(pipe, {"x": {"unet": 0.5, "text_encoder": -1.0}})
    assert_close(outputs(pipe.unet, pipe.text_encoder),
                 fresh(ref, files[b], {"unet": 0.5, "text_encoder": -1.0}), "re-weighted")
    da.unload(pipe)
    assert param_hashes(pipe) == base and no_peft_left(pipe)


REFUSED = {  # (loaded, max_rank, new file, message)
    "not prepared": ("a", None, "b", "prepare_hotswap"),
    "rank above max_rank": ("a", 8, "r16", "max_rank=8"),
    "other method": ("a", 8, "loha", "LOHA where the adapter holds LORA"),
    "new modules": ("attn", 8, "a", "modules the adapter has no layer on"),
    "dora": ("a", 8, "dora", "DoRA"),
    "lokr": ("a", 8, "lokr", "LOKR"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_refused_swap_changes_nothing(pipe, files, kind):
    old, max_rank, new, message = REFUSED[kind]
    da.load(pipe, files[old], "x", mode="inject", weight=0.5)
    try:
        if max_rank:
            da.prepare_hotswap(pipe, max_rank=max_rank)
        before, record = param_hashes(pipe), vars(registry(pipe).adapters["x"]).copy()
        out = outputs(pipe.unet, pipe.text_encoder)
        with pytest.raises(da.UnsupportedError, match=message):
            da.hotswap(pipe, files[new], "x")
        assert param_hashes(pipe) == before and vars(registry(pipe).adapters["x"]) == record
        assert all(torch.equal(g, w) for g, w in zip(outputs(pipe.unet, pipe.text_encoder), out))
    finally:
        da.unload(pipe)


@pytest.mark.parametrize("loaded,max_rank,message", [("lokr", 8, "LOKR"), ("dora", 8, "DoRA"), ("b", 4, "rank 8")])
def test_prepare_refuses_what_cannot_be_padded(pipe, files, loaded, max_rank, message):
    da.load(pipe, files[loaded], "x", mode="inject")
    try:
        before = param_hashes(pipe)
        with pytest.raises(da.UnsupportedError, match=message):
            da.prepare_hotswap(pipe, max_rank=max_rank)
        assert param_hashes(pipe) == before
    finally:
        da.unload(pipe)


# -- under torch.compile -------------------------------------------------------------------------------


def counting(counter: list):
    compiler = torch._dynamo.lookup_backend("eager")  # recompiles are decided by dynamo's guards, not the backend

    def compile_(gm, example_inputs):
        counter.append(gm)
        return compiler(gm, example_inputs)

    return compile_


STEPS = [("swap", "b"), ("swap", "mixed"), ("weight", 0.4), ("swap", "c"), ("swap", "attn"),
         ("weight", {"unet": -0.5, "text_encoder": 1.5}), ("swap", "a"), ("weight", 0.0), ("swap", "mixed"),
         ("weight", 1.0)]
LOHA_STEPS = [("swap", "loha2"), ("weight", 0.5), ("swap", "loha"), ("weight", {"unet": 1.2, "text_encoder": -0.3})]


@pytest.mark.parametrize("first,steps", [("a", STEPS), ("loha", LOHA_STEPS)], ids=["lora", "loha"])
def test_compiled_swaps_and_reweights_never_recompile(files, ref, first, steps):
    pipe, counter = tiny_sd1_pipeline(), []
    base = [param_hashes(pipe.unet), param_hashes(pipe.text_encoder)]
    da.load(pipe, files[first], "x", mode="inject")
    da.prepare_hotswap(pipe, max_rank=8)
    # new peft layers follow the model's eval mode (in train mode LoHa/LoKr layers draw module dropout)
    assert not any(m.training for c in (pipe.unet, pipe.text_encoder) for m in c.modules())
    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, backend=counting(counter))
    pipe.text_encoder = torch.compile(pipe.text_encoder, backend=counting(counter))
    unet, te = pipe.unet, pipe.text_encoder
    assert_close(outputs(unet, te), fresh(ref, files[first], 1.0), "compiled")
    graphs = len(counter)
    current, weight = first, 1.0
    with torch._dynamo.config.patch(error_on_recompile=True):
        for kind, arg in steps:
            if kind == "swap":
                with torch.inference_mode():  # servers often swap under inference mode
                    da.hotswap(pipe, files[arg], "x")
                current = arg
            else:
                da.set_weights(pipe, {"x": arg})
                weight = arg
            assert_close(outputs(unet, te), fresh(ref, files[current], weight), f"{kind} {arg}")
    assert len(counter) == graphs
    da.unload(pipe)
    assert [param_hashes(unet._orig_mod), param_hashes(te._orig_mod)] == base and no_peft_left(pipe)
    torch._dynamo.reset()
