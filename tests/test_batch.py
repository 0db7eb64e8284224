"""End-to-end: the batch scorer CLI on real files, a real ONNX session and a real SQLite store."""

import csv
import json
import math
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.batch import WORKLIST_COLUMNS, decision_from_row, write_worklist
from deploy.cli import main
from tests.processes import grandchildren
from tests.tiny_bundle import build_tiny_bundle
from triage.audit import AuditStore, Decision, open_store
from triage.audit.pending import load_pending, save_pending
from triage.bundle import load_bundle
from triage.errors import AuditError

pydicom_data = pytest.importorskip("pydicom.data")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


def write_pngs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n distinct grey PNGs whose mean brightness (and so tiny-model risk) differs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = np.linspace(0, 255 * (i + 1) / n, 96)[None, :].repeat(96, axis=0)
        pixels = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"img{i:03d}.png")
        Image.fromarray(pixels, mode="L").save(paths[-1])
    return paths


@pytest.fixture
def studies(tmp_path):
    folder = tmp_path / "in"
    write_pngs(folder / "png", 38)
    shutil.copy(pydicom_data.get_testdata_file("RG1_J2KI.dcm"), folder / "chest.dcm")
    shutil.copy(pydicom_data.get_testdata_file("RG3_J2KI.dcm"), folder / "extremity.dcm")
    (folder / "broken.dcm").write_bytes(b"DICM? no, just text")
    (folder / "notes.txt").write_text("not an input")
    return folder


