"""Workstation parts without the network: config, UIDs, assembler, recalibration, guard, SR, outbox retries."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from pydicom import dcmread

from deploy.workstation.assembler import StudyAssembler
from deploy.workstation.config import Config, ConfigError, Destination, load_config
from deploy.workstation.inbox import InvalidUIDError, check_uid, claim_dropped, instance_path, remove_partials, write_atomic
from deploy.workstation.outbox import Outbox
from deploy.workstation.report import NOT_FOR_DIAGNOSTIC_USE, build_report
from deploy.workstation.service import Workstation
from deploy.workstation.stream import STARVATION_GUARD, SiteRecalibrator, StarvationGuard
from triage.audit import AuditStore, Decision
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
    ("decode_timeout_s = 0\n", "decode_timeout_s"),
])
def test_bad_config_names_the_key_and_the_fix(tmp_path, text, match):
    path = tmp_path / "ws.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


@pytest.mark.parametrize("bad", ["", "1.2.3/../../etc", "1.02.3", "a.b", "1." + "2" * 70, "../x", "1.2.3 x", "1..2"])
def test_only_valid_uids_name_files(tmp_path, bad):
    with pytest.raises(InvalidUIDError, match="not a valid UID"):
        instance_path(tmp_path, bad, "1.2.3")
    with pytest.raises(InvalidUIDError):
        check_uid(bad, "SOP Instance UID")
    assert instance_path(tmp_path, "1.2.3", "1.2.3.4") == tmp_path / "1.2.3" / "1.2.3.4.dcm"


def test_atomic_write_leaves_no_part_and_partials_are_removed(tmp_path):
    target = tmp_path / "1.2" / "1.2.3.dcm"
    write_atomic(target, b"data")
    assert target.read_bytes() == b"data" and not list(tmp_path.rglob("*.part"))
    (tmp_path / "1.2" / "1.2.4.dcm.part").write_bytes(b"half")
    assert remove_partials(tmp_path) == 1 and not list(tmp_path.rglob("*.part"))


def test_dropped_files_are_claimed_by_uid_or_kept_by_hash(tmp_path, make_dicom):
    studies = tmp_path / "studies"
    dicom = make_dicom("drop me.dcm")
    ds = dcmread(dicom, stop_before_pixels=True)
    study, path = claim_dropped(dicom, studies)
    assert (study, path) == (ds.StudyInstanceUID, instance_path(studies, ds.StudyInstanceUID, ds.SOPInstanceUID))
    junk = tmp_path / "notes.bin"
    junk.write_bytes(b"not dicom at all")
    study, path = claim_dropped(junk, studies)
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
    flags = [bool(recalibrator.decide("siteA", f"s{i}", r).flagged) for i, r in enumerate(shifted)]
    assert np.mean(shifted >= bundle_threshold) > 0.5
    assert abs(np.mean(flags[200:]) - target) < 0.02
    other = recalibrator.decide("siteB", "x", 0.6)  # a new site starts from the bundle threshold
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


def test_report_references_the_source_and_says_not_for_diagnostic_use(make_dicom):
    source = dcmread(make_dicom(modality="CR"), stop_before_pixels=True)
    instances = [(str(source.SeriesInstanceUID), str(source.SOPClassUID), str(source.SOPInstanceUID))]
    sr = build_report([_decision(study_uid=source.StudyInstanceUID)], source, instances)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    texts = [item.get("TextValue", "") for item in sr.ContentSequence]
    assert NOT_FOR_DIAGNOSTIC_USE in texts and "demo 0.1" in texts and "FLAGGED: read first" in texts


def test_outbox_keeps_a_report_it_cannot_deliver_and_backs_off(tmp_path, make_dicom):
    unreachable = Destination("NOBODY", "127.0.0.1", 9)  # discard port: nothing listens
    outbox = Outbox(tmp_path / "outbox", [unreachable], "CXR_TRIAGE", retry_base_s=60)
    source = dcmread(make_dicom(modality="CR"), stop_before_pixels=True)
    [path] = outbox.put(build_report([_decision()], source, []))
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
    study, path = claim_dropped(dicom, config.studies_dir)
    with AuditStore(config.audit_db) as store:
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
    study, _ = claim_dropped(make_dicom(modality="CR"), config.studies_dir)  # threshold 0: flagged
    with AuditStore(config.audit_db) as store:
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
    study, _ = claim_dropped(make_dicom(modality="CR"), config.studies_dir)
    with AuditStore(config.audit_db) as store:
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
                    bundle=build_tiny_bundle(tmp_path / "tiny"), device="cpu", max_associations=3, max_pdu_bytes=8192)
    station = Workstation(config)
    assert (station.scp.max_associations, station.scp.max_pdu_bytes) == (3, 8192)
