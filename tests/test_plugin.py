"""``da.plugin``: diffusers' own LoRA API on a pipeline, for every format.

References: LyCORIS's forward for LyCORIS files; for kohya LoRA, stock diffusers (its loader, peft layers,
``set_adapters`` / ``fuse_lora`` / ``delete_adapters`` bookkeeping) on an identical unplugged pipeline.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import diffadapt as da
from peft import LoKrConfig

from diffadapt.fixtures import TEXT_MODULES, lycoris_file, peft_file
from diffadapt.testing import param_hashes, tiny_sd1_pipeline, tiny_sdxl_pipeline

IDS = torch.tensor([[0, 5, 9, 14, 22, 31, 2]])
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def outputs(pipe) -> dict[str, torch.Tensor]:
    """Each adaptable component's output on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    unet = pipe.unet
    x = torch.randn(1, 4, 8, 8, generator=g)
    c = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 64, generator=g),
                                       "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    with torch.no_grad():
        out = {"unet": unet(x, torch.tensor([500]), c, **kwargs).sample}
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                out[name] = getattr(pipe, name)(IDS)[0]
    return out


def max_err(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def lycoris_pipeline_file(pipe, prefixes, *, seed: int = 0, **kw):
    """(kohya-named LyCORIS file over the pipeline's components, {component: LyCORIS reference module})."""
    sd, refs = {}, {}
    for i, (comp, prefix) in enumerate(prefixes.items()):
        part, refs[comp] = lycoris_file(getattr(pipe, comp), prefix=prefix, seed=seed + i, **kw)
        sd.update(part)
    return sd, refs


def peft_unet_file(pipe, config):
    """diffusers-style single PEFT file for the UNet (``unet.<module>.lokr_w1`` …, its config in the metadata),
    made by peft; the reference is peft's model."""
    sd, ref = peft_file(pipe.unet, config, std=0.2)
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    return {f"unet.{k}": v for k, v in sd.items()}, {"unet": ref}, {"peft_config": json.dumps({"unet": cfg})}


SD1 = {k: PREFIXES[k] for k in ("unet", "text_encoder")}
ROUND_TRIP = {  # name: (pipeline, file maker)
    "sd1-lora": (tiny_sd1_pipeline, lambda p: lycoris_pipeline_file(p, SD1, algo="lora")),
    "sd1-loha": (tiny_sd1_pipeline, lambda p: lycoris_pipeline_file(p, SD1, algo="loha", std=0.3)),
    "sd1-lokr": (tiny_sd1_pipeline, lambda p: lycoris_pipeline_file(p, SD1, algo="lokr", std=0.2)),
    "sd1-oft": (tiny_sd1_pipeline, lambda p: lycoris_pipeline_file(p, SD1, algo="diag-oft", block_size=4)),
    "sd1-peft-lokr": (tiny_sd1_pipeline, lambda p: peft_unet_file(p, LoKrConfig(
        r=4, alpha=8, target_modules=["to_q", "to_v", "proj_in"], init_weights=False))),
    "sdxl-loha": (tiny_sdxl_pipeline, lambda p: lycoris_pipeline_file(p, SDXL_PREFIXES, algo="loha", std=0.3)),
}


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_diffusers_round_trip_is_exact(case, tmp_path):
    """load → set_adapters → fuse → unfuse → unload through the pipeline's own methods; base bit-exact."""
    build, make = ROUND_TRIP[case]
    pipe = da.plugin(build())
    sd, refs, *metadata = make(pipe)
    prefixes = refs
    path = tmp_path / "style.safetensors"
    save_file(sd, str(path), metadata=metadata[0] if metadata else None)
    hashes, base = param_hashes(pipe), outputs(pipe)

    pipe.load_lora_weights(str(path))  # diffusers' default name
    assert pipe.get_active_adapters() == ["default_0"]
    assert pipe.get_list_adapters() == {c: ["default_0"] for c in prefixes}
    full = outputs(pipe)
    for comp, ref in refs.items():  # LyCORIS's own forward at multiplier 1
        if comp == "unet":
            expected = outputs(_with_unet(ref))["unet"]
        else:
            with torch.no_grad():
                expected = ref(IDS)[0]
        assert (full[comp] - expected).abs().max().item() <= 1e-5, comp
    assert (full["unet"] - base["unet"]).abs().max().item() > 1e-3

    pipe.set_adapters(["default_0"], adapter_weights=[0.5])
    half = outputs(pipe)
    assert max_err(half, full) > 1e-4 and max_err(half, base) > 1e-4
    pipe.disable_lora()
    assert max_err(outputs(pipe), base) == 0.0
    pipe.enable_lora()
    pipe.fuse_lora()
    assert pipe.fused_loras == {"default_0"} and pipe.num_fused_loras == 1
    assert max_err(outputs(pipe), half) == 0.0
    pipe.set_adapters("default_0", 1.0)  # a fused adapter keeps the weight it was fused at
    assert max_err(outputs(pipe), half) == 0.0
    pipe.unfuse_lora()
    assert pipe.fused_loras == set()
    assert max_err(outputs(pipe), full) <= 1e-6
    pipe.unload_lora_weights()
    assert param_hashes(pipe) == hashes
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == [] and da.adapters(pipe) == {}


def _with_unet(unet):
    """A stand-in pipeline carrying only a UNet (the LyCORIS reference)."""
    return type("P", (), {"unet": unet})()


def _pair(tmp_path):
    """Two identical SD1 pipelines (one plugged) and two kohya LoRA files made by LyCORIS."""
    stock, ours = tiny_sd1_pipeline(), da.plugin(tiny_sd1_pipeline())
    # attention, resnets and samplers: the layers diffusers' per-block weights resolve by rule
    targets = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", *TEXT_MODULES]
    paths = []
    for seed in (0, 10, 20):
        sd, _ = lycoris_pipeline_file(stock, {"unet": "lora_unet", "text_encoder": "lora_te"}, algo="lora",
                                      target_modules=targets, target_names=[], seed=seed)
        paths.append(tmp_path / f"lora{seed}.safetensors")
        save_file(sd, str(paths[-1]))
    return stock, ours, [str(p) for p in paths]


def test_kohya_lora_matches_stock_diffusers(tmp_path):
    """Every call, on a plugged pipeline and on stock diffusers: same outputs, same adapter bookkeeping."""
    stock, ours, (a, b, c) = _pair(tmp_path)
    hashes = param_hashes(ours)

    def same(step: str, tol: float = 1e-5) -> None:
        err = max_err(outputs(ours), outputs(stock))
        assert err <= tol, f"{step}: {err}"
        assert ours.get_active_adapters() == stock.get_active_adapters(), step
        assert ours.get_list_adapters() == stock.get_list_adapters(), step
        assert ours.fused_loras == stock.fused_loras, step

    steps = [
        ("load a", lambda p: p.load_lora_weights(a, adapter_name="a")),
        ("load b (default name, only it active)", lambda p: p.load_lora_weights(b)),
        ("set both", lambda p: p.set_adapters(["a", "default_1"], [0.5, 0.8])),
        ("per component", lambda p: p.set_adapters(["a", "default_1"],
                                                   [{"unet": 0.3, "text_encoder": 1.2}, -0.5])),
        ("per block", lambda p: p.set_adapters(
            "a", {"unet": {"down": {"block_0": [0.2, 0.6]}, "mid": 0.7, "up": {"block_1": [0.1, 0.5, 0.9]}},
                  "text_encoder": 0.4})),
        ("set both again", lambda p: p.set_adapters(["a", "default_1"], [0.9, 0.6])),
        ("fuse a at 0.7", lambda p: p.fuse_lora(lora_scale=0.7, adapter_names=["a"])),
        ("unfuse (scale stays)", lambda p: p.unfuse_lora()),
        ("disable", lambda p: p.disable_lora()),
        ("enable", lambda p: p.enable_lora()),
        ("fuse unet only", lambda p: p.fuse_lora(components=["unet"])),
        ("unfuse unet", lambda p: p.unfuse_lora(components=["unet"])),
        ("delete a", lambda p: p.delete_adapters("a")),
        ("unload", lambda p: p.unload_lora_weights()),
    ]
    for step, call in steps:
        call(stock)
        call(ours)
        same(step)
    assert param_hashes(ours) == hashes

    for p in (stock, ours):  # fuse → unload keeps the fused LoRA in the weights (diffusers' bake workflow)
        p.load_lora_weights(c, adapter_name="c")
        p.fuse_lora(lora_scale=0.5)
        p.unload_lora_weights()
    same("fuse then unload")
    assert param_hashes(ours) != hashes and da.adapters(ours) == {}


def test_errors_and_unplug(tmp_path):
    pipe = tiny_sd1_pipeline()
    cls = type(pipe)
    da.plugin(pipe)
    assert da.plugin(pipe) is pipe  # idempotent
    sd, _ = lycoris_pipeline_file(pipe, {"unet": "lora_unet"}, algo="lokr", std=0.2)
    save_file(sd, str(tmp_path / "lokr.safetensors"))
    pipe.load_lora_weights(str(tmp_path), weight_name="lokr.safetensors", adapter_name="x")  # diffusers' kwargs
    assert da.adapters(pipe)["x"].source.endswith("lokr.safetensors")
    with pytest.raises(ValueError, match="already in use"):  # diffusers' exception types still catch
        pipe.load_lora_weights(sd, adapter_name="x")
    with pytest.raises(ValueError, match="nope"):
        pipe.set_adapters(["x", "nope"])
    with pytest.raises(da.WeightError, match="Length"):
        pipe.set_adapters(["x"], [0.5, 0.5])
    with pytest.raises(ValueError, match="empty"):
        pipe.fuse_lora(components=[])
    with pytest.raises(da.ComponentError, match="vae"):
        pipe.unfuse_lora(components=["vae"])
    hashes = param_hashes(pipe)
    with pytest.raises(da.DiffAdaptError):  # a LoKr file for another model changes nothing
        pipe.load_lora_weights({"lora_unet_nowhere.lokr_w1": torch.ones(2, 2), "lora_unet_nowhere.lokr_w2":
                                torch.ones(2, 2)})
    assert param_hashes(pipe) == hashes and pipe.get_active_adapters() == ["x"]
    # hotswap through diffusers' flag: another method, same name, weight kept
    pipe.set_adapters("x", 0.5)
    sd2, _ = lycoris_pipeline_file(pipe, {"unet": "lora_unet"}, algo="loha", std=0.3)
    pipe.load_lora_weights(sd2, adapter_name="x", hotswap=True)
    assert set(da.adapters(pipe)["x"].methods) == {"loha"} and da.adapters(pipe)["x"].weight == {"unet": 0.5}

    da.unplug(pipe)
    for name in da.plugin.__globals__["METHODS"]:
        assert name not in pipe.__dict__
        assert getattr(pipe, name).__func__ is getattr(cls, name)
    assert "_merged_adapters" not in pipe.__dict__
    assert list(da.adapters(pipe)) == ["x"]  # what was loaded stays loaded
    da.unload(pipe)
