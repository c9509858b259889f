"""The Gradio studio (``ui/``): its logic on the tiny pipeline, the app's construction, and one browser run."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import diffadapt as da  # noqa: E402
from diffadapt.cli import main as cli_main  # noqa: E402
from diffadapt.infotext import adapter_hash, read  # noqa: E402
from ui.logic import demo_studio  # noqa: E402
from ui.studio import build_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return demo_studio(adapter_dir=tmp_path_factory.mktemp("adapters"))


def px(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_demo_adapters_loaded(studio):
    assert studio.available() == ["film", "grain", "ink"]
    assert set(da.adapters(studio.pipe)) == {"film", "grain", "ink"}
    methods = {n: set(da.inspect(str(studio.adapter_dir / f"{n}.safetensors")).methods) for n in ("ink", "film", "grain")}
    assert methods == {"ink": {"lora"}, "film": {"loha"}, "grain": {"lokr"}}


def test_weights_change_the_image_and_seed_repeats(studio):
    off, _ = studio.generate("a cat", seed=3)
    on, _ = studio.generate("a cat", weights={"ink": 1.0, "film": -0.5}, seed=3)
    again, _ = studio.generate("a cat", weights={"ink": 1.0, "film": -0.5}, seed=3)
    other, _ = studio.generate("a cat", weights={"ink": 1.0, "film": -0.5}, seed=4)
    assert on.size == (64, 64)
    assert np.abs(px(on) - px(off)).mean() > 1.0
    assert np.array_equal(px(on), px(again))
    assert not np.array_equal(px(on), px(other))
    assert np.array_equal(px(studio.generate("a cat", seed=3)[0]), px(off))  # the stack is undone after each request


def test_prompt_tags_apply_and_infotext_reads_back(studio):
    tagged, text = studio.generate("a cat <lora:grain:0.7:0.3>", weights={"grain": 2.0}, negative_prompt="blurry",
                                   seed=5, steps=3, cfg=5.0)
    same, _ = studio.generate("a cat", weights={"grain": {"text_encoder": 0.7, "unet": 0.3}}, seed=5, steps=3,
                              cfg=5.0, negative_prompt="blurry")
    slider, _ = studio.generate("a cat", weights={"grain": 2.0}, seed=5, steps=3, cfg=5.0, negative_prompt="blurry")
    assert np.array_equal(px(tagged), px(same)) and not np.array_equal(px(tagged), px(slider))
    info = read(text)
    assert info.prompt == "a cat <lora:grain:0.7:0.3>" and info.negative_prompt == "blurry"
    assert (info.params["Seed"], info.params["Steps"], info.params["CFG scale"], info.params["Size"]) == ("5", "3", "5", "64x64")
    [ref] = info.adapters
    assert (ref.name, ref.te, ref.unet) == ("grain", 0.7, 0.3)
    assert ref.hash == adapter_hash(studio.adapter_dir / "grain.safetensors")


def test_unknown_tag_is_an_error(studio):
    with pytest.raises(da.SourceError, match="nope"):
        studio.generate("a cat <lora:nope:1>")


def test_merge_writes_a_file_inspect_reads(studio):
    before = {n: a.enabled for n, a in da.adapters(studio.pipe).items()}
    path, error = studio.merge({"ink": 0.6, "film": 0.4, "grain": 0.0}, name="mix")
    assert path == studio.adapter_dir / "mix.safetensors" and path.is_file()
    assert 0.0 <= error < 0.5
    info = da.inspect(str(path))
    assert set(info.methods) == {"lora"} and set(info.components) == {"unet", "text_encoder"}
    assert info.metadata["diffadapt_merge_method"] == "svd"
    assert {n: a.enabled for n, a in da.adapters(studio.pipe).items()} == before  # pipeline as before
    assert "mix" in studio.available()
    with pytest.raises(da.DiffAdaptError, match="already exists"):
        studio.merge({"ink": 1.0}, name="mix")


def test_build_app_constructs(studio):
    import gradio as gr

    assert isinstance(build_app(studio=studio), gr.Blocks)


def test_cli_studio_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["studio", "--help"])
    assert e.value.code == 0 and "--adapters" in capsys.readouterr().out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_browser_generate(studio):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    app = build_app(studio=studio)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                page.wait_for_selector("#generate", timeout=30_000)
                page.fill("#prompt textarea", "a cat <lora:ink:0.8>")
                page.click("#generate")
                page.wait_for_selector("#image img", timeout=30_000)
                page.wait_for_function(
                    "document.querySelector('#infotext textarea').value.includes('Seed: 0')", timeout=30_000)
                text = page.input_value("#infotext textarea")
                assert text.startswith("a cat <lora:ink:0.8>") and "Lora hashes" in text
                out = ROOT / "out" / "studio.png"
                out.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(out), full_page=True)
            finally:
                browser.close()
    finally:
        app.close()
