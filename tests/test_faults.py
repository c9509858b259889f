"""Faults and hostile input: every verb is all or nothing, bad numbers and hostile files are refused.

Each case asserts the error class and message, a bit-identical model afterwards (``param_hashes`` of every
parameter and buffer) and an unchanged registry, and — for files — nothing partial on disk. Faults are
injected at every kind of write step (the k-th patch-mode module write, the k-th peft layer re-scaling),
first, middle and last, as ``RuntimeError`` and as ``KeyboardInterrupt``.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import re
import struct
import sys
import threading
import time

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import diffadapt as da
from diffadapt import io
from diffadapt import peft_bridge
from diffadapt.backends import patch
from diffadapt.cli import main
from diffadapt.fixtures import lycoris_file
from diffadapt.pipeline import registry
from diffadapt.testing import param_hashes, tiny_sd1_pipeline
from diffadapt.transaction import FairRLock

ATTN = ["Transformer2DModel"]
MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a 32×32 Linear


@pytest.fixture(scope="module")
def base():
    return tiny_sd1_pipeline()


def _some(sd):  # one attention block and one text-encoder layer: every code path, few modules
    return {k: v for k, v in sd.items() if "down_blocks_0_attentions_0" in k or "layers_0_" in k}


@pytest.fixture(scope="module")
def files(base):
    """Three kohya LoRAs over UNet attention and the text encoder (a, b, c) and a UNet-only one (u)."""
    out = {}
    for i, name in enumerate("abc"):
        unet, _ = lycoris_file(base.unet, prefix="lora_unet", seed=10 * i + 1, target_modules=ATTN, target_names=[])
        te, _ = lycoris_file(base.text_encoder, prefix="lora_te", seed=10 * i + 2)
        out[name] = _some({**unet, **te})
    out["u"] = _some(lycoris_file(base.unet, prefix="lora_unet", seed=40, target_modules=ATTN, target_names=[])[0])
    return out


def make(base, files):
    """a (patch), b (patch, weight per component), d (patch, disabled), i (inject): every kind of record.
    (A deep copy of a pipeline starts a fresh registry, so each case builds its own.)"""
    pipe = copy.deepcopy(base)
    da.load(pipe, files["a"], "a")
    da.load(pipe, files["b"], "b", weight={"unet": 0.7, "text_encoder": 0.4})
    da.load(pipe, files["u"], "d", weight=0.5)
    da.disable(pipe, "d")
    da.load(pipe, {k: v * 0.5 for k, v in files["c"].items()}, "i", mode="inject")
    return pipe


@pytest.fixture
def loaded(base, files):
    return make(base, files)


@pytest.fixture(scope="module")
def shared(base, files):
    """For cases that must change nothing (each asserts it did not): one pipeline for all of them."""
    return make(base, files)


def records(pipe) -> dict:
    reg = registry(pipe)
    return {n: (a.mode, repr(a.weight), a.enabled, id(a.spec), id(a.info), len(a.targets))
            for n, a in reg.adapters.items()}


def state(pipe) -> tuple[dict, dict]:
    return param_hashes(pipe), records(pipe)


# -- faults at every write step ------------------------------------------------------------------------


ENTERED: list = []  # callbacks run inside the block (the table counts only the enter's writes)


def _using(pipe, files, *, fail_on_exit: list | None = None):
    with da.using(pipe, {"a": 0.5, "c": files["c"], "i": 0.3}):
        for f in ENTERED:
            f()
        if fail_on_exit is not None:
            fail_on_exit.append(state(pipe))  # the block's state: what a failed exit must keep


VERBS = {
    "load": lambda p, f: da.load(p, f["c"], "c"),
    "load inject": lambda p, f: da.load(p, f["c"], "c", mode="inject"),
    "unload one": lambda p, f: da.unload(p, "a"),
    "unload all": lambda p, f: da.unload(p),
    "hotswap": lambda p, f: da.hotswap(p, name="a", source=f["c"]),
    "set_weights": lambda p, f: da.set_weights(p, {"a": 0.3, "b": {"unet": 0.5}, "i": 0.6}),
    "disable": lambda p, f: da.disable(p),
    "enable": lambda p, f: da.enable(p, "d"),
    "merge": lambda p, f: da.merge(p, {"a": 0.5, "b": 0.5}, "m", method="cat"),
    "fuse": lambda p, f: da.fuse(p),
    "unfuse": lambda p, f: da.unfuse(p, "a"),
    "using": _using,
}
POINTS = {"module write": (patch.Slot, "write"), "layer scaling": (peft_bridge, "set_strength")}


class Counter:
    def __init__(self, monkeypatch, point: str, fail_at: int | None = None, exc: type = RuntimeError):
        owner, attr = POINTS[point]
        original, self.calls = getattr(owner, attr), 0

        def flaky(*args, **kwargs):
            self.calls += 1
            if self.calls == fail_at:
                raise exc("injected fault")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attr, flaky)


@pytest.mark.parametrize("verb", list(VERBS))
def test_fault_at_every_write_step_changes_nothing(base, files, monkeypatch, verb):
    run = VERBS[verb]
    clean = make(base, files)
    counters = {}
    with monkeypatch.context() as m:
        counters = {p: Counter(m, p) for p in POINTS}
        calls = {}
        m.setattr(__import__(__name__), "ENTERED", [lambda: calls.update({p: c.calls for p, c in counters.items()})])
        run(clean, files)
    calls = calls or {p: c.calls for p, c in counters.items()}  # using: the writes of its enter only
    after_clean = state(clean)
    steps = [(p, k) for p, n in calls.items() for k in sorted({1, n}) if n]  # the first write and the last
    assert steps, f"{verb} writes nothing"
    for i, (point, k) in enumerate(steps):
        pipe = make(base, files)
        before = state(pipe)
        exc = KeyboardInterrupt if i % 2 else RuntimeError
        with monkeypatch.context() as m:
            Counter(m, point, fail_at=k, exc=exc)
            with pytest.raises(exc, match="injected fault"):
                run(pipe, files)
        assert state(pipe) == before, f"{verb}: fault at {point} #{k} left the model or registry changed"
    run(pipe, files)  # and the verb still works after a fault, with the same result
    assert param_hashes(pipe) == after_clean[0], f"{verb}: after a fault at {point} #{k}"


def test_fault_on_using_exit_keeps_the_block_state(loaded, files, monkeypatch):
    """The exit is one transaction too: a fault while restoring leaves the block's state whole, not half."""
    pipe = loaded
    with monkeypatch.context() as m:
        counter = Counter(m, "module write")
        _using(pipe, files)
    before_exit_writes = counter.calls
    inside: list = []
    with monkeypatch.context() as m:
        Counter(m, "module write", fail_at=before_exit_writes - 1)
        with pytest.raises(RuntimeError, match="injected fault"):
            _using(pipe, files, fail_on_exit=inside)
    assert state(pipe)[0] == inside[0][0]


