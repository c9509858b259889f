"""Saving a loaded adapter (``save``) and converting files (``convert``) between kohya/LyCORIS and PEFT.

Both go through the canonical spec: tensors are parsed into typed params, then written by ``export.kohya``
or ``export.peft_files``. Every check (format, dtype, destination, representability of every module) runs
before the first byte is written.

Module names. kohya files flatten paths ('.' → '_'), which cannot be undone by rule ('down_blocks_0' vs
'transformer_blocks' vs 'to_out_0'), so turning kohya names into PEFT's dotted ones needs the module tree:
``model=`` (a pipeline or module), else the architecture of the file's base family built on the meta device
from ``diffadapt.architectures``' real-size configs (SD1.x, SDXL — no weights, well under a second). The same
tree gives PEFT writers each module's weight shape. kohya output needs no model: dotted names flatten.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import torch
from torch import nn

from . import io
from .api import read_spec
from .errors import AdapterNotFoundError, DiffAdaptError, KeyMappingError, ShapeError
from .export import DTYPES, Item
from .peft_bridge import module_kind
from .export.kohya import kohya_metadata, kohya_state_dict, sdxl_ldm
from .export.peft_files import write_peft
from .info import guess_family
from .io import write_safetensors
from .keys.kohya import diffusers_to_ldm
from .pipeline import Target, components, model_family, registry, resolve
from .spec import AdapterSpec, RawAdapter

FORMATS = ("kohya", "peft")
BUILT_IN = ("sd1", "sdxl", "flux", "sd3")  # families whose module tree ``architecture`` builds (model="sdxl")


def parse_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise DiffAdaptError(f"dtype={dtype!r}: use one of fp16, bf16, fp32 (or a torch dtype)")


PEFT_FILES = {io.PEFT_CONFIG, io.PEFT_WEIGHTS[0], "README.md"}


def _foreign(folder: Path, *, folder_out: bool) -> list[str]:
    """What an existing destination folder holds that no output of this kind would: replacing the folder whole
    (nothing stale left) must never delete a user's other files. Any content at all, for a file output."""
    found = []
    for p in folder.iterdir():
        if folder_out and p.name in io.COMPONENT_DIRS and p.is_dir() and not p.is_symlink():
            found += [f"{p.name}/{q.name}" for q in p.iterdir() if q.name not in PEFT_FILES or not q.is_file()]
        elif not folder_out or p.name not in PEFT_FILES or not p.is_file():
            found.append(p.name)
    return sorted(found)


def _check_request(to: str, dest: Any, overwrite: bool, single_file: bool | None = None) -> Path:
    if to not in FORMATS:
        raise DiffAdaptError(f"format {to!r}: choose one of {list(FORMATS)}")
    if not isinstance(dest, (str, os.PathLike)):
        raise DiffAdaptError(f"destination must be a path, got {type(dest).__name__}")
    path = Path(dest).expanduser()
    try:
        if path.is_dir():
            folder_out = to == "peft" and not (path.suffix == ".safetensors" if single_file is None else single_file)
            foreign = _foreign(path, folder_out=folder_out)
            if foreign:
                shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
                raise DiffAdaptError(
                    f"{path}: a folder holding {len(foreign)} other file(s) ({shown}); "
                    + ("a PEFT output replaces its folder whole: give a new or empty folder" if folder_out
                       else f"{to} output here is one .safetensors file: give a file path"))
        exists = path.exists() and (path.is_file() or any(path.iterdir()))
    except OSError as e:
        raise DiffAdaptError(f"{path}: cannot check the destination: {e.strerror or e}") from e
    if exists and not overwrite:
        raise DiffAdaptError(f"{path}: already exists; pass overwrite=True (CLI: --force) to replace it")
    return path


def excluded(patch, patterns: Iterable[str]) -> bool:
    """Shell-style patterns against the module as named in the file: 'component.module', the flat (kohya)
    and dotted spellings, and the file's key (so 'text_encoder*', 'lora_te_*', '*down_blocks_0_*' all work)."""
    flat = patch.module_key.replace(".", "_")
    names = (f"{patch.component}.{patch.module_key}", f"{patch.component}.{flat}", patch.module_key, flat,
             patch.original_key)
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


# -- model trees -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def architecture(family: str):
    """Components of a known base family on the meta device (module names and shapes only), or None."""
    from .architectures import sd15_text_encoder, sd15_unet, sdxl_unet

    if family == "sd1":
        return SimpleNamespace(components={"unet": sd15_unet(device="meta"),
                                           "text_encoder": sd15_text_encoder(device="meta")})
    if family == "sdxl":
        return SimpleNamespace(components={"unet": sdxl_unet(device="meta"),
                                           "text_encoder": sd15_text_encoder(device="meta"),  # CLIP ViT-L, as SD1.5
                                           "text_encoder_2": _bigg_text_encoder()})
    if family in ("flux", "sd3"):
        from .architectures import flux_dev_transformer, sd35_large_transformer, t5_xxl_encoder

        if family == "flux":
            return SimpleNamespace(components={"transformer": flux_dev_transformer(device="meta"),
                                               "text_encoder": sd15_text_encoder(device="meta"),
                                               "text_encoder_2": t5_xxl_encoder(device="meta")})
        return SimpleNamespace(components={"transformer": sd35_large_transformer(device="meta"),
                                           "text_encoder": sd15_text_encoder(device="meta"),
                                           "text_encoder_2": _bigg_text_encoder(),
                                           "text_encoder_3": t5_xxl_encoder(device="meta")})
    return None


