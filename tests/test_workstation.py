"""The workstation app against real DICOM peers: pynetdicom SCP, dcmtk echoscu/storescu/storescp/dsrdump."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, ComputedRadiographyImageStorage

from deploy.workstation.config import Config, ConfigError, Destination, load_config
from deploy.workstation.inbox import InvalidUIDError, check_uid, instance_path
from deploy.workstation.service import Workstation
from deploy.workstation.status import status_lines
from tests.tiny_bundle import build_tiny_bundle
from triage.audit import open_store
from triage.bundle import sha256_file

REPO = Path(__file__).resolve().parents[1]
needs_dcmtk = pytest.mark.skipif(not all(shutil.which(t) for t in ("echoscu", "storescu", "storescp", "dsrdump")),
                                 reason="needs dcmtk (apt-get install dcmtk; scripts/test.sh installs it)")
CALLER = "MODALITY"


def wait_for(condition: Callable[[], object], timeout_s: float = 20.0, what: str = "condition") -> object:
    """Poll ``condition`` until truthy or the deadline; returns its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def decisions(db: Path, **filters) -> list[dict]:
    if not db.exists():
        return []
    with open_store(db) as store:
        return store.decisions(**filters)


@pytest.fixture
def storescp(tmp_path):
    """A real dcmtk storescp (AE DEST) receiving our reports into a folder; yields (destination, folder)."""
    folder, port = tmp_path / "received", free_port()
    folder.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(folder), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: listening(port), 10, "storescp to listen")
        yield Destination("DEST", "127.0.0.1", port), folder
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def start_station(config: Config):
    station, stop = Workstation(config), threading.Event()
    thread = threading.Thread(target=station.run, args=(stop,), daemon=True)
    thread.start()
    wait_for(station.ready.is_set, 30, "the workstation to start")
    return station, stop, thread


def running_station(tmp_path: Path, destination: Destination, bundle: Path | None):
    """An in-process workstation on a free port reporting to ``destination``; stopped when the generator ends."""
    config = Config(port=0, allow_ae=(CALLER,), inbox=tmp_path / "inbox", audit_db=tmp_path / "audit.sqlite",
                    destinations=(destination,), quiet_period_s=0.3, poll_s=0.1, retry_base_s=0.2, device="cpu",
                    bundle=bundle)
    station, stop, thread = start_station(config)
    yield station
    stop.set()
    thread.join(timeout=20)
    assert not thread.is_alive()


@pytest.fixture
def station(tmp_path, storescp):
    """A workstation with the bundled model, reports to storescp; stopped at teardown."""
    yield from running_station(tmp_path, storescp[0], None)


@pytest.fixture
def tiny_station(tmp_path, storescp):
    """A workstation with the tiny bundle: it scores synthetic images, which the default
    bundle's out-of-distribution gate rightly refuses."""
    yield from running_station(tmp_path, storescp[0], build_tiny_bundle(tmp_path / "tiny"))


# storescu proposes uncompressed syntaxes unless told which compressed one the file uses.
PROPOSE = {"1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.70": "-xs",
           "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.4.90": "-xv",
           "1.2.840.10008.1.2.4.91": "-xw"}


