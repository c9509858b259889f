"""training/train_dreambooth.py: a few steps on the tiny pipeline give loadable, reproducible adapters."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import diffadapt as da
from diffadapt.testing import generate, tiny_sd1_pipeline

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_dreambooth.py"
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_dreambooth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(32, 32), (40, 32), (32, 36)]):  # non-square ones exercise resize + crop
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _run(trainer, images, out, *extra):
    return trainer.main(["--tiny", "--instance-dir", str(images), "--instance-prompt", PROMPT, "--resolution", "16",
                         "--max-steps", "3", "--lr", "1e-2", "--batch-size", "2", "--output-dir", str(out), *extra])


def _unet_out(pipe):
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    hidden = torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        return pipe.unet(sample, 10, hidden).sample


@pytest.mark.parametrize("method, text_encoder", [("lora", True), ("loha", False)])
def test_train_saves_loadable_adapters(trainer, images, tmp_path, method, text_encoder):
    result = _run(trainer, images, tmp_path / "out", "--method", method, "--rank", "4", "--alpha", "2",
                  *(["--train-text-encoder"] if text_encoder else []))
    losses = result["losses"]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)

    out = tmp_path / "out"
    components = ["unet", "text_encoder"] if text_encoder else ["unet"]
    for c in components:
        assert (out / c / "adapter_model.safetensors").is_file()
        assert json.loads((out / c / "adapter_config.json").read_text())["peft_type"] == method.upper()
    assert (out / "text_encoder").exists() == text_encoder
    kohya = out / "adapter.safetensors"
    info = da.inspect(kohya)
    assert info.format == "kohya" and set(info.methods) == {method} and set(info.ranks) == {4}
    assert set(info.alphas) == {2.0} and sorted(info.components) == sorted(components)
    assert PROMPT in info.trigger_words and info.metadata["ss_max_train_steps"] == "3"

    base = tiny_sd1_pipeline()
    ref_unet, ref_image = _unet_out(base), generate(base, PROMPT)
    results = []
    for source in (kohya, out):
        pipe = tiny_sd1_pipeline()
        da.load(pipe, source, "sks")
        results.append((_unet_out(pipe), generate(pipe, PROMPT)))
    (k_unet, k_image), (p_unet, p_image) = results
    assert (k_unet - ref_unet).abs().max() > 1e-4
    assert (k_unet - p_unet).abs().max() <= 1e-5
    assert np.abs(k_image - p_image).max() <= 1e-5
    assert np.abs(k_image - ref_image).max() > 1e-5


def test_same_seed_same_adapter(trainer, images, tmp_path):
    first = _run(trainer, images, tmp_path / "a", "--save-format", "peft", "--train-text-encoder")
    second = _run(trainer, images, tmp_path / "b", "--save-format", "peft", "--train-text-encoder")
    assert first["losses"] == second["losses"]
    assert not (tmp_path / "a" / "adapter.safetensors").exists()
    for c in ("unet", "text_encoder"):
        a = load_file(tmp_path / "a" / c / "adapter_model.safetensors")
        b = load_file(tmp_path / "b" / c / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    third = _run(trainer, images, tmp_path / "c", "--save-format", "peft", "--seed", "1")
    assert third["losses"] != first["losses"]


def test_kohya_only_and_bad_input(trainer, images, tmp_path):
    result = _run(trainer, images, tmp_path / "k", "--save-format", "kohya", "--method", "lokr")
    assert result["written"] == [str(tmp_path / "k" / "adapter.safetensors")]
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["adapter.safetensors"]
    assert set(da.inspect(result["written"][0]).methods) == {"lokr"}
    with pytest.raises(SystemExit):
        _run(trainer, tmp_path / "k", tmp_path / "empty")  # a folder without images


def test_folder_model_v_prediction_bf16_accumulation(trainer, images, tmp_path, monkeypatch):
    pipe = tiny_sd1_pipeline()
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    pipe.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = trainer.main(["--model", str(tmp_path / "model"), "--instance-dir", str(images), "--instance-prompt",
                           PROMPT, "--resolution", "16", "--max-steps", "2", "--gradient-accumulation", "2",
                           "--mixed-precision", "bf16", "--output-dir", str(tmp_path / "out")])
    assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
    assert set(da.inspect(tmp_path / "out" / "adapter.safetensors").methods) == {"lora"}
