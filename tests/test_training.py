"""diffadapt.train on the tiny pipelines: every method x SD1/SDXL/SD3/Flux, exports read back by peft's layers,
diffusers' loader and kohya's keys, kill-and-resume bit-equality, prior preservation, and the input checks."""

import functools
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import diffadapt as da
from diffadapt import testing
from diffadapt.cli import main as cli_main
from diffadapt.train import build_parser, checkpoint, data, families, main, train
from diffadapt.train.args import parse_args

PROMPT = "a photo of sks dog"
ROOT = Path(__file__).resolve().parents[1]


BUILDERS = {"sd1": testing.tiny_sd1_pipeline, "sdxl": testing.tiny_sdxl_pipeline, "sd3": testing.tiny_dit_pipeline,
            "flux": testing.tiny_flux_pipeline}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, build in BUILDERS.items():
        build().save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(32, 32), (40, 32), (32, 36)]):  # non-square ones exercise resize + crop
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _args(models, images, out, family="sd1", *extra):
    return ["--pretrained_model_name_or_path", str(models / family), "--instance_data_dir", str(images),
            "--instance_prompt", PROMPT, "--resolution", "16", "--max_train_steps", "2", "--train_batch_size", "2",
            "--learning_rate", "1e-2", "--seed", "0", "--output_dir", str(out), *extra]


def _run(models, images, out, family="sd1", *extra):
    return train(parse_args(_args(models, images, out, family, *extra)))


def _denoise(pipe, family):
    """One denoiser forward on fixed inputs (the pipeline's own text encoding, so text-encoder adapters count)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if family in ("sd1", "sdxl"):
            out = pipe.encode_prompt(PROMPT, "cpu", 1, False) if family == "sd1" else pipe.encode_prompt(
                PROMPT, device="cpu", do_classifier_free_guidance=False)
            x = torch.randn(1, 4, 8, 8, generator=gen)
            if family == "sd1":
                return pipe.unet(x, 10, out[0]).sample
            time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
            return pipe.unet(x, 10, out[0], added_cond_kwargs={"text_embeds": out[2], "time_ids": time_ids}).sample
        if family == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, device="cpu",
                                                   do_classifier_free_guidance=False)
            x = torch.randn(1, 16, 8, 8, generator=gen)
            return pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=emb,
                                    pooled_projections=pooled).sample
        emb, pooled, txt_ids = pipe.encode_prompt(PROMPT, PROMPT, device="cpu", max_sequence_length=_t5_length(pipe))
        x = torch.randn(1, 16, 16, generator=gen)
        img_ids = pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
        return pipe.transformer(hidden_states=x, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                                pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=txt_ids,
                                img_ids=img_ids).sample


def _t5_length(pipe) -> int:
    return min(pipe.tokenizer_2.model_max_length, 512)  # what the trainer pads T5 prompts to


def _peft_reference(family, out):
    """The trained model rebuilt with peft's own layers from the PEFT folders (independent of diffadapt's loader)."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict

    pipe = BUILDERS[family]()
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file()):
        module = getattr(pipe, folder.name)
        inject_adapter_in_model(PeftConfig.from_pretrained(str(folder)), module)
        state = {k.removeprefix("base_model.model."): v
                 for k, v in load_file(folder / "adapter_model.safetensors").items()}
        assert not set_peft_model_state_dict(module, state).unexpected_keys
    return pipe


@functools.cache
def _base(family):
    """One pipeline per family for loading outputs into (unload restores it bit-exactly), and its base output."""
    pipe = BUILDERS[family]()
    return pipe, _denoise(pipe, family)


# every method on every family; text encoders trained on half of them; the other options spread over the runs
OPTIONS = [["--gradient_checkpointing", "--gradient_accumulation_steps", "2"], ["--snr_gamma", "5"],
           ["--noise_offset", "0.05", "--lr_scheduler", "linear", "--lr_warmup_steps", "1"],
           ["--mixed_precision", "bf16"], ["--center_crop", "--random_flip", "--cache_latents"]]
MATRIX = [(f, m, (i + j) % 2 == 0, OPTIONS[(i + j) % 5]) for i, f in enumerate(BUILDERS) for j, m in
          enumerate(["lora", "loha", "lokr", "oft", "waveft"])]


