"""Summaries of adapters: what ``da.inspect`` and ``da.adapters`` return."""

from __future__ import annotations

import json
import re
from collections import Counter

import torch

from .spec import AdapterInfo, AdapterSpec

_DIT = re.compile(r"single_transformer_blocks|context_embedder|x_embedder|add_k_proj|ff_context|joint_blocks|double_blocks"
                  r"|final_layer|adaLN_modulation|(^|_)(txt_in|img_in)")
_SDXL = re.compile(r"^(input_blocks|output_blocks|middle_block|label_emb)|add_embedding")
_CROSS_K = re.compile(r"attn2[._]to_k$")


def guess_family(spec: AdapterSpec) -> str:
    """sd1 | sd2 | sdxl | flux | sd3 | wan | qwen | dit (a DiT the names do not tell) | unknown: the family the
    key names identify (``keys/dit.py``), else component names, block names and tensor widths."""
    if spec.family:
        return spec.family
    comps = {p.component for p in spec.patches}
    keys = [p.module_key for p in spec.patches]
    if "transformer" in comps or any(_DIT.search(k) for k in keys):
        return "dit"
    if "text_encoder_2" in comps or any(_SDXL.search(k) for k in keys):
        return "sdxl"
    widths = Counter(
        int(p.params.down.shape[1]) for p in spec.patches
        if _CROSS_K.search(p.module_key) and isinstance(getattr(p.params, "down", None), torch.Tensor)
    )
    known = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
    if widths and widths.most_common(1)[0][0] in known:
        return known[widths.most_common(1)[0][0]]
    if "unet" in comps or "text_encoder" in comps:
        return "sd1"
    return "unknown"


def trigger_words(metadata: dict[str, str], *, limit: int = 8) -> list[str]:
    """Trigger words from modelspec / kohya metadata: the declared phrase, else the most frequent tags."""
    words: list[str] = []
    for field in ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_words"):
        if metadata.get(field):
            words += [w.strip() for w in re.split(r"[,\n]", metadata[field]) if w.strip()]
    raw = metadata.get("ss_tag_frequency")
    if raw:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # malformed, 5000-digit numbers, nested 100k deep: no tags
            data = {}
        counts: Counter[str] = Counter()
        for tags in data.values() if isinstance(data, dict) else ():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)):
                        counts[tag.strip()] += n
        words += [t for t, _ in counts.most_common(limit) if t]
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)[:limit]


def summarize(spec: AdapterSpec, *, name: str | None = None) -> AdapterInfo:
    patches = spec.patches
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for p in patches for t in p.params.tensors().values())
    return AdapterInfo(
        name=name,
        source=spec.source,
        format=spec.fmt,
        methods=dict(Counter(p.method for p in patches)),
        components=dict(Counter(p.component for p in patches)),
        modules=len(patches),
        ranks=dict(sorted(Counter(p.params.rank for p in patches if p.params.rank is not None).items())),
        alphas=dict(sorted(Counter(round(p.params.alpha, 6) for p in patches if p.params.alpha is not None).items())),
        params=sum(p.params.numel() for p in patches),
        dtype=dtypes.most_common(1)[0][0] if dtypes else "-",
        base_family=guess_family(spec),
        trigger_words=trigger_words(spec.metadata),
        metadata=dict(spec.metadata),
        layout=spec.layout,
    )
