"""A1111-compatible generation parameters ("infotext"), adapter hashes, and the PNG ``parameters`` chunk.

The text is the one AUTOMATIC1111's webui writes under an image and into its PNGs, so images made here
paste into A1111 (and civitai, which reads the same field) with prompt, seed and LoRAs intact::

    a cat <lora:ink:0.8> <lora:film:0.5:0.3>
    Negative prompt: blurry
    Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Model: sd15, Lora hashes: "ink: 1a2b3c4d5e6f, film: 0f1e2d3c4b5a"

Writing follows ``processing.create_infotext`` (``k: quote(v)`` joined by ``", "``, ``None`` values left out,
a value holding ``,`` ``:`` or a newline written as a JSON string); reading follows
``infotext_utils.parse_generation_parameters`` (the last line is the parameters if it has at least three
``key: value`` pairs). ``Lora hashes`` is ``"alias: shorthash, …"`` with ``:`` and ``,`` removed from each alias
(``extra_networks_lora.py``), read back as in ``networks.infotext_pasted``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import FormatError, SourceError
from .prompt import StackEntry, format_number, format_tag, parse

__all__ = ["AdapterRef", "InfoText", "write", "read", "adapter_hash", "save_png", "load_png", "quote", "unquote"]

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # infotext_utils.re_param_code
PNG_KEY = "parameters"


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as an infotext records it: the name used in the prompt, its short hash, its multipliers."""

    name: str
    hash: str | None = None
    te: float = 1.0
    unet: float = 1.0

    @property
    def weight(self) -> dict[str, float]:
        return StackEntry(self.name, te=self.te, unet=self.unet).weight


AdapterLike = AdapterRef | tuple[str, str | None, Any]


@dataclass
class InfoText:
    """A parsed infotext; ``params`` holds the raw (unquoted) values, e.g. ``{"Seed": "1", "Size": "512x512"}``."""

    prompt: str
    negative_prompt: str = ""
    params: dict[str, str] = field(default_factory=dict)
    adapters: list[AdapterRef] = field(default_factory=list)


def quote(value: Any) -> str:
    """A1111 ``quote``: JSON-quote a value only when it holds ``,``, ``:`` or a newline."""
    text = str(value)
    return text if not any(c in text for c in ",:\n") else json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _ref(item: AdapterLike) -> AdapterRef:
    """(name, hash, weight) where weight is a float, a (te, unet) pair or a component dict."""
    if isinstance(item, AdapterRef):
        return item
    name, digest, w = item
    if isinstance(w, Mapping):
        te = w.get("text_encoder", w.get("te", 1.0))
        unet = w.get("unet", w.get("transformer", 1.0))
    elif isinstance(w, Sequence):
        te, unet = w
    else:
        te = unet = w
    return AdapterRef(name, digest, float(te), float(unet))