def test_failed_summary_hotswap_and_using_change_nothing(loaded, files, monkeypatch):
    """The summary is built before the first write (a RecursionError there used to leave 133 weights swapped)."""
    pipe = loaded
    before = state(pipe)

    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(sys.modules["diffadapt.hotswap"], "summarize", broken)  # (da.hotswap is the verb)
    with pytest.raises(RecursionError):
        da.hotswap(pipe, name="a", source=files["c"])
    with pytest.raises(RecursionError):
        with da.using(pipe, {"a": files["c"]}):
            pass
    assert state(pipe) == before


def test_refused_inject_refresh_keeps_the_weight(loaded, tmp_path):
    """peft's COFT layer cannot hold |w| > 1: the refusal comes after "a"'s modules were rewritten, and
    undoes them; both records keep their weights."""
    import peft

    cfg = peft.OFTConfig(r=0, oft_block_size=4, target_modules=["to_q"], coft=True, eps=1e-2, init_weights=False)
    peft.get_peft_model(copy.deepcopy(loaded.unet), cfg).save_pretrained(tmp_path / "unet")
    da.load(loaded, tmp_path, "coft", mode="inject")
    before = state(loaded)
    with pytest.raises(da.UnsupportedError, match="COFT"):
        da.set_weights(loaded, {"a": 0.2, "coft": 1.5})
    assert state(loaded) == before
    assert da.get_weights(loaded)["a"] == 1.0 and da.get_weights(loaded)["coft"] == 1.0


# -- bad numbers and hostile files ---------------------------------------------------------------------


