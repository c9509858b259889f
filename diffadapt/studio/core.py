"""The studio's work, without a browser: adapters from one folder, per-request stacks, grids, merges.

Each request's stack is applied with ``da.using``, which holds the pipeline's lock for the whole request,
so concurrent requests on one pipeline run one at a time and never see each other's weights; the sampler is
swapped in (and back) inside the same block. Names reach the disk only through :mod:`.paths`.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import diffadapt as da

from .. import infotext
from ..api import read_spec
from ..errors import DiffAdaptError
from ..info import summarize
from ..models import TINY_MODEL, SAMPLER_CHOICES, make_scheduler, native_size, sampler_name, samplers_for
from ..pipeline import registry, resolve
from ..prompt import TEXT_ENCODERS, parse
from .grid import compose
from .paths import AdapterFolder, FileBytes, check_name, parse_safetensors
from .presets import presets_for, scaled

MERGE_METHODS = ("svd", "cat", "linear", "ties", "dare")
class Cancelled(DiffAdaptError):
    """The request was cancelled between two denoising steps."""


@dataclass(frozen=True)
class Slot:
    """One adapter of the UI's stack: UNet (denoiser) and text-encoder multipliers and a block preset."""

    unet: float = 1.0
    te: float | None = None  # None: same as unet
    preset: str = "all"

    @property
    def text(self) -> float:
        return self.unet if self.te is None else self.te


