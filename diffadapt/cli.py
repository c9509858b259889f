"""Command line: ``diffadapt inspect FILE…``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from . import api
from .errors import DiffAdaptError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffadapt", description="Load, inspect and convert diffusion adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise adapter files, folders or hub ids")
    p.add_argument("sources", nargs="+")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--metadata", action="store_true", help="also print the file's metadata")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt/.ckpt files (runs pickle)")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DiffAdaptError as e:
        print(f"diffadapt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
