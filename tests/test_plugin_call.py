"""Per-call LoRA scale on a plugged pipeline (``cross_attention_kwargs`` / ``joint_attention_kwargs`` ``"scale"``).

Reference: stock diffusers (its loader, peft layers, ``scale_lora_layers`` in the denoiser's forward and in
``encode_prompt``) on an identical unplugged pipeline with the same kohya file, seed and kwargs. LoHa files,
which diffusers cannot load, are checked against the plugin's own ``set_adapters`` weight and the base output.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffadapt as da
from diffadapt.fixtures import TEXT_MODULES, pipeline_file
from diffadapt.testing import generate, param_hashes, tiny_sd1_pipeline
from dit_files import lora_file

SCALES = [0.0, 0.5, 1.3]
TARGETS = {"target_modules": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", *TEXT_MODULES],
           "target_names": []}  # what diffusers' kohya loader reads


def run(pipe, **kwargs) -> np.ndarray:
    return generate(pipe, "a photo of a cat", steps=2, **kwargs)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(stock, plugged) tiny SD1 pipelines, each with kohya LoRAs "a" and "b" over the UNet and text encoder."""
    stock, ours = tiny_sd1_pipeline(), da.plugin(tiny_sd1_pipeline())
    base = run(ours)
    paths = {name: tmp_path_factory.mktemp("lora") / f"{name}.safetensors" for name in ("a", "b")}
    for (name, path), seed in zip(paths.items(), (0, 10)):  # both made before diffusers wraps the layers
        save_file(pipeline_file(stock, algo="lora", seed=seed, **TARGETS), str(path))
    for name, path in paths.items():
        stock.load_lora_weights(str(path), adapter_name=name)
        ours.load_lora_weights(str(path), adapter_name=name)
    return stock, ours, base


@pytest.mark.parametrize("s", SCALES)
def test_sd1_scale_matches_diffusers(sd1, s):
    stock, ours, base = sd1
    for p in (stock, ours):  # again before each call: diffusers resets the weights to 1 after a scale-0 call
        p.set_adapters(["a", "b"], [0.8, -0.5])
    hashes, unscaled = param_hashes(ours), run(ours)
    kwargs = {"cross_attention_kwargs": {"scale": s}}
    ours_out = run(ours, **kwargs)
    assert param_hashes(ours) == hashes  # rewritten back bit for bit
    assert np.abs(ours_out - run(stock, **kwargs)).max() <= 1e-5
    assert np.abs(ours_out - unscaled).max() > 1e-3  # the scale is applied …
    assert (np.abs(ours_out - base).max() == 0.0) == (s == 0.0)  # … and 0 is the base model exactly
    assert kwargs == {"cross_attention_kwargs": {"scale": s}}  # the caller's dict is left alone


def test_sd1_text_encoder_path_and_fused_adapters(sd1):
    """``encode_prompt(lora_scale=)`` scales the text encoder as diffusers does; a fused adapter is not scaled."""
    stock, ours, _ = sd1
    for p in (stock, ours):
        p.set_adapters(["a", "b"], [1.0, 0.7])

    def embeds(p, scale):
        with torch.no_grad():
            return p.encode_prompt("a photo of a cat", "cpu", 1, False, lora_scale=scale)[0]

    unscaled = embeds(ours, None)
    for s in (1.7, 0.0):
        assert (embeds(ours, s) - embeds(stock, s)).abs().max().item() <= 1e-5
        assert (embeds(ours, s) - unscaled).abs().max().item() > 1e-3
    assert torch.equal(embeds(ours, None), unscaled)  # diffusers' unscale at 0 resets b's 0.7 to 1; not here
    assert (embeds(stock, None) - unscaled).abs().max().item() > 1e-3
    stock.set_adapters(["a", "b"], [1.0, 0.7])
    for p in (stock, ours):
        p.fuse_lora(adapter_names=["a"])  # a layer holding a fused adapter runs no other one: b is off there
    hashes = param_hashes(ours)
    out = run(ours, cross_attention_kwargs={"scale": 0.5})
    assert param_hashes(ours) == hashes
    assert np.abs(out - run(stock, cross_attention_kwargs={"scale": 0.5})).max() <= 1e-5
    assert np.abs(out - run(ours)).max() == 0.0  # a is fused, and b shares its layers: nothing to scale
    for p in (stock, ours):
        p.unfuse_lora()


