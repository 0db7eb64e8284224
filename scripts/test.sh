#!/usr/bin/env bash
# Set up (idempotent) everything the tests need, then run them.
# torch: `pip install torch==2.13.0` from PyPI is a CUDA build on Linux x86_64. For the
# CPU build, set PIP_TORCH_INDEX=https://download.pytorch.org/whl/cpu before running.
set -euo pipefail
cd "$(dirname "$0")/.."
# System programs used by the tests as real peers (scripts/missing-packages.sh lists those absent).
mapfile -t need < <(bash scripts/missing-packages.sh)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >/tmp/cxr-apt.log 2>&1 \
      || { cat /tmp/cxr-apt.log; echo "apt-get install ${need[*]} failed"; exit 1; }
  else
    echo "note: install the Debian packages ${need[*]} (as root) or the tests that need them skip" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
log=.venv/install.log
{ .venv/bin/python -m pip install -q --upgrade pip \
  && .venv/bin/python -m pip install -q "torch==2.13.0" ${PIP_TORCH_INDEX:+--index-url "$PIP_TORCH_INDEX"} \
  && .venv/bin/python -m pip install -q -e ".[cpu,train,dashboard,dev,scale]"; } >"$log" 2>&1 \
  || { cat "$log"; echo "install failed (log: $log)"; exit 1; }
.venv/bin/python -m pytest -q "$@"
