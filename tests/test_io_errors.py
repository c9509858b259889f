"""Bad input gets a clear ``DiffAdaptError`` and changes nothing.

Every case hashes every parameter of a tiny SD1 pipeline, makes ``da.load`` fail, checks the error class and
that the message names the file / key / module, then checks the model is bit-identical and no adapter is
registered. Also: pickles only with ``allow_pickle=True``, and a failure *while writing* rolls back.
"""

from __future__ import annotations

import copy
import json
import pickle
import random
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save as st_bytes
from safetensors.torch import save_file

import diffadapt as da
from diffadapt.backends import patch as patch_backend
from diffadapt.fixtures import lycoris_file
from diffadapt.keys import ModuleIndex
from diffadapt.methods.lora import LoRAParams
from diffadapt.testing import param_hashes, tiny_dit_pipeline, tiny_sd1_pipeline, tiny_sdxl_pipeline

import lycoris  # noqa: F401  (the fixtures need it: a missing dependency fails, it is not skipped)
import peft

ATTN = ["Transformer2DModel"]  # the UNet's attention blocks: 72 LoRA modules, enough and quick


@pytest.fixture(scope="module")
def base_pipe():
    return tiny_sd1_pipeline()


@pytest.fixture
def pipe(base_pipe):
    return copy.deepcopy(base_pipe)  # a copy starts with a fresh registry


@pytest.fixture(scope="module")
def kohya(base_pipe):
    """A kohya LoRA on the UNet attention blocks and the text encoder (dict order = module order)."""
    unet, _ = lycoris_file(base_pipe.unet, prefix="lora_unet", seed=1, target_modules=ATTN, target_names=[])
    te, _ = lycoris_file(base_pipe.text_encoder, prefix="lora_te", seed=2)
    return {**unet, **te}


