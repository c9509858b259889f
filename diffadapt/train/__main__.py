"""``python -m diffadapt.train …`` / ``accelerate launch -m diffadapt.train …``."""

import sys

from . import main

sys.exit(main(prog="python -m diffadapt.train"))
