"""Inject mode: peft tuner layers built from a file's tensors give patch mode's outputs, and leave no trace.

Tables: every method peft can hold, made by LyCORIS (kohya files) and by peft (PEFT folders), on the UNet
(Linear, 1×1 and 3×3 convs) and the text encoder; strengths; several adapters of different methods on one
component and on one module (inject + inject, inject + patch); what peft cannot hold (refused up front, model
untouched); get_peft_model_state_dict; fuse / unfuse; a failure half-way through.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import diffadapt as da
from diffadapt import peft_bridge as peft_layers
from diffadapt.fixtures import UNET_MODULES, lycoris_file, randomize_
from diffadapt.testing import param_hashes, tiny_sd1_pipeline

import peft  # noqa: E402
from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, WaveFTConfig  # noqa: E402

TOL = 1e-5
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
CONVS = ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out"]


@pytest.fixture(scope="module")
def base():
    return tiny_sd1_pipeline()


@pytest.fixture
def pipe(base):
    return copy.deepcopy(base)


def unet_out(unet):
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), c).sample


def te_out(te):
    with torch.no_grad():
        return te(torch.tensor([[0, 5, 9, 14, 22, 31, 2]]))[0]


RUN = {"unet": unet_out, "text_encoder": te_out}
PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te"}


def no_peft_left(pipe) -> bool:
    return not any(peft_layers.is_layer(m) for c in ("unet", "text_encoder") for m in getattr(pipe, c).modules()) \
        and not any(hasattr(getattr(pipe, c), "peft_config") for c in ("unet", "text_encoder"))


def check_clean(pipe, hashes):
    assert param_hashes(pipe) == hashes and no_peft_left(pipe) and not da.adapters(pipe)
    assert all(p.requires_grad for p in pipe.unet.parameters())


def lyco(pipe, component, seed=0, **kw):
    return lycoris_file(getattr(pipe, component), prefix=PREFIX[component], seed=seed, **kw)


def peft_dir(pipe, tmp_path, component, config, seed=3, std=0.1):
    ref = peft.get_peft_model(copy.deepcopy(getattr(pipe, component)), config)
    randomize_(((n, p) for n, p in ref.named_parameters() if ".default" in n), seed=seed, std=std)
    ref.save_pretrained(tmp_path / component)
    return tmp_path, ref


# -- parity: LyCORIS-made kohya files ---------------------------------------------------------------

LYCORIS = {
    "lora": dict(algo="lora"),
    "locon-tucker": dict(algo="lora", use_tucker=True),
    "dora": dict(algo="lora", weight_decompose=True),
    "loha": dict(algo="loha", std=0.3),
    "loha-tucker": dict(algo="loha", use_tucker=True, std=0.3),
    "lokr": dict(algo="lokr", std=0.2),
    "lokr-both": dict(algo="lokr", decompose_both=True, factor=4, rank=2, std=0.2, target_names=[]),
    "lokr-tucker": dict(algo="lokr", use_tucker=True, factor=4, rank=2, std=0.2, target_names=[]),
}


# the text encoder has Linear layers only: Tucker and conv layouts are UNet cases
CASES = [(c, "unet") for c in LYCORIS] + [(c, "text_encoder") for c in ("lora", "dora", "loha", "lokr")]


@pytest.mark.parametrize("case, component", CASES)
def test_lycoris_file_inject_equals_patch_and_reference(pipe, case, component):
    run, module = RUN[component], getattr(pipe, component)
    hashes = param_hashes(pipe)
    sd, ref = lyco(pipe, component, **LYCORIS[case])
    expected = run(ref)
    da.load(pipe, sd, "p")
    patched = run(module)
    da.unload(pipe)
    info = da.load(pipe, sd, "i", mode="inject")
    assert info.mode == "inject" and any(peft_layers.is_layer(m) for m in module.modules())
    injected = run(module)
    assert (injected - patched).abs().max().item() <= TOL
    assert (injected - expected).abs().max().item() <= TOL
    da.unload(pipe)
    check_clean(pipe, hashes)


# -- parity: peft-made folders ----------------------------------------------------------------------

PEFT = {
    "lora": ("unet", LoraConfig(r=4, lora_alpha=8, target_modules=ATTN + CONVS, init_lora_weights=False)),
    "lora-patterns": ("unet", LoraConfig(r=4, lora_alpha=8, target_modules=ATTN + CONVS, init_lora_weights=False,
                                         rank_pattern={"to_q": 2, "conv1": 6}, alpha_pattern={"to_k": 3, "conv2": 1})),
    "rslora": ("unet", LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, use_rslora=True, init_lora_weights=False)),
    "dora": ("unet", LoraConfig(r=4, lora_alpha=8, target_modules=ATTN + ["conv1"], use_dora=True,
                                init_lora_weights=False)),
    "lora-te": ("text_encoder", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"],
                                           init_lora_weights=False)),
    "loha": ("unet", LoHaConfig(r=4, alpha=8, target_modules=ATTN + CONVS, init_weights=False)),
    "lokr": ("unet", LoKrConfig(r=4, alpha=8, target_modules=ATTN + CONVS, init_weights=False)),
    "lokr-both": ("unet", LoKrConfig(r=2, alpha=4, target_modules=ATTN, decompose_both=True, decompose_factor=4,
                                     init_weights=False)),
    "oft": ("unet", OFTConfig(r=0, oft_block_size=4, target_modules=ATTN, init_weights=False)),
    "oft-exact": ("unet", OFTConfig(r=0, oft_block_size=4, target_modules=ATTN + ["proj_in"],
                                    use_cayley_neumann=False, init_weights=False)),
    "oft-coft": ("unet", OFTConfig(r=0, oft_block_size=4, target_modules=ATTN, coft=True, eps=1e-2,
                                   init_weights=False)),
    "waveft": ("unet", WaveFTConfig(n_frequency=40, scaling=25.0, target_modules=ATTN, init_weights=False)),
}


@pytest.mark.parametrize("case", list(PEFT))
def test_peft_folder_inject_equals_patch_and_peft(pipe, case, tmp_path):
    component, config = PEFT[case]
    run, module = RUN[component], getattr(pipe, component)
    hashes = param_hashes(pipe)
    folder, ref = peft_dir(pipe, tmp_path, component, config, std=0.01 if case == "waveft" else 0.1)
    expected = run(ref)
    da.load(pipe, folder, "p")
    patched = run(module)
    da.unload(pipe)
    da.load(pipe, folder, "i", mode="inject")
    # peft's own state dict of the injected component is the saved file, key for key
    saved = load_file(folder / component / "adapter_model.safetensors")
    got = peft.get_peft_model_state_dict(module, adapter_name="i")
    assert {f"base_model.model.{k}" for k in got} == set(saved)
    assert all(torch.equal(got[k], saved[f"base_model.model.{k}"]) for k in got)
    injected = run(module)
    assert (injected - patched).abs().max().item() <= TOL
    assert (injected - expected).abs().max().item() <= TOL
    da.unload(pipe)
    check_clean(pipe, hashes)


def test_mixed_ranks_and_alphas_per_module_become_patterns(pipe):
    attn, _ = lyco(pipe, "unet", target_modules=["Transformer2DModel"], target_names=[], rank=4, alpha=2)
    res, _ = lyco(pipe, "unet", seed=1, target_modules=["ResnetBlock2D"], target_names=["conv_in"], rank=8, alpha=8)
    sd = {**attn, **res}
    da.load(pipe, sd, "p")
    patched = unet_out(pipe.unet)
    da.unload(pipe)
    da.load(pipe, sd, "i", mode="inject")
    config = pipe.unet.peft_config["i"]
    assert set(config.rank_pattern.values()) | {config.r} == {4, 8} and config.alpha_pattern
    assert (unet_out(pipe.unet) - patched).abs().max().item() <= TOL
    da.unload(pipe)


# -- a bare module with Linear, Conv1d and Conv2d layers ---------------------------------------------


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.c1 = torch.nn.Linear(16, 24), torch.nn.Conv1d(8, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x1, x2, x3):
        return self.lin(x1), self.c1(x2), self.c2(x3)


def net_out(net):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return torch.cat([y.flatten() for y in net(torch.randn(2, 16, generator=g), torch.randn(2, 8, 10, generator=g),
                                                    torch.randn(2, 8, 6, 6, generator=g))])


BARE = {
    "lora": dict(algo="lora"),
    "locon-tucker": dict(algo="lora", use_tucker=True),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr-decomposed": dict(algo="lokr", factor=2, rank=1),
    "lokr-tucker-r1": dict(algo="lokr", use_tucker=True, rank=1),  # peft's rank-1 Conv1d Tucker fails: rewritten
    "lokr-conv1d-whole-w2": dict(algo="lokr"),  # refused: peft's make_kron differs for a 3-D w2
}


@pytest.mark.parametrize("case", list(BARE))
def test_bare_module_with_conv1d(case):
    torch.manual_seed(0)
    net = Net()
    hashes = param_hashes(net)
    sd, ref = lycoris_file(net, prefix="lycoris", target_modules=[], target_names=["lin", "c1", "c2"], std=0.2,
                           **BARE[case])
    if case == "lokr-conv1d-whole-w2":
        with pytest.raises(da.UnsupportedError, match="c1: a whole LoKr w2 on a Conv1d"):
            da.load(net, sd, "x", mode="inject")
    else:
        da.load(net, sd, "x", mode="inject")
        assert (net_out(net) - net_out(ref)).abs().max().item() <= TOL
        da.unload(net)
    assert param_hashes(net) == hashes and not any(peft_layers.is_layer(m) for m in net.modules())


# -- strength ---------------------------------------------------------------------------------------

STRENGTH_CASES = {
    "lora": lambda pipe, tmp: lyco(pipe, "unet")[0],
    "dora": lambda pipe, tmp: lyco(pipe, "unet", algo="lora", weight_decompose=True)[0],
    "loha": lambda pipe, tmp: lyco(pipe, "unet", algo="loha", std=0.3)[0],
    "lokr": lambda pipe, tmp: lyco(pipe, "unet", algo="lokr", std=0.2)[0],
    "oft": lambda pipe, tmp: peft_dir(pipe, tmp, "unet", PEFT["oft"][1])[0],
    "oft-coft": lambda pipe, tmp: peft_dir(pipe, tmp, "unet", PEFT["oft-coft"][1])[0],
    "waveft": lambda pipe, tmp: peft_dir(pipe, tmp, "unet", PEFT["waveft"][1], std=0.01)[0],
}


@pytest.mark.parametrize("case", list(STRENGTH_CASES))
def test_strength_matches_patch_mode(pipe, case, tmp_path):
    hashes = param_hashes(pipe)
    source = STRENGTH_CASES[case](pipe, tmp_path)
    weights = [0.5, -0.7, 0.0, {"unet": {"down": 0.3, "up": [1.0, 0.6], "mid": 1.0}}, 1.0]
    if case == "oft-coft":
        weights = [0.5, -0.7, 0.0, 1.0]
    base_out = unet_out(pipe.unet)
    outs = {}
    for mode in ("patch", "inject"):
        da.load(pipe, source, "x", mode=mode)
        for i, w in enumerate(weights):
            da.set_weights(pipe, {"x": w})
            outs[mode, i] = unet_out(pipe.unet)
        da.unload(pipe)
    for i, w in enumerate(weights):
        assert (outs["inject", i] - outs["patch", i]).abs().max().item() <= TOL, w
        if w == 0.0:
            assert torch.equal(outs["inject", i], base_out)
    check_clean(pipe, hashes)


def test_disable_enable_in_inject_mode(pipe):
    sd, _ = lyco(pipe, "unet", algo="loha", std=0.3)
    base_out = unet_out(pipe.unet)
    da.load(pipe, sd, "x", mode="inject")
    on = unet_out(pipe.unet)
    da.disable(pipe, "x")
    assert torch.equal(unet_out(pipe.unet), base_out)
    da.enable(pipe, "x")
    assert torch.equal(unet_out(pipe.unet), on)
    da.unload(pipe)


# -- several adapters -------------------------------------------------------------------------------


def _mix(pipe, tmp_path):
    return [
        ("lora", lyco(pipe, "unet", seed=1)[0]),
        ("loha", lyco(pipe, "unet", seed=2, algo="loha", std=0.3)[0]),
        ("lokr", lyco(pipe, "unet", seed=3, algo="lokr", std=0.2)[0]),
        ("waveft", peft_dir(pipe, tmp_path / "w", "unet", PEFT["waveft"][1], std=0.01)[0]),
        ("te", lyco(pipe, "text_encoder", seed=4)[0]),
    ]


def test_mixed_methods_add_up_and_unload_in_any_order(pipe, tmp_path):
    hashes = param_hashes(pipe)
    files = _mix(pipe, tmp_path)
    weights = {"lora": 0.8, "loha": 0.5, "lokr": 1.0, "waveft": 0.7, "te": 1.0}
    for name, src in files:
        da.load(pipe, src, name, weight=weights[name])
    patched = unet_out(pipe.unet), te_out(pipe.text_encoder)
    da.unload(pipe)
    names = [n for n, _ in files]
    for order in (names, names[::-1], names[2:] + names[:2]):
        for i, (name, src) in enumerate(files):  # every other adapter in patch mode: both backends at once
            da.load(pipe, src, name, weight=weights[name], mode="inject" if i % 2 == 0 else "patch")
        got = unet_out(pipe.unet), te_out(pipe.text_encoder)
        assert max((a - b).abs().max().item() for a, b in zip(got, patched)) <= TOL
        for n in order:
            da.unload(pipe, n)
        check_clean(pipe, hashes)


def test_patch_and_inject_on_the_same_modules_sum(pipe):
    hashes = param_hashes(pipe)
    a, _ = lyco(pipe, "unet", seed=1)
    b, _ = lyco(pipe, "unet", seed=2, algo="loha", std=0.3)
    da.load(pipe, a, "a")
    da.load(pipe, b, "b")
    both = unet_out(pipe.unet)
    da.unload(pipe)
    for first, second in [("patch", "inject"), ("inject", "patch")]:
        da.load(pipe, a, "a", mode=first)
        da.load(pipe, b, "b", mode=second)
        assert (unet_out(pipe.unet) - both).abs().max().item() <= TOL
        da.unload(pipe, "a")
        da.unload(pipe, "b")
        check_clean(pipe, hashes)


def test_oft_over_additive_and_two_ofts_compose_as_patch(pipe, tmp_path):
    hashes = param_hashes(pipe)
    lora, _ = lyco(pipe, "unet", seed=1, target_modules=["Transformer2DModel"], target_names=[])
    oft1, _ = peft_dir(pipe, tmp_path / "1", "unet", PEFT["oft"][1], seed=5)
    oft2, _ = peft_dir(pipe, tmp_path / "2", "unet", PEFT["oft-exact"][1], seed=6)
    plan = [("lora", lora, 0.9), ("o1", oft1, 0.6), ("o2", oft2, 1.0)]
    for n, src, w in plan:
        da.load(pipe, src, n, weight=w)
    patched = unet_out(pipe.unet)
    da.unload(pipe)
    for n, src, w in plan:
        da.load(pipe, src, n, weight=w, mode="inject")
    assert (unet_out(pipe.unet) - patched).abs().max().item() <= TOL
    da.unload(pipe)
    check_clean(pipe, hashes)


# -- refused: peft cannot hold it, or would compose it differently ----------------------------------

UNSUPPORTED = {
    "dora-in-axis": (dict(algo="lora", weight_decompose=True, wd_on_out=False), "input axis"),
    "diag-oft": (dict(algo="diag-oft", block_size=4), "output side"),
    "boft": (dict(algo="boft", block_size=4, target_modules=UNET_MODULES), "output side"),
    "full": (dict(algo="full", std=0.01), "full/diff"),
    "loha-dora": (dict(algo="loha", weight_decompose=True, std=0.3), "DoRA"),
    "lokr-split": (dict(algo="lokr", decompose_both=True, factor=4, rank=2), "factorization"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_what_peft_cannot_hold_is_refused_and_changes_nothing(pipe, case):
    kw, reason = UNSUPPORTED[case]
    sd, _ = lyco(pipe, "unet", **kw)
    hashes = param_hashes(pipe)
    with pytest.raises(da.UnsupportedError) as e:
        da.load(pipe, sd, "x", mode="inject")
    assert reason in str(e.value) and "unet." in str(e.value) and "mode='patch'" in str(e.value)
    check_clean(pipe, hashes)


def test_peft_oft_on_kxk_conv_is_refused(pipe, tmp_path):
    folder, _ = peft_dir(pipe, tmp_path, "unet", OFTConfig(r=0, oft_block_size=4, target_modules=["conv1"]))
    hashes = param_hashes(pipe)
    with pytest.raises(da.UnsupportedError, match="k×k convolution"):
        da.load(pipe, folder, "x", mode="inject")
    check_clean(pipe, hashes)


def test_orders_peft_would_compose_differently_are_refused(pipe, tmp_path):
    lora, _ = lyco(pipe, "unet", seed=1, target_modules=["Transformer2DModel"], target_names=[])
    oft, _ = peft_dir(pipe, tmp_path, "unet", PEFT["oft"][1])
    dora, _ = lyco(pipe, "unet", seed=2, algo="lora", weight_decompose=True, target_modules=["Transformer2DModel"],
                   target_names=[])
    da.load(pipe, oft, "oft", mode="inject")
    state = param_hashes(pipe), [type(m).__name__ for m in pipe.unet.modules()]
    with pytest.raises(da.UnsupportedError, match="outside the OFT/DoRA"):
        da.load(pipe, lora, "lora", mode="inject")  # would add outside the rotation
    with pytest.raises(da.UnsupportedError, match="DoRA normalises the base weight only"):
        da.load(pipe, dora, "dora", mode="inject")
    assert (param_hashes(pipe), [type(m).__name__ for m in pipe.unet.modules()]) == state
    assert list(da.adapters(pipe)) == ["oft"]
    da.unload(pipe)


def test_failure_half_way_changes_nothing(pipe, tmp_path, monkeypatch):
    base_lora, _ = lyco(pipe, "unet", seed=1)
    da.load(pipe, base_lora, "kept", mode="inject")
    def state():
        return param_hashes(pipe), [(n, type(m).__name__) for n, m in pipe.unet.named_modules()], \
            dict(pipe.unet.peft_config)

    before = state()
    out = unet_out(pipe.unet)
    sd = {**lyco(pipe, "unet", seed=2, algo="lokr", std=0.2)[0], **lyco(pipe, "text_encoder", seed=3)[0]}
    calls = {"n": 0}
    real = peft_layers.set_strength

    def failing(site, s):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("boom")
        real(site, s)

    monkeypatch.setattr(peft_layers, "set_strength", failing)
    with pytest.raises(RuntimeError, match="boom"):
        da.load(pipe, sd, "new", mode="inject")
    monkeypatch.undo()
    assert state() == before and list(da.adapters(pipe)) == ["kept"] and not hasattr(pipe.text_encoder, "peft_config")
    assert torch.equal(unet_out(pipe.unet), out)
    da.unload(pipe)


# -- peft state dicts, fuse / unfuse ----------------------------------------------------------------


def test_get_peft_model_state_dict_round_trips_through_peft(pipe):
    sd, _ = lyco(pipe, "unet", algo="lora", weight_decompose=True)
    da.load(pipe, sd, "x", mode="inject")
    out = unet_out(pipe.unet)
    state = peft.get_peft_model_state_dict(pipe.unet, adapter_name="x")
    config = pipe.unet.peft_config["x"]
    da.unload(pipe)
    fresh = copy.deepcopy(pipe.unet)
    peft.inject_adapter_in_model(copy.deepcopy(config), fresh, adapter_name="default", state_dict=state)
    result = peft.set_peft_model_state_dict(fresh, state, adapter_name="default")
    assert not result.unexpected_keys
    assert (unet_out(fresh) - out).abs().max().item() <= TOL


def test_fuse_unfuse_switch_modes_without_drift(pipe, tmp_path):
    hashes = param_hashes(pipe)
    a, b = lyco(pipe, "unet", seed=1)[0], lyco(pipe, "unet", seed=2, algo="loha", std=0.3)[0]
    c = lyco(pipe, "text_encoder", seed=3)[0]
    da.load(pipe, a, "a", mode="inject", weight=0.7)
    da.load(pipe, b, "b", mode="inject")
    da.load(pipe, c, "c")  # patch mode: not touched by fuse / unfuse
    injected = unet_out(pipe.unet), te_out(pipe.text_encoder)
    assert da.fuse(pipe) == ["a", "b"]
    assert {n: i.mode for n, i in da.adapters(pipe).items()} == {"a": "patch", "b": "patch", "c": "patch"}
    assert not any(peft_layers.is_layer(m) for m in pipe.unet.modules())
    fused = unet_out(pipe.unet), te_out(pipe.text_encoder)
    assert max((x - y).abs().max().item() for x, y in zip(fused, injected)) <= TOL
    assert da.unfuse(pipe) == ["a", "b"]
    assert all(torch.equal(x, y) for x, y in zip((unet_out(pipe.unet), te_out(pipe.text_encoder)), injected))
    da.unload(pipe)
    check_clean(pipe, hashes)


def test_patch_transform_over_injected_adapter_is_refused():
    """OFT loaded in patch mode onto a module holding an injected LoRA would rotate only the base weight."""
    pipe = tiny_sd1_pipeline()
    lora, _ = lycoris_file(pipe.unet, algo="lora", prefix="lora_unet", target_modules=["Transformer2DModel"])
    oft, _ = lycoris_file(pipe.unet, algo="diag-oft", block_size=4, prefix="lora_unet",
                          target_modules=["Transformer2DModel"], seed=1)
    da.load(pipe, lora, "l", mode="inject")
    hashes = param_hashes(pipe)
    with pytest.raises(da.UnsupportedError, match="inject"):
        da.load(pipe, oft, "o")
    assert param_hashes(pipe) == hashes and list(da.adapters(pipe)) == ["l"]
    da.unload(pipe)
