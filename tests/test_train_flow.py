"""SD3/Flux flow-matching training against diffusers' own code: timestep density, sigmas, loss weighting and
preconditioning equal what ``compute_density_for_timestep_sampling`` / ``compute_loss_weighting_for_sd3`` and the
formulas of ``train_dreambooth_lora_{sd3,flux}.py`` give for the same generator; per-family defaults; flag checks;
gradient-accumulation windows equal accelerate's with a prepared dataloader; a resume stays bit-exact; the T5
prompt length and the adapted layers are the pipelines' / scripts'."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from PIL import Image
from safetensors.torch import load_file

from diffadapt import testing
from diffadapt.train import data, families, flow, loop, main, train
from diffadapt.train.args import parse_args

PROMPT = "a photo of sks dog"
FAMILY = {f.name: f for f in families.FAMILIES.values()}
FAMILY_BUILD = {"sd3": testing.tiny_dit_pipeline, "flux": testing.tiny_flux_pipeline}
FLAG_NAMES = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs")


@pytest.fixture(scope="module")
def models(tmp_path_factory, sd3, flux):
    root = tmp_path_factory.mktemp("models")
    sd3.save_pretrained(root / "sd3")
    flux.save_pretrained(root / "flux")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _args(models, images, out, family, *extra):
    return ["--pretrained_model_name_or_path", str(models / family), "--instance_data_dir", str(images),
            "--instance_prompt", PROMPT, "--resolution", "16", "--train_batch_size", "1", "--learning_rate", "1e-2",
            "--seed", "0", "--output_dir", str(out), "--save_format", "diffusers", *extra]


def _flags(**given):
    return SimpleNamespace(**{k: given.get(k) for k in FLAG_NAMES})


def _script_sigmas(scheduler, timesteps, n_dim):
    """``get_sigmas`` of the diffusers scripts, verbatim but for the device."""
    sigmas = scheduler.sigmas.to(dtype=torch.float32)
    schedule_timesteps = scheduler.timesteps
    step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


def _script_loss(model_pred, model_input, noise, noisy_model_input, sigmas, weighting_scheme, precondition,
                 prior, prior_loss_weight):
    """The loss block of train_dreambooth_lora_sd3.py (Flux's is the same with precondition_outputs = 0)."""
    if precondition:
        model_pred = model_pred * (-sigmas) + noisy_model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = model_input if precondition else noise - model_input
    if prior:
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        weighting, weighting_prior = torch.chunk(weighting, 2, dim=0)
        prior_loss = torch.mean((weighting_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2
                                 ).reshape(target_prior.shape[0], -1), 1).mean()
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1),
                      1).mean()
    if prior:
        loss = loss + prior_loss_weight * prior_loss
    return loss


# family, flags given (None = the family's default, i.e. diffusers' script default), what they resolve to
SCHEME_CASES = [
    ("sd3", {}, ("logit_normal", True)),
    ("flux", {}, ("none", False)),
    ("sd3", {"logit_mean": 0.7, "logit_std": 0.4}, ("logit_normal", True)),
    ("sd3", {"weighting_scheme": "sigma_sqrt", "precondition_outputs": 0}, ("sigma_sqrt", False)),
    ("sd3", {"weighting_scheme": "cosmap"}, ("cosmap", True)),
    ("flux", {"weighting_scheme": "mode", "mode_scale": 1.5}, ("mode", False)),
    ("flux", {"weighting_scheme": "logit_normal", "logit_mean": -0.5}, ("logit_normal", False)),
    ("flux", {"weighting_scheme": "cosmap", "precondition_outputs": 1}, ("cosmap", True)),
    ("sd3", {"weighting_scheme": "none"}, ("none", True)),
]


