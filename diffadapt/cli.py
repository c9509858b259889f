"""Command line: ``diffadapt inspect FILE…``, ``diffadapt convert SRC DEST --format kohya|peft``,
``diffadapt generate --prompt … --adapter FILE:W``, ``diffadapt merge A:W B:W --out M``, ``diffadapt studio``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from . import api, conversion
from .errors import DiffAdaptError, SourceError


def _inspect(args: argparse.Namespace) -> int:
    for source in args.sources:
        info = api.inspect(source, allow_pickle=args.allow_pickle)
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
    return 0


# --------------------------------------------------------------------------- generate

TINY_MODEL = "diffadapt-tiny-sd1"
_SAMPLERS = {  # diffusers scheduler class -> A1111 sampler name, for the infotext
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a", "DDIMScheduler": "DDIM",
    "DPMSolverMultistepScheduler": "DPM++ 2M", "PNDMScheduler": "PLMS", "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun", "UniPCMultistepScheduler": "UniPC", "FlowMatchEulerDiscreteScheduler": "Euler",
}


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


def _load_model(model: str | None, device: str):
    """(pipeline, model name, model hash) — the embedded tiny SD1 pipeline when no model is given."""
    import torch

    if model is None:
        from .testing import tiny_sd1_pipeline

        return tiny_sd1_pipeline(device=device), TINY_MODEL, None
    import diffusers

    kw = {"torch_dtype": torch.float16} if device.startswith("cuda") else {}
    try:
        if model.lower().endswith((".safetensors", ".ckpt")):
            from safetensors import safe_open

            from .infotext import adapter_hash

            sdxl = False
            if model.lower().endswith(".safetensors"):
                with safe_open(model, "pt") as f:
                    sdxl = any(k.startswith("conditioner.embedders.1.") for k in f.keys())
            cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
            pipe = cls.from_single_file(model, **kw)
            name, digest = Path(model).stem, adapter_hash(model, full_file=True, length=10)
        else:  # local folder or hub id; HF_HUB_OFFLINE=1 keeps it to the cache
            pipe = diffusers.DiffusionPipeline.from_pretrained(model, **kw)
            name, digest = Path(model).name if Path(model).exists() else model, None
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot load model '{model}': {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), name, digest


def _generate(args: argparse.Namespace) -> int:
    import torch

    from . import infotext
    from .prompt import StackEntry, parse

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

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    print(infotext.save_png(image, args.out, text))
    return 0


# --------------------------------------------------------------------------- convert


def _convert(args: argparse.Namespace) -> int:
    model = args.model
    if model is not None and model not in ("sd1", "sdxl"):
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
    if model is not None and model not in ("sd1", "sdxl"):
        model = _load_model(model, "cpu")[0]
    paths, error = merge_files(sources, args.out, method=args.method, rank=args.rank, density=args.density,
                               seed=args.seed, to=args.to, dtype=args.dtype, model=model, overwrite=args.force)
    for path in paths:
        print(path)
    print(f"relative approximation error: {error:.4g}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- studio


def _studio(argv: list[str]) -> int:
    """Run ``ui/studio.py`` of the source checkout; the Gradio app is not part of the installed package."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "ui" / "studio.py").is_file():
        raise SourceError(f"the studio is run from a source checkout (no ui/studio.py under {root})")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from ui.studio import main as studio_main

    return studio_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffadapt", description="Load, inspect and convert diffusion adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="default 4 on the tiny model, else 20")
    p.add_argument("--cfg", type=float, default=7.0, help="guidance (CFG) scale")
    p.add_argument("--width", type=int, help="default: the model's native size (64 on the tiny model)")
    p.add_argument("--height", type=int)
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--out", default="out.png")
    p.set_defaults(func=_generate)
    p = sub.add_parser("convert", help="convert an adapter between kohya/LyCORIS and PEFT formats")
    p.add_argument("source", help="adapter file, folder or hub id")
    p.add_argument("dest", help="kohya: a .safetensors file; peft: a folder (one per component) or a .safetensors file")
    p.add_argument("--format", "--to", dest="to", required=True, choices=["kohya", "peft"])
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="cast the tensors (default: keep)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="drop modules matching these shell patterns, e.g. 'text_encoder*' '*down_blocks_0_*'")
    p.add_argument("--model", help="sd1 | sdxl | diffusers folder or hub id, to resolve kohya names for PEFT "
                                    "output (default: the file's guessed family)")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt/.ckpt files (runs pickle)")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p.set_defaults(func=_convert)
    p = sub.add_parser("merge", help="merge adapter files (any methods) into one LoRA file")
    p.add_argument("sources", nargs="+", metavar="FILE[:W]", help="adapter files with weights (default 1)")
    p.add_argument("--out", required=True, help="the merged file (kohya) or folder/.safetensors (peft)")
    p.add_argument("--method", default="svd", choices=["cat", "svd", "linear", "ties", "dare"])
    p.add_argument("--rank", type=int, help="target rank for svd/ties/dare (default: the sources' ranks added up)")
    p.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction of values kept")
    p.add_argument("--seed", type=int, default=0, help="dare's random pruning seed")
    p.add_argument("--format", "--to", dest="to", default="kohya", choices=["kohya", "peft"])
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--model", help="sd1 | sdxl | diffusers folder (default: the first file's guessed family)")
    p.add_argument("--force", action="store_true", help="replace the output if it exists")
    p.set_defaults(func=_merge)
    sub.add_parser("studio", add_help=False,
                   help="Gradio studio to stack adapter styles (diffadapt studio --help for its options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["studio"]:  # its own options, parsed by ui/studio.py
            return _studio(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except DiffAdaptError as e:
        print(f"diffadapt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
