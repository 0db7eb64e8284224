"""Crash safety: SIGKILL the batch scorer and the workstation service at random points, rerun, and check
that every file has exactly one current decision, SQLite is intact and the audit chain verifies.

Real processes (``cxr-triage score`` / ``cxr-triage workstation`` as subprocesses in their
own process groups, so the kill takes their decode workers too), real DICOM files, real
SQLite, real dcmtk ``storescu`` peers. The kill points are random (seeded, printed on failure).
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import build_dataset
from tests.processes import gone_within, grandchildren, group
from tests.test_workstation import CALLER, free_port, listening, wait_for
from tests.tiny_bundle import build_tiny_bundle

REPO = Path(__file__).resolve().parents[1]
FILES = 500
SLOW_FILE = REPO / "tests" / "fuzz" / "slow" / "j2k-16000px-flat.dcm"  # 1.4 kB; decodes to 16000 x 16000 in ~8 s
needs_storescu = pytest.mark.skipif(not shutil.which("storescu"), reason="needs dcmtk storescu (scripts/test.sh installs it)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


def write_studies(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` small synthetic chest DICOMs (64 x 64), one study each, with distinct brightness (risk)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    base = build_dataset(rows=64, cols=64, bits_stored=8)
    pixels = bytearray(base.PixelData)
    paths = []
    for i in range(count):
        ds = base.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.1{seed}.{i}.1", f"1.2.826.0.1.3680043.10.1{seed}.{i}.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1{seed}.{i}.3"
        ds.PatientID = f"CRASH-{i}"
        shift = rng.randrange(0, 60)
        ds.PixelData = bytes(min(255, p + shift) for p in pixels)
        paths.append(folder / f"{i:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def rows(db: Path, sql: str = "SELECT * FROM decisions ORDER BY id") -> list[dict]:
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(r) for r in connection.execute(sql)]


def count(db: Path, table: str) -> int:
    """Rows in ``table`` (0 while the store does not exist yet); read beside the writer, as WAL allows."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):  # the schema is not created yet
            return 0
        raise


def current(decisions: list[dict]) -> dict[str, list[dict]]:
    """path -> its decisions that no later record supersedes."""
    superseded = {d["supersedes"] for d in decisions if d["supersedes"]}
    by_path: dict[str, list[dict]] = {}
    for d in decisions:
        if d["id"] not in superseded:
            by_path.setdefault(d["path"], []).append(d)
    return by_path


