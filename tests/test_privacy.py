"""Patient identifiers never leave the DICOM files: not in logs, worklists, audit stores or exports.

Real chest DICOMs (the bundled Kermany samples) get distinctive PatientName, PatientID,
PatientBirthDate and AccessionNumber values (and other identifying attributes), go through
the batch scorer and the workstation, and every output is searched for them. The one
exception is the workstation's DICOM SR, which must carry the patient and study
identifiers that file it into the source study (see ``deploy/workstation/report.py``).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComputedRadiographyImageStorage

from dashboards import data
from triage.audit import open_store

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "kermany"
CALLER = "MODALITY"
# (0010,0010), (0010,0020), (0010,0030), (0008,0050): each value is unique enough that any hit is a leak.
IDENTIFIERS = {"PatientName": "Quozzlewick^Philippa^Marguerite", "PatientID": "MRN77418829",
               "PatientBirthDate": "19370412", "AccessionNumber": "ACCX99120457"}
OTHER_IDENTIFIERS = {"OtherPatientIDs": "OTHERID5531", "PatientAddress": "17 Quillfeather Lane",
                     "PatientTelephoneNumbers": "555-0199-4471", "InstitutionName": "Saint Ibbotson Infirmary",
                     "OperatorsName": "Tech^Verbruggen", "ReferringPhysicianName": "Dr^Pemberthwaite"}
SR_LINK_KEYWORDS = {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "ReferringPhysicianName"}


def needles(values: dict[str, str]) -> list[str]:
    """Every form a value might be written in: as is, name components, an ISO date."""
    found = set()
    for keyword, value in values.items():
        found.add(value)
        if keyword.endswith("Name"):
            found.update(part for part in value.split("^") if len(part) > 3)
        if keyword == "PatientBirthDate":
            found.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    return sorted(found)


ALL_NEEDLES = needles({**IDENTIFIERS, **OTHER_IDENTIFIERS})


def leaks(where: str, blob: bytes | str) -> list[str]:
    """'where: needle' for each identifier found in ``blob`` (bytes compared as UTF-8 and UTF-16)."""
    raw = blob if isinstance(blob, bytes) else blob.encode("utf-8", errors="replace")
    hits = [n for n in ALL_NEEDLES if n.encode() in raw or n.encode("utf-16-le") in raw]
    return [f"{where}: {n}" for n in hits]


def tree_leaks(folder: Path) -> list[str]:
    """Leaks in every file under ``folder`` (the source DICOMs' own folder excluded by the caller)."""
    return [hit for path in sorted(folder.rglob("*")) if path.is_file() for hit in leaks(str(path), path.read_bytes())]


@pytest.fixture
def identified(tmp_path: Path) -> Path:
    """A folder of 4 real chest DICOMs carrying the identifiers, 1 out-of-scope (hand) and 1 truncated copy."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, sample in enumerate(sorted(SAMPLES.glob("kermany-0[1-6].dcm"))):
        ds = dcmread(sample)
        for keyword, value in {**IDENTIFIERS, **OTHER_IDENTIFIERS}.items():
            setattr(ds, keyword, value)
        ds.PatientIdentityRemoved = "NO"
        if i == 4:
            ds.BodyPartExamined, ds.StudyDescription = "HAND", "Hand 2 views"
        target = folder / f"study{i}.dcm"
        ds.save_as(target)
        if i == 5:
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        assert leaks(target.name, target.read_bytes()) or i == 5  # the needles really are in the inputs
    return folder


def cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def test_batch_scoring_outputs_hold_no_patient_identifiers(identified, tmp_path):
    out, db, export = tmp_path / "out", tmp_path / "out" / "audit.sqlite", tmp_path / "out" / "decisions.csv"
    run = cli("score", str(identified), "--out", str(out / "worklist.csv"), "--audit-db", str(db), "--workers", "1",
              "--device", "cpu")
    assert run.returncode == 0, run.stderr
    exported = cli("audit", "export", "--audit-db", str(db), "--out", str(export))
    assert exported.returncode == 0, exported.stderr
    with open_store(db) as store:
        rows = store.decisions()
        review_id = rows[0]["id"]
        store.append_review(review_id, "dr.a", "agree")
    assert {r["status"] for r in rows} == {"scored", "human_review"} and len(rows) == 6
    assert all(r["patient_pseudo_id"] and r["patient_pseudo_id"] != IDENTIFIERS["PatientID"] for r in rows[:4])
    decisions, reviews = data.read_decisions(db), data.read_reviews(db)
    data.pseudonymized_export(decisions, data.site_secret(db)).to_csv(out / "dashboard-export.csv", index=False)
    data.active_learning_queue(decisions, reviews, "pneumonia").to_csv(out / "dashboard-queue.csv", index=False)
    found = leaks("score stdout", run.stdout) + leaks("score stderr", run.stderr) + leaks("export stdout",
                                                                                          exported.stdout)
    found += tree_leaks(out)  # worklist, audit store (+ WAL), site secret, CSV export, dashboard exports
    assert found == []
    assert {p.name for p in out.iterdir()} >= {"worklist.csv", "audit.sqlite", "decisions.csv", "dashboard-export.csv",
                                               "dashboard-queue.csv"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def pacs():
    """A pynetdicom storage SCP (AE PACS) keeping every report it receives; yields (port, received datasets)."""
    received: list = []
    ae = AE(ae_title="PACS")
    ae.add_supported_context(Comprehensive3DSRStorage)
    handlers = [(evt.EVT_C_STORE, lambda event: received.append(event.dataset) or 0x0000)]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    yield server.server_address[1], received
    server.shutdown()


def test_the_workstation_outputs_hold_no_identifiers_and_its_sr_only_the_linking_ones(identified, tmp_path, pacs):
    pacs_port, reports = pacs
    port, inbox, db = free_port(), tmp_path / "inbox", tmp_path / "audit.sqlite"
    log = tmp_path / "service.log"
    with open(log, "wb") as log_handle:
        service = subprocess.Popen([sys.executable, "-m", "deploy.cli", "workstation", "--port", str(port),
                                    "--allow-ae", CALLER, "--inbox", str(inbox), "--audit-db", str(db),
                                    "--quiet-period", "0.5", "--device", "cpu", "--destination",
                                    f"PACS@127.0.0.1:{pacs_port}"], cwd=REPO, stdout=log_handle, stderr=log_handle)
    try:
        wait_for(lambda: b"workstation ready" in log.read_bytes(), what="the workstation to start")
        sources = [dcmread(p) for p in sorted(identified.glob("study[0-3].dcm"))]
        ae = AE(ae_title=CALLER)
        ae.add_requested_context(ComputedRadiographyImageStorage, sources[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
        assert assoc.is_established
        assert [assoc.send_c_store(ds).Status for ds in sources] == [0, 0, 0, 0]
        assoc.release()
        wait_for(lambda: len(reports) == 4, what="4 reports at the PACS")
        status = cli("workstation", "status", "--inbox", str(inbox), "--audit-db", str(db))
        assert status.returncode == 0, status.stderr
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=60)
    export = tmp_path / "decisions.csv"
    assert cli("audit", "export", "--audit-db", str(db), "--out", str(export)).returncode == 0
    found = leaks("service log", log.read_bytes()) + leaks("status", status.stdout) + leaks("export", export.read_bytes())
    found += leaks("audit store", db.read_bytes()) + leaks("audit WAL", Path(f"{db}-wal").read_bytes()
                                                            if Path(f"{db}-wal").exists() else b"")
    inbox_hits = tree_leaks(inbox)
    assert any("/studies/" in hit for hit in inbox_hits)  # the search finds them where they belong: received images
    # studies/ holds the received images, outbox/ the SRs until delivered (their identifiers are checked below)
    found += [hit for hit in inbox_hits if "/studies/" not in hit and "/outbox/" not in hit]
    assert found == []
    for report in reports:
        copied = {k for k in IDENTIFIERS.keys() | OTHER_IDENTIFIERS.keys() if str(report.get(k, "") or "")}
        assert copied == SR_LINK_KEYWORDS & copied and {"PatientName", "PatientID", "AccessionNumber"} <= copied
        assert str(report.PatientID) == IDENTIFIERS["PatientID"]  # files into the source patient's record
        for keyword in OTHER_IDENTIFIERS.keys() - SR_LINK_KEYWORDS:
            assert keyword not in report