def storescu(port: int, *files: Path, caller: str = CALLER) -> subprocess.CompletedProcess:
    """Send each file with real dcmtk storescu, proposing its own transfer syntax; the last failure or success."""
    result = None
    for path in files:
        syntax = str(dcmread(path, stop_before_pixels=True).file_meta.get("TransferSyntaxUID", ""))
        result = subprocess.run(["storescu", PROPOSE.get(syntax, "-x="), "-aet", caller, "-aec", "CXR_TRIAGE",
                                 "127.0.0.1", str(port), str(path)], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            return result
    return result


# -- real peers ---------------------------------------------------------------------------------


@needs_dcmtk
def test_echo_from_allowed_ae_and_refusal_of_an_unlisted_one(station):
    ok = subprocess.run(["echoscu", "-aet", CALLER, "-aec", "CXR_TRIAGE", "127.0.0.1", str(station.scp.port)],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "CXR_TRIAGE", "127.0.0.1", str(station.scp.port)],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr


@needs_dcmtk
def test_real_chest_and_non_chest_studies_are_audited_and_the_sr_comes_back(station, storescp, shared_data, tmp_path):
    chest = shared_data / "dicom" / "chest" / "siim-cr-mono2-jpeg-baseline.dcm"
    hip = shared_data / "dicom" / "out-of-scope" / "fuji-cr-hip-mono2-jpegls-lossless.dcm"
    sent = storescu(station.scp.port, chest, hip)
    assert sent.returncode == 0, sent.stderr
    db = station.config.audit_db
    chest_uid, hip_uid = (str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in (chest, hip))
    row = wait_for(lambda: decisions(db, study_uid=chest_uid), what="the chest decision")[0]
    assert row["status"] == "scored" and 0 <= row["risk"] <= 1 and row["policy"] == "stream_threshold"
    assert row["threshold"] == pytest.approx(station.bundle.threshold)
    hip_row = wait_for(lambda: decisions(db, study_uid=hip_uid), what="the hip decision")[0]
    assert hip_row["status"] == "human_review" and hip_row["reason"] == "body_part_out_of_scope"

    _, received = storescp
    reports = wait_for(lambda: len(list(received.glob("SR*"))) == 2 and sorted(received.glob("SR*")), what="2 SRs")
    dumps = {}
    for report in reports:
        dump = subprocess.run(["dsrdump", "+Pu", str(report)], capture_output=True, text=True, timeout=30)
        assert dump.returncode == 0, dump.stderr
        dumps[str(dcmread(report).StudyInstanceUID)] = dump.stdout
    chest_dump = dumps[chest_uid]
    assert "Comprehensive 3D SR" in chest_dump and "Not for diagnostic use" in chest_dump
    assert f'"{station.bundle.name}"' in chest_dump and f'"{station.bundle.version}"' in chest_dump
    assert "Imaging Measurement Report" in chest_dump and "Threshold Value" in chest_dump
    assert str(dcmread(chest, stop_before_pixels=True).SOPInstanceUID) in chest_dump
    assert "body_part_out_of_scope" in dumps[hip_uid]
    # a delivered report leaves the outbox once its success status is in and the association is released
    wait_for(lambda: not list(station.config.outbox_dir.glob("*/*.dcm")), 10, "the delivered reports to leave")


def test_unsupported_sop_class_is_refused_and_bad_uids_get_cannot_understand(station, make_dicom):
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", station.scp.port, ae_title="CXR_TRIAGE")
    try:
        assert assoc.is_established
        assert [c.abstract_syntax for c in assoc.rejected_contexts] == [CTImageStorage]
        ds = dcmread(make_dicom(modality="CR"))
        ds.StudyInstanceUID = "1.2.3/../../etc"
        status = assoc.send_c_store(ds)
        assert status.Status == 0xC000
    finally:
        assoc.release()
    assert not list(station.config.studies_dir.rglob("*etc*"))


@needs_dcmtk
def test_late_instance_rescores_and_appends_a_superseding_record(tiny_station, make_dicom, tmp_path):
    first = make_dicom("first.dcm", modality="CR")
    ds = dcmread(first)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    second = tmp_path / "second.dcm"
    ds.save_as(second)
    study, db = str(ds.StudyInstanceUID), tiny_station.config.audit_db
    assert storescu(tiny_station.scp.port, first).returncode == 0
    original = wait_for(lambda: decisions(db, study_uid=study), what="the first decision")
    assert len(original) == 1 and original[0]["supersedes"] is None
    assert storescu(tiny_station.scp.port, second).returncode == 0
    rows = wait_for(lambda: len(decisions(db, study_uid=study)) == 3 and decisions(db, study_uid=study), what="rescore")
    again = {r["path"]: r for r in rows[1:]}
    assert again.pop(original[0]["path"])["supersedes"] == original[0]["id"]
    assert [r["supersedes"] for r in again.values()] == [None]
    assert rows[1]["study_risk"] == rows[2]["study_risk"] == max(rows[1]["risk"], rows[2]["risk"])
    assert storescu(tiny_station.scp.port, second).returncode == 0  # a resend of the same bytes decides nothing new
    time.sleep(0)  # the next check is bounded by the service's own loop
    wait_for(lambda: not tiny_station.assembler.last_arrival_ and tiny_station.arrivals.empty(), what="the resend to settle")
    assert len(decisions(db, study_uid=study)) == 3


def test_a_file_dropped_in_the_watched_folder_is_stored_under_its_uids_and_scored(station, make_dicom):
    path = make_dicom("export.dcm", modality="DX")
    ds = dcmread(path, stop_before_pixels=True)
    shutil.copy(path, station.config.incoming_dir / "weird name from modality.dcm")
    row = wait_for(lambda: decisions(station.config.audit_db, study_uid=str(ds.StudyInstanceUID)), what="decision")[0]
    expected = instance_path(station.config.studies_dir, ds.StudyInstanceUID, ds.SOPInstanceUID, sha256_file(path))
    assert row["path"] == str(expected)
    assert not list(station.config.incoming_dir.iterdir())
    lines = status_lines(station.config)
    assert lines[0].startswith("queue: 0 instance(s)") and "provider: CPUExecutionProvider" in "\n".join(lines)
    assert ds.StudyInstanceUID in "\n".join(lines)


# -- killed and restarted -------------------------------------------------------------------------


def service(tmp_path: Path, port: int, quiet_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "workstation", "--port", str(port), "--allow-ae", CALLER, "--inbox",
         str(tmp_path / "inbox"), "--audit-db", str(tmp_path / "audit.sqlite"), "--quiet-period", str(quiet_s),
         "--device", "cpu"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "service.log", "ab"))


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