def lora(up=1.0, down=1.0, *, out=32, inn=32, r=4, dtype=torch.float32, alpha=None):
    sd = {f"{MODULE}.lora_down.weight": torch.full((r, inn), down, dtype=dtype),
          f"{MODULE}.lora_up.weight": torch.full((out, r), up, dtype=dtype)}
    if alpha is not None:
        sd[f"{MODULE}.alpha"] = torch.tensor(alpha)
    return sd


def with_tensor(suffix, tensor, **extra):
    sd = lora()
    sd[f"{MODULE}.{suffix}"] = tensor
    sd.update({f"{MODULE}.{k}": v for k, v in extra.items()})
    return sd


def peft_dir(tmp, **config):
    folder = tmp / "peft"
    folder.mkdir()
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["to_q"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))  # json writes NaN / Infinity as JS does
    save_file({"base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
               torch.randn(4, 32), "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
               ".lora_B.weight": torch.randn(32, 4)}, folder / "adapter_model.safetensors")
    return folder


def file_with(tmp, sd, metadata):
    path = tmp / "meta.safetensors"
    save_file(sd, path, metadata=metadata)
    return path


def huge_header(tmp):
    """A 1 GiB tensor for a 32×32 layer, as a sparse file: only its header is ever read."""
    path = tmp / "huge.safetensors"
    n = 1 << 28
    header = json.dumps({f"{MODULE}.lora_down.weight": {"dtype": "F32", "shape": [16384, 16384],
                                                        "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n)
    return path


def loop_link(tmp):
    link = tmp / "loop.safetensors"
    link.symlink_to(link)
    return link


def many_keys(tmp):
    """60,000 one-value tensors of unknown modules (header written directly: safetensors' writer is slow at this)."""
    path = tmp / "many.safetensors"
    names = [f"lora_unet_nothing_{i}.lora_{s}.weight" for i in range(30_000) for s in ("up", "down")]
    header = json.dumps({n: {"dtype": "F32", "shape": [1, 1], "data_offsets": [4 * i, 4 * i + 4]}
                         for i, n in enumerate(names)}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4 * len(names)))
    return path


DEEP = '{"a":' * 100_000 + "1" + "}" * 100_000
HOSTILE = [  # id, source builder (tmp -> source), error class (None: loads), message needles
    ("alpha NaN", lambda t: peft_dir(t, lora_alpha=math.nan), da.NonFiniteError, ["lora_alpha", "nan"]),
    ("alpha Infinity", lambda t: peft_dir(t, lora_alpha=math.inf), da.NonFiniteError, ["lora_alpha", "inf"]),
    ("alpha 1e308", lambda t: peft_dir(t, lora_alpha=1e308), da.NonFiniteError, ["lora_alpha", "1e+308"]),
    ("alpha_pattern NaN", lambda t: peft_dir(t, alpha_pattern={"to_q": math.nan}), da.NonFiniteError,
     ["alpha_pattern", "to_q"]),
    ("product overflows", lambda t: lora(1e20, 1e20), da.NonFiniteError,
     ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "float32"]),
    ("alpha tensor 1e36", lambda t: lora(1e4, 1e4, alpha=1e36), da.NonFiniteError, ["to_q", "not finite"]),
    ("LoHa product overflows", lambda t: {f"{MODULE}.{k}": torch.full(shape, 1e10) for k, shape in (
        ("hada_w1_a", (32, 4)), ("hada_w1_b", (4, 32)), ("hada_w2_a", (32, 4)), ("hada_w2_b", (4, 32)))},
     da.NonFiniteError, ["attn1.to_q", "not finite"]),
    ("1 GiB tensor", huge_header, da.ShapeError, ["(16384, 16384)", "lora_down"]),
    ("60k keys", many_keys, da.FormatError, ["60000 tensors"]),
    ("0-d factor", lambda t: with_tensor("lora_down.weight", torch.tensor(1.0)), da.FormatError, ["0-D"]),
    ("rank 0", lambda t: {**with_tensor("lora_down.weight", torch.zeros(0, 32)),
                          f"{MODULE}.lora_up.weight": torch.zeros(32, 0)}, da.FormatError, ["empty", "rank 0"]),
    *[(f"{d} factor", (lambda d: lambda t: with_tensor("lora_down.weight", torch.zeros(4, 32).to(d)))(d),
       da.FormatError, [str(d).removeprefix("torch."), "lora_down"])
      for d in (torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn)],
    ("sparse factor", lambda t: with_tensor("lora_down.weight", torch.zeros(4, 32).to_sparse()), da.FormatError,
     ["sparse"]),
    ("meta factor", lambda t: with_tensor("lora_down.weight", torch.zeros(4, 32, device="meta")), da.FormatError,
     ["meta"]),
    ("looping symlink", loop_link, da.SourceError, ["loop.safetensors", "link"]),
    ("5000-digit number", lambda t: file_with(t, lora(), {"peft_config": '{"": {"r": ' + "7" * 5000 + "}}"}),
     da.FormatError, ["peft_config", "digits"]),
    ("tags nested 100k deep", lambda t: file_with(t, lora(0.01, 0.01), {"ss_tag_frequency": DEEP}), None, []),
    ("5000-digit tag count", lambda t: file_with(t, lora(0.01, 0.01), {"ss_tag_frequency": '{"a": {"x": '
                                                                       + "9" * 5000 + "}}"}), None, []),
]


@pytest.mark.parametrize("verb", ["load", "hotswap"])
@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_source(base, files, shared, tmp_path, case, verb):
    _, build, exc, needles = case
    pipe = shared if exc is not None else make(base, files)
    source = build(tmp_path)
    before = state(pipe)
    t0 = time.perf_counter()
    call = (lambda: da.load(pipe, source, "new")) if verb == "load" else (
        lambda: da.hotswap(pipe, name="a", source=source))
    if exc is None:  # hostile metadata that only the summary reads: ignored, the adapter loads
        info = call()
        assert info.trigger_words == []
        return
    with pytest.raises(exc) as e:
        call()
    assert time.perf_counter() - t0 < 5, "refused only after reading everything"
    assert isinstance(e.value, da.DiffAdaptError)
    for needle in needles:
        assert needle.lower() in str(e.value).lower(), (needle, str(e.value))
    assert state(pipe) == before


def raw_header(tmp, entries, name="hostile.safetensors"):
    """A safetensors file written from a header {key: (dtype, shape)}, data as a sparse hole: only the header
    is meant to be read."""
    size = {"F16": 2, "F32": 4}
    header, offset = {}, 0
    for key, (dtype, shape) in entries.items():
        n = size[dtype] * math.prod(shape)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp / name
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def unknown_50k(tmp):
    return raw_header(tmp, {f"model.layers.{i}.mlp.weight": ("F32", (1,)) for i in range(50_000)})


HEADERS = [  # id, file builder, error class, needles; no model given: the bound is the largest supported layer
    ("1e12-value tensor", lambda t: raw_header(t, {f"{MODULE}.lora_down.weight": ("F16", (1_000_000, 1_000_000)),
                                                   f"{MODULE}.lora_up.weight": ("F16", (32, 4))}),
     da.ShapeError, [f"'{MODULE}.lora_down.weight'", "(1000000, 1000000)", "models diffadapt supports"]),
    ("rank above the weight", lambda t: raw_header(t, {f"{MODULE}.lora_down.weight": ("F32", (4096, 32)),
                                                       f"{MODULE}.lora_up.weight": ("F32", (32, 4096))}),
     da.ShapeError, [f"'{MODULE}.lora_down.weight'", "rank 4096 for a 32×32 weight"]),
    ("PEFT rank above the weight", lambda t: raw_header(t, {"unet.x.lora_A.weight": ("F32", (512, 8)),
                                                            "unet.x.lora_B.weight": ("F32", (16, 512))}),
     da.ShapeError, ["'unet.x.lora_A.weight'", "rank 512 for a 16×8 weight"]),
    ("LoHa 40000² weight", lambda t: raw_header(t, {f"{MODULE}.hada_w1_a": ("F32", (40_000, 1)),
                                                    f"{MODULE}.hada_w1_b": ("F32", (1, 40_000)),
                                                    f"{MODULE}.hada_w2_a": ("F32", (32, 1)),
                                                    f"{MODULE}.hada_w2_b": ("F32", (1, 32))}),
     da.ShapeError, [f"'{MODULE}.hada_w1_b'", "40000×40000 weight"]),
    ("50k unknown keys", unknown_50k, da.FormatError,
     ["50,000 of 50,000 keys", "'model.layers.0.mlp.weight', 'model.layers.1.mlp.weight'", "checkpoint"]),
    ("1 unknown key among known", lambda t: raw_header(t, {f"{MODULE}.lora_down.weight": ("F32", (4, 32)),
                                                           f"{MODULE}.lora_up.weight": ("F32", (32, 4)),
                                                           "ema.step": ("F32", (1,))}),
     da.FormatError, ["key 'ema.step' is not an adapter tensor"]),
]


class ReadSpy:
    """safe_open, recording every tensor whose data is read."""

    reads: list[str] = []

    def __init__(self, *args, **kwargs):
        self.inner = SAFE_OPEN(*args, **kwargs)

    def __enter__(self):
        self.f = self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def get_tensor(self, key):
        ReadSpy.reads.append(key)
        return self.f.get_tensor(key)

    def __getattr__(self, name):
        return getattr(self.f, name)


SAFE_OPEN = io.safe_open


@pytest.mark.parametrize("verb", ["inspect", "convert"])
@pytest.mark.parametrize("case", HEADERS, ids=[c[0] for c in HEADERS])
def test_hostile_header_without_a_model(tmp_path, monkeypatch, case, verb):
    """inspect / convert (no model): refused from the header, no tensor data read, the error naming the key."""
    _, build, exc, needles = case
    source = build(tmp_path)
    monkeypatch.setattr(io, "safe_open", ReadSpy)
    ReadSpy.reads = []
    dest = tmp_path / "out.safetensors"
    with pytest.raises(exc) as e:
        da.inspect(source) if verb == "inspect" else da.convert(source, dest, format="kohya")
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert str(source) in str(e.value) and ReadSpy.reads == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


def test_plausible_headers_still_read(tmp_path):
    """The bounds refuse no real layout: rank above one side of the weight (LyCORIS on conv_out, 4 channels),
    Tucker LoHa (its w1_a is (rank, out)), a full diff as large as T5-XXL's embedding."""
    g = torch.Generator().manual_seed(0)
    conv = {"lora_unet_conv_out.lora_down.weight": torch.randn(8, 32, 3, 3, generator=g),
            "lora_unet_conv_out.lora_up.weight": torch.randn(4, 8, 1, 1, generator=g)}
    tucker = {f"{MODULE}.hada_w1_a": torch.randn(4, 32, generator=g), f"{MODULE}.hada_w1_b": torch.randn(4, 32),
              f"{MODULE}.hada_t1": torch.randn(4, 4, 1, 1), f"{MODULE}.hada_w2_a": torch.randn(4, 32),
              f"{MODULE}.hada_w2_b": torch.randn(4, 32), f"{MODULE}.hada_t2": torch.randn(4, 4, 1, 1)}
    for i, sd in enumerate((conv, tucker)):
        save_file(sd, tmp_path / f"{i}.safetensors")
        assert da.inspect(tmp_path / f"{i}.safetensors").modules == 1
    shapes = {"lora_te2_shared.diff": (32128, 4096)}
    io._check_header("t5", shapes, None)  # 1.3e8 values: the shape alone is checked, nothing allocated


def big_config(tmp):
    folder = peft_dir(tmp)
    with open(folder / "adapter_config.json", "r+b") as f:
        f.truncate(io.MAX_JSON_BYTES + 1)  # a hole: the size alone must refuse it
    return folder


def int_keys_pickle(tmp):
    torch.save({0: torch.zeros(4, 32)}, tmp / "ints.pt")
    return tmp / "ints.pt"


SOURCES = [  # id, source builder, error class, needles: bad sources of every kind, each a clear error
    ("name too long", lambda t: "x" * 5000, da.SourceError, ["not a path that can be opened", "too long"]),
    ("state dict with int keys", lambda t: {0: torch.zeros(4, 32)}, da.FormatError, ["<state dict>", "not strings"]),
    ("pickle with int keys", int_keys_pickle, da.FormatError, ["ints.pt", "not strings"]),
    ("16 MiB adapter_config.json", big_config, da.FormatError, ["adapter_config.json", "16,777,217 bytes"]),
]


@pytest.mark.parametrize("case", SOURCES, ids=[c[0] for c in SOURCES])
def test_bad_sources_are_named(tmp_path, case):
    _, build, exc, needles = case
    with pytest.raises(exc) as e:
        da.inspect(build(tmp_path), allow_pickle=True)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   FileNotFoundError(errno.ENOENT, "No such file or directory")],
                         ids=["permission", "gone since listed"])