def check_store(db: Path, files: list[Path]) -> list[dict]:
    """Exactly one current decision per file, supersedes links stay within a file, integrity and chain verify."""
    decisions = rows(db)
    by_id = {d["id"]: d for d in decisions}
    assert all(by_id[d["supersedes"]]["path"] == d["path"] for d in decisions if d["supersedes"])
    latest = current(decisions)
    assert set(latest) == {str(p.resolve()) for p in files}
    assert {path: len(ds) for path, ds in latest.items() if len(ds) != 1} == {}
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    verify = subprocess.run([sys.executable, "-m", "deploy.cli", "audit", "verify", "--audit-db", str(db)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    return [ds[0] for ds in latest.values()]


def outcome(decisions: list[dict]) -> dict[str, tuple[float, int]]:
    """path -> (risk, flagged): what a run decided, without times and ids."""
    return {d["path"]: (round(d["risk"], 6), d["flagged"]) for d in decisions}


def start(argv: list[str], log: Path) -> subprocess.Popen:
    """A CLI subprocess in a process group of its own (so SIGKILL reaches its forkserver and workers)."""
    return subprocess.Popen([sys.executable, "-m", "deploy.cli", *argv], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture
def groups():
    """Process groups started by a test; any left are killed at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        kill_group(proc)


@pytest.mark.slow
def test_batch_scorer_killed_at_random_points_then_rerun_decides_each_file_once(tmp_path, tiny, groups):
    files = write_studies(tmp_path / "in", FILES)
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    db, out = tmp_path / "audit.sqlite", tmp_path / "worklist.csv"
    argv = ["score", str(tmp_path / "in"), "--bundle", str(tiny), "--out", str(out), "--audit-db", str(db),
            "--workers", "2", "--device", "cpu"]
    # Kill points: during start-up, then after random numbers of inferences saved as pending.
    plan = [("startup", rng.uniform(0.2, 1.5))] + [("pending", t) for t in sorted(rng.sample(range(16, FILES), 3))]
    kills = []
    for kind, point in plan:
        groups.append(start(argv, tmp_path / "score.log"))
        scorer = groups[-1]
        if kind == "startup":  # during start-up, or at the first saved inference if start-up is quicker than that
            deadline = time.monotonic() + point
            while time.monotonic() < deadline and count(db, "pending_scores") == 0 and scorer.poll() is None:
                time.sleep(0.01)
        else:
            wait_for(lambda: count(db, "pending_scores") >= point or scorer.poll() is not None, 120, f"{point} pending rows")
        kills.append((kind, point, count(db, "pending_scores"), count(db, "decisions"), scorer.poll()))
        kill_group(scorer)
    final = subprocess.run([sys.executable, "-m", "deploy.cli", *argv], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    context = f"seed {seed}, kills (kind, point, pending, decisions, exit before kill): {kills}"
    assert final.returncode == 0, f"{context}\n{final.stderr[-2000:]}"
    assert any(k[2] > 0 and k[4] is None for k in kills), f"no kill landed mid-run: {context}"
    latest = check_store(db, files)
    assert count(db, "pending_scores") == 0, context
    assert all(d["status"] == "scored" for d in latest), context

    # The same result as one uninterrupted run: same risks, same flagged studies.
    reference = tmp_path / "reference.sqlite"
    clean = subprocess.run([sys.executable, "-m", "deploy.cli", *argv[:-8], "--out", str(tmp_path / "ref.csv"),
                            "--audit-db", str(reference), "--workers", "2", "--device", "cpu"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    expected = [d for ds in current(rows(reference)).values() for d in ds]
    assert outcome(latest) == outcome(expected), context
    with open(out, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == FILES


@pytest.mark.slow
@pytest.mark.skipif(not SLOW_FILE.exists(), reason=f"needs the slow-decode file {SLOW_FILE}")
def test_kill_9_of_the_batch_scorer_leaves_none_of_its_processes_behind(tmp_path, tiny, groups):
    """``kill -9`` of ``cxr-triage score`` alone (as the OOM killer would) while its two decode processes are inside a
    slow JPEG 2000 decode (a codec that holds the GIL): its forkserver, decode processes and resource tracker die too."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        shutil.copy(SLOW_FILE, folder / f"slow{i}.dcm")
    argv = ["score", str(folder), "--bundle", str(tiny), "--out", str(tmp_path / "w.csv"),
            "--audit-db", str(tmp_path / "a.sqlite"), "--workers", "2", "--decode-timeout", "600", "--device", "cpu"]
    groups.append(start(argv, tmp_path / "score.log"))
    scorer = groups[-1]
    wait_for(lambda: len(grandchildren(scorer.pid)) >= 2 or scorer.poll() is not None, 60, "two decode processes")
    time.sleep(0.5)  # into the decode
    assert scorer.poll() is None and len(group(scorer.pid)) >= 5  # the scorer, forkserver, tracker, two decoders
    os.kill(scorer.pid, signal.SIGKILL)
    scorer.wait(timeout=10)
    assert gone_within(scorer.pid, 3.0) == []


def workstation(tmp_path: Path, port: int, bundle: Path) -> list[str]:
    # the tiny bundle: the default one's out-of-distribution gate would refuse these synthetic images
    return ["workstation", "--port", str(port), "--bundle", str(bundle), "--allow-ae", CALLER, "--inbox", str(tmp_path / "inbox"),
            "--audit-db", str(tmp_path / "audit.sqlite"), "--quiet-period", "0.2", "--device", "cpu"]


def send(port: int, files: list[Path]) -> subprocess.Popen:
    """Real dcmtk storescu sending ``files`` in one association (stops at the first failure)."""
    return subprocess.Popen(["storescu", "-aet", CALLER, "-aec", "CXR_TRIAGE", "127.0.0.1", str(port), *map(str, files)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@needs_storescu
@pytest.mark.slow
def test_workstation_killed_while_receiving_then_restarted_decides_every_study_once(tmp_path, groups, tiny):
    files = write_studies(tmp_path / "sent", 80, seed=1)
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    db, port, kills = tmp_path / "audit.sqlite", free_port(), []
    for _ in range(2):
        groups.append(start(workstation(tmp_path, port, tiny), tmp_path / "service.log"))
        wait_for(lambda: listening(port), 60, "the service to listen")
        sender = send(port, files)  # a modality resends everything it is unsure of
        target = count(db, "decisions") + rng.randrange(5, 25)
        wait_for(lambda: count(db, "decisions") >= target or sender.poll() is not None, 60, "decisions mid-stream")
        kills.append((target, count(db, "decisions"), sender.poll()))
        kill_group(groups[-1])
        sender.wait(timeout=30)
    groups.append(start(workstation(tmp_path, port, tiny), tmp_path / "service.log"))
    wait_for(lambda: listening(port), 60, "the restarted service")
    assert send(port, files).wait(timeout=120) == 0
    context = f"seed {seed}, kills (target, decisions, sender exit): {kills}"
    wait_for(lambda: count(db, "decisions") >= len(files), 60, f"every instance decided ({context})")
    time.sleep(1.0)  # a grace period in which a (wrong) duplicate decision would appear
    kill_group(groups[-1])
    decisions = rows(db)
    stored = {str(dcmread(d["path"], stop_before_pixels=True).SOPInstanceUID) for d in decisions}
    assert stored == uids, context  # every instance received is decided; nothing lost
    assert Counter(d["path"] for d in decisions if not d["supersedes"]).most_common(1)[0][1] == 1, context
    latest = check_store(db, [Path(d["path"]) for d in decisions])
    assert len(latest) == len(files) and all(d["status"] == "scored" for d in latest), context
    assert any(k[1] > 0 and k[2] is None for k in kills), f"no kill landed mid-stream: {context}"