def _alias(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def _value(v: Any) -> str:
    return format_number(v) if isinstance(v, float) else str(v)


def write(*, prompt: str, negative_prompt: str = "", steps: int, sampler: str, cfg_scale: float, seed: int,
          width: int, height: int, schedule_type: str | None = None, model: str | None = None,
          model_hash: str | None = None, adapters: Sequence[AdapterLike] = (),
          extra: Mapping[str, Any] | None = None) -> str:
    """The infotext for one image. An adapter the prompt does not mention gets its tag appended to the
    prompt (as A1111's "Add Lora to prompt" does), so the text alone says which weights were used; one it
    mentions keeps the prompt's tag. ``Lora hashes`` lists the adapters that have a hash, in the given order."""
    refs = [_ref(a) for a in adapters]
    mentioned = set(parse(prompt).names())
    tags = [format_tag(r.name, r.te, r.unet) for r in refs if r.name not in mentioned]
    prompt_text = " ".join([prompt, *tags]) if prompt else " ".join(tags)
    hashes = ", ".join(f"{_alias(r.name)}: {r.hash}" for r in refs if r.hash)
    params: dict[str, Any] = {
        "Steps": steps, "Sampler": sampler, "Schedule type": schedule_type, "CFG scale": float(cfg_scale),
        "Seed": seed, "Size": f"{width}x{height}", "Model hash": model_hash, "Model": model,
        "Lora hashes": hashes or None, **(extra or {}),
    }
    body = ", ".join(k if k == v else f"{k}: {quote(_value(v))}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt_text}{negative}\n{body}".strip()


def _hashes(text: str) -> dict[str, str]:
    """``"a: 1234, b: 5678"`` → ``{a: 1234, b: 5678}`` (``networks.infotext_pasted``; malformed items skipped)."""
    out = {}
    for item in text.split(","):
        alias, sep, digest = item.strip().partition(":")
        if sep:
            out[alias.strip()] = digest.strip()
    return out


def read(text: str) -> InfoText:
    """Parse an infotext: prompt and negative prompt, the parameters, and the adapters of the prompt's tags
    (a name tagged twice once, with summed multipliers) with their ``Lora hashes`` entry, if any."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt = negative = ""
    done_with_prompt = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[len("Negative prompt:"):].strip()
        if done_with_prompt:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    params = {k: unquote(v) for k, v in RE_PARAM.findall(last)}
    hashes = _hashes(params.get("Lora hashes", ""))
    weights = parse(prompt).weights()
    adapters = [AdapterRef(n, hashes.get(_alias(n)), w["text_encoder"], w["unet"]) for n, w in weights.items()]
    return InfoText(prompt, negative, params, adapters)


def _is_safetensors(f: BinaryIO, size: int) -> bool:
    head = f.read(9)
    f.seek(0)
    return len(head) == 9 and 8 + int.from_bytes(head[:8], "little") <= size and head[8:9] == b"{"


def adapter_hash(source: str | os.PathLike | bytes, *, full_file: bool = False, length: int | None = 12) -> str:
    """A1111's LoRA hash: sha256 of a safetensors file's bytes after its 8-byte length and JSON header
    (kohya's ``addnet_hash_safetensors``; metadata edits do not change it), first 12 hex digits — the
    ``Lora hashes`` value and civitai's AutoV3. Other files, or ``full_file=True``: sha256 of every byte
    (civitai's SHA256; its first 10 digits are AutoV2, A1111's checkpoint ``Model hash``).
    ``length=None`` gives all 64 digits."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        f: BinaryIO = io.BytesIO(bytes(source))
        size, is_st = len(f.getbuffer()), None
    else:
        path = Path(source)
        if not path.is_file():
            raise SourceError(f"cannot hash '{path}': not a file")
        f, size, is_st = open(path, "rb"), path.stat().st_size, path.suffix.lower() == ".safetensors"
    with f:
        if is_st is None:  # bytes: sniff; paths go by extension, as A1111 does
            is_st = _is_safetensors(f, size)
        digest = hashlib.sha256()
        if is_st and not full_file:
            if not _is_safetensors(f, size):
                raise FormatError(f"'{source}' is not a valid safetensors file (bad header length)")
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def _to_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ValueError(f"save_png takes one image, got a batch of {arr.shape[0]}")
        arr = arr[0]
    if arr.dtype != np.uint8:  # floats in [0, 1], rounded as diffusers' numpy_to_pil
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)


def save_png(image: Any, path: str | os.PathLike, infotext: str) -> Path:
    """Write ``image`` (PIL, or an array in [0, 1] / uint8, HWC or 1HWC) as a PNG with the ``parameters`` chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, infotext)  # tEXt, or iTXt when the text is not latin-1 (as A1111 via Pillow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _to_pil(image).save(path, format="PNG", pnginfo=info)
    return path


def load_png(path: str | os.PathLike) -> InfoText:
    """Read the ``parameters`` text of a PNG written here or by A1111."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            text = getattr(im, "text", None) or im.info
            value = text.get(PNG_KEY)
    except FileNotFoundError:
        raise SourceError(f"no such image: '{path}'") from None
    if not isinstance(value, str):
        raise FormatError(f"'{path}' has no '{PNG_KEY}' text chunk")
    return read(value)
