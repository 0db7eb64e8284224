"""Fuzzed ingest: every saved crasher is now bad input, and a bounded atheris run finds no new crash.

Crashers live in ``tests/fuzz/regressions/`` (one file each, named for what was wrong) when they are bad
input, and in ``tests/fuzz/scorable/`` when they were valid input that crashed (now scored);
the harness is ``tests/fuzz/fuzz_ingest.py``; ``scripts/fuzz.sh`` runs a long campaign.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from triage.errors import BadInputError
from triage.ingest import read_radiograph

REPO = Path(__file__).resolve().parents[1]
FUZZ = REPO / "tests" / "fuzz"
REGRESSIONS = sorted((FUZZ / "regressions").iterdir())
CI_RUNS = 20000  # the bounded CI run: ~130-250 s on 2 shared cores; scripts/fuzz.sh runs >= 100k


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_a_saved_crasher_is_now_a_bad_input_error_naming_the_file_and_the_fix(path):
    with pytest.raises(BadInputError) as caught:
        read_radiograph(path)
    assert str(path) in str(caught.value) and caught.value.fix and "Fix: " in str(caught.value)


SCORABLE = sorted((FUZZ / "scorable").iterdir())  # crashers that were valid input: now scored


@pytest.mark.parametrize("path", SCORABLE, ids=[p.name for p in SCORABLE])
def test_a_saved_crasher_that_is_valid_input_is_now_scored(path):
    from triage.preprocess import PreprocessSpec, preprocess

    model_input = preprocess(read_radiograph(path), PreprocessSpec(size=(32, 32)))
    assert model_input.shape == (1, 32, 32) and np.isfinite(model_input).all()


def test_the_seed_corpus_is_small_and_mostly_scorable():
    seeds = sorted((FUZZ / "corpus").iterdir())
    assert sum(p.stat().st_size for p in seeds) < 2 * 2**20
    readable = 0
    for path in seeds:
        try:
            read_radiograph(path)
            readable += 1
        except BadInputError:
            pass
    assert readable >= len(seeds) - 5  # seeds reach the decoders; a few are out of scope on purpose


def run_fuzzer(tmp_path: Path, *args: str, timeout_s: int) -> subprocess.CompletedProcess:
    """The harness in a subprocess, seeds from the corpus, new inputs and crashers into ``tmp_path``."""
    (tmp_path / "corpus").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(FUZZ / "fuzz_ingest.py"), *args, "-timeout=10", "-rss_limit_mb=3072",
         f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus"), str(FUZZ / "corpus")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.slow
def test_a_bounded_fuzz_run_finds_no_crash(tmp_path):
    pytest.importorskip("atheris")
    result = run_fuzzer(tmp_path, f"-runs={CI_RUNS}", "-seed=1", timeout_s=600)
    crashers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    tail = "\n".join(line for line in result.stderr.splitlines() if "Instrumenting" not in line)[-3000:]
    assert result.returncode == 0 and not crashers, f"fuzzer found {crashers}:\n{tail}"
    assert f"Done {CI_RUNS} runs" in result.stderr


@pytest.mark.skipif(not (FUZZ / "slow" / "j2k-16000px-flat.dcm").exists(), reason="needs tests/fuzz/slow/")
def test_an_input_that_hangs_the_decoder_is_reported_as_a_timeout_not_a_hung_test(tmp_path):
    """libFuzzer's -timeout stops an input that runs too long (here a real file that takes ~8 s to decode)."""
    pytest.importorskip("atheris")
    slow = tmp_path / "slow.dcm"
    slow.write_bytes((FUZZ / "slow" / "j2k-16000px-flat.dcm").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(FUZZ / "fuzz_ingest.py"), "-timeout=2", "-rss_limit_mb=3072",
                             f"-artifact_prefix={tmp_path}/", str(slow)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "ERROR: libFuzzer: timeout" in result.stderr, result.stderr[-2000:]
    assert "ALARM: working on the last Unit for" in result.stderr
