"""The studio's Gradio app: adapter cards, a stack of any length, generate/compare/grid/merge, and the API.

The three public endpoints (``/adapters``, ``/generate``, ``/merge``; see "Use via API") and the UI's
buttons call the same :class:`~diffadapt.studio.core.Studio` methods. UI errors are shown inline, HTML-escaped,
next to the controls (a ``<lora:…>`` in a message stays visible); API errors reach the client as
``gr.Error`` text.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import DiffAdaptError
from ..prompt import format_number
from .core import MERGE_METHODS, Cancelled, Request, Slot, Studio

log = logging.getLogger("diffadapt.studio")
PER_SLOT = 4  # on, weight, te, preset
PRIVATE = {"api_visibility": "private"}
# Gradio numbers a session's handlers from one counter without a lock: two renders running at once (the cards
# and the stack after an upload) can give two handlers one id, so a card's click runs another's. One at a time.
RENDER = {"concurrency_id": "studio-render", "concurrency_limit": 1}
CSS = """
.card { min-width: 150px; }
.card .meta { font-size: 0.85em; line-height: 1.3; }
#status .error { color: #b00020; white-space: pre-wrap; }
#status .ok { color: #1b5e20; white-space: pre-wrap; }
"""


def status_html(message: str, *, error: bool = False) -> str:
    return f'<div class="{"error" if error else "ok"}">{html.escape(message)}</div>'


def failure(e: Exception) -> str:
    if not isinstance(e, DiffAdaptError):
        log.exception("studio request failed")
        return status_html(f"{type(e).__name__}: {e}", error=True)
    return status_html("Cancelled." if isinstance(e, Cancelled) else str(e), error=True)


def card_html(card: dict[str, Any]) -> str:
    rows = [f"<b>{html.escape(card['name'])}</b>",
            html.escape(f"{', '.join(card['methods']) or '?'} · rank {', '.join(map(str, card['ranks'])) or '?'} · "
                        f"{card['base_family']}")]
    if card["trigger_words"]:
        rows.append("triggers: " + html.escape(", ".join(card["trigger_words"])))
    if card["error"]:
        rows.append(f'<span style="color:#b00020">{html.escape(card["error"])}</span>')
    return f'<div class="meta">{"<br>".join(rows)}</div>'


def parse_numbers(text: str, *, what: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise DiffAdaptError(f"{what}: '{text}' is not a comma-separated list of numbers") from None
    if not values:
        raise DiffAdaptError(f"{what}: give at least one number")
    return values


def grid_axes(mode: str, rows: list[str], x_weights: str, y_adapter: str | None, y_weights: str):
    """(row labels, column labels, per-cell weight overrides) for the two grid modes."""
    xs = parse_numbers(x_weights, what="X weights")
    if mode == "adapter × weight":
        if not rows:
            raise DiffAdaptError("pick at least one adapter for the grid's rows")
        return list(rows), [format_number(w) for w in xs], [[{n: w} for w in xs] for n in rows]
    if not rows or len(rows) != 1 or not y_adapter:
        raise DiffAdaptError("weight × weight: pick one X adapter and one Y adapter")
    ys = parse_numbers(y_weights, what="Y weights")
    x = rows[0]
    return ([f"{y_adapter} {format_number(w)}" for w in ys], [f"{x} {format_number(w)}" for w in xs],
            [[{y_adapter: wy, x: wx} for wx in xs] for wy in ys])


def slots_from(names: list[str], values: tuple[Any, ...]) -> dict[str, Slot]:
    """{name: Slot} for the switched-on slots; ``values`` holds PER_SLOT values per slot."""
    if len(values) != PER_SLOT * len(names):
        raise DiffAdaptError("the stack changed while this request was sent; press the button again")
    out = {}
    for i, name in enumerate(names):
        on, weight, te, preset = values[i * PER_SLOT:(i + 1) * PER_SLOT]
        if on:
            out[name] = Slot(float(weight), None if te in (None, "") else float(te), preset or "all")
    return out


def build_app(studio: Studio) -> gr.Blocks:
    """The studio's Blocks on ``studio`` (its pipeline and adapter folder)."""
    size = studio.size

    def request(prompt, negative, seed, steps, cfg, width, height, sampler) -> Request:
        return Request(prompt or "", negative or "", int(seed if seed not in (None, "") else -1), int(steps),
                       float(cfg), int(width) if width else None, int(height) if height else None, sampler or None)

    with gr.Blocks(title="diffadapt studio") as app:
        gr.Markdown("## diffadapt studio\nStack adapter styles. A1111 tags such as `<lora:ink:0.8>` or "
                    "`<lora:ink:0.5:1>` (text encoder, UNet) in the prompt win over the sliders.")
        stack = gr.State([])

        def add_slot(current: list[str] | None, name: str):
            current = list(current or [])
            if name in current:
                return current, status_html(f"{name} is already in the stack")
            try:
                studio.load(name)
            except Exception as e:  # noqa: BLE001 — shown to the user
                return current, failure(e)
            return [*current, name], status_html(f"added {name}")

        cards = gr.State([])  # filled on page load, so a reloaded page sees uploads and merges
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                with gr.Row():
                    refresh_btn = gr.Button("Refresh folder", elem_id="refresh", size="sm")
                    upload = gr.UploadButton("Upload .safetensors", file_types=[".safetensors"], type="filepath",
                                             elem_id="upload", size="sm")
                status = gr.HTML(elem_id="status")

                @gr.render(inputs=[cards], triggers=[cards.change], **RENDER)
                def show_cards(items):
                    with gr.Row(equal_height=False):
                        for card in items:
                            name = card["name"]
                            with gr.Column(elem_classes=["card"], min_width=150, scale=0, key=f"card-{name}"):
                                if card["preview"]:
                                    gr.Image(studio.preview(name), show_label=False, height=96, interactive=False,
                                             buttons=[], container=False, key=f"preview-{name}")
                                gr.HTML(card_html(card), key=f"meta-{name}")
                                # the click carries its card's name as its own data (not a handler id that a
                                # re-render may have moved), and keeps one handler per name across re-renders
                                own = gr.Textbox(name, visible=False, key=f"name-{name}")
                                add = gr.Button(f"+ {name}", size="sm", elem_classes=["card-add"], key=f"add-{name}")
                                add.click(add_slot, [stack, own], [stack, status], key=f"add-{name}", **PRIVATE)

            with gr.Column(scale=3):
                prompt = gr.Textbox("a photo of a cat", label="Prompt", lines=2, elem_id="prompt", interactive=True)
                negative = gr.Textbox("", label="Negative prompt", elem_id="negative", interactive=True)
                with gr.Row():
                    seed = gr.Number(0, label="Seed (-1: random)", precision=0, elem_id="seed", interactive=True)
                    sampler = gr.Dropdown(studio.samplers, value=studio.default_sampler, label="Sampler",
                                          elem_id="sampler", interactive=True)
                    steps = gr.Slider(1, 150, value=studio.default_steps, step=1, label="Steps", elem_id="steps",
                                      interactive=True)
                    cfg = gr.Slider(1, 20, value=7.0, step=0.5, label="CFG scale", elem_id="cfg", interactive=True)
                with gr.Row():
                    width = gr.Slider(8, 2048, value=size, step=8, label="Width", elem_id="width", interactive=True)
                    height = gr.Slider(8, 2048, value=size, step=8, label="Height", elem_id="height", interactive=True)
                    batch = gr.Slider(1, 8, value=1, step=1, label="Batch", elem_id="batch", interactive=True)
                slot_area = gr.Column()
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    compare_btn = gr.Button("Compare with / without", elem_id="compare")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                gallery = gr.Gallery(label="Images (PNG with A1111 parameters)", elem_id="gallery", interactive=False, columns=4,
                                     height=300, format="png", type="filepath")
                info = gr.Textbox(label="Infotext (A1111)", lines=3, elem_id="infotext", buttons=["copy"])
                with gr.Accordion("With / without", open=False):
                    slider = gr.ImageSlider(label="with ↔ without", type="filepath", format="png", elem_id="compare-out", interactive=False)
                with gr.Accordion("X/Y grid", open=False):
                    with gr.Row():
                        grid_mode = gr.Radio(["adapter × weight", "weight × weight"], value="adapter × weight",
                                             label="Grid", elem_id="grid-mode", interactive=True)
                        grid_rows = gr.Dropdown([], multiselect=True, label="Adapters (rows) / X adapter",
                                                elem_id="grid-rows", interactive=True)
                        grid_x = gr.Textbox("0, 0.5, 1", label="X weights", elem_id="grid-x", interactive=True)
                    with gr.Row():
                        grid_y_adapter = gr.Dropdown([], label="Y adapter (weight × weight)", elem_id="grid-y-adapter", interactive=True)
                        grid_y = gr.Textbox("0, 1", label="Y weights", elem_id="grid-y", interactive=True)
                        grid_btn = gr.Button("Run grid", elem_id="grid")
                    grid_out = gr.Image(label="Grid", type="filepath", format="png", elem_id="grid-out", interactive=False)
                with gr.Accordion("Merge the stack into one LoRA", open=False):
                    with gr.Row():
                        merge_name = gr.Textbox("merged", label="Name (in the adapter folder)", elem_id="merge-name", interactive=True)
                        merge_method = gr.Dropdown(list(MERGE_METHODS), value="svd", label="Method",
                                                   elem_id="merge-method", interactive=True)
                        merge_rank = gr.Number(0, label="Rank (0: the ranks added up)", precision=0, minimum=0,
                                               elem_id="merge-rank", interactive=True)
                        merge_btn = gr.Button("Merge and save", elem_id="merge")
                    merge_file = gr.File(label="Merged file", elem_id="merge-file", interactive=False)

        settings = [prompt, negative, seed, steps, cfg, width, height, sampler]

        def axis_choices(current: list[str]):
            return gr.update(choices=current, value=[n for n in current][:3]), gr.update(choices=current)

        stack.change(axis_choices, [stack], [grid_rows, grid_y_adapter], **PRIVATE)

        def refreshed():
            studio.refresh()
            return studio.catalog(), status_html(f"{len(studio.available())} adapters in {studio.adapter_dir}")

        refresh_btn.click(refreshed, [], [cards, status], **PRIVATE)
        app.load(lambda: studio.catalog(), [], [cards], **PRIVATE)

        def uploaded(file, current):
            if not file:
                return gr.update(), current, ""
            try:
                name = studio.upload(file)
            except Exception as e:  # noqa: BLE001
                return gr.update(), current, failure(e)
            current, message = add_slot(current, name)
            return studio.catalog(), current, message

        upload.upload(uploaded, [upload, stack], [cards, stack, status], **PRIVATE)

        with slot_area:
            @gr.render(inputs=[stack], triggers=[stack.change, app.load], **RENDER)
            def show_slots(names: list[str]):
                slot_inputs = []
                if not names:
                    gr.Markdown("No adapters in the stack: add one from the cards, or use `<lora:name:w>` tags.")
                for i, name in enumerate(names):
                    with gr.Row(elem_id=f"slot-{i}", equal_height=True):
                        on = gr.Checkbox(True, label=name, key=f"on-{name}", elem_id=f"slot-{i}-on", interactive=True, scale=1,
                                         min_width=90)
                        weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", key=f"w-{name}",
                                           elem_id=f"slot-{i}-weight", interactive=True, scale=4)
                        te = gr.Number(None, label="text encoder (empty: weight)", key=f"te-{name}",
                                       elem_id=f"slot-{i}-te", interactive=True, scale=2, min_width=90)
                        preset = gr.Dropdown(list(studio.presets), value="all", label=f"{studio.denoiser} blocks",
                                             key=f"p-{name}", elem_id=f"slot-{i}-preset", interactive=True, scale=2,
                                             min_width=100)
                        remove = gr.Button("✕", size="sm", scale=0, min_width=40, elem_id=f"slot-{i}-remove")
                        remove.click(lambda cur, n=name: [x for x in cur if x != n], [stack], [stack],
                                     key=f"remove-{name}", **PRIVATE)
                    slot_inputs += [on, weight, te, preset]

                # The buttons keep one handler each across re-renders (keys), and every click sends the stack it
                # was made with (this hidden list, first) with the slot values: a click sent just before a re-render
                # reaches the new handler and still means the stack the page showed.
                shown_names = gr.Textbox(json.dumps(names), visible=False)

                def run(request: gr.Request, progress=gr.Progress(), *values):
                    try:
                        req, slots, n = request_and_slots(values)
                        results = studio.generate(req, slots, batch=n, token=token(request),
                                                  on_step=lambda k, total: progress((k, total), desc="denoising"))
                    except Exception as e:  # noqa: BLE001
                        return gr.update(), gr.update(), failure(e)
                    return [str(r.path) for r in results], results[0].infotext, status_html(
                        f"seed {results[0].seed}" + (f"…{results[-1].seed}" if len(results) > 1 else ""))

                def compare(request: gr.Request, progress=gr.Progress(), *values):
                    try:
                        req, slots, _ = request_and_slots(values)
                        with_, without = studio.compare(req, slots, token=token(request),
                                                        on_step=lambda k, total: progress((k, total), desc="compare"))
                    except Exception as e:  # noqa: BLE001
                        return gr.update(), gr.update(), failure(e)
                    return (str(with_.path), str(without.path)), with_.infotext, status_html("left: with, right: without")

                def grid(request: gr.Request, progress=gr.Progress(), *values):
                    (mode, rows, x_weights, y_adapter, y_weights), values = values[:5], values[5:]
                    try:
                        req, slots, _ = request_and_slots(values)
                        row_labels, col_labels, cells = grid_axes(mode, rows or [], x_weights, y_adapter, y_weights)
                        result, _ = studio.grid(req, slots, rows=row_labels, columns=col_labels, cells=cells,
                                                token=token(request),
                                                on_step=lambda k, total: progress((k, total), desc="grid"))
                    except Exception as e:  # noqa: BLE001
                        return gr.update(), failure(e)
                    return str(result.path), status_html(f"grid of {len(row_labels)} × {len(col_labels)}")

                def merge(shown, name, method, rank, text, *slot_values):
                    try:
                        path, error = studio.merge((name or "").strip(), method=method,
                                                   rank=int(rank) if rank not in (None, "", 0) else None,
                                                   tags=text or "", slots=slots_from(json.loads(shown), slot_values))
                        download = studio.download(path)
                    except Exception as e:  # noqa: BLE001
                        return gr.update(), gr.update(), failure(e)
                    return str(download), studio.catalog(), status_html(
                        f"saved {path.name} ({method}); relative approximation error {error:.3g}")

                common = [shown_names, *settings, batch, *slot_inputs]
                events = [
                    generate_btn.click(run, common, [gallery, info, status], key="generate", **PRIVATE),
                    compare_btn.click(compare, common, [slider, info, status], key="compare", **PRIVATE),
                    grid_btn.click(grid, [grid_mode, grid_rows, grid_x, grid_y_adapter, grid_y, *common],
                                   [grid_out, status], key="grid", **PRIVATE),
                ]
                merge_btn.click(merge, [shown_names, merge_name, merge_method, merge_rank, prompt, *slot_inputs],
                                [merge_file, cards, status], key="merge", **PRIVATE)

                def cancel(request: gr.Request):
                    if request is not None:
                        studio.cancel(request.session_hash)
                    return status_html("Cancelled.", error=True)

                cancel_btn.click(cancel, [], [status], cancels=events, key="cancel", **PRIVATE)

        def token(request: gr.Request | None) -> str | None:
            return request.session_hash if request else None

        def request_and_slots(values: tuple[Any, ...]) -> tuple[Request, dict[str, Slot], int]:
            n = len(settings)
            names = json.loads(values[0])
            return request(*values[1:n + 1]), slots_from(names, values[n + 2:]), int(values[n + 1] or 1)

        add_api(studio, request)
    return app


