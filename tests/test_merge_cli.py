"""Merged adapters as files: ``da.save`` of a merge, and ``diffadapt merge`` on files."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

import diffadapt as da
from diffadapt.cli import main
from diffadapt.fixtures import lycoris_file
from diffadapt.testing import tiny_sd1_pipeline


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    pipe = tiny_sd1_pipeline()
    paths = {}
    for i, (name, kw) in enumerate({"a": dict(rank=4), "b": dict(rank=2), "h": dict(algo="loha", std=0.3)}.items()):
        unet, _ = lycoris_file(pipe.unet, prefix="lora_unet", seed=i, **kw)
        te, _ = lycoris_file(pipe.text_encoder, prefix="lora_te", seed=i + 10, **kw)
        paths[name] = tmp / f"{name}.safetensors"
        save_file({**unet, **te}, str(paths[name]))
    model_dir = tmp / "model"
    pipe.save_pretrained(model_dir)
    return pipe, paths, model_dir, tmp


def weights(pipe):
    return {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder")
            for n, p in getattr(pipe, c).named_parameters()}


def loaded_with(pipe, items):
    for i, (path, w) in enumerate(items):
        da.load(pipe, path, f"x{i}", weight=w)
    try:
        return weights(pipe)
    finally:
        da.unload(pipe)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("fmt, dest", [("kohya", "m.safetensors"), ("peft", "m_peft"), ("peft", "m1.safetensors")])
def test_saved_merge_loads_back_to_the_same_weights(setup, fmt, dest):
    pipe, paths, _, tmp = setup
    da.load(pipe, paths["a"], "a", weight=0.6)
    da.load(pipe, paths["b"], "b", weight=0.4)
    try:
        da.merge(pipe, {"a": 0.6, "b": 0.4}, "ab", method="cat")
        merged = weights(pipe)
        da.save(pipe, "ab", tmp / fmt / dest, format=fmt)
    finally:
        da.unload(pipe)
    assert max_diff(loaded_with(pipe, [(tmp / fmt / dest, 1.0)]), merged) <= 2e-6


@pytest.mark.parametrize("method, rank, exact", [("cat", None, True), ("svd", None, True), ("svd", 2, False),
                                                 ("ties", 4, False)])
def test_cli_merge_of_files(setup, method, rank, exact, capsys):
    pipe, paths, model_dir, tmp = setup
    out = tmp / f"cli_{method}_{rank}.safetensors"
    argv = ["merge", f"{paths['a']}:0.6", f"{paths['b']}:-0.4", "--out", str(out), "--method", method,
            "--model", str(model_dir)] + (["--rank", str(rank)] if rank else [])
    assert main(argv) == 0
    err = float(capsys.readouterr().err.rsplit(":", 1)[1])
    info = da.inspect(out)
    assert info.methods == {"lora": info.modules} and info.metadata["diffadapt_merge_method"] == method
    got = loaded_with(pipe, [(out, 1.0)])
    expected = loaded_with(pipe, [(paths["a"], 0.6), (paths["b"], -0.4)])
    if exact:
        assert err <= 1e-5 and max_diff(got, expected) <= 1e-5
    else:
        assert 0 < err < 1


def test_cli_merge_of_mixed_methods_and_errors(setup, capsys):
    pipe, paths, model_dir, tmp = setup
    out = tmp / "mixed.safetensors"
    assert main(["merge", str(paths["a"]), f"{paths['h']}:0.5", "--out", str(out), "--rank", "8",
                 "--model", str(model_dir)]) == 0
    assert da.inspect(out).methods == {"lora": da.inspect(out).modules}
    assert main(["merge", str(paths["a"]), str(paths["h"]), "--out", str(tmp / "c.safetensors"),
                 "--method", "cat", "--model", str(model_dir)]) == 2
    assert "cat" in capsys.readouterr().err
    assert main(["merge", str(tmp / "missing.safetensors"), "--out", str(tmp / "x.safetensors")]) == 2
    assert not (tmp / "c.safetensors").exists() and not (tmp / "x.safetensors").exists()


@pytest.mark.parametrize("family,key,dim", [("flux", "lora_unet_double_blocks_0_img_attn_proj", 3072),
                                            ("sd3", "lora_unet_joint_blocks_0_x_block_attn_proj", 2432)])
def test_cli_merge_with_a_built_in_dit_model(tmp_path, family, key, dim, capsys):
    """--model flux / sd3 name the built-in module trees (as convert's --model does): an exact cat merge of two
    one-module files stacks the ranks on that one module."""
    import torch
    from safetensors.torch import load_file

    paths = []
    for i, rank in enumerate((2, 3)):
        g = torch.Generator().manual_seed(i)
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({f"{key}.lora_down.weight": torch.randn(rank, dim, generator=g),
                   f"{key}.lora_up.weight": torch.randn(dim, rank, generator=g),
                   f"{key}.alpha": torch.tensor(float(rank))}, str(paths[-1]))
    out = tmp_path / "merged.safetensors"
    assert main(["merge", f"{paths[0]}:0.5", str(paths[1]), "--method", "cat", "--model", family, "--out", str(out)]) == 0
    merged = load_file(str(out))
    downs = [k for k in merged if k.endswith(".lora_down.weight")]
    assert len(downs) == 1 and merged[downs[0]].shape == (5, dim)
    assert merged[downs[0].replace("lora_down", "lora_up")].shape == (dim, 5)
