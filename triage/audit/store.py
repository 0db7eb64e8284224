"""The audit store: every triage decision and every clinician review, append-only, hash-chained.

``open_store(target)`` is the only way to open one: a path is a SQLite file (WAL mode), a ``postgresql://``
URL a PostgreSQL database. ``AuditStore`` holds what both share (chaining, reading, the current-decision
rule, verification) over a ``Backend``. Triggers refuse UPDATE and DELETE on both chained tables; ``verify``
detects edits, deletions and truncation made by someone who dropped the triggers. A forger who rewrites a
chain's tail and its head is caught only against a head kept elsewhere: ``head()`` gives the anchor text to
keep off site (see SECURITY.md), ``verify(anchors)`` checks the chains still pass through every anchored record.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import AuditError
from .backend import Backend, audit_error
from .chain import ANCHOR_PREFIX, GENESIS_HASH, anchor_problem, chain_rows, head_problem, link_problem, parse_anchor
from .paths import is_url
from .records import CHAIN_KINDS, CHAINS, VERDICTS, Decision, VerifyResult
from .schema import SCHEMA_VERSION

# The current decision of a file: the latest record for its (path, sha256) that no later record supersedes.
_CURRENT = ("id IN (SELECT MAX(id) FROM decisions WHERE {where} GROUP BY path, sha256) "
            "AND id NOT IN (SELECT supersedes FROM decisions WHERE supersedes IS NOT NULL)")


def open_store(target: str | Path, create: bool = True) -> "AuditStore":
    """The audit store at ``target``: a ``postgresql://`` URL opens PostgreSQL, anything else a SQLite file.

    ``create=False`` refuses to create a new store. Raises ``AuditError`` naming the store
    (a URL without its password) and the fix when it cannot be opened.
    """
    if is_url(target):
        from .postgres import PostgresBackend  # psycopg is imported only by sites that use PostgreSQL

        backend: Backend = PostgresBackend(str(target))
    else:
        from .sqlite import SqliteBackend

        backend = SqliteBackend(target, create)
    return AuditStore(backend, create)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _decision_dict(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "flagged": bool(row["flagged"])}


class AuditStore:
    """The audit store over an open ``backend``; a context manager. Open one with ``open_store``.

    Creates the schema on first use (``create``), else checks the store is there and of this schema version.
    """

    def __init__(self, backend: Backend, create: bool = True) -> None:
        self.backend = backend
        self.location = backend.location  # how messages name the store
        self._depth = 0  # nesting of transaction()
        try:
            with self.database_errors("cannot set up"):
                needs_schema = backend.needs_schema(create)
            self._create_schema() if needs_schema else self._check_schema()
        except AuditError:
            backend.close()
            raise

    # -- transactions and errors ----------------------------------------------------------

    @contextmanager
    def database_errors(self, doing: str) -> Iterator[None]:
        """Turn any database error inside the block into an AuditError naming the store and the fix."""
        try:
            if self._depth == 0:
                self.backend.reconnect_if_dropped()
            yield
        except self.backend.errors as error:
            raise audit_error(self.location, doing, error, self.backend.error_fix(error)) from error

    @contextmanager
    def transaction(self, doing: str, write: bool = True) -> Iterator[None]:
        """A write transaction (appenders chain in turn) or a read snapshot; COMMIT, or ROLLBACK on error."""
        with self.database_errors(doing):
            self.backend.begin(write)
            self._depth += 1
            try:
                yield
                self.backend.execute("COMMIT")
            finally:
                self._depth -= 1
                if self.backend.in_transaction():
                    self.backend.execute("ROLLBACK")

    def _create_schema(self) -> None:
        with self.transaction("cannot create the schema of"):
            for statement in self.backend.schema():
                self.backend.execute(statement)
            self.backend.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING",
                                 (str(SCHEMA_VERSION),))
            for table in CHAINS:
                head = json.dumps({"last_id": 0, "hash": GENESIS_HASH, "count": 0})
                self.backend.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT DO NOTHING", (f"head:{table}", head))
        self._check_schema()

    def _check_schema(self) -> None:
        """Refuse a database that has no audit store, or one of another schema version."""
        with self.database_errors("cannot read"):
            present = self.backend.has_store()
            found = list(self.backend.execute("SELECT value FROM meta WHERE key = 'schema_version'")) if present else []
        if not found:
            raise AuditError(f"{self.location}: no audit store in this database. Fix: pass --audit-db the URL the "
                             "scorer wrote to, or score once to create it")
        if int(found[0]["value"]) != SCHEMA_VERSION:
            raise AuditError(f"{self.location}: audit schema version {found[0]['value']}, this software "
                             f"({__version__}) reads {SCHEMA_VERSION}. Fix: use the cxr-triage version that wrote it")

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "AuditStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the chains -----------------------------------------------------------------------

    def chain_head(self, table: str) -> dict[str, Any]:
        """{"last_id", "hash", "count"} of ``table``'s chain as recorded in ``meta``; inside a transaction or not."""
        rows = self.backend.execute("SELECT value FROM meta WHERE key = ?", (f"head:{table}",))
        return json.loads(next(iter(rows))["value"])

    def _append_chained(self, table: str, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Hash and insert ``rows`` after the chain head; caller holds the write transaction."""
        self.backend.lock_head(table)
        head = self.chain_head(table)
        full_rows = chain_rows(CHAIN_KINDS[table], rows, head, _utc_now, __version__)
        if not full_rows:
            return []
        names, marks = ", ".join(CHAINS[table]), ", ".join("?" * len(CHAINS[table]))
        self.backend.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})",
                                 [list(r.values()) for r in full_rows])
        new_head = {"last_id": full_rows[-1]["id"], "hash": full_rows[-1]["record_hash"],
                    "count": head["count"] + len(full_rows)}
        self.backend.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(new_head), f"head:{table}"))
        return [r["id"] for r in full_rows]

    def append_decisions(self, decisions: Sequence[Decision]) -> list[int]:
        """Append ``decisions`` in one transaction; returns their ids, in order."""
        rows = [dataclasses.asdict(d) for d in decisions]
        with self.transaction("cannot append to"):
            return self._append_chained("decisions", rows)

    def append_review(self, decision_id: int, reviewer: str, verdict: str, finding: str = "", note: str = "",
                      study_uid: str | None = None) -> int:
        """Record a clinician's verdict on decision ``decision_id``; returns the review's id.

        ``verdict`` is one of ``VERDICTS``; ``study_uid`` defaults to the decision's.
        """
        if verdict not in VERDICTS:
            raise ValueError(f"append_review: verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
        if not reviewer.strip():
            raise ValueError("append_review: reviewer is empty. Fix: record who reviewed the study")
        with self.transaction("cannot append a review to"):
            found = list(self.backend.execute("SELECT study_uid FROM decisions WHERE id = ?", (decision_id,)))
            if not found:
                raise ValueError(f"append_review: no decision with id {decision_id} in {self.location}")
            row = {"decision_id": decision_id, "study_uid": found[0]["study_uid"] if study_uid is None else study_uid,
                   "reviewer": reviewer, "verdict": verdict, "finding": finding, "note": note}
            return self._append_chained("reviews", [row])[0]

    # -- reading --------------------------------------------------------------------------

    def decisions(self, *, study_uid: str | None = None, run_id: str | None = None, bundle_sha256: str | None = None,
                  status: str | None = None, path: str | None = None, flagged: bool | None = None,
                  limit: int | None = None, current: bool = False) -> list[dict[str, Any]]:
        """Decision rows (dicts of every column, ``flagged`` as bool) in id order; each filter is equality.

        ``current=True`` keeps only each file's current decision among the matching records: the latest for its
        (path, sha256) that no later record supersedes (the one rule every program uses).
        """
        filters = {"study_uid": study_uid, "run_id": run_id, "bundle_sha256": bundle_sha256, "status": status,
                   "path": path, "flagged": None if flagged is None else int(flagged)}
        used = {k: v for k, v in filters.items() if v is not None}
        where = " AND ".join(f"{k} = ?" for k in used) or "1 = 1"
        if current:
            where = _CURRENT.format(where=where)
        sql = f"SELECT * FROM decisions WHERE {where} ORDER BY id" + ("" if limit is None else f" LIMIT {int(limit)}")
        with self.database_errors("cannot read"):
            return [_decision_dict(r) for r in self.backend.execute(sql, tuple(used.values()))]

    def current_decisions(self, **filters: Any) -> list[dict[str, Any]]:
        """``decisions(current=True, **filters)``: each file's current decision, in id order."""
        return self.decisions(current=True, **filters)

    def decided_keys(self, bundle_sha256: str) -> dict[tuple[str, str], dict[str, Any]]:
        """(path, sha256) -> the current decision row for that file by this bundle (for resumable runs)."""
        return {(r["path"], r["sha256"]): r for r in self.current_decisions(bundle_sha256=bundle_sha256)}

    def reviews_for(self, study_uid: str) -> list[dict[str, Any]]:
        """Every review of ``study_uid``, oldest first."""
        with self.database_errors("cannot read"):
            return [dict(r) for r in self.backend.execute("SELECT * FROM reviews WHERE study_uid = ? ORDER BY id",
                                                          (study_uid,))]

    def reviews(self) -> list[dict[str, Any]]:
        """Every review of every study, oldest first (read-only; for the dashboards)."""
        with self.database_errors("cannot read"):
            return [dict(r) for r in self.backend.execute("SELECT * FROM reviews ORDER BY id")]

    # -- verification and anchoring -------------------------------------------------------

    def chain_heads(self) -> dict[str, dict[str, Any]]:
        """{table: {"last_id", "hash", "count"}} as recorded in ``meta``: a cheap "has anything changed" check."""
        with self.database_errors("cannot read"):
            return {table: self.chain_head(table) for table in CHAINS}

    def head(self) -> str:
        """One line naming the last record of each chain, to keep outside this store (see SECURITY.md).

        ``cxr-triage-audit-head decisions=ID:SHA256 reviews=ID:SHA256 at=UTC``; an empty chain is ``0:`` + 64 zeros.
        """
        with self.transaction("cannot read", write=False):
            parts = []
            for table in CHAINS:
                last = list(self.backend.execute(f"SELECT id, record_hash FROM {table} ORDER BY id DESC LIMIT 1"))
                last_id, digest = (last[0]["id"], last[0]["record_hash"]) if last else (0, GENESIS_HASH)
                parts.append(f"{table}={last_id}:{digest}")
        return f"{ANCHOR_PREFIX} {' '.join(parts)} at={_utc_now()}"

    def verify(self, anchors: Sequence[str] = ()) -> VerifyResult:
        """Walk both hash chains, then check each anchor (``head()`` text kept elsewhere) is still on them.

        Returns the first broken record, its table and study, and why, when one is found.
        Raises ValueError for a malformed anchor.
        """
        heads = [parse_anchor(text) for text in anchors]
        counts: dict[str, int] = {}
        problem: tuple[str, int, str, str] | None = None
        with self.transaction("cannot read", write=False):  # one consistent snapshot of both chains
            for table in CHAINS:
                counts[table], bad = self.check_chain(table)
                problem = problem or (bad and (table, *bad))
            for anchor in heads:
                problem = problem or self._anchor_problem(anchor)
        n_decisions, n_reviews = counts["decisions"], counts["reviews"]
        if problem is None:
            anchored = f", and through {len(heads)} anchored head(s)" if heads else ""
            return VerifyResult(True, n_decisions, None, f"audit chain OK: {n_decisions} decisions, {n_reviews} "
                                f"reviews{anchored}", n_reviews)
        table, bad_id, why, study = problem
        where = f" (study {study})" if study else ""
        message = f"audit chain BROKEN in {self.location}: {table} record {bad_id}{where}: {why}"
        return VerifyResult(False, n_decisions, bad_id, message, n_reviews, table, study)

    def check_chain(self, table: str) -> tuple[int, tuple[int, str, str] | None]:
        """(records in ``table``, (first bad id, why, its study) or None); inside a transaction."""
        prev_id, prev_hash, count, problem = 0, GENESIS_HASH, 0, None
        for row in self.backend.stream(f"SELECT {', '.join(CHAINS[table])} FROM {table} ORDER BY id"):
            count += 1
            if problem is None:
                link = link_problem(prev_id, prev_hash, row)
                if link is not None:
                    problem = (*link, row["study_uid"] if link[0] == row["id"] else "")
                prev_id, prev_hash = row["id"], row["record_hash"]
        if problem is None:
            end = head_problem(self.chain_head(table), prev_id, prev_hash, count)
            if end is not None:
                problem = (*end, self._study_of(table, end[0]))
        return count, problem

    def _study_of(self, table: str, record_id: int) -> str:
        found = list(self.backend.execute(f"SELECT study_uid FROM {table} WHERE id = ?", (record_id,)))
        return found[0]["study_uid"] if found else ""

    def _anchor_problem(self, anchor: dict[str, tuple[int, str]]) -> tuple[str, int, str, str] | None:
        """Why the chains do not pass through an anchored head, as (table, id, why, study); None when they do."""
        for table, (last_id, digest) in anchor.items():
            found = list(self.backend.execute(f"SELECT record_hash, study_uid FROM {table} WHERE id = ?", (last_id,)))
            bad = anchor_problem(last_id, digest, found[0] if found else None)
            if bad is not None:
                return table, *bad, found[0]["study_uid"] if found else ""
        return None