def test_os_refusals_are_source_errors(tmp_path, monkeypatch, error):
    """The OS refusing a file is not a malformed file: SourceError naming it, no "truncated?" hint."""
    save_file(lora(), tmp_path / "ink.safetensors")

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(io, "safe_open", refuse)
    with pytest.raises(da.SourceError) as e:
        da.inspect(tmp_path / "ink.safetensors")
    assert str(tmp_path / "ink.safetensors") in str(e.value) and error.strerror in str(e.value)
    assert "truncated" not in str(e.value)


def test_folder_of_one_pickle(tmp_path):
    """A folder holding one checkpoint is read as a file would be once pickles are allowed, and named before."""
    (tmp_path / "ck").mkdir()
    torch.save(lora(), tmp_path / "ck" / "style.pt")
    with pytest.raises(da.SourceError, match="it holds pickle files \\(style.pt\\): pass allow_pickle=True"):
        da.inspect(tmp_path / "ck")
    assert da.inspect(tmp_path / "ck", allow_pickle=True).modules == 1


def test_empty_string_is_not_the_current_folder(tmp_path, monkeypatch):
    """Path("") is "."; an empty source must not read whatever adapter sits in the working folder."""
    save_file(lora(), tmp_path / "here.safetensors")
    monkeypatch.chdir(tmp_path)
    for source in ("", "  "):
        with pytest.raises(da.SourceError, match="empty string"):
            da.inspect(source)
    assert da.inspect(".").modules == 1  # asked for by name, the folder is read


