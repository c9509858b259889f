"""The studio's work without a browser: load adapters from a folder, generate with a weighted stack, merge.

Every pipeline mutation for a request happens inside ``da.using`` (generate) or under the pipeline's
registry lock (merge), so concurrent Gradio requests on one pipeline run one at a time and never see each
other's weights.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file

import diffadapt as da
from diffadapt import infotext
from diffadapt.cli import _SAMPLERS, TINY_MODEL
from diffadapt.errors import DiffAdaptError, SourceError
from diffadapt.pipeline import registry
from diffadapt.prompt import parse

DEMO_ADAPTERS = (("ink", "lora"), ("film", "loha"), ("grain", "lokr"))


def write_demo_adapters(folder: str | Path, *, pipe: Any = None) -> list[Path]:
    """Three random LyCORIS files (LoRA, LoHa, LoKr over UNet + text encoder) so the studio runs offline."""
    from diffadapt.fixtures import lycoris_file
    from diffadapt.testing import tiny_sd1_pipeline

    pipe = pipe if pipe is not None else tiny_sd1_pipeline()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, algo) in enumerate(DEMO_ADAPTERS):
        sd: dict[str, torch.Tensor] = {}
        for j, (component, prefix) in enumerate([("unet", "lora_unet"), ("text_encoder", "lora_te")]):
            part, _ = lycoris_file(getattr(pipe, component), algo=algo, prefix=prefix, seed=10 * i + j, std=0.2)
            sd.update(part)
        path = folder / f"{name}.safetensors"
        save_file(sd, path, metadata={"ss_output_name": name})
        paths.append(path)
    return paths


class Studio:
    """One pipeline, one adapter folder; adapters are loaded by file stem and stay loaded (switched per request)."""

    def __init__(self, pipe: Any, *, adapter_dir: str | Path, model_name: str = TINY_MODEL,
                 model_hash: str | None = None, size: int | None = None):
        self.pipe = pipe
        self.adapter_dir = Path(adapter_dir)
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self.model_name, self.model_hash = model_name, model_hash
        if size is None:  # the tiny pipeline's 16 px is too small to look at; real models use their native size
            denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
            size = 64 if model_name == TINY_MODEL else int(denoiser.config.sample_size * pipe.vae_scale_factor)
        self.size = size
        self.hashes: dict[str, str] = {}

    def available(self) -> list[str]:
        """Adapter names (file stems) in the folder."""
        return sorted(p.stem for p in self.adapter_dir.glob("*.safetensors"))

    def loaded(self) -> list[str]:
        return list(da.adapters(self.pipe))

    def load(self, name: str) -> str:
        """Load ``adapter_dir/name.safetensors`` if it is not loaded yet; returns the name."""
        path = self.adapter_dir / f"{name}.safetensors"
        with registry(self.pipe).lock:
            if name not in da.adapters(self.pipe):
                if not path.is_file():
                    raise SourceError(f"no adapter '{name}' in {self.adapter_dir}")
                da.load(self.pipe, str(path), name, weight=1.0)
                self.hashes[name] = infotext.adapter_hash(path)
        return name

    def upload(self, file: str | Path) -> str:
        """Copy an uploaded .safetensors into the folder (checked by reading it first) and load it."""
        file = Path(file)
        if file.suffix != ".safetensors":
            raise SourceError(f"'{file.name}' is not a .safetensors file")
        da.inspect(str(file))  # a broken file fails here, before it lands in the folder
        dest = self.adapter_dir / file.name
        if dest.resolve() != file.resolve():
            shutil.copyfile(file, dest)
        return self.load(dest.stem)

    def _stack(self, weights: Mapping[str, Any], prompt: str) -> dict[str, Any]:
        """Slider weights of the enabled adapters, then the prompt's ``<lora:…>`` tags, which win."""
        stack: dict[str, Any] = {n: w if isinstance(w, Mapping) else float(w) for n, w in weights.items()
                                 if isinstance(w, Mapping) or float(w) != 0.0}
        for name, w in parse(prompt).weights().items():
            self.load(name)
            stack[name] = w
        return stack

    def generate(self, prompt: str, *, weights: Mapping[str, Any] = {}, negative_prompt: str = "",
                 seed: int = 0, steps: int = 4, cfg: float = 7.0) -> tuple[Image.Image, str]:
        """(image, A1111 infotext) for one request; adapters not in ``weights`` or the prompt are off.

        A weight is a number or a per-component dict (``{"text_encoder": 0.7, "unet": 0.3}``).
        """
        parsed = parse(prompt)
        stack = self._stack(weights, prompt)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        with da.using(self.pipe, stack), torch.no_grad():
            image = self.pipe(parsed.prompt, negative_prompt=negative_prompt or None,
                              num_inference_steps=int(steps), guidance_scale=float(cfg), width=self.size,
                              height=self.size, generator=generator, output_type="pil").images[0]
        scheduler = type(self.pipe.scheduler).__name__
        text = infotext.write(
            prompt=prompt, negative_prompt=negative_prompt, steps=int(steps),
            sampler=_SAMPLERS.get(scheduler, scheduler), cfg_scale=float(cfg), seed=int(seed),
            width=self.size, height=self.size, model=self.model_name, model_hash=self.model_hash,
            adapters=[(n, self.hashes.get(n), w) for n, w in stack.items()],
        )
        return image, text

    def merge(self, weights: Mapping[str, float], *, name: str = "merged", rank: int | None = None) -> tuple[Path, float]:
        """SVD-merge the weighted adapters into ``adapter_dir/name.safetensors``; returns (path, relative error).

        The merged adapter is saved, then unloaded and the sources re-enabled, so the pipeline is as before.
        """
        weights = {n: float(w) for n, w in weights.items() if float(w) != 0.0}
        if not weights:
            raise DiffAdaptError("nothing to merge: enable at least one adapter with a non-zero weight")
        path = self.adapter_dir / f"{name}.safetensors"
        if path.exists() or name in self.loaded():
            raise SourceError(f"'{path.name}' already exists; pick another name")
        with registry(self.pipe).lock:
            before = {n: a.enabled for n, a in registry(self.pipe).adapters.items()}
            info = da.merge(self.pipe, weights, name, method="svd", rank=rank)
            try:
                da.save(self.pipe, name, str(path))
            finally:
                da.unload(self.pipe, name)
                on = [n for n in weights if before.get(n)]
                if on:
                    da.enable(self.pipe, *on)
        return path, float(info.metadata["diffadapt_merge_rel_error"])


def demo_studio(*, adapter_dir: str | Path | None = None) -> Studio:
    """The tiny random SD1 pipeline with the demo adapters written and loaded."""
    from diffadapt.testing import tiny_sd1_pipeline

    pipe = tiny_sd1_pipeline()
    folder = Path(adapter_dir) if adapter_dir is not None else Path(tempfile.mkdtemp(prefix="diffadapt-studio-"))
    if not any(folder.glob("*.safetensors")):
        write_demo_adapters(folder, pipe=pipe)
    studio = Studio(pipe, adapter_dir=folder)
    for name in studio.available()[:4]:
        studio.load(name)
    return studio
