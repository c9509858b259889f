"""Inject backend: the adapter lives in peft tuner layers, unfused, built from the file's tensors.

``apply`` converts every target to its peft form first (``Params.to_peft``: rank / alpha patterns from
the tensors, LoKr layout, OFT / WaveFT config), checks that peft can hold it exactly and that it composes
with what the module already carries as in patch mode — all before the model is touched. Then, per
component, the modules are grouped into as few peft configs as their shared fields allow (one peft adapter
each: the adapter's name, then ``<name>_<type>`` for further groups), injected with
``inject_adapter_in_model(..., low_cpu_mem_usage=True, state_dict=...)`` and loaded with
``set_peft_model_state_dict``; any failure undoes everything. ``remove`` deletes the adapter from its layers
and puts each emptied layer's ``base_layer`` (the original module object) back in its parent.

Composition on one module follows peft's layer nesting; it equals patch mode's (additive sum, then
transforms in load order) when additive adapters are injected before transforms (OFT, DoRA) and a DoRA
adapter shares its module with no other injected adapter. Loads that break this are refused.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import DiffAdaptError, UnsupportedError
from .. import peft_bridge as pl
from ..methods.base import PeftEntry
from ..peft_bridge import group_entries, make_config, module_kind
from . import inject_hotswap
from . import patch as patch_backend

NAME = "inject"


@dataclass
class Site:
    """One module of one injected adapter."""

    component: str
    module_name: str
    where: str
    root: nn.Module
    parent: nn.Module
    attr: str
    base: nn.Module
    entry: PeftEntry
    params: Any
    strength: float
    peft_name: str = ""
    layer: nn.Module | None = None
    base_scaling: float | None = None
    oft: pl.OftSkew | None = None  # PEFT OFT: the skew strength scales
    dora: pl.DoraFold | None = None  # DoRA: the tensors strength folds into
    before: nn.Module | None = None  # while building: what sat in the parent before

    @property
    def peft_type(self) -> str:
        return self.entry.peft_type

    def top(self) -> nn.Module:
        return getattr(self.parent, self.attr)


@dataclass
class State:
    """What the inject backend keeps for one adapter (``Loaded.state``)."""

    sites: list[Site]
    configs: dict[tuple[int, str], tuple[nn.Module, Any]]  # (id(root), peft name) → (root, config)
    hotswap: inject_hotswap.Prepared | None = None  # set by prepare_hotswap


def _kind(entry: PeftEntry) -> str:
    if entry.peft_type == "OFT":
        return "oft"
    return "dora" if entry.values.get("use_dora") or "lora_magnitude_vector" in entry.tensors else "additive"


def _layer_kinds(layer: nn.Module) -> list[str]:
    if pl.is_oft(layer):
        return ["oft"] * len(pl.adapter_names(layer))
    dora = getattr(layer, "lora_magnitude_vector", {})
    return ["dora" if n in dora else "additive" for n in pl.adapter_names(layer)]


def _check_stack(site: Site) -> None:
    """Refuse what peft's nesting would compose differently from patch mode (see the module docstring)."""
    new = _kind(site.entry)
    have = [k for layer in pl.chain(site.top()) for k in _layer_kinds(layer)]
    slot = patch_backend.existing_slot(site.base)
    patched_transform = slot is not None and any(not e.params.is_additive for e in slot.entries)
    hint = "; load it before them, or use mode='patch'"
    if new == "additive" and ("oft" in have or "dora" in have):
        raise UnsupportedError(f"{site.where}: an additive adapter would land outside the OFT/DoRA adapter "
                               f"already injected there, so that transform would not act on it{hint}")
    if new == "additive" and patched_transform:
        raise UnsupportedError(f"{site.where}: a patch-mode OFT/DoRA adapter transforms this module's weight; "
                               f"an injected adapter would add outside that transform{hint}")
    if new == "dora" and have:
        raise UnsupportedError(f"{site.where}: peft's DoRA normalises the base weight only, not the other adapters "
                               "injected on this module; use mode='patch'")


