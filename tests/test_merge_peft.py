"""da.merge's linear / ties / dare against peft's own ``LoraModel.add_weighted_adapter`` on the same adapters.

Two PEFT LoRAs (equal rank, different alphas, so the per-adapter scaling matters) on a small Linear + Conv2d
model, saved by peft, loaded by diffadapt (patch mode) and by peft (``PeftModel.from_pretrained`` /
``load_adapter``). peft merges with ``combination_type`` linear / ties_svd / dare_linear_svd; diffadapt's
merged weights must equal the base weights plus peft's merged adapter's ``get_delta_weight``.
"""

from __future__ import annotations

import copy

import peft.tuners.lora.model as lora_model
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

import diffadapt as da
from diffadapt.fixtures import randomize_

WEIGHTS = {"a": 0.7, "b": -0.4}


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(12, 16)
        self.conv = nn.Conv2d(4, 6, 3)
        self.proj_out = nn.Linear(16, 10)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peft_merge")
    torch.manual_seed(0)
    base = Toy()
    for i, (name, alpha) in enumerate({"a": 8, "b": 3}.items()):
        cfg = LoraConfig(r=4, lora_alpha=alpha, target_modules=["proj_in", "conv", "proj_out"])
        model = get_peft_model(copy.deepcopy(base), cfg)
        randomize_(((n, p) for n, p in model.named_parameters() if "lora_" in n), seed=10 + i, std=0.3)
        model.save_pretrained(tmp / name)
    return base, tmp


def peft_merged(base, tmp, combination_type, **kw) -> dict[str, torch.Tensor]:
    """{module: W0 + ΔW} of peft's merged adapter."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp / "a", adapter_name="a")
    model.load_adapter(tmp / "b", adapter_name="b")
    model.base_model.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "m",
                                          combination_type=combination_type, **kw)
    out = {}
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer):
            w = layer.get_base_layer().weight
            out[name] = (w + layer.get_delta_weight("m").reshape(w.shape)).detach()
    return out


def ours(base, tmp, **kw) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base)
    for name in WEIGHTS:
        da.load(model, tmp / name, name)
    info = da.merge(model, WEIGHTS, "m", **kw)
    assert info.methods == {"lora": 3}
    assert not any(da.adapters(model)[n].enabled for n in WEIGHTS)
    return {n: getattr(model, n).weight.detach().clone() for n in ("proj_in", "conv", "proj_out")}


def test_linear_is_peft_linear(saved):
    base, tmp = saved
    expected = peft_merged(base, tmp, "linear")
    got = ours(base, tmp, method="linear")
    assert set(got) == set(expected)
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-5)


def test_ties_is_peft_ties_svd(saved):
    base, tmp = saved
    expected = peft_merged(base, tmp, "ties_svd", density=0.5, svd_rank=3, majority_sign_method="total")
    got = ours(base, tmp, method="ties", density=0.5, rank=3)
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-5)


def test_dare_draws_peft_masks_from_the_same_seed(saved, monkeypatch):
    """peft draws DARE masks from the global RNG after creating the merged layers (which draws too); seeding
    at its first dare_linear call lines its stream up with diffadapt's seeded one."""
    base, tmp = saved
    calls = []

    def seeded_dare(*args, **kwargs):
        if not calls:
            torch.manual_seed(5)
        calls.append(1)
        return dare(*args, **kwargs)

    dare = lora_model.dare_linear
    monkeypatch.setattr(lora_model, "dare_linear", seeded_dare)
    with torch.random.fork_rng():
        expected = peft_merged(base, tmp, "dare_linear_svd", density=0.6, svd_rank=4)
    assert len(calls) == 3
    state = torch.get_rng_state()
    got = ours(base, tmp, method="dare", density=0.6, rank=4, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-5)