@dataclass(frozen=True)
class Request:
    """What an image depends on besides the adapter stack (A1111's txt2img fields)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = -1  # -1: random
    steps: int = 20
    cfg: float = 7.0
    width: int | None = None  # None: the model's native size
    height: int | None = None
    sampler: str | None = None  # A1111 name; None: the pipeline's scheduler


@dataclass
class Result:
    image: Image.Image
    infotext: str
    seed: int
    path: Path  # lossless PNG with the A1111 ``parameters`` chunk


@dataclass
class _Adapter:
    hash: str
    stamp: FileBytes


@dataclass
class Stack:
    """A request's resolved stack: weights for ``da.using`` and the infotext's view of them."""

    weights: dict[str, Any] = field(default_factory=dict)
    refs: list[infotext.AdapterRef] = field(default_factory=list)
    presets: dict[str, str] = field(default_factory=dict)


class Studio:
    """One pipeline and one adapter folder. Adapters load on first use (read into memory) and stay loaded."""

    def __init__(self, pipe: Any, *, adapter_dir: str | Path, model_name: str = TINY_MODEL,
                 model_hash: str | None = None, output_dir: str | Path | None = None, default_steps: int | None = None):
        self.pipe = pipe
        self.folder = AdapterFolder(adapter_dir)
        self.model_name, self.model_hash = model_name, model_hash
        self.size = native_size(pipe, model_name)
        self.default_steps = default_steps or (4 if model_name == TINY_MODEL else 20)
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="diffadapt-studio-out-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
        self.presets = presets_for(getattr(pipe, self.denoiser))  # the block presets this model has
        self._adapters: dict[str, _Adapter] = {}
        self._catalog: dict[str, tuple[FileBytes, dict[str, Any]]] = {}
        self._cancelled: set[str] = set()

    @property
    def adapter_dir(self) -> Path:
        return self.folder.root

    @property
    def samplers(self) -> list[str]:
        return samplers_for(self.pipe.scheduler)

    @property
    def default_sampler(self) -> str | None:
        """The menu label of the pipeline's own scheduler."""
        name, schedule = sampler_name(self.pipe.scheduler)
        label = f"{name} {schedule}" if schedule else name
        return label if label in self.samplers else (self.samplers[0] if self.samplers else None)

    # -- the folder ---------------------------------------------------------------------------------

    def available(self) -> list[str]:
        return self.folder.names()

    def loaded(self) -> list[str]:
        return [n for n in da.adapters(self.pipe) if n in self._adapters]

    def load(self, name: str) -> str:
        """Load ``name`` from the folder if it is not loaded yet (the whole file is read into memory)."""
        check_name(name)
        with registry(self.pipe).lock:
            if name in self._adapters and name in registry(self.pipe).adapters:
                return name
            data, stamp = self.folder.read(name)
            raw = parse_safetensors(data, where=str(self.folder.path(name)))
            da.load(self.pipe, raw, name)
            self._adapters[name] = _Adapter(infotext.adapter_hash(data), stamp)
        return name

    def refresh(self) -> list[str]:
        """Rescan the folder; an adapter whose file changed or vanished is unloaded (it reloads on next use)."""
        with registry(self.pipe).lock:
            for name, known in list(self._adapters.items()):
                if self.folder.stamp(name) != known.stamp:
                    if name in registry(self.pipe).adapters:
                        da.unload(self.pipe, name)
                    del self._adapters[name]
        return self.available()

    def catalog(self) -> list[dict[str, Any]]:
        """Card data for every adapter in the folder: method, rank, base family, trigger words, preview."""
        cards = []
        for name in self.available():
            stamp = self.folder.stamp(name)
            cached = self._catalog.get(name)
            if cached is None or cached[0] != stamp:
                try:
                    data, stamp = self.folder.read(name)
                    info = summarize(read_spec(parse_safetensors(data, where=name)), name=name)
                    entry = {"methods": sorted(info.methods), "ranks": sorted(info.ranks),
                             "base_family": info.base_family, "trigger_words": info.trigger_words,
                             "components": sorted(info.components), "error": None}
                except DiffAdaptError as e:
                    entry = {"methods": [], "ranks": [], "base_family": "unknown", "trigger_words": [],
                             "components": [], "error": str(e)}
                self._catalog[name] = cached = (stamp, entry)
            preview = self.folder.preview(name)
            cards.append({"name": name, **cached[1], "preview": preview.name if preview else None,
                          "loaded": name in self._adapters})
        return cards

    def upload(self, file: str | Path) -> str:
        """Add an uploaded ``.safetensors`` under its own name, or a new one if that is taken; never replaces."""
        file = Path(file)
        if not file.name.endswith(".safetensors"):
            raise DiffAdaptError(f"'{file.name}' is not a .safetensors file")
        data = file.read_bytes()
        raw = parse_safetensors(data, where=file.name)
        resolve(self.pipe, read_spec(raw))  # made for another model: refused before it lands in the folder
        with registry(self.pipe).lock:
            name = self.folder.free_name(check_name(file.name[: -len(".safetensors")], what="uploaded file name"),
                                         set(registry(self.pipe).adapters))
            self.folder.create(name, lambda tmp: tmp.write_bytes(data))
        return name

    # -- stacks ---------------------------------------------------------------------------------------

    def _weight(self, slot: Slot) -> Any:
        if slot.preset not in self.presets:
            raise DiffAdaptError(f"block preset '{slot.preset}' does not exist for this {self.denoiser} "
                                 f"(choose one of {list(self.presets)})")
        preset = self.presets[slot.preset]
        if preset is None and slot.te is None:
            return float(slot.unet)
        den: Any = float(slot.unet) if preset is None else scaled(preset, float(slot.unet))
        return {self.denoiser: den, **{c: float(slot.text) for c in TEXT_ENCODERS}}

    def stack(self, prompt: str, slots: Mapping[str, Slot | float] | None = None) -> Stack:
        """Slots (adapters switched on in the UI), then the prompt's ``<lora:…>`` tags, which win."""
        out = Stack()
        entries: dict[str, Slot] = {}
        for name, slot in (slots or {}).items():
            entries[name] = slot if isinstance(slot, Slot) else Slot(float(slot))
        for name, w in parse(prompt).weights().items():
            entries[name] = Slot(w[self.denoiser], w["text_encoder"])
        for name, slot in entries.items():
            self.load(name)
            if slot.unet == 0.0 and slot.text == 0.0:
                continue  # off; an adapter not in the stack is off in da.using
            out.weights[name] = self._weight(slot)
            out.refs.append(infotext.AdapterRef(name, self._adapters[name].hash, slot.text, slot.unet))
            if slot.preset != "all":
                out.presets[name] = slot.preset
        return out

    # -- generation -----------------------------------------------------------------------------------

    def cancel(self, token: str) -> None:
        self._cancelled.add(token)

    def _image(self, req: Request, stack: Stack, seed: int, on_step: Callable[[int, int], None] | None,
               token: str | None) -> Image.Image:
        width, height = req.width or self.size, req.height or self.size
        steps = int(req.steps)

        def step_end(pipe, i, t, kwargs):
            if token is not None and token in self._cancelled:
                raise Cancelled("cancelled")
            if on_step is not None:
                on_step(i + 1, steps)
            return {}

        generator = torch.Generator("cpu").manual_seed(seed)
        with da.using(self.pipe, stack.weights), torch.no_grad():
            if token is not None and token in self._cancelled:  # cancelled while waiting for the pipeline
                raise Cancelled("cancelled")
            base = self.pipe.scheduler
            self.pipe.scheduler = make_scheduler(base, req.sampler)
            try:
                return self.pipe(parse(req.prompt).prompt, negative_prompt=req.negative_prompt or None,
                                 num_inference_steps=steps, guidance_scale=float(req.cfg), width=width,
                                 height=height, generator=generator, output_type="pil",
                                 callback_on_step_end=step_end).images[0]
            finally:
                self.pipe.scheduler = base

    def _result(self, req: Request, stack: Stack, seed: int, image: Image.Image, *, extra: dict | None = None) -> Result:
        sampler = SAMPLER_CHOICES[req.sampler].infotext if req.sampler in SAMPLER_CHOICES else sampler_name(self.pipe.scheduler)
        extra = dict(extra or {})
        if stack.presets:
            extra["Lora block weights"] = ", ".join(f"{n}={p}" for n, p in stack.presets.items())
        text = infotext.write(
            prompt=req.prompt, negative_prompt=req.negative_prompt, steps=int(req.steps), sampler=sampler[0],
            schedule_type=sampler[1], cfg_scale=float(req.cfg), seed=seed, width=image.width, height=image.height,
            model=self.model_name, model_hash=self.model_hash, adapters=stack.refs, extra=extra or None,
        )
        path = infotext.save_png(image, self.output_dir / f"{secrets.token_hex(8)}.png", text)
        return Result(image, text, seed, path)

    def _check(self, req: Request) -> Request:
        if not 1 <= int(req.steps) <= 150:
            raise DiffAdaptError(f"steps must be between 1 and 150, got {req.steps}")
        for v in (req.width, req.height):
            if v is not None and (int(v) < 8 or int(v) > 4096 or int(v) % 8):
                raise DiffAdaptError(f"width and height must be multiples of 8 between 8 and 4096, got {v}")
        if req.sampler is not None and req.sampler not in self.samplers:
            raise DiffAdaptError(f"sampler '{req.sampler}' is not available for this model (choose one of {self.samplers})")
        seed = int(req.seed)
        return replace(req, seed=secrets.randbelow(2**32) if seed < 0 else seed)

    def generate(self, req: Request, slots: Mapping[str, Slot | float] | None = None, *, batch: int = 1,
                 on_step: Callable[[int, int], None] | None = None, token: str | None = None) -> list[Result]:
        """``batch`` images with seeds seed, seed+1, … (image i equals a single request with seed+i).

        ``token`` names the caller for :meth:`cancel`; a new request clears an old cancel of the same token.
        """
        self._start(token)
        return self._generate(req, slots, batch=batch, on_step=on_step, token=token)

    def _start(self, token: str | None) -> None:
        if token is not None:
            self._cancelled.discard(token)

    def _generate(self, req: Request, slots: Mapping[str, Slot | float] | None, *, batch: int = 1,
                  on_step: Callable[[int, int], None] | None = None, token: str | None = None) -> list[Result]:
        req = self._check(req)
        stack = self.stack(req.prompt, slots)
        results = []
        for i in range(max(1, int(batch))):
            seed = req.seed + i
            done = (lambda k, n, i=i: on_step(i * n + k, n * batch)) if on_step else None
            results.append(self._result(req, stack, seed, self._image(req, stack, seed, done, token)))
        return results

    def compare(self, req: Request, slots: Mapping[str, Slot | float] | None = None, *,
                token: str | None = None, on_step: Callable[[int, int], None] | None = None) -> tuple[Result, Result]:
        """(with the stack, without any adapter) on the same seed and settings; the prompt's tags are dropped."""
        self._start(token)
        req = self._check(req)
        halves = [None, None] if on_step is None else [
            (lambda k, n, h=h: on_step(h * n + k, 2 * n)) for h in (0, 1)]  # noqa: E731
        with_ = self._generate(req, slots, token=token, on_step=halves[0])[0]
        plain = replace(req, prompt=parse(req.prompt).prompt)
        return with_, self._generate(plain, {}, token=token, on_step=halves[1])[0]

    def grid(self, req: Request, slots: Mapping[str, Slot | float] | None, *, rows: list[str], columns: list[str],
             cells: list[list[dict[str, float]]], token: str | None = None,
             on_step: Callable[[int, int], None] | None = None) -> tuple[Result, list[Result]]:
        """A labelled grid: cell (i, j) is the slots with ``cells[i][j]``'s adapter weights set (both components).

        Every cell uses the same seed. Returns the grid (a PNG with the first cell's infotext, as A1111
        writes) and the cells. ``rows`` may be empty for a single row.
        """
        n_rows, n_cols = max(1, len(rows)), len(columns)
        if not n_cols or len(cells) != n_rows or any(len(r) != n_cols for r in cells):
            raise DiffAdaptError(f"a grid of {n_rows} × {n_cols} labels needs as many cells")
        if n_rows * n_cols > 64:
            raise DiffAdaptError(f"a grid has at most 64 cells, not {n_rows * n_cols}")
        self._start(token)
        req = self._check(req)
        base = {n: (s if isinstance(s, Slot) else Slot(float(s))) for n, s in (slots or {}).items()}
        results: list[Result] = []
        for row in cells:
            for over in row:
                stack = {**base, **{n: replace(base.get(n, Slot()), unet=float(w), te=None) for n, w in over.items()}}
                done = None
                if on_step is not None:
                    done = lambda k, n, i=len(results): on_step(i * n + k, n * n_rows * n_cols)  # noqa: E731
                results.append(self._generate(req, stack, token=token, on_step=done)[0])
        image = compose([r.image for r in results], columns, rows)
        path = infotext.save_png(image, self.output_dir / f"grid-{secrets.token_hex(8)}.png", results[0].infotext)
        return Result(image, results[0].infotext, req.seed, path), results

    # -- merging ----------------------------------------------------------------------------------------

    def merge(self, name: str, *, method: str = "svd", rank: int | None = None, tags: str = "",
              slots: Mapping[str, Slot | float] | None = None) -> tuple[Path, float]:
        """Merge the stack (slots, then ``tags``) into ``name.safetensors`` in the folder; returns (path, error).

        ``error`` is the merge's relative approximation error. The pipeline is left as it was.
        """
        check_name(name, what="merged adapter name")
        if method not in MERGE_METHODS:
            raise DiffAdaptError(f"unknown merge method '{method}' (choose one of {list(MERGE_METHODS)})")
        if rank is not None and int(rank) < 1:
            raise DiffAdaptError(f"rank must be at least 1, got {rank}")
        stack = self.stack(tags, slots)
        if not stack.weights:
            raise DiffAdaptError("nothing to merge: switch on at least one adapter with a non-zero weight")
        reg = registry(self.pipe)
        with reg.lock:
            if name in reg.adapters or self.folder.path(name).exists():
                raise DiffAdaptError(f"'{name}.safetensors' already exists or is loaded; pick another name")
            before = {n: a.enabled for n, a in reg.adapters.items()}
            info = da.merge(self.pipe, stack.weights, name, method=method, rank=None if rank is None else int(rank))
            try:
                path = self.folder.create(name, lambda tmp: da.save(self.pipe, name, tmp, overwrite=True))
            finally:
                da.unload(self.pipe, name)
                on = [n for n in stack.weights if before.get(n)]
                if on:
                    da.enable(self.pipe, *on)
        return path, float(info.metadata["diffadapt_merge_rel_error"])

    def preview(self, name: str) -> str | None:
        """The adapter's preview image, copied once into the output folder (Gradio serves only its own)."""
        src = self.folder.preview(name)
        if src is None:
            return None
        st = src.stat()
        dest = self.output_dir / "previews" / f"{name}-{st.st_mtime_ns}-{st.st_size}{src.suffix}"
        if not dest.exists():
            dest.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, dest)
        return str(dest)

    def download(self, path: Path) -> Path:
        """A copy of a file of the folder in the output folder, for a server that serves only that one."""
        dest = self.output_dir / secrets.token_hex(8) / Path(path).name
        dest.parent.mkdir()
        shutil.copyfile(path, dest)
        return dest
