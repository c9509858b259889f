"""Patch-mode storage: weights written in place, originals kept once in a backup and reused, exact restore.

Storage pointers never move through load / set_weights / hotswap / unload; unload is bit-exact (a hash of every
parameter); a warm load allocates no backup; release frees them; backup="none" refuses what it cannot undo;
mapped checkpoints (private, shared, read-only) are copied on first write, never written; float8 storage
(diffusers' layerwise casting) is written with its rounding measured; quantized weights are refused.
"""

from __future__ import annotations

import copy
import hashlib
import warnings

import numpy as np
import pytest
import torch

import diffadapt as da
from diffadapt.backends import storage
from diffadapt.backends import patch
from diffadapt.backends import slot as slot_module
from diffadapt.fixtures import pipeline_file
from diffadapt.testing import param_hashes, tiny_sd1_pipeline

FILES = {  # name: lycoris_network kwargs
    "lora": dict(algo="lora", rank=4, alpha=2),
    "loha": dict(algo="loha", std=0.3),
    "lokr": dict(algo="lokr", std=0.2),
    "oft": dict(algo="diag-oft", block_size=4),
    "full": dict(algo="full", std=0.01),  # writes biases too
    "dora": dict(algo="lora", weight_decompose=True),
}


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


@pytest.fixture(scope="module")
def files(pipe):
    return {name: pipeline_file(pipe, seed=7 * i, **kw) for i, (name, kw) in enumerate(FILES.items())}


@pytest.fixture(scope="module")
def unet_file(pipe):
    return pipeline_file(pipe, components=("unet",), seed=3, **FILES["lora"])


def pointers(target) -> dict[str, int]:
    mods = {"": target} if isinstance(target, torch.nn.Module) else {"unet.": target.unet, "te.": target.text_encoder}
    return {f"{c}{n}": p.data_ptr() for c, m in mods.items() for n, p in m.named_parameters()}


def slots_of(module: torch.nn.Module) -> list:
    return [patch._SLOTS[m] for m in module.modules() if m in patch._SLOTS]


@pytest.fixture
def allocations(monkeypatch):
    """Bytes of every backup allocation made during the test."""
    made, allocate = [], storage.allocate

    def counting(likes, where):
        made.append(sum(t.numel() * t.element_size() for t in likes))
        return allocate(likes, where)

    monkeypatch.setattr(storage, "allocate", counting)
    return made


# -- in place, exact, reused ---------------------------------------------------------------------------

CASES = [("lora", "host"), ("loha", "device"), ("lokr", "staged"), ("oft", "host"), ("full", "staged"),
         ("dora", "device")]


@pytest.mark.parametrize("method,backup", CASES)
def test_storage_stays_put_restore_is_exact_and_backups_are_reused(pipe, files, allocations, monkeypatch, method,
                                                                   backup):
    """"staged": the path of a host backup under an accelerator model — W0 copied into the live buffer, then
    the write reads and overwrites it there (forced here on CPU)."""
    if backup == "staged":
        monkeypatch.setattr(slot_module, "_on", lambda saved, live: live.copy_(saved))
    mode = "host" if backup == "staged" else backup
    base, where = param_hashes(pipe), pointers(pipe)
    da.load(pipe, files[method], "x", weight=0.8, backup=mode)
    first = sum(allocations)
    assert first > 0 and pointers(pipe) == where and param_hashes(pipe) != base
    da.load(pipe, files["lora"], "y", weight=0.5)  # stacked on backed-up modules: nothing new to copy
    da.set_weights(pipe, {"x": 0.3})
    da.hotswap(pipe, files["loha"], "y")
    assert pointers(pipe) == where and sum(allocations) == first
    da.unload(pipe)
    assert param_hashes(pipe) == base and pointers(pipe) == where

    da.load(pipe, files[method], "x")  # warm: every module already backed up
    assert sum(allocations) == first and pointers(pipe) == where
    da.unload(pipe)
    assert param_hashes(pipe) == base
    held = sum(storage.nbytes(s.backup) + storage.nbytes(s.backup_bias) for s in slots_of(pipe.unet) + slots_of(pipe.text_encoder))
    assert da.release(pipe) == held >= first and not slots_of(pipe.unet) and not slots_of(pipe.text_encoder)
    assert param_hashes(pipe) == base and pointers(pipe) == where


