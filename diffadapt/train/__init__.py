"""DreamBooth adapter training: ``diffadapt train …`` or ``python training/train_dreambooth.py …``.

Takes diffusers' DreamBooth flags; trains LoRA, LoHa, LoKr, OFT or WaveFT on SD1/SD2, SDXL, SD3 or Flux
model folders with accelerate (one GPU, DDP, FSDP or DeepSpeed); writes diffusers', kohya's and PEFT's files.
"""

from __future__ import annotations

import sys

from ..errors import DiffAdaptError
from .args import TrainConfig, build_parser, parse_args
from .data import TrainInputError
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainInputError", "TrainResult", "build_parser", "main", "parse_args", "train"]


def main(argv: list[str] | None = None, *, prog: str = "diffadapt train") -> int:
    """Command-line entry point: exit code 0, or 2 with a one-line message for bad input."""
    config = parse_args(argv, prog=prog)
    try:
        result = train(config)
    except DiffAdaptError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if result.written:
        print("wrote " + ", ".join(result.written))
    return 0
