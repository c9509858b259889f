"""Reading adapter sources: safetensors files, PEFT folders, diffusers files, hub ids, state dicts.

Everything here is about bytes on disk; key names are interpreted in ``keys``. Pickle-based files
(``.bin``, ``.pt``, ``.ckpt``, ``.pth``) are refused unless the caller opts in, and are then read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import hub
from .errors import DiffAdaptError, FormatError, PickleRefusedError, ShapeError, SourceError, WriteError
from .layout import COMPONENT_DIRS, DIFFUSERS_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, PICKLE_SUFFIXES
from .spec import RawAdapter

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(/.+)?$")

Source = "str | os.PathLike | Mapping[str, torch.Tensor]"


MAX_JSON_BYTES = 16 << 20  # adapter_config.json: a few kB, even with per-module rank/alpha patterns
MAX_TENSORS = 50_000  # ~3× the largest adapters shared (full-layer SDXL LyCORIS with text encoders)
# Without a model, no adapter tensor (nor the weight a factor pair describes) may hold more values than this:
# ~2× the largest layer of the models supported (a 152k-token text-encoder embedding; T5-XXL's is 1.3e8).
MAX_LAYER_NUMEL = 1 << 30
# low-rank factor pairs (first, second) by suffix: second is (rank, in, …), first holds rank × out values
FACTOR_PAIRS = (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"),
                ("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b"), ("lokr_w1_a", "lokr_w1_b"),
                ("lokr_w2_a", "lokr_w2_b"))


def read(source: Any, *, allow_pickle: bool = False, max_numel: int | None = None) -> RawAdapter:
    """Read any supported source into tensors, metadata and PEFT configs.

    ``max_numel``: refuse, from the file's header and before reading it, any tensor with more elements than
    that (``load`` passes a bound from the model's largest layer).
    """
    if isinstance(source, RawAdapter):
        return source
    if isinstance(source, Mapping):
        tensors = dict(source)
        names = [k for k in tensors if not isinstance(k, str)]
        if names:
            raise FormatError(f"<state dict>: keys {names[:3]!r} are not strings")
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise FormatError(f"<state dict>: values of {bad[:3]} are not tensors")
        _check_header("<state dict>", {k: tuple(v.shape) for k, v in tensors.items()}, max_numel)
        return RawAdapter(tensors=tensors)
    if not isinstance(source, (str, os.PathLike)) or not isinstance(os.fspath(source), str):
        raise SourceError(f"cannot read an adapter from a {type(source).__name__}")
    if not os.fspath(source).strip():  # Path("") is the current folder: never read it by accident
        raise SourceError("an empty string is not an adapter source (give a file, folder, hub id or state dict)")
    path = Path(source).expanduser()
    try:
        if path.is_symlink() and not path.exists():
            raise SourceError(f"{path}: a broken or looping symbolic link")
        is_file, is_dir = path.is_file(), path.is_dir()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte
        shown = str(source) if len(str(source)) <= 200 else str(source)[:200] + "…"
        raise SourceError(f"{shown!r}: not a path that can be opened ({getattr(e, 'strerror', None) or e})") from e
    if is_file:
        return read_file(path, allow_pickle=allow_pickle, max_numel=max_numel)
    if is_dir:
        return read_dir(path, allow_pickle=allow_pickle, max_numel=max_numel)
    text = str(source)
    local = Path(text.split("/", 1)[0]).is_dir()  # 'loras/x.safetensors' beside a loras/ folder: a typo, not an id
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")) and not local:
        raw = read_dir_or_file(hub.download(text, allow_pickle=allow_pickle), allow_pickle=allow_pickle,
                               max_numel=max_numel)
        raw.source = text  # summaries and errors name what the user gave; raw.files has the cached paths
        return raw
    hint = f" (not looked up on the Hub: ./{text.split('/', 1)[0]} is a local folder)" if local and "/" in text else ""
    raise SourceError(f"{source}: no such file or directory{hint}")


def read_dir_or_file(path: Path, *, allow_pickle: bool, max_numel: int | None = None) -> RawAdapter:
    if path.is_file():
        return read_file(path, allow_pickle=allow_pickle, max_numel=max_numel)
    return read_dir(path, allow_pickle=allow_pickle, max_numel=max_numel)


def _check_header(where: str, shapes: dict[str, tuple[int, ...]], max_numel: int | None) -> None:
    """Counts, names and sizes, from names and shapes alone: a hostile file is refused before its data is read.

    ``max_numel``: the model's bound; without a model, :data:`MAX_LAYER_NUMEL`. Low-rank factor pairs must
    also describe a plausible layer: a rank above both sizes of the weight it factors is refused."""
    from .keys import unknown_key_error, unknown_keys

    if len(shapes) > MAX_TENSORS:
        raise FormatError(f"{where}: {len(shapes)} tensors; an adapter has at most {MAX_TENSORS:,} "
                          "(is this a model checkpoint rather than an adapter?)")
    unknown = unknown_keys(shapes)
    if unknown:
        raise unknown_key_error(where, unknown, len(shapes))
    bound = MAX_LAYER_NUMEL if max_numel is None else max_numel
    whose = ("than any layer of the model could use" if max_numel is not None
             else "than any layer of the models diffadapt supports")
    for key, shape in shapes.items():
        if math.prod(shape) > bound:
            raise ShapeError(f"{where}: tensor '{key}' of shape {tuple(shape)} is larger {whose} "
                             f"({bound:,} values at most)")
    for first, second in FACTOR_PAIRS:  # second is (rank, in, …); first is (out, rank, …) or (rank, out)
        for key, shape in shapes.items():
            if not key.endswith("." + second) or len(shape) < 2 or not shape[0]:
                continue
            other = shapes.get(key[: -len(second)] + first)
            if other is None or shape[0] not in tuple(other)[:2] or math.prod(other) % shape[0]:
                continue  # mismatched factors are reported with the module when parsed
            rank, out, inn = shape[0], math.prod(other) // shape[0], math.prod(shape[1:])
            if rank > max(out, inn):
                raise ShapeError(f"{where}: tensor '{key}' declares rank {rank} for a {out}×{inn} weight; a rank "
                                 "above both of the weight's sizes is not an adapter (malformed or hostile header)")
            if out * inn > bound:
                raise ShapeError(f"{where}: tensors '{key}' declare a {out}×{inn} weight ({out * inn:,} values), "
                                 f"larger {whose} ({bound:,} values at most)")


# -- files -------------------------------------------------------------------------------------------


def read_file(path: Path, *, allow_pickle: bool = False, max_numel: int | None = None) -> RawAdapter:
    try:
        size = path.stat().st_size
    except OSError as e:  # a looping link, a permission, a file gone since it was listed
        raise SourceError(f"{path}: cannot open: {e.strerror or e}") from e
    if size == 0:
        raise FormatError(f"{path}: the file is empty")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        tensors = _read_pickle(path, allow_pickle=allow_pickle)
        _check_header(str(path), {k: tuple(v.shape) for k, v in tensors.items()}, max_numel)
        return RawAdapter(tensors=tensors, source=str(path), files=(str(path),))
    tensors, metadata = read_safetensors(path, max_numel=max_numel)
    return RawAdapter(tensors=tensors, metadata=metadata, source=str(path), files=(str(path),))


def read_safetensors(path: Path, *, max_numel: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        # the header alone first: torch's reader maps the whole file at once (a huge declared size fails there,
        # before any check could name the tensor), numpy's reads the header and maps nothing
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            if len(keys) > MAX_TENSORS:
                _check_header(str(path), dict.fromkeys(keys, ()), None)
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        _check_header(str(path), shapes, max_numel)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} != shapes:
                raise FormatError(f"{path}: the file changed while it was being read")
            # get_tensor returns views of the memory-mapped file: copy them, so a file rewritten or truncated
            # later can neither change a loaded adapter nor crash the process (SIGBUS)
            tensors = {k: f.get_tensor(k).clone() for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        if isinstance(e, DiffAdaptError):
            raise
        if isinstance(e, OSError):  # the OS refused (permissions, a file gone since listed): not the bytes' fault
            raise SourceError(f"{path}: cannot open: {e.strerror or e}") from e
        hint = " (truncated or not a safetensors file?)"
        raise FormatError(f"{path}: cannot read safetensors: {e}{hint}") from e
    if not tensors:
        raise FormatError(f"{path}: the file holds no tensors")
    return tensors, metadata


def _read_pickle(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path}: pickle files can run code when loaded; pass allow_pickle=True if you trust it "
            "(it is then read with torch.load(weights_only=True)), or convert it to .safetensors"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad pickles
        raise FormatError(f"{path}: cannot read the checkpoint: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise FormatError(f"{path}: expected a non-empty dict of tensors, got {type(obj).__name__}")
    names = [k for k in obj if not isinstance(k, str)]
    if names:
        raise FormatError(f"{path}: keys {names[:3]!r} are not strings")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise FormatError(f"{path}: entries {bad[:3]} are not tensors")
    return obj


def read_json(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise SourceError(f"{path}: cannot open: {e.strerror or e}") from e
    if size > MAX_JSON_BYTES:  # read whole, so bounded first
        raise FormatError(f"{path}: {size:,} bytes; an adapter config is a few kB ({MAX_JSON_BYTES:,} at most)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, huge integers
        raise FormatError(f"{path}: malformed JSON: {type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# -- folders -----------------------------------------------------------------------------------------


def read_dir(path: Path, *, allow_pickle: bool = False, max_numel: int | None = None) -> RawAdapter:
    """PEFT folder, PEFT DreamBooth layout (component sub-folders), or a folder with one weights file."""
    if (path / PEFT_CONFIG).is_file():
        return _read_peft_dir(path, component="", allow_pickle=allow_pickle, max_numel=max_numel)
    subs = [c for c in COMPONENT_DIRS if (path / c / PEFT_CONFIG).is_file()]
    if subs:
        parts = [_read_peft_dir(path / c, component=c, allow_pickle=allow_pickle, max_numel=max_numel) for c in subs]
        raw = RawAdapter(tensors={}, source=str(path))
        for part in parts:
            raw.tensors.update(part.tensors)
            raw.configs.update(part.configs)
            raw.metadata.update(part.metadata)
            raw.files += part.files
        return raw
    for name in DIFFUSERS_WEIGHTS:
        if (path / name).is_file():
            return read_file(path / name, allow_pickle=allow_pickle, max_numel=max_numel)
    try:
        files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())
        pickles = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    except OSError as e:
        raise SourceError(f"{path}: cannot list the folder: {e.strerror or e}") from e
    if not files and allow_pickle:  # the user trusts pickles: a folder of one checkpoint is read like any other
        files = pickles
    if len(files) == 1:
        return read_file(files[0], allow_pickle=allow_pickle, max_numel=max_numel)
    if not files:
        hint = (f"; it holds pickle files ({', '.join(p.name for p in pickles[:3])}): pass allow_pickle=True "
                "(CLI: --allow-pickle) if you trust them") if pickles else ""
        raise SourceError(f"{path}: no adapter found (no {PEFT_CONFIG}, no .safetensors file){hint}")
    raise SourceError(f"{path}: several adapter files ({', '.join(f.name for f in files)}); name one")


def _read_peft_dir(path: Path, *, component: str, allow_pickle: bool, max_numel: int | None = None) -> RawAdapter:
    config = read_json(path / PEFT_CONFIG)
    weights = next((path / n for n in PEFT_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise SourceError(f"{path}: {PEFT_CONFIG} found but no {PEFT_WEIGHTS[0]}")
    raw = read_file(weights, allow_pickle=allow_pickle, max_numel=max_numel)
    prefix = f"{component}." if component else ""
    # keys are 'base_model.model.<module>.<suffix>'; keep them and mark the component by prefix
    raw.tensors = {f"{prefix}{k}": v for k, v in raw.tensors.items()}
    raw.configs = {component: config}
    raw.source = str(path)
    return raw


# -- writing -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged(dest: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``dest`` to write into; on success it replaces ``dest`` whole (a file, or a folder
    with nothing stale left from an older one), on failure it is deleted and ``dest`` is untouched.
    OS and safetensors errors become :class:`WriteError` naming ``dest``."""
    dest = Path(dest)
    tmp = dest.parent / f".{dest.stem}.{uuid.uuid4().hex[:8]}.tmp{dest.suffix}"
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]  # deepest first
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _swap_in(tmp, dest)
    except BaseException as e:
        _discard(tmp)
        for folder in made:  # folders made for dest go too: a failed write leaves the tree as it was
            with contextlib.suppress(OSError):
                folder.rmdir()
        cause = e.__cause__ if isinstance(e, WriteError) and e.__cause__ is not None else e
        if isinstance(cause, (OSError, SafetensorError)) and not isinstance(cause, DiffAdaptError):
            raise WriteError(f"{dest}: cannot write: {type(cause).__name__}: {cause}") from cause
        raise


def _swap_in(tmp: Path, dest: Path) -> None:
    if not tmp.is_dir() and not dest.is_dir():
        os.replace(tmp, dest)  # atomic on one file system
        return
    old = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.old"
    if dest.exists() or dest.is_symlink():
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old.exists() or old.is_symlink():
            os.replace(old, dest)
        raise
    _discard(old)


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write contiguous CPU tensors with string metadata (safetensors allows only str → str), atomically."""
    clean, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        if v.untyped_storage().data_ptr() in seen:  # split fused modules share factors; safetensors refuses aliases
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        clean[k] = v
    meta = {k: str(v) for k, v in metadata.items()}
    with staged(path) as tmp:
        save_file(clean, str(tmp), metadata=meta)
