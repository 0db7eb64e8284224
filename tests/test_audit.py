"""The audit store: append-only hash chains, tamper detection, resumable-run tables, CLI."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import multiprocessing
import os
import socket
import sqlite3
from pathlib import Path

import pytest

from deploy.audit_cmd import add_parser
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)
from triage.audit import (DECISION_COLUMNS, GENESIS_HASH, Decision, default_audit_db, is_url, open_store, os_path,
                          path_text)
from triage.audit.pending import clear_pending, load_pending, save_pending
from triage.audit.transfer import copy_store, export_csv
from triage.errors import AuditError
from triage.pseudonym import pseudonymize


def decision(i: int, **changes) -> Decision:
    """A scored decision for file ``i`` (study ``i // 2``)."""
    values = dict(path=f"/data/img{i:03d}.dcm", sha256=f"{i:064x}", status="scored", study_uid=f"1.2.3.{i // 2}",
                  patient_pseudo_id=pseudonymize(f"MRN-{i}", b"k" * 32), bundle_name="demo", bundle_version="1.0",
                  bundle_sha256="b" * 64, finding="pneumonia", risk=i / 100, study_risk=i / 100, threshold=0.7,
                  flag_rate=0.05, policy="batch_top_k", flagged=i % 7 == 0, run_id="run1", decode_ms=1.5,
                  infer_ms=5.0, provider="CPUExecutionProvider")
    return Decision(**{**values, **changes})


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path: Path) -> str:
    """Where a new, empty store goes: a SQLite file, or a fresh database on a real PostgreSQL server."""
    return str(tmp_path / "audit.sqlite") if request.param == "sqlite" else request.getfixturevalue("pg_url")


@pytest.fixture
def db(target: str) -> str:
    """A store holding 5 decisions (ids 1..5) and 2 reviews of decision 2."""
    with open_store(target) as store:
        store.append_decisions([decision(i) for i in range(5)])
        store.append_review(2, "dr.a", "agree", finding="pneumonia")
        store.append_review(2, "dr.b", "disagree", note="old scar")
    return target


def raw_connection(target: str):
    """A plain database connection to the store, as an administrator (or an attacker) would open one."""
    if is_url(target):
        import psycopg

        return psycopg.connect(target, autocommit=True)
    return sqlite3.connect(target, isolation_level=None)


def tamper(target: str, *statements: str) -> None:
    """What an attacker with write access can do: drop the triggers, then change rows."""
    connection = raw_connection(target)
    for table in ("decisions", "reviews"):
        for verb in ("update", "delete", "truncate"):
            on = f" ON {table}" if is_url(target) else ""
            connection.execute(f"DROP TRIGGER IF EXISTS {table}_no_{verb}{on}")
    for statement in statements:
        connection.execute(statement)
    connection.close()


def verify(target: str, anchors=()):
    with open_store(target) as store:
        return store.verify(anchors)


def test_appended_decisions_read_back_with_store_columns(db):
    with open_store(db) as store:
        rows = store.decisions()
        assert store.append_decisions([decision(9, risk=None, status="human_review", reason="not_dicom")]) == [6]
        assert store.decisions(status="human_review")[0]["risk"] is None
        assert [r["id"] for r in store.decisions(study_uid="1.2.3.1")] == [3, 4]  # files 2 and 3
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5] and tuple(rows[0]) == DECISION_COLUMNS
    assert rows[0]["prev_hash"] == GENESIS_HASH and rows[1]["prev_hash"] == rows[0]["record_hash"]
    assert rows[0]["software_version"] and rows[0]["created_at"].endswith("+00:00")
    assert Decision(**{k: rows[3][k] for k in Decision.__dataclass_fields__}) == decision(3)


def test_intact_chains_verify(db):
    result = verify(db)
    assert result.ok and (result.n_records, result.n_reviews, result.first_bad_id) == (5, 2, None)
    assert result.message == "audit chain OK: 5 decisions, 2 reviews"


