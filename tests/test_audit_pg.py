"""The PostgreSQL audit store end to end, on a real server: the batch scorer, concurrent first use, the secret.

The chain, verify and tamper cases run on both backends in tests/test_audit.py.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)
from triage.audit import Decision, open_store
from triage.audit.pending import clear_pending, load_pending, save_pending
from triage.audit.transfer import export_csv
from triage.errors import AuditError
from triage.pseudonym import default_secret_path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "kermany"


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_batch_scoring_into_postgresql_is_audited_resumable_and_verifies(pg_url, tmp_path):
    env = {"CXR_TRIAGE_SECRET": str(tmp_path / "secret" / "site-secret.key")}
    args = ["score", str(SAMPLES), "--out", str(tmp_path / "worklist.csv"), "--audit-db", pg_url, "--workers", "1",
            "--device", "cpu"]
    first = cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "secret" / "site-secret.key").stat().st_mode & 0o777 == 0o600
    again = cli(*args, env=env)
    assert again.returncode == 0, again.stderr
    with open_store(pg_url, create=False) as store:
        rows = store.decisions()
        assert store.verify().ok
    n_files = len(list(SAMPLES.glob("*.dcm")))
    assert len(rows) == n_files  # the rerun skipped every file already audited
    assert sum(r["flagged"] for r in rows) == 1 and {r["status"] for r in rows} == {"scored"}
    with open(tmp_path / "worklist.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == n_files
    verify = cli("audit", "verify", "--audit-db", pg_url)
    assert verify.returncode == 0 and f"audit chain OK: {n_files} decisions, 0 reviews" in verify.stdout


def test_a_postgresql_store_without_a_secret_location_is_refused_with_the_fix(pg_url, tmp_path, monkeypatch):
    monkeypatch.delenv("CXR_TRIAGE_SECRET", raising=False)
    with pytest.raises(AuditError, match=r"Fix: set \$CXR_TRIAGE_SECRET to a file path"):
        default_secret_path(pg_url)
    run = cli("score", str(SAMPLES / "kermany-01.dcm"), "--out", str(tmp_path / "w.csv"), "--audit-db", pg_url,
              "--workers", "1", "--device", "cpu", env={"CXR_TRIAGE_SECRET": ""})
    assert run.returncode == 1 and "CXR_TRIAGE_SECRET" in run.stderr
    with pytest.raises(AuditError, match="no audit store in this database"):
        open_store(pg_url, create=False)  # nothing was written


def _first_use(url: str, worker: int) -> None:
    with open_store(url) as store:  # every process creates the schema at once
        store.append_decisions([Decision(path=f"/w{worker}/{i}.dcm", sha256=f"{worker}-{i}", status="scored",
                                         risk=worker / 10 + i / 1000, study_uid=f"1.2.{worker}") for i in range(20)])


def test_concurrent_first_use_creates_one_schema_and_one_chain(pg_url):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_first_use, args=(pg_url, w)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
        assert process.exitcode == 0
    with open_store(pg_url) as store:
        result = store.verify()
        rows = store.decisions()
    assert result.ok and result.n_records == 80
    assert sorted((r["path"], r["sha256"]) for r in rows) == sorted((f"/w{w}/{i}.dcm", f"{w}-{i}") for w in range(4)
                                                                    for i in range(20))
    assert [r["id"] for r in rows] == list(range(1, 81))


def test_floats_survive_postgresql_exactly_so_hashes_match(pg_url):
    risk = 0.1 + 0.2  # 0.30000000000000004: a REAL (float4) column would round it and break the chain
    with open_store(pg_url) as store:
        store.append_decisions([Decision(path="/a", sha256="x", status="scored", risk=risk, decode_ms=1 / 3)])
        [row] = store.decisions()
        assert row["risk"] == risk and row["decode_ms"] == 1 / 3 and store.verify().ok


SCORER_GRANTS = [  # as in SECURITY.md: the role the scorers, workstations and dashboard use
    "GRANT USAGE ON SCHEMA public TO {role}",
    "GRANT SELECT, INSERT ON decisions, reviews TO {role}",
    "GRANT SELECT, UPDATE ON meta TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON pending_scores TO {role}",
]


def test_a_least_privilege_role_appends_but_cannot_change_rows_or_drop_the_triggers(pg_url):
    import psycopg

    open_store(pg_url).close()  # first use, by the tables' owner
    role = "scorer_" + pg_url.rsplit("/", 1)[1]  # roles are per server: named after this test's database
    with psycopg.connect(pg_url, autocommit=True) as owner:
        owner.execute(f"CREATE ROLE {role} LOGIN")
        for grant in SCORER_GRANTS:
            owner.execute(grant.format(role=role))
    url = pg_url.replace("postgresql://cxr@", f"postgresql://{role}@")
    with open_store(url) as store:  # create=True: no DDL on a made store
        [decision_id] = store.append_decisions([Decision(path="/a", sha256="x", status="scored", risk=0.5)])
        store.append_review(decision_id, "dr.a", "agree")
        save_pending(store, [("/b", "y", "bundle", {"risk": 0.1})])
        clear_pending(store, [("/b", "y", "bundle")])
        assert store.verify().ok
    with psycopg.connect(url, autocommit=True) as attacker:
        for statement in ("DROP TRIGGER decisions_no_update ON decisions", "UPDATE decisions SET risk = 0.9",
                          "DELETE FROM reviews", "TRUNCATE decisions"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                attacker.execute(statement)


def test_the_dashboard_reads_a_postgresql_store_and_needs_an_explicit_login_config(pg_url, tmp_path, monkeypatch,
                                                                                  capsys):
    pytest.importorskip("pandas", reason="needs the dashboard extra")
    from dashboards import data
    from deploy import cli

    monkeypatch.delenv("CXR_DASHBOARD_CONFIG", raising=False)
    args = ["dashboard", "--audit-db", pg_url, "--address", "0.0.0.0", "--port", "0"]
    assert cli.main(args) == 1
    assert "no audit store in this database" in capsys.readouterr().err
    with open_store(pg_url) as store:
        store.append_decisions([Decision(path="/a", sha256="x", status="scored", risk=0.5, study_uid="1.2")])
    before = data.data_version(pg_url)
    assert cli.main(args) == 1
    assert "Fix: pass --config FILE" in capsys.readouterr().err  # no folder to find dashboard-users.json in
    assert cli.main([*args, "--config", str(tmp_path / "users.json")]) == 1
    assert "refusing to listen on 0.0.0.0 with no logins" in capsys.readouterr().err
    with open_store(pg_url) as store:
        store.append_review(1, "dr.a", "agree")
    assert data.data_version(pg_url) != before
    assert list(data.read_decisions(pg_url)["path"]) == ["/a"] and data.verify_store(pg_url).ok


def test_a_long_lived_store_reconnects_after_the_server_drops_its_connection(pg_url):
    import psycopg

    with open_store(pg_url) as store:
        store.append_decisions([Decision(path="/a", sha256="x", status="scored")])
        database = pg_url.rsplit("/", 1)[1]
        with psycopg.connect(pg_url, autocommit=True) as admin:  # what a server restart does to open sessions
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND "
                          "pid <> pg_backend_pid()", (database,))
        with pytest.raises(AuditError, match="Fix:"):
            store.decisions()  # the read that finds the connection gone fails, naming the fix
        assert [r["path"] for r in store.decisions()] == ["/a"]  # the next one reconnects
        assert store.append_decisions([Decision(path="/b", sha256="y", status="scored")]) == [2]
        assert store.verify().ok


def load_release_0_1_0(path: Path) -> Path:
    """A SQLite store as release 0.1.0 wrote it (4 decisions, 1 review)."""
    import sqlite3

    connection = sqlite3.connect(path)
    connection.executescript((REPO / "tests" / "data" / "audit" / "audit-0.1.0.sql").read_text())
    connection.close()
    return path


def test_audit_copy_moves_a_sqlite_store_to_postgresql_and_old_anchors_still_hold(pg_url, tmp_path):
    old = load_release_0_1_0(tmp_path / "old.sqlite")
    with open_store(old) as store:
        save_pending(store, [("/p", "s", "b" * 64, {"risk": 0.25})])
        anchor = store.head()
    run = cli("audit", "copy", "--audit-db", str(old), "--to", pg_url)
    assert run.returncode == 0, run.stderr
    assert "copied 4 decisions and 1 reviews; the copy: audit chain OK: 4 decisions, 1 reviews" in run.stdout
    with open_store(pg_url) as copy, open_store(old) as source:
        assert copy.decisions() == source.decisions() and copy.reviews() == source.reviews()
        assert copy.verify([anchor]).ok and load_pending(copy, "b" * 64) == {("/p", "s"): {"risk": 0.25}}
        assert copy.append_decisions([Decision(path="/new", sha256="n", status="scored")]) == [5]
    again = cli("audit", "copy", "--audit-db", str(old), "--to", pg_url)
    assert again.returncode == 1 and "already holds records. Fix: copy into a new, empty store" in again.stderr


def test_audit_copy_refuses_a_broken_source_and_writes_nothing(pg_url, tmp_path):
    import sqlite3

    old = load_release_0_1_0(tmp_path / "old.sqlite")
    connection = sqlite3.connect(old)
    connection.execute("DROP TRIGGER decisions_no_update")
    connection.execute("UPDATE decisions SET risk = 0.99 WHERE id = 2")
    connection.commit()
    connection.close()
    run = cli("audit", "copy", "--audit-db", str(old), "--to", pg_url)
    assert run.returncode == 1 and "not copying a broken store: decisions record 2" in run.stderr
    with open_store(pg_url) as copy:
        assert copy.decisions() == [] and copy.chain_heads()["decisions"]["count"] == 0


def test_a_workstation_audits_into_postgresql(pg_url, tmp_path, make_dicom, monkeypatch):
    import shutil
    import threading
    import time

    from deploy.workstation.config import load_config
    from deploy.workstation.service import Workstation
    from tests.tiny_bundle import build_tiny_bundle

    monkeypatch.setenv("CXR_TRIAGE_SECRET", str(tmp_path / "site-secret.key"))
    config = load_config(overrides={"port": 0, "allow_ae": ["CR1"], "inbox": str(tmp_path / "inbox"),
                                    "audit_db": pg_url, "bundle": str(build_tiny_bundle(tmp_path / "tiny")),
                                    "quiet_period_s": 0.2, "poll_s": 0.1, "device": "cpu"})
    station, stop = Workstation(config), threading.Event()
    thread = threading.Thread(target=station.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert station.ready.wait(60)
        shutil.copy(make_dicom("cr.dcm", modality="CR"), config.incoming_dir / "cr.dcm")
        deadline, rows = time.monotonic() + 60, []
        while not rows and time.monotonic() < deadline:
            time.sleep(0.1)
            with open_store(pg_url, create=False) as store:
                rows = store.decisions()
    finally:
        stop.set()
        thread.join(timeout=30)
    assert len(rows) == 1 and rows[0]["status"] == "scored" and rows[0]["policy"] == "stream_threshold"
    assert not Path("postgresql:").exists() and not thread.is_alive()  # no SQLite file made from the URL


def test_verify_and_export_stream_a_table_larger_than_one_fetch(pg_url, tmp_path):
    from triage.audit.postgres import STREAM_ROWS

    n = 2 * STREAM_ROWS + 7
    with open_store(pg_url) as store:
        store.append_decisions([Decision(path=f"/f{i}", sha256=str(i), status="scored", risk=i / n) for i in range(n)])
        result = store.verify()
        assert export_csv(store, tmp_path / "all.csv") == n
    assert result.ok and result.n_records == n
    with open(tmp_path / "all.csv", newline="") as handle:
        assert [row["path"] for row in csv.DictReader(handle)][-1] == f"/f{n - 1}"
