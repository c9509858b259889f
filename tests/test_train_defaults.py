"""Options left unset take the default of the diffusers script for the model's family, and the text encoders'
adapters train in their own AdamW group (--text_encoder_lr, --adam_weight_decay_text_encoder) as in
train_dreambooth_lora_{sdxl,sd3,flux}.py; SD1/SD2's share the denoiser's group values (train_dreambooth_lora.py).
Also: the DDPM loss and image preparation as the scripts', LoRA init/alpha/dropout, a resume under other adapter
settings refused before loading, text-encoder activation checkpointing still training the encoder's adapters."""

import json

import numpy as np
import pytest
from PIL import Image

from diffadapt import testing
from diffadapt.train import checks, loop, main, parse_args, train

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "0.png")
    return folder


def _argv(model, images, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images), "--instance_prompt",
            PROMPT, "--output_dir", str(out), *extra]


# the scripts' argparse defaults (train_dreambooth_lora.py serves SD1 and SD2)
@pytest.mark.parametrize("class_name, expected", [
    ("StableDiffusionPipeline", dict(learning_rate=5e-4, adam_weight_decay=1e-2, resolution=512,
                                     text_encoder_lr=None, adam_weight_decay_text_encoder=None)),
    ("StableDiffusionXLPipeline", dict(learning_rate=1e-4, adam_weight_decay=1e-4, resolution=1024,
                                       text_encoder_lr=5e-6, adam_weight_decay_text_encoder=1e-3)),
    ("StableDiffusion3Pipeline", dict(learning_rate=1e-4, adam_weight_decay=1e-4, resolution=512,
                                      text_encoder_lr=5e-6, adam_weight_decay_text_encoder=1e-3, alpha=None,
                                      guidance_scale=None, max_sequence_length=256)),
    ("FluxPipeline", dict(learning_rate=1e-4, adam_weight_decay=1e-4, resolution=512, text_encoder_lr=5e-6,
                          adam_weight_decay_text_encoder=1e-3, alpha=4.0, guidance_scale=3.5,
                          max_sequence_length=512)),
])
def test_unset_options_take_the_family_scripts_defaults(tmp_path, images, class_name, expected):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    plan = checks.check(parse_args(_argv(model, images, tmp_path / "out")))
    assert {k: getattr(plan.config, k) for k in expected} == expected
    given = checks.check(parse_args(_argv(model, images, tmp_path / "out", "--learning_rate", "3e-4",
                                          "--resolution", "64", "--adam_weight_decay", "0")))
    assert (given.config.learning_rate, given.config.resolution, given.config.adam_weight_decay) == (3e-4, 64, 0.0)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("build, extra, expected", [
    # (denoiser lr, wd), (text encoders lr, wd), text-encoder parameter count relative to the denoiser's group
    ("sdxl", [], ((1e-4, 1e-4), (5e-6, 1e-3))),
    ("sdxl", ["--text_encoder_lr", "2e-5", "--adam_weight_decay_text_encoder", "0.5", "--learning_rate", "1e-3"],
     ((1e-3, 1e-4), (2e-5, 0.5))),
    ("sd1", ["--scale_lr", "--train_batch_size", "2"], ((1e-3, 1e-2), (1e-3, 1e-2))),
    ("sd1", ["--text_encoder_lr", "1e-5"], ((5e-4, 1e-2), (1e-5, 1e-2))),
])
def test_text_encoder_parameter_group(tmp_path, images, monkeypatch, build, extra, expected):
    model = tmp_path / build
    getattr(testing, f"tiny_{build}_pipeline")().save_pretrained(model)
    made = []
    real = loop._optimizer

    def spy(config, groups, lr, **kw):
        made.append((real(config, groups, lr, **kw), groups))
        raise _Stop

    monkeypatch.setattr(loop, "_optimizer", spy)
    with pytest.raises(_Stop):
        train(parse_args(_argv(model, images, tmp_path / "out", "--resolution", "16", "--train_text_encoder",
                               *extra)))
    optimizer, groups = made[0]
    got = tuple((g["lr"], g["weight_decay"]) for g in optimizer.param_groups)
    assert got == expected
    te = [p for name, group in groups.items() if name != "unet" for p in group]
    assert len(groups) == (3 if build == "sdxl" else 2) and te
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(groups["unet"]), len(te)]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, images):
    """An SD1 run (LoRA rank 4, frozen text encoder) stopped with checkpoint-1."""
    root = tmp_path_factory.mktemp("resume")
    testing.tiny_sd1_pipeline().save_pretrained(root / "sd1")
    train(parse_args(_argv(root / "sd1", images, root / "out", "--resolution", "16", "--max_train_steps", "1",
                           "--checkpointing_steps", "1", "--save_format", "diffusers")))
    return root


