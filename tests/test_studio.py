"""The studio without a browser: its stack arithmetic against plain ``da.load`` on a fresh pipeline, the
PNG/infotext contract, concurrency, merges, and the adapter folder's defences (names, uploads, changed files)."""

from __future__ import annotations

import os
import re
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import diffadapt as da
from diffadapt.cli import main as cli_main
from diffadapt.infotext import adapter_hash, load_png, read
from diffadapt.io import write_safetensors
from diffadapt.prompt import parse
from diffadapt.studio import Cancelled, Request, Slot, UnsafeNameError, demo_studio
from diffadapt.studio.launch import parser as studio_parser
from diffadapt.testing import tiny_sd1_pipeline

ROOT = Path(__file__).resolve().parents[1]
R = Request("a photo of a cat", seed=3, steps=2, width=32, height=32)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return demo_studio(tmp_path_factory.mktemp("adapters"), previews=False)


def px(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def image(studio, req=R, slots=None, **kw):
    return px(studio.generate(req, slots, **kw)[0].image)


def reference(studio, weights: dict, *, req=R) -> np.ndarray:
    """The same request on a fresh pipeline with the adapter files loaded by plain ``da.load``."""
    pipe = tiny_sd1_pipeline()
    for name, w in weights.items():
        da.load(pipe, str(studio.adapter_dir / f"{name}.safetensors"), name, weight=w)
    generator = torch.Generator("cpu").manual_seed(req.seed)
    with torch.no_grad():
        out = pipe(req.prompt.split("<")[0].strip(" ,"), num_inference_steps=req.steps, guidance_scale=req.cfg,
                   width=req.width, height=req.height, generator=generator, output_type="pil").images[0]
    return px(out)


def test_demo_adapters_are_three_methods_with_metadata(studio):
    cards = {c["name"]: c for c in studio.catalog()}
    assert {n: c["methods"] for n, c in cards.items()} == {"film": ["loha"], "grain": ["lokr"], "ink": ["lora"]}
    assert cards["ink"]["trigger_words"] == ["ink wash"] and cards["ink"]["base_family"] == "sd1"
    assert all(c["ranks"] == [4] and c["components"] == ["text_encoder", "unet"] for c in cards.values())


@pytest.mark.parametrize("tags, weights", [
    ("<lora:ink:0.8>", {"ink": 0.8}),
    ("<lora:grain:0.7:0.3> <lora:film:-0.5>", {"grain": {"text_encoder": 0.7, "unet": 0.3}, "film": -0.5}),
])
def test_tags_equal_plain_load_on_a_fresh_pipeline(studio, tags, weights):
    req = Request(f"a photo of a cat {tags}", seed=3, steps=2, width=32, height=32)
    got = studio.generate(req)[0]
    assert np.array_equal(px(got.image), reference(studio, weights, req=req))
    info = read(got.infotext)
    assert info.prompt == req.prompt and info.params["Size"] == "32x32" and info.params["Seed"] == "3"
    for ref in info.adapters:
        w = weights[ref.name]
        assert (ref.te, ref.unet) == ((w["text_encoder"], w["unet"]) if isinstance(w, dict) else (w, w))
        assert ref.hash == adapter_hash(studio.adapter_dir / f"{ref.name}.safetensors")


def test_sliders_tags_and_zero(studio):
    off = image(studio)
    assert np.array_equal(image(studio, R, {"ink": 0.0, "film": 0.0}), off)  # weight 0 is off
    slider = image(studio, R, {"grain": Slot(0.3, te=0.7)})
    tag = image(studio, Request("a photo of a cat <lora:grain:0.7:0.3>", seed=3, steps=2, width=32, height=32),
                {"grain": 2.0})  # the tag wins over the slider
    assert np.array_equal(slider, tag)
    assert np.abs(image(studio, R, {"grain": 0.5}) - image(studio, R, {"grain": 1.0})).mean() > 1.0
    assert np.array_equal(image(studio), off)  # nothing stays applied between requests


def test_png_is_lossless_with_parameters(studio):
    result = studio.generate(R, {"ink": 1.0}, batch=2)
    assert [r.seed for r in result] == [3, 4]
    for r in result:
        with Image.open(r.path) as im:
            assert im.format == "PNG" and np.array_equal(px(im.convert("RGB")), px(r.image))
        assert load_png(r.path).params == read(r.infotext).params
    assert np.array_equal(px(result[1].image), image(studio, Request(R.prompt, seed=4, steps=2, width=32, height=32),
                                                     {"ink": 1.0}))


def test_random_seed_sampler_and_preset(studio):
    r = studio.generate(Request(R.prompt, seed=-1, steps=2, width=32, height=32, sampler="DPM++ 2M Karras"))[0]
    info = read(r.infotext)
    assert (info.params["Sampler"], info.params["Schedule type"]) == ("DPM++ 2M", "Karras")
    again = Request(R.prompt, seed=int(info.params["Seed"]), steps=2, width=32, height=32, sampler="DPM++ 2M Karras")
    assert np.array_equal(px(r.image), image(studio, again))
    assert type(studio.pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # swapped back
    mid = studio.generate(R, {"ink": Slot(1.0, preset="mid only")})[0]
    assert "Lora block weights: ink=mid only" in mid.infotext
    assert not np.array_equal(px(mid.image), image(studio, R, {"ink": 1.0}))
    with pytest.raises(da.DiffAdaptError, match="sampler 'nope'"):
        studio.generate(Request(R.prompt, sampler="nope"))


def test_grid_and_compare(studio):
    grid, cells = studio.grid(R, {"ink": 1.0}, rows=["film 0", "film 1"], columns=["grain 0", "grain 1"],
                              cells=[[{"film": 0, "grain": 0}, {"film": 0, "grain": 1}],
                                     [{"film": 1, "grain": 0}, {"film": 1, "grain": 1}]])
    assert np.array_equal(px(cells[3].image), image(studio, R, {"ink": 1.0, "film": 1.0, "grain": 1.0}))
    assert np.array_equal(px(cells[0].image), image(studio, R, {"ink": 1.0}))
    assert grid.image.width > 64 and grid.image.height > 64 and load_png(grid.path).prompt.startswith(R.prompt)
    with_, without = studio.compare(Request("a photo of a cat <lora:ink:1>", seed=3, steps=2, width=32, height=32))
    assert np.array_equal(px(without.image), image(studio)) and not np.array_equal(px(with_.image), image(studio))


def test_cancel_stops_between_steps_and_restores(studio):
    steps = []

    def on_step(k, n):
        steps.append(k)
        studio.cancel("me")

    with pytest.raises(Cancelled):
        studio.generate(Request(R.prompt, seed=3, steps=4, width=32, height=32), {"ink": 1}, token="me",
                        on_step=on_step)
    assert steps == [1]
    assert np.array_equal(image(studio, R, {}, token="me"), image(studio))  # a new request clears the flag


def _deltas(pipe, base) -> dict[str, torch.Tensor]:
    return {k: v - base[k] for k, v in _params(pipe).items()}


def _params(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


@pytest.mark.parametrize("method, rank, tags", [
    ("cat", None, "<lora:ink:0.6:0.3>"),  # exact: LoRA only
    ("svd", 4, "<lora:ink:0.6> <lora:film:0.4:0.2>"),
])
def test_merge_file_equals_the_stack_within_its_error(studio, method, rank, tags):
    path, error = studio.merge(f"mix-{method}", method=method, rank=rank, tags=tags)
    assert path == studio.adapter_dir / f"mix-{method}.safetensors"
    base = _params(tiny_sd1_pipeline())
    stack = tiny_sd1_pipeline()
    for entry in parse(tags).stack:
        da.load(stack, str(studio.adapter_dir / f"{entry.name}.safetensors"), weight=entry.weight)
    merged = tiny_sd1_pipeline()
    da.load(merged, str(path))
    want, got = _deltas(stack, base), _deltas(merged, base)
    num = sum(float((got[k] - want[k]).double().norm() ** 2) for k in want)
    den = sum(float(want[k].double().norm() ** 2) for k in want)
    assert (num / den) ** 0.5 <= error * (1 + 1e-3) + 1e-6
    assert (error < 1e-6) if method == "cat" else (0 < error < 1)
    with pytest.raises(da.DiffAdaptError, match="already exists"):
        studio.merge(f"mix-{method}", tags=tags)


@pytest.mark.parametrize("name", ["../../../x", "/tmp/x", "a/b", "..", ".hidden", "x:y", "", " x"])
def test_merge_names_stay_in_the_folder(studio, name, tmp_path):
    before = set(os.listdir(studio.adapter_dir))
    with pytest.raises(UnsafeNameError, match="name"):
        studio.merge(name, tags="<lora:ink:1>")
    assert set(os.listdir(studio.adapter_dir)) == before


@pytest.mark.parametrize("tag", ["<lora:/etc/x:1>", "<lora:../../x:1>", "<lora:..\\x:1>", "<lora:~/x:1>",
                                 "<lyco:sub/ink:1>"])
def test_tag_paths_are_refused(studio, tag):
    with pytest.raises(UnsafeNameError, match="adapter folder|absolute"):
        studio.generate(Request(f"a cat {tag}", seed=0, steps=1, width=32, height=32))


def test_unknown_adapter_is_a_clear_error(studio):
    with pytest.raises(da.SourceError, match="no adapter 'nope'"):
        studio.generate(Request("a cat <lora:nope:1>", steps=1))


def test_uploads_never_replace(studio, tmp_path):
    src = tmp_path / "ink.safetensors"
    shutil.copyfile(studio.adapter_dir / "film.safetensors", src)
    ink = (studio.adapter_dir / "ink.safetensors").read_bytes()
    studio.load("ink")
    assert studio.upload(src) == "ink-1"
    assert (studio.adapter_dir / "ink.safetensors").read_bytes() == ink
    assert (studio.adapter_dir / "ink-1.safetensors").read_bytes() == src.read_bytes()
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for file, match in [(bad, "cannot read safetensors"), (tmp_path / "x.txt", "not a .safetensors"),
                        (tmp_path / ".evil.safetensors", "starts with '.'")]:
        if not file.exists():
            file.write_bytes(src.read_bytes())
        with pytest.raises(da.DiffAdaptError, match=match):
            studio.upload(file)
    assert not any(p.name.startswith(("broken", ".", "x")) for p in studio.adapter_dir.iterdir())


def test_a_file_changed_on_disk_changes_nothing_until_refresh(studio):
    req = Request("a cat <lora:grain:1>", seed=5, steps=2, width=32, height=32)
    before = studio.generate(req)[0]
    path = studio.adapter_dir / "grain.safetensors"
    saved = path.read_bytes()
    try:
        with open(path, "r+b") as f:  # in place: a memory-mapped copy would SIGBUS or see the new bytes
            f.write((studio.adapter_dir / "ink.safetensors").read_bytes()[: len(saved)])
            f.truncate(len(saved) // 3)
        after = studio.generate(req)[0]
        assert np.array_equal(px(after.image), px(before.image)) and after.infotext == before.infotext
        studio.refresh()
        with pytest.raises(da.FormatError, match="grain"):
            studio.generate(req)
    finally:
        path.write_bytes(saved)
        studio.refresh()
    assert np.array_equal(image(studio, req), px(before.image))


def test_cli_and_wrapper_help(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli_main(["studio", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f in out for f in ("--model", "--adapters", "--host", "--port", "--share", "--demo"))
    assert cli_main(["studio"]) == 2 and "--demo" in capsys.readouterr().err
    args = studio_parser().parse_args(["--demo"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)  # this machine only by default
    monkeypatch.setattr(sys, "argv", ["ui/studio.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "ui" / "studio.py"), run_name="__main__")
    assert e.value.code == 0 and "--demo" in capsys.readouterr().out


def test_samplers_follow_the_scheduler():
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    from diffadapt.models import make_scheduler, sampler_name, samplers_for

    flow = FlowMatchEulerDiscreteScheduler()
    assert samplers_for(flow) == ["Euler"] and type(make_scheduler(flow, "Euler")) is FlowMatchEulerDiscreteScheduler
    euler = EulerDiscreteScheduler()
    karras = make_scheduler(euler, "DPM++ 2M Karras")
    assert type(karras) is DPMSolverMultistepScheduler and sampler_name(karras) == ("DPM++ 2M", "Karras")
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers_for(euler))
    with pytest.raises(da.UnsupportedError, match="not available"):
        make_scheduler(flow, "DDIM")


# -- block presets per model family ----------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"(?:lora_unet_|transformer\.)(down_blocks|up_blocks|mid_block|single_transformer_blocks|"
                        r"transformer_blocks)[._](\d+)?")
_KIND = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid", "transformer_blocks": "blocks",
         "single_transformer_blocks": "single_blocks"}


def _dit_lora(pipe, folder: Path, name: str) -> None:
    """A diffusers-format LoRA on every attention q/k/v of the transformer, and on proj_out (outside any block)."""
    g = torch.Generator().manual_seed(7)
    sd = {}
    for n, m in pipe.transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and (n.endswith(("attn.to_q", "attn.to_k", "attn.to_v")) or n == "proj_out"):
            sd[f"transformer.{n}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.3
            sd[f"transformer.{n}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
    write_safetensors(folder / f"{name}.safetensors", sd, {})


def _named(preset: dict, kind: str, index: int | None) -> bool:
    v = preset[kind]
    return bool(v[index] if isinstance(v, list) else v)


@pytest.mark.parametrize("family, offered", [
    ("sd1", ["all", "down only", "mid only", "up only", "down + mid", "down + up", "mid + up"]),
    ("flux", ["all", "blocks only", "single_blocks only"]),
    ("sd3", ["all", "blocks 0 only", "blocks 1 only"]),  # one kind of block: its halves
])
def test_presets_are_the_models_blocks_and_change_exactly_those(family, offered, studio, request, tmp_path):
    """Each preset equals the adapter file cut down to the blocks it names (an independent reference: no block
    weights at all), differs from "all", and is what diffadapt reports per module while the image is made."""
    from diffadapt.pipeline import registry
    from diffadapt.studio import Studio
    from diffadapt.weights import block_of

    if family == "sd1":
        st, name = studio, "ink"
    else:
        pipe = request.getfixturevalue(family)
        st, name = Studio(pipe, adapter_dir=tmp_path), "style"
        _dit_lora(pipe, tmp_path, name)
    assert list(st.presets) == offered
    file = st.adapter_dir / f"{name}.safetensors"
    tensors, req, w = load_file(str(file)), R, 0.8
    everything = image(st, req, {name: w})
    for k, label in enumerate(offered[1:]):
        preset = st.presets[label]
        seen: dict[str, float] = {}

        def report(step, total):
            loaded = registry(st.pipe).adapters[name]
            seen.update({f"{t.component}:{t.module_name}": loaded.strength(t.component, t.module_name)
                         for t in loaded.targets})

        got = image(st, req, {name: Slot(w, preset=label)}, on_step=report)
        for where, strength in seen.items():
            component, module = where.split(":")
            hit = block_of(module) if component == st.denoiser else None
            assert strength == pytest.approx(w if hit is None or _named(preset, *hit) else 0.0), (label, where)
        assert any(s == 0.0 for s in seen.values()) and any(s != 0.0 for s in seen.values())
        cut = {key: v for key, v in tensors.items()
               if (m := _BLOCK_KEY.match(key)) is None or _named(preset, _KIND[m[1]], m[2] and int(m[2]))}
        assert len(cut) < len(tensors)
        write_safetensors(st.adapter_dir / f"cut-{family}-{k}.safetensors", cut, {})
        assert np.array_equal(got, image(st, req, {f"cut-{family}-{k}": w})), label
        assert not np.array_equal(got, everything), label
        assert f"Lora block weights: {name}={label}" in st.generate(req, {name: Slot(w, preset=label)})[0].infotext
        (st.adapter_dir / f"cut-{family}-{k}.safetensors").unlink()
    with pytest.raises(da.DiffAdaptError, match="does not exist for this"):
        st.generate(req, {name: Slot(w, preset="up only" if family != "sd1" else "blocks only")})


def test_cancel_while_waiting_for_the_pipeline_runs_no_step(studio, monkeypatch):
    """A request cancelled while another holds the pipeline stops before its first denoising step."""
    import threading

    from diffadapt.pipeline import registry

    calls: list[int] = []
    hook = studio.pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    lock, errors, started = registry(studio.pipe).lock, [], threading.Event()
    check = studio._check
    monkeypatch.setattr(studio, "_check", lambda req: (started.set(), check(req))[1])  # after its old cancel cleared

    def waiting():
        try:
            studio.generate(R, {"ink": 1.0}, token="waiter")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    try:
        assert lock.acquire(timeout=30)
        thread = threading.Thread(target=waiting)
        thread.start()
        assert started.wait(30)
        studio.cancel("waiter")
        lock.release()
        thread.join(60)
    finally:
        hook.remove()
    assert [type(e) for e in errors] == [Cancelled] and calls == []
