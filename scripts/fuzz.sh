#!/usr/bin/env bash
# Long fuzzing campaign of the DICOM/PNG/JPEG ingest path with atheris (libFuzzer).
#
#   bash scripts/fuzz.sh [RUNS]        # default 100000 executions; needs .venv (bash scripts/test.sh makes it)
#
# Seeds: tests/fuzz/corpus/. Output under $FUZZ_OUT (default out/fuzz): corpus/ (inputs that
# found new coverage), crashes/ (crash-*, timeout-* and oom-* inputs), logs/. After a crash
# libFuzzer stops, so the campaign restarts with the next seed until RUNS executions are done.
# A crasher is any exception outside triage.errors.TriageError, an input that runs past
# -timeout (10 s) or past -rss_limit_mb; slow-unit-* files (over 10 s) are listed, not counted.
# Reproduce one with:
#   PYTHONPATH=. .venv/bin/python tests/fuzz/fuzz_ingest.py out/fuzz/crashes/crash-...
# then add it to tests/fuzz/regressions/ under a name that says what was wrong.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-100000}
OUT=${FUZZ_OUT:-out/fuzz}
PY=${PYTHON:-.venv/bin/python}
MAX_ROUNDS=${FUZZ_MAX_ROUNDS:-50}
mkdir -p "$OUT/corpus" "$OUT/crashes" "$OUT/logs"
"$PY" -c "import atheris" 2>/dev/null || { echo "scripts/fuzz.sh: atheris is not installed in $PY. Fix: $PY -m pip install atheris==2.3.0" >&2; exit 1; }

executed=0; round=0; start=$(date +%s)
while [ "$executed" -lt "$RUNS" ] && [ "$round" -lt "$MAX_ROUNDS" ]; do
  round=$((round + 1))
  log="$OUT/logs/round-$round.log"
  PYTHONPATH=. PYTHONWARNINGS=ignore nice "$PY" tests/fuzz/fuzz_ingest.py -runs=$((RUNS - executed)) -seed="$round" \
    -timeout=10 -rss_limit_mb=3072 -print_final_stats=1 -artifact_prefix="$OUT/crashes/" \
    "$OUT/corpus" tests/fuzz/corpus >"$log" 2>&1 || true
  n=$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
  [ -n "$n" ] || n=$(grep -oE '^#[0-9]+' "$log" | tr -d '#' | tail -1 || true)
  [ -n "$n" ] && [ "$n" -gt 0 ] || { echo "scripts/fuzz.sh: round $round made no progress; see $log" >&2; break; }
  executed=$((executed + n))
  echo "round $round: $n executions ($executed of $RUNS)$(grep -q 'ERROR: libFuzzer' "$log" && echo ', stopped on a crasher')"
done
seconds=$(( $(date +%s) - start ))
crashers=$(find "$OUT/crashes" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
echo "executions: $executed in ${seconds} s ($(( executed / (seconds > 0 ? seconds : 1) )) exec/s), rounds: $round"
echo "crashers: $crashers (in $OUT/crashes)"
find "$OUT/crashes" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' \) | sort
slow=$(find "$OUT/crashes" -type f -name 'slow-unit-*' | wc -l)
[ "$slow" -eq 0 ] || echo "slow units (over 10 s, not failures; worth a look): $slow"
[ "$crashers" -eq 0 ]