@pytest.mark.parametrize("extra, message", [
    (["--rank", "8"], "trained with rank 4, this run has 8"),
    (["--method", "loha"], "trained with method 'lora', this run has 'loha'"),
    (["--alpha", "1"], "trained with alpha 4.0, this run has 1.0"),
    (["--train_text_encoder"], "trained with train_text_encoder False, this run has True"),
])
def test_resume_under_other_adapter_settings_is_refused(checkpointed, images, capsys, monkeypatch, extra, message):
    root = checkpointed
    monkeypatch.setattr(loop.families, "load_pipeline", lambda *a, **k: pytest.fail("model loaded before the check"))
    argv = _argv(root / "sd1", images, root / "out", "--resolution", "16", "--max_train_steps", "2",
                 "--resume_from_checkpoint", "latest", *extra)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "checkpoint-1" in err, err


def test_text_encoder_checkpointing_trains_without_deprecated_calls(checkpointed, images, tmp_path):
    """Activation checkpointing on a trained CLIP encoder: its adapters still get gradients (non-reentrant
    checkpointing), through transformers' current call (the deprecated alias warns and goes in v6)."""
    import warnings

    from safetensors.torch import load_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(parse_args(_argv(checkpointed / "sd1", images, tmp_path / "out", "--resolution", "16",
                               "--max_train_steps", "1", "--train_text_encoder", "--text_encoder_lr", "1e-2",
                               "--gradient_checkpointing", "--save_format", "diffusers")))
    assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)]
    state = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    te_b = [v for k, v in state.items() if k.startswith("text_encoder.") and "lora_B" in k]
    assert te_b and all(v.abs().max() > 0 for v in te_b)


@pytest.mark.parametrize("size, resolution, flip", [((47, 32), 16, False), ((32, 45), 16, False),
                                                    ((43, 32), 32, True), ((32, 75), 32, False),
                                                    ((50, 33), 16, True), ((16, 16), 16, True)])
