#!/usr/bin/env bash
# Create .venv (or use $UCMKD_VENV) and install ucmkd with its test extras at the exact versions
# of requirements.lock (refresh it with scripts/lock.sh).
# PyTorch: if the environment has no torch yet, install the pinned CPU build torch==2.13.0
# first, so that pip never resolves an unpinned `torch` to the multi-GB CUDA packages.
# Set UCMKD_TORCH="torch==X" to choose another build (e.g. a CUDA one on a GPU machine; the
# lock's torch pin is then left out). UCMKD_UNLOCKED=1 installs the newest versions that
# pyproject.toml allows instead of the locked ones.
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
if [ "${UCMKD_UNLOCKED:-0}" = "1" ]; then
    "$VENV/bin/python" -m pip install -q -e ".[test]"
else
    constraints=requirements.lock
    if [ -n "${UCMKD_TORCH:-}" ]; then       # the chosen torch build replaces the lock's pin
        constraints="$VENV/requirements.no-torch.lock"
        grep -v '^torch==' requirements.lock > "$constraints"
    fi
    "$VENV/bin/python" -m pip install -q -c "$constraints" -e ".[test]"
fi
"$VENV/bin/python" -c "import torch, ucmkd; from ucmkd.provenance import versions; print(f'ucmkd {ucmkd.__version__} with torch {torch.__version__} in $VENV; versions: {versions()[\"lock\"]}')"
