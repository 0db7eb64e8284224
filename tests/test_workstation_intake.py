"""The workstation's intake against real peers: size limit during receipt, pre-association timeout,
one patient per study (SCP refusal, report guard), content-addressed storage.
Peers: dcmtk storescu/echoscu, a pynetdicom SCU, raw sockets."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from deploy.workstation.assembler import PatientMismatchError, check_patient
from deploy.workstation.report import build_study_report
from deploy.workstation.scp import STATUS_PATIENT_MISMATCH, StorageSCP, message_bytes
from tests.conftest import SYNTHETIC_PATIENT_ID, SYNTHETIC_PATIENT_NAME
from triage.audit import Decision
from triage.bundle import sha256_file

needs_dcmtk = pytest.mark.skipif(not all(shutil.which(t) for t in ("echoscu", "storescu")),
                                 reason="needs dcmtk (apt-get install dcmtk; scripts/test.sh installs it)")
CALLER, OTHER_NAME, OTHER_ID = "MODALITY", "OTHER^PATIENT", "OTHER-ID-4711"


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def scp_temp(tmp_path, monkeypatch) -> Path:
    """pynetdicom's temporary files for received data sets go here (it uses ``tempfile``'s folder)."""
    folder = tmp_path / "scp-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def start_scp(tmp_path: Path, **kwargs) -> tuple[StorageSCP, list]:
    arrivals: list = []
    scp = StorageSCP("CXR_TRIAGE", [CALLER], tmp_path / "studies", arrivals.append, port=0, **kwargs)
    scp.start()
    return scp, arrivals


def storescu(port: int, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", CALLER, "-aec", "CXR_TRIAGE", "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=30)


def same_study(path: Path, study_uid: str) -> Path:
    """Rewrite ``path`` into study ``study_uid`` (a second instance of one study)."""
    ds = dcmread(path)
    ds.StudyInstanceUID = study_uid
    ds.save_as(path)
    return path


# -- item 8: size limit during receipt, pre-association timeout ---------------------------------------


def test_message_bytes_counts_fragments_until_the_last_one():
    assert message_bytes(0, [b"\x00" + b"x" * 10, b"\x02" + b"x" * 5], limit=100) == 0  # a whole data set, then reset
    assert message_bytes(0, [b"\x03" + b"x" * 50, b"\x00" + b"x" * 60], limit=100) == 60  # command done, data set going
    assert message_bytes(90, [b"\x00" + b"x" * 11], limit=100) is None


@needs_dcmtk
def test_an_instance_over_the_limit_is_aborted_in_receipt_and_the_scp_keeps_serving(tmp_path, make_dicom, scp_temp):
    big = make_dicom("big.dcm", rows=512, cols=512, bits_stored=16)      # 512 KiB of pixels
    small = make_dicom("small.dcm", rows=128, cols=128, bits_stored=16)  # 32 KiB
    scp, arrivals = start_scp(tmp_path, max_instance_bytes=200_000)
    try:
        refused = storescu(scp.port, big)
        assert refused.returncode != 0 or "Abort" in refused.stderr + refused.stdout, refused.stderr
        wait_until(lambda: scp.active_associations() == 0, 10, "the aborted association to end")
        assert not list((tmp_path / "studies").rglob("*.dcm")) and arrivals == []
        assert not list(scp_temp.iterdir()), "the aborted transfer left its temporary file"
        accepted = storescu(scp.port, small)
        assert accepted.returncode == 0, accepted.stderr
        assert [dcmread(a.path).SOPInstanceUID for a in arrivals] == [dcmread(small).SOPInstanceUID]
        assert arrivals[0].path.read_bytes()[128:132] == b"DICM"
    finally:
        scp.stop()


@needs_dcmtk
def test_silent_and_stalled_connections_are_dropped_so_a_modality_still_gets_through(tmp_path, make_dicom, scp_temp):
    scp, arrivals = start_scp(tmp_path, max_associations=2, acse_timeout_s=0.5)
    silent, stalled = socket.create_connection(("127.0.0.1", scp.port)), socket.create_connection(("127.0.0.1", scp.port))
    try:
        stalled.sendall(b"\x01\x00")  # the first bytes of an A-ASSOCIATE-RQ header, then nothing
        wait_until(lambda: scp.active_associations() == 2, 5, "both connections to take a slot")
        wait_until(lambda: scp.active_associations() == 0, 5, "the silent and the stalled connection to be dropped")
        echo = subprocess.run(["echoscu", "-aet", CALLER, "-aec", "CXR_TRIAGE", "127.0.0.1", str(scp.port)],
                              capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        assert storescu(scp.port, make_dicom(rows=128, cols=128)).returncode == 0 and len(arrivals) == 1
    finally:
        silent.close()
        stalled.close()
        scp.stop()


# -- item 11: one patient per study --------------------------------------------------------------------


def send(port: int, *paths: Path) -> list:
    """C-STORE each file from a pynetdicom SCU over one association; the response status data sets."""
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(dcmread(path)) for path in paths]
    finally:
        assoc.release()


def test_an_instance_of_another_patient_is_refused_with_its_tags_and_never_stored(tmp_path, make_dicom, scp_temp, caplog):
    first = make_dicom("first.dcm", rows=128, cols=128)
    study_uid = str(dcmread(first).StudyInstanceUID)
    same = same_study(make_dicom("same.dcm", rows=128, cols=128), study_uid)
    other = same_study(make_dicom("other.dcm", rows=128, cols=128, patient_name=OTHER_NAME, patient_id=OTHER_ID), study_uid)
    scp, arrivals = start_scp(tmp_path)
    try:
        ok, ok_too, refused = send(scp.port, first, same, other)
    finally:
        scp.stop()
    assert ok.Status == 0 and ok_too.Status == 0
    assert refused.Status == STATUS_PATIENT_MISMATCH
    assert sorted(refused.OffendingElement) == [0x00100010, 0x00100020]
    assert [dcmread(a.path).SOPInstanceUID for a in arrivals] == [dcmread(p).SOPInstanceUID for p in (first, same)]
    assert sorted(p.name for p in (tmp_path / "studies" / study_uid).glob("*.dcm")) == sorted(a.path.name for a in arrivals)
    logged = caplog.text
    assert "(0010,0020) Patient ID" in logged and str(dcmread(other).SOPInstanceUID) in logged
    assert not any(value in logged for value in (OTHER_NAME, OTHER_ID, SYNTHETIC_PATIENT_NAME, SYNTHETIC_PATIENT_ID))


def test_birth_date_alone_differs_and_a_study_stored_before_the_record_is_fixed_by_its_instance(tmp_path, make_dicom):
    study = tmp_path / "studies" / "1.2.3"
    study.mkdir(parents=True)
    stored = dcmread(make_dicom("stored.dcm"))
    stored.PatientBirthDate = "19700101"
    stored.save_as(study / "1.2.3.1.dcm")  # an inbox from before the per-study record existed
    later = dcmread(make_dicom("later.dcm"))
    later.PatientBirthDate = "19700102"
    with pytest.raises(PatientMismatchError, match=r"\(0010,0030\) Patient's Birth Date") as refused:
        check_patient(study, later)
    assert refused.value.keywords == ("PatientBirthDate",) and "1970" not in str(refused.value)
    later.PatientBirthDate = "19700101"
    check_patient(study, later)


def test_a_report_over_instances_of_two_patients_is_refused(make_dicom):
    one = dcmread(make_dicom("one.dcm"), stop_before_pixels=True)
    two = dcmread(make_dicom("two.dcm", patient_name=OTHER_NAME, patient_id=OTHER_ID), stop_before_pixels=True)
    two.StudyInstanceUID = one.StudyInstanceUID
    decision = Decision(path="/x.dcm", sha256="0" * 64, status="scored", study_uid=str(one.StudyInstanceUID))
    assert build_study_report([decision], [one, one]).PatientID == one.PatientID
    with pytest.raises(PatientMismatchError, match=str(two.SOPInstanceUID)) as refused:
        build_study_report([decision], [one, two])
    assert OTHER_ID not in str(refused.value) and OTHER_NAME not in str(refused.value)


# -- item 13: every version of an instance is kept -------------------------------------------------------


def test_a_c_store_resend_of_identical_bytes_is_a_no_op_and_one_with_other_pixels_is_kept_beside(tmp_path, make_dicom,
                                                                                                 scp_temp):
    original = make_dicom("v1.dcm", rows=128, cols=128)
    changed = dcmread(original)
    changed.PixelData = bytes(len(changed.PixelData))  # same SOP Instance UID, other pixels
    changed.save_as(tmp_path / "v2.dcm")
    scp, arrivals = start_scp(tmp_path)
    try:
        statuses = send(scp.port, original)
        first_inode = arrivals[0].path.stat().st_ino
        statuses += send(scp.port, original, tmp_path / "v2.dcm")
    finally:
        scp.stop()
    assert [status.Status for status in statuses] == [0, 0, 0]
    first, again, other = (arrival.path for arrival in arrivals)
    assert again == first and first.stat().st_ino == first_inode  # identical bytes: the file was not written again
    assert other != first and sorted(first.parent.glob("*.dcm")) == sorted([first, other])
    assert all(path.name == f"{changed.SOPInstanceUID}.{sha256_file(path)}.dcm" for path in (first, other))
    assert dcmread(first).PixelData == dcmread(original).PixelData and dcmread(other).PixelData == changed.PixelData
