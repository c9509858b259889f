"""DiT families' native module names (Flux, SD3/3.5, Wan, Qwen-Image) → diffusers names, table-driven.

Trainers name DiT modules after the original implementations, not diffusers: Flux's BFL code
(``double_blocks.0.img_attn.qkv``), SD3's MMDiT (``joint_blocks.0.x_block.attn.qkv``), Wan's
(``blocks.0.self_attn.q``). The same names appear flattened by kohya/sd-scripts and musubi-tuner
(``lora_unet_double_blocks_0_img_attn_qkv``), dotted under ComfyUI's ``diffusion_model.`` prefix, and in
XLabs' processor names (``double_blocks.0.processor.qkv_lora1``). One table per family lists each native
module once; its pattern matches every spelling ('.' or '_' between parts). A native module that diffusers
splits (fused q/k/v, Flux's single-block ``linear1``) maps to several modules: a :class:`~diffadapt.spec.Fused`.
Qwen-Image's native names are diffusers' own, so it needs only the prefixes. Wan's adaLN tables (``modulation``)
are bare ``scale_shift_table`` parameters in diffusers: only full diffs reach them (``pipeline.ParameterSite``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..spec import Fused, ModuleGroup

# ComfyUI / BFL dotted prefixes → component ("text_encoder_3" is the T5 slot: text_encoder_2 on Flux)
DOTTED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("diffusion_model.", "transformer"),
    ("model.diffusion_model.", "transformer"),
    ("text_encoders.clip_l.transformer.", "text_encoder"),
    ("text_encoders.clip_g.transformer.", "text_encoder_2"),
    ("text_encoders.t5xxl.transformer.", "text_encoder_3"),
)

FAMILY_NAMES = {"flux": "Flux", "sd3": "SD3", "wan": "Wan", "qwen": "Qwen-Image"}
# model classes (the denoiser's) → family
MODEL_CLASSES = {
    "FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3", "WanTransformer3DModel": "wan",
    "WanVACETransformer3DModel": "wan", "QwenImageTransformer2DModel": "qwen",
}


@dataclass(frozen=True)
class Rule:
    native: str  # native module path, '{i}' for the block index
    targets: tuple[str, ...]  # diffusers module paths in row order; several = a fused module
    modulation: bool = False  # an adaLN modulation (may need its halves exchanged, see Fused)


def R(native: str, *targets: str, modulation: bool = False) -> Rule:
    return Rule(native, targets, modulation)


def _qkv(prefix: str, names=("to_q", "to_k", "to_v")) -> tuple[str, ...]:
    return tuple(f"{prefix}.{n}" for n in names)


_D, _S = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
_ADD = ("add_q_proj", "add_k_proj", "add_v_proj")

FLUX: tuple[Rule, ...] = (
    R("double_blocks.{i}.img_attn.qkv", *_qkv(f"{_D}.attn")),
    R("double_blocks.{i}.img_attn.proj", f"{_D}.attn.to_out.0"),
    R("double_blocks.{i}.img_mlp.0", f"{_D}.ff.net.0.proj"),
    R("double_blocks.{i}.img_mlp.2", f"{_D}.ff.net.2"),
    R("double_blocks.{i}.img_mod.lin", f"{_D}.norm1.linear", modulation=True),
    R("double_blocks.{i}.txt_attn.qkv", *_qkv(f"{_D}.attn", _ADD)),
    R("double_blocks.{i}.txt_attn.proj", f"{_D}.attn.to_add_out"),
    R("double_blocks.{i}.txt_mlp.0", f"{_D}.ff_context.net.0.proj"),
    R("double_blocks.{i}.txt_mlp.2", f"{_D}.ff_context.net.2"),
    R("double_blocks.{i}.txt_mod.lin", f"{_D}.norm1_context.linear", modulation=True),
    R("single_blocks.{i}.linear1", *_qkv(f"{_S}.attn"), f"{_S}.proj_mlp"),
    R("single_blocks.{i}.linear2", f"{_S}.proj_out"),
    R("single_blocks.{i}.modulation.lin", f"{_S}.norm.linear", modulation=True),
    # q/k RMSNorm scales (BFL's '.scale'): full diffs only
    R("double_blocks.{i}.img_attn.norm.query_norm", f"{_D}.attn.norm_q"),
    R("double_blocks.{i}.img_attn.norm.key_norm", f"{_D}.attn.norm_k"),
    R("double_blocks.{i}.txt_attn.norm.query_norm", f"{_D}.attn.norm_added_q"),
    R("double_blocks.{i}.txt_attn.norm.key_norm", f"{_D}.attn.norm_added_k"),
    R("single_blocks.{i}.norm.query_norm", f"{_S}.attn.norm_q"),
    R("single_blocks.{i}.norm.key_norm", f"{_S}.attn.norm_k"),
    R("img_in", "x_embedder"),
    R("txt_in", "context_embedder"),
    R("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    R("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    R("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    R("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    R("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    R("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    R("final_layer.linear", "proj_out"),
    R("final_layer.adaLN_modulation.1", "norm_out.linear", modulation=True),
    # XLabs: LoRA on the attention projections, named after their processors
    R("double_blocks.{i}.processor.qkv_lora1", *_qkv(f"{_D}.attn")),
    R("double_blocks.{i}.processor.proj_lora1", f"{_D}.attn.to_out.0"),
    R("double_blocks.{i}.processor.qkv_lora2", *_qkv(f"{_D}.attn", _ADD)),
    R("double_blocks.{i}.processor.proj_lora2", f"{_D}.attn.to_add_out"),
    R("single_blocks.{i}.processor.qkv_lora", *_qkv(f"{_S}.attn")),
    R("single_blocks.{i}.processor.proj_lora", f"{_S}.proj_out"),  # on linear2's input (attention ‖ MLP)
)

_J, _X, _C = "transformer_blocks.{i}", "joint_blocks.{i}.x_block", "joint_blocks.{i}.context_block"
SD3: tuple[Rule, ...] = (
    R(f"{_X}.attn.qkv", *_qkv(f"{_J}.attn")),
    R(f"{_X}.attn.proj", f"{_J}.attn.to_out.0"),
    R(f"{_X}.attn2.qkv", *_qkv(f"{_J}.attn2")),
    R(f"{_X}.attn2.proj", f"{_J}.attn2.to_out.0"),
    R(f"{_X}.mlp.fc1", f"{_J}.ff.net.0.proj"),
    R(f"{_X}.mlp.fc2", f"{_J}.ff.net.2"),
    R(f"{_X}.adaLN_modulation.1", f"{_J}.norm1.linear", modulation=True),
    R(f"{_C}.attn.qkv", *_qkv(f"{_J}.attn", _ADD)),
    R(f"{_C}.attn.proj", f"{_J}.attn.to_add_out"),
    R(f"{_C}.mlp.fc1", f"{_J}.ff_context.net.0.proj"),
    R(f"{_C}.mlp.fc2", f"{_J}.ff_context.net.2"),
    R(f"{_C}.adaLN_modulation.1", f"{_J}.norm1_context.linear", modulation=True),
    # SD3.5 q/k RMSNorm scales: full diffs only
    R(f"{_X}.attn.ln_q", f"{_J}.attn.norm_q"),
    R(f"{_X}.attn.ln_k", f"{_J}.attn.norm_k"),
    R(f"{_X}.attn2.ln_q", f"{_J}.attn2.norm_q"),
    R(f"{_X}.attn2.ln_k", f"{_J}.attn2.norm_k"),
    R(f"{_C}.attn.ln_q", f"{_J}.attn.norm_added_q"),
    R(f"{_C}.attn.ln_k", f"{_J}.attn.norm_added_k"),
    R("x_embedder.proj", "pos_embed.proj"),
    R("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    R("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    R("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    R("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    R("context_embedder", "context_embedder"),
    R("final_layer.linear", "proj_out"),
    R("final_layer.adaLN_modulation.1", "norm_out.linear", modulation=True),
)

def _wan_block(b: str) -> tuple[Rule, ...]:
    """One Wan block's modules under its path ``b`` (``blocks.{i}``; VACE's ``vace_blocks.{i}`` too)."""
    qkvo = tuple(zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0")))
    return (
        *(R(f"{b}.self_attn.{o}", f"{b}.attn1.{d}") for o, d in qkvo),
        *(R(f"{b}.cross_attn.{o}", f"{b}.attn2.{d}") for o, d in qkvo),
        R(f"{b}.cross_attn.k_img", f"{b}.attn2.add_k_proj"),  # i2v: the image tokens' keys and values
        R(f"{b}.cross_attn.v_img", f"{b}.attn2.add_v_proj"),
        *(R(f"{b}.{a}.norm_{n}", f"{b}.attn{i}.norm_{n}") for a, i in (("self_attn", 1), ("cross_attn", 2))
          for n in "qk"),
        R(f"{b}.cross_attn.norm_k_img", f"{b}.attn2.norm_added_k"),
        R(f"{b}.norm3", f"{b}.norm2"),  # the cross-attention norm (Wan's norm1/norm2 have no scale)
        R(f"{b}.ffn.0", f"{b}.ffn.net.0.proj"),
        R(f"{b}.ffn.2", f"{b}.ffn.net.2"),
        # the adaLN table: a parameter of no module in diffusers (``scale_shift_table``), adapted by full diffs
        R(f"{b}.modulation", f"{b}.scale_shift_table"),
    )


WAN: tuple[Rule, ...] = (
    *_wan_block("blocks.{i}"),
    *_wan_block("vace_blocks.{i}"),
    R("vace_blocks.{i}.before_proj", "vace_blocks.{i}.proj_in"),
    R("vace_blocks.{i}.after_proj", "vace_blocks.{i}.proj_out"),
    R("vace_patch_embedding", "vace_patch_embedding"),
    R("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    R("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    R("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    R("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    R("time_projection.1", "condition_embedder.time_proj"),
    R("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),  # i2v image embedder: LayerNorm,
    R("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),  # Linear, GELU, Linear, LayerNorm
    R("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    R("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    R("head.modulation", "scale_shift_table"),
    R("head.head", "proj_out"),
    R("patch_embedding", "patch_embedding"),
)

TABLES: dict[str, tuple[Rule, ...]] = {"flux": FLUX, "sd3": SD3, "wan": WAN, "qwen": ()}

# names only one family's files use (native or diffusers spelling, '.' or '_')
_SIGNS: tuple[tuple[str, re.Pattern], ...] = (
    ("flux", re.compile(r"(^|[._])(double_blocks|single_blocks)[._]\d+[._]")),
    ("sd3", re.compile(r"(^|[._])joint_blocks[._]\d+[._](x_block|context_block)")),
    ("wan", re.compile(r"(^|[._])(blocks[._]\d+[._](self_attn|cross_attn|ffn)[._]|blocks[._]\d+[._]modulation$"
                       r"|img_emb[._]proj[._]\d$|head[._](head|modulation)$)")),
    ("qwen", re.compile(r"(^|[._])transformer_blocks[._]\d+[._](img_mod|txt_mod|img_mlp|txt_mlp)[._]")),
)


# ComfyUI-format Wan distillation files name the modulation delta of a block 'blocks.0.diff_m'
_DIFF_M = re.compile(r"([._])diff_m$")


def rewrite_key(key: str) -> str:
    """``<block>.diff_m`` (a delta on the block's adaLN ``modulation`` table) → ``<block>.modulation.diff``."""
    m = _DIFF_M.search(key)
    if m is None:
        return key
    sep = "." if "." in key[: m.start()] else "_"
    return f"{key[: m.start()]}{sep}modulation.diff"


def _compile(template: str) -> re.Pattern:
    parts = [re.escape(p).replace(r"\{i\}", r"(\d+)") for p in template.split(".")]
    return re.compile("^" + "[._]".join(parts) + "$")


_COMPILED: dict[str, list[tuple[re.Pattern, Rule]]] = {
    fam: [(_compile(r.native), r) for r in rules] for fam, rules in TABLES.items()
}


def family_of_keys(keys) -> str | None:
    """The DiT family whose distinctive module names the keys use, or None."""
    for key in keys:
        for fam, sign in _SIGNS:
            if sign.search(key):
                return fam
    return None


def family_of_model(model) -> str | None:
    return MODEL_CLASSES.get(type(getattr(model, "_orig_mod", model)).__name__)


def split_dotted_prefix(module: str) -> tuple[str, str] | None:
    for prefix, component in DOTTED_PREFIXES:
        if module.startswith(prefix):
            return component, module[len(prefix):]
    return None


def match(family: str, module_key: str) -> tuple[Rule, str] | None:
    """The table rule a native module name matches, and its block index ('' without one)."""
    for pattern, rule in _COMPILED.get(family, ()):
        m = pattern.match(module_key)
        if m:
            return rule, (m[1] if m.groups() else "")
    return None


def layout_name(family: str, groups: list[ModuleGroup], original_keys: list[str]) -> str:
    """How the file spells module names, in the words its users know ("Flux kohya", "Wan ComfyUI" …)."""
    fam = FAMILY_NAMES[family]
    keys = original_keys
    trainer = "musubi-tuner" if family in ("wan", "qwen") else "kohya"
    if any(".processor." in k for k in keys):
        style = "XLabs"
    elif any(k.startswith(("diffusion_model.", "model.diffusion_model.", "text_encoders.")) for k in keys):
        style = "ComfyUI/BFL" if family == "flux" else "ComfyUI"
    elif any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        style = trainer
    elif any(k.startswith(("lycoris_",)) for k in keys):
        style = "LyCORIS"
    elif all(g.dotted for g in groups):  # dotted, unprefixed: diffusers names, or the family's own (native) ones
        style = "native" if family != "qwen" and any(match(family, g.module_key) for g in groups) else "diffusers"
    else:
        style = trainer
    methods = {s for g in groups for s in g.tensors}
    lycoris = {"hada_w1_a", "lokr_w1", "lokr_w1_a", "oft_blocks", "lokr_w2"} | ({"diff"} if family != "wan" else set())
    if style in ("kohya", "ComfyUI/BFL", "ComfyUI") and methods & lycoris:  # Wan's ComfyUI files write diffs
        style += " (LyCORIS)"
    return f"{fam} {style}"


def native_kohya_names(patches: list) -> dict[int, str] | None:
    """sd-scripts / musubi-tuner module names (``double_blocks_0_img_attn_qkv``) for every denoiser patch, by
    ``id(patch)``, when all of them were read from native names (XLabs processor names have none); else None."""
    out = {}
    for p in patches:
        if p.component in ("transformer", "unet", "*"):
            if p.native is None or ".processor." in p.native:
                return None
            out[id(p)] = p.native.replace(".", "_")
    return out or None


def translate(groups: list[ModuleGroup], family: str) -> int:
    """Rewrite native module names of ``family`` to diffusers names in place; returns how many matched."""
    n = 0
    for g in groups:
        if g.component not in ("transformer", "unet", "*"):
            continue
        hit = match(family, g.module_key)
        if hit is None:
            continue
        rule, i = hit
        targets = tuple(t.replace("{i}", i) for t in rule.targets)
        g.native = rule.native.replace("{i}", i)
        g.component, g.dotted = "transformer", True
        if len(targets) > 1 or rule.modulation:
            g.module_key = targets[0]
            g.fused = Fused(modules=targets, native_modulation=rule.modulation)
        else:
            g.module_key = targets[0]
        n += 1
    return n


def translate_patches(patches: list, family: str) -> list:
    """Native names of ``family`` in already-built patches (when only the model tells the family: a file whose
    keys are all shared by several families, e.g. ``lora_unet_final_layer_linear``)."""
    import dataclasses

    out = []
    for p in patches:
        hit = match(family, p.module_key) if p.component in ("transformer", "unet", "*") and p.fused is None else None
        if hit is None:
            out.append(p)
            continue
        rule, i = hit
        targets = tuple(t.replace("{i}", i) for t in rule.targets)
        fused = Fused(modules=targets, native_modulation=rule.modulation) if len(targets) > 1 or rule.modulation \
            else None
        out.append(dataclasses.replace(p, component="transformer", module_key=targets[0], dotted=True, fused=fused,
                                       native=rule.native.replace("{i}", i)))
    return out
