"""``python ui/studio.py [--demo] …`` from a source checkout: the same as ``diffadapt studio``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffadapt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["studio", *sys.argv[1:]]))
