#!/usr/bin/env bash
# The GPU check's one entry point: every CUDA-only measurement of the project in one run of under
# 8 minutes, or its CPU smoke test (--dry-run). What it checks, and why, is in gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out FILE]
#
# Python: $PYTHON, else the repository's .venv, else python3 (on a machine with its own setup).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
exec "$python" benchmarks/gpu_check.py "$@"
