"""Command line: ``diffadapt inspect FILE…``, ``diffadapt convert SRC DEST --format kohya|peft``,
``diffadapt generate --prompt … --adapter FILE:W``, ``diffadapt merge A:W B:W --out M``, ``diffadapt studio``,
``diffadapt train …`` (diffusers' DreamBooth flags)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from . import api, conversion, io
from .errors import DiffAdaptError, SourceError
from .models import SAMPLERS as _SAMPLERS
from .models import load_model as _load_model


# --------------------------------------------------------------------------- option types


def _int_at_least(low: int, *, multiple: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        if value % multiple:
            raise argparse.ArgumentTypeError(f"{value} is not a multiple of {multiple}")
        return value
    parse.__name__ = "integer"
    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not finite")
    return value


def _fraction(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]: the fraction of values kept")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (exit 2), like every other user error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _check_writable(path: Path, force: bool) -> None:
    if (path.exists() or path.is_symlink()) and not force:
        raise DiffAdaptError(f"{path}: already exists; pass --force to replace it")


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DiffAdaptError(f"--device {name}: not a device (cpu, cuda, cuda:1, mps, …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffAdaptError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DiffAdaptError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DiffAdaptError(f"--device {name}: MPS is not available on this machine")
    return name


def _inspect(args: argparse.Namespace) -> int:
    """Every source is summarised; one that cannot be read is reported (one line) and the rest still are."""
    failed = 0
    for source in args.sources:
        try:
            info = api.inspect(source, allow_pickle=args.allow_pickle)
        except DiffAdaptError as e:
            print(f"diffadapt: error: {_one_line(e)}", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            data = asdict(info)
            if not args.metadata:
                data.pop("metadata")
            print(json.dumps(data, indent=2, default=str))
        else:
            print(info.summary())
            if args.metadata and info.metadata:
                for k, v in sorted(info.metadata.items()):
                    print(f"  {k}: {v if len(v) < 200 else v[:200] + '…'}")
        if len(args.sources) > 1:
            print()
    return 2 if failed else 0


# --------------------------------------------------------------------------- generate

def _adapter_arg(spec: str) -> tuple[Path, float, float]:
    """``FILE``, ``FILE:W`` or ``FILE:TE:UNET`` as A1111 tags; multipliers come off the right, so paths may hold ':'."""
    parts, nums = spec.split(":"), []
    while not Path(spec).exists() and len(parts) > 1 and len(nums) < 2:
        try:
            nums.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = Path(":".join(parts))
    if not path.exists():
        raise SourceError(f"adapter file not found: '{path}' (from --adapter {spec})")
    te = nums[0] if nums else 1.0
    return path, te, nums[1] if len(nums) > 1 else te


def _adapter_name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def _generate(args: argparse.Namespace) -> int:
    import torch

    from . import infotext
    from .prompt import StackEntry, parse

    out = Path(args.out)
    _check_writable(out, args.force)  # before any work
    parsed = parse(args.prompt)
    for other in parsed.other:
        print(f"diffadapt: warning: ignoring {other.text} (only <lora:…>, <lyco:…> are loaded)", file=sys.stderr)
    given: dict[str, tuple[Path, dict[str, float]]] = {}
    for spec in args.adapter:
        path, te, unet = _adapter_arg(spec)
        name = _adapter_name(path)
        if name in given:
            raise DiffAdaptError(f"two --adapter files are named '{name}'")
        entry = StackEntry(name, te=te, unet=unet)
        entry.tag()  # a name that cannot be written back into the infotext fails here, before generating
        given[name] = (path, entry.weight)
    plan: dict[str, tuple[Path, dict[str, float]]] = {}
    for name, weight in parsed.weights().items():  # a prompt tag's multipliers win over --adapter's
        found = given[name][0] if name in given else None
        if found is None and args.lora_dir is not None:
            found = next((p for p in (Path(args.lora_dir) / f"{name}.safetensors", Path(args.lora_dir) / name)
                          if p.exists()), None)
        if found is None:
            where = f" nor in --lora-dir '{args.lora_dir}'" if args.lora_dir else " (use --adapter or --lora-dir)"
            raise SourceError(f"the prompt mentions <lora:{name}> but no --adapter file is named '{name}'{where}")
        plan[name] = (found, weight)
    for name, entry in given.items():
        plan.setdefault(name, entry)

    device = _device(args.device)
    pipe, model_name, model_hash = _load_model(args.model, device)
    refs = []
    for name, (path, weight) in plan.items():
        api.load(pipe, str(path), name, weight=weight)
        digest = infotext.adapter_hash(path) if path.is_file() else None
        refs.append(infotext.AdapterRef(name, digest, weight["text_encoder"], weight["unet"]))

    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    native = 64 if args.model is None else int(denoiser.config.sample_size * pipe.vae_scale_factor)
    width, height = args.width or native, args.height or native
    steps = args.steps or (4 if args.model is None else 20)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    with torch.no_grad():
        image = pipe(parsed.prompt, negative_prompt=args.negative_prompt or None, num_inference_steps=steps,
                     guidance_scale=args.cfg, width=width, height=height, generator=generator,
                     output_type="np").images[0]
    scheduler = type(pipe.scheduler).__name__
    text = infotext.write(
        prompt=args.prompt, negative_prompt=args.negative_prompt, steps=steps,
        sampler=_SAMPLERS.get(scheduler, scheduler),
        schedule_type="Karras" if pipe.scheduler.config.get("use_karras_sigmas") else None, cfg_scale=args.cfg,
        seed=args.seed, width=width, height=height, model=model_name, model_hash=model_hash, adapters=refs,
    )
    with io.staged(out) as tmp:  # never a half-written PNG at --out
        infotext.save_png(image, tmp, text)
    print(out)
    return 0


# --------------------------------------------------------------------------- convert


def _convert(args: argparse.Namespace) -> int:
    model = args.model
    if model is not None and model not in conversion.BUILT_IN:
        model = _load_model(model, "cpu")[0]  # a diffusers folder / hub id / single file: its module names
    for path in conversion.convert(args.source, args.dest, format=args.to, dtype=args.dtype, exclude=args.exclude,
                            model=model, allow_pickle=args.allow_pickle, overwrite=args.force):
        print(path)
    return 0


# --------------------------------------------------------------------------- merge


def _merge(args: argparse.Namespace) -> int:
    from .merge import merge_files

    sources: dict[str, float] = {}
    for item in args.sources:
        path, sep, weight = item.rpartition(":")
        try:
            sources[path if sep else item] = float(weight) if sep else 1.0
        except ValueError:
            sources[item] = 1.0  # a ':' inside the path itself
    model = args.model
    if model is not None and model not in conversion.BUILT_IN:
        model = _load_model(model, "cpu")[0]
    if args.rank is not None and args.method in ("cat", "linear"):
        raise DiffAdaptError(f"--rank applies to svd, ties and dare, not {args.method}")
    paths, error = merge_files(sources, args.out, method=args.method, rank=args.rank, density=args.density,
                               seed=args.seed, to=args.to, dtype=args.dtype, model=model, overwrite=args.force)
    for path in paths:
        print(path)
    print(f"relative approximation error: {error:.4g}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- studio


def _studio(args: argparse.Namespace) -> int:
    from .studio.launch import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffadapt", description="Load, inspect and convert diffusion adapters.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("inspect", help="summarise adapter files, folders or hub ids")
    p.add_argument("sources", nargs="+")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--metadata", action="store_true", help="also print the file's metadata")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt/.ckpt files (runs pickle)")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("generate", help="generate an image with adapters; writes a PNG with A1111 infotext")
    p.add_argument("--prompt", required=True, help="may hold A1111 tags: <lora:NAME:W> or <lora:NAME:TE:UNET>")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--adapter", action="append", default=[], metavar="FILE[:W|:TE:UNET]",
                   help="adapter file or folder with A1111 multipliers (a prompt tag of its name wins); repeatable")
    p.add_argument("--lora-dir", help="where <lora:NAME> tags not given by --adapter are found (DIR/NAME.safetensors)")
    p.add_argument("--model", help="diffusers folder, hub id or .safetensors/.ckpt file (default: tiny test model)")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--steps", type=_int_at_least(1), help="default 4 on the tiny model, else 20")
    p.add_argument("--cfg", type=_finite_float, default=7.0, help="guidance (CFG) scale")
    p.add_argument("--width", type=_int_at_least(8, multiple=8),
                   help="a multiple of 8; default: the model's native size (64 on the tiny model)")
    p.add_argument("--height", type=_int_at_least(8, multiple=8), help="a multiple of 8")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--out", default="out.png")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_generate)
    p = sub.add_parser("convert", help="convert an adapter between kohya/LyCORIS and PEFT formats")
    p.add_argument("source", help="adapter file, folder or hub id")
    p.add_argument("dest", help="kohya: a .safetensors file; peft: a folder (one per component) or a .safetensors file")
    p.add_argument("--format", "--to", dest="to", required=True, choices=["kohya", "peft"])
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="cast the tensors (default: keep)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="drop modules matching these shell patterns, e.g. 'text_encoder*' '*down_blocks_0_*'")
    p.add_argument("--model", help="sd1 | sdxl | flux | sd3 (built-in module trees) | diffusers folder or hub id, "
                                    "to resolve kohya names for PEFT output (default: the file's guessed family)")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt/.ckpt files (runs pickle)")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p.set_defaults(func=_convert)
    p = sub.add_parser("merge", help="merge adapter files (any methods) into one LoRA file")
    p.add_argument("sources", nargs="+", metavar="FILE[:W]", help="adapter files with weights (default 1)")
    p.add_argument("--out", required=True, help="the merged file (kohya) or folder/.safetensors (peft)")
    p.add_argument("--method", default="svd", choices=["cat", "svd", "linear", "ties", "dare"])
    p.add_argument("--rank", type=_int_at_least(1),
                   help="target rank for svd/ties/dare (default: the sources' ranks added up)")
    p.add_argument("--density", type=_fraction, default=0.5, help="ties/dare: fraction of values kept, in (0, 1]")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="dare's random pruning seed")
    p.add_argument("--format", "--to", dest="to", default="kohya", choices=["kohya", "peft"])
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--model", help="sd1 | sdxl | flux | sd3 (built-in module trees) | diffusers folder or hub id "
                   "(default: the first file's guessed family)")
    p.add_argument("--force", action="store_true", help="replace the output if it exists")
    p.set_defaults(func=_merge)
    from .studio.launch import add_arguments as studio_arguments

    p = sub.add_parser("studio", help="Gradio studio to stack adapter styles, with an HTTP API")
    studio_arguments(p).set_defaults(func=_studio)
    sub.add_parser("train", add_help=False,
                   help="DreamBooth-train a LoRA/LoHa/LoKr/OFT/WaveFT adapter (diffadapt train --help for its options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["train"]:  # its own options (diffusers' DreamBooth flags), parsed by diffadapt.train
            from .train import main as train_main

            try:
                return train_main(argv[1:])
            except SystemExit as e:  # its usage errors and --help: the code, for callers
                return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # a usage error: its code for callers (--help still exits as argparse does)
            if e.code in (0, None):
                raise
            return e.code if isinstance(e.code, int) else 2
        return args.func(args)
    except DiffAdaptError as e:
        print(f"diffadapt: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffadapt: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 2000 else text[:2000] + "…"


if __name__ == "__main__":
    sys.exit(main())
