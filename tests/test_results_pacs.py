"""Issue 15: result objects in a real PACS. Orthanc (Debian ``orthanc``, ``orthanc-dicomweb``) runs on loopback
once per module; the workstation C-STOREs its TID 1500 SR and heatmap SC into it, the batch scorer's
``send_results`` and the DICOMweb STOW-RS path store SRs too; every object is read back through Orthanc's REST or
DICOMweb API, its content checked, and validated by dciodvfy (Debian ``dicom3tools``) with zero errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread

from deploy.results.send import Destination, send, send_results
from deploy.results.sr import NOT_FOR_DIAGNOSTIC_USE
from deploy.workstation.config import Config
from deploy.workstation.report import build_study_report
from tests.test_workstation import free_port, listening, start_station, wait_for
from tests.test_workstation_units import _content, _decision
from tests.tiny_bundle import build_tiny_bundle

ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.access(p, os.X_OK)), None)
DICOMWEB_PLUGIN = Path(os.environ.get("ORTHANC_DICOMWEB_PLUGIN", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
CALLING_AE = "CXR_TRIAGE"
SR_STORAGE, SC_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"

pytestmark = pytest.mark.skipif(ORTHANC is None or not DICOMWEB_PLUGIN.is_file(),
                                reason="needs Orthanc and its DICOMweb plugin (Debian orthanc, orthanc-dicomweb; "
                                       "scripts/test.sh installs them as root)")


class OrthancPeer:
    """A running Orthanc: its DIMSE destination, its REST root and its DICOMweb root."""

    def __init__(self, dicom_port: int, http_port: int) -> None:
        self.dicom_port, self.rest = dicom_port, f"http://127.0.0.1:{http_port}"
        self.destination = Destination("ORTHANC", "127.0.0.1", dicom_port)
        self.dicomweb = f"{self.rest}/dicom-web"

    def instances(self, study_uid: str) -> list[Dataset]:
        """Every instance Orthanc holds of ``study_uid``, parsed from ``/instances/{id}/file``."""
        query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
        ids = requests.post(f"{self.rest}/tools/find", json=query, timeout=10).json()
        return [dcmread(BytesIO(requests.get(f"{self.rest}/instances/{i}/file", timeout=10).content)) for i in ids]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> OrthancPeer:
    """Orthanc on loopback with a temp config: DICOM and HTTP ports, DICOMweb plugin, only our AE may store."""
    folder = tmp_path_factory.mktemp("orthanc")
    peer = OrthancPeer(free_port(), free_port())
    config = {
        "Name": "cxr-triage-tests", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "DicomAet": "ORTHANC", "DicomPort": peer.dicom_port, "HttpPort": int(peer.rest.rsplit(":", 1)[1]),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
        "DicomModalities": {"triage": [CALLING_AE, "127.0.0.1", 1]},
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: listening(peer.dicom_port) and listening(int(peer.rest.rsplit(":", 1)[1])), 30,
                 f"Orthanc to listen (log: {folder / 'orthanc.log'})")
        yield peer
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def dciodvfy_errors(dataset: Dataset, tmp_path: Path) -> list[str]:
    """dciodvfy's "Error" lines for ``dataset`` (dicom3tools); skips the test when dciodvfy is absent."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("needs dciodvfy (Debian dicom3tools)")
    path = tmp_path / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_the_workstation_c_stores_its_sr_and_heatmap_into_orthanc(orthanc, tmp_path, make_dicom):
    """Items 1-3: a study dropped into the watched folder reaches Orthanc as a TID 1500 SR and, the destination
    asking for heatmaps, an SC with the burned-in legend; both valid for dciodvfy."""
    config = Config(port=0, allow_ae=("MODALITY",), ae_title=CALLING_AE, inbox=tmp_path / "inbox",
                    audit_db=tmp_path / "audit.sqlite", quiet_period_s=0.2, poll_s=0.1, retry_base_s=0.2, device="cpu",
                    destinations=(Destination.parse(f"{orthanc.destination},heatmap"),),
                    bundle=build_tiny_bundle(tmp_path / "tiny", with_cam=True))
    source = dcmread(make_dicom("chest.dcm", modality="CR"), stop_before_pixels=True)
    station, stop, thread = start_station(config)
    try:
        config.incoming_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "chest.dcm", config.incoming_dir / "chest.dcm")
        received = wait_for(lambda: len(found := orthanc.instances(source.StudyInstanceUID)) == 2 and found, 60,
                            "the SR and the SC in Orthanc")
    finally:
        stop.set()
        thread.join(timeout=20)
    by_class = {str(ds.SOPClassUID): ds for ds in received}
    sr, sc = by_class[SR_STORAGE], by_class[SC_STORAGE]
    content = _content(sr)
    assert content["Comment"] == [NOT_FOR_DIAGNOSTIC_USE] and content["Worklist triage flag"][0] in ("Yes", "No")
    assert content["Algorithm Name"][0] == station.bundle.name
    assert f"sha256={station.bundle.sha256}" in content["Algorithm Parameters"]
    assert source.SOPInstanceUID in content["Source of Measurement"] + content.get("Source", [])
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert len({sr.SeriesInstanceUID, sc.SeriesInstanceUID, source.SeriesInstanceUID}) == 3
    assert sc.PatientID == sr.PatientID == source.PatientID
    for dataset in (sr, sc):
        assert dciodvfy_errors(dataset, tmp_path) == []