@pytest.mark.parametrize("family, method, text_encoder, options", MATRIX)
def test_method_family_matrix(models, images, tmp_path, family, method, text_encoder, options):
    if family in ("sd3", "flux") and "--snr_gamma" in options:
        options = ["--gradient_checkpointing"]  # Min-SNR is for DDPM models (refused for flow matching)
    formats = ["diffusers", "peft"] + (["kohya"] if method in ("lora", "loha", "lokr") else [])
    out = tmp_path / "out"
    result = _run(models, images, out, family, "--method", method, "--rank", "4", "--save_format", *formats,
                  *(["--train_text_encoder"] if text_encoder else []), "--train_batch_size", "1", *options)
    assert result.family == family and len(result.losses) == 2 and all(np.isfinite(result.losses))
    comps = {p.name for p in out.iterdir() if p.is_dir()}
    denoiser = "unet" if family in ("sd1", "sdxl") else "transformer"
    encoders = {"sd1": {"text_encoder"}, "sdxl": {"text_encoder", "text_encoder_2"},
                "sd3": {"text_encoder", "text_encoder_2"}, "flux": {"text_encoder"}}[family]
    assert comps == {denoiser} | (encoders if text_encoder else set())

    reference = _denoise(_peft_reference(family, out), family)
    pipe, base = _base(family)
    assert (reference - base).abs().max() > 1e-4  # two steps at lr 1e-2 moved the model
    files = [out / "pytorch_lora_weights.safetensors"] + ([out / "adapter.safetensors"] if "kohya" in formats else [])
    for f in files:
        assert PROMPT in da.inspect(f).trigger_words
        da.load(pipe, f, "trained")
        try:
            assert (_denoise(pipe, family) - reference).abs().max() <= 2e-5, f.name
        finally:
            da.unload(pipe, "trained")