def test_failed_write_removes_the_folders_it_made(tmp_path, monkeypatch):
    save_file(lora(), tmp_path / "in.safetensors")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(da.WriteError, match="No space left"):
        da.convert(tmp_path / "in.safetensors", tmp_path / "new" / "deeper" / "out.safetensors", format="kohya")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_fp16_adapter_overflowing_an_fp16_model():
    """Finite in float32, past 65504 in float16: refused on the fp16 model, loaded on the fp32 one."""
    sd = {"lora_down.weight": torch.full((4, 32), 200.0, dtype=torch.float16),
          "lora_up.weight": torch.full((32, 4), 200.0, dtype=torch.float16)}
    sd = {f"lora_unet_layer.{k}": v for k, v in sd.items()}
    half = torch.nn.Sequential()
    half.add_module("layer", torch.nn.Linear(32, 32).half())
    before = param_hashes(half)
    with pytest.raises(da.NonFiniteError, match=r"layer.*float16"):
        da.load(half, sd, "x")
    assert param_hashes(half) == before and da.adapters(half) == {}
    da.load(half.float(), sd, "x")  # the same file on a float32 model is fine
    assert bool(torch.isfinite(half.layer.weight).all())


@pytest.mark.parametrize("algo, kwargs", [("loha", {}), ("lokr", {}), ("lokr", {"factor": 4}),
                                           ("lokr", {"decompose_both": True, "factor": 4})],
                         ids=["loha", "lokr", "lokr-factor", "lokr-both"])
