"""Synthetic adapter files in the DiT tools' exact key layouts, and whole-matrix references.

Module lists come from the tiny models themselves: each native module (BFL / MMDiT / Wan names) is listed with
the diffusers modules it stands for, so a fused file module gets the stacked rows of its targets.
"""

from __future__ import annotations

import re

import torch
from diffusers.loaders.lora_conversion_utils import swap_scale_shift

from diffadapt.keys.dit import TABLES

PREFIX = {  # layout → (key of a native module path, suffix pair of down/up)
    "kohya": (lambda n: "lora_unet_" + n.replace(".", "_"), ("lora_down.weight", "lora_up.weight")),
    "bfl": (lambda n: "diffusion_model." + n, ("lora_down.weight", "lora_up.weight")),
    "bfl_ab": (lambda n: "diffusion_model." + n, ("lora_A.weight", "lora_B.weight")),
    "ldm": (lambda n: "model.diffusion_model." + n, ("lora_down.weight", "lora_up.weight")),  # checkpoint keys
    "xlabs": (lambda n: n, ("down.weight", "up.weight")),
}


def native_modules(model, family: str, *, xlabs: bool = False, only: str | None = None) -> dict[str, list[str]]:
    """{native module path: [diffusers module paths]} for every native module the model has."""
    mods = dict(model.named_modules())
    out: dict[str, list[str]] = {}
    for rule in TABLES[family]:
        if (".processor." in rule.native) != xlabs or (only and not re.search(only, rule.native)):
            continue
        for i in range(64) if "{i}" in rule.native else [""]:
            targets = [t.replace("{i}", str(i)) for t in rule.targets]
            if all(t in mods for t in targets) and mods[targets[0]].weight.dim() >= 2:  # norm scales aside
                out[rule.native.replace("{i}", str(i))] = targets
    return out


def shapes(model, targets: list[str]) -> tuple[int, tuple[int, ...]]:
    mods = dict(model.named_modules())
    ws = [mods[t].weight.shape for t in targets]
    return sum(w[0] for w in ws), tuple(ws[0][1:])


def lora_file(model, family: str, layout: str, *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
              only: str | None = None) -> dict[str, torch.Tensor]:
    """A LoRA on every native module, keys spelled as ``layout`` writes them (alpha omitted when None)."""
    name, (dn, up) = PREFIX[layout]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for native, targets in native_modules(model, family, xlabs=layout == "xlabs", only=only).items():
        out, inner = shapes(model, targets)
        k = name(native)
        sd[f"{k}.{dn}"] = torch.randn(rank, *inner, generator=g) * 0.2
        sd[f"{k}.{up}"] = torch.randn(out, rank, *([1] * len(inner[1:])), generator=g) * 0.2
        if alpha is not None:
            sd[f"{k}.alpha"] = torch.tensor(float(alpha))
    return sd


def reference_weights(model, family: str, changes: dict, *, xlabs: bool = False) -> dict[str, torch.Tensor]:
    """The adapted weight of every diffusers module, from whole-matrix references of the native modules.

    ``changes[native]`` is a ΔW of the whole (stacked) native module, or a function W → W' on it. The native
    module's weight is its targets' weights stacked in row order; a target diffusers builds as
    AdaLayerNormContinuous holds (scale, shift) where the native module has (shift, scale), converted with
    diffusers' own ``swap_scale_shift``.
    """
    mods = dict(model.named_modules())
    table = native_modules(model, family, xlabs=xlabs)
    out = {}
    for native, change in changes.items():
        targets = table[native]
        ws, swapped = [], []
        for t in targets:
            w = mods[t].weight.detach()
            flip = type(mods[t.rpartition(".")[0]]).__name__ == "AdaLayerNormContinuous"
            ws.append(swap_scale_shift(w) if flip else w)
            swapped.append(flip)
        whole = torch.cat([w.flatten(1) for w in ws])
        new = change(whole) if callable(change) else whole + change.flatten(1)
        start = 0
        for t, w, flip in zip(targets, ws, swapped):
            part = new[start:start + w.shape[0]].reshape(w.shape)
            start += w.shape[0]
            out[t] = swap_scale_shift(part) if flip else part
        assert start == new.shape[0], native
    return out


def effective_weights(model) -> dict[str, torch.Tensor]:
    """Weights of every Linear/Conv, read through peft wrappers (fused LoRA lives in ``base_layer``)."""
    out = {}
    for name, m in model.named_modules():
        if {"base_layer", "lora_A", "lora_B", "lora_magnitude_vector"} & set(name.split(".")):
            continue
        base = getattr(m, "base_layer", m)
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            out[name] = base.weight.detach().clone()
    return out


def method_file(model, family: str, layout: str, method: str, *, only: str | None = None, seed: int = 0,
                lokr_c: int = 8, oft_block: int = 8):
    """(LyCORIS-style tensors on native names, {native: whole-matrix reference}) for one method.

    References come from LyCORIS' functional forms (``make_weight``, ``make_kron``, ``get_r``) or plain math
    on the whole native module — never from the split that is under test.
    """
    from lycoris.functional import diag_oft, lokr, loha

    name = PREFIX[layout][0]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    sd, changes = {}, {}
    for native, targets in native_modules(model, family, only=only).items():
        out, (inn,) = shapes(model, targets)
        k, r, alpha = name(native), 4, 2.0
        if method in ("lora", "dora"):
            down, up = rnd(r, inn), rnd(out, r)
            sd |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(alpha)}
            delta = alpha / r * up @ down
            if method == "lora":
                changes[native] = delta
            else:
                m = 1 + rnd(out, 1) * 0.1
                sd[f"{k}.dora_scale"] = m
                eps = torch.finfo(torch.float32).eps
                changes[native] = lambda w, d=delta, m=m, e=eps: m * (w + d) / ((w + d).norm(dim=1, keepdim=True) + e)
        elif method == "loha":
            t = {f"hada_w{i}_{ab}": rnd(*((out, r) if ab == "a" else (r, inn))) for i in (1, 2) for ab in "ab"}
            sd |= {f"{k}.{s}": v for s, v in t.items()} | {f"{k}.alpha": torch.tensor(alpha)}
            changes[native] = loha.make_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"],
                                               torch.tensor(alpha / r))
        elif method == "lokr":
            c = lokr_c(out) if callable(lokr_c) else lokr_c
            a, d, b = out // c, 8, inn // 8
            w1, w2a, w2b = rnd(a, b), rnd(c, r), rnd(r, d)
            sd |= {f"{k}.lokr_w1": w1, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b, f"{k}.alpha": torch.tensor(alpha)}
            changes[native] = lokr.make_kron(w1, w2a @ w2b, alpha / r)
        elif method == "full":
            diff = rnd(out, inn)
            sd |= {f"{k}.diff": diff}
            changes[native] = diff
        elif method == "oft":
            b = oft_block
            blocks = rnd(out // b, b, b)
            constraint = 1e-3  # small enough that LyCORIS' norm clamp acts
            sd |= {f"{k}.oft_blocks": blocks, f"{k}.alpha": torch.tensor(constraint)}
            rot = diag_oft.get_r(blocks, constraint=constraint * out)
            changes[native] = lambda w, rot=rot, b=b: torch.einsum(
                "knm,kn...->km...", rot, w.reshape(-1, b, w.shape[1])).reshape(w.shape)
        else:
            raise ValueError(method)
    return sd, changes
