#!/usr/bin/env bash
# Create .venv (or use $UCMKD_VENV) and install ucmkd with its test extras.
# PyTorch: if the environment has no torch yet, install the pinned CPU build torch==2.13.0
# first, so that pip never resolves an unpinned `torch` to the multi-GB CUDA packages.
# Set UCMKD_TORCH="torch==X" to choose another build (e.g. a CUDA one on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${UCMKD_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "${UCMKD_TORCH:-torch==2.13.0}"
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -c "import torch, ucmkd; print(f'ucmkd {ucmkd.__version__} with torch {torch.__version__} in $VENV')"
