#!/usr/bin/env bash
# Create .venv (Python 3.11) and install fedmoe with its pinned dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.fedmoe-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: on CPU machines this takes the local CPU build instead of CUDA wheels.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  # Quiet: setuptools' note that every editable install prints (pip shows its build backend's
  # warnings) is silenced; a real packaging warning still shows (tests/test_packaging.py).
  .venv/bin/python -W "ignore:Editable installation" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
