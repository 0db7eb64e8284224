"""The audit store: append-only hash chains, tamper detection, resumable-run tables, CLI."""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from deploy.audit_cmd import add_parser
from triage.audit import DECISION_COLUMNS, GENESIS_HASH, AuditStore, Decision, default_audit_db
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


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A store holding 5 decisions (ids 1..5) and 2 reviews of decision 2."""
    path = tmp_path / "audit.sqlite"
    with AuditStore(path) as store:
        store.append_decisions([decision(i) for i in range(5)])
        store.append_review(2, "dr.a", "agree", finding="pneumonia")
        store.append_review(2, "dr.b", "disagree", note="old scar")
    return path


def tamper(path: Path, *statements: str) -> None:
    """What an attacker with file access can do: drop the triggers, then change rows."""
    connection = sqlite3.connect(path)
    for name in ("decisions_no_update", "decisions_no_delete", "reviews_no_update", "reviews_no_delete"):
        connection.execute(f"DROP TRIGGER IF EXISTS {name}")
    for statement in statements:
        connection.execute(statement)
    connection.commit()
    connection.close()


def verify(path: Path):
    with AuditStore(path) as store:
        return store.verify()


def test_appended_decisions_read_back_with_store_columns(db):
    with AuditStore(db) as store:
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


def test_an_empty_store_verifies(tmp_path):
    assert verify(tmp_path / "new.sqlite").message == "audit chain OK: 0 decisions, 0 reviews"


def test_update_and_delete_are_refused_while_the_triggers_stand(db):
    connection = sqlite3.connect(db)
    for statement in ("UPDATE decisions SET risk = 0.99 WHERE id = 3", "DELETE FROM decisions WHERE id = 5",
                      "UPDATE reviews SET verdict = 'agree' WHERE id = 2", "DELETE FROM reviews"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            connection.execute(statement)
    connection.close()
    assert verify(db).ok


def test_an_edited_decision_is_named(db):
    tamper(db, "UPDATE decisions SET risk = 0.99 WHERE id = 3")
    result = verify(db)
    assert not result.ok and result.first_bad_id == 3 and result.table == "decisions" and result.n_records == 5
    assert "decisions record 3" in result.message and "edited" in result.message


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
    with AuditStore(db) as store:
        row = store.decisions()[2]
    row = {**row, "risk": 0.99, "flagged": int(row["flagged"])}
    tamper(db, f"UPDATE decisions SET risk = 0.99, record_hash = '{record_hash(row['prev_hash'], row)}' WHERE id = 3")
    result = verify(db)
    assert not result.ok and result.first_bad_id == 4 and "prev_hash" in result.message


def test_a_rehashed_edit_of_the_last_record_is_caught_by_the_chain_head(db):
    from triage.audit import record_hash
    with AuditStore(db) as store:
        row = store.decisions()[-1]
    row = {**row, "flagged": 1, "risk": 0.99}
    tamper(db, f"UPDATE decisions SET risk = 0.99, flagged = 1, record_hash = '{record_hash(row['prev_hash'], row)}' "
               "WHERE id = 5")
    result = verify(db)
    assert not result.ok and result.first_bad_id == 5 and "chain head" in result.message


def test_edited_and_deleted_reviews_are_named(db, tmp_path):
    tamper(db, "UPDATE reviews SET verdict = 'agree' WHERE id = 2")
    result = verify(db)
    assert not result.ok and (result.table, result.first_bad_id) == ("reviews", 2) and "edited" in result.message

    other = tmp_path / "other.sqlite"
    with AuditStore(other) as store:
        store.append_decisions([decision(0)])
        for verdict in ("agree", "disagree", "not_assessable"):
            store.append_review(1, "dr.a", verdict)
    tamper(other, "DELETE FROM reviews WHERE id = 3")
    result = verify(other)
    assert not result.ok and (result.table, result.first_bad_id) == ("reviews", 3) and "truncated" in result.message


def test_reviews_read_back_by_study_and_are_validated(db):
    with AuditStore(db) as store:
        reviews = store.reviews_for("1.2.3.0")  # decision 2 is file 1, study 0
        assert [(r["reviewer"], r["verdict"], r["decision_id"]) for r in reviews] == [("dr.a", "agree", 2),
                                                                                      ("dr.b", "disagree", 2)]
        with pytest.raises(ValueError, match="'maybe' is not one of agree, disagree, not_assessable"):
            store.append_review(2, "dr.a", "maybe")
        with pytest.raises(ValueError, match="no decision with id 99"):
            store.append_review(99, "dr.a", "agree")
        assert store.verify().n_reviews == 2


def _append_fifty(path: str, worker: int) -> None:
    with AuditStore(path) as store:
        for i in range(50):
            store.append_decisions([decision(1000 * worker + i)])


def test_concurrent_writers_from_two_processes_keep_one_valid_chain(tmp_path):
    path = tmp_path / "audit.sqlite"
    AuditStore(path).close()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_fifty, args=(str(path), w)) for w in (1, 2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    result = verify(path)
    assert result.ok and result.n_records == 100
    with AuditStore(path) as store:
        assert [r["id"] for r in store.decisions()] == list(range(1, 101))


def test_decided_keys_gives_the_latest_decision_per_file_for_a_bundle(db):
    with AuditStore(db) as store:
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
    with AuditStore(db) as store:
        store.save_pending([("/a", "s1", bundle, payload), ("/b", "s2", bundle, {"risk": 0.5}),
                            ("/a", "s1", "other", {"risk": 0.1})])
        store.save_pending([("/b", "s2", bundle, {"risk": 0.75})])  # replaces by key
        assert store.load_pending(bundle) == {("/a", "s1"): payload, ("/b", "s2"): {"risk": 0.75}}
        store.clear_pending([("/a", "s1", bundle), ("/b", "s2", bundle)])
        assert store.load_pending(bundle) == {}
        assert store.load_pending("other") == {("/a", "s1"): {"risk": 0.1}}
        assert store.verify().ok


def test_export_csv_has_every_column_and_no_raw_patient_id(db, tmp_path):
    out = tmp_path / "export" / "audit.csv"
    with AuditStore(db) as store:
        assert store.export_csv(out) == 5
    text = out.read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert tuple(rows[0]) == DECISION_COLUMNS and len(rows) == 5
    assert rows[3]["path"] == "/data/img003.dcm" and rows[3]["sha256"] == f"{3:064x}"
    assert rows[3]["risk"] == "0.03" and rows[3]["patient_pseudo_id"] == pseudonymize("MRN-3", b"k" * 32)
    assert "MRN-" not in text


def test_a_file_that_is_not_a_database_is_an_audit_error_with_a_fix(tmp_path):
    path = tmp_path / "audit.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(AuditError, match=r"audit\.sqlite: .*not a database.*Fix: restore"):
        AuditStore(path)


def test_an_unwritable_location_is_an_audit_error_with_a_fix(tmp_path):
    (tmp_path / "taken").write_text("a file where a folder should be")
    with pytest.raises(AuditError, match=r"taken.*Fix:"):
        AuditStore(tmp_path / "taken" / "audit.sqlite")


def test_nan_risk_is_refused_rather_than_stored_as_null(tmp_path):
    with AuditStore(tmp_path / "a.sqlite") as store:
        with pytest.raises(AuditError, match="risk is NaN"):
            store.append_decisions([decision(1, risk=float("nan"))])
        assert store.decisions() == [] and store.verify().ok


def test_default_audit_db_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CXR_TRIAGE_AUDIT_DB", raising=False)
    assert default_audit_db() == Path("cxr-triage-audit.sqlite")
    monkeypatch.setenv("CXR_TRIAGE_AUDIT_DB", str(tmp_path / "x.sqlite"))
    assert default_audit_db() == tmp_path / "x.sqlite"


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