def test_an_empty_store_verifies(target):
    assert verify(target).message == "audit chain OK: 0 decisions, 0 reviews"


def test_update_and_delete_are_refused_while_the_triggers_stand(db):
    statements = ["UPDATE decisions SET risk = 0.99 WHERE id = 3", "DELETE FROM decisions WHERE id = 5",
                  "UPDATE reviews SET verdict = 'agree' WHERE id = 2", "DELETE FROM reviews"]
    if is_url(db):
        statements.append("TRUNCATE reviews")
    connection = raw_connection(db)
    for statement in statements:
        with pytest.raises(Exception, match="append-only") as refused:
            connection.execute(statement)
        assert type(refused.value).__name__ in ("IntegrityError", "RaiseException")
    connection.close()
    assert verify(db).ok


def test_the_store_refuses_changes_with_an_audit_error_naming_the_fix(db):
    with open_store(db) as store:
        with pytest.raises(AuditError, match="supersedes and decision_id must name a decision"):
            store.append_decisions([decision(8, supersedes=99)])
        assert store.verify().ok and len(store.decisions()) == 5


def test_an_edited_decision_is_named(db):
    tamper(db, "UPDATE decisions SET risk = 0.99 WHERE id = 3")
    result = verify(db)
    assert not result.ok and result.first_bad_id == 3 and result.table == "decisions" and result.n_records == 5
    assert "decisions record 3 (study 1.2.3.1): its contents do not match its record_hash (the record was edited)" \
        in result.message and result.study_uid == "1.2.3.1"


def test_a_deleted_middle_decision_is_named(db):
    tamper(db, "DELETE FROM decisions WHERE id = 3")
    result = verify(db)
    assert not result.ok and result.first_bad_id == 3 and "deleted" in result.message


def test_a_deleted_last_decision_is_caught_by_the_chain_head(db):
    tamper(db, "DELETE FROM decisions WHERE id = 5")
    result = verify(db)
    assert not result.ok and result.first_bad_id == 5 and "truncated" in result.message


def test_an_inserted_decision_is_caught_by_the_chain_head(db):
    tamper(db, "INSERT INTO decisions (id, path, prev_hash, record_hash) "
               "SELECT 6, 'forged', record_hash, 'x' FROM decisions WHERE id = 5")
    result = verify(db)
    assert not result.ok and result.first_bad_id == 6


def test_a_rehashed_edit_still_breaks_the_next_link(db):
    # The attacker recomputes the edited record's hash; the next record's link still points at the old one.
    from triage.audit import record_hash
    with open_store(db) as store:
        row = store.decisions()[2]
    row = {**row, "risk": 0.99, "flagged": int(row["flagged"])}
    tamper(db, f"UPDATE decisions SET risk = 0.99, record_hash = '{record_hash(row['prev_hash'], row)}' WHERE id = 3")
    result = verify(db)
    assert not result.ok and result.first_bad_id == 4 and "prev_hash" in result.message


def test_a_rehashed_edit_of_the_last_record_is_caught_by_the_chain_head(db):
    from triage.audit import record_hash
    with open_store(db) as store:
        row = store.decisions()[-1]
    row = {**row, "flagged": 1, "risk": 0.99}
    tamper(db, f"UPDATE decisions SET risk = 0.99, flagged = 1, record_hash = '{record_hash(row['prev_hash'], row)}' "
               "WHERE id = 5")
    result = verify(db)
    assert not result.ok and result.first_bad_id == 5 and "chain head" in result.message


def test_an_edited_review_is_named_with_its_study(db):
    tamper(db, "UPDATE reviews SET verdict = 'agree' WHERE id = 2")
    result = verify(db)
    assert not result.ok and (result.table, result.first_bad_id, result.study_uid) == ("reviews", 2, "1.2.3.0")
    assert "reviews record 2 (study 1.2.3.0): its contents do not match its record_hash (the record was edited)" \
        in result.message


def test_a_deleted_last_review_is_caught_by_the_chain_head(db):
    tamper(db, "DELETE FROM reviews WHERE id = 2")
    result = verify(db)
    assert not result.ok and (result.table, result.first_bad_id) == ("reviews", 2) and "truncated" in result.message