def _bigg_text_encoder() -> nn.Module:
    """SDXL's second text encoder (OpenCLIP ViT-bigG text tower) on the meta device."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
    with init_empty_weights():
        return CLIPTextModelWithProjection(config)


def _model(model: Any):
    if isinstance(model, str):
        arch = architecture(model)
        if arch is None:
            raise DiffAdaptError(f"model={model!r}: no built-in architecture (known: {', '.join(BUILT_IN)}); "
                                 "pass a pipeline or module")
        return arch
    return model


def _to_ldm(target: Any, family: str):
    """SDXL UNet flat names → the ldm names kohya's SDXL trainer writes (None for other families)."""
    if family != "sdxl":
        return None
    unet = components(target).get("unet") if target is not None else None
    if unet is None:
        return sdxl_ldm
    lpb = unet.config.layers_per_block
    lpb = int(lpb[0] if isinstance(lpb, (list, tuple)) else lpb)
    has_attn = lambda b: hasattr(unet.up_blocks[b], "attentions")  # noqa: E731
    return lambda flat: diffusers_to_ldm(flat, layers_per_block=lpb, up_has_attention=has_attn)


# -- items -------------------------------------------------------------------------------------------


def _items_from_targets(targets: list[Target]) -> list[Item]:
    return [Item(component=t.component, module=t.module_name, dotted=True, params=t.patch.params,
                 kind=module_kind(t.module), shape=tuple(t.module.weight.shape)) for t in targets]


def _native_items(loaded) -> list[Item] | None:
    """A DiT adapter read from native names (Flux BFL, SD3 MMDiT, Wan) goes back to kohya under those names —
    fused modules whole (``double_blocks_0_img_attn_qkv``), as sd-scripts / musubi-tuner write them; text
    encoders as usual. None when any denoiser module came from diffusers or XLabs names."""
    from .keys.dit import native_kohya_names

    names = native_kohya_names(loaded.spec.patches)
    if names is None:
        return None
    resolved = {t.patch.original_key for t in loaded.targets}  # strict=False may have left some out
    items = [Item(component="unet", module=names[id(p)], dotted=False, params=p.params)
             for p in loaded.spec.patches if id(p) in names and p.original_key in resolved]
    return items + [i for i in _items_from_targets(loaded.targets)
                    if i.component not in ("transformer", "transformer_2", "unet")]


def _file_ndim(raw: RawAdapter | None, patch) -> int | None:
    """A kohya module's weight rank, read off the file's own shaped tensors (LyCORIS writes rescale and
    dora_scale as (out, 1, …)); params keep them flat, and a file written back must keep the shapes."""
    if raw is None or patch.dotted:
        return None
    prefix = patch.original_key.split(".", 1)[0]
    for suffix in ("rescale", "dora_scale", "lora_up.weight", "lokr_w2", "hada_t1"):
        t = raw.tensors.get(f"{prefix}.{suffix}")
        if t is not None and t.dim() >= 2:
            return t.dim()
    return None


def _items_from_spec(spec: AdapterSpec, raw: RawAdapter | None = None) -> list[Item]:
    return [Item(component=p.component, module=p.module_key, dotted=p.dotted, params=p.params,
                 ndim=_file_ndim(raw, p)) for p in spec.patches]


def _write(items: list[Item], dest: Path, *, to: str, family: str, dtype, metadata: dict[str, str], where: str,
           single_file: bool | None, to_ldm=None) -> list[str]:
    if not items:
        raise DiffAdaptError(f"{where}: no modules left to write (all excluded?)")
    with io.staged(dest) as out:  # written beside dest, then renamed over it: never partial, nothing stale
        paths = _write_format(items, dest, out, to=to, family=family, dtype=dtype, metadata=metadata, where=where,
                              single_file=single_file, to_ldm=to_ldm)
    return [str(dest / Path(p).relative_to(out)) if Path(p) != out else str(dest) for p in paths]


def _write_format(items, dest, out, *, to, family, dtype, metadata, where, single_file, to_ldm) -> list[str]:
    if to == "kohya":
        sd = kohya_state_dict(items, family=family, dtype=dtype, to_ldm=to_ldm, where=where)
        meta = kohya_metadata(items, family=family, title=dest.stem, source=metadata)
        write_safetensors(out, sd, meta)
        return [str(out)]
    single = dest.suffix == ".safetensors" if single_file is None else single_file
    return write_peft(items, out, single_file=single, dtype=dtype, metadata=metadata, where=where)