def test_release_keeps_what_loaded_adapters_need_and_release_on_unload_frees_the_rest(pipe, files, unet_file):
    base = param_hashes(pipe)
    da.load(pipe, files["lora"], "x")
    da.load(pipe, unet_file, "u")
    da.unload(pipe, "x")  # the text encoder's modules are idle now, the UNet's still carry "u"
    assert da.release(pipe) > 0 and not slots_of(pipe.text_encoder) and slots_of(pipe.unet)
    da.unload(pipe)
    assert param_hashes(pipe) == base
    try:
        da.configure(pipe, release_on_unload=True)
        da.load(pipe, files["lora"], "x")
        da.unload(pipe)
        assert not slots_of(pipe.unet) and not slots_of(pipe.text_encoder) and param_hashes(pipe) == base
    finally:
        da.configure(pipe, release_on_unload=False)


def counting(fn, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("edit", ["through .data", "load_state_dict", "to(float16)", "reloaded read-only"])
def test_weights_changed_while_backups_idle_become_the_new_originals(pipe, unet_file, tmp_path, monkeypatch, edit):
    """A kept backup must not bring back weights the user replaced after the last unload; the process's
    mappings are read once per verb, not once per re-based module."""
    unet = copy.deepcopy(pipe.unet)
    da.load(unet, unet_file, "x")
    da.unload(unet)  # idle backups kept
    with torch.no_grad():
        if edit == "through .data":
            for p in unet.parameters():
                p.data.mul_(1.01)
        elif edit == "load_state_dict":
            unet.load_state_dict({k: v * 0.99 for k, v in unet.state_dict().items()})
        elif edit == "to(float16)":
            unet.to(torch.float16)
        else:
            mapped = mapped_copy(unet, "read-only", tmp_path / "w.bin")
            for (n, p), q in zip(unet.named_parameters(), mapped.parameters()):
                p.data = q.data
            digest = hashlib.sha1((tmp_path / "w.bin").read_bytes()).hexdigest()
    edited = param_hashes(unet)
    readings = []
    monkeypatch.setattr(storage.MemoryMap, "__init__", counting(storage.MemoryMap.__init__, readings))
    da.load(unet, unet_file, "x")
    assert len(readings) == 1
    assert param_hashes(unet) != edited
    da.unload(unet)
    assert param_hashes(unet) == edited
    if edit == "reloaded read-only":
        assert hashlib.sha1((tmp_path / "w.bin").read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("how", ["load(backup='none')", "configure(backup='none')", "release(bake=True)"])
def test_no_backup_fuses_for_good_and_refuses_to_undo(pipe, unet_file, files, how):
    unet = copy.deepcopy(pipe.unet)
    where, second = pointers(unet), pipeline_file(pipe, components=("unet",), seed=5, **FILES["loha"])
    if how.startswith("configure"):
        assert da.configure(unet, backup="none").backup == "none"
    da.load(unet, unet_file, "x", **({"backup": "none"} if how.startswith("load") else {}))
    if how.startswith("release"):
        assert da.release(unet, bake=True) > 0
    da.load(unet, second, "y", weight=0.5)  # a later adapter composes onto the fused weight
    fused, hashes = {n: p.detach().clone() for n, p in unet.named_parameters()}, param_hashes(unet)
    for refused in (lambda: da.unload(unet, "x"), lambda: da.set_weights(unet, {"x": 0.5}),
                    lambda: da.hotswap(unet, second, "x")):
        with pytest.raises(da.UnsupportedError, match="were not kept"):
            refused()
        assert param_hashes(unet) == hashes
    assert pointers(unet) == where
    da.load(pipe.unet, unet_file, "x")  # the same stack with a backup
    da.load(pipe.unet, second, "y", weight=0.5)
    try:
        for n, p in pipe.unet.named_parameters():
            assert (p - fused[n]).abs().max().item() <= 1e-6, n
    finally:
        da.unload(pipe.unet)


def test_bad_backup_option_is_refused_before_anything(pipe, files):
    base = param_hashes(pipe)
    with pytest.raises(da.UnsupportedError, match="backup='disk'"):
        da.load(pipe, files["lora"], "x", backup="disk")
    with pytest.raises(da.UnsupportedError, match="choose one of"):
        da.configure(pipe, backup="gpu")
    assert param_hashes(pipe) == base and not da.adapters(pipe)


# -- mapped checkpoints ----------------------------------------------------------------------------------


def mapped_copy(module: torch.nn.Module, kind: str, path) -> torch.nn.Module:
    """A copy of ``module`` whose parameters live in a file mapping: private (torch.load(mmap=True)), shared,
    or read-only (a numpy memmap: writing there would crash the process)."""
    m = copy.deepcopy(module)
    if kind == "private":
        torch.save(m.state_dict(), path)
        m.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
        return m
    params, offsets, size = list(m.parameters()), [], 0
    for p in params:
        offsets.append(size)
        size += -(-p.numel() * p.element_size() // 64) * 64
    blob = bytearray(size)
    for p, o in zip(params, offsets):
        raw = p.detach().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        blob[o:o + len(raw)] = raw
    path.write_bytes(bytes(blob))
    if kind == "shared":
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage.from_file(str(path), True, size))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable array": the point of the test
            flat = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="r"))
    for p, o in zip(params, offsets):
        p.data = flat[o:o + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
    return m


@pytest.mark.parametrize("kind", ["private", "shared", "read-only"])
def test_mapped_weights_are_copied_on_first_write_never_written(pipe, unet_file, tmp_path, kind):
    path = tmp_path / "weights.bin"
    unet = mapped_copy(pipe.unet, kind, path)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    base, where = param_hashes(unet), pointers(unet)
    da.load(unet, unet_file, "x")
    moved = {n for n, p in pointers(unet).items() if p != where[n]}
    now = param_hashes(unet)
    touched = {n for n in base if now[n] != base[n]}
    assert touched and moved >= touched and hashlib.sha1(path.read_bytes()).hexdigest() == digest
    da.load(pipe.unet, unet_file, "x")
    try:
        assert param_hashes(unet) == param_hashes(pipe.unet)
    finally:
        da.unload(pipe.unet)
    after = pointers(unet)
    da.unload(unet)
    assert param_hashes(unet) == base and pointers(unet) == after  # restored in the private copy
    assert da.release(unet) == 0  # the mapped originals were the backups: nothing of ours to free
    assert pointers(unet) == where and param_hashes(unet) == base  # back on the mapping
    assert hashlib.sha1(path.read_bytes()).hexdigest() == digest


# -- storage dtypes --------------------------------------------------------------------------------------


def test_float8_layerwise_casting_is_written_in_float32_and_rounded_with_a_measured_error(pipe, unet_file):
    stored = copy.deepcopy(pipe.unet)
    stored.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    f8 = {n for n, p in stored.named_parameters() if p.dtype == torch.float8_e4m3fn}
    ref = copy.deepcopy(pipe.unet)  # fp32 holding the same (upcast) values: the fp32 path, checked by test_parity
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(stored.get_parameter(n).float())
    base, where = param_hashes(stored), pointers(stored)
    with pytest.warns(UserWarning, match="float8"):
        da.load(stored, unet_file, "x")
    da.load(ref, unet_file, "x")
    worst = 0.0
    for n in f8:
        exact, got = ref.get_parameter(n).detach(), stored.get_parameter(n).detach().float()
        worst = max(worst, ((got - exact).norm() / exact.norm()).item())
        assert torch.equal(got, exact.to(torch.float8_e4m3fn).float()), n
    from diffadapt.pipeline import registry
    assert 0 < worst == pytest.approx(registry(stored).adapters["x"].extra["patch.rounding"], rel=1e-5)
    assert pointers(stored) == where
    sample = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 7, 32)
    with torch.no_grad():  # the casting hooks still run over the written weights
        assert torch.isfinite(stored(*sample).sample).all()
    da.unload(stored)
    assert param_hashes(stored) == base


def test_quantized_weights_are_refused_pointing_to_inject_mode(pipe, unet_file):
    unet = copy.deepcopy(pipe.unet)
    q = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    q.weight = torch.nn.Parameter(torch.zeros(q.weight.shape, dtype=torch.int8), requires_grad=False)
    base = param_hashes(unet)
    with pytest.raises(da.UnsupportedError, match=r"attn1\.to_q.*int8.*mode='inject'"):
        da.load(unet, unet_file, "x")
    assert param_hashes(unet) == base and not slots_of(unet) and not da.adapters(unet)