def test_the_first_broken_link_is_named_when_decisions_and_reviews_are_both_broken(db):
    tamper(db, "UPDATE reviews SET note = '' WHERE id = 1", "UPDATE decisions SET flagged = 1 WHERE id = 4")
    result = verify(db)
    assert (result.table, result.first_bad_id) == ("decisions", 4)


def test_a_rewritten_tail_passes_alone_but_fails_against_the_anchored_head(db):
    """A forger who deletes a review and rewrites the chain head is caught only by a head kept elsewhere."""
    with open_store(db) as store:
        anchor = store.head()
    assert anchor.startswith("cxr-triage-audit-head decisions=5:") and " reviews=2:" in anchor
    assert verify(db, [anchor]).message == "audit chain OK: 5 decisions, 2 reviews, and through 1 anchored head(s)"
    with open_store(db) as store:
        first = store.reviews()[0]
    head = '{"last_id": 1, "hash": "%s", "count": 1}' % first["record_hash"]
    tamper(db, "DELETE FROM reviews WHERE id = 2", f"UPDATE meta SET value = '{head}' WHERE key = 'head:reviews'")
    assert verify(db).ok  # self-consistent after the rewrite
    result = verify(db, [anchor])
    assert not result.ok and (result.table, result.first_bad_id) == ("reviews", 2)
    assert "missing: an anchored head names this record" in result.message


def test_a_malformed_anchor_is_a_value_error_with_a_fix(db):
    with pytest.raises(ValueError, match="Fix: pass a line printed by cxr-triage audit head"):
        verify(db, ["decisions=1:abc"])


def test_reviews_read_back_by_study_and_are_validated(db):
    with open_store(db) as store:
        reviews = store.reviews_for("1.2.3.0")  # decision 2 is file 1, study 0
        assert [(r["reviewer"], r["verdict"], r["decision_id"]) for r in reviews] == [("dr.a", "agree", 2),
                                                                                      ("dr.b", "disagree", 2)]
        with pytest.raises(ValueError, match="'maybe' is not one of agree, disagree, not_assessable"):
            store.append_review(2, "dr.a", "maybe")
        with pytest.raises(ValueError, match="no decision with id 99"):
            store.append_review(99, "dr.a", "agree")
        assert store.verify().n_reviews == 2


def _append_fifty(target: str, worker: int) -> None:
    with open_store(target) as store:
        for i in range(50):
            store.append_decisions([decision(1000 * worker + i)])
            if i % 10 == 0:
                store.append_review(store.decisions(limit=1)[0]["id"], f"dr.{worker}", "agree")


def test_concurrent_writers_from_several_processes_keep_one_valid_chain(target):
    open_store(target).close()
    n_workers = 4 if is_url(target) else 2
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_fifty, args=(target, w)) for w in range(1, n_workers + 1)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
        assert process.exitcode == 0
    result = verify(target)
    assert result.ok and (result.n_records, result.n_reviews) == (50 * n_workers, 5 * n_workers)
    with open_store(target) as store:
        rows = store.decisions()
    assert [r["id"] for r in rows] == list(range(1, 50 * n_workers + 1))
    assert sorted(r["path"] for r in rows) == sorted(decision(1000 * w + i).path for w in range(1, n_workers + 1)
                                                     for i in range(50))  # none lost, none twice


def test_decided_keys_gives_the_latest_decision_per_file_for_a_bundle(db):
    with open_store(db) as store:
        [new_id] = store.append_decisions([decision(1, flagged=True, supersedes=2)])
        store.append_decisions([decision(1, bundle_sha256="c" * 64)])
        keys = store.decided_keys("b" * 64)
        assert store.decided_keys("missing") == {}
    assert len(keys) == 5
    latest = keys[("/data/img001.dcm", f"{1:064x}")]
    assert latest["id"] == new_id and latest["supersedes"] == 2 and latest["flagged"] is True


