"""OFT (LyCORIS Diag-OFT/BOFT, PEFT), WaveFT and full/diff against the reference implementations' forward."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffadapt.errors import FormatError, ShapeError
from diffadapt.methods import BY_NAME, detect
from diffadapt.methods.base import ParseContext
from diffadapt.methods.oft import peft_cayley, peft_skew

import lycoris  # noqa: E402
from peft import OFTConfig, WaveFTConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

TOL = 1e-5
WHERE = "adapter.safetensors: unet.block.layer"

# name → (layer factory, input shape); LyCORIS blocks tile the output, PEFT blocks the (unfolded) input
LAYERS = {
    "linear": (lambda: nn.Linear(16, 16), (3, 16)),
    "conv1x1": (lambda: nn.Conv2d(8, 16, 1), (2, 8, 5, 5)),
    "conv3x3": (lambda: nn.Conv2d(4, 8, 3, padding=1), (2, 4, 6, 6)),
}


def _layer(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    make, shape = LAYERS[kind]
    layer = make()
    return layer, torch.randn(shape)


def _op(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    return F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


def _parse(method: str, tensors: dict, fmt: str, config: dict | None = None):
    return BY_NAME[method].parse(tensors, ParseContext(where=WHERE, fmt=fmt, config=config))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- LyCORIS: Diag-OFT, BOFT, full ----------------------------------------------------------------------

LYCORIS_CASES = [
    # (algo, constraint, rescaled)
    ("diag-oft", 0.0, False),
    ("diag-oft", 0.0, True),
    ("diag-oft", 0.02, False),
    ("diag-oft", 0.02, True),
    ("boft", 0.0, False),
    ("boft", 0.02, True),
    ("full", None, None),
]


def _lycoris(kind: str, algo: str, constraint, rescaled, seed: int = 0):
    """A LyCORIS network on one layer with random non-zero parameters; returns (layer, W, b, x, saved, net)."""
    layer, x = _layer(kind, seed)
    w0 = layer.weight.detach().clone()
    b0 = layer.bias.detach().clone()
    kw = {} if algo == "full" else {"constraint": constraint, "rescaled": rescaled}
    net = lycoris.create_lycoris(nn.Sequential(layer), 1.0, linear_dim=4, linear_alpha=1, algo=algo, **kw)
    net.apply_to()
    (module,) = net.loras
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "rescale":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    saved = {k.split(".", 1)[1]: v for k, v in net.state_dict().items()}
    return layer, w0, b0, x, saved, net


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algo,constraint,rescaled", LYCORIS_CASES)
def test_lycoris_matches_forward(kind, algo, constraint, rescaled):
    layer, w0, b0, x, saved, _ = _lycoris(kind, algo, constraint, rescaled)
    method = "full" if algo == "full" else "oft"
    expected = {"diff", "diff_b"} if algo == "full" else {"oft_blocks", "alpha"} | ({"rescale"} if rescaled else set())
    assert set(saved) == expected
    assert detect(set(saved), where=WHERE).name == method
    params = _parse(method, saved, "lycoris")
    params.check(w0.shape, where=WHERE)
    assert params.is_additive == (algo == "full")
    if algo != "full" and constraint:
        q = saved["oft_blocks"] - saved["oft_blocks"].transpose(-1, -2)
        assert q.norm() > constraint * w0.shape[0], "the norm clamp should trigger"
    db = params.bias_delta()
    bias = b0 if db is None else b0 + db
    with torch.no_grad():
        ref = layer(x)
        out = _op(layer, x, params.apply(w0, 1.0), bias)
    assert _maxdiff(out, ref) <= TOL
    assert torch.equal(params.apply(w0, 0.0), w0)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_full_half_strength(kind):
    layer, w0, b0, x, saved, net = _lycoris(kind, "full", None, None)
    params = _parse("full", saved, "lycoris")
    torch.testing.assert_close(params.apply(w0, 0.5), w0 + 0.5 * saved["diff"], rtol=0, atol=0)
    net.loras[0].multiplier = 0.5
    with torch.no_grad():
        ref = layer(x)
        out = _op(layer, x, params.apply(w0, 0.5), b0 + 0.5 * params.bias_delta())
    assert _maxdiff(out, ref) <= TOL


def test_full_without_bias_and_linear_as_1x1():
    layer = nn.Linear(6, 5, bias=False)
    net = lycoris.create_lycoris(nn.Sequential(layer), 1.0, linear_dim=4, linear_alpha=1, algo="full")
    net.apply_to()
    saved = {k.split(".", 1)[1]: v for k, v in net.state_dict().items()}
    assert set(saved) == {"diff"}
    params = _parse("full", {"diff": torch.randn(5, 6)}, "lycoris")
    assert params.bias_delta() is None
    params.check(torch.Size((5, 6, 1, 1)), where=WHERE)
    assert params.delta(torch.Size((5, 6, 1, 1))).shape == (5, 6, 1, 1)


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_lycoris_oft_strength_is_a_rotation(algo):
    """Scaling Q keeps R orthogonal: every w preserves the output-channel Gram matrix (without rescale)."""
    _, w0, _, _, saved, _ = _lycoris("linear", algo, 0.0, False)
    params = _parse("oft", saved, "lycoris")
    for w in (0.25, 0.5, 2.0):
        wp = params.apply(w0, w)
        torch.testing.assert_close(wp.T @ wp, w0.T @ w0, atol=1e-4, rtol=1e-4)
    assert _maxdiff(params.apply(w0, 0.5), w0) > 1e-3


# -- PEFT OFT -----------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


PEFT_OFT_CASES = {
    "block4-neumann": dict(r=0, oft_block_size=4),
    "block4-exact": dict(r=0, oft_block_size=4, use_cayley_neumann=False),
    "r2-neumann": dict(r=2, oft_block_size=0),
    "r2-exact": dict(r=2, oft_block_size=0, use_cayley_neumann=False),
    "neumann3": dict(r=0, oft_block_size=4, num_cayley_neumann_terms=3),
    "neumann8": dict(r=0, oft_block_size=4, num_cayley_neumann_terms=8),
    "coft": dict(r=0, oft_block_size=4, coft=True, eps=0.4),
    "coft-exact": dict(r=0, oft_block_size=4, coft=True, eps=0.4, use_cayley_neumann=False),
    "block-share": dict(r=0, oft_block_size=4, block_share=True),
}


def _peft_oft(kind: str, case: str, seed: int = 0):
    layer, x = _layer(kind, seed)
    w0 = layer.weight.detach().clone()
    cfg = OFTConfig(target_modules=["layer"], init_weights=False, **PEFT_OFT_CASES[case])
    torch.manual_seed(seed + 1)
    model = inject_adapter_in_model(cfg, _Net(layer))
    with torch.no_grad():  # larger rotations than peft's init, so orientation errors show
        model.layer.oft_R["default"].weight.mul_(3.0)
    saved = {k.split("layer.", 1)[1]: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    config = cfg.to_dict()
    config["peft_type"] = "OFT"
    return model, w0, x, saved, config


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("case", list(PEFT_OFT_CASES))
def test_peft_oft_matches_reference(kind, case):
    model, w0, x, saved, config = _peft_oft(kind, case)
    assert set(saved) == {"oft_R.weight"}
    assert detect(set(saved), where=WHERE).name == "peft_oft"
    params = _parse("peft_oft", saved, "peft", config)
    params.check(w0.shape, where=WHERE)
    assert not params.is_additive
    mine = params.apply(w0, 1.0)
    layer = model.layer
    with torch.no_grad():
        if kind == "conv3x3":
            layer.merge()  # peft's unmerged k×k conv forward folds overlapping patches: compare merged weights
            assert _maxdiff(mine, layer.get_base_layer().weight) <= TOL
            ref = layer(x)
        else:
            ref = layer(x)
        out = _op(layer.get_base_layer(), x, mine, layer.get_base_layer().bias)
    assert _maxdiff(out, ref) <= TOL
    assert _maxdiff(mine, w0) > 1e-3
    assert torch.equal(params.apply(w0, 0.0), w0)


def test_peft_oft_merge_equals_forward_on_1x1_and_linear():
    for kind in ("linear", "conv1x1"):
        model, w0, x, saved, config = _peft_oft(kind, "block4-exact")
        with torch.no_grad():
            unmerged = model.layer(x)
            model.layer.merge()
            assert _maxdiff(model.layer(x), unmerged) <= TOL


def test_peft_neumann_series_terms():
    torch.manual_seed(0)
    q = peft_skew(0.3 * torch.randn(2, 6), 4)
    eye = torch.eye(4).expand(2, 4, 4)
    p = [torch.linalg.matrix_power(q, k) for k in range(8)]
    torch.testing.assert_close(peft_cayley(q, neumann=True, terms=5), eye + 2 * (p[1] + p[2] + p[3]) + p[4])
    torch.testing.assert_close(peft_cayley(q, neumann=True, terms=3), eye + 2 * (p[1] + p[2]) + p[3])
    torch.testing.assert_close(peft_cayley(q, neumann=True, terms=2), eye + 2 * p[1])
    legacy = peft_cayley(q, neumann=True, terms=5, legacy=True)
    torch.testing.assert_close(legacy, eye + 2 * (p[1] + p[2] + p[3] + p[4]))
    exact = peft_cayley(q, neumann=False, terms=5)
    torch.testing.assert_close(exact, (eye - q) @ torch.linalg.inv(eye + q))
    # for ‖Q‖ < 1 the series converges to the transpose of the exact solve
    small = q / (2 * torch.linalg.matrix_norm(q, ord=2).max())
    long = peft_cayley(small, neumann=True, terms=40)
    assert _maxdiff(long, peft_cayley(small, neumann=False, terms=0).transpose(-1, -2)) < 1e-5


def test_peft_oft_legacy_version_uses_old_series():
    _, w0, _, saved, config = _peft_oft("linear", "block4-neumann")
    old = dict(config, peft_version=None)
    with pytest.warns(UserWarning, match="peft < 0.18"):
        params = _parse("peft_oft", saved, "peft", old)
    assert params.neumann_legacy
    assert not _parse("peft_oft", saved, "peft", config).neumann_legacy


def test_peft_oft_bf16_weight_keeps_dtype():
    _, w0, _, saved, config = _peft_oft("linear", "block4-exact")
    params = _parse("peft_oft", saved, "peft", config)
    out = params.apply(w0.bfloat16(), 1.0)
    assert out.dtype == torch.bfloat16
    assert _maxdiff(out.float(), params.apply(w0, 1.0)) < 0.05


# -- WaveFT -------------------------------------------------------------------------------------------

WAVEFT_CASES = {
    "db1": dict(n_frequency=60, scaling=25.0, wavelet_family="db1"),
    "db2-odd": dict(n_frequency=40, scaling=10.0, wavelet_family="db2", random_loc_seed=3),
    "sym3": dict(n_frequency=25, scaling=5.0, wavelet_family="sym3"),
    "coif1": dict(n_frequency=33, scaling=1.5, wavelet_family="coif1", random_loc_seed=11),
    "no-idwt": dict(n_frequency=50, scaling=2.0, use_idwt=False),
}
WAVEFT_SHAPES = {"db1": (16, 12), "db2-odd": (13, 11), "sym3": (20, 9), "coif1": (7, 15), "no-idwt": (16, 12)}


def _peft_waveft(case: str):
    torch.manual_seed(0)
    n_in, n_out = WAVEFT_SHAPES[case]
    layer = nn.Linear(n_in, n_out)
    w0 = layer.weight.detach().clone()
    cfg = WaveFTConfig(target_modules=["layer"], init_weights=False, **WAVEFT_CASES[case])
    model = inject_adapter_in_model(cfg, _Net(layer))
    with torch.no_grad():
        # coefficients of ~0.5 after scaling, so outputs stay O(1) and 1e-5 is a tight bound
        model.layer.waveft_spectrum["default"].copy_(torch.randn(cfg.n_frequency) * 0.5 / cfg.scaling)
    saved = {k.split("layer.", 1)[1]: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    return model, w0, torch.randn(4, n_in), saved, cfg.to_dict()


@pytest.mark.parametrize("case", list(WAVEFT_CASES))
def test_waveft_matches_peft(case):
    model, w0, x, saved, config = _peft_waveft(case)
    assert set(saved) == {"waveft_spectrum"}
    assert detect(set(saved), where=WHERE).name == "waveft"
    params = _parse("waveft", saved, "peft", config)
    params.check(w0.shape, where=WHERE)
    assert params.is_additive
    with torch.no_grad():
        ref_delta = model.layer.get_delta_weight("default")
        ref = model.layer(x)
    assert _maxdiff(params.delta(w0.shape), ref_delta) <= TOL
    out = F.linear(x, params.apply(w0, 1.0), model.layer.get_base_layer().bias)
    assert _maxdiff(out, ref) <= TOL
    assert torch.equal(params.apply(w0, 0.0), w0)
    torch.testing.assert_close(params.apply(w0, 0.5), w0 + 0.5 * ref_delta, atol=TOL, rtol=0)


def test_waveft_metadata_strings():
    """Single files carry the config in string metadata."""
    model, w0, _, saved, config = _peft_waveft("db2-odd")
    meta = {k: str(config[k]) for k in ("n_frequency", "scaling", "wavelet_family", "use_idwt", "random_loc_seed")}
    params = _parse("waveft", saved, "peft", meta)
    assert _maxdiff(params.delta(w0.shape), model.layer.get_delta_weight("default").detach()) <= TOL


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,tensors,config,match",
    [
        ("oft", {"oft_blocks": torch.zeros(4, 3, 4)}, None, "oft_blocks"),
        ("oft", {"oft_blocks": torch.zeros(4, 4)}, None, "oft_blocks"),
        ("oft", {"oft_blocks": torch.zeros(2, 4, 3, 3)}, None, "even block size"),
        ("oft", {"oft_blocks": torch.zeros(3, 3, 4, 4)}, None, "divisible by 4"),
        ("oft", {"oft_blocks": torch.zeros(4, 4, 4), "rescale": torch.ones(12, 1)}, None, "rescale"),
        ("oft", {"oft_blocks": torch.zeros(4, 4, 4), "alpha": torch.ones(2)}, None, "alpha"),
        ("peft_oft", {"oft_R.weight": torch.zeros(4, 5)}, {"use_cayley_neumann": True}, "b\\(b-1\\)/2"),
        ("peft_oft", {"oft_R.weight": torch.zeros(4, 6)}, None, "config"),
        ("peft_oft", {"oft_R.weight": torch.zeros(4, 6)}, {"coft": False}, "use_cayley_neumann"),
        ("full", {"diff": torch.zeros(4, 4), "diff_b": torch.zeros(3)}, None, "diff_b"),
        ("full", {"diff_b": torch.zeros(3)}, None, "'diff'"),
        ("waveft", {"waveft_spectrum": torch.zeros(5)}, None, "config"),
        ("waveft", {"waveft_spectrum": torch.zeros(2, 5)}, None, "n_frequency"),
    ],
)
def test_format_errors_name_the_module(method, tensors, config, match):
    with pytest.raises(FormatError, match=match) as e:
        _parse(method, tensors, "peft" if method in ("peft_oft", "waveft") else "lycoris", config)
    assert WHERE in str(e.value)


WAVEFT_CONFIG = {"scaling": 25.0, "wavelet_family": "db1", "use_idwt": True, "random_loc_seed": 777}


@pytest.mark.parametrize("field", list(WAVEFT_CONFIG))
def test_waveft_missing_config_field(field):
    config = {k: v for k, v in WAVEFT_CONFIG.items() if k != field}
    with pytest.raises(FormatError, match=f"'{field}'") as e:
        _parse("waveft", {"waveft_spectrum": torch.zeros(5)}, "peft", config)
    assert WHERE in str(e.value)


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(WAVEFT_CONFIG, wavelet_family="nope"), "wavelet_family"),
        (dict(WAVEFT_CONFIG, use_idwt="maybe"), "use_idwt"),
        (dict(WAVEFT_CONFIG, n_frequency=6), "n_frequency"),
    ],
)
def test_waveft_bad_config_values(config, match):
    with pytest.raises(FormatError, match=match):
        _parse("waveft", {"waveft_spectrum": torch.zeros(5)}, "peft", config)


@pytest.mark.parametrize(
    "method,tensors,config,shape",
    [
        ("oft", {"oft_blocks": torch.zeros(4, 4, 4)}, None, (12, 16)),
        ("oft", {"oft_blocks": torch.zeros(3, 4, 4, 4)}, None, (8, 4, 3, 3)),
        ("peft_oft", {"oft_R.weight": torch.zeros(4, 6)}, {"use_cayley_neumann": False}, (16, 12)),
        ("peft_oft", {"oft_R.weight": torch.zeros(1, 6)}, {"use_cayley_neumann": False, "block_share": True}, (4, 6)),
        ("full", {"diff": torch.zeros(8, 4, 3, 3)}, None, (8, 4, 1, 1)),
        ("full", {"diff": torch.zeros(8, 36), "diff_b": torch.zeros(8)}, None, (8, 4, 3, 2)),
        ("waveft", {"waveft_spectrum": torch.zeros(5)}, WAVEFT_CONFIG, (8, 4, 1, 1)),
        ("waveft", {"waveft_spectrum": torch.zeros(50)}, WAVEFT_CONFIG, (4, 4)),
    ],
)
def test_shape_errors_name_module_and_shapes(method, tensors, config, shape):
    params = _parse(method, tensors, "lycoris", config)
    with pytest.raises(ShapeError) as e:
        params.check(torch.Size(shape), where=WHERE)
    assert WHERE in str(e.value) and str(tuple(shape)) in str(e.value)


def test_old_peft_oft_layout_is_refused():
    from diffadapt.errors import UnsupportedError

    assert detect({"oft_r", "oft_s"}, where=WHERE).name == "peft_oft"
    with pytest.raises(UnsupportedError, match="peft < 0.14"):
        _parse("peft_oft", {"oft_r": torch.zeros(2, 4, 4), "oft_s": torch.ones(2, 1)}, "peft", {})