@pytest.mark.parametrize("family, given, expected", SCHEME_CASES)
def test_draw_noise_and_loss_match_diffusers(models, family, given, expected):
    opts = flow.options(family, _flags(**given))
    assert (opts.weighting_scheme, opts.precondition_outputs) == expected
    reference = FlowMatchEulerDiscreteScheduler.from_pretrained(models / family, subfolder="scheduler")
    scheduler = families.noise_scheduler(FAMILY[family], SimpleNamespace(scheduler=reference))
    b = 8
    latents, noise = torch.randn(b, 4, 4, 4), torch.randn(b, 4, 4, 4)
    pred = torch.randn(b, 4, 4, 4)

    ours = families.add_noise(FAMILY[family], scheduler, latents, noise,
                              flow.draw(opts, b, torch.Generator().manual_seed(7)))
    u = compute_density_for_timestep_sampling(
        weighting_scheme=opts.weighting_scheme, batch_size=b, logit_mean=given.get("logit_mean", 0.0),
        logit_std=given.get("logit_std", 1.0), mode_scale=given.get("mode_scale", 1.29),
        generator=torch.Generator().manual_seed(7))
    indices = (u * reference.config.num_train_timesteps).long()
    timesteps = reference.timesteps[indices]
    sigmas = _script_sigmas(reference, timesteps, latents.ndim)
    assert torch.equal(ours.timesteps, timesteps) and torch.equal(ours.sigmas, sigmas)
    assert len(set(timesteps.tolist())) > 1  # a real draw, not one timestep
    assert torch.equal(ours.noisy, (1.0 - sigmas) * latents + sigmas * noise)
    assert torch.equal(ours.target, noise - latents)
    assert torch.equal(flow.weighting(opts, ours.sigmas), compute_loss_weighting_for_sd3(opts.weighting_scheme, sigmas))

    for n, prior in ((b, False), (b // 2, True)):
        got = flow.loss(opts, pred, noisy=ours.noisy, latents=latents, noise=noise, sigmas=ours.sigmas,
                        n_instance=n, prior_loss_weight=0.3)
        want = _script_loss(pred, latents, noise, (1.0 - sigmas) * latents + sigmas * noise, sigmas,
                            opts.weighting_scheme, opts.precondition_outputs, prior, 0.3)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_density_shapes_the_timesteps(models):
    """logit_normal concentrates on the middle of the table, mode's scale moves mass, none is uniform."""
    reference = FlowMatchEulerDiscreteScheduler.from_pretrained(models / "sd3", subfolder="scheduler")
    spread = {}
    for scheme, extra in (("none", {}), ("logit_normal", {}), ("logit_normal", {"logit_std": 0.2})):
        u = flow.draw(flow.options("flux", _flags(weighting_scheme=scheme, **extra)), 4000,
                      torch.Generator().manual_seed(0))
        idx = flow.table_index(reference, u)
        assert idx.min() >= 0 and idx.max() < 1000
        spread[(scheme, extra.get("logit_std"))] = float(idx.float().std())
    assert spread[("none", None)] > spread[("logit_normal", None)] > spread[("logit_normal", 0.2)]


def _model_folder(tmp_path, class_name):
    folder = tmp_path / class_name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return folder


@pytest.mark.parametrize("model, extra, message", [
    ("StableDiffusionPipeline", ["--weighting_scheme", "logit_normal"], "--weighting_scheme: flow-matching options"),
    ("StableDiffusionXLPipeline", ["--precondition_outputs", "0", "--logit_mean", "0"],
     "--logit_mean, --precondition_outputs: flow-matching options (SD3, Flux); sdxl is a DDPM model"),
    ("StableDiffusionPipeline", ["--mode_scale", "1.29"], "sd1 is a DDPM model (its loss weighting is --snr_gamma)"),
    ("FluxPipeline", ["--logit_std", "0"], "need finite values and a positive std"),
    ("StableDiffusion3Pipeline", ["--logit_mean", "nan"], "need finite values"),
    ("StableDiffusion3Pipeline", ["--weighting_scheme", "mode", "--mode_scale", "2"], "--mode_scale 2.0: must be in"),
    ("FluxPipeline", ["--mode_scale", "-1.5"], "--mode_scale -1.5: must be in [-1, 1.7519]"),
    ("FluxPipeline", ["--snr_gamma", "5"], "flow matching"),
    ("FluxPipeline", ["--weighting_scheme", "uniform"], "invalid choice: 'uniform'"),
    ("StableDiffusion3Pipeline", ["--precondition_outputs", "2"], "invalid choice: 2"),
    ("StableDiffusionXLPipeline", ["--max_sequence_length", "77"], "--max_sequence_length: the T5 prompt length"),
    ("StableDiffusion3Pipeline", ["--guidance_scale", "3.5"], "--guidance_scale: the guidance value of Flux's"),
    ("FluxPipeline", ["--max_sequence_length", "600"], "--max_sequence_length 600: Flux takes at most 512"),
    ("StableDiffusion3Pipeline", ["--max_sequence_length", "0"], "--max_sequence_length 0: must be at least 1"),
])
def test_flow_flags_are_checked_before_loading(tmp_path, images, capsys, monkeypatch, model, extra, message):
    monkeypatch.setattr(families, "load_pipeline", lambda *a, **k: pytest.fail("model loaded before the check"))
    argv = _args(tmp_path, images, tmp_path / "out", model, *extra)
    _model_folder(tmp_path, model)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal (choices)
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("per_epoch, ga", [(3, 2), (1, 4), (5, 2), (4, 4), (7, 3), (2, 1)])
def test_accumulation_windows_are_accelerates(per_epoch, ga):
    """The optimizer steps of ``data.Accumulation`` are the ones accelerate makes with a prepared dataloader
    (diffusers' scripts): windows restart every epoch, the epoch's last one may be short."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(gradient_accumulation_steps=ga, cpu=True)
    loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(per_epoch)), batch_size=1))
    theirs = []
    for _ in range(3):
        for _ in loader:
            with accelerator.accumulate():
                theirs.append(accelerator.sync_gradients)
    AcceleratorState._reset_state(reset_partial_state=True)
    plan = data.Accumulation(per_epoch=per_epoch, steps=ga)
    assert [plan.position(m)[1] for m in range(3 * per_epoch)] == theirs
    ends = [m + 1 for m, sync in enumerate(theirs) if sync]
    assert [plan.first_micro(s) for s in range(1, len(ends) + 1)] == ends
    assert plan.steps_per_epoch * 3 == len(ends)


def _spy(monkeypatch):
    seen = {"opts": [], "epochs": [], "noisy_ok": [], "forward": []}
    draw, predict, keys = flow.draw, families.predict, data.BatchPlan.keys

    def spy_draw(opts, batch, generator):
        seen["opts"].append(opts)
        return draw(opts, batch, generator)

    def spy_predict(family, denoiser, noised, cond, **kw):
        seen["noisy_ok"].append(torch.equal(noised.noisy, (1 - noised.sigmas) * noised.latents
                                            + noised.sigmas * noised.noise))
        seen["timesteps"], seen["hidden"] = noised.timesteps, cond["hidden"].shape
        return predict(family, denoiser, noised, cond, **kw)

    def spy_keys(self, m):
        out = keys(self, m)
        seen["epochs"].append(out[0][1])
        return out

    forward = FluxTransformer2DModel.forward

    def spy_forward(self, *a, **kw):
        seen["forward"].append((kw["timestep"].clone(), kw["guidance"].clone()))
        return forward(self, *a, **kw)

    monkeypatch.setattr(flow, "draw", spy_draw)
    monkeypatch.setattr(families, "predict", spy_predict)
    monkeypatch.setattr(data.BatchPlan, "keys", spy_keys)
    monkeypatch.setattr(FluxTransformer2DModel, "forward", spy_forward)
    return seen


def test_flux_non_default_scheme_epochs_accumulation_and_resume(models, images, tmp_path, monkeypatch):
    """3 images, batch 1, accumulation 2, 2 epochs: 4 optimizer steps over 6 micro-batches (not 8); guidance and
    timestep reach the transformer as in the Flux script; a resume from step 1 (mid-epoch) is bit-identical."""
    extra = ["--weighting_scheme", "mode", "--mode_scale", "1.5", "--precondition_outputs", "1",
             "--gradient_accumulation_steps", "2", "--num_train_epochs", "2", "--checkpointing_steps", "1",
             "--guidance_scale", "5.0", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1"]
    seen = _spy(monkeypatch)
    full = train(parse_args(_args(models, images, tmp_path / "full", "flux", *extra)))
    assert full.steps == 4 and len(full.losses) == 4 and seen["epochs"] == [0, 0, 0, 1, 1, 1]
    assert all(o == flow.FlowOptions(weighting_scheme="mode", mode_scale=1.5, precondition_outputs=True)
               for o in seen["opts"]) and len(seen["opts"]) == 6 and all(seen["noisy_ok"])
    timestep, guidance = seen["forward"][-1]
    assert torch.equal(timestep, seen["timesteps"] / 1000) and timestep.dtype == torch.float32
    assert torch.equal(guidance, torch.full((1,), 5.0))

    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-1", cut / "checkpoint-1")
    assert json.loads((cut / "checkpoint-1" / "progress.json").read_text())["micro_batch"] == 2
    seen["epochs"].clear()
    resumed = train(parse_args(_args(models, images, cut, "flux", *extra, "--resume_from_checkpoint", "latest")))
    assert seen["epochs"] == [0, 1, 1, 1] and resumed.losses == full.losses[1:]
    a = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    b = load_file(cut / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sd3_defaults_to_diffusers_sd3_script(models, images, tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    from diffusers import StableDiffusion3Pipeline

    calls = []
    real_call = StableDiffusion3Pipeline.__call__

    def spy_call(self, *a, **kw):
        calls.append(kw)
        return real_call(self, *a, **{**kw, "num_inference_steps": 1})

    monkeypatch.setattr(StableDiffusion3Pipeline, "__call__", spy_call)
    result = train(parse_args(_args(models, images, tmp_path / "out", "sd3", "--max_train_steps", "1",
                                    "--max_sequence_length", "77", "--validation_prompt", PROMPT,
                                    "--num_validation_images", "1")))
    assert [c["max_sequence_length"] for c in calls] == [77]  # validation conditions as training did
    assert seen["opts"] == [flow.DEFAULTS["sd3"]] and seen["noisy_ok"] == [True]
    assert seen["hidden"][1] == 77 + 77  # CLIP tokens, then the (stand-in) T5 ones
    assert seen["opts"][0] == flow.FlowOptions(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0,
                                               mode_scale=1.29, precondition_outputs=True)
    assert np.isfinite(result.losses).all()


@pytest.mark.parametrize("family, length", [("sd3", 77), ("flux", 77), ("flux", 128)])
def test_max_sequence_length_encodes_as_the_pipeline(sd3, flux, family, length):
    pipe = {"sd3": sd3, "flux": flux}[family]
    fam = FAMILY[family]
    encoders = [getattr(pipe, n, None) for n in fam.text_encoders]
    with torch.no_grad():
        ours = families.encode(fam, encoders, families.tokenize(fam, pipe, PROMPT, max_sequence_length=length),
                               joint_dim=getattr(getattr(pipe, "transformer").config, "joint_attention_dim", None),
                               t5_length=length)
        if family == "sd3":
            out = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, device="cpu", do_classifier_free_guidance=False,
                                     max_sequence_length=length)
            theirs = {"hidden": out[0], "pooled": out[2]}
        else:
            out = pipe.encode_prompt(PROMPT, PROMPT, device="cpu", max_sequence_length=length)
            theirs = {"hidden": out[0], "pooled": out[1]}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert ours["hidden"].shape[1] == (77 + length if family == "sd3" else length)


# train_dreambooth_lora_flux.py / _sd3.py: their default target_modules, and --lora_layers
SCRIPT_TARGETS = {
    "flux": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2"],
    "sd3": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
            "attn.to_q", "attn.to_v"],
}


@pytest.mark.parametrize("family, lora_layers", [("flux", None), ("sd3", None), ("flux", "attn.to_q,ff.net.2")])
def test_adapted_layers_are_the_scripts(models, images, tmp_path, monkeypatch, family, lora_layers):
    from peft import LoraConfig, inject_adapter_in_model

    adapted = []
    real = loop.inject

    def spy(module, config):
        real(module, config)
        adapted.append({n.rsplit(".lora_A", 1)[0] for n, _ in module.named_parameters() if ".lora_A." in n})
        raise _Stop

    monkeypatch.setattr(loop, "inject", spy)
    extra = ["--lora_layers", lora_layers] if lora_layers else []
    with pytest.raises(_Stop):
        train(parse_args(_args(models, images, tmp_path / "out", family, *extra)))
    fresh = FAMILY_BUILD[family]().transformer
    targets = lora_layers.split(",") if lora_layers else SCRIPT_TARGETS[family]
    inject_adapter_in_model(LoraConfig(r=4, target_modules=targets), fresh)
    want = {n.rsplit(".lora_A", 1)[0] for n, _ in fresh.named_parameters() if ".lora_A." in n}
    assert adapted == [want] and want


def test_unknown_lora_layer_is_refused(models, images, tmp_path, capsys):
    argv = _args(models, images, tmp_path / "out", "flux", "--lora_layers", "attn.to_q, ff.nope")
    assert main(argv) == 2
    assert "--lora_layers 'attn.to_q, ff.nope': ff.nope names no Linear/Conv layer of the transformer" in \
        capsys.readouterr().err


class _Stop(Exception):
    pass