def test_factor_bounds_hold(base, algo, kwargs):
    """The bound that spares a scan of every written value is a true bound of max|ΔW| (else overflow passes)."""
    from diffadapt.api import read_spec

    sd, _ = lycoris_file(base.unet, algo=algo, prefix="lora_unet", seed=5, std=0.5, **kwargs)
    checked = 0
    for p in read_spec(sd).patches:
        bound = p.params.abs_bound()
        if bound is None:
            continue
        shape = _shape(base.unet, p)
        assert float(p.params.to(dtype=torch.float32).delta(shape).abs().max()) <= bound * (1 + 1e-6)
        checked += 1
    assert checked > 5


def _shape(unet, patch):
    from diffadapt.keys import ModuleIndex

    index = ModuleIndex(unet)
    return index.modules[index.find(patch.module_key, dotted=patch.dotted)].weight.shape


# -- races and the lock ---------------------------------------------------------------------------------


def test_registry_is_created_once_under_races(monkeypatch):
    import diffadapt.pipeline as pl

    made = []

    class Slow(pl.Registry):
        def __init__(self, *a, **kw):
            time.sleep(0.01)  # widen the window two first loads would race in
            made.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(pl, "Registry", Slow)
    target, got = torch.nn.Linear(2, 2), []
    barrier = threading.Barrier(8)

    def first_use():
        barrier.wait()
        got.append(registry(target))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and all(r is got[0] for r in got)


