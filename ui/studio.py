"""Gradio studio to stack adapter styles: ``python ui/studio.py [--model PATH] [--adapters DIR] [--port 7860] [--demo]``.

Without ``--model`` (or with ``--demo``) it runs on the embedded tiny random SD1 pipeline with three random
demo adapters, so it works offline on a fresh machine. The work is in ``ui/logic.py``; this file is layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `ui` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradio as gr

from diffadapt.errors import DiffAdaptError
from ui.logic import Studio, demo_studio

SLOTS = 4


def _weights(names: list[str], values: tuple[Any, ...]) -> dict[str, float]:
    """{name: weight} for the enabled slots; ``values`` is the checkboxes then the sliders."""
    checks, sliders = values[:SLOTS], values[SLOTS:]
    return {n: float(sliders[i]) for i, n in enumerate(names) if checks[i]}


def _slots(names: list[str], *, new: str | None = None) -> list[Any]:
    """Checkbox then slider updates for every slot; a newly added adapter starts on at weight 1."""
    boxes, sliders = [], []
    for i in range(SLOTS):
        name = names[i] if i < len(names) else None
        fresh = {"value": True} if name is not None and name == new else {}
        boxes.append(gr.update(label=name or "", visible=name is not None, **fresh))
        sliders.append(gr.update(label=f"{name} weight" if name else "weight", visible=name is not None,
                                 **({"value": 1.0} if fresh else {})))
    return boxes + sliders


def build_app(pipe: Any = None, *, adapter_dir: str | Path | None = None, studio: Studio | None = None) -> gr.Blocks:
    """The studio on ``pipe`` (default: the tiny demo pipeline with demo adapters) and ``adapter_dir``."""
    if studio is None:
        if pipe is None:
            studio = demo_studio(adapter_dir=adapter_dir)
        else:
            studio = Studio(pipe, adapter_dir=adapter_dir if adapter_dir is not None else "adapters")
    initial = studio.loaded()[:SLOTS]

    with gr.Blocks(title="diffadapt studio") as app:
        gr.Markdown("## diffadapt studio — stack adapter styles\n"
                    "A1111 tags such as `<lora:ink:0.8>` in the prompt override the sliders.")
        names = gr.State(initial)
        with gr.Row():
            with gr.Column(scale=1):
                choice = gr.Dropdown(studio.available(), label="Adapters in folder", elem_id="adapter-choice")
                load_btn = gr.Button("Load into a slot", elem_id="load")
                upload = gr.File(label="Upload .safetensors", file_types=[".safetensors"], type="filepath")
                boxes, sliders = [], []
                for i in range(SLOTS):
                    name = initial[i] if i < len(initial) else None
                    with gr.Row():
                        boxes.append(gr.Checkbox(value=True, label=name or "", visible=name is not None,
                                                 elem_id=f"on-{i}", scale=1, min_width=80))
                        sliders.append(gr.Slider(-2, 2, value=1.0, step=0.05, visible=name is not None,
                                                 label=f"{name} weight" if name else "weight",
                                                 elem_id=f"weight-{i}", scale=3))
                merge_name = gr.Textbox("merged", label="Merged adapter name")
                merge_btn = gr.Button("Merge enabled (SVD) and save", elem_id="merge")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                prompt = gr.Textbox("a photo of a cat", label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox("", label="Negative prompt", elem_id="negative")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0)
                    steps = gr.Slider(1, 50, value=4, step=1, label="Steps")
                    cfg = gr.Slider(1, 15, value=7.0, step=0.5, label="CFG scale")
                generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                image = gr.Image(label="Image", type="pil", elem_id="image", height=320)
                info = gr.Textbox(label="Infotext (A1111)", lines=4, elem_id="infotext", buttons=["copy"])
        slot_outputs = [*boxes, *sliders]

        def add(name: str | None, current: list[str]):
            if not name:
                raise gr.Error("pick an adapter first")
            try:
                studio.load(name)
            except DiffAdaptError as e:
                raise gr.Error(str(e)) from e
            if name not in current:
                if len(current) >= SLOTS:
                    raise gr.Error(f"all {SLOTS} slots are in use")
                current = [*current, name]
            return current, f"loaded **{name}**", gr.update(choices=studio.available()), *_slots(current, new=name)

        def uploaded(file: str | None, current: list[str]):
            if not file:
                return current, "", gr.update(), *_slots(current)
            try:
                name = studio.upload(file)
            except DiffAdaptError as e:
                raise gr.Error(str(e)) from e
            return add(name, current)

        def run(text, neg, seed_value, steps_value, cfg_value, current, *values):
            try:
                return studio.generate(text, weights=_weights(current, values), negative_prompt=neg,
                                       seed=int(seed_value or 0), steps=int(steps_value), cfg=float(cfg_value))
            except DiffAdaptError as e:
                raise gr.Error(str(e)) from e

        def merge(name, current, *values):
            try:
                path, error = studio.merge(_weights(current, values), name=(name or "merged").strip())
            except DiffAdaptError as e:
                raise gr.Error(str(e)) from e
            return f"saved `{path.name}` — relative approximation error {error:.3g}", gr.update(choices=studio.available())

        load_btn.click(add, [choice, names], [names, status, choice, *slot_outputs])
        upload.upload(uploaded, [upload, names], [names, status, choice, *slot_outputs])
        generate_btn.click(run, [prompt, negative, seed, steps, cfg, names, *slot_outputs], [image, info])
        merge_btn.click(merge, [merge_name, names, *slot_outputs], [status, choice])
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffadapt studio", description="Gradio studio to stack adapter styles.")
    parser.add_argument("--model", help="diffusers folder, hub id or .safetensors/.ckpt (default: tiny demo model)")
    parser.add_argument("--adapters", help="adapter folder (default: ./adapters, or a temp folder of demo adapters)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--demo", action="store_true", help="tiny random pipeline with three demo adapters")
    args = parser.parse_args(argv)
    if args.demo or args.model is None:
        studio = demo_studio(adapter_dir=args.adapters)
    else:
        import torch

        from diffadapt.cli import _load_model

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe, name, digest = _load_model(args.model, device)
        studio = Studio(pipe, adapter_dir=args.adapters or "adapters", model_name=name, model_hash=digest)
    print(f"adapters: {studio.adapter_dir}", file=sys.stderr)
    build_app(studio=studio).launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
