"""``diffadapt studio``: command-line options and start-up (Gradio is imported only when it starts)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="diffusers folder, hub id or .safetensors/.ckpt checkpoint")
    parser.add_argument("--adapters", help="the adapter folder: read, and written by uploads and merges "
                                           "(default ./adapters; with --demo a new temporary folder)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--demo", action="store_true",
                        help="run on the embedded tiny random pipeline with three demo adapters (no downloads)")
    return parser


def parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="diffadapt studio", description="Gradio studio to stack "
                                                 "adapter styles, with an HTTP API (see 'Use via API')."))


def run(args: argparse.Namespace) -> int:
    from ..errors import DiffAdaptError

    if not args.demo and args.model is None:
        raise DiffAdaptError("diffadapt studio: give --model DIR (and --adapters DIR), or --demo for the tiny demo")
    if args.demo:
        from .demo import demo_studio

        studio = demo_studio(args.adapters)
    else:
        import torch

        from ..models import load_model
        from .core import Studio

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe, name, digest = load_model(args.model, device)
        studio = Studio(pipe, adapter_dir=args.adapters or "adapters", model_name=name, model_hash=digest)
    from .app import CSS, build_app

    print(f"diffadapt studio: adapters in {studio.adapter_dir}", file=sys.stderr)
    build_app(studio).queue().launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parser().parse_args(argv))