def _sites(loaded) -> list[Site]:
    sites, seen = [], set()
    for t in loaded.targets:
        if t.root is None:
            raise DiffAdaptError(f"{t.component}.{t.module_name}: no component module recorded; cannot inject")
        where = f"{loaded.spec.source}: {t.component + '.' if t.component else ''}{t.module_name}"
        head, _, attr = t.module_name.rpartition(".")
        parent = t.root.get_submodule(head) if head else t.root
        try:
            entry = t.patch.params.to_peft(kind=module_kind(t.module), shape=tuple(t.module.weight.shape),
                            where=where, inject=True)
        except UnsupportedError as e:
            raise UnsupportedError(f"{e}; use mode='patch'") from None
        if (id(t.root), t.module_name) in seen:
            raise DiffAdaptError(f"{where}: two patches of one adapter target this module")
        seen.add((id(t.root), t.module_name))
        s = loaded.strength(t.component, t.module_name)
        site = Site(t.component, t.module_name, where, t.root, parent, attr, t.module, entry, t.patch.params, s)
        _check_stack(site)
        if entry.peft_type == "OFT" and entry.shared["coft"][0] and abs(s) > 1:
            raise UnsupportedError(f"{where}: COFT cannot hold weight {s} (|w| > 1) in peft's layer; use mode='patch'")
        sites.append(site)
    return sites


