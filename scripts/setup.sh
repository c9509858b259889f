#!/usr/bin/env bash
# Create .venv and install diffadapt with its test tools. The CPU torch wheel goes in first, so that no
# dependency pulls a multi-GB CUDA build; scripts/constraints.txt pins the versions the tests are proven on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c scripts/constraints.txt -e ".[dev]"
