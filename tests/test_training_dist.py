"""Two CPU processes (gloo, as torchrun would start them): per-rank data and noise, averaged loss, gradients
synchronised (identical adapters on both ranks), one writer, and a checkpoint holding both ranks' RNG states.

The ranks are forked from the test process, so they start in milliseconds with everything imported."""

import json
import multiprocessing
import os
import socket
from pathlib import Path

import numpy as np
from PIL import Image

import diffadapt as da
from diffadapt.testing import tiny_sd1_pipeline


def _rank(rank: int, port: int, argv: list[str], folder: str) -> None:
    """One process of the job: torchrun's environment, spies on what the trainer draws and logs, then train."""
    code = 1
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, PartialState
        from peft import get_peft_model_state_dict

        from diffadapt.train import data, export, families, parse_args, train

        AcceleratorState._reset_state(reset_partial_state=True)  # forget the test process's single-process state
        PartialState._reset_state()
        rec = {"noise": [], "keys": [], "local": []}
        add_noise, keys, gather, reduce = families.add_noise, data.BatchPlan.keys, export.gather, Accelerator.reduce

        def spy_noise(family, scheduler, latents, noise, u):
            rec["noise"].append(float(noise.double().sum()))
            return add_noise(family, scheduler, latents, noise, u)

        def spy_keys(self, m):
            rec["keys"].append(keys(self, m))
            return rec["keys"][-1]

        def spy_reduce(self, tensor, reduction="sum", scale=1.0):
            rec["local"].append(float(tensor))
            return reduce(self, tensor, reduction, scale)

        def spy_gather(acc, trained):
            rec["rank"], rec["world"] = acc.process_index, acc.num_processes
            rec["adapter"] = {n: sum(float(v.double().abs().sum()) for v in
                                     get_peft_model_state_dict(acc.unwrap_model(m)).values())
                              for n, m in trained.items()}
            return gather(acc, trained)

        families.add_noise, data.BatchPlan.keys, export.gather, Accelerator.reduce = (
            spy_noise, spy_keys, spy_gather, spy_reduce)
        result = train(parse_args(argv))
        rec["losses"], rec["written"] = result.losses, result.written
        Path(folder, f"rank{rank}.json").write_text(json.dumps(rec))
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)  # never run the test process's exit handlers in a fork


def test_two_processes(tmp_path):
    model, images, out = tmp_path / "model", tmp_path / "images", tmp_path / "out"
    tiny_sd1_pipeline().save_pretrained(model)
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    argv = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images), "--instance_prompt",
            "a photo of sks dog", "--resolution", "16", "--train_batch_size", "1", "--max_train_steps", "2",
            "--checkpointing_steps", "1", "--learning_rate", "1e-2", "--train_text_encoder", "--seed", "3",
            "--output_dir", str(out)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, port, argv, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]

    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["noise"] != r1["noise"]  # each rank draws its own noise
    assert all(a != b for a, b in zip(r0["keys"], r1["keys"]))  # and its own images
    assert r0["losses"] == r1["losses"]  # the logged loss is the mean over ranks
    assert np.allclose(r0["losses"], [(a + b) / 2 for a, b in zip(r0["local"], r1["local"])], rtol=1e-6)
    assert r0["adapter"] == r1["adapter"]  # gradients were averaged: both ranks hold the same adapter
    assert r1["written"] == [] and sorted(Path(p).name for p in r0["written"]) == [
        "adapter.safetensors", "pytorch_lora_weights.safetensors"]
    ckpt = out / "checkpoint-2"
    assert {"random_states_0.pkl", "random_states_1.pkl", "adapter_unet.safetensors",
            "adapter_text_encoder.safetensors", "progress.json"} <= {p.name for p in ckpt.iterdir()}
    info = da.load(tiny_sd1_pipeline(), out / "pytorch_lora_weights.safetensors")
    assert sorted(info.components) == ["text_encoder", "unet"]