def test_resume_after_kill_is_bit_identical(models, images, tmp_path, monkeypatch):
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
             "--train_text_encoder", "--random_flip", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1",
             "--max_grad_norm", "0.5", "--gradient_accumulation_steps", "2", "--save_format", "diffusers"]
    full = _run(models, images, tmp_path / "full", "sd1", *extra)
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "full")] == ["checkpoint-4"]  # total limit 1

    real_replace = checkpoint.os.replace

    def killed_while_saving(src, dst):  # the second checkpoint's rename never happens
        if str(dst).endswith("checkpoint-4"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        _run(models, images, tmp_path / "cut", "sd1", *extra)
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert (cut / ".checkpoint-4.tmp").is_dir() and not (cut / "pytorch_lora_weights.safetensors").exists()
    assert checkpoint.resolve(cut, "latest") == cut / "checkpoint-2"

    resumed = _run(models, images, cut, "sd1", *extra, "--resume_from_checkpoint", "latest")
    assert resumed.losses == full.losses[2:] and resumed.seed == full.seed
    a = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    b = load_file(cut / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (cut / ".checkpoint-4.tmp").exists()

    # --overwrite: a new run never mixes in the previous run's text-encoder adapter or resumes its checkpoints
    _run(models, images, cut, "sd1", "--max_train_steps", "1", "--save_format", "diffusers", "--overwrite")
    assert not any(k.startswith("text_encoder.") for k in load_file(cut / "pytorch_lora_weights.safetensors"))
    assert checkpoint.checkpoints(cut) == []


def test_prior_preservation_generates_and_batches_class_images(models, images, tmp_path, monkeypatch):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(class_dir / "mine.png")
    seen = []
    real_predict = families.predict

    def spy(family, denoiser, noised, cond, **kw):
        seen.append((noised.noisy.shape[0], kw["batch"]["n_instance"], cond["hidden"].shape[0]))
        return real_predict(family, denoiser, noised, cond, **kw)

    monkeypatch.setattr(families, "predict", spy)
    result = _run(models, images, tmp_path / "out", "sd1", "--with_prior_preservation", "--class_data_dir",
                  str(class_dir), "--class_prompt", "a photo of dog", "--num_class_images", "2",
                  "--sample_batch_size", "1", "--prior_loss_weight", "0.5", "--cache_latents",
                  "--validation_prompt", PROMPT, "--num_validation_images", "1", "--validation_epochs", "1")
    made = sorted(p.name for p in class_dir.iterdir())
    assert len(made) == 2 and "mine.png" in made and all(not n.startswith(".") for n in made)
    assert seen == [(4, 2, 4)] * 2  # 2 instance + 2 class examples in every batch
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    # one validation image after the first epoch (2 steps: 3 examples in batches of 2) and one at the end
    assert sorted(p.name for p in (tmp_path / "out" / "validation").iterdir()) == ["final-0.png", "step-2-0.png"]


def test_stock_diffusers_reads_the_lora_output(models, images, tmp_path):
    out = tmp_path / "out"
    _run(models, images, out, "sdxl", "--train_text_encoder", "--rank", "4", "--alpha", "2")
    reference = testing.tiny_sdxl_pipeline()
    da.load(reference, out / "adapter.safetensors", "kohya")  # the kohya file, through diffadapt
    stock = testing.tiny_sdxl_pipeline()
    stock.load_lora_weights(str(out))  # diffusers' own loader, no diffadapt involved
    assert set(stock.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    base = _denoise(testing.tiny_sdxl_pipeline(), "sdxl")
    ours, theirs = _denoise(reference, "sdxl"), _denoise(stock, "sdxl")
    assert (theirs - base).abs().max() > 1e-4
    assert (theirs - ours).abs().max() <= 1e-5
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.trigger_phrase"] == PROMPT and json.loads(meta["lora_adapter_metadata"])


def test_sd2_v_prediction_with_min_snr(models, images, tmp_path, monkeypatch):
    pipe = testing.tiny_sd1_pipeline()
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    pipe.save_pretrained(tmp_path / "sd2")
    targets = []
    real = families.add_noise

    def spy(family, scheduler, latents, noise, u):
        out = real(family, scheduler, latents, noise, u)
        targets.append(torch.equal(out.target, scheduler.get_velocity(latents, noise, out.timesteps)))
        return out

    monkeypatch.setattr(families, "add_noise", spy)
    result = train(parse_args(_args(tmp_path, images, tmp_path / "out", "sd2", "--snr_gamma", "5")))
    assert targets == [True, True] and all(np.isfinite(result.losses))
    assert set(da.inspect(tmp_path / "out" / "adapter.safetensors").methods) == {"lora"}


def test_exif_orientation_and_crops(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to view
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    upright = data.open_image(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)
    top = np.asarray(upright)[:20].mean()
    assert top > 200 and np.asarray(upright)[20:].mean() < 50  # the white half is on top
    gen = np.random.default_rng(0)
    p = data.prepare(upright, resolution=16, center_crop=True, flip=False, gen=gen)
    assert p.pixels.shape == (3, 16, 16) and p.original_size == (40, 20) and p.crop_top_left == (8, 0)
    crops = {data.prepare(upright, resolution=16, center_crop=False, flip=False, gen=gen).crop_top_left
             for _ in range(20)}
    assert len(crops) > 1 and all(left == 0 and 0 <= top <= 16 for top, left in crops)


def test_every_option_has_help_and_diffusers_names(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_dreambooth.py", "--help"])
    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
    names = {s for a in actions for s in a.option_strings}
    for flag in ["pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "output_dir", "resolution",
                 "train_batch_size", "max_train_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "rank",
                 "seed", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
                 "with_prior_preservation", "class_data_dir", "class_prompt", "num_class_images", "prior_loss_weight",
                 "train_text_encoder", "validation_prompt", "validation_epochs", "gradient_checkpointing",
                 "gradient_accumulation_steps", "mixed_precision", "use_8bit_adam", "max_grad_norm", "report_to",
                 "center_crop", "random_flip", "method", "alpha", "cache_latents", "snr_gamma", "noise_offset",
                 "save_format", "text_encoder_lr", "adam_weight_decay_text_encoder", "guidance_scale",
                 "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs",
                 "max_sequence_length", "lora_alpha", "lora_dropout", "lora_layers"]:
        assert f"--{flag}" in names, flag
    assert cli_main(["train", "--help"]) == 0
    assert "--pretrained_model_name_or_path" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "training" / "train_dreambooth.py"), run_name="__main__")
    assert exit_info.value.code == 0 and "--pretrained_model_name_or_path" in capsys.readouterr().out
    assert parse_args(["--pretrained-model-name-or-path", "m", "--instance-data-dir", "i", "--instance-prompt", "p",
                       "--max-train-steps", "3"]).max_train_steps == 3


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input check")

    monkeypatch.setattr(families, "load_pipeline", refuse)


def _bad_inputs(tmp_path, models, images):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (8, 8)).save(broken / "ok.png")
    (broken / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    unsupported = tmp_path / "kandinsky"
    unsupported.mkdir()
    (unsupported / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    used = tmp_path / "used"
    used.mkdir()
    (used / "text_encoder").mkdir()
    return [
        (["--max_train_steps", "0"], "--max_train_steps 0"),
        (["--instance_data_dir", str(tmp_path / "nope")], "no such folder"),
        (["--instance_data_dir", str(empty)], "no images"),
        (["--instance_data_dir", str(broken)], "bad.jpg: unreadable image"),
        (["--pretrained_model_name_or_path", str(empty)], "no model_index.json"),
        (["--pretrained_model_name_or_path", str(unsupported)], "unsupported model family 'KandinskyPipeline'"),
        (["--output_dir", str(used)], "not empty"),
        (["--method", "oft", "--save_format", "kohya"], "oft has no kohya"),
        (["--with_prior_preservation", "--class_data_dir", str(empty)], "pass --class_prompt"),
        (["--report_to", "wandb"], "needs the 'wandb' package"),
        (["--use_8bit_adam"], "needs bitsandbytes"),
        (["--pretrained_model_name_or_path", str(models / "flux"), "--resolution", "18"], "multiple of 4"),
        (["--pretrained_model_name_or_path", str(models / "sd3"), "--snr_gamma", "5"], "flow matching"),
        (["--resume_from_checkpoint", str(empty)], "not a complete checkpoint"),
        (["--method", "loha", "--lora_dropout", "0.1"], "--lora_dropout: LoRA only; loha has no such dropout"),
        (["--lora_dropout", "1"], "--lora_dropout 1.0: must be in [0, 1)"),
        (["--learning_rate", "0"], "--learning_rate 0.0: must be positive"),
        (["--adam_weight_decay_text_encoder", "-1"], "--adam_weight_decay_text_encoder -1.0: must not be negative"),
    ]


def test_bad_input_is_one_line_exit_2_before_loading(models, images, tmp_path, capsys, no_model_load):
    for extra, message in _bad_inputs(tmp_path, models, images):
        argv = _args(models, images, tmp_path / "out", "sd1", *extra)
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (extra, err)
    assert cli_main(["train", *_args(models, images, tmp_path / "out", "sd1", "--max_train_steps", "0")]) == 2
    assert "--max_train_steps 0" in capsys.readouterr().err


@pytest.mark.parametrize("family", list(BUILDERS))
def test_prompt_encoding_matches_the_pipelines_own(family):
    """The trainer encodes prompts itself (through the prepared encoders); it must condition exactly as inference."""
    pipe, _ = _base(family)
    fam = next(f for f in families.FAMILIES.values() if f.name == family)
    encoders = [getattr(pipe, n, None) for n in fam.text_encoders]
    joint = getattr(getattr(pipe, "transformer", None), "config", None)
    with torch.no_grad():
        ours = families.encode(fam, encoders, families.tokenize(fam, pipe, PROMPT),
                               joint_dim=getattr(joint, "joint_attention_dim", None))
        if family == "sd1":
            theirs = {"hidden": pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]}
        elif family == "sdxl":
            out = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
            theirs = {"hidden": out[0], "pooled": out[2]}
        elif family == "sd3":
            out = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, device="cpu", do_classifier_free_guidance=False)
            theirs = {"hidden": out[0], "pooled": out[2]}
        else:
            out = pipe.encode_prompt(PROMPT, PROMPT, device="cpu", max_sequence_length=_t5_length(pipe))
            theirs = {"hidden": out[0], "pooled": out[1]}
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]), k
