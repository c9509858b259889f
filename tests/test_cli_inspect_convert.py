"""``diffadapt inspect`` goes on past a file it cannot read; ``diffadapt convert --model`` takes every
built-in family by name (its module tree built on the meta device), not only sd1/sdxl."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffadapt import conversion
from diffadapt.cli import main

Q = "transformer_blocks.0.attn.to_q"


@pytest.mark.parametrize("family", ["sd3"])
def test_convert_model_by_family_name(tmp_path, capsys, monkeypatch, family):
    """An SD3.5 Large LoRA (real width 2432) under kohya's flat names → PEFT, names resolved by --model sd3."""
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 2432, generator=g), torch.randn(2432, 4, generator=g)
    flat = f"lora_transformer_{Q.replace('.', '_')}"
    save_file({f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up, f"{flat}.alpha": torch.tensor(4.0)},
              tmp_path / "sd3.safetensors")
    monkeypatch.setattr("diffadapt.cli._load_model", lambda *a: pytest.fail(f"--model {family} loaded a model"))
    dest = tmp_path / "peft.safetensors"
    assert main(["convert", str(tmp_path / "sd3.safetensors"), str(dest), "--format", "peft", "--model", family]) == 0
    assert capsys.readouterr().out.split() == [str(dest)]
    out = load_file(dest)
    assert set(out) == {f"transformer.{Q}.lora_A.weight", f"transformer.{Q}.lora_B.weight"}
    assert torch.equal(out[f"transformer.{Q}.lora_A.weight"], down)
    assert torch.equal(out[f"transformer.{Q}.lora_B.weight"], up)


def test_unknown_family_name_is_one_line(tmp_path, capsys):
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)},
              tmp_path / "x.safetensors")
    assert "flux" in conversion.BUILT_IN
    assert main(["convert", str(tmp_path / "x.safetensors"), str(tmp_path / "o"), "--format", "peft",
                 "--model", "no-such-model-dir"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model-dir" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_inspect_reports_each_bad_file_and_goes_on(tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)},
              good)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    argv = [str(good), str(tmp_path / "empty.safetensors"), str(tmp_path / "missing"), str(good)]
    assert main(["inspect", "--json", *argv]) == 2
    out, err = capsys.readouterr()
    assert [json.loads(doc)["modules"] for doc in out.strip().split("\n\n")] == [1, 1]
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "empty.safetensors" in lines[0] and "missing" in lines[1]
    assert main(["inspect", str(good)]) == 0 and main(["inspect", str(tmp_path / "missing")]) == 2
