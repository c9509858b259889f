"""LoHa and LoKr math against the reference forwards: LyCORIS modules (``apply_to``) and peft layers.

Every case builds the adapter with the reference library, takes the tensors users would find in a file,
parses them, and compares ``layer(x)`` with the reference forward in fp32 (max |Δ| ≤ 1e-5, outputs O(1)).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffadapt.errors import FormatError, ShapeError
from diffadapt.methods import BY_NAME, ParseContext, detect
from diffadapt.methods.loha import LoHaParams
from diffadapt.methods.lokr import LoKrParams
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402
from peft import LoHaConfig, LoKrConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

TOL = 1e-5
IN, OUT = 32, 48  # LoKr factorises these as out 48 = 6·8, in 32 = 4·8 (factor -1)

LAYERS = {
    "linear": lambda: nn.Linear(IN, OUT),
    "conv1x1": lambda: nn.Conv2d(IN, OUT, 1),
    "conv3x3": lambda: nn.Conv2d(IN, OUT, 3, padding=1),
    "conv1d": lambda: nn.Conv1d(IN, OUT, 3, padding=1),
}
KERNEL = ("conv3x3", "conv1d")  # kinds where Tucker / effective conv applies
KINDS = tuple(LAYERS)


def make_layer(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LAYERS[kind]()


def make_input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = {"linear": (5, IN), "conv1x1": (2, IN, 5, 5), "conv3x3": (2, IN, 6, 6), "conv1d": (2, IN, 7)}[kind]
    return torch.randn(shape, generator=g)


def run_with(layer: nn.Module, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer's op with weight ``w`` (what a weight-patching backend runs)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, layer.bias)
    op = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
    return op(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 2) -> None:
    """Non-zero factors (the references zero one at init), sized so ΔW·x is O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "base_layer" in name or name.rsplit(".", 1)[-1] in ("weight", "bias"):
            continue
        std = 0.5 if any(core in name for core in ("hada_t", "lokr_t")) else 0.3
        if "dora_scale" in name:
            p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def assert_close(got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None = None) -> float:
    err = (got - ref).abs().max().item()
    assert ref.abs().max().item() < 50, "outputs should be O(1)"
    if base is not None:
        assert (ref - base).std().item() > 0.02, "the adapter should change the output noticeably"
    assert err <= TOL, f"max |Δ| = {err:.3g}"
    return err


# -- LyCORIS ------------------------------------------------------------------------------------------