def test_weights_come_back_when_the_call_fails(sd1):
    stock, ours, _ = sd1
    ours.set_adapters(["a", "b"], [0.8, -0.5])
    hashes = param_hashes(ours)

    def stop(*args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(ours, cross_attention_kwargs={"scale": 0.3}, callback_on_step_end=stop)
    assert param_hashes(ours) == hashes and ours.__dict__["_diffadapt_plugin"].calls == []
    with pytest.raises(da.WeightError, match="scale"):
        run(ours, cross_attention_kwargs={"scale": "strong"})
    assert param_hashes(ours) == hashes


def test_loha_scale_is_a_set_adapters_weight(tmp_path):
    """diffusers cannot load LoHa; the plugged pipeline scales it per call like a LoRA."""
    pipe = da.plugin(tiny_sd1_pipeline())
    base = run(pipe)
    path = tmp_path / "loha.safetensors"
    save_file(pipeline_file(pipe, algo="loha", std=0.3), str(path))
    pipe.load_lora_weights(str(path), adapter_name="h")
    hashes = param_hashes(pipe)
    assert np.abs(run(pipe, cross_attention_kwargs={"scale": 0.0}) - base).max() == 0.0
    scaled = run(pipe, cross_attention_kwargs={"scale": 0.6})
    assert param_hashes(pipe) == hashes
    assert np.abs(scaled - run(pipe)).max() > 1e-3
    pipe.set_adapters("h", 0.6)
    assert np.abs(scaled - run(pipe)).max() <= 1e-6


def test_flux_joint_attention_scale_matches_diffusers(flux):
    """Flux: ``joint_attention_kwargs["scale"]`` scales the transformer and (through ``encode_prompt``) CLIP-L."""
    g = torch.Generator().manual_seed(4)
    sd = lora_file(flux.transformer, "flux", "kohya", only=r"^double_blocks")
    for name, m in flux.text_encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers.0." in name:
            k = "lora_te1_" + name.replace(".", "_")
            sd[f"{k}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g) * 0.2
            sd[f"{k}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g) * 0.2
            sd[f"{k}.alpha"] = torch.tensor(1.0)
    stock, ours = copy.deepcopy(flux), da.plugin(copy.deepcopy(flux))
    stock.load_lora_weights({k: v.clone() for k, v in sd.items()})  # diffusers scales some tensors in place
    ours.load_lora_weights(sd)
    assert ours.get_list_adapters() == stock.get_list_adapters() == {"transformer": ["default_0"],
                                                                    "text_encoder": ["default_0"]}
    hashes, unscaled = param_hashes(ours), run(ours)
    for s in SCALES:
        kwargs = {"joint_attention_kwargs": {"scale": s}}
        out = run(ours, **kwargs)
        assert param_hashes(ours) == hashes
        assert np.abs(out - run(stock, **kwargs)).max() <= 1e-5
        assert np.abs(out - unscaled).max() > 1e-4
    da.unplug(ours)
    assert type(ours) is type(flux)


DIT = {  # family: (the pipeline's scale kwargs, call options for a tiny run)
    "sd3": ("joint_attention_kwargs", {}),
    "wan": ("attention_kwargs", {"height": 16, "width": 16, "num_frames": 1, "max_sequence_length": 16}),
    "qwen": ("attention_kwargs", {"max_sequence_length": 32}),
}


def latents(pipe, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="latent", **kwargs)
    return np.asarray(out[0])


@pytest.mark.parametrize("family", list(DIT))
def test_dit_scale_kwargs_match_diffusers(request, family):
    """Each family's own kwargs name reaches its transformer (``apply_lora_scale`` is read off the model)."""
    tiny = request.getfixturevalue(family)
    g = torch.Generator().manual_seed(7)
    linears = [(n, m) for n, m in tiny.transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and ".attn" in n and "blocks.0." in n][:4]
    sd = {}
    for name, m in linears:  # diffusers' own names, read as they are by every family's loader
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.3
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
    stock, ours = copy.deepcopy(tiny), da.plugin(copy.deepcopy(tiny))
    stock.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name="x")
    ours.load_lora_weights(sd, adapter_name="x")
    kwarg, options = DIT[family]
    hashes, unscaled = param_hashes(ours), latents(ours, **options)
    out = latents(ours, **options, **{kwarg: {"scale": 0.4}})
    assert param_hashes(ours) == hashes
    theirs = latents(stock, **options, **{kwarg: {"scale": 0.4}})
    # relative: SD3's tiny latents reach ~12, where patched and unfused float32 sums differ by ~7e-5 at scale 1
    assert np.abs(out - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max())
    assert np.abs(out - unscaled).max() > 1e-5


def test_what_diffusers_scales_is_read_off_its_code():
    """The denoiser's kwargs name comes from ``apply_lora_scale`` on its forward; the encoders from
    ``encode_prompt``'s ``scale_lora_layers(self.…)`` calls."""
    import diffusers
    from transformers import CLIPTextModel, T5EncoderModel

    from diffadapt.plugin_call import _encoders, _scale_kwarg

    kwargs = {"UNet2DConditionModel": "cross_attention_kwargs", "SD3Transformer2DModel": "joint_attention_kwargs",
              "FluxTransformer2DModel": "joint_attention_kwargs", "WanTransformer3DModel": "attention_kwargs",
              "QwenImageTransformer2DModel": "attention_kwargs", "AutoencoderKL": None}
    assert {name: _scale_kwarg(getattr(diffusers, name)) for name in kwargs} == kwargs
    assert _scale_kwarg(CLIPTextModel) is None and _scale_kwarg(T5EncoderModel) is None
    encoders = {"StableDiffusionPipeline": ("text_encoder",),
                "StableDiffusionXLPipeline": ("text_encoder", "text_encoder_2"),
                "StableDiffusion3Pipeline": ("text_encoder", "text_encoder_2"),  # not the T5 (text_encoder_3)
                "FluxPipeline": ("text_encoder", "text_encoder_2"), "WanPipeline": (), "QwenImagePipeline": ()}
    assert {name: _encoders(getattr(diffusers, name)) for name in encoders} == encoders
