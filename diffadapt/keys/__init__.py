"""From raw keys to per-module groups and typed patches, and from module keys to model modules.

A key is ``<prefix><module>.<suffix>``: the suffix names the tensor (``lora_down.weight``, ``alpha``…,
as the method registry knows them), the prefix the component and naming style.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch

from ..errors import DiffAdaptError, FormatError, NonFiniteError
from ..methods import ALL_SUFFIXES, BY_NAME, ParseContext, detect, full
from ..spec import COMPONENTS, AdapterSpec, ModuleGroup, ModulePatch, RawAdapter
from . import dit, kohya, peft
from .diffusers import rewrite_legacy
from .index import ModuleIndex

ANY = "*"  # a component not named by the file: whichever one the module resolves in

__all__ = ["ANY", "ModuleIndex", "build_spec", "configs_of", "split", "unknown_keys"]


_SUFFIXES = frozenset(ALL_SUFFIXES)
_DEPTH = max(s.count(".") for s in ALL_SUFFIXES) + 1  # the most dot-separated parts a suffix has


def _suffix(key: str) -> str | None:
    """The longest known tensor suffix ending the key after a '.', by set look-ups (files have 10⁴+ keys)."""
    parts = key.rsplit(".", _DEPTH)
    for i in range(1, len(parts)):  # longest first
        s = ".".join(parts[i:])
        if s in _SUFFIXES:
            return s
    return None


def normalize(key: str) -> str:
    """A key as ``split`` reads it: legacy diffusers and DiT spellings rewritten to the suffixes methods know."""
    return dit.rewrite_key(rewrite_legacy(key))


def unknown_keys(names: Iterable[str]) -> list[str]:
    """The keys no adapter method knows, in order: one pass over names alone, so a file can be refused from
    its header before its data is read."""
    return [k for k in names if _suffix(normalize(k)) is None]


def unknown_key_error(where: str, unknown: list[str], total: int) -> FormatError:
    """One error for all of them: the first few named, the count given."""
    shown = ", ".join(f"'{k}'" for k in unknown[:3]) + (", …" if len(unknown) > 3 else "")
    if len(unknown) == 1:
        return FormatError(f"{where}: key {shown} is not an adapter tensor diffadapt knows")
    hint = " (a model checkpoint rather than an adapter?)" if len(unknown) == total else ""
    return FormatError(f"{where}: {len(unknown):,} of {total:,} keys are not adapter tensors diffadapt knows: "
                       f"{shown}{hint}")


def classify(module: str) -> tuple[str, str, bool, str]:
    """(component, module key, dotted, fmt) for the module part of a key."""
    if "." not in module:
        hit = kohya.split_prefix(module)
        if hit:
            component, rest = hit
            return component, rest, False, "lycoris" if component == ANY else "kohya"
        return ANY, module, False, "kohya"
    hit = dit.split_dotted_prefix(module)
    if hit:
        return hit[0], hit[1], True, "diffusers"
    head, _, rest = module.partition(".")
    component = ANY
    if head in COMPONENTS:
        component, module = head, rest
    if module.startswith("base_model.model."):
        return component, module[len("base_model.model."):], True, "peft"
    return component, module, True, "diffusers"


def configs_of(raw: RawAdapter) -> dict[str, dict]:
    """The PEFT configs a source carries, by component: from its metadata, then its config files, validated."""
    configs = peft.configs_from_metadata(raw.metadata, where=raw.source)
    for comp, cfg in raw.configs.items():
        configs[comp] = peft.check_config(cfg, where=f"{raw.source} ({comp or 'adapter'} config)")
    return configs


def split(raw: RawAdapter, configs: dict[str, dict]) -> list[ModuleGroup]:
    """Group a file's tensors by module, each with its suffixes and (PEFT) resolved config."""
    named = [(key, k, _suffix(k)) for key, k in ((key, normalize(key)) for key in raw.tensors)]
    unknown = [key for key, _, suffix in named if suffix is None]
    if unknown:
        raise unknown_key_error(str(raw.source), unknown, len(raw.tensors))
    groups: dict[tuple[str, str], ModuleGroup] = {}
    for key, k, suffix in named:
        tensor = raw.tensors[key]
        component, module_key, dotted, fmt = classify(k[: -len(suffix) - 1])
        group = groups.get((component, module_key))
        if group is None:
            cfg = configs.get(component if component != ANY else "", configs.get(""))
            if cfg is None and component == ANY and len(configs) == 1:
                cfg = next(iter(configs.values()))
            group = groups[(component, module_key)] = ModuleGroup(
                component=component, module_key=module_key, dotted=dotted, fmt=fmt, tensors={}, keys={},
                config=peft.resolve(cfg, module_key),
            )
        if suffix in group.tensors:
            raise FormatError(f"{raw.source}: keys '{group.keys[suffix]}' and '{key}' name the same tensor")
        group.tensors[suffix] = tensor
        group.keys[suffix] = key
    return list(groups.values())


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(t: torch.Tensor, *, where: str) -> None:
    """Dense, real, on a device with data, of a float dtype (integers only for scalars such as alpha)."""
    if t.layout != torch.strided:
        raise FormatError(f"{where}: a {str(t.layout).removeprefix('torch.')} tensor; adapters hold dense tensors")
    if t.device.type == "meta":
        raise FormatError(f"{where}: a meta tensor has no values")
    if t.dtype not in FLOATS and not (t.numel() == 1 and not t.is_complex() and t.dtype != torch.bool
                                      and not t.is_floating_point()):
        raise FormatError(f"{where}: dtype {str(t.dtype).removeprefix('torch.')} is not supported "
                          "(float16, bfloat16, float32 or float64; integers only for scalars such as alpha)")
    if t.dim() and t.shape[0] == 0:  # (0, in): rank 0. PEFT OFT with 1-wide blocks has (n, 0): that is valid
        raise FormatError(f"{where}: an empty tensor, shape {tuple(t.shape)} (rank 0?)")