def read_worklist(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def score(*args) -> int:
    return main(["score", *map(str, args)])


def test_scores_a_folder_flags_the_riskiest_5_percent_and_audits_every_file(studies, tiny, tmp_path, capsys):
    out, db = tmp_path / "worklist.csv", tmp_path / "audit.sqlite"
    assert score(studies, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    rows = read_worklist(out)
    assert len(rows) == 41  # 38 PNG + 3 DICOM-named files; notes.txt is not an input
    assert {"path", "study_uid", "status", "risk", "study_risk", "flagged", "reason"} <= set(rows[0])

    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["broken.dcm"]["status"] == "human_review" and by_name["broken.dcm"]["reason"] == "not_dicom"
    assert by_name["extremity.dcm"]["reason"] == "body_part_out_of_scope"
    assert by_name["chest.dcm"]["status"] == "scored" and 0 <= float(by_name["chest.dcm"]["risk"]) <= 1

    scored_studies = {r["study_uid"] for r in rows if r["status"] == "scored"}
    flagged = {r["study_uid"] for r in rows if r["flagged"] == "1"}
    assert len(scored_studies) == 39 and len(flagged) == math.ceil(0.05 * 39) == 2
    # Flagged first, then by study risk; the brightest PNGs are the riskiest for the tiny model.
    assert [r["flagged"] for r in rows[:2]] == ["1", "1"]
    risks = [float(r["study_risk"]) for r in rows if r["study_risk"]]
    assert risks == sorted(risks, reverse=True)
    assert {Path(r["path"]).name for r in rows[:2]} <= {"img037.png", "img036.png", "chest.dcm"}

    with open_store(db) as store:
        decisions = store.decisions()
        assert len(decisions) == 41 and store.verify().ok
    assert {d["path"] for d in decisions} == {r["path"] for r in rows}
    summary = capsys.readouterr().out
    assert "flagged: 2 of 39 studies" in summary and "not_dicom: 1" in summary and "CPUExecutionProvider" in summary
    assert "flagged: 2 of 39 studies: top 5% of this batch (study risk threshold " in summary
    assert all("relative to the batch" in r["flag_rule"] for r in rows) and "relative to the batch" in summary


def test_rerun_skips_audited_files_and_scores_only_new_ones(studies, tiny, tmp_path, capsys):
    out, db = tmp_path / "worklist.csv", tmp_path / "audit.sqlite"
    assert score(studies, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    first = read_worklist(out)
    assert score(studies, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    assert "(41 already audited with this bundle, skipped)" in capsys.readouterr().out
    assert read_worklist(out) == first
    with open_store(db) as store:
        assert len(store.decisions()) == 41

    # An identical copy at a new path is a new input: scored and recorded on its own.
    shutil.copy(studies / "chest.dcm", studies / "chest-copy.dcm")
    assert score(studies, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    rows = read_worklist(out)
    assert len(rows) == 42
    copies = [r for r in rows if Path(r["path"]).name.startswith("chest")]
    assert copies[0]["risk"] == copies[1]["risk"] and copies[0]["study_uid"] == copies[1]["study_uid"]
    with open_store(db) as store:
        assert len(store.decisions()) == 42 and store.verify().ok


def test_two_workers_give_the_same_risks_as_one(studies, tiny, tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert score(studies, "--bundle", tiny, "--out", one, "--audit-db", tmp_path / "a.sqlite", "--workers", 1) == 0
    assert score(studies, "--bundle", tiny, "--out", two, "--audit-db", tmp_path / "b.sqlite", "--workers", 2) == 0
    strip = lambda rows: [{k: r[k] for k in ("path", "risk", "flagged", "reason")} for r in rows]
    assert strip(read_worklist(one)) == strip(read_worklist(two))


def test_a_changed_file_at_the_same_path_is_scored_again(studies, tiny, tmp_path):
    out, db = tmp_path / "worklist.csv", tmp_path / "audit.sqlite"
    assert score(studies, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    write_pngs(studies / "png", 1, seed=99)  # overwrites img000.png with new content
    assert score(studies, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    with open_store(db) as store:
        rows = [d for d in store.decisions() if d["path"].endswith("img000.png")]
    assert len(rows) == 2 and rows[0]["sha256"] != rows[1]["sha256"]


def test_bad_bundle_is_an_operational_failure(studies, tmp_path, capsys):
    assert score(studies, "--bundle", tmp_path, "--out", tmp_path / "w.csv", "--audit-db", tmp_path / "a.sqlite") == 1
    assert "manifest.json" in capsys.readouterr().err


def test_unwritable_worklist_is_an_operational_failure(studies, tiny, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "worklist.csv").mkdir()  # a folder where the file should go
    assert score(studies, "--bundle", tiny, "--out", locked / "worklist.csv", "--audit-db", tmp_path / "a.sqlite") == 1
    assert "worklist.csv" in capsys.readouterr().err


def test_missing_input_path_is_named(tiny, tmp_path, capsys):
    assert score(tmp_path / "nowhere", "--bundle", tiny, "--out", tmp_path / "w.csv", "--audit-db", tmp_path / "a.sqlite") == 1
    assert "nowhere: no such file or folder" in capsys.readouterr().err


def test_worklist_and_audit_hold_no_patient_identifiers(tmp_path, tiny):
    import pydicom

    ds = pydicom.dcmread(pydicom_data.get_testdata_file("RG1_J2KI.dcm"))
    ds.PatientName, ds.PatientID = "Doe^Jane", "MRN-8675309"
    folder = tmp_path / "in"
    folder.mkdir()
    ds.save_as(folder / "named.dcm")
    out, db = tmp_path / "w.csv", tmp_path / "a.sqlite"
    assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    export = tmp_path / "export.csv"
    assert main(["audit", "export", "--audit-db", str(db), "--out", str(export)]) == 0
    for text in (out.read_text(), export.read_text(), "\n".join(map(str, sqlite3.connect(db).iterdump()))):
        assert "Doe" not in text and "8675309" not in text
    with open_store(db) as store:
        assert len(store.decisions()[0]["patient_pseudo_id"]) == 16


def test_a_rerun_with_riskier_new_studies_supersedes_the_old_flag(tmp_path, tiny):
    folder, out, db = tmp_path / "in", tmp_path / "w.csv", tmp_path / "a.sqlite"
    write_pngs(folder / "day1", 20)
    assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    with open_store(db) as store:
        first_flagged = [d for d in store.decisions() if d["flagged"]]
    assert [Path(d["path"]).name for d in first_flagged] == ["img019.png"]

    brighter = folder / "day2"
    brighter.mkdir()
    for i in range(20):  # brighter than anything on day 1
        Image.fromarray(np.full((96, 96), 200 + i, np.uint8), mode="L").save(brighter / f"late{i:02d}.png")
    assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    with open_store(db) as store:
        rows = store.decisions()
        assert store.verify().ok
    superseding = [d for d in rows if d["supersedes"] is not None]
    assert len(superseding) == 1 and superseding[0]["supersedes"] == first_flagged[0]["id"]
    assert not superseding[0]["flagged"] and superseding[0]["path"] == first_flagged[0]["path"]
    assert len(rows) == 41  # 20 + 20 new + 1 superseding; nothing rewritten
    flagged_now = {Path(r["path"]).name for r in read_worklist(out) if r["flagged"] == "1"}
    assert flagged_now == {"late19.png", "late18.png"}


def test_inferences_of_a_failed_run_are_kept_and_recorded_by_the_next(studies, tiny, tmp_path, monkeypatch):
    out, db = tmp_path / "w.csv", tmp_path / "a.sqlite"

    def disk_full(self, decisions):
        raise AuditError(f"{db}: database or disk is full")

    with monkeypatch.context() as patch:
        patch.setattr(AuditStore, "append_decisions", disk_full)
        assert score(studies, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 1
    with open_store(db) as store:
        assert store.decisions() == []
        pending = load_pending(store, load_bundle(tiny).sha256)
    assert len(pending) == 41
    first_run = {payload["run_id"] for payload in pending.values()}

    assert score(studies, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    with open_store(db) as store:
        rows = store.decisions()
        assert load_pending(store, load_bundle(tiny).sha256) == {}
    assert len(rows) == 41 and {r["run_id"] for r in rows} == first_run  # recorded, not scored again


def test_pending_rows_left_by_a_kill_after_the_audit_append_are_not_recorded_twice(studies, tiny, tmp_path):
    out, db = tmp_path / "w.csv", tmp_path / "a.sqlite"
    assert score(studies, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    bundle = load_bundle(tiny)
    with open_store(db) as store:
        rows = store.decisions()
        # As if the run had died after appending its decisions but before clearing its pending rows.
        save_pending(store, [(r["path"], r["sha256"], bundle.sha256, decision_from_row(r).__dict__) for r in rows])
    assert score(studies, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    with open_store(db) as store:
        assert len(store.decisions()) == len(rows) and load_pending(store, bundle.sha256) == {}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the decode workers")
def test_a_killed_decode_worker_costs_no_file_and_stalls_nothing(tmp_path, tiny):
    import signal
    import time

    folder, out, db = tmp_path / "in", tmp_path / "w.csv", tmp_path / "a.sqlite"
    folder.mkdir()
    for i in range(40):  # JPEG 2000: slow enough to kill a worker mid-run
        shutil.copy(pydicom_data.get_testdata_file("RG1_J2KI.dcm"), folder / f"{i:02d}.dcm")
    scorer = subprocess.Popen([sys.executable, "-m", "deploy.cli", "score", str(folder), "--bundle", str(tiny),
                               "--out", str(out), "--audit-db", str(db), "--workers", "2"],
                              cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not grandchildren(scorer.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # let it decode a few files first
        victims = grandchildren(scorer.pid)
        assert victims and scorer.poll() is None, "the run ended before a worker could be killed"
        os.kill(victims[0], signal.SIGKILL)
        output = scorer.communicate(timeout=120)[0].decode()
    finally:
        scorer.kill()
    assert scorer.returncode == 0, output
    rows = read_worklist(out)
    assert len(rows) == 40 and all(r["status"] == "scored" for r in rows)  # the killed worker's files were retried
    with open_store(db) as store:
        assert len(store.decisions()) == 40 and store.verify().ok


def write_nested_sequences(path: Path, depth: int = 400) -> Path:
    """A valid chest DICOM with a private sequence nested ``depth`` deep (undefined lengths): pydicom's reader recurses
    once per level and raises RecursionError (issue 14, item 1)."""
    import struct

    from tests.conftest import build_dataset

    build_dataset().save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    at = data.index(b"\x10\x00\x10\x00PN")  # Patient's Name (0010,0010): the nested (0009,1001) goes just before it
    item = struct.pack("<HH", 0x0009, 0x1001) + b"SQ\x00\x00\xff\xff\xff\xff" + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    path.write_bytes(data[:at] + item * depth + end * depth + data[at:])
    return path


def test_a_file_that_makes_the_reader_recurse_too_deep_is_recorded_and_the_run_goes_on(tmp_path, tiny, capsys):
    folder = tmp_path / "in"
    write_pngs(folder, 6)
    write_nested_sequences(folder / "nested.dcm")
    out, db = tmp_path / "w.csv", tmp_path / "a.sqlite"
    assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", "2") == 0
    rows = {Path(r["path"]).name: r for r in read_worklist(out)}
    assert len(rows) == 7 and sum(r["status"] == "scored" for r in rows.values()) == 6
    nested = rows["nested.dcm"]
    assert (nested["status"], nested["reason"]) == ("human_review", "malformed_file")
    assert "RecursionError" in nested["detail"] and "Fix:" in nested["detail"]
    assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", "2") == 0  # a rerun too


def test_a_second_run_on_the_same_store_is_refused_while_the_first_holds_it(tmp_path, tiny, capsys):
    from deploy.batch import run_lock

    folder = tmp_path / "in"
    write_pngs(folder, 4)
    out, db = tmp_path / "w.csv", tmp_path / "a.sqlite"
    with run_lock(db):  # a run in progress (flock: another open file description conflicts, even in one process)
        assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", db) == 1
        assert "another cxr-triage score run is using this audit store" in capsys.readouterr().err
    assert not out.exists()
    assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", db) == 0
    with open_store(db) as store:
        assert len(store.decisions()) == 4


def test_a_file_name_that_is_not_utf8_is_scored_recorded_by_its_escaped_name_and_resumed(tmp_path, tiny, capsys):
    from triage.audit import os_path

    folder, out, db = tmp_path / "in", tmp_path / "w.csv", tmp_path / "a.sqlite"
    write_pngs(folder, 3)
    latin1 = os.fsdecode(os.fsencode(folder) + b"/M\xfcller.png")  # Latin-1 from a legacy share: byte 0xfc
    os.rename(folder / "img002.png", latin1)
    assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    rows = {r["path"]: r for r in read_worklist(out)}
    recorded = f"{folder}/M\\xfcller.png"
    assert recorded in rows and rows[recorded]["status"] == "scored" and len(rows) == 3
    assert os_path(recorded) == latin1
    with open_store(db) as store:
        assert {d["path"] for d in store.decisions()} == set(rows) and store.verify().ok
    capsys.readouterr()
    assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    assert "(3 already audited with this bundle, skipped)" in capsys.readouterr().out
    assert {r["path"] for r in read_worklist(out)} == set(rows)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_fifos_devices_and_broken_links_are_recorded_never_opened(tmp_path, tiny, capsys):
    folder, out, db = tmp_path / "in", tmp_path / "w.csv", tmp_path / "a.sqlite"
    write_pngs(folder, 2)
    os.mkfifo(folder / "pipe.dcm")  # opening it would block the run
    os.symlink(os.devnull, folder / "device.dcm")
    os.symlink(tmp_path / "gone.dcm", folder / "dangling.dcm")
    assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    rows = {Path(r["path"]).name: r for r in read_worklist(out)}
    assert len(rows) == 5 and sum(r["status"] == "scored" for r in rows.values()) == 2
    problems = {"pipe.dcm": "a FIFO", "device.dcm": "a character device", "dangling.dcm": "does not exist"}
    for name, problem in problems.items():
        assert (rows[name]["status"], rows[name]["reason"]) == ("human_review", "file_unreadable")
        assert problem in rows[name]["detail"] and "Fix:" in rows[name]["detail"]
    assert "not scorable where found: 3" in capsys.readouterr().out
    assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0  # a rerun: not twice
    assert "(5 already audited with this bundle, skipped)" in capsys.readouterr().out
    with open_store(db) as store:
        assert len(store.decisions()) == 5 and store.verify().ok


@pytest.fixture
def shared_dir():
    """A folder that another account can enter (pytest's own temporary folders are private to their owner)."""
    base = Path(tempfile.mkdtemp(prefix="cxr-triage-test-"))
    base.chmod(0o755)
    yield base
    for folder, _, _ in os.walk(base):
        os.chmod(folder, 0o755)
    shutil.rmtree(base)


def as_service_account() -> list[str]:
    """The command prefix that runs a program as a non-root account: ``setpriv`` to nobody when the tests run as
    root (root reads any folder), none otherwise; skips when that account cannot run Python here."""
    if os.geteuid() != 0:
        return []
    nobody = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    if shutil.which("setpriv") is None or subprocess.run([*prefix, sys.executable, "-c", ""]).returncode != 0:
        pytest.skip("needs setpriv (util-linux) and a Python that the nobody account may run")
    return prefix


WALK = """import json, sys
from deploy.batch import walk_inputs
inputs = walk_inputs(sys.argv[1:])
print(json.dumps({"files": inputs.files, "unscorable": [[p.path, p.reason, p.detail] for p in inputs.unscorable]}))
"""


def test_a_folder_the_service_account_cannot_list_is_met_and_kept_for_human_review(shared_dir):
    """The walk as a non-root account (nobody when the tests run as root) meets a folder it may not list: that
    folder becomes a file_unreadable input (recorded like the FIFO above), its neighbours are still listed."""
    folder = shared_dir / "in"
    write_pngs(folder, 2)
    write_pngs(folder / "locked", 2, seed=1)
    (folder / "locked").chmod(0)
    run = subprocess.run([*as_service_account(), sys.executable, "-c", WALK, str(folder)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    inputs = json.loads(run.stdout)
    assert inputs["files"] == [str(folder / "img000.png"), str(folder / "img001.png")]
    [(path, reason, detail)] = inputs["unscorable"]
    assert (path, reason) == (str(folder / "locked"), "file_unreadable")
    assert "a folder this account cannot list (Permission denied)" in detail and "Fix:" in detail


def test_worklist_cells_from_files_never_run_as_spreadsheet_formulas(tmp_path):
    crafted = Decision(path="/data/=1+1.dcm", sha256="0" * 64, status="human_review", reason="not_dicom",
                       study_uid='=HYPERLINK("http://evil.example/","re-login")', detail="@SUM(A1:A9)", risk=0.25,
                       finding="-2+3")
    write_worklist([crafted], tmp_path / "w.csv")
    [row] = read_worklist(tmp_path / "w.csv")
    assert row["study_uid"] == "'" + crafted.study_uid and row["detail"] == "'@SUM(A1:A9)"
    assert row["finding"] == "'-2+3" and row["path"] == crafted.path and float(row["risk"]) == 0.25


def test_a_risk_near_one_is_shown_as_over_0_9999_never_as_certainty(tmp_path, capsys):
    hot = build_tiny_bundle(tmp_path / "hot", temperature=0.92)  # a white image's risk is 0.99997...
    folder, out = tmp_path / "in", tmp_path / "w.csv"
    folder.mkdir()
    for value in (0, 128, 255):
        Image.fromarray(np.full((96, 96), value, np.uint8), mode="L").save(folder / f"{value:03d}.png")
    assert score(folder, "--bundle", hot, "--out", out, "--audit-db", tmp_path / "a.sqlite", "--workers", 1) == 0
    summary = capsys.readouterr().out
    assert "(study risk threshold >0.9999)" in summary and "1.0000" not in summary
    white = next(r for r in read_worklist(out) if r["path"].endswith("255.png"))
    assert (white["risk"], white["study_risk"], white["threshold"]) == (">0.9999",) * 3
    with open_store(tmp_path / "a.sqlite") as store:
        assert 0.99997 < max(d["risk"] for d in store.decisions()) < 1  # the store keeps the exact value


def test_min_risk_lets_a_batch_of_low_risks_flag_nothing_and_is_recorded(tmp_path, tiny, capsys):
    folder, out, db = tmp_path / "in", tmp_path / "w.csv", tmp_path / "a.sqlite"
    write_pngs(folder, 20)  # risks up to about 0.7 with the tiny model
    assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1, "--min-risk", 0.9) == 0
    assert ("flagged: 0 of 20 studies: top 5% of this batch and at least --min-risk (study risk threshold 0.9000)"
            in capsys.readouterr().out)
    rows = read_worklist(out)
    assert {(r["flagged"], r["policy"], r["threshold"]) for r in rows} == {("0", "batch_top_k min_risk=0.9", "0.9000")}
    with open_store(db) as store:
        assert {(d["flagged"], d["policy"], d["threshold"]) for d in store.decisions()} == {
            (False, "batch_top_k min_risk=0.9", 0.9)}


def test_a_min_risk_outside_0_to_1_is_refused_before_scoring(tmp_path, tiny, capsys):
    write_pngs(tmp_path / "in", 1)
    assert score(tmp_path / "in", "--bundle", tiny, "--out", tmp_path / "w.csv", "--audit-db", tmp_path / "a.sqlite",
                 "--min-risk", 1.5) == 1
    assert "min risk 1.5 must be in [0, 1]" in capsys.readouterr().err and not (tmp_path / "a.sqlite").exists()


@pytest.mark.parametrize("make_out, problem", [
    (lambda out: out.mkdir(), "it is a folder"),
    (lambda out: os.mkfifo(out), "it is not a regular file"),
    (lambda out: os.symlink(os.devnull, out), "it is not a regular file"),  # a rename replaces the link, writes nothing
], ids=["folder", "fifo", "link-to-device"])
def test_an_out_that_cannot_take_the_worklist_is_refused_before_scoring(tmp_path, tiny, capsys, make_out, problem):
    write_pngs(tmp_path / "in", 2)
    out, db = tmp_path / "w.csv", tmp_path / "a.sqlite"
    make_out(out)
    assert score(tmp_path / "in", "--bundle", tiny, "--out", out, "--audit-db", db) == 1
    error = capsys.readouterr().err
    assert f"{out}: cannot write the worklist here: {problem}" in error and "Fix: pass --out" in error
    assert ".tmp" not in error and not db.exists()  # refused before the store was opened or a file scored


@pytest.mark.skipif(not Path("/proc/version").is_file(), reason="needs Linux /proc")
def test_an_out_in_a_folder_where_no_file_can_be_created_is_refused_before_scoring(tmp_path, tiny, capsys):
    write_pngs(tmp_path / "in", 2)
    db = tmp_path / "a.sqlite"
    assert score(tmp_path / "in", "--bundle", tiny, "--out", "/proc/worklist.csv", "--audit-db", db) == 1
    error = capsys.readouterr().err
    assert "/proc/worklist.csv: cannot write the worklist here: cannot create a file in /proc" in error
    assert not db.exists()


def test_an_input_with_nothing_to_score_is_a_warning_and_exit_code_3(tmp_path, tiny, capsys):
    folder, out = tmp_path / "in", tmp_path / "w.csv"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an input")
    out.write_text("yesterday's worklist\n")
    assert score(folder, "--bundle", tiny, "--out", out, "--audit-db", tmp_path / "a.sqlite") == 3
    assert f"warning: nothing to score under {folder}" in capsys.readouterr().err
    assert out.read_text().splitlines() == [",".join(WORKLIST_COLUMNS)]  # never yesterday's list read as today's


def test_a_bundle_other_than_the_pinned_one_is_refused_before_scoring(tmp_path, tiny, capsys, monkeypatch):
    """Item 19: ``--expect-bundle-sha256`` (default ``$CXR_TRIAGE_BUNDLE_SHA256``) pins the bundle a site approved."""
    write_pngs(tmp_path / "in", 2)
    out, db = tmp_path / "w.csv", tmp_path / "a.sqlite"
    pinned = load_bundle(tiny).sha256
    assert score(tmp_path / "in", "--bundle", tiny, "--out", out, "--audit-db", db, "--expect-bundle-sha256",
                 "f" * 64) == 1
    [error] = capsys.readouterr().err.splitlines()
    assert f"bundle sha256 {pinned} is not the pinned {'f' * 64}" in error and "Fix:" in error
    assert not db.exists() and not out.exists()
    monkeypatch.setenv("CXR_TRIAGE_BUNDLE_SHA256", pinned)
    assert score(tmp_path / "in", "--bundle", tiny, "--out", out, "--audit-db", db, "--workers", 1) == 0
    assert f"(sha256 {pinned})" in capsys.readouterr().out and len(read_worklist(out)) == 2


def test_send_results_refuses_heatmap_destinations_it_cannot_honour(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(tmp_path), "--send-results", "PACS@127.0.0.1:104,heatmap"])
    assert exit_info.value.code == 2 and "sends each study's SR only, not heatmaps" in capsys.readouterr().err


def test_a_new_file_is_hashed_once_from_the_bytes_read_once(make_dicom, tiny, monkeypatch):
    """The decode task reads each file once and hashes those bytes once: a radiograph's sha256 costs ~5 ms a file,
    which the batch scorer's throughput paid twice (prepare_file, then read_radiograph_bytes)."""
    import hashlib

    from triage.pipeline import prepare_file

    path = make_dicom()
    data = path.read_bytes()
    real_sha256, hashed = hashlib.sha256, []

    def counting_sha256(*args, **kwargs):
        hashed.extend(a for a in args if a == data)
        return real_sha256(*args, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", counting_sha256)
    prepared = prepare_file(str(path), load_bundle(tiny).preprocessing)
    assert prepared.model_input is not None, prepared.detail
    assert prepared.sha256 == real_sha256(data).hexdigest()
    assert len(hashed) == 1


def test_the_model_runs_on_the_files_ready_instead_of_waiting_for_a_full_batch():
    """A batch is cut when the next decoded file is not ready yet, so ONNX Runtime runs while the decode processes
    work (it used to wait for 16 files, leaving the model idle during decoding and the decoders idle after 4)."""
    from deploy.batch import _batches
    from triage.pipeline import Known, Prepared

    scorable = [Prepared(f"{i}.dcm", f"{i:064x}", model_input=np.zeros((1, 4, 4), np.float32)) for i in range(5)]
    stream = [scorable[0], scorable[1], Known("old.dcm", "0" * 64), scorable[2], scorable[3], scorable[4]]
    ready = iter([True, False, True, True, True, False])  # after each item: is the next one decoded already?
    batches = [[item.path for item in batch] for batch in _batches(stream, 2, lambda: next(ready))]
    assert batches == [["0.dcm", "1.dcm"], ["old.dcm", "2.dcm", "3.dcm"], ["4.dcm"]]  # cut: not ready, full, end


def test_onnx_runtime_threads_leave_the_decode_processes_their_cores():
    from deploy.batch import model_threads

    cores = len(os.sched_getaffinity(0))
    assert [model_threads(w) for w in (0, 1, cores, cores + 3)] == [cores, max(1, cores - 1), 1, 1]
