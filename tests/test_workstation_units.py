"""Workstation parts without the network: config, UIDs, assembler, recalibration, guard, SR, outbox retries."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time

import numpy as np
import pytest
from pydicom import dcmread

from deploy.workstation.assembler import StudyAssembler, check_patient
from deploy.workstation.config import Config, ConfigError, Destination, load_config
from deploy.workstation.inbox import (InvalidUIDError, check_uid, claim_dropped, instance_path, remove_partials,
                                      store_instance, write_atomic)
from deploy.workstation.outbox import Outbox
from deploy.results.sr import NOT_FOR_DIAGNOSTIC_USE, PROBABILITY_UNIT, RISK, THRESHOLD, device_uid
from deploy.workstation.report import build_study_report
from triage.errors import REASONS
from deploy.workstation.service import Workstation
from deploy.workstation.stream import STARVATION_GUARD, SiteRecalibrator, StarvationGuard
from triage.audit import Decision, open_store
from triage.bundle import sha256_file
from triage.ingest import MAX_FILE_BYTES
from tests.conftest import SYNTHETIC_PATIENT_ID, SYNTHETIC_PATIENT_NAME
from tests.tiny_bundle import build_tiny_bundle


def test_config_file_then_flags_on_top(tmp_path):
    path = tmp_path / "ws.toml"
    path.write_text('port = 4242\nallow_ae = ["CR1", "DX2"]\ndestinations = ["PACS@10.0.0.5:104"]\nflag_rate = 0.1\n')
    config = load_config(path, {"port": 5000, "flag_rate": None, "inbox": str(tmp_path / "in")})
    assert (config.port, config.allow_ae, config.flag_rate) == (5000, ("CR1", "DX2"), 0.1)
    assert config.destinations == (Destination("PACS", "10.0.0.5", 104),) and config.inbox == tmp_path / "in"


@pytest.mark.parametrize("text, match", [
    ("prot = 1\n", "unknown key"), ("flag_rate = 1.5\n", "flag_rate"), ('allow_ae = ["A\\\\B"]\n', "AE title"),
    ('destinations = ["PACS:104"]\n', "AE@HOST:PORT"), ("quiet_period_s = -1\n", "quiet_period_s"),
    ("decode_timeout_s = 0\n", "decode_timeout_s"), ("max_instance_bytes = 0\n", "max_instance_bytes"),
    (f"max_instance_bytes = {MAX_FILE_BYTES + 1}\n", "max_instance_bytes"), ("acse_timeout_s = 0\n", "acse_timeout_s"),
])
def test_bad_config_names_the_key_and_the_fix(tmp_path, text, match):
    path = tmp_path / "ws.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


@pytest.mark.parametrize("bad", ["", "1.2.3/../../etc", "1.02.3", "a.b", "1." + "2" * 70, "../x", "1.2.3 x", "1..2", "1.2.3\n"])
def test_only_valid_uids_name_files(tmp_path, bad):
    with pytest.raises(InvalidUIDError, match="not a valid UID"):
        instance_path(tmp_path, bad, "1.2.3", "0" * 64)
    with pytest.raises(InvalidUIDError):
        check_uid(bad, "SOP Instance UID")
    digest = "ab" * 32
    assert instance_path(tmp_path, "1.2.3", "1.2.3.4", digest) == tmp_path / "1.2.3" / f"1.2.3.4.{digest}.dcm"


def test_atomic_write_leaves_no_part_and_partials_are_removed(tmp_path):
    target = tmp_path / "1.2" / "1.2.3.dcm"
    write_atomic(target, b"data")
    assert target.read_bytes() == b"data" and not list(tmp_path.rglob("*.part"))
    (tmp_path / "1.2" / "1.2.4.dcm.part").write_bytes(b"half")
    assert remove_partials(tmp_path) == 1 and not list(tmp_path.rglob("*.part"))


def test_dropped_files_are_claimed_by_uid_or_kept_by_hash(tmp_path, make_dicom):
    studies = tmp_path / "studies"
    dicom = make_dicom("drop me.dcm")
    ds, digest = dcmread(dicom, stop_before_pixels=True), sha256_file(dicom)
    study, path = claim_dropped(dicom, studies, check_patient)
    assert (study, path) == (ds.StudyInstanceUID, instance_path(studies, ds.StudyInstanceUID, ds.SOPInstanceUID, digest))
    junk = tmp_path / "notes.bin"
    junk.write_bytes(b"not dicom at all")
    study, path = claim_dropped(junk, studies, check_patient)
    assert study.startswith("no-uid-") and path.read_bytes() == b"not dicom at all" and not junk.exists()


def test_assembler_waits_for_the_quiet_period_after_the_last_instance():
    assembler = StudyAssembler(quiet_period_s=5)
    assembler.add("s1", "CR1", now=0)
    assembler.add("s1", "CR1", now=4)
    assert assembler.ready(now=8.9) == [] and assembler.next_due_in(8.9) == pytest.approx(0.1)
    assert assembler.ready(now=9) == [("s1", "CR1")] and len(assembler) == 0


def test_rolling_recalibration_tracks_the_target_rate_where_the_bundle_threshold_does_not():
    rng = np.random.default_rng(0)
    bundle_threshold, target = 0.5, 0.05
    shifted = rng.beta(5, 3, size=3000)  # a site whose risks all run high: 0.5 flags most studies
    recalibrator = SiteRecalibrator(bundle_threshold, target, window=200, min_history=20)
    flags = []
    for i, risk in enumerate(shifted):
        flags.append(bool(recalibrator.flags("siteA", f"s{i}", risk).flagged))
        recalibrator.learn("siteA", risk)
    assert np.mean(shifted >= bundle_threshold) > 0.5
    assert abs(np.mean(flags[200:]) - target) < 0.02
    other = recalibrator.flags("siteB", "x", 0.6)  # a new site starts from the bundle threshold
    assert other.threshold == bundle_threshold and other.policy == "stream_threshold" and other.flagged


def test_starvation_guard_promotes_only_unflagged_studies_past_max_wait():
    guard = StarvationGuard(max_wait_s=60)
    guard.track("old", 0, flagged=False)
    guard.track("new", 50, flagged=False)
    guard.track("hot", 0, flagged=True)
    assert guard.due(now=100) == ["old"] and guard.due(now=100) == []
    assert guard.due(now=111) == ["new"]


def _decision(**kwargs) -> Decision:
    base = dict(path="/x.dcm", sha256="0" * 64, status="scored", study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.1.1",
                bundle_name="demo", bundle_version="0.1", finding="pneumonia", risk=0.9, study_risk=0.9, threshold=0.7,
                flag_rate=0.05, policy="stream_threshold", flagged=True)
    return Decision(**{**base, **kwargs})


def _content(sr) -> dict[str, list]:
    """Every content item of ``sr``'s tree by concept name meaning: its text, code meaning, number or reference."""
    found: dict[str, list] = {}

    def walk(items):
        for item in items:
            value = (item.get("TextValue") or item.get("ConceptCodeSequence", [{}])[0].get("CodeMeaning")
                     or (item.MeasuredValueSequence[0] if "MeasuredValueSequence" in item else None)
                     or (item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID if "ReferencedSOPSequence" in item
                         else item.get("UID")))
            found.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(value)
            walk(item.get("ContentSequence", []))
    walk(sr.ContentSequence)
    return found