def test_stow_rs_destination_stores_the_sr_through_dicomweb(orthanc, make_dicom):
    """Item 4: a DICOMweb destination (STOW-RS to Orthanc's plugin), read back by WADO-RS."""
    source = dcmread(make_dicom(modality="CR"), stop_before_pixels=True)
    sr = build_study_report([_decision(study_uid=source.StudyInstanceUID)], [source])
    destination = Destination.parse(orthanc.dicomweb)
    assert destination.is_dicomweb and send(sr, destination, CALLING_AE) == ""
    stored = DICOMwebClient(orthanc.dicomweb).retrieve_instance(str(sr.StudyInstanceUID), str(sr.SeriesInstanceUID),
                                                                str(sr.SOPInstanceUID))
    assert _content(stored)["Comment"] == [NOT_FOR_DIAGNOSTIC_USE]


def test_a_dicomweb_destination_that_refuses_says_why(orthanc, make_dicom):
    source = dcmread(make_dicom(modality="CR"), stop_before_pixels=True)
    sr = build_study_report([_decision(study_uid=source.StudyInstanceUID)], [source])
    assert "404" in send(sr, Destination.parse(f"{orthanc.rest}/no-such-root"), CALLING_AE)


def test_send_results_stores_one_sr_per_study_of_a_batch(orthanc, make_dicom):
    """Item 3, batch part: ``send_results`` (``cxr-triage score --send-results``) sends each study's SR."""
    paths = [make_dicom(f"s{i}.dcm", modality="CR") for i in range(2)]
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    decisions = [_decision(path=str(p), study_uid=str(h.StudyInstanceUID), sop_uid=str(h.SOPInstanceUID))
                 for p, h in zip(paths, headers)]
    assert send_results(decisions, [orthanc.destination], CALLING_AE) == {str(h.StudyInstanceUID): "" for h in headers}
    for header in headers:
        [sr] = orthanc.instances(str(header.StudyInstanceUID))
        assert str(sr.SOPClassUID) == SR_STORAGE and sr.PatientID == header.PatientID


def test_send_results_reports_a_refusing_pacs_instead_of_raising(orthanc, make_dicom):
    path = make_dicom(modality="CR")
    header = dcmread(path, stop_before_pixels=True)
    decision = _decision(path=str(path), study_uid=str(header.StudyInstanceUID), sop_uid=str(header.SOPInstanceUID))
    problems = send_results([decision], [orthanc.destination], "STRANGER")  # an AE Orthanc does not know
    assert problems[str(header.StudyInstanceUID)].startswith(f"{orthanc.destination}: ")


def test_cxr_triage_score_send_results_files_each_study_report_in_orthanc(orthanc, tmp_path, make_dicom, capsys):
    """``cxr-triage score ... --send-results AE@HOST:PORT``: the run's studies' SRs reach Orthanc (the flag did not
    exist before)."""
    from deploy.cli import main

    folder = tmp_path / "batch"
    folder.mkdir()
    path = make_dicom("batch/one.dcm", modality="CR")
    study_uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    code = main(["score", str(folder), "--bundle", str(build_tiny_bundle(tmp_path / "tiny")), "--device", "cpu",
                 "--workers", "1", "--out", str(tmp_path / "worklist.csv"), "--audit-db", str(tmp_path / "a.sqlite"),
                 "--send-results", str(orthanc.destination), "--send-ae", CALLING_AE])
    assert code == 0 and "results: 1 study report(s) sent" in capsys.readouterr().out
    [sr] = orthanc.instances(study_uid)
    assert set(_content(sr)["Algorithm Name"]) == {"tiny-test"}