def _peft_name(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _taken(root: nn.Module, sites: list[Site]) -> set[str]:
    names = set(getattr(root, "peft_config", {}) or {})
    for s in sites:
        for layer in pl.chain(s.top()):
            names.update(pl.adapter_names(layer))
    return names


def apply(loaded) -> None:
    """Inject every target of ``loaded``; on any failure the model is left as it was."""
    sites = _sites(loaded)
    by_root: dict[int, list[Site]] = defaultdict(list)
    for s in sites:
        by_root[id(s.root)].append(s)
    base_name = re.sub(r"[^0-9A-Za-z_-]", "_", loaded.name) or "adapter"
    plan = []  # (root, peft name, group, sites of the group)
    for group_sites in by_root.values():
        root = group_sites[0].root
        index = {s.module_name: s for s in group_sites}
        taken = _taken(root, group_sites)
        for i, group in enumerate(group_entries({s.module_name: s.entry for s in group_sites})):
            name = _peft_name(base_name if i == 0 else f"{base_name}_{group.peft_type.lower()}", taken)
            taken.add(name)
            plan.append((root, name, group, [index[m] for m in group.modules]))
    foreign = {id(l): list(l.active_adapters) for s in sites for l in pl.chain(s.top())}
    done: list[Site] = []
    configs: dict[tuple[int, str], tuple[nn.Module, Any]] = {}
    try:
        for root, name, group, gsites in plan:
            tops = [s.top() for s in gsites]
            group.modules = {s.module_name: _copied(s.entry) for s in gsites}
            layers, _ = pl.build(tops, [s.module_name for s in gsites], group, name)
            for s, layer, top in zip(gsites, layers, tops):
                s.peft_name, s.layer = name, layer
                s.before = top
                if layer is not top:
                    setattr(s.parent, s.attr, layer)
                layer.train(top.training)  # peft builds adapters in train mode: LoHa/LoKr would drop modules
                done.append(s)
            configs[(id(root), name)] = (root, make_config(group))
        for (_, name), (root, config) in configs.items():  # peft's state-dict functions read it
            if not isinstance(getattr(root, "peft_config", None), dict):
                root.peft_config = {}
            root.peft_config[name] = config
        for s in sites:
            _remember(s)
            pl.set_strength(s, s.strength)
        for s in sites:
            for layer in pl.chain(s.top()):
                pl.activate(layer, foreign.get(id(layer)))
    except BaseException:
        _undo(done, configs, foreign)
        raise
    for s in sites:
        s.before = None
    loaded.state = State(sites=sites, configs=configs)


def _copied(entry: PeftEntry) -> PeftEntry:
    """Tensors peft will own (assigned, not copied, by low_cpu_mem_usage loading): the spec stays as loaded.
    Contiguous: peft's make_kron fails on some strided factors (in-memory state dicts can hold views)."""
    tensors = {k: v.detach().to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
               for k, v in entry.tensors.items()}
    return PeftEntry(entry.peft_type, tensors, entry.values, entry.shared)


def _remember(s: Site) -> None:
    """What strength rules need: the scaling peft derived, and the tensors they rewrite."""
    layer, n = s.layer, s.peft_name
    if s.peft_type == "OFT":
        mod = layer.oft_R[n]
        vec0 = mod.weight.detach().clone()
        # COFT: peft re-projects at every forward; scaling the projected Q keeps |sQ| inside for |s| ≤ 1
        vec = mod._project_batch(vec0, eps=mod.eps).detach() if mod.coft else vec0
        s.oft = pl.OftSkew(vec0=vec0, vec=vec, coft=bool(mod.coft))
    elif s.peft_type == "WAVEFT":
        s.base_scaling = float(layer.waveft_scaling[n])
    else:
        s.base_scaling = float(layer.scaling[n])
        mags = getattr(layer, "lora_magnitude_vector", None)
        if mags is not None and n in mags:
            s.dora = pl.DoraFold(params=s.params.to(dtype=torch.float32),
                                 lora_B=layer.lora_B[n].weight.detach().clone(),
                                 magnitude=mags[n].weight.detach().clone())


def _undo(done: list[Site], configs, foreign) -> None:
    for s in reversed(done):
        layer, top = s.layer, s.before
        if layer is not top:
            if s.top() is layer:
                setattr(s.parent, s.attr, top)
        else:
            _delete(layer, s.peft_name)
        for l in pl.chain(s.top()):
            pl.activate(l, foreign.get(id(l)))
    for (_, name), (root, _) in configs.items():
        _drop_config(root, name)


def _delete(layer: nn.Module, name: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.delete_adapter(name)
    pl.forget(layer, name)


def _drop_config(root: nn.Module, name: str) -> None:
    cfg = getattr(root, "peft_config", None)
    if isinstance(cfg, dict):
        cfg.pop(name, None)
        if not cfg:
            del root.peft_config


def _splice(s: Site, layer: nn.Module) -> None:
    """Take an emptied layer out of the wrapper chain: its base_layer takes its place."""
    top = s.top()
    if top is layer:
        setattr(s.parent, s.attr, layer.base_layer)
        return
    while top.base_layer is not layer:
        top = top.base_layer
    top.base_layer = layer.base_layer


def remove(loaded) -> None:
    """Delete the adapter from every layer; emptied layers give their place back to the original module."""
    state: State | None = loaded.state
    loaded.state = None  # the padded layers of a prepared adapter go with it
    if state is None:
        return
    for s in reversed(state.sites):
        if s.layer is None:
            continue
        _delete(s.layer, s.peft_name)
        if pl.is_empty(s.layer):
            _splice(s, s.layer)
        for layer in pl.chain(s.top()):
            pl.activate(layer)
    for (_, name), (root, _) in state.configs.items():
        _drop_config(root, name)


def refresh(loaded_list, *, inplace: bool = True) -> None:
    """Re-read each adapter's strength per module: layer scalings, OFT skew, DoRA folding (all in place)."""
    todo = []
    for loaded in loaded_list:
        state: State | None = loaded.state
        for s in state.sites if state else ():
            todo.append((s, loaded.strength(s.component, s.module_name)))
    for s, w in todo:  # check first: a refused weight changes nothing
        if s.oft is not None and s.oft.coft and abs(w) > 1:
            raise UnsupportedError(f"{s.where}: COFT cannot hold weight {w} (|w| > 1) in peft's layer; "
                                   "use mode='patch'")
    layers = {}
    for s, w in todo:
        s.strength = w
        pl.set_strength(s, w)
        layers[id(s.layer)] = s.layer
    for layer in layers.values():
        pl.activate(layer)


def peft_names(loaded) -> list[tuple[str, str]]:
    """(component, peft adapter name) pairs an injected adapter uses."""
    state: State | None = loaded.state
    if state is None:
        return []
    return list(dict.fromkeys((s.component, s.peft_name) for s in state.sites))


def prepare_hotswap(loaded_list, *, max_rank: int) -> None:
    """Pad these adapters' layers for compiled hotswaps (see ``inject_hotswap``); checks all before any change."""
    inject_hotswap.prepare(loaded_list, max_rank=max_rank)


def hotswap(loaded, targets) -> None:
    """In-place swap for adapters prepared with ``prepare_hotswap`` (see ``inject_hotswap``)."""
    inject_hotswap.hotswap(loaded, targets)
