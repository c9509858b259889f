"""Wan 2.2 A14B: two experts (``transformer`` for the high-noise steps, ``transformer_2`` after the boundary) and
LoRAs shipped in pairs with the same key names. References: stock diffusers' ``load_lora_weights`` (the low-noise
file with ``load_into_transformer_2=True``) + ``set_adapters`` + a generation on an identical tiny pipeline."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import diffadapt as da
from diffadapt.errors import ComponentError
from diffadapt.testing import param_hashes, tiny_wan22_pipeline, tiny_wan_pipeline
from dit_files import lora_file
from safetensors.torch import load_file

TOL = 1e-5


@pytest.fixture(scope="module")
def wan22():
    return tiny_wan22_pipeline()


@pytest.fixture(scope="module")
def pair(wan22):
    """A ComfyUI-named high-noise / low-noise pair (same keys, different values) and a second low-noise file."""
    only = r"^blocks"  # diffusers' Wan converter refuses alphas on top-level modules
    return {name: lora_file(wan22.transformer, "wan", "bfl", alpha=2.0, seed=seed, only=only)
            for name, seed in (("high", 0), ("low", 1), ("low2", 2))}


def frames(pipe, steps: int = 4) -> np.ndarray:
    """A short video from fixed text embeddings (the pipeline's prompt cleaning needs ftfy); both experts run."""
    with torch.no_grad():
        return pipe(prompt_embeds=torch.ones(1, 8, 32) * 0.1, guidance_scale=1.0, height=16, width=16, num_frames=5,
                    num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(0)).frames


def stock(base, files: dict[str, dict], weights=None) -> np.ndarray:
    """diffusers' own result: each file loaded under its name ("low…" ones into transformer_2), then set_adapters."""
    ref = copy.deepcopy(base)
    for name, sd in files.items():
        ref.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name=name,
                              load_into_transformer_2=name.startswith("low"))
    if weights is not None:
        ref.set_adapters(list(files), weights)
    return frames(ref)


def close(a: np.ndarray, b: np.ndarray) -> float:
    err = float(np.abs(a - b).max())
    assert err <= TOL, err
    return err


def test_tiny_wan22_pipeline(wan22):
    assert wan22.config.boundary_ratio == 0.5 and wan22.transformer_2 is not None
    assert param_hashes(wan22) == param_hashes(tiny_wan22_pipeline())  # deterministic
    assert param_hashes(wan22.transformer) != param_hashes(wan22.transformer_2)  # two different experts
    ran = []
    hooks = [m.register_forward_hook(lambda *a, n=n: ran.append(n))
             for n, m in (("high", wan22.transformer), ("low", wan22.transformer_2))]
    try:
        video = frames(wan22)
    finally:
        for h in hooks:
            h.remove()
    first_low = ran.index("low")  # the high-noise expert first, the low-noise one after the boundary
    assert first_low > 0 and set(ran[:first_low]) == {"high"} and set(ran[first_low:]) == {"low"}
    assert video.shape == (1, 5, 16, 16, 3) and np.isfinite(video).all()


@pytest.mark.parametrize("mode", ["patch", "inject"])
def test_pair_matches_diffusers(wan22, pair, mode):
    files = {"high": pair["high"], "low": pair["low"]}
    theirs = stock(wan22, files, [0.8, 0.6])
    pipe = copy.deepcopy(wan22)
    before = param_hashes(pipe)
    da.load(pipe, dict(pair["high"]), "high", weight=0.8, mode=mode)
    info = da.load(pipe, dict(pair["low"]), "low", weight=0.6, mode=mode, into="transformer_2")
    n = len(pair["low"]) // 3
    assert info.components == {"transformer_2": n} and da.adapters(pipe)["high"].components == {"transformer": n}
    assert {t.component for t in da.pipeline.registry(pipe).adapters["low"].targets} == {"transformer_2"}
    close(frames(pipe), theirs)
    # the pair matters: both in the high-noise expert (diffadapt's default, as diffusers') is another video
    wrong = stock(wan22, {"high": pair["high"], "other": pair["low"]}, [0.8, 0.6])
    assert np.abs(wrong - theirs).max() > 1e-3
    da.unload(pipe)
    assert param_hashes(pipe) == before


@pytest.mark.parametrize("mode", ["patch", "inject"])
def test_per_component_weights_enable_disable_match_diffusers(wan22, pair, mode):
    files = {"high": pair["high"], "low": pair["low"]}
    pipe = copy.deepcopy(wan22)
    da.load(pipe, dict(pair["high"]), "high", mode=mode)
    da.load(pipe, dict(pair["low"]), "low", mode=mode, into="transformer_2")
    per = [{"transformer": 0.5, "transformer_2": 2.0}, {"transformer": 3.0, "transformer_2": 0.3}]
    theirs = stock(wan22, files, copy.deepcopy(per))
    da.set_weights(pipe, {"high": per[0], "low": per[1]})  # each adapter takes the entry of its own expert
    close(frames(pipe), theirs)
    da.disable(pipe, "low")
    close(frames(pipe), stock(wan22, {"high": pair["high"]}, [0.5]))
    da.enable(pipe, "low")
    da.set_weights(pipe, {"low": {"transformer_2": 0.0}})
    close(frames(pipe), stock(wan22, files, [0.5, 0.0]))