def test_resize_flip_and_center_crop_as_diffusers(size, resolution, flip):
    """The SDXL script's order and torchvision's sizes (which diffusers' scripts use): ``Resize(r)`` makes the
    long side ``int(r * long / short)``, then the flip, then ``CenterCrop`` at ``int(round((side - r) / 2))``,
    whose offsets are SDXL's crop coordinates."""
    from diffadapt.train import data

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    w, h = size
    short, long = min(w, h), max(w, h)
    tw, th = (resolution, int(resolution * long / short)) if w <= h else (int(resolution * long / short), resolution)
    top, left = int(round((th - resolution) / 2.0)), int(round((tw - resolution) / 2.0))
    resized = img.resize((tw, th), Image.BILINEAR)
    if flip:
        resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
    want = np.asarray(resized, dtype=np.float32)[top:top + resolution, left:left + resolution]
    got = data.prepare(img, resolution=resolution, center_crop=True, flip=flip, gen=np.random.default_rng(0))
    assert got.crop_top_left == (top, left) and got.original_size == (h, w)
    assert np.array_equal(((got.pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).round(), want)


@pytest.mark.parametrize("build, extra, alpha", [("flux", ["--rank", "8"], 4.0), ("sd1", ["--rank", "8"], 8.0),
                                                ("flux", ["--rank", "8", "--lora_alpha", "16"], 16.0)])
def test_lora_alpha_and_init_as_diffusers(tmp_path, images, monkeypatch, build, extra, alpha):
    """LoRA starts as the scripts' ``init_lora_weights="gaussian"`` (A ~ N(0, 1/r), B = 0); alpha defaults to the
    rank, for Flux to its script's --lora_alpha 4; --lora_alpha is accepted for --alpha."""
    import torch
    from peft import LoraConfig

    model = tmp_path / build
    getattr(testing, f"tiny_{build}_pipeline")().save_pretrained(model)
    made = []
    real_inject = loop.inject

    def spy_inject(module, config):
        made.append((module, config))
        return real_inject(module, config)

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(loop, "inject", spy_inject)
    monkeypatch.setattr(loop, "_optimizer", stop)
    with pytest.raises(_Stop):
        train(parse_args(_argv(model, images, tmp_path / "out", "--resolution", "16", *extra)))
    (module, config), = made
    assert isinstance(config, LoraConfig) and config.lora_alpha == alpha and config.init_lora_weights == "gaussian"
    a = torch.cat([p.detach().flatten() for n, p in module.named_parameters() if "lora_A" in n])
    b = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert a.numel() > 1000 and abs(float(a.std()) - 1 / 8) < 0.01 and b and all(not p.any() for p in b)


def test_lora_dropout_resumes_bit_exactly(checkpointed, images, tmp_path):
    """--lora_dropout (the scripts' flag) draws from the global RNG, reseeded per micro-batch: a resume from
    checkpoint-1 continues exactly as the uninterrupted run."""
    import shutil

    import torch
    from safetensors.torch import load_file

    def run(out, *extra):
        return train(parse_args(_argv(checkpointed / "sd1", images, out, "--resolution", "16", "--max_train_steps",
                                      "3", "--checkpointing_steps", "1", "--train_batch_size", "2", "--learning_rate",
                                      "1e-2", "--save_format", "diffusers", "--seed", "1", *extra)))

    full = run(tmp_path / "full", "--lora_dropout", "0.5")
    plain = run(tmp_path / "plain")
    assert full.losses[0] == plain.losses[0] and full.losses[1:] != plain.losses[1:]  # B = 0 at step 1
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-1", cut / "checkpoint-1")
    resumed = run(cut, "--lora_dropout", "0.5", "--resume_from_checkpoint", "latest")
    assert resumed.losses == full.losses[1:]
    a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (tmp_path / "full", cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("prediction, snr_gamma, prior", [("epsilon", None, False), ("epsilon", None, True),
                                                          ("epsilon", 5.0, False), ("v_prediction", 5.0, True),
                                                          ("v_prediction", None, True)])
def test_ddpm_loss_as_the_scripts(prediction, snr_gamma, prior):
    """SD1/SDXL: the scripts' MSE on the instance half + --prior_loss_weight x the class half; Min-SNR weights
    of train_text_to_image_lora*.py (min(snr, gamma) / snr, or / (snr + 1) for v-prediction) on the instance half."""
    import types

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from diffadapt.train import families

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=prediction)
    gen = torch.Generator().manual_seed(0)
    b = 4
    latents, noise, pred = (torch.randn(b, 4, 8, 8, generator=gen) for _ in range(3))
    u = torch.rand(b, generator=gen)
    noised = families.add_noise(families.FAMILIES["StableDiffusionPipeline"], scheduler, latents, noise, u)
    timesteps = (u * 1000).long()
    assert torch.equal(noised.timesteps, timesteps)
    assert torch.equal(noised.noisy, scheduler.add_noise(latents, noise, timesteps))
    target = noise if prediction == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    n = b // 2 if prior else b
    plan = types.SimpleNamespace(family=families.FAMILIES["StableDiffusionPipeline"], flow=None)
    config = types.SimpleNamespace(snr_gamma=snr_gamma, prior_loss_weight=0.7)
    got = loop._loss(config, plan, scheduler, pred, noised, n)

    model_pred, tgt = pred, target
    if prior:
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        tgt, target_prior = torch.chunk(tgt, 2, dim=0)
        prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    if snr_gamma is None:
        want = F.mse_loss(model_pred.float(), tgt.float(), reduction="mean")
    else:
        snr = compute_snr(scheduler, timesteps[:n])
        weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps[:n])], dim=1).min(dim=1)[0]
        weights = weights / snr if prediction == "epsilon" else weights / (snr + 1)
        want = (F.mse_loss(model_pred.float(), tgt.float(), reduction="none").mean(dim=[1, 2, 3]) * weights).mean()
    if prior:
        want = want + 0.7 * prior_loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