def test_report_is_a_tid_1500_measurement_report_with_the_triage_result(make_dicom):
    """Issue 15 item 1: the highdicom TID 1500 SR (the hand-built 99CXRT SR failed every assertion below)."""
    source = dcmread(make_dicom(modality="CR"), stop_before_pixels=True)
    source.PatientAge, source.OtherPatientIDs, source.InstitutionName = "045Y", "OTHER-ID", "General Hospital"
    final = [_decision(study_uid=source.StudyInstanceUID, bundle_sha256="ab" * 32),
             _decision(path="/y.dcm", status="human_review", reason="view_out_of_scope", risk=None,
                       study_uid=source.StudyInstanceUID, bundle_sha256="ab" * 32)]
    sr = build_study_report(final, [source])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "AccessionNumber"):
        assert sr.get(keyword) == source.get(keyword), keyword
    assert "OtherPatientIDs" not in sr and "InstitutionName" not in sr  # nothing more than today's attributes
    assert "ReferencedPerformedProcedureStepSequence" in sr and "PerformedProcedureCodeSequence" in sr  # Type 2
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    [equipment] = [item for item in sr.ContributingEquipmentSequence if item.Manufacturer == "cxr-triage"]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # DCM Processing Equipment
    assert equipment.DeviceUID == device_uid("ab" * 32) != device_uid("cd" * 32)
    content = _content(sr)
    assert content["Comment"] == [NOT_FOR_DIAGNOSTIC_USE]
    assert content["Worklist triage flag"] == ["Yes"]
    assert content["Reason for human review"] == [REASONS["view_out_of_scope"][:64]]
    assert content["Algorithm Name"][0] == "demo" and content["Algorithm Version"][0] == "0.1"
    assert f"sha256={'ab' * 32}" in content["Algorithm Parameters"]
    [risk] = content[RISK.meaning]
    [threshold] = content[THRESHOLD.meaning]
    assert (float(risk.NumericValue), float(threshold.NumericValue)) == (0.9, 0.7)
    assert risk.MeasurementUnitsCodeSequence[0].CodeValue == PROBABILITY_UNIT.value
    assert source.SOPInstanceUID in content["Source of Measurement"] + content.get("Source", [])


