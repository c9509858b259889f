"""A1111 infotext: write/read round trips, a real-looking A1111 text, adapter hashes, the PNG chunk."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save, save_file

from diffadapt.errors import FormatError, SourceError
from diffadapt.infotext import AdapterRef, adapter_hash, load_png, quote, read, save_png, unquote, write
from diffadapt.prompt import parse

BASE = dict(steps=20, sampler="Euler", cfg_scale=7, seed=1, width=512, height=512)

A1111_TEXT = (
    "masterpiece, best quality, 1girl, (ink wash:1.2), <lora:add_detail:0.5>, <lora:Ink, Style v2:0.7:0.4>\n"
    "looking at viewer <hypernet:anime:1>\n"
    "Negative prompt: (worst quality:1.4), lowres, bad anatomy\n"
    "extra limbs\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.4, "
    'ADetailer prompt: "a \\"smile\\", face: happy", Hires upscale: 2, Hires upscaler: Latent, '
    'Lora hashes: "add_detail: 7c6bad76eb54, Ink Style v2: 0123456789ab", '
    'TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
)


def test_write_matches_a1111_layout():
    text = write(prompt="a cat, <lora:ink:0.8>", negative_prompt="blurry, bad", model="sd15", model_hash="6ce0161689",
                 adapters=[("ink", "1a2b3c4d5e6f", 0.8), ("film", "0f1e2d3c4b5a", (0.5, 0.3))], **BASE)
    assert text == (
        "a cat, <lora:ink:0.8> <lora:film:0.5:0.3>\n"
        "Negative prompt: blurry, bad\n"
        "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: sd15, "
        'Lora hashes: "ink: 1a2b3c4d5e6f, film: 0f1e2d3c4b5a"'
    )


def test_write_leaves_out_empty_fields():
    text = write(prompt="a cat", **BASE)
    assert text == "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512"


def test_write_quotes_values_with_commas_colons_or_newlines():
    text = write(prompt="p", model="my, model: v2", schedule_type="Karras", extra={"Note": 'say "hi"\nbye', "X": 1.5},
                 **BASE)
    last = text[text.index("Steps:"):]
    assert 'Model: "my, model: v2"' in last
    assert 'Note: "say \\"hi\\"\\nbye"' in last
    assert "Schedule type: Karras" in last and "X: 1.5" in last
    assert read(text).params["Note"] == 'say "hi"\nbye'


@pytest.mark.parametrize("prompt,negative,adapters", [
    ("a cat", "", []),
    ("a cat, best quality", "blurry, lowres", [AdapterRef("ink", "1a2b3c4d5e6f", 0.8, 0.8)]),
    ("a cat <lora:ink:0.6>", "", [AdapterRef("ink", "aaaaaaaaaaaa", 0.6, 0.6),
                                   AdapterRef("film", "bbbbbbbbbbbb", 0.5, -0.3)]),
    ("line one, (x:1.2)\nline two: yes", "neg one\nneg two", [AdapterRef("sub/dir/ink v2", None, 1.0, 0.25)]),
    ("", "", [AdapterRef("only", "cccccccccccc", 1.0, 1.0)]),
    ("unicode ☃ prompt", "ネガティブ", []),
])
def test_write_read_round_trip(prompt, negative, adapters):
    text = write(prompt=prompt, negative_prompt=negative, model="sd15", adapters=adapters, **BASE)
    info = read(text)
    assert info.prompt.startswith(prompt) and parse(info.prompt).prompt == parse(prompt).prompt
    assert info.negative_prompt == negative
    assert info.params["Steps"] == "20" and info.params["Seed"] == "1" and info.params["Size"] == "512x512"
    assert info.params["CFG scale"] == "7" and info.params["Model"] == "sd15"
    assert info.adapters == adapters
    assert write(prompt=info.prompt, negative_prompt=negative, model="sd15", adapters=info.adapters, **BASE) == text


def test_read_real_a1111_infotext():
    info = read(A1111_TEXT)
    assert info.prompt == (
        "masterpiece, best quality, 1girl, (ink wash:1.2), <lora:add_detail:0.5>, <lora:Ink, Style v2:0.7:0.4>\n"
        "looking at viewer <hypernet:anime:1>"
    )
    assert info.negative_prompt == "(worst quality:1.4), lowres, bad anatomy\nextra limbs"
    p = info.params
    assert p["Steps"] == "28" and p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
    assert p["CFG scale"] == "7.5" and p["Seed"] == "1234567890" and p["Size"] == "512x768"
    assert p["Model hash"] == "6ce0161689" and p["Model"] == "v1-5-pruned-emaonly"
    assert p["VAE"] == "vae-ft-mse-840000-ema-pruned.safetensors"
    assert p["ADetailer prompt"] == 'a "smile", face: happy'
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54, Ink Style v2: 0123456789ab"
    assert p["TI hashes"] == "easynegative: c74b4e810b03" and p["Version"] == "v1.10.1"
    assert info.adapters == [
        AdapterRef("add_detail", "7c6bad76eb54", 0.5, 0.5),
        AdapterRef("Ink, Style v2", "0123456789ab", 0.7, 0.4),  # hashes name it without ',' and ':'
    ]


def test_read_without_parameter_line_is_all_prompt():
    info = read("just a prompt, with: colons\nNegative prompt: bad")
    assert (info.prompt, info.negative_prompt, info.params) == ("just a prompt, with: colons", "bad", {})


def test_read_tag_without_hash():
    info = read("x <lora:ink:0.5>\nSteps: 1, Sampler: Euler, Seed: 2")
    assert info.adapters == [AdapterRef("ink", None, 0.5, 0.5)]


def test_quote_unquote():
    assert quote("Euler a") == "Euler a" and quote(7) == "7"
    assert quote("a, b") == '"a, b"' and quote("a: b") == '"a: b"' and quote("☃,") == '"☃,"'
    assert unquote('"a, \\"b\\""') == 'a, "b"' and unquote("plain") == "plain" and unquote('"bad') == '"bad'


# --------------------------------------------------------------------------- hashes


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"lora_unet_x.lora_down.weight": torch.randn(4, 8, generator=g),
            "lora_unet_x.lora_up.weight": torch.randn(8, 4, generator=g, dtype=torch.float64).half(),
            "lora_unet_x.alpha": torch.tensor(2.0)}


def _addnet_reference(data: bytes) -> str:
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def test_adapter_hash_skips_the_safetensors_header(tmp_path):
    path = tmp_path / "ink.safetensors"
    save_file(_tensors(), path, metadata={"ss_output_name": "ink", "ss_network_dim": "4"})
    data = path.read_bytes()
    assert adapter_hash(path) == _addnet_reference(data)[:12]
    assert adapter_hash(str(path), length=None) == _addnet_reference(data)
    assert adapter_hash(data) == adapter_hash(path)  # bytes are recognised as safetensors by their header
    full = hashlib.sha256(data).hexdigest()
    assert adapter_hash(path, full_file=True, length=None) == full
    assert adapter_hash(path, full_file=True, length=10) == full[:10]  # AutoV2
    assert adapter_hash(path) != full[:12]


def test_adapter_hash_ignores_metadata_like_kohyas_sshs_model_hash(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(_tensors(), a, metadata={"ss_output_name": "a"})
    save_file(_tensors(), b, metadata={"ss_output_name": "b", "modelspec.title": "a much longer title " * 20})
    assert a.read_bytes() != b.read_bytes()
    assert adapter_hash(a) == adapter_hash(b)
    # kohya's precalculate_safetensors_hashes: addnet hash of the tensors re-saved with ss_ metadata only
    assert adapter_hash(save(_tensors(), {"ss_output_name": "a"})) == adapter_hash(a)


def test_adapter_hash_of_other_files_is_the_whole_file(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(_tensors(), path)
    assert adapter_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert adapter_hash(b"not safetensors") == hashlib.sha256(b"not safetensors").hexdigest()[:12]


def test_adapter_hash_errors(tmp_path):
    with pytest.raises(SourceError):
        adapter_hash(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(FormatError):
        adapter_hash(bad)


# --------------------------------------------------------------------------- PNG


@pytest.mark.parametrize("prompt", ["a cat <lora:ink:0.8>", "unicode ☃ <lora:墨水:0.5>"])
def test_png_round_trip(tmp_path, prompt):
    image = np.random.default_rng(0).random((1, 12, 10, 3), dtype=np.float32)
    text = write(prompt=prompt, negative_prompt="bad", adapters=[AdapterRef("film", "abcdefabcdef", 0.5, 0.3)], **BASE)
    path = save_png(image, tmp_path / "sub" / "out.png", text)
    with Image.open(path) as im:
        assert im.size == (10, 12) and im.mode == "RGB"
        assert im.info["parameters"] == text
        pixels = np.asarray(im)
    np.testing.assert_array_equal(pixels, (image[0] * 255).round().astype(np.uint8))
    info = load_png(path)
    assert info == read(text)
    assert info.adapters[-1] == AdapterRef("film", "abcdefabcdef", 0.5, 0.3)


def test_png_from_pil_and_uint8(tmp_path):
    arr = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    save_png(arr, tmp_path / "a.png", "p\nSteps: 1, Sampler: Euler, Seed: 3")
    save_png(Image.fromarray(arr), tmp_path / "b.png", "p\nSteps: 1, Sampler: Euler, Seed: 3")
    for name in ("a.png", "b.png"):
        with Image.open(tmp_path / name) as im:
            np.testing.assert_array_equal(np.asarray(im), arr)
        assert load_png(tmp_path / name).params["Seed"] == "3"


def test_load_png_errors(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "plain.png")
    with pytest.raises(FormatError, match="parameters"):
        load_png(tmp_path / "plain.png")
    with pytest.raises(SourceError):
        load_png(tmp_path / "missing.png")
