"""``diffadapt generate`` on the embedded tiny SD1 pipeline with two LyCORIS-made adapter files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

import diffadapt as da
from diffadapt.cli import main
from diffadapt.fixtures import lycoris_file
from diffadapt.infotext import AdapterRef, adapter_hash, load_png
from diffadapt.prompt import StackEntry
from diffadapt.testing import generate, tiny_sd1_pipeline

SMALL = ["--width", "16", "--height", "16"]
FAST = [*SMALL, "--steps", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """ink (LoRA) and film (LoHa), each over the UNet and the text encoder, as LyCORIS saves them."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = tiny_sd1_pipeline()
    out = {}
    for i, (name, algo) in enumerate([("ink", "lora"), ("film", "loha")]):
        sd = {}
        for j, (component, prefix) in enumerate([("unet", "lora_unet"), ("text_encoder", "lora_te")]):
            part, _ = lycoris_file(getattr(pipe, component), algo=algo, prefix=prefix, seed=10 * i + j, std=0.2)
            sd.update(part)
        out[name] = folder / f"{name}.safetensors"
        save_file(sd, out[name], metadata={"ss_output_name": name})
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["generate", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out.strip(), captured.err


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_generate_writes_png_with_infotext(files, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc, stdout, _ = run(capsys, "--adapter", f"{files['ink']}:0.8", "--adapter", f"{files['film']}:0.5:0.3",
                        "--prompt", "a cat, best quality", "--negative-prompt", "blurry", "--seed", 7, *SMALL,
                        "--out", out)
    assert rc == 0 and stdout == str(out) and out.is_file()
    info = load_png(out)
    assert info.prompt == "a cat, best quality <lora:ink:0.8> <lora:film:0.5:0.3>"
    assert info.negative_prompt == "blurry"
    p = info.params
    assert (p["Seed"], p["Steps"], p["Size"], p["Sampler"], p["CFG scale"]) == ("7", "4", "16x16", "Euler", "7")
    assert p["Model"] == "diffadapt-tiny-sd1" and "Model hash" not in p
    assert info.adapters == [AdapterRef("ink", adapter_hash(files["ink"]), 0.8, 0.8),
                             AdapterRef("film", adapter_hash(files["film"]), 0.5, 0.3)]

    # the pixels are those of the same generation done by hand with diffadapt.load
    pipe = tiny_sd1_pipeline()
    da.load(pipe, files["ink"], "ink", weight=StackEntry("ink", 0.8, 0.8).weight)
    da.load(pipe, files["film"], "film", weight=StackEntry("film", 0.5, 0.3).weight)
    expected = generate(pipe, "a cat, best quality", steps=4, seed=7, size=16, guidance_scale=7.0,
                        negative_prompt="blurry")[0]
    np.testing.assert_array_equal(pixels(out), (expected * 255).round().astype(np.uint8))


def test_same_seed_same_pixels_and_adapters_change_them(files, tmp_path, capsys):
    args = ["--adapter", files["ink"], "--prompt", "a cat", *FAST]
    for name, seed, extra in [("a", 1, args), ("b", 1, args), ("c", 2, args), ("d", 1, ["--prompt", "a cat", *FAST])]:
        assert run(capsys, *extra, "--seed", seed, "--out", tmp_path / f"{name}.png")[0] == 0
    a, b, c, d = (pixels(tmp_path / f"{n}.png") for n in "abcd")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)
    assert load_png(tmp_path / "a.png").adapters == [AdapterRef("ink", adapter_hash(files["ink"]), 1.0, 1.0)]
    assert load_png(tmp_path / "d.png").adapters == []


def test_prompt_tags_resolve_through_lora_dir(files, tmp_path, capsys):
    prompt = "a cat <lora:ink:0.6> <lora:film:0.2:0.9> <lora:ink:0.1>"
    out = tmp_path / "tags.png"
    rc, _, _ = run(capsys, "--lora-dir", files["ink"].parent, "--prompt", prompt, *FAST, "--out", out)
    assert rc == 0
    info = load_png(out)
    assert info.prompt == prompt  # nothing appended: every adapter is mentioned
    ink, film = info.adapters
    assert (ink.name, ink.hash, ink.te, ink.unet) == ("ink", adapter_hash(files["ink"]), pytest.approx(0.7),
                                                      pytest.approx(0.7))
    assert film == AdapterRef("film", adapter_hash(files["film"]), 0.2, 0.9)


def test_prompt_tag_wins_over_adapter_multipliers(files, tmp_path, capsys):
    out = tmp_path / "win.png"
    rc, _, err = run(capsys, "--adapter", f"{files['ink']}:0.8", "--prompt", "x <lora:ink:0.3> <hypernet:h:1>",
                     *FAST, "--out", out)
    assert rc == 0 and "ignoring <hypernet:h:1>" in err
    info = load_png(out)
    assert info.prompt == "x <lora:ink:0.3> <hypernet:h:1>"
    assert info.adapters == [AdapterRef("ink", adapter_hash(files["ink"]), 0.3, 0.3)]


def test_model_from_a_diffusers_folder(files, tmp_path, capsys):
    folder = tmp_path / "tiny-model"
    tiny_sd1_pipeline().save_pretrained(folder)
    out = tmp_path / "m.png"
    rc, _, _ = run(capsys, "--model", folder, "--adapter", f"{files['film']}:0.4", "--prompt", "a cat",
                   "--steps", 2, "--out", out)
    assert rc == 0
    info = load_png(out)
    assert info.params["Model"] == "tiny-model" and info.params["Size"] == "16x16"  # the model's native size
    assert info.adapters == [AdapterRef("film", adapter_hash(files["film"]), 0.4, 0.4)]


def test_missing_adapter_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    rc, stdout, err = run(capsys, "--adapter", f"{missing}:0.5", "--prompt", "a cat", "--out", tmp_path / "x.png")
    assert rc == 2 and stdout == ""
    assert "adapter file not found" in err and str(missing) in err
    assert not (tmp_path / "x.png").exists()


def test_unknown_prompt_lora_exits_2(files, tmp_path, capsys):
    rc, _, err = run(capsys, "--adapter", files["ink"], "--prompt", "a <lora:ghost:1>", "--out", tmp_path / "x.png")
    assert rc == 2 and "<lora:ghost>" in err and "--lora-dir" in err
    rc, _, err = run(capsys, "--lora-dir", tmp_path, "--prompt", "a <lora:ghost:1>", "--out", tmp_path / "x.png")
    assert rc == 2 and f"nor in --lora-dir '{tmp_path}'" in err


def test_bad_tag_exits_2(tmp_path, capsys):
    rc, _, err = run(capsys, "--prompt", "a <lora:ink:strong>", "--out", tmp_path / "x.png")
    assert rc == 2 and "not a number" in err
