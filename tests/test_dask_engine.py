"""The Dask engine on a real LocalCluster (2 worker processes): same decisions and worklist as the local
engine (a decode past --decode-timeout, a name that is not UTF-8, FIFOs and dangling links, --min-risk, an empty
input and a pinned bundle included), exactly one decision per file when a worker process is killed mid-run,
idempotent reruns, and nothing left running after a ``kill -9`` of the client."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread

from deploy.batch import WORKLIST_COLUMNS, walk_inputs
from deploy.cli import main
from deploy.dask_engine import WorkerSetupError, local_cluster, partition, run_dask
from tests.conftest import build_dataset
from tests.pg import pg_server, pg_url  # noqa: F401 (fixtures)
from tests.processes import below, kill_9_leaves_nothing
from tests.test_batch import write_pngs
from tests.tiny_bundle import build_tiny_bundle
from triage.audit import open_store
from triage.audit.pending import load_pending
from triage.bundle import load_bundle
from triage.errors import BundleError

distributed = pytest.importorskip("distributed", reason="the Dask engine needs the 'scale' extra (dask[distributed])")
import dask  # noqa: E402 (installed with distributed)
pytestmark = pytest.mark.slow  # a cluster start and several runs: about 30 s on 2 shared cores

ROOT = Path(__file__).resolve().parents[1]
SLOW_FILE = ROOT / "tests" / "fuzz" / "slow" / "j2k-16000px-flat.dcm"  # 1.4 kB; decodes to 16000 x 16000 in ~8 s
needs_slow_file = pytest.mark.skipif(not SLOW_FILE.exists(), reason=f"needs the slow-decode file {SLOW_FILE}")


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(2) as local:
        yield local


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """38 PNG studies, the 12 real Kermany chest DICOMs, an out-of-scope J2K extremity CR and a broken file."""
    folder = tmp_path_factory.mktemp("in")
    write_pngs(folder / "png", 38)
    shutil.copytree(ROOT / "samples" / "kermany", folder / "kermany")
    shutil.copy(ROOT / "samples" / "dicom" / "fuji-cr-extremity-j2k.dcm", folder / "extremity.dcm")
    (folder / "broken.dcm").write_bytes(b"DICM? no, just text")
    return folder


def read_worklist(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def same_worklist(dask_rows: list[dict], local_rows: list[dict]) -> None:
    """Row for row: same order, files, studies, status, reasons, flags; risks equal to float precision."""
    assert len(dask_rows) == len(local_rows)
    for ours, theirs in zip(dask_rows, local_rows):
        for column in ("path", "study_uid", "status", "flagged", "reason", "finding", "policy", "sha256", "detail",
                       "flag_rule"):
            assert ours[column] == theirs[column], column
        for column in ("risk", "study_risk", "threshold"):
            assert (ours[column] == "") == (theirs[column] == "")
            if ours[column]:
                assert float(ours[column]) == pytest.approx(float(theirs[column]), abs=1e-6)


def both_engines(cluster, folder: Path, tiny: Path, tmp_path: Path, *options: str,
                 ) -> dict[str, tuple[int, list[dict] | None]]:
    """Engine -> (exit code, worklist or None) of ``cxr-triage score folder`` with the local and the Dask engine."""
    runs = {}
    for engine in ("local", "dask"):
        out, db = tmp_path / f"{engine}.csv", tmp_path / f"{engine}.sqlite"
        argv = ["score", str(folder), "--bundle", str(tiny), "--out", str(out), "--audit-db", str(db),
                "--device", "cpu", "--engine", engine, *options]
        code = main(argv + (["--scheduler", cluster.scheduler_address] if engine == "dask" else ["--workers", "1"]))
        runs[engine] = (code, read_worklist(out) if out.exists() else None)
    return runs


def decisions_per_file(db: Path) -> Counter:
    with open_store(db) as store:
        assert store.verify().ok
        return Counter((d["path"], d["sha256"]) for d in store.decisions() if not d.get("supersedes"))


@pytest.fixture(scope="module")
def local_run(studies, tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    out, db = folder / "worklist.csv", folder / "audit.sqlite"
    assert main(["score", str(studies), "--bundle", str(tiny), "--out", str(out), "--audit-db", str(db),
                 "--workers", "1"]) == 0
    return read_worklist(out)


def test_dask_engine_gives_the_local_engines_decisions_and_worklist(cluster, studies, tiny, local_run, tmp_path, capsys):
    out, db = tmp_path / "worklist.csv", tmp_path / "audit.sqlite"
    assert main(["score", str(studies), "--bundle", str(tiny), "--out", str(out), "--audit-db", str(db),
                 "--engine", "dask", "--scheduler", cluster.scheduler_address]) == 0
    assert "engine: dask" in capsys.readouterr().out
    rows = read_worklist(out)
    same_worklist(rows, local_run)
    scored_studies = {r["study_uid"] for r in rows if r["status"] == "scored"}
    flagged_studies = {r["study_uid"] for r in rows if r["flagged"] == "1"}
    assert len(flagged_studies) == math.ceil(0.05 * len(scored_studies)) >= 2  # top 5% of ALL studies
    per_file = decisions_per_file(db)
    assert len(per_file) == len(walk_inputs([studies]).files) == 52 and set(per_file.values()) == {1}


def test_a_rerun_is_idempotent(cluster, studies, tiny, local_run, tmp_path):
    out, db = tmp_path / "worklist.csv", tmp_path / "audit.sqlite"
    first = run_dask([str(studies)], load_bundle(tiny), db, out, scheduler=cluster.scheduler_address, progress=False)
    again = run_dask([str(studies)], load_bundle(tiny), db, out, scheduler=cluster.scheduler_address, progress=False)
    assert first.skipped == 0 and again.skipped == again.files == 52
    with open_store(db) as store:
        assert len(store.decisions()) == 52 and load_pending(store, load_bundle(tiny).sha256) == {}
    same_worklist(read_worklist(out), local_run)


def test_a_worker_killed_mid_run_costs_no_decision_and_duplicates_none(cluster, studies, tiny, local_run, tmp_path):
    killed: list[int] = []

    def kill_a_worker(client) -> None:
        """After the first chunk: SIGKILL the worker process holding the most unfinished or ungathered work."""
        if killed:
            return
        load = Counter({w: len(keys) for w, keys in client.has_what().items()})
        load.update({w: len(keys) for w, keys in client.processing().items()})
        victim = max(client.nthreads(), key=lambda w: load[w])
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    out, db = tmp_path / "worklist.csv", tmp_path / "audit.sqlite"
    summary = run_dask([str(studies)], load_bundle(tiny), db, out, scheduler=cluster.scheduler_address,
                       progress=False, on_chunk=kill_a_worker)
    assert killed, "no worker was killed"
    prefix = f"cxr-triage-score-{summary.decisions[0].run_id}-"
    starts = Counter(entry.key for entry in cluster.scheduler.transition_log
                     if entry.finish == "processing" and str(entry.key).startswith(prefix))
    assert max(starts.values()) >= 2, "no task ran twice: the kill cost the run nothing to recover"
    assert len(summary.decisions) == 52
    per_file = decisions_per_file(db)
    assert len(per_file) == 52 and set(per_file.values()) == {1}
    same_worklist(read_worklist(out), local_run)


def test_files_are_partitioned_in_order_into_model_batches():
    files = [f"f{i:03d}" for i in range(100)]
    chunks = partition(files, 2)
    assert [f for chunk in chunks for f in chunk] == files
    assert max(map(len, chunks)) <= 16 and len(chunks) >= 8
    assert partition(files[:3], 4) == [["f000"], ["f001"], ["f002"]]


def test_scheduler_needs_the_dask_engine(studies, tiny, tmp_path, capsys):
    assert main(["score", str(studies), "--bundle", str(tiny), "--out", str(tmp_path / "w.csv"),
                 "--audit-db", str(tmp_path / "a.sqlite"), "--scheduler", "tcp://127.0.0.1:1"]) == 1
    assert "--scheduler needs --engine dask" in capsys.readouterr().err


def test_the_cli_starts_a_local_cluster_of_workers(tiny, tmp_path, capsys):
    write_pngs(tmp_path / "in", 3)
    out, db = tmp_path / "worklist.csv", tmp_path / "audit.sqlite"
    assert main(["score", str(tmp_path / "in"), "--bundle", str(tiny), "--out", str(out), "--audit-db", str(db),
                 "--engine", "dask", "--workers", "1"]) == 0
    assert "engine: dask (local cluster of 1 worker processes)" in capsys.readouterr().out
    assert [r["status"] for r in read_worklist(out)] == ["scored"] * 3


def test_dask_engine_into_a_postgresql_store(cluster, studies, tiny, local_run, pg_url, tmp_path, monkeypatch):
    """The hospital setup: Dask workers, the central store on a real PostgreSQL server; a rerun adds nothing."""
    monkeypatch.setenv("CXR_TRIAGE_SECRET", str(tmp_path / "site-secret.key"))
    out = tmp_path / "worklist.csv"
    argv = ["score", str(studies), "--bundle", str(tiny), "--out", str(out), "--audit-db", pg_url,
            "--engine", "dask", "--scheduler", cluster.scheduler_address]
    assert main(argv) == 0
    same_worklist(read_worklist(out), local_run)
    assert main(argv) == 0
    per_file = decisions_per_file(pg_url)
    assert len(per_file) == 52 and set(per_file.values()) == {1}


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory):
    """A file whose decode takes ~8 s (a real 1.4 kB JPEG 2000) among three quick ones."""
    folder = tmp_path_factory.mktemp("slow")
    shutil.copy(SLOW_FILE, folder / "slow.dcm")
    for i in range(3):
        build_dataset(rows=96, cols=96, patient_id=f"P{i}").save_as(folder / f"quick{i}.dcm", enforce_file_format=True)
    return folder


@needs_slow_file
def test_a_decode_past_the_timeout_gets_the_local_engines_decode_timeout_record(cluster, slow_folder, tiny, tmp_path):
    """--decode-timeout was ignored by the Dask engine: a stuck decoder stalled the run."""
    start = time.monotonic()
    runs = both_engines(cluster, slow_folder, tiny, tmp_path, "--decode-timeout", "2")
    assert time.monotonic() - start < 60 and {code for code, _ in runs.values()} == {0}
    worklists = {engine: rows for engine, (_, rows) in runs.items()}
    same_worklist(worklists["dask"], worklists["local"])
    slow = next(row for row in worklists["dask"] if row["path"].endswith("slow.dcm"))
    assert (slow["status"], slow["reason"]) == ("human_review", "decode_timeout") and "within 2 s" in slow["detail"]
    assert slow["study_uid"] == str(dcmread(SLOW_FILE, stop_before_pixels=True).StudyInstanceUID)
    assert sum(row["status"] == "scored" for row in worklists["dask"]) == 3


def test_a_file_name_that_is_not_utf8_is_scored_as_the_local_engine_scores_it(cluster, tiny, tmp_path):
    """The Dask workers opened the listed text (``M\\xfcller.png``), not the file: file_unreadable, no sha256."""
    folder = tmp_path / "in"
    write_pngs(folder, 3)
    os.rename(folder / "img002.png", os.fsdecode(os.fsencode(folder) + b"/M\xfcller.png"))  # Latin-1: byte 0xfc
    runs = both_engines(cluster, folder, tiny, tmp_path)
    assert runs["dask"][0] == runs["local"][0] == 0
    same_worklist(runs["dask"][1], runs["local"][1])
    latin1 = next(row for row in runs["dask"][1] if row["path"] == f"{folder}/M\\xfcller.png")
    assert latin1["status"] == "scored" and len(latin1["sha256"]) == 64


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_fifos_and_dangling_links_are_recorded_as_the_local_engine_records_them(cluster, tiny, tmp_path, capsys):
    """The Dask engine listed only regular files: a FIFO or a dangling link had no record at all."""
    folder = tmp_path / "in"
    write_pngs(folder, 2)
    os.mkfifo(folder / "pipe.dcm")
    os.symlink(tmp_path / "gone.dcm", folder / "dangling.dcm")
    runs = both_engines(cluster, folder, tiny, tmp_path)
    assert runs["dask"][0] == runs["local"][0] == 0
    same_worklist(runs["dask"][1], runs["local"][1])
    unreadable = {Path(row["path"]).name for row in runs["dask"][1] if row["reason"] == "file_unreadable"}
    assert unreadable == {"pipe.dcm", "dangling.dcm"}
    assert capsys.readouterr().out.count("not scorable where found: 2") == 2


def test_min_risk_lets_a_dask_run_flag_nothing_as_a_local_run(cluster, tiny, tmp_path, capsys):
    write_pngs(tmp_path / "in", 20)  # risks up to about 0.7 with the tiny model
    runs = both_engines(cluster, tmp_path / "in", tiny, tmp_path, "--min-risk", "0.9")
    assert runs["dask"][0] == runs["local"][0] == 0
    same_worklist(runs["dask"][1], runs["local"][1])
    assert {(row["flagged"], row["policy"]) for row in runs["dask"][1]} == {("0", "batch_top_k min_risk=0.9")}
    assert capsys.readouterr().out.count("flagged: 0 of 20 studies: top 5% of this batch and at least --min-risk") == 2


def test_an_input_with_nothing_to_score_exits_3_with_either_engine(cluster, tiny, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an input")
    runs = both_engines(cluster, tmp_path / "in", tiny, tmp_path)
    assert runs["dask"] == runs["local"] == (3, [])
    assert (tmp_path / "dask.csv").read_text().splitlines() == [",".join(WORKLIST_COLUMNS)]
    assert capsys.readouterr().err.count(f"warning: nothing to score under {tmp_path / 'in'}") == 2


def test_a_bundle_other_than_the_pinned_one_is_refused_before_any_scoring(cluster, tiny, tmp_path, capsys,
                                                                       monkeypatch):
    write_pngs(tmp_path / "in", 2)
    (tmp_path / "wrong").mkdir()
    (tmp_path / "right").mkdir()
    pinned = load_bundle(tiny).sha256
    wrong = both_engines(cluster, tmp_path / "in", tiny, tmp_path / "wrong", "--expect-bundle-sha256", "0" * 64)
    assert wrong["dask"] == wrong["local"] == (1, None)
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(f"is not the pinned {'0' * 64}" in e and pinned in e for e in errors)
    assert not list((tmp_path / "wrong").glob("*.sqlite"))  # refused before the store was opened
    monkeypatch.setenv("CXR_TRIAGE_BUNDLE_SHA256", pinned)  # a site's pin, read by both engines
    right = both_engines(cluster, tmp_path / "in", tiny, tmp_path / "right")
    assert right["dask"][0] == right["local"][0] == 0 and len(right["dask"][1]) == 2


def test_a_dask_worker_refuses_a_bundle_other_than_the_clients(cluster, tiny, tmp_path):
    """Each worker loads the bundle itself: it is pinned to the identity the client checked."""
    copy = Path(shutil.copytree(tiny, tmp_path / "bundle"))
    approved = load_bundle(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] += "-changed"  # after the client's check
    (copy / "manifest.json").write_text(json.dumps(manifest))
    write_pngs(tmp_path / "in", 1)
    with pytest.raises(BundleError, match=f"Dask worker on .*: {copy}: bundle sha256 .* is not the pinned "
                                          f"{approved.sha256}"):
        run_dask([str(tmp_path / "in")], approved, tmp_path / "a.sqlite", tmp_path / "w.csv",
                 scheduler=cluster.scheduler_address, device="cpu", progress=False)

def test_a_daemonic_worker_is_refused_with_the_fix(slow_folder, tiny, tmp_path):
    """Workers started the default way are daemonic processes, which may not start the decode processes."""
    with dask.config.set({"distributed.worker.daemon": True}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as daemonic:
        with pytest.raises(WorkerSetupError, match="DASK_DISTRIBUTED__WORKER__DAEMON=False"):
            run_dask([str(slow_folder / "quick0.dcm")], load_bundle(tiny), tmp_path / "a.sqlite", tmp_path / "w.csv",
                     scheduler=daemonic.scheduler_address, device="cpu", progress=False)


@needs_slow_file
def test_kill_9_of_a_dask_run_leaves_none_of_its_processes_behind(slow_folder, tiny, tmp_path):
    """``kill -9`` of ``cxr-triage score --engine dask`` (its own local cluster) while both workers' decode processes
    are inside a slow decode: the Dask workers, their forkservers and decode processes and the resource tracker die."""
    (tmp_path / "in").mkdir()
    for i in range(2):
        shutil.copy(SLOW_FILE, tmp_path / "in" / f"slow{i}.dcm")
    argv = ["score", str(tmp_path / "in"), "--bundle", str(tiny), "--out", str(tmp_path / "w.csv"), "--audit-db",
            str(tmp_path / "a.sqlite"), "--engine", "dask", "--workers", "2", "--decode-timeout", "600", "--device", "cpu"]
    client = subprocess.Popen([sys.executable, "-m", "deploy.cli", *argv], cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_9_leaves_nothing(client, lambda: len(below(client.pid, 3)) == 2)  # a decode process under each forkserver