def add_api(studio: Studio, request) -> None:
    """The documented endpoints, on hidden components so that "Use via API" names their parameters."""

    def adapters() -> list[dict[str, Any]]:
        """Every adapter in the folder: name, methods, ranks, base family, trigger words, preview file."""
        studio.refresh()
        return studio.catalog()

    def generate(prompt: str, negative_prompt: str, seed: float, steps: float, cfg: float, width: float,
                 height: float, sampler: str) -> tuple[str, str]:
        """One image; the adapter stack is the prompt's `<lora:name:w>` / `<lora:name:te:unet>` tags.
        Returns a lossless PNG carrying A1111 `parameters`, and that infotext. seed -1: random."""
        try:
            result = studio.generate(request(prompt, negative_prompt, seed, steps, cfg, width, height, sampler))[0]
        except DiffAdaptError as e:
            raise gr.Error(str(e), print_exception=False) from e
        return str(result.path), result.infotext

    def merge(tags: str, name: str, method: str, rank: float) -> tuple[str, dict[str, Any]]:
        """Merge the adapters of `tags` (`<lora:a:0.6> <lora:b:0.4>`) into `name`.safetensors in the adapter
        folder with `method` (svd, cat, linear, ties, dare) at `rank` (0: the sources' ranks added up).
        Returns the file and {name, method, rel_error}."""
        try:
            path, error = studio.merge(name, method=method or "svd", rank=int(rank) if rank else None, tags=tags)
        except DiffAdaptError as e:
            raise gr.Error(str(e), print_exception=False) from e
        return str(studio.download(path)), {"name": Path(path).stem, "method": method or "svd", "rel_error": error}

    with gr.Column(visible=False):
        out_json = gr.JSON(label="adapters")
        gr.Button("adapters", elem_id="api-adapters").click(adapters, [], [out_json], api_name="adapters")
        g_inputs = [gr.Textbox(label="prompt"), gr.Textbox(label="negative_prompt"), gr.Number(0, label="seed"),
                    gr.Number(studio.default_steps, label="steps"), gr.Number(7.0, label="cfg"),
                    gr.Number(studio.size, label="width"), gr.Number(studio.size, label="height"),
                    gr.Textbox(studio.default_sampler or "", label="sampler")]
        g_outputs = [gr.Image(type="filepath", format="png", label="image"), gr.Textbox(label="infotext")]
        gr.Button("generate", elem_id="api-generate").click(generate, g_inputs, g_outputs, api_name="generate",
                                                           concurrency_limit=None)
        m_inputs = [gr.Textbox(label="tags"), gr.Textbox("merged", label="name"),
                    gr.Textbox("svd", label="method"), gr.Number(0, label="rank")]
        gr.Button("merge", elem_id="api-merge").click(merge, m_inputs, [gr.File(label="file"), gr.JSON(label="info")],
                                                     api_name="merge")