def test_pending_scores_save_load_and_clear_outside_the_chain(db):
    bundle = "b" * 64
    payload = {"risk": 0.25, "flagged": False, "study_risk": None}
    with open_store(db) as store:
        save_pending(store, [("/a", "s1", bundle, payload), ("/b", "s2", bundle, {"risk": 0.5}),
                            ("/a", "s1", "other", {"risk": 0.1})])
        save_pending(store, [("/b", "s2", bundle, {"risk": 0.75})])  # replaces by key
        assert load_pending(store, bundle) == {("/a", "s1"): payload, ("/b", "s2"): {"risk": 0.75}}
        clear_pending(store, [("/a", "s1", bundle), ("/b", "s2", bundle)])
        assert load_pending(store, bundle) == {}
        assert load_pending(store, "other") == {("/a", "s1"): {"risk": 0.1}}
        assert store.verify().ok


def test_export_csv_has_every_column_and_no_raw_patient_id(db, tmp_path):
    out = tmp_path / "export" / "audit.csv"
    with open_store(db) as store:
        assert export_csv(store, out) == 5
    text = out.read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert tuple(rows[0]) == DECISION_COLUMNS and len(rows) == 5
    assert rows[3]["path"] == "/data/img003.dcm" and rows[3]["sha256"] == f"{3:064x}"
    assert rows[3]["risk"] == "0.03" and rows[3]["patient_pseudo_id"] == pseudonymize("MRN-3", b"k" * 32)
    assert "MRN-" not in text


@pytest.mark.parametrize("name, text", [
    (b"M\xfcller.dcm", "M\\xfcller.dcm"),  # Latin-1 from a legacy share: not UTF-8
    (b"M\xc3\xbcller.dcm", "M\u00fcller.dcm"),  # UTF-8: unchanged
    (b"plain.dcm", "plain.dcm"),
    (b"M\\xfcller.dcm", "M\\\\xfcller.dcm"),  # a real backslash is doubled: never read as an escape
    (b"a\\\xfc\\\\.dcm", "a\\\\\\xfc\\\\\\\\.dcm"),
])
def test_path_text_is_utf8_one_to_one_and_os_path_maps_it_back(name, text):
    real = os.fsdecode(b"/share/" + name)
    assert path_text(real) == "/share/" + text
    assert os_path(path_text(real)) == real


def test_a_file_that_is_not_a_database_is_an_audit_error_with_a_fix(tmp_path):
    path = tmp_path / "audit.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(AuditError, match=r"audit\.sqlite: .*not a database.*Fix: restore"):
        open_store(path)


def test_an_unwritable_location_is_an_audit_error_with_a_fix(tmp_path):
    (tmp_path / "taken").write_text("a file where a folder should be")
    with pytest.raises(AuditError, match=r"taken.*Fix:"):
        open_store(tmp_path / "taken" / "audit.sqlite")


def test_nan_risk_is_refused_rather_than_stored_as_null(target):
    with open_store(target) as store:
        with pytest.raises(AuditError, match="risk is NaN"):
            store.append_decisions([decision(1, risk=float("nan"))])
        assert store.decisions() == [] and store.verify().ok


def test_default_audit_db_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CXR_TRIAGE_AUDIT_DB", raising=False)
    assert default_audit_db() == Path("cxr-triage-audit.sqlite")
    monkeypatch.setenv("CXR_TRIAGE_AUDIT_DB", str(tmp_path / "x.sqlite"))
    assert default_audit_db() == tmp_path / "x.sqlite"
    monkeypatch.setenv("CXR_TRIAGE_AUDIT_DB", "postgresql://cxr@db.example:5432/audit")
    assert default_audit_db() == "postgresql://cxr@db.example:5432/audit"  # not mangled into a path


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_verify_passes_a_good_store_and_fails_a_tampered_one(db, capsys):
    assert run_cli("audit", "verify", "--audit-db", str(db)) == 0
    assert "audit chain OK: 5 decisions, 2 reviews" in capsys.readouterr().out
    tamper(db, "UPDATE decisions SET path = '/elsewhere' WHERE id = 4")
    assert run_cli("audit", "verify", "--audit-db", str(db)) == 1
    assert "decisions record 4" in capsys.readouterr().out


