#!/usr/bin/env bash
# The one entry point for a GPU machine (and its CPU rehearsal): bench/device_run.py, with the
# interpreter that has torch (the repo's .venv when there is one, else python3, as on a bare image).
#   bash bench/device_run.sh OUT_DIR [--cpu-dry-run] [--only a,b] [--skip a,b] [--budget-s S]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
exec "$PY" bench/device_run.py --python "$PY" "$@"