# name → (module class, kwargs, kinds, suffixes the saved state must hold)
LYCORIS_CASES = {
    "loha": (LohaModule, dict(lora_dim=2, alpha=3.0), KINDS, {"hada_w1_a", "hada_w2_b"}),
    "loha_tucker": (LohaModule, dict(lora_dim=2, alpha=3.0, use_tucker=True), KERNEL, {"hada_t1", "hada_t2"}),
    "loha_dora": (LohaModule, dict(lora_dim=2, alpha=3.0, weight_decompose=True), ("linear", "conv3x3"), {"dora_scale"}),
    "lokr_full": (LokrModule, dict(lora_dim=4, alpha=3.0), KINDS, {"lokr_w1", "lokr_w2"}),
    "lokr_w2": (LokrModule, dict(lora_dim=2, alpha=3.0), KINDS, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "lokr_both": (LokrModule, dict(lora_dim=2, alpha=3.0, decompose_both=True), KINDS, {"lokr_w1_a", "lokr_w2_a"}),
    "lokr_tucker": (LokrModule, dict(lora_dim=2, alpha=3.0, use_tucker=True), KERNEL, {"lokr_t2", "lokr_w2_a"}),
    "lokr_factor": (
        LokrModule, dict(lora_dim=1, alpha=8.0, factor=4, decompose_both=True, unbalanced_factorization=True),
        KINDS, {"lokr_w1_a", "lokr_w2_a"},
    ),
    "lokr_dora_in": (
        LokrModule, dict(lora_dim=2, alpha=3.0, weight_decompose=True, wd_on_out=False), ("linear", "conv3x3"),
        {"dora_scale"},
    ),
}
LYCORIS_PARAMS = [
    pytest.param(case, kind, mode, id=f"{case}-{kind}-{mode}")
    for case, (_, kw, kinds, _) in LYCORIS_CASES.items()
    for kind in kinds
    for mode in ("rebuild", "bypass")
    if not (mode == "bypass" and kw.get("weight_decompose"))  # LyCORIS' bypass path skips DoRA
]


def lycoris_setup(case: str, kind: str, bypass: bool):
    cls, kw, _, expect = LYCORIS_CASES[case]
    layer = make_layer(kind)
    w0 = layer.weight.detach().clone()
    mod = cls("lycoris_layer", layer, multiplier=1.0, bypass_mode=bypass, **kw)
    randomize(mod)
    mod.apply_to()
    mod.eval()
    sd = {k: v.detach().clone() for k, v in mod.state_dict().items()}
    assert expect <= set(sd), f"{case} should save {sorted(expect)}, saved {sorted(sd)}"
    params = BY_NAME[cls.name.replace("kron", "lokr")].parse(sd, ParseContext(where="f.safetensors: lycoris_layer", fmt="lycoris"))
    return layer, w0, mod, params


@pytest.mark.parametrize("case, kind, mode", LYCORIS_PARAMS)
def test_lycoris_forward(case, kind, mode, record_property):
    layer, w0, mod, params = lycoris_setup(case, kind, mode == "bypass")
    x = make_input(kind)
    params.check(w0.shape, where="x")
    with torch.no_grad():
        ref = layer(x)
        base = run_with(layer, w0, x)
        err = assert_close(run_with(layer, params.apply(w0, 1.0), x), ref, base)
        record_property("max_err", err)
        assert torch.equal(params.apply(w0, 0.0), w0)
        if params.is_additive:
            mod.multiplier = 0.5
            assert_close(run_with(layer, params.apply(w0, 0.5), x), layer(x))
            assert torch.allclose(params.apply(w0, 0.5), w0 + 0.5 * params.delta(w0.shape), atol=1e-6)


def test_lycoris_params_describe_the_structure():
    _, _, mod, p = lycoris_setup("lokr_full", "linear", False)
    assert isinstance(p, LoKrParams) and p.rank is None and p.alpha is None and p.scale == 1.0
    assert p.alpha_value == 4.0  # LyCORIS writes the dim as alpha when both factors are full
    _, _, _, p = lycoris_setup("lokr_both", "conv3x3", False)
    assert (p.w1_decomposed, p.w2_decomposed, p.tucker, p.rank, p.alpha, p.scale) == (True, True, False, 2, 3.0, 1.5)
    assert p.kron_shapes == ((6, 4), (8, 72)) and p.kernel_size is None  # 3×3 taps folded into w2_b
    _, _, _, p = lycoris_setup("lokr_tucker", "conv3x3", False)
    assert (p.w1_decomposed, p.w2_decomposed, p.tucker, p.rank, p.kernel_size) == (False, True, True, 2, (3, 3))
    _, _, _, p = lycoris_setup("loha_tucker", "conv1d", False)
    assert isinstance(p, LoHaParams) and (p.tucker, p.rank, p.alpha, p.kernel_size, p.out_features) == (True, 2, 3.0, (3,), OUT)
    assert p.lowrank() is None and p.is_additive
    _, _, _, p = lycoris_setup("loha_dora", "linear", False)
    assert not p.is_additive and p.dora_on_out
    _, _, _, p = lycoris_setup("lokr_dora_in", "linear", False)
    assert not p.dora_on_out


@pytest.mark.parametrize(
    "algo, kwargs",
    [("loha", {}), ("loha", {"use_tucker": True}), ("lokr", {}), ("lokr", {"linear_dim": 8}),
     ("lokr", {"decompose_both": True, "factor": 4, "linear_dim": 1}), ("lokr", {"use_tucker": True, "factor": 4})],
    ids=["loha", "loha-tucker", "lokr", "lokr-full", "lokr-both", "lokr-tucker"],
)
def test_lycoris_saved_file(tmp_path, algo, kwargs):
    """The keys ``LycorisNetwork.save_weights`` writes, parsed per module, reproduce the wrapped network."""
    from lycoris import create_lycoris
    from safetensors.torch import load_file

    torch.manual_seed(0)
    net = nn.Sequential(*(LAYERS[k]() for k in KINDS))
    originals = [m.weight.detach().clone() for m in net]
    kw = {"linear_dim": 2, "linear_alpha": 3.0} | kwargs
    network = create_lycoris(net, 1.0, algo=algo, preset="full", **kw)
    randomize(network)
    network.apply_to()
    path = tmp_path / "adapter.safetensors"
    network.save_weights(str(path), None, {})
    sd = load_file(str(path))
    for i, (kind, layer) in enumerate(zip(KINDS, net)):
        prefix = f"lycoris_{i}."
        tensors = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        method = detect(set(tensors), where=prefix)
        assert method.name == algo
        params = method.parse(tensors, ParseContext(where=f"{path.name}: lycoris_{i}", fmt="lycoris"))
        params.check(originals[i].shape, where=prefix)
        x = make_input(kind)
        with torch.no_grad():
            assert_close(run_with(layer, params.apply(originals[i], 1.0), x), layer(x))


@pytest.mark.parametrize(
    "cls, weights, alpha, scale",
    [
        (LokrModule, dict(w1=(6, 4), w2=(8, 8)), 1e10, 1.0),  # both full: alpha ignored
        (LokrModule, dict(w1=(6, 4), w2a=(8, 2), w2b=(2, 8)), 0.0, 1.0),  # alpha 0 ⇒ alpha = r
        (LokrModule, dict(w1a=(6, 2), w1b=(2, 4), w2a=(8, 2), w2b=(2, 8)), 1.0, 0.5),
        (LohaModule, dict(w1a=(48, 2), w1b=(2, 32), w2a=(48, 2), w2b=(2, 32)), 0.0, 1.0),
    ],
    ids=["lokr-full-1e10", "lokr-alpha0", "lokr-both", "loha-alpha0"],
)
def test_lycoris_load_path(cls, weights, alpha, scale):
    """Files loaded the way LyCORIS loads them (``make_module_from_state_dict``), alpha quirks included."""
    g = torch.Generator().manual_seed(3)
    t = {k: torch.randn(s, generator=g) * 0.3 for k, s in weights.items()}
    layer = make_layer("linear")
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        if cls is LokrModule:
            mod = cls.make_module_from_state_dict(
                "m", layer, t.get("w1"), t.get("w1a"), t.get("w1b"), t.get("w2"), t.get("w2a"), t.get("w2b"),
                None, None, torch.tensor(alpha), None,
            )
            names = {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2", "w2a": "lokr_w2_a", "w2b": "lokr_w2_b"}
        else:
            mod = cls.make_module_from_state_dict(
                "m", layer, t["w1a"], t["w1b"], t["w2a"], t["w2b"], None, None, torch.tensor(alpha), None
            )
            names = {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b"}
    mod.apply_to()
    tensors = {names[k]: v for k, v in t.items()} | {"alpha": torch.tensor(alpha)}
    params = BY_NAME["lokr" if cls is LokrModule else "loha"].parse(tensors, ParseContext(where="f: m", fmt="lycoris"))
    assert params.scale == pytest.approx(scale)
    x = make_input("linear")
    with torch.no_grad():
        assert_close(run_with(layer, params.apply(w0, 1.0), x), layer(x))


# -- PEFT ---------------------------------------------------------------------------------------------

PEFT_CASES = {
    "loha": (LoHaConfig, dict(r=2, alpha=3), KINDS),
    "loha_pattern": (LoHaConfig, dict(r=8, alpha=8, rank_pattern={"layer": 2}, alpha_pattern={"layer": 5}), KINDS),
    "loha_effective": (LoHaConfig, dict(r=2, alpha=3, use_effective_conv2d=True), KINDS),
    "lokr_w2": (LoKrConfig, dict(r=2, alpha=3), KINDS),
    "lokr_full": (LoKrConfig, dict(r=4, alpha=3), KINDS),
    "lokr_both": (LoKrConfig, dict(r=2, alpha=3, decompose_both=True), KINDS),
    "lokr_effective": (LoKrConfig, dict(r=2, alpha=3, use_effective_conv2d=True, decompose_both=True), KINDS),
    "lokr_factor": (LoKrConfig, dict(r=1, alpha=6, decompose_both=True, decompose_factor=4), KINDS),
    "lokr_pattern": (
        LoKrConfig, dict(r=8, alpha=8, rank_pattern={"^lay.r$": 2}, alpha_pattern={"layer": 5}, use_effective_conv2d=True),
        KINDS,
    ),
}


class One(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def resolved_config(config, tmp_path, module: str) -> dict:
    """adapter_config.json as saved, with r / alpha resolved for ``module`` the way peft resolves them."""
    config.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    for field, target in (("rank_pattern", "r"), ("alpha_pattern", "alpha")):
        pattern = cfg.get(field) or {}
        key = get_pattern_key(list(pattern), module)
        if key in pattern:
            cfg[target] = pattern[key]
    return cfg


def peft_setup(case: str, kind: str, tmp_path):
    cls, kw, _ = PEFT_CASES[case]
    layer = make_layer(kind)
    w0 = layer.weight.detach().clone()
    config = cls(target_modules=["layer"], init_weights=False, **kw)
    torch.manual_seed(4)
    model = inject_adapter_in_model(config, One(layer))
    randomize(model)
    model.eval()
    sd = get_peft_model_state_dict(model)
    assert all(k.startswith("layer.") for k in sd)
    tensors = {k[len("layer."):]: v.detach().clone() for k, v in sd.items()}
    cfg = resolved_config(config, tmp_path, "layer")
    params = detect(set(tensors), where="layer").parse(tensors, ParseContext(where="adapter: layer", fmt="peft", config=cfg))
    return model, w0, params, tensors, cfg


@pytest.mark.parametrize(
    "case, kind", [pytest.param(c, k, id=f"{c}-{k}") for c, (_, _, kinds) in PEFT_CASES.items() for k in kinds]
)
def test_peft_forward(case, kind, tmp_path, record_property):
    model, w0, params, tensors, cfg = peft_setup(case, kind, tmp_path)
    x = make_input(kind)
    layer = model.layer.get_base_layer()
    params.check(w0.shape, where="x")
    with torch.no_grad():
        ref = model.layer(x)
        err = assert_close(run_with(layer, params.apply(w0, 1.0), x), ref, run_with(layer, w0, x))
        record_property("max_err", err)
        assert torch.equal(params.apply(w0, 0.0), w0)
        model.layer.set_scale("default", 0.5)
        assert_close(run_with(layer, params.apply(w0, 0.5), x), model.layer(x))
    assert params.scale == pytest.approx(cfg["alpha"] / cfg["r"])


def test_peft_conv1d_full_w2_follows_peft_kron(tmp_path):
    """peft's make_kron does not broadcast w1 over a 3-D w2: a Conv1d LoKr with a full w2 gets a
    different ΔW than LyCORIS would build from the same tensors; PEFT files follow peft."""
    model, w0, params, tensors, _ = peft_setup("lokr_full", "conv1d", tmp_path)
    assert tensors["lokr_w2"].dim() == 3 and params.peft_kron
    lycoris_layout = LoKrParams(w1=params.w1, w2=params.w2, alpha_value=params.alpha_value, rank_value=params.rank_value)
    assert not torch.allclose(lycoris_layout.delta(w0.shape), params.delta(w0.shape), atol=1e-3)
    with torch.no_grad():
        expected = model.layer.get_delta_weight("default")
    assert torch.allclose(params.delta(w0.shape), expected, atol=1e-6)


def test_peft_structure(tmp_path):
    _, _, p, _, _ = peft_setup("lokr_full", "linear", tmp_path)
    assert (p.w1_decomposed, p.w2_decomposed, p.rank, p.alpha, p.scale) == (False, False, 4, 3.0, 0.75)
    _, _, p, _, _ = peft_setup("lokr_pattern", "conv3x3", tmp_path)
    assert (p.tucker, p.rank, p.alpha, p.kernel_size) == (True, 2, 5.0, (3, 3))
    _, _, p, _, _ = peft_setup("loha_effective", "conv1d", tmp_path)
    assert (p.tucker, p.kernel_size, p.t1.shape[2:]) == (True, (3,), (3, 1))  # peft's (k, 1) Conv1d core


# -- errors -------------------------------------------------------------------------------------------


def _loha(r1=2, r1b=2, out=OUT, inn=IN, **extra):
    g = torch.Generator().manual_seed(5)
    t = {
        "hada_w1_a": torch.randn(out, r1, generator=g), "hada_w1_b": torch.randn(r1b, inn, generator=g),
        "hada_w2_a": torch.randn(out, 2, generator=g), "hada_w2_b": torch.randn(2, inn, generator=g),
        "alpha": torch.tensor(2.0),
    }
    return t | extra


def _lokr(**over):
    g = torch.Generator().manual_seed(6)
    t = {"lokr_w1": torch.randn(6, 4, generator=g), "lokr_w2_a": torch.randn(8, 2, generator=g),
         "lokr_w2_b": torch.randn(2, 8, generator=g), "alpha": torch.tensor(1.0)}
    t.update(over)
    return {k: v for k, v in t.items() if v is not None}


WHERE = "bad.safetensors: lora_unet_mid_block_attentions_0_proj_in"


@pytest.mark.parametrize(
    "method, tensors",
    [
        ("loha", _loha(r1b=3)),
        ("loha", _loha(out=40) | {"hada_w2_a": torch.randn(OUT, 2)}),
        ("loha", _loha(hada_t1=torch.randn(2, 2, 3, 3))),
        ("loha", {k: v for k, v in _loha().items() if k != "hada_w2_b"}),
        ("lokr", _lokr(lokr_w2_b=torch.randn(3, 8))),
        ("lokr", _lokr(lokr_w1=None, lokr_w1_a=torch.randn(6, 2), lokr_w1_b=torch.randn(3, 4))),
        ("lokr", _lokr(lokr_w1_a=torch.randn(6, 2), lokr_w1_b=torch.randn(2, 4))),
        ("lokr", _lokr(lokr_w2_a=None)),
        ("lokr", _lokr(lokr_w2_a=torch.randn(2, 8), lokr_t2=torch.randn(3, 2, 3, 3))),
        ("lokr", _lokr(lokr_w2=torch.randn(8, 8), lokr_w2_a=None, lokr_w2_b=None, lokr_t2=torch.randn(2, 2, 3, 3))),
    ],
    ids=["loha-rank", "loha-out", "loha-t1-alone", "loha-missing", "lokr-w2-rank", "lokr-w1-rank",
         "lokr-w1-twice", "lokr-w2-missing", "lokr-t2-rank", "lokr-t2-with-full-w2"],
)
def test_format_errors_name_the_module(method, tensors):
    with pytest.raises(FormatError, match=re.escape(WHERE)):
        BY_NAME[method].parse(tensors, ParseContext(where=WHERE, fmt="kohya"))


@pytest.mark.parametrize(
    "method, tensors, shape, adapter",
    [
        ("loha", _loha(), (OUT, IN + 1), "(out=48, in=32)"),
        ("loha", _loha(), (OUT + 1, IN), "w1_a (48, 2)"),
        ("loha", {k: v for k, v in _loha(r1=2, out=2, inn=2).items() if k != "alpha"} | {
            "hada_w1_a": torch.randn(2, OUT), "hada_w1_b": torch.randn(2, IN), "hada_w2_a": torch.randn(2, OUT),
            "hada_w2_b": torch.randn(2, IN), "hada_t1": torch.randn(2, 2, 3, 3), "hada_t2": torch.randn(2, 2, 3, 3)},
         (OUT, IN, 9, 1), "(2, 2, 3, 3)"),
        ("lokr", _lokr(), (OUT, IN, 3, 3), "w1 6×4 ⊗ w2 8×8"),
        ("lokr", _lokr(lokr_w2_a=None, lokr_w2_b=None, lokr_w2=torch.randn(8, 8, 3, 3)), (OUT, IN, 9), "kernel (3, 3)"),
    ],
    ids=["loha-in", "loha-out", "loha-tucker-kernel", "lokr-kernel", "lokr-full-kernel"],
)
def test_shape_errors_name_module_and_shapes(method, tensors, shape, adapter):
    params = BY_NAME[method].parse(tensors, ParseContext(where=WHERE, fmt="kohya"))
    with pytest.raises(ShapeError) as e:
        params.check(torch.Size(shape), where=WHERE)
    msg = str(e.value)
    assert WHERE in msg and str(tuple(shape)) in msg and adapter in msg, msg


def test_peft_config_errors():
    t = {k: v for k, v in _loha().items() if k != "alpha"}
    with pytest.raises(FormatError, match="adapter config"):
        BY_NAME["loha"].parse(t, ParseContext(where=WHERE, fmt="peft"))
    with pytest.raises(FormatError, match=r"r=4 .* rank 2"):
        BY_NAME["loha"].parse(t, ParseContext(where=WHERE, fmt="peft", config={"r": 4, "alpha": 4}))
    lk = {k: v for k, v in _lokr().items() if k != "alpha"}
    with pytest.raises(FormatError, match=re.escape(WHERE)):
        BY_NAME["lokr"].parse(lk, ParseContext(where=WHERE, fmt="peft", config={"r": 3, "alpha": 4}))
    with pytest.raises(FormatError, match="DoRA"):
        BY_NAME["lokr"].parse(lk | {"dora_scale": torch.ones(OUT, 1)}, ParseContext(where=WHERE, fmt="peft", config={"r": 2, "alpha": 4}))
    p = BY_NAME["lokr"].parse(lk, ParseContext(where=WHERE, fmt="diffusers", config={"r": 2, "alpha": 4}))
    assert p.peft_kron and p.scale == 2.0  # a config and no per-module alpha: PEFT tensors


def test_registry_detects_the_methods():
    assert detect({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}, where="m").name == "loha"
    assert detect({"lokr_w1", "lokr_w2", "alpha"}, where="m").name == "lokr"
    assert detect({"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}, where="m").name == "lokr"
    with pytest.raises(FormatError, match="mix methods"):
        detect({"hada_w1_a", "lokr_w1"}, where="m")
    assert BY_NAME["loha"].peft_type == "LOHA" and BY_NAME["lokr"].peft_type == "LOKR"