def test_cli_verify_does_not_create_a_missing_store(tmp_path, capsys):
    assert run_cli("audit", "verify", "--audit-db", str(tmp_path / "none.sqlite")) == 1
    assert "no audit store here" in capsys.readouterr().err and not (tmp_path / "none.sqlite").exists()


def test_cli_export_writes_the_csv(db, tmp_path, capsys):
    out = tmp_path / "out.csv"
    assert run_cli("audit", "export", "--audit-db", str(db), "--out", str(out)) == 0
    assert "wrote 5 decisions" in capsys.readouterr().out and len(out.read_text().splitlines()) == 6


def test_cli_export_neutralizes_spreadsheet_formulas_in_values_from_files(tmp_path, capsys):
    db, out = tmp_path / "audit.sqlite", tmp_path / "out.csv"
    crafted = {"manufacturer": '=HYPERLINK("http://evil.example/","re-login")', "body_part": "@SUM(A1:A9)",
               "study_uid": "=1+1", "detail": "+cmd|' /C calc'!A0", "path": "/data/=1+1.dcm"}
    with open_store(db) as store:
        store.append_decisions([decision(3, **crafted)])
    assert run_cli("audit", "export", "--audit-db", str(db), "--out", str(out)) == 0
    with open(out, newline="", encoding="utf-8") as handle:
        [row] = list(csv.DictReader(handle))
    assert {name: row[name] for name in crafted} == {
        "manufacturer": "'" + crafted["manufacturer"], "body_part": "'@SUM(A1:A9)", "study_uid": "'=1+1",
        "detail": "'" + crafted["detail"], "path": "/data/=1+1.dcm"}
    assert (row["risk"], row["flagged"], row["id"]) == ("0.03", "0", "1")  # numbers stay numbers


@pytest.mark.parametrize("make_out", [Path.mkdir, lambda out: os.symlink(os.devnull, out)], ids=["folder", "device"])
def test_cli_export_refuses_an_out_that_is_not_a_regular_file_before_reading(db, tmp_path, capsys, make_out):
    out = tmp_path / "out.csv"
    make_out(out)
    assert run_cli("audit", "export", "--audit-db", str(db), "--out", str(out)) == 1
    error = capsys.readouterr().err
    assert f"{out}: cannot write the export here: it is " in error and "Fix: pass --out a file path" in error
    assert out.is_dir() or os.readlink(out) == os.devnull  # left as it was, never renamed over


def test_cli_head_prints_an_anchor_that_verify_checks_from_a_log(db, tmp_path, capsys):
    assert run_cli("audit", "head", "--audit-db", db) == 0
    head = capsys.readouterr().out.strip()
    log = tmp_path / "anchors.log"
    log.write_text(f"2026-11-28 daily anchor: {head}\nunrelated line\n")
    assert run_cli("audit", "verify", "--audit-db", db, "--anchors", str(log)) == 0
    assert "through 1 anchored head(s)" in capsys.readouterr().out
    tamper(db, "DELETE FROM decisions WHERE id = 5", "UPDATE meta SET value = (SELECT '{\"last_id\": 4, \"hash\": \"' "
               "|| record_hash || '\", \"count\": 4}' FROM decisions WHERE id = 4) WHERE key = 'head:decisions'")
    assert run_cli("audit", "verify", "--audit-db", db) == 0  # the rewrite is self-consistent
    capsys.readouterr()
    assert run_cli("audit", "verify", "--audit-db", db, "--anchor", head) == 1
    assert "decisions record 5: missing: an anchored head names this record" in capsys.readouterr().out


def test_cli_head_refuses_to_anchor_a_broken_chain(db, capsys):
    tamper(db, "UPDATE reviews SET verdict = 'agree' WHERE id = 2")
    assert run_cli("audit", "head", "--audit-db", db) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "not anchoring a broken chain" in captured.err and "reviews record 2" in captured.err