def test_reads_never_see_a_registry_changing_under_them(base, files):
    pipe = copy.deepcopy(base)
    stop, errors = threading.Event(), []

    def churn():
        try:
            for i in range(6):
                da.load(pipe, files["u"], f"x{i}")
            da.unload(pipe)
        except BaseException as e:
            errors.append(e)
        finally:
            stop.set()

    def read():
        try:
            while not stop.is_set():
                for name, info in da.adapters(pipe).items():
                    assert info.name == name
                da.get_weights(pipe)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=churn), threading.Thread(target=read), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and da.adapters(pipe) == {}
    assert param_hashes(pipe) == param_hashes(base)


@pytest.mark.parametrize("verb", ["load", "hotswap", "using"])
def test_sources_are_read_outside_the_lock(loaded, files, monkeypatch, verb):
    """A slow read (a hub lookup retrying offline) must not stall other requests on the pipeline."""
    started, release, original = threading.Event(), threading.Event(), io.read

    def slow_read(*args, **kwargs):
        started.set()
        release.wait(10)
        return original(*args, **kwargs)

    monkeypatch.setattr(io, "read", slow_read)
    def request():
        with da.using(loaded, {"c": files["c"]}):
            pass

    run = {"load": lambda: da.load(loaded, files["c"], "c"),
           "hotswap": lambda: da.hotswap(loaded, name="a", source=files["c"]), "using": request}[verb]
    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(10)
    lock = registry(loaded).lock
    free = lock.acquire(timeout=2)
    if free:
        lock.release()
    release.set()
    worker.join()
    assert free, f"{verb} held the pipeline's lock while reading its source"


def test_lock_is_first_come_first_served_reentrant_and_bounded():
    lock, order, queued = FairRLock(), [], []
    lock.acquire()
    assert lock.acquire(timeout=0)  # reentrant
    lock.release()

    def wait(i):
        with lock:
            order.append(i)

    threads = []
    for i in range(8):
        t = threading.Thread(target=wait, args=(i,))
        t.start()
        while len(lock._queue) < i + 1:  # each one queued before the next arrives
            time.sleep(0.001)
        threads.append(t)
    t0 = time.perf_counter()
    timed_out = []
    t = threading.Thread(target=lambda: timed_out.append(lock.acquire(timeout=0.05)))
    t.start()
    t.join()
    assert timed_out == [False] and time.perf_counter() - t0 < 2 and len(lock._queue) == 8
    lock.release()
    for t in threads:
        t.join()
    assert order == list(range(8))
    with pytest.raises(RuntimeError):
        lock.release()


# -- atomic saves -----------------------------------------------------------------------------------------


@pytest.fixture
def saver(base, files):
    pipe = copy.deepcopy(base)
    da.load(pipe, files["u"], "u")
    da.load(pipe, files["a"], "a")
    return pipe


def test_peft_folder_is_replaced_whole(saver, tmp_path):
    dest = tmp_path / "out"
    da.save(saver, "a", dest, format="peft")
    assert (dest / "text_encoder").is_dir()
    da.save(saver, "u", dest, format="peft", overwrite=True)  # UNet only: no stale text_encoder/ left
    assert sorted(p.name for p in dest.iterdir()) == ["unet"]
    assert da.inspect(dest).components == {"unet": da.adapters(saver)["u"].modules}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old siblings left


FOLDERS = [  # id, format, destination (a folder under tmp), what the user keeps there, needle
    ("kohya onto a folder", "kohya", "loras", {"mine.safetensors": b"x"}, "one .safetensors file"),
    ("peft file onto a folder", "peft", "loras.safetensors", {"mine.safetensors": b"x"}, "one .safetensors file"),
    ("peft onto a folder with other files", "peft", "out", {"adapter_config.json": b"{}", "notes.txt": b"x"},
     "(notes.txt)"),
    ("peft onto a component folder with other files", "peft", "out", {"unet/adapter_config.json": b"{}",
                                                                      "unet/train.log": b"x"}, "(unet/train.log)"),
]


