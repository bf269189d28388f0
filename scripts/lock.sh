#!/usr/bin/env bash
# Refresh requirements.lock: resolve ucmkd's dependencies (with the test extras) to the newest
# versions pyproject.toml allows, in a throw-away virtual environment, and pin them exactly.
# torch stays pinned to the CPU build the set-up installs (UCMKD_TORCH, default torch==2.13.0).
# Usage: bash scripts/lock.sh   (then run the tests and commit requirements.lock)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip install -q "${UCMKD_TORCH:-torch==2.13.0}"
"$TMP/venv/bin/python" -m pip install -q -e ".[test]"
{
    echo "# Exact versions scripts/setup.sh installs (pip constraints). Made by: bash scripts/lock.sh"
    echo "# on $(date -u +%Y-%m-%d), $("$TMP/venv/bin/python" -c 'import platform; print("Python", platform.python_version(), platform.machine())')."
    echo "# UCMKD_UNLOCKED=1 bash scripts/setup.sh installs the newest versions pyproject.toml allows instead."
    "$TMP/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^ucmkd' | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'
} > requirements.lock.new
mv requirements.lock.new requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) pinned packages"