def convert(source: Any, dest: str | os.PathLike, *, format: str | None = None, dtype: Any = None,
            exclude: Iterable[str] = (), model: Any = None, single_file: bool | None = None,
            allow_pickle: bool = False, overwrite: bool = False, to: str | None = None) -> list[str]:
    """Convert an adapter file/folder to kohya (one ``.safetensors``) or PEFT (a folder per component, or one
    ``.safetensors`` with the configs in its metadata when ``dest`` ends in ``.safetensors``).

    ``exclude``: shell-style patterns of modules to drop (see :func:`excluded`). ``model``: a pipeline,
    module or built-in family name ('sd1', 'sdxl', 'flux', 'sd3') to resolve kohya names for PEFT output; by default the file's
    guessed family. Returns the paths written. ``to=`` is the old name of ``format=`` (deprecated).
    """
    if to is not None:
        warnings.warn("convert(..., to=) is deprecated; use format=, as save() does", DeprecationWarning, stacklevel=2)
        if format is not None and format != to:
            raise DiffAdaptError(f"format={format!r} and to={to!r} disagree; pass only format=")
        format = to
    if format is None:
        raise DiffAdaptError(f"convert() needs format=, one of {list(FORMATS)}")
    to = format
    path = _check_request(to, dest, overwrite, single_file)
    dtype = parse_dtype(dtype)
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    if not all(isinstance(p, str) for p in patterns):
        raise DiffAdaptError(f"exclude must be patterns (strings), got {patterns!r}")
    if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().resolve() == path.resolve():
        raise DiffAdaptError(f"{path}: source and destination are the same")
    raw = None if isinstance(source, AdapterSpec) else io.read(source, allow_pickle=allow_pickle)
    spec = read_spec(raw if raw is not None else source)
    kept = [p for p in spec.patches if not excluded(p, patterns)]
    sub = AdapterSpec(patches=kept, fmt=spec.fmt, source=spec.source, metadata=spec.metadata, configs=spec.configs)
    target = _model(model) if model is not None else None
    family = model_family(target) if target is not None else guess_family(spec)
    # kohya names need the module tree for PEFT output; fused modules (Flux qkv …) need it unless they go back
    # to kohya under their native names (sd-scripts / musubi-tuner), which needs no model
    from .keys.dit import native_kohya_names

    native = native_kohya_names(kept) if to == "kohya" and model is None else None
    if native:
        items = [Item(component="unet", module=native[id(p)], dotted=False, params=p.params, ndim=_file_ndim(raw, p))
                 for p in kept if id(p) in native]
        rest = AdapterSpec(patches=[p for p in kept if id(p) not in native], fmt=spec.fmt, source=spec.source)
        return _write(items + _items_from_spec(rest, raw), path, to=to, family=family, dtype=dtype,
                      metadata=spec.metadata, where=spec.source, single_file=single_file, to_ldm=None)
    if target is None and ((to == "peft" and any(not p.dotted for p in kept)) or any(p.fused for p in kept)):
        target = architecture(family)
        if target is None:
            raise DiffAdaptError(
                f"{spec.source}: kohya module names cannot be turned into PEFT's dotted names without the model "
                f"(base family guessed: {family}); pass model= (CLI: --model) a pipeline/module or one of "
                f"{', '.join(BUILT_IN)}"
            )
    if target is not None and kept:
        try:
            items = _items_from_targets(resolve(target, sub, strict=True))
        except (KeyMappingError, ShapeError) as e:
            if model is not None:
                raise
            raise type(e)(f"{e} (names resolved against the built-in {family} architecture; pass model= / "
                          "--model the model the file was made for)") from None
    else:
        items = _items_from_spec(sub, raw)
    return _write(items, path, to=to, family=family, dtype=dtype, metadata=spec.metadata, where=spec.source,
                  single_file=single_file, to_ldm=_to_ldm(target, family))


def save(target: Any, name: str, path: str | os.PathLike, *, format: str = "kohya", dtype: Any = None,
         single_file: bool | None = None, overwrite: bool = False) -> list[str]:
    """Write a loaded adapter (its tensors as loaded, strength 1) in kohya or PEFT format; returns the paths."""
    dest = _check_request(format, path, overwrite, single_file)
    dtype = parse_dtype(dtype)
    reg = registry(target)
    with reg.lock:  # a consistent view of the record; the writing happens outside the lock
        loaded = reg.adapters.get(name)
        if loaded is None:
            raise AdapterNotFoundError(f"no adapter named '{name}' is loaded (loaded: {sorted(reg.adapters)})")
        items, spec = _items_from_targets(loaded.targets), loaded.spec
        items = (_native_items(loaded) if format == "kohya" else None) or items
        # a Wan 2.2 low-noise adapter is written as its pair is (the same names); it loads back with into=
        items = [Item(**{**vars(i), "component": "transformer"}) if i.component == "transformer_2" else i
                 for i in items]
    bare = isinstance(target, nn.Module)
    family = guess_family(spec) if bare else model_family(target)
    return _write(items, dest, to=format, family=family, dtype=dtype, metadata=spec.metadata,
                  where=f"adapter '{name}'", single_file=single_file, to_ldm=None if bare else _to_ldm(target, family))