def test_a_postgresql_database_without_a_store_is_refused_read_only(pg_url, capsys):
    assert run_cli("audit", "verify", "--audit-db", pg_url) == 1
    assert "no audit store in this database" in capsys.readouterr().err


def test_an_unreachable_postgresql_server_is_an_audit_error_that_hides_the_password():
    pytest.importorskip("psycopg", reason="psycopg is not installed. Fix: pip install -e '.[scale]'")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(AuditError) as raised:
        open_store(f"postgresql://cxr:hunter2@127.0.0.1:{port}/audit")
    assert "hunter2" not in str(raised.value) and "cxr:***@127.0.0.1" in str(raised.value)
    assert "Fix: check that the PostgreSQL server is running" in str(raised.value)


def test_a_store_written_by_release_0_1_0_verifies_anchors_and_takes_new_records(tmp_path):
    path = tmp_path / "old.sqlite"
    connection = sqlite3.connect(path)
    connection.executescript((Path(__file__).parent / "data" / "audit" / "audit-0.1.0.sql").read_text())
    connection.close()
    with open_store(path) as store:
        assert store.verify().message == "audit chain OK: 4 decisions, 1 reviews"
        anchor = store.head()
        assert anchor.startswith("cxr-triage-audit-head decisions=4:")
        assert store.decisions()[0]["software_version"] == "0.1.0"
        assert store.append_decisions([decision(9)]) == [5] and store.append_review(5, "dr.b", "disagree") == 2
        result = store.verify([anchor])
    assert result.ok and (result.n_records, result.n_reviews) == (5, 2)


def test_copy_store_in_small_chunks_gives_an_identical_store_with_the_same_head(db, tmp_path):
    with open_store(db) as source, open_store(tmp_path / "copy.sqlite") as copy:
        assert copy_store(source, copy, chunk=2) == {"decisions": 5, "reviews": 2}
        assert copy.decisions() == source.decisions() and copy.reviews() == source.reviews()
        assert copy.chain_heads() == source.chain_heads() and copy.verify().ok


def test_current_decisions_are_each_files_latest_record_that_nothing_supersedes(db):
    """The one current-decision rule: a re-flag of the same file and a new file content at the same path
    (the workstation's resend) both replace the record they supersede; filters choose among the files."""
    with open_store(db) as store:
        [reflag] = store.append_decisions([decision(1, flagged=True, supersedes=2)])  # same file, flag changed
        [resent] = store.append_decisions([decision(3, sha256="f" * 64, supersedes=4)])  # same path, new content
        current = [r["id"] for r in store.current_decisions()]
        assert current == [1, 3, 5, reflag, resent]
        assert [r["id"] for r in store.current_decisions(study_uid="1.2.3.1")] == [3, resent]
        assert set(store.decided_keys("b" * 64)) == {(r["path"], r["sha256"]) for r in store.current_decisions()}


def test_chain_checks_run_without_a_database():
    from triage.audit.chain import chain_rows, head_problem, link_problem
    from triage.audit.records import DECISION_KINDS

    head = {"last_id": 0, "hash": GENESIS_HASH, "count": 0}
    rows = chain_rows(DECISION_KINDS, [dataclasses.asdict(decision(i)) for i in range(3)], head, lambda: "t", "0.1.0")
    assert [r["id"] for r in rows] == [1, 2, 3] and rows[1]["prev_hash"] == rows[0]["record_hash"]
    assert link_problem(1, rows[0]["record_hash"], rows[1]) is None
    assert link_problem(1, rows[0]["record_hash"], {**rows[1], "risk": 0.99})[1].endswith("(the record was edited)")
    assert link_problem(1, rows[0]["record_hash"], rows[2])[0] == 2  # record 2 deleted
    assert head_problem({"last_id": 3, "hash": rows[2]["record_hash"], "count": 3}, 2, rows[1]["record_hash"], 2)[0] == 3
