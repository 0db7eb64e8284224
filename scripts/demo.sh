#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the batch scorer with the bundled demo
# model on the bundled sample studies. Writes out/worklist.csv and out/audit.sqlite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
log=.venv/install.log
{ .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".[cpu]"; } >"$log" 2>&1 \
  || { cat "$log"; echo "install failed (log: $log)"; exit 1; }
mkdir -p out
.venv/bin/cxr-triage score samples --out out/worklist.csv --audit-db out/audit.sqlite
.venv/bin/cxr-triage audit verify --audit-db out/audit.sqlite
echo
echo "worklist (flagged first):"
cut -d, -f1-7 out/worklist.csv | sed "s#$(pwd)/##" | column -s, -t