@pytest.fixture(scope="module")
def peft_dir(base_pipe, tmp_path_factory):
    """A real PEFT folder (adapter_config.json + adapter_model.safetensors) for the UNet."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("peft") / "unet_lora"
    with torch.random.fork_rng(devices=[]):  # init_lora_weights=False draws from the global RNG
        peft.get_peft_model(copy.deepcopy(base_pipe.unet), cfg).save_pretrained(str(out))
    return out


def untouched(pipe) -> bool:
    """No module of the pipeline has a patch slot (nothing was ever written)."""
    return all(patch_backend.existing_slot(m) is None
               for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules())


def expect_failure(pipe, source, exc, needles, **kwargs) -> str:
    """``da.load`` raises ``exc`` naming every needle, and leaves weights, registry and slots as they were."""
    before = param_hashes(pipe)
    with pytest.raises(exc) as info:
        da.load(pipe, source, **kwargs)
    msg = str(info.value)
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in the message: {msg}"
    assert param_hashes(pipe) == before
    assert da.adapters(pipe) == {}
    assert untouched(pipe)
    return msg


def save(path, sd, metadata=None):
    save_file(sd, str(path), metadata=metadata)
    return path


def first(sd, suffix, dim=None):
    return next(k for k in sd if k.endswith(suffix) and (dim is None or sd[k].dim() == dim))


# -- files that cannot be read -------------------------------------------------------------------------


PICKLE = {"allow_pickle": True}
CKPT_KEY = "model.diffusion_model.conv_in.weight"


def cut_in_half(path, sd):
    data = st_bytes(sd)
    path.write_bytes(data[: len(data) // 2])


FILE_CASES = {  # id: (file name, how to write it (None: leave it missing), load kwargs, error, more it names)
    "missing": ("missing.safetensors", None, {}, da.SourceError, []),
    "missing-dir": ("no/such/dir", None, {}, da.SourceError, []),
    "empty": ("empty.safetensors", lambda p, sd: p.write_bytes(b""), {}, da.FormatError, ["empty"]),
    "truncated": ("cut.safetensors", cut_in_half, {}, da.FormatError, []),
    "random-bytes": ("random.safetensors", lambda p, sd: p.write_bytes(random.Random(0).randbytes(4096)), {},
                     da.FormatError, []),
    **{ext: (f"lora.{ext}", lambda p, sd: torch.save(sd, p), {}, da.PickleRefusedError, ["allow_pickle"])
       for ext in ("bin", "pt", "ckpt", "pth")},
    "pickle-list": ("list.pt", lambda p, sd: torch.save(list(sd.values()), p), PICKLE, da.FormatError, ["list"]),
    "pickle-non-tensor": ("scalars.ckpt", lambda p, sd: torch.save({"epoch": 3}, p), PICKLE, da.FormatError, ["epoch"]),
    # a pickle referencing a callable: torch.load(weights_only=True) refuses it, nothing runs
    "pickle-code": ("code.pt", lambda p, sd: p.write_bytes(pickle.dumps({"x": print}, protocol=2)), PICKLE,
                    da.FormatError, []),
    "not-an-adapter": ("model.safetensors", lambda p, sd: save(p, {CKPT_KEY: torch.zeros(2, 2)}), {},
                       da.FormatError, [CKPT_KEY]),
    "metadata-bad-json": ("meta.safetensors", lambda p, sd: save(p, sd, {"lora_adapter_metadata": "{oops"}), {},
                          da.FormatError, ["lora_adapter_metadata"]),
    "metadata-json-list": ("meta.safetensors", lambda p, sd: save(p, sd, {"lora_adapter_metadata": "[1, 2]"}), {},
                           da.FormatError, ["lora_adapter_metadata"]),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_unreadable_source(pipe, kohya, tmp_path, case):
    name, write, kwargs, exc, needles = FILE_CASES[case]
    path = tmp_path / name
    if write is not None:
        write(path, kohya)
    expect_failure(pipe, path, exc, [path, *needles], **kwargs)


@pytest.mark.parametrize("source, needles", [
    ({}, ["no tensors"]),
    ({"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.alpha": 1.0},
     ["<state dict>", "lora_unet_x.alpha"]),
], ids=["empty-dict", "dict-non-tensor"])
def test_bad_state_dict(pipe, source, needles):
    expect_failure(pipe, source, da.FormatError, needles)


# -- tensors that are wrong ----------------------------------------------------------------------------


def t_nonfinite(suffix, value):
    def make(sd):
        key = first(sd, suffix)
        t = sd[key].clone()
        t.view(-1)[-1] = value
        return {**sd, key: t}, da.NonFiniteError, [key]
    return make


def t_unknown_suffix(sd):
    return {**sd, "lora_unet_x.foo.weight": torch.zeros(2)}, da.FormatError, ["lora_unet_x.foo.weight"]


def t_mix(extra):
    def make(sd):
        module = first(sd, "lora_down.weight", dim=2).rsplit(".", 2)[0]
        return {**sd, **{f"{module}.{s}": torch.zeros(4, 4) for s in extra}}, da.FormatError, [module]
    return make


def t_up_without_down(sd):
    key = first(sd, "lora_down.weight")
    return {k: v for k, v in sd.items() if k != key}, da.FormatError, [key.rsplit(".", 2)[0], "lora_down"]


def t_rank_disagrees(sd):
    key = first(sd, "lora_down.weight", dim=2)
    return {**sd, key: sd[key][:2]}, da.FormatError, [key.rsplit(".", 2)[0], "rank"]


def t_bias_length(sd):
    """A 'diff_b' beside a LoRA with one value too many for the module's outputs."""
    key = first(sd, "lora_up.weight", dim=2)
    prefix = key.rsplit(".", 2)[0]
    return {**sd, f"{prefix}.diff_b": torch.zeros(sd[key].shape[0] + 1)}, da.ShapeError, ["diff_b", "outputs"]


TENSOR_CASES = {
    "bias-length": t_bias_length,
    "nan-down": t_nonfinite("lora_down.weight", float("nan")), "inf-up": t_nonfinite("lora_up.weight", float("inf")),
    "nan-alpha": t_nonfinite("alpha", float("nan")), "unknown-suffix": t_unknown_suffix,
    "mix-lora-loha": t_mix(["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]), "mix-lora-full": t_mix(["diff"]),
    "up-without-down": t_up_without_down, "rank-disagrees": t_rank_disagrees,
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_bad_tensors(pipe, kohya, tmp_path, case):
    sd, exc, needles = TENSOR_CASES[case](kohya)
    path = save(tmp_path / "bad.safetensors", sd)
    expect_failure(pipe, path, exc, [path, *needles])


def test_shape_mismatch_is_found_before_any_write(pipe, kohya, monkeypatch):
    """The last UNet module gets a wrong in-dim: every module is checked, nothing is written."""
    unet_downs = [k for k in kohya if k.startswith("lora_unet_") and k.endswith("lora_down.weight")]
    key = unet_downs[-1]
    rank, in_dim, *kernel = kohya[key].shape
    bad_in = in_dim + 3
    sd = {**kohya, key: torch.randn(rank, bad_in, *kernel)}
    module = ModuleIndex(pipe.unet).find(key.split(".")[0].removeprefix("lora_unet_"), dotted=False)
    shape = tuple(pipe.unet.get_submodule(module).weight.shape)
    checked, original_check = [], LoRAParams.check

    def check(self, weight_shape, *, where):
        checked.append(where)
        return original_check(self, weight_shape, where=where)

    monkeypatch.setattr(LoRAParams, "check", check)
    expect_failure(pipe, sd, da.ShapeError, [f"unet.{module}", f"in={bad_in}", str(shape)])
    assert len(checked) == len(sd) // 3 and any(module in c for c in checked), "every module is checked first"


# -- PEFT folders --------------------------------------------------------------------------------------


def p_config(text):
    def make(d):
        (d / "adapter_config.json").write_text(text)
        return d, da.FormatError, [d / "adapter_config.json"]
    return make


def p_field(**fields):
    def make(d):
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))
        return d, da.FormatError, [d, "adapter config", next(iter(fields))]
    return make


def p_no_weights(d):
    (d / "adapter_model.safetensors").unlink()
    return d, da.SourceError, [d, "adapter_model.safetensors"]


def p_dreambooth_bad_te(d):
    root = d.parent / "dreambooth"
    shutil.copytree(d, root / "unet")
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "adapter_config.json").write_text("{oops")
    return root, da.FormatError, [root / "text_encoder" / "adapter_config.json"]