def build_spec(raw: RawAdapter, *, check_finite: bool = True) -> AdapterSpec:
    """Parse every module group into typed params; validates everything that needs no model."""
    if not raw.tensors:
        raise FormatError(f"{raw.source}: no tensors")
    patches = []
    configs = configs_of(raw)
    groups = split(raw, configs)
    family = dit.family_of_keys(g.module_key for g in groups)
    layout = None
    if family is not None:
        layout = dit.layout_name(family, groups, list(raw.tensors))
        dit.translate(groups, family)
    for g in groups:
        suffix0, key0 = next(iter(g.keys.items()))
        # the module part of the key as written in the file (legacy diffusers keys are shown whole)
        first_key = key0[: -len(suffix0) - 1] if key0.endswith("." + suffix0) else key0
        where = f"{raw.source}: {first_key}"
        for suffix, t in g.tensors.items():
            _check_tensor(t, where=f"{raw.source}: tensor '{g.keys[suffix]}'")
        if check_finite:
            for suffix, t in g.tensors.items():
                # a finite sum proves every value finite; only a non-finite sum needs the full scan
                if t.is_floating_point() and not torch.isfinite(t.sum()) and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(f"{raw.source}: tensor '{g.keys[suffix]}' has NaN or Inf values")
        bias_only = set(g.tensors) == {"diff_b"}  # ComfyUI-format Wan files: a bias trained alone
        method = BY_NAME["full"] if bias_only else detect(set(g.tensors), where=where)
        unknown = set(g.tensors) - method.suffixes
        if unknown:
            raise FormatError(f"{where}: keys {sorted(g.keys[s] for s in unknown)} do not belong to {method.name}")
        parse = full.parse_bias if bias_only else method.parse
        try:
            params = parse(g.tensors, ParseContext(where=where, fmt=g.fmt, config=g.config))
        except (IndexError, RuntimeError, ValueError, TypeError, ZeroDivisionError) as e:
            if isinstance(e, DiffAdaptError):
                raise
            raise FormatError(f"{where}: malformed {method.name} tensors: {type(e).__name__}: {e}") from e
        patches.append(
            ModulePatch(component=g.component, module_key=g.module_key, method=method.name, params=params,
                        fmt=g.fmt, dotted=g.dotted, original_key=first_key, fused=g.fused, native=g.native)
        )
    fmts = Counter(p.fmt for p in patches)
    fmt = fmts.most_common(1)[0][0]
    return AdapterSpec(patches=patches, fmt=fmt, source=raw.source, metadata=raw.metadata, configs=configs,
                       family=family, layout=layout)