def test_building_results_never_logs_the_patient_name(make_dicom, caplog):
    """highdicom warns about a one-component Patient's Name quoting it; Python warnings reach our logs."""
    import warnings

    import numpy as np

    from deploy.results.sc import build_heatmap

    source = dcmread(make_dicom(modality="CR", patient_name="Doeflower"), stop_before_pixels=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_study_report([_decision(study_uid=source.StudyInstanceUID)], [source])
        build_heatmap(source, source, np.zeros((64, 64), np.uint8), np.ones((8, 8), np.float32), "1.2.3", 1, "demo",
                      "0.1", "ab" * 32)
    assert not [w for w in caught if "Doeflower" in str(w.message)] and "Doeflower" not in caplog.text


def test_report_of_a_study_nothing_could_be_scored_in_says_not_assessed(make_dicom):
    source = dcmread(make_dicom(modality="CR"), stop_before_pixels=True)
    final = [_decision(status="human_review", reason="decode_failed", risk=None, study_risk=None, flagged=False)]
    content = _content(build_study_report(final, [source]))
    assert content["Worklist triage flag"] == ["Not Evaluated"] and RISK.meaning not in content
    assert content["Reason for human review"] == ["no installed codec could decode the pixel data"]


def test_outbox_keeps_a_report_it_cannot_deliver_and_backs_off(tmp_path, make_dicom):
    unreachable = Destination("NOBODY", "127.0.0.1", 9)  # discard port: nothing listens
    outbox = Outbox(tmp_path / "outbox", [unreachable], "CXR_TRIAGE", retry_base_s=60)
    source = dcmread(make_dicom(modality="CR"), stop_before_pixels=True)
    [path] = outbox.put(build_study_report([_decision()], [source]))
    assert outbox.deliver_once() == 0 and path.exists()
    failures, next_try = outbox._attempts[path]
    assert failures == 1
    assert outbox.deliver_once() == 0 and outbox._attempts[path][0] == 1  # not retried before its backoff


def test_starvation_guard_appends_a_superseding_flagged_record(tmp_path, make_dicom):
    bundle = build_tiny_bundle(tmp_path / "tiny")
    config = Config(port=0, inbox=tmp_path / "inbox", audit_db=tmp_path / "audit.sqlite", bundle=bundle,
                    max_wait_s=10, device="cpu", quiet_period_s=0)
    station = Workstation(config)
    station._pseudonymize, station._run_id = (lambda pid: "p"), "run"
    dicom = make_dicom(modality="CR", unit=np.zeros((256, 224)))  # a dark image: low risk, not flagged
    study, path = claim_dropped(dicom, config.studies_dir, check_patient)
    with open_store(config.audit_db) as store:
        [first] = station.decide_study(store, study, "siteA")
        assert not first.flagged
        assert station.promote_starving(store, now=time.time() + 5) == []
        [promoted] = station.promote_starving(store, now=time.time() + 11)
        rows = store.decisions(study_uid=study)
    assert promoted.flagged and promoted.policy == STARVATION_GUARD and rows[-1]["supersedes"] == rows[0]["id"]
    assert len(rows) == 2


def test_a_flagged_study_runs_the_notify_command(tmp_path, make_dicom):
    out = tmp_path / "notified.txt"
    hook = [sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write(os.environ['CXR_STUDY_UID'])"]
    config = Config(port=0, inbox=tmp_path / "inbox", audit_db=tmp_path / "audit.sqlite", device="cpu",
                    bundle=build_tiny_bundle(tmp_path / "tiny", threshold=0.0), notify_command=tuple(hook))
    station = Workstation(config)
    station._pseudonymize, station._run_id = (lambda pid: "p"), "run"
    study, _ = claim_dropped(make_dicom(modality="CR"), config.studies_dir, check_patient)  # threshold 0: flagged
    with open_store(config.audit_db) as store:
        [decision] = station.decide_study(store, study, "siteA")
    assert decision.flagged
    deadline = time.monotonic() + 20
    while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.read_text() == study


def test_status_command_before_and_after_a_decision(tmp_path, make_dicom, capsys):
    from deploy.cli import main

    args = ["workstation", "status", "--inbox", str(tmp_path / "inbox"), "--audit-db", str(tmp_path / "audit.sqlite")]
    assert main(args) == 0 and "has not run" in capsys.readouterr().out
    config = Config(port=0, inbox=tmp_path / "inbox", audit_db=tmp_path / "audit.sqlite", device="cpu",
                    bundle=build_tiny_bundle(tmp_path / "tiny", threshold=0.0))
    station = Workstation(config)
    station._pseudonymize, station._run_id = (lambda pid: "p"), "run"
    study, _ = claim_dropped(make_dicom(modality="CR"), config.studies_dir, check_patient)
    with open_store(config.audit_db) as store:
        station.decide_study(store, study, "siteA")
    (config.studies_dir / "1.2.3").mkdir()
    make_dicom("waiting.dcm").rename(config.studies_dir / "1.2.3" / "1.2.3.4.dcm")  # received, not yet decided
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "queue: 1 instance(s) received and not yet decided" in out
    assert "realized flag rate: 100.0% (1 of 1 scored studies); target 5.0%" in out
    assert "provider: CPUExecutionProvider" in out and f"study {study} scored" in out and "FLAGGED" in out


def test_bad_flag_is_an_error_with_the_fix(tmp_path, capsys):
    from deploy.cli import main

    assert main(["workstation", "--flag-rate", "2", "--inbox", str(tmp_path)]) == 1
    assert "flag_rate" in capsys.readouterr().err


def test_the_service_listens_with_the_configured_network_limits(tmp_path):
    config = Config(port=0, inbox=tmp_path / "inbox", audit_db=tmp_path / "audit.sqlite",
                    bundle=build_tiny_bundle(tmp_path / "tiny"), device="cpu", max_associations=3, max_pdu_bytes=8192,
                    max_instance_bytes=2**20, acse_timeout_s=1.5)
    scp = Workstation(config).scp
    assert (scp.max_associations, scp.max_pdu_bytes, scp.max_instance_bytes, scp.acse_timeout_s) == (3, 8192, 2**20, 1.5)


# -- hardening (issue 14) ---------------------------------------------------------------------------


def test_many_threads_writing_one_path_atomically_all_succeed(tmp_path):
    """Item 12: each write has its own temporary name, so no writer renames or deletes another's."""
    target, errors = tmp_path / "outbox" / "1.2.3.dcm", []

    def write(value: int) -> None:
        try:
            for _ in range(25):
                write_atomic(target, bytes([value]) * 4096)
        except OSError as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(value,)) for value in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and target.read_bytes() in {bytes([v]) * 4096 for v in range(6)}
    assert not list(target.parent.glob("*.part"))


def tiny_config(tmp_path, **kwargs) -> Config:
    """A workstation config in ``tmp_path`` with the tiny bundle (unless ``bundle`` is given)."""
    if "bundle" not in kwargs:
        kwargs["bundle"] = build_tiny_bundle(tmp_path / "tiny")
    return Config(**{"port": 0, "inbox": tmp_path / "inbox", "audit_db": tmp_path / "audit.sqlite", "device": "cpu",
                     "quiet_period_s": 0, **kwargs})


def test_a_resent_instance_with_other_pixels_is_kept_beside_the_audited_file_and_decided_as_new(tmp_path, make_dicom):
    """Item 13: the file a decision names is never overwritten; identical bytes are a no-op."""
    config = tiny_config(tmp_path)
    station = Workstation(config)
    station._pseudonymize, station._run_id = (lambda pid: "p"), "run"
    original = make_dicom("v1.dcm", modality="CR")
    resend = tmp_path / "resend.dcm"
    resend.write_bytes(original.read_bytes())
    changed = dcmread(original)
    changed.PixelData = bytes(len(changed.PixelData))  # same SOP Instance UID, other pixels
    changed.save_as(tmp_path / "v2.dcm")
    study, first_path = claim_dropped(original, config.studies_dir, check_patient)
    with open_store(config.audit_db) as store:
        [first] = station.decide_study(store, study, "siteA")
        assert claim_dropped(resend, config.studies_dir, check_patient) == (study, first_path)
        assert station.decide_study(store, study, "siteA") == []  # a resend of identical bytes decides nothing
        _, second_path = claim_dropped(tmp_path / "v2.dcm", config.studies_dir, check_patient)
        again = {d.path: d for d in station.decide_study(store, study, "siteA")}
    assert second_path != first_path and sha256_file(first_path) == first.sha256  # the audited file is unchanged
    assert again[str(second_path)].supersedes is None and again[str(second_path)].sha256 == sha256_file(second_path)
    assert again[str(first_path)].supersedes is not None  # the first version is re-scored with its study, superseding


def test_the_workstation_without_allowed_callers_says_so_in_one_line(tmp_path, capsys):
    """Item 21: no pynetdicom ValueError traceback."""
    from deploy.cli import main

    code = main(["workstation", "--inbox", str(tmp_path / "inbox"), "--audit-db", str(tmp_path / "a.sqlite"),
                 "--bundle", str(build_tiny_bundle(tmp_path / "tiny")), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Fix: pass --allow-ae" in err


def test_the_workstation_on_a_port_in_use_says_so_in_one_line(tmp_path, capsys):
    """Item 21: no OSError traceback when another program holds the port."""
    from deploy.cli import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        code = main(["workstation", "--port", str(port), "--allow-ae", "CR1", "--inbox", str(tmp_path / "inbox"),
                     "--audit-db", str(tmp_path / "a.sqlite"), "--bundle", str(build_tiny_bundle(tmp_path / "tiny")),
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and f"cannot listen for DICOM on 127.0.0.1:{port}" in err and "--port" in err
    assert "Traceback" not in err


def test_status_finds_the_audit_store_the_running_workstation_recorded(tmp_path, make_dicom, capsys, monkeypatch):
    """Item 21: ``status --inbox DIR`` (the README's form) reads the store named in workstation.json."""
    from deploy.cli import main

    monkeypatch.chdir(tmp_path)  # the default ./cxr-triage-audit.sqlite does not exist here
    config = tiny_config(tmp_path, audit_db=tmp_path / "elsewhere" / "audit.sqlite")
    station = Workstation(config)
    station._pseudonymize, station._run_id = (lambda pid: "p"), "run"
    study, _ = claim_dropped(make_dicom(modality="CR"), config.studies_dir, check_patient)
    with open_store(config.audit_db) as store:
        station.decide_study(store, study, "siteA")  # writes workstation.json
    assert main(["workstation", "status", "--inbox", str(config.inbox)]) == 0
    out = capsys.readouterr().out
    assert "has not run" not in out and f"study {study} scored" in out and str(config.audit_db) in out


def test_a_risk_near_one_never_reads_as_certainty_in_the_log_the_hook_or_status(tmp_path, make_dicom, capsys, caplog):
    """Item 23: triage.present.format_risk everywhere a person reads the risk; the hook also gets the raw value."""
    from deploy.cli import main

    out = tmp_path / "hook.txt"
    hook = [sys.executable, "-c",
            f"import os; open({str(out)!r}, 'w').write(os.environ['CXR_RISK'] + ' ' + os.environ['CXR_RISK_VALUE'])"]
    config = tiny_config(tmp_path, bundle=build_tiny_bundle(tmp_path / "tiny", threshold=0.0, temperature=0.05),
                         notify_command=tuple(hook))
    station = Workstation(config)
    station._pseudonymize, station._run_id = (lambda pid: "p"), "run"
    study, _ = claim_dropped(make_dicom(modality="CR"), config.studies_dir, check_patient)
    with caplog.at_level(logging.INFO, logger="cxr_triage.workstation"), open_store(config.audit_db) as store:
        [decision] = station.decide_study(store, study, "siteA")
    assert decision.study_risk > 0.9999 and f"{decision.study_risk:.4f}" == "1.0000"
    assert "risk >0.9999" in caplog.text and "1.0000" not in caplog.text
    deadline = time.monotonic() + 20
    while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    shown, raw = out.read_text().split()
    assert shown == ">0.9999" and float(raw) == decision.study_risk
    assert main(["workstation", "status", "--inbox", str(config.inbox), "--audit-db", str(config.audit_db)]) == 0
    status = capsys.readouterr().out
    assert "risk >0.9999" in status and "1.0000" not in status


def test_a_study_of_two_patients_is_decided_but_gets_no_report(tmp_path, make_dicom, caplog):
    """Item 11: an inbox holding two patients under one Study UID (stored before the one-patient check existed, or
    copied in by hand) is still decided, but no report is built under either identity; the log names no patient."""
    config = tiny_config(tmp_path, destinations=(Destination("PACS", "127.0.0.1", 104),))
    station = Workstation(config)
    station._pseudonymize, station._run_id = (lambda pid: "p"), "run"
    one = dcmread(make_dicom("one.dcm", modality="CR"))
    two = dcmread(make_dicom("two.dcm", modality="CR", patient_name="OTHER^PATIENT", patient_id="OTHER-ID-4711"))
    two.StudyInstanceUID = study = str(one.StudyInstanceUID)
    two.save_as(tmp_path / "two.dcm")
    for ds, name in ((one, "one.dcm"), (two, "two.dcm")):  # bypasses check_patient, as an old inbox did
        store_instance(config.studies_dir, study, str(ds.SOPInstanceUID), (tmp_path / name).read_bytes())
    with caplog.at_level(logging.INFO, logger="cxr_triage.workstation"), open_store(config.audit_db) as store:
        decided = station.decide_study(store, study, "siteA")
    assert len(decided) == 2 and not station.outbox.pending()
    assert f"study {study}: no report sent: instance " in caplog.text and "(0010,0020) Patient ID" in caplog.text
    assert not any(value in caplog.text for value in ("OTHER^PATIENT", "OTHER-ID-4711", SYNTHETIC_PATIENT_NAME,
                                                      SYNTHETIC_PATIENT_ID))


def test_a_bundle_that_is_not_the_pinned_one_refuses_to_start_in_one_line(tmp_path, capsys):
    """Item 19, workstation part: ``--expect-bundle-sha256`` / ``expect_bundle_sha256`` pin the bundle's identity."""
    from deploy.cli import main

    bundle = build_tiny_bundle(tmp_path / "tiny")
    code = main(["workstation", "--allow-ae", "CR1", "--port", "0", "--inbox", str(tmp_path / "inbox"), "--audit-db",
                 str(tmp_path / "a.sqlite"), "--bundle", str(bundle), "--device", "cpu",
                 "--expect-bundle-sha256", "0" * 64])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and f"is not the pinned {'0' * 64}" in err and "Fix:" in err
    assert not (tmp_path / "inbox").exists()
    pinned = tmp_path / "ws.toml"
    pinned.write_text(f'expect_bundle_sha256 = "{sha256_file(bundle / "manifest.json")}"\n')
    assert Workstation(load_config(pinned, {"bundle": str(bundle), "device": "cpu"})).bundle.sha256 == \
        sha256_file(bundle / "manifest.json")


def test_workstation_json_records_a_postgresql_url_without_its_password(tmp_path):
    """``status`` reads the store from workstation.json; the file must not hold the store's password."""
    url = "postgresql://triage:s3cret@db.example:5432/audit?password=s3cret&sslmode=require"
    config = tiny_config(tmp_path, audit_db=url)
    Workstation(config)._save_state()
    recorded = config.state_file.read_text(encoding="utf-8")
    assert "s3cret" not in recorded
    assert json.loads(recorded)["audit_db"] == "postgresql://triage@db.example:5432/audit?sslmode=require"
