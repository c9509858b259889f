"""A1111 extra-network prompt syntax: ``"a cat <lora:ink:0.8> <lora:film:0.5:0.3>"``.

Rules are those of AUTOMATIC1111's webui, so prompts copied from it mean the same thing here:

* a tag is ``<kind:arg:arg…>`` matched by ``<(\\w+):([^>]+)>``; its text is split on ``:``, so a name
  cannot contain ``:`` or ``>``. Every tag is removed from the prompt text, known or not
  (``modules/extra_networks.py``, ``parse_prompt``);
* an argument with exactly one ``=`` is named (``te=0.5``), anything else is positional (``ExtraNetworkParams``);
* ``lora`` and its alias ``lyco``: first positional is the name, then te multiplier (default 1),
  unet multiplier (default: te), dyn rank; named ``te=``, ``unet=``, ``dyn=`` override the positional ones
  (``extensions-builtin/Lora/extra_networks_lora.py``; ``lyco`` alias in ``scripts/lora_script.py``);
* a name mentioned twice is loaded twice by A1111, so its effects add: ``stack`` keeps every mention
  and :meth:`ParsedPrompt.weights` sums the multipliers of one name (identical for additive methods).

Beyond A1111: names and arguments are stripped of surrounding spaces, and the prompt left behind is tidied
(no runs of spaces, no empty ``, ,`` items, no dangling commas at either end).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import PromptError

__all__ = ["PromptError", "StackEntry", "ExtraNetwork", "ParsedPrompt", "parse", "tidy", "format_tag",
           "format_number", "LORA_KINDS"]

RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")
DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class StackEntry:
    """One ``<lora:…>`` mention: A1111's text-encoder and unet multipliers, and the dyn rank if given."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    kind: str = "lora"

    @property
    def weight(self) -> dict[str, float]:
        """The per-component weight for ``diffadapt.load``: te on every text encoder, unet on the denoiser."""
        return {**{c: self.unet for c in DENOISERS}, **{c: self.te for c in TEXT_ENCODERS}}

    def tag(self) -> str:
        return format_tag(self.name, self.te, self.unet, dyn=self.dyn, kind=self.kind)


@dataclass(frozen=True)
class ExtraNetwork:
    """A tag of another kind (``<hypernet:…>``, ``<ti:…>``): removed from the text, kept here."""

    kind: str
    args: tuple[str, ...]
    text: str


@dataclass
class ParsedPrompt:
    """The prompt without its tags, the LoRA stack in prompt order, and the other extra networks."""

    prompt: str
    stack: list[StackEntry] = field(default_factory=list)
    other: list[ExtraNetwork] = field(default_factory=list)

    def weights(self) -> dict[str, dict[str, float]]:
        """``{name: weight dict}`` in first-mention order; repeated names add up, as A1111 applies both."""
        out: dict[str, dict[str, float]] = {}
        for entry in self.stack:
            w = entry.weight
            if entry.name in out:
                w = {c: out[entry.name][c] + v for c, v in w.items()}
            out[entry.name] = w
        return out

    def names(self) -> list[str]:
        return list(dict.fromkeys(e.name for e in self.stack))


def _float(text: str, tag: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PromptError(f"{tag}: {what} multiplier '{text}' is not a number") from None
    if not math.isfinite(value):
        raise PromptError(f"{tag}: {what} multiplier '{text}' is not finite")
    return value


def _entry(kind: str, items: list[str], tag: str) -> StackEntry:
    """A1111's ``ExtraNetworkLora.activate`` argument rules for one tag."""
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items:
        parts = item.split("=", 2)  # exactly one '=' makes a named argument, as ExtraNetworkParams
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1].strip()
        else:
            positional.append(item.strip())
    if not positional or not positional[0]:
        raise PromptError(f"{tag}: no network name")
    te = _float(positional[1], tag, "te") if len(positional) > 1 else 1.0
    te = _float(named["te"], tag, "te") if "te" in named else te
    unet = _float(positional[2], tag, "unet") if len(positional) > 2 else te
    unet = _float(named["unet"], tag, "unet") if "unet" in named else unet
    dyn_text = named.get("dyn", positional[3] if len(positional) > 3 else None)
    try:
        dyn = int(dyn_text) if dyn_text is not None else None
    except ValueError:
        raise PromptError(f"{tag}: dyn '{dyn_text}' is not an integer") from None
    return StackEntry(positional[0], te=te, unet=unet, dyn=dyn, kind=kind)


def tidy(text: str) -> str:
    """Collapse the gaps a removed tag leaves: runs of spaces, empty comma items, dangling commas."""
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"[ \t]+", " ", line)
        line = re.sub(r"\s+,", ",", line)
        line = re.sub(r",(\s*,)+", ",", line)
        lines.append(line.strip(" ,"))
    return "\n".join(lines).strip()


def parse(prompt: str) -> ParsedPrompt:
    """Split a prompt into clean text, the ``<lora:…>``/``<lyco:…>`` stack and other extra networks."""
    stack: list[StackEntry] = []
    other: list[ExtraNetwork] = []

    def found(m: re.Match[str]) -> str:
        kind, items = m.group(1), m.group(2).split(":")
        if kind in LORA_KINDS:
            stack.append(_entry(kind, items, m.group(0)))
        else:
            other.append(ExtraNetwork(kind, tuple(items), m.group(0)))
        return ""

    text = RE_EXTRA_NET.sub(found, prompt)
    return ParsedPrompt(tidy(text), stack, other)


def format_number(x: float) -> str:
    """Shortest text that reads back to exactly ``x`` (``0.8``, ``1``, ``-0.25``)."""
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def format_tag(name: str, te: float = 1.0, unet: float | None = None, *, dyn: int | None = None,
               kind: str = "lora") -> str:
    """``<lora:name:w>`` when te == unet, else ``<lora:name:te:unet>``; ``parse`` reads it back exactly."""
    if not name or name != name.strip() or any(c in name for c in ":<>") or name.count("=") == 1:
        raise PromptError(f"'{name}' cannot be written as a tag name (empty, padded, or has ':', '<', '>', '=')")
    if not re.fullmatch(r"\w+", kind):
        raise PromptError(f"'{kind}' is not an extra-network kind")
    unet = te if unet is None else unet
    if not (math.isfinite(te) and math.isfinite(unet)):
        raise PromptError(f"<{kind}:{name}>: multipliers must be finite, got te={te}, unet={unet}")
    args = [name, format_number(te)]
    if unet != te or dyn is not None:
        args.append(format_number(unet))
    if dyn is not None:
        args.append(str(int(dyn)))
    return f"<{kind}:{':'.join(args)}>"