class SlowProxy:
    """A TCP relay that forwards the sender's bytes at ``bytes_per_s``, so a transfer is reliably mid-way when we kill."""

    def __init__(self, target_port: int, bytes_per_s: int = 2_000_000) -> None:
        self.target_port, self.bytes_per_s, self.forwarded = target_port, bytes_per_s, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            client, _ = self.server.accept()
        except OSError:
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        back = threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True)
        back.start()
        self._pipe(client, upstream, True)
        back.join(timeout=10)

    def _pipe(self, source: socket.socket, sink: socket.socket, throttle: bool) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
                if throttle:
                    self.forwarded += len(chunk)
                    time.sleep(len(chunk) / self.bytes_per_s)
        except OSError:
            pass
        finally:  # either side gone: cut both, so the sender sees the failure at once
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=10)


@pytest.fixture
def slow_proxy():
    """Factory for SlowProxy relays; every one is closed at teardown."""
    made: list[SlowProxy] = []
    yield lambda port: made.append(SlowProxy(port)) or made[-1]
    for proxy in made:
        proxy.close()


@needs_dcmtk
def test_killed_mid_transfer_and_restarted_loses_nothing_and_decides_once(tmp_path, make_dicom, processes, slow_proxy):
    port, db = free_port(), tmp_path / "audit.sqlite"
    small = [make_dicom(f"s{i}.dcm", modality="CR") for i in range(2)]
    big = make_dicom("big.dcm", modality="CR", rows=2048, cols=2048, bits_stored=16)  # 8 MB through a 2 MB/s relay
    processes.append(service(tmp_path, port, quiet_s=30))  # long quiet period: received, not yet decided
    wait_for(lambda: listening(port), 30, "the service to listen")
    assert storescu(port, *small).returncode == 0
    proxy = slow_proxy(port)
    slow = subprocess.Popen(["storescu", "-td", "10", "-aet", CALLER, "-aec", "CXR_TRIAGE", "127.0.0.1", str(proxy.port), str(big)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.append(slow)
    wait_for(lambda: proxy.forwarded > 1_000_000, 20, "the big transfer to be in flight")
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait(timeout=10)
    assert slow.wait(timeout=20) != 0  # the sender saw no success for the interrupted instance
    assert decisions(db) == []
    big_sop = str(dcmread(big, stop_before_pixels=True).SOPInstanceUID)
    assert not list((tmp_path / "inbox" / "studies").rglob(f"{big_sop}.*.dcm"))  # never a half file under a UID name

    processes.append(service(tmp_path, port, quiet_s=0.2))
    wait_for(lambda: listening(port), 30, "the restarted service")
    assert storescu(port, big).returncode == 0  # the sender retries the instance that failed
    uids = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in [*small, big]}
    wait_for(lambda: {r["study_uid"] for r in decisions(db)} == uids, 30, "all three studies decided")
    # no partial instance left (the state file's own temporary may exist while the live service rewrites it)
    assert not list((tmp_path / "inbox" / "studies").rglob("*.part"))
    processes[-1].send_signal(signal.SIGTERM)
    assert processes[-1].wait(timeout=20) == 0

    processes.append(service(tmp_path, port, quiet_s=0.2))  # a third start finds nothing new to decide
    wait_for(lambda: listening(port), 30, "the third start")
    time_limit = time.monotonic() + 1.5
    wait_for(lambda: time.monotonic() > time_limit, 5, "a grace period for a (wrong) duplicate")
    rows = decisions(db)
    assert len(rows) == 3 and len({r["path"] for r in rows}) == 3
    with open_store(db) as store:
        assert store.verify().ok


@needs_dcmtk
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the decoder process")
def test_a_killed_decoder_process_costs_no_study(tiny_station, make_dicom):
    from tests.processes import grandchildren

    first, second = make_dicom("first.dcm", modality="CR"), make_dicom("second.dcm", modality="CR")
    assert storescu(tiny_station.scp.port, first).returncode == 0
    uid = str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    wait_for(lambda: decisions(tiny_station.config.audit_db, study_uid=uid), what="the first decision")
    victims = grandchildren(os.getpid())
    assert victims, "no decoder process found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    assert storescu(tiny_station.scp.port, second).returncode == 0
    uid = str(dcmread(second, stop_before_pixels=True).StudyInstanceUID)
    row = wait_for(lambda: decisions(tiny_station.config.audit_db, study_uid=uid), what="the second decision")[0]
    assert row["status"] == "scored"  # decoded alone after the crash, then a fresh decoder took over


def test_a_decode_past_the_configured_timeout_goes_to_human_review(tmp_path, storescp):
    """A 1.4 kB JPEG 2000 frame that decodes to 16000 x 16000 (seconds of codec time) against --decode-timeout 0.5."""
    slow = REPO / "tests" / "fuzz" / "slow" / "j2k-16000px-flat.dcm"
    config = Config(port=0, allow_ae=(CALLER,), inbox=tmp_path / "inbox", audit_db=tmp_path / "audit.sqlite",
                    destinations=(storescp[0],), quiet_period_s=0.3, poll_s=0.1, retry_base_s=0.2, device="cpu",
                    bundle=build_tiny_bundle(tmp_path / "tiny"), decode_timeout_s=0.5)
    station, stop, thread = start_station(config)
    try:
        shutil.copy(slow, config.incoming_dir / "slow.dcm")
        uid = str(dcmread(slow, stop_before_pixels=True).StudyInstanceUID)
        row = wait_for(lambda: decisions(config.audit_db, study_uid=uid), 60, "the decision")[0]  # the record names the study
        assert (row["status"], row["reason"]) == ("human_review", "decode_timeout")
        assert "0.5 s" in row["detail"]
    finally:
        stop.set()
        thread.join(timeout=20)


# -- hardening (issue 14) ---------------------------------------------------------------------------


def watched_station(tmp_path: Path, **kwargs):
    """An in-process workstation with the tiny bundle fed through the watched folder; yields it, stops at the end."""
    config = Config(**{"port": 0, "allow_ae": (CALLER,), "inbox": tmp_path / "inbox", "audit_db": tmp_path / "audit.sqlite",
                       "quiet_period_s": 0.1, "poll_s": 0.05, "device": "cpu",
                       "bundle": build_tiny_bundle(tmp_path / "tiny"), **kwargs})
    station, stop, thread = start_station(config)
    try:
        yield station, thread
    finally:
        stop.set()
        thread.join(timeout=20)


def test_the_watched_folder_goes_on_after_an_oversized_and_a_deeply_nested_file(tmp_path, make_dicom, caplog):
    """Item 3: a sparse file over MAX_FILE_BYTES is moved to rejected/ unread; a file whose sequences nest 400
    deep is recorded for human review; the next file is still claimed and scored."""
    from tests.test_batch import write_nested_sequences
    from triage.ingest import MAX_FILE_BYTES

    big, nested = tmp_path / "a-big.dcm", write_nested_sequences(tmp_path / "b-nested.dcm")
    with open(big, "wb") as handle:
        handle.truncate(4 * 2**30)  # sparse: no disk, but reading it would take 4 GiB of memory
    good = make_dicom("c-good.dcm", modality="CR")
    uid = str(dcmread(good, stop_before_pixels=True).StudyInstanceUID)
    for station, _ in watched_station(tmp_path):
        for path in (big, nested, good):
            shutil.move(path, station.config.incoming_dir / path.name)
        db = station.config.audit_db
        wait_for(lambda: decisions(db, study_uid=uid), what="the file dropped after the bad ones")
        [bad] = wait_for(lambda: [r for r in decisions(db) if r["reason"] == "malformed_file"], what="the nested file")
        assert bad["status"] == "human_review" and "RecursionError" in bad["detail"]
        assert [p.name for p in station.config.rejected_dir.iterdir()] == ["a-big.dcm"]
        assert not list(station.config.incoming_dir.iterdir())
    assert f"a-big.dcm: the file is 4096 MiB, over the {MAX_FILE_BYTES >> 20} MiB limit" in caplog.text
    assert "Fix:" in caplog.text and "moved to" in caplog.text


def test_a_locked_audit_store_keeps_the_study_queued_until_it_is_free(tmp_path, make_dicom, monkeypatch, caplog):
    """Item 4: another program holds BEGIN EXCLUSIVE past the busy timeout; the service retries, then decides once."""
    import sqlite3

    import triage.audit.sqlite

    monkeypatch.setattr(triage.audit.sqlite, "BUSY_TIMEOUT_MS", 200)  # the store's lock wait, 30 s in service
    dropped = make_dicom("locked.dcm", modality="CR")
    uid = str(dcmread(dropped, stop_before_pixels=True).StudyInstanceUID)
    for station, thread in watched_station(tmp_path, audit_retry_base_s=0.1, audit_retry_max_s=0.4):
        other = sqlite3.connect(station.config.audit_db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            shutil.move(dropped, station.config.incoming_dir / dropped.name)
            wait_for(lambda: caplog.text.count("stay queued, retry in") >= 2, what="two failed attempts")
            assert thread.is_alive()
        finally:
            other.execute("COMMIT")
            other.close()
        rows = wait_for(lambda: decisions(station.config.audit_db, study_uid=uid), what="the decision once free")
        assert len(rows) == 1 and rows[0]["status"] == "scored"
    assert "database is locked" in caplog.text and "Fix:" in caplog.text


def test_a_report_that_never_reached_the_outbox_is_rebuilt_at_the_next_start(tmp_path, make_dicom, caplog):
    """Item 12: the outbox cannot be written (a file where its folder goes); the service goes on, and the next
    start queues the decided study's report once."""
    from deploy.workstation.outbox import destination_key

    nobody = Destination("NOBODY", "127.0.0.1", 9)  # nothing listens: the report stays in the outbox
    blocker = tmp_path / "inbox" / "outbox" / destination_key(nobody)
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"")
    dropped = make_dicom("report-me.dcm", modality="CR")
    uid = str(dcmread(dropped, stop_before_pixels=True).StudyInstanceUID)
    settings = {"destinations": (nobody,), "retry_base_s": 60}
    for station, thread in watched_station(tmp_path, **settings):
        shutil.move(dropped, station.config.incoming_dir / dropped.name)
        wait_for(lambda: decisions(station.config.audit_db, study_uid=uid), what="the decision")
        wait_for(lambda: "rebuilt at the next start" in caplog.text, what="the outbox error")
        assert thread.is_alive() and not station.outbox.pending()
    blocker.unlink()
    for station, _ in watched_station(tmp_path, **settings):
        [report] = station.outbox.pending()
        assert str(dcmread(report).StudyInstanceUID) == uid
    for station, _ in watched_station(tmp_path, **settings):  # a third start: already in the outbox
        assert len(station.outbox.pending()) == 1


@needs_dcmtk
def test_a_c_store_resend_with_other_pixels_is_decided_as_new_beside_the_audited_file(tiny_station, make_dicom, tmp_path):
    """Item 13 over C-STORE: the audited file stays as it was; the other version is a new instance of the study."""
    original = make_dicom("v1.dcm", modality="CR")
    changed = dcmread(original)
    changed.PixelData = bytes(len(changed.PixelData))  # same SOP Instance UID, other pixels
    changed.save_as(tmp_path / "v2.dcm")
    study, db, port = str(changed.StudyInstanceUID), tiny_station.config.audit_db, tiny_station.scp.port
    assert storescu(port, original).returncode == 0
    [first] = wait_for(lambda: decisions(db, study_uid=study), what="the first decision")
    assert storescu(port, original, tmp_path / "v2.dcm").returncode == 0  # identical bytes, then other pixels
    rows = wait_for(lambda: len(decisions(db, study_uid=study)) == 3 and decisions(db, study_uid=study), what="rescore")
    again = {row["path"]: row for row in rows[1:]}
    assert again.pop(first["path"])["supersedes"] == first["id"] and sha256_file(Path(first["path"])) == first["sha256"]
    [new] = again.values()
    assert new["supersedes"] is None and new["sha256"] == sha256_file(Path(new["path"])) != first["sha256"]
    assert new["study_risk"] == max(rows[1]["risk"], rows[2]["risk"])  # the study risk covers every stored version


def test_a_dropped_file_of_another_patient_is_rejected_and_no_report_mixes_identities(tmp_path, make_dicom, caplog):
    """Item 11, watched folder: the same one-patient check as the SCP (assembler.check_patient); the file is moved
    to rejected/ with an ERROR line naming UIDs and tags, never values, and is neither stored nor decided."""
    from tests.conftest import SYNTHETIC_PATIENT_ID
    from tests.test_workstation_intake import OTHER_ID, OTHER_NAME

    first = make_dicom("first.dcm", modality="CR")
    study = str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    other = dcmread(make_dicom("other.dcm", modality="CR", patient_name=OTHER_NAME, patient_id=OTHER_ID))
    other.StudyInstanceUID = study
    other.save_as(tmp_path / "other.dcm")
    settings = {"destinations": (Destination("NOBODY", "127.0.0.1", 9),), "retry_base_s": 60}  # reports stay queued
    for station, thread in watched_station(tmp_path, **settings):
        db = station.config.audit_db
        shutil.move(first, station.config.incoming_dir / first.name)
        [decided] = wait_for(lambda: decisions(db, study_uid=study), what="the first patient's decision")
        shutil.move(tmp_path / "other.dcm", station.config.incoming_dir / "other.dcm")
        [rejected] = wait_for(lambda: list(station.config.rejected_dir.glob("*")), what="the rejection")
        assert rejected.name == "other.dcm" and thread.is_alive() and not list(station.config.incoming_dir.iterdir())
        assert decisions(db, study_uid=study) == [decided]
        assert [p.name for p in (station.config.studies_dir / study).glob("*.dcm")] == [Path(decided["path"]).name]
        reports = [dcmread(path) for path in station.outbox.pending()]
    assert [report.PatientID for report in reports] == [SYNTHETIC_PATIENT_ID]
    assert "other.dcm: instance " in caplog.text and "(0010,0020) Patient ID" in caplog.text and "moved to" in caplog.text
    assert OTHER_ID not in caplog.text and OTHER_NAME not in caplog.text