PEFT_CASES = {
    "invalid-json": p_config('{"r": 4,'), "json-list": p_config("[1, 2]"), "r-string": p_field(r="4"),
    "alpha-string": p_field(lora_alpha="8"), "r-bool": p_field(r=True),
    "rank-pattern-list": p_field(rank_pattern=["x"]),
    "no-weights": p_no_weights, "dreambooth-bad-text-encoder": p_dreambooth_bad_te,
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_bad_peft_folder(pipe, peft_dir, tmp_path, case):
    folder = tmp_path / "adapter"
    shutil.copytree(peft_dir, folder)
    source, exc, needles = PEFT_CASES[case](folder)
    expect_failure(pipe, source, exc, needles)


# -- keys for another model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_kohya():
    xl = tiny_sdxl_pipeline()
    sd = {}
    for seed, (comp, prefix) in enumerate((("unet", "lora_unet"), ("text_encoder", "lora_te1"),
                                           ("text_encoder_2", "lora_te2")), start=3):
        sd.update(lycoris_file(getattr(xl, comp), prefix=prefix, seed=seed)[0])
    return sd


def sd1_fit(pipe, sd):
    """{kohya module: SD1 parameter name, or None when SD1 has no such module}; shape clashes left out."""
    out = {}
    for module in {k.split(".")[0] for k in sd}:
        comp, rest = ("unet", module[10:]) if module.startswith("lora_unet_") else ("text_encoder", module[9:])
        name = ModuleIndex(getattr(pipe, comp)).find(rest, dotted=False) if not module.startswith("lora_te2_") else None
        if name is None:
            out[module] = None
            continue
        w = getattr(pipe, comp).get_submodule(name).weight
        up, down = sd[f"{module}.lora_up.weight"], sd[f"{module}.lora_down.weight"]
        if up.shape[0] == w.shape[0] and down[0].numel() == w[0].numel():
            out[module] = f"{comp}.{name}.weight"
    return out


def test_sdxl_file_in_sd1_pipeline_says_sdxl(pipe, sdxl_kohya):
    expect_failure(pipe, sdxl_kohya, da.KeyMappingError, ["text_encoder_2", "looks made for sdxl"])


def test_sdxl_file_in_sd1_pipeline_changes_nothing(pipe, sdxl_kohya):
    """What it does today, strict or not: a ShapeError (or a KeyMappingError) and no change."""
    for strict in (True, False):
        expect_failure(pipe, sdxl_kohya, (da.ShapeError, da.KeyMappingError), ["<state dict>"], strict=strict)


def test_sdxl_file_without_shape_clashes(pipe, sdxl_kohya):
    """Only modules that fit or are absent: KeyMappingError naming keys; strict=False loads the fitting part."""
    fit = sd1_fit(pipe, sdxl_kohya)
    sd = {k: v for k, v in sdxl_kohya.items() if k.split(".")[0] in fit}
    expected = {name for name in fit.values() if name}
    assert expected and None in fit.values()
    msg = expect_failure(pipe, sd, da.KeyMappingError, ["text_encoder_2", "looks made for sdxl", "strict=False"])
    assert f"{list(fit.values()).count(None)} of {len(fit)}" in msg
    assert any(module in msg for module, name in fit.items() if name is None), "some unmatched keys are named"
    before = param_hashes(pipe)
    with pytest.warns(UserWarning, match="match no module"):
        info = da.load(pipe, sd, name="xl", strict=False)
    assert info.base_family == "sdxl" and list(da.adapters(pipe)) == ["xl"]
    assert {k for k, h in param_hashes(pipe).items() if h != before[k]} == expected
    da.unload(pipe, "xl")
    assert param_hashes(pipe) == before


def test_strict_false_with_nothing_matching_still_fails(pipe):
    sd = lycoris_file(tiny_dit_pipeline().transformer, prefix="lora_transformer", seed=1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expect_failure(pipe, sd, da.KeyMappingError, ["lora_transformer_", "dit"], strict=False)


def test_two_keys_for_one_module(pipe, kohya):
    te = {k: v for k, v in kohya.items() if k.startswith("lora_te_")}
    twice = {**te, **{k.replace("lora_te_", "lora_te_text_model_"): v for k, v in te.items()}}
    expect_failure(pipe, twice, da.FormatError, ["self_attn", "both adapt", "lora_te_text_model_encoder_layers"])


# -- pickles, names, rollback, dtype -------------------------------------------------------------------


@pytest.mark.parametrize("ext, wrap", [("bin", False), ("pt", False), ("ckpt", True)])
def test_allow_pickle_loads_the_same_weights(pipe, kohya, tmp_path, ext, wrap):
    path = tmp_path / f"lora.{ext}"
    torch.save({"state_dict": kohya} if wrap else kohya, path)
    da.load(pipe, save(tmp_path / "lora.safetensors", kohya), name="st")
    expected = param_hashes(pipe)
    da.unload(pipe, "st")
    da.load(pipe, path, allow_pickle=True)
    assert param_hashes(pipe) == expected


def test_duplicate_name_and_unknown_unload(pipe, kohya):
    da.load(pipe, kohya, name="ink")
    loaded = param_hashes(pipe)
    with pytest.raises(da.DiffAdaptError, match="'ink'"):
        da.load(pipe, kohya, name="ink")
    assert param_hashes(pipe) == loaded and list(da.adapters(pipe)) == ["ink"]
    with pytest.raises(da.AdapterNotFoundError, match="'nope'"):
        da.unload(pipe, "nope")
    assert param_hashes(pipe) == loaded and list(da.adapters(pipe)) == ["ink"]


@pytest.mark.parametrize("preloaded", [False, True], ids=["fresh", "over-another"])
@pytest.mark.parametrize("n", [1, 9, 84])  # 84 = the last of 72 UNet + 12 text-encoder modules
@pytest.mark.parametrize("where", ["Slot.write", "LoRAParams.lowrank"])
def test_failure_while_writing_rolls_back(pipe, kohya, monkeypatch, where, n, preloaded):
    """The Nth write (or factor computation) raises: the error propagates and every weight comes back."""
    if preloaded:
        da.load(pipe, {k: v * 0.5 for k, v in kohya.items()}, name="first")
    before = param_hashes(pipe)
    owner, attr = (patch_backend.Slot, "write") if where == "Slot.write" else (LoRAParams, "lowrank")
    original, calls = getattr(owner, attr), []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, attr, flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        da.load(pipe, kohya, name="second")
    monkeypatch.undo()
    assert len(calls) >= n
    assert param_hashes(pipe) == before
    assert list(da.adapters(pipe)) == (["first"] if preloaded else [])
    if not preloaded:
        assert untouched(pipe)


def test_fp16_pipeline_loads_fp32_file(kohya):
    pipe = tiny_sd1_pipeline(dtype=torch.float16)
    before = param_hashes(pipe)
    key = first(kohya, "lora_down.weight", dim=2).split(".")[0]
    module = pipe.unet.get_submodule(ModuleIndex(pipe.unet).find(key[len("lora_unet_"):], dotted=False))
    w0 = module.weight.detach().clone()
    da.load(pipe, kohya)
    assert {p.dtype for c in (pipe.unet, pipe.text_encoder) for p in c.parameters()} == {torch.float16}
    scale = kohya[f"{key}.alpha"].item() / kohya[f"{key}.lora_down.weight"].shape[0]
    expected = (w0.float() + scale * kohya[f"{key}.lora_up.weight"] @ kohya[f"{key}.lora_down.weight"]).half()
    assert not torch.equal(module.weight, w0)
    torch.testing.assert_close(module.weight, expected, atol=1e-3, rtol=1e-3)
    da.unload(pipe)
    assert param_hashes(pipe) == before