@pytest.mark.parametrize("case", FOLDERS, ids=[c[0] for c in FOLDERS])
def test_overwrite_never_deletes_other_files(tmp_path, capsys, case):
    """overwrite replaces a destination whole; a folder holding anything an output of that kind would not
    hold is refused, even with overwrite (CLI: --force), and kept as it was."""
    _, fmt, name, kept, needle = case
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # dotted names: no model needed
    save_file({f"{q}.lora_A.weight": torch.randn(4, 32), f"{q}.lora_B.weight": torch.randn(32, 4)},
              tmp_path / "in.safetensors")
    dest = tmp_path / name
    for rel, data in kept.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
    with pytest.raises(da.DiffAdaptError, match=re.escape(needle)):
        da.convert(tmp_path / "in.safetensors", dest, format=fmt, overwrite=True)
    assert main(["convert", str(tmp_path / "in.safetensors"), str(dest), "--format", fmt, "--force"]) == 2
    assert needle in capsys.readouterr().err
    assert {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.safetensors", name])


@pytest.mark.parametrize("error", [SafetensorError("disk full"), OSError(errno.ENOSPC, "No space left on device"),
                                   KeyboardInterrupt()], ids=["safetensors", "disk full", "interrupt"])
@pytest.mark.parametrize("fmt, name", [("kohya", "out.safetensors"), ("peft", "out"), ("peft", "one.safetensors")])
def test_failed_save_leaves_nothing_and_keeps_the_old(saver, tmp_path, monkeypatch, error, fmt, name):
    dest = tmp_path / name
    da.save(saver, "u", dest, format=fmt)
    old = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    calls = []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        with open(path, "wb") as f:
            f.write(b"partial")  # a half-written file, then the failure
        raise error

    monkeypatch.setattr(io, "save_file", failing)
    exc = KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else da.WriteError
    with pytest.raises(exc) as e:
        da.save(saver, "a", dest, format=fmt, overwrite=True)
    if exc is da.WriteError:
        assert str(dest) in str(e.value) and isinstance(e.value, OSError)
    assert calls
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == old


# -- CLI ---------------------------------------------------------------------------------------------------


CLI_CASES = [
    (["generate", "--prompt", "x", "--width", "7"], "--width"),
    (["generate", "--prompt", "x", "--height", "-8"], "--height"),
    (["generate", "--prompt", "x", "--steps", "0"], "--steps"),
    (["generate", "--prompt", "x", "--cfg", "nan"], "--cfg"),
    (["generate", "--prompt", "x", "--seed", "-1"], "--seed"),
    (["generate", "--prompt", "x", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
    (["generate", "--prompt", "x", "--device", "toaster"], "--device"),
    (["merge", "a.safetensors", "--out", "m.safetensors", "--density", "2"], "--density"),
    (["merge", "a.safetensors", "--out", "m.safetensors", "--density", "-1"], "--density"),
    (["merge", "a.safetensors", "--out", "m.safetensors", "--rank", "-3"], "--rank"),
    (["merge", "a.safetensors", "--out", "m.safetensors", "--rank", "0"], "--rank"),
    (["merge", "a.safetensors", "--out", "m.safetensors", "--method", "cat", "--rank", "4"], "--rank"),
    (["inspect", "LOOP"], "link"),
    (["inspect", "ZEROD"], "0-D"),
    (["inspect", "DIGITS"], "digits"),
    (["convert", "ZEROD", "c.safetensors", "--to", "kohya"], "0-D"),
]


@pytest.mark.parametrize("argv, needle", CLI_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CLI_CASES])
def test_cli_user_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    names = {"LOOP": lambda: str(loop_link(tmp_path)),
             "ZEROD": lambda: str(file_with(tmp_path, with_tensor("lora_down.weight", torch.tensor(1.0)), {})),
             "DIGITS": lambda: str(file_with(tmp_path, lora(), {"peft_config": '{"": {"r": ' + "7" * 5000 + "}}"}))}
    argv = [names[a]() if a in names else a for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["loop.safetensors"], ["meta.safetensors"])


def test_generate_does_not_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"mine")
    assert main(["generate", "--prompt", "x", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert main(["generate", "--prompt", "x", "--width", "16", "--height", "16", "--steps", "1", "--out", str(out),
                 "--force"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["out.png"]
