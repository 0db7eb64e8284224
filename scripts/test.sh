#!/usr/bin/env bash
# Set up (idempotent) everything the tests need, then run them.
# torch: `pip install torch==2.13.0` from PyPI is a CUDA build on Linux x86_64. For the
# CPU build, set PIP_TORCH_INDEX=https://download.pytorch.org/whl/cpu before running.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
log=.venv/install.log
{ .venv/bin/python -m pip install -q --upgrade pip \
  && .venv/bin/python -m pip install -q "torch==2.13.0" ${PIP_TORCH_INDEX:+--index-url "$PIP_TORCH_INDEX"} \
  && .venv/bin/python -m pip install -q -e ".[cpu,train,dev]"; } >"$log" 2>&1 \
  || { cat "$log"; echo "install failed (log: $log)"; exit 1; }
.venv/bin/python -m pytest -q "$@"
