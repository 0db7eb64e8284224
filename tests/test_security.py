"""Network limits against real peers: the SCP's AE allow-list, association limit and PDU size; the dashboard's bind guard."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from deploy.workstation.config import MAX_PDU_BYTES, ConfigError, load_config
from deploy.workstation.scp import StorageSCP
from triage.audit import open_store

REPO = Path(__file__).resolve().parents[1]
CALLER = "MODALITY"


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    """A running SCP on a free loopback port allowing CALLER, at most 2 associations, 8192-byte PDUs."""
    server = StorageSCP("CXR_TRIAGE", [CALLER], tmp_path / "studies", lambda arrival: None, port=0,
                        max_associations=2, max_pdu_bytes=8192)
    server.start()
    yield server
    server.stop()


def associate(port: int, calling: str = CALLER):
    """A real association from a pynetdicom SCU (C-ECHO and CR storage contexts)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")


def rejection(assoc) -> tuple[int, int, int] | None:
    """(result, source, reason) of an A-ASSOCIATE-RJ, None when accepted."""
    primitive = assoc.acceptor.primitive
    return None if assoc.is_established else (primitive.result, primitive.result_source, primitive.diagnostic)


def test_an_unknown_calling_ae_title_is_rejected(scp):
    assoc = associate(scp.port, calling="INTRUDER")
    assert assoc.is_rejected and rejection(assoc) == (0x01, 0x01, 0x03)  # permanent, service user, calling AE
    good = associate(scp.port)
    assert good.is_established and good.send_c_echo().Status == 0x0000
    good.release()


@pytest.mark.skipif(not shutil.which("storescu"), reason="needs dcmtk (apt-get install dcmtk; scripts/test.sh does)")
def test_dcmtk_storescu_with_a_wrong_ae_title_is_refused_and_nothing_is_stored(scp, make_dicom, tmp_path):
    image = make_dicom("cr.dcm")
    run = subprocess.run(["storescu", "-aet", "WRONG_AE", "-aec", "CXR_TRIAGE", "127.0.0.1", str(scp.port), str(image)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "Calling AE Title Not Recognized" in run.stdout + run.stderr
    assert not list(tmp_path.glob("studies/**/*.dcm"))


def test_the_association_beyond_the_limit_is_rejected_as_transient_until_one_ends(scp):
    first, second = associate(scp.port), associate(scp.port)
    assert first.is_established and second.is_established
    third = associate(scp.port)
    assert third.is_rejected and rejection(third) == (0x02, 0x03, 0x02)  # transient, presentation, local limit
    first.release()
    deadline = time.monotonic() + 20
    while scp.active_associations() > 1 and time.monotonic() < deadline:  # the acceptor thread ends after release
        time.sleep(0.05)
    fourth = associate(scp.port)  # a slot is free again
    assert fourth.is_established
    for assoc in (second, fourth):
        assoc.release()


def test_callers_are_told_the_configured_maximum_pdu_length(scp):
    assoc = associate(scp.port)
    assert assoc.is_established and assoc.acceptor.maximum_length == 8192
    assoc.release()


def test_network_limits_come_from_the_config_file_and_are_validated(tmp_path):
    path = tmp_path / "workstation.toml"
    path.write_text('allow_ae = ["CR1"]\nmax_associations = 3\nmax_pdu_bytes = 65536\n')
    config = load_config(path)
    assert (config.max_associations, config.max_pdu_bytes) == (3, 65536)
    assert load_config().max_pdu_bytes == MAX_PDU_BYTES and load_config().allow_ae == ()  # refuse-all by default
    with pytest.raises(ConfigError, match="max_associations is 0; it must be >= 1"):
        load_config(overrides={"max_associations": 0})
    with pytest.raises(ConfigError, match="max_pdu_bytes is 100; it must be in 4096"):
        load_config(overrides={"max_pdu_bytes": 100})


def test_a_postgresql_audit_db_in_the_workstation_config_stays_a_url():
    config = load_config(overrides={"audit_db": "postgresql://cxr@db.example/audit"})
    assert config.audit_db == "postgresql://cxr@db.example/audit"
    assert load_config(overrides={"audit_db": "x/audit.sqlite"}).audit_db == Path("x/audit.sqlite")


def run_dashboard(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", "dashboard", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_the_dashboard_refuses_to_listen_beyond_localhost_without_logins(tmp_path):
    db = tmp_path / "audit.sqlite"
    open_store(db).close()
    run = run_dashboard("--audit-db", str(db), "--address", "0.0.0.0", "--port", "0")
    assert run.returncode == 1
    assert "refusing to listen on 0.0.0.0 with no logins configured" in run.stderr and "Fix:" in run.stderr