def test_hotswap_and_fuse_stay_in_their_expert(wan22, pair):
    pipe = copy.deepcopy(wan22)
    before = param_hashes(pipe)
    da.load(pipe, dict(pair["high"]), "high", mode="inject")
    da.load(pipe, dict(pair["low"]), "low", mode="inject", into="transformer_2")
    da.prepare_hotswap(pipe, max_rank=4)
    da.hotswap(pipe, dict(pair["low2"]), "low")  # the same `into` as its load
    assert da.adapters(pipe)["low"].components == {"transformer_2": len(pair["low2"]) // 3}
    theirs = stock(wan22, {"high": pair["high"], "low2": pair["low2"]})
    close(frames(pipe), theirs)
    assert sorted(da.fuse(pipe)) == ["high", "low"]
    close(frames(pipe), theirs)
    da.unload(pipe)
    assert param_hashes(pipe) == before
    patched = copy.deepcopy(wan22)
    da.load(patched, dict(pair["low"]), "low", into="transformer_2")
    da.hotswap(patched, dict(pair["low2"]), "low")
    close(frames(patched), stock(wan22, {"low2": pair["low2"]}))


def test_text_encoder_keys_still_go_to_the_encoder(wan22, pair):
    pipe = copy.deepcopy(wan22)
    g = torch.Generator().manual_seed(3)
    te = {"lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.randn(2, 32, generator=g),
          "lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.randn(32, 2, generator=g)}
    sd = lora_file(wan22.transformer, "wan", "kohya", alpha=2.0, seed=1, only=r"^blocks")  # musubi-tuner names
    high = param_hashes(pipe.transformer)
    info = da.load(pipe, sd | te, "low", into="transformer_2")
    assert info.components == {"transformer_2": len(pair["low"]) // 3, "text_encoder": 1}
    assert param_hashes(pipe.transformer) == high
    assert {t.component for t in da.pipeline.registry(pipe).adapters["low"].targets} == {"transformer_2",
                                                                                          "text_encoder"}


@pytest.mark.parametrize("into, target", [("transformer_2", "wan21"), ("text_encoder", "wan22"),
                                           ("transformer_3", "wan22"), ("transformer_2", "module")])
def test_into_a_component_the_pipeline_lacks_is_refused(wan22, pair, into, target):
    pipe = {"wan21": tiny_wan_pipeline, "wan22": lambda: copy.deepcopy(wan22)}.get(target, lambda: None)()
    obj = wan22.transformer if target == "module" else pipe
    before = param_hashes(obj)
    with pytest.raises(ComponentError, match=f"into={into!r}"):
        da.load(obj, dict(pair["low"]), "low", into=into)
    assert param_hashes(obj) == before and da.adapters(obj) == {}


def test_plugin_pair_matches_stock(wan22, pair):
    pipe = da.plugin(copy.deepcopy(wan22))
    before = param_hashes(pipe)
    ref = copy.deepcopy(wan22)
    for p in (pipe, ref):
        p.load_lora_weights({k: v.clone() for k, v in pair["high"].items()}, adapter_name="high")
        p.load_lora_weights({k: v.clone() for k, v in pair["low"].items()}, adapter_name="low",
                            load_into_transformer_2=True)
    assert pipe.get_list_adapters() == ref.get_list_adapters() == {"transformer": ["high"], "transformer_2": ["low"]}
    close(frames(pipe), frames(ref))  # each file active in its own expert
    for p in (pipe, ref):  # hotswap through diffusers' keyword (before set_adapters: peft's swap resets scales)
        p.load_lora_weights({k: v.clone() for k, v in pair["low2"].items()}, adapter_name="low", hotswap=True,
                            load_into_transformer_2=True)
    close(frames(pipe), frames(ref))
    for weights in ([0.7, 1.3], [{"transformer": 0.4}, {"transformer_2": 1.5}]):
        for p in (pipe, ref):
            p.set_adapters(["high", "low"], copy.deepcopy(weights))
        close(frames(pipe), frames(ref))
    for p in (pipe, ref):  # the expert's own methods, then a fuse of both experts
        p.transformer_2.set_adapters(["low"], weights=[0.3])
    close(frames(pipe), frames(ref))
    for p in (pipe, ref):
        p.fuse_lora(components=["transformer", "transformer_2"], lora_scale=0.5)
    close(frames(pipe), frames(ref))
    for p in (pipe, ref):
        p.unfuse_lora(components=["transformer", "transformer_2"])
        p.disable_lora()
    close(frames(pipe), frames(wan22))
    with pytest.raises(da.NameInUseError, match="'high_2'"):
        pipe.load_lora_weights(dict(pair["low"]), adapter_name="high", load_into_transformer_2=True)
    pipe.unload_lora_weights()
    assert param_hashes(pipe) == before
    with pytest.raises(ComponentError, match="transformer_2"):
        da.plugin(tiny_wan_pipeline()).load_lora_weights(dict(pair["low"]), load_into_transformer_2=True)


@pytest.mark.parametrize("format", ["kohya", "peft"])
def test_saved_low_noise_adapter_has_its_pairs_names(wan22, pair, format, tmp_path):
    """``da.save`` writes a transformer_2 adapter under the names its file used (musubi-tuner's for kohya): the
    pair stays a pair, and the file loads back with ``into="transformer_2"`` to the same weights."""
    pipe = copy.deepcopy(wan22)
    da.load(pipe, dict(pair["low"]), "low", into="transformer_2")
    paths = da.save(pipe, "low", tmp_path / "low", format=format)
    loaded = dict(pipe.transformer_2.named_parameters())
    if format == "kohya":
        musubi = lora_file(wan22.transformer, "wan", "kohya", alpha=2.0, seed=1, only=r"^blocks")
        assert set(load_file(paths[0])) == set(musubi)
    again = copy.deepcopy(wan22)
    info = da.load(again, paths[0], "low", into="transformer_2")
    assert info.components == {"transformer_2": len(pair["low"]) // 3}
    assert param_hashes(again.transformer) == param_hashes(wan22.transformer)
    assert max((p - loaded[k]).abs().max().item() for k, p in again.transformer_2.named_parameters()) <= 1e-6
