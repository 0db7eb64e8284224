"""The audit store: every triage decision and every clinician review, append-only, hash-chained.

``open_store(target)`` opens one: a path is a SQLite file (WAL mode, the default), a
``postgresql://`` URL a PostgreSQL database (``triage.audit_pg``). Both hold four tables:

- ``decisions``: one row per input file per run (a ``Decision`` plus id, created_at,
  software_version, prev_hash, record_hash).
- ``reviews``: clinician verdicts on decisions, with their own hash chain.
- ``meta``: schema version and the head (last id, last hash, count) of each chain.
- ``pending_scores``: a work table (not chained) that keeps finished inferences of a
  killed batch run until their decisions are appended.

Each record's ``record_hash`` is sha256(prev_hash + canonical JSON of every other
column); the first record's ``prev_hash`` is 64 zeros. Triggers refuse UPDATE and
DELETE on both chained tables; ``verify`` detects edits, deletions and truncation
made by someone who dropped the triggers. A forger who rewrites a chain's tail and
its head is caught only against a head kept elsewhere: ``head()`` gives the anchor
text to keep off site (see SECURITY.md), ``verify(anchors)`` checks the chains still
pass through every anchored record.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import __version__
from .errors import AuditError
from .present import csv_cell

SCHEMA_VERSION = 1
DEFAULT_AUDIT_DB = "cxr-triage-audit.sqlite"
AUDIT_DB_ENV = "CXR_TRIAGE_AUDIT_DB"
GENESIS_HASH = "0" * 64
BUSY_TIMEOUT_MS = 30_000
VERDICTS = ("agree", "disagree", "not_assessable")


def default_audit_db() -> Path | str:
    """$CXR_TRIAGE_AUDIT_DB (a path, or a ``postgresql://`` URL kept as text), else ``./cxr-triage-audit.sqlite``."""
    target = os.environ.get(AUDIT_DB_ENV) or DEFAULT_AUDIT_DB
    return target if is_url(target) else Path(target)


@dataclass(frozen=True)
class Decision:
    """What happened to one input file; one row of the ``decisions`` table."""

    path: str
    sha256: str            # of the source file
    status: str            # "scored" | "human_review"
    reason: str = ""       # code from triage.errors.REASONS; "" when scored
    detail: str = ""       # readable message (file, problem, fix); never patient names
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    patient_pseudo_id: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    manufacturer: str = ""
    bundle_name: str = ""
    bundle_version: str = ""
    bundle_sha256: str = ""
    finding: str = ""
    risk: float | None = None        # calibrated image risk
    study_risk: float | None = None  # max over the study's scored images
    threshold: float | None = None   # risk threshold in force
    flag_rate: float | None = None   # target flag rate
    policy: str = ""                 # "batch_top_k" (or "batch_top_k min_risk=R") | "stream_threshold" | ...
    flagged: bool = False            # study-level flag
    run_id: str = ""
    decode_ms: float | None = None
    infer_ms: float | None = None
    provider: str = ""               # ONNX Runtime execution provider
    supersedes: int | None = None    # id of an earlier decision this one replaces


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of ``AuditStore.verify``: ``first_bad_id`` is in ``table`` when not ok."""

    ok: bool
    n_records: int                # decisions
    first_bad_id: int | None
    message: str
    n_reviews: int = 0
    table: str = ""               # "decisions" | "reviews" when not ok
    study_uid: str = ""           # the broken record's study, when the record is still there


# Column kinds: "text" (NOT NULL, "" default), "real" (nullable), "bool" (0/1), "int" (nullable).
_KIND_OF_ANNOTATION = {"str": "text", "float | None": "real", "bool": "bool", "int | None": "int"}
_DECISION_KINDS = {f.name: _KIND_OF_ANNOTATION[str(f.type)] for f in dataclasses.fields(Decision)}
_HEAD_KINDS = {"id": "int", "created_at": "text", "software_version": "text"}
_TAIL_KINDS = {"prev_hash": "text", "record_hash": "text"}
_DECISION_ROW_KINDS = {**_HEAD_KINDS, **_DECISION_KINDS, **_TAIL_KINDS}
DECISION_COLUMNS = tuple(_DECISION_ROW_KINDS)
_REVIEW_KINDS = {
    "id": "int", "created_at": "text", "software_version": "text", "decision_id": "int", "study_uid": "text",
    "reviewer": "text", "verdict": "text", "finding": "text", "note": "text", **_TAIL_KINDS,
}
REVIEW_COLUMNS = tuple(_REVIEW_KINDS)
CHAINS = {"decisions": DECISION_COLUMNS, "reviews": REVIEW_COLUMNS}
PENDING_COLUMNS = ("path", "sha256", "bundle_sha256", "payload", "created_at")
ANCHOR_PREFIX = "cxr-triage-audit-head"
_SQL_TYPE = {"text": "TEXT NOT NULL DEFAULT ''", "real": "REAL", "bool": "INTEGER NOT NULL DEFAULT 0", "int": "INTEGER"}


def table_sql(sql_type: dict[str, str], id_sql: str) -> list[str]:
    """CREATE TABLE/INDEX statements of the four tables, given a backend's column types and id column."""
    def column(name: str, kind: str) -> str:
        if name == "id":
            return id_sql
        if name in ("supersedes", "decision_id"):
            not_null = " NOT NULL" if name == "decision_id" else ""
            return f"{name} {sql_type['int']}{not_null} REFERENCES decisions(id)"
        return f"{name} {sql_type[kind]}"

    return [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS decisions ({', '.join(column(n, k) for n, k in _DECISION_ROW_KINDS.items())})",
        "CREATE INDEX IF NOT EXISTS decisions_by_key ON decisions (bundle_sha256, path, sha256)",
        "CREATE INDEX IF NOT EXISTS decisions_by_study ON decisions (study_uid)",
        f"CREATE TABLE IF NOT EXISTS reviews ({', '.join(column(n, k) for n, k in _REVIEW_KINDS.items())})",
        "CREATE INDEX IF NOT EXISTS reviews_by_study ON reviews (study_uid)",
        "CREATE TABLE IF NOT EXISTS pending_scores (path TEXT NOT NULL, sha256 TEXT NOT NULL, bundle_sha256 TEXT NOT NULL, "
        "payload TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (path, sha256, bundle_sha256))",
    ]


def _append_only_triggers(table: str) -> list[str]:
    return [
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END"
        for verb in ("UPDATE", "DELETE")
    ]


# One statement each: executescript would COMMIT the transaction that guards schema creation.
SCHEMA_STATEMENTS = [
    *table_sql(_SQL_TYPE, "id INTEGER PRIMARY KEY AUTOINCREMENT"),
    *_append_only_triggers("decisions"),
    *_append_only_triggers("reviews"),
]


def is_url(target: str | Path) -> bool:
    """True when ``target`` names a PostgreSQL database (``postgresql://`` or ``postgres://``) rather than a file."""
    return str(target).startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` parameter) replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = "&".join("password=***" if q.lower().startswith("password=") else q for q in parts.query.split("&"))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_PATH_ESCAPE = re.compile(rb"\\(\\|x[0-9a-f]{2})")  # what path_text writes: a backslash doubled, or \xNN


def path_text(path: str | os.PathLike[str]) -> str:
    """A file path as the audit store, the worklist and the resume key hold it: UTF-8 text that maps back to the file.

    A byte of the name that is not UTF-8 (``M\\xfcller.dcm`` in Latin-1 from a legacy share, which Python holds as
    a lone surrogate) is written ``\\xfc`` and a backslash ``\\\\``, so the mapping is one-to-one; any other path
    is unchanged. ``os_path`` maps the text back to the file.
    """
    return os.fsencode(path).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def os_path(text: str) -> str:
    """The file path whose ``path_text`` is ``text`` (the inverse), as ``open`` takes it."""
    def byte(escape: re.Match[bytes]) -> bytes:
        return b"\\" if escape[1] == b"\\" else bytes.fromhex(escape[1][1:].decode("ascii"))

    return os.fsdecode(_PATH_ESCAPE.sub(byte, text.encode("utf-8")))


def open_store(target: str | Path, create: bool = True) -> "AuditStore":
    """The audit store at ``target``: a ``postgresql://`` URL opens PostgreSQL, anything else a SQLite file.

    ``create=False`` refuses to create a new store. Raises ``AuditError`` naming the store
    (a URL without its password) and the fix when it cannot be opened.
    """
    return AuditStore(str(target) if is_url(target) else target, create=create)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _normalize(kinds: dict[str, str], row: dict[str, Any]) -> dict[str, Any]:
    """Values as the database will store and return them, so the hash of a row read back matches."""
    out: dict[str, Any] = {}
    for name, kind in kinds.items():
        value = row.get(name)
        if kind == "text":
            out[name] = "" if value is None else str(value)
        elif kind == "bool":
            out[name] = int(bool(value))
        elif value is None:
            out[name] = None
        elif kind == "int":
            out[name] = int(value)
        else:
            out[name] = float(value)
            if math.isnan(out[name]):
                raise AuditError(f"audit record: {name} is NaN, which the audit store cannot hold. Fix: record None instead")
    return out


def _canonical_json(row: dict[str, Any]) -> str:
    """Sorted keys, no spaces, floats as repr: the same row always gives the same text."""
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def record_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """sha256 hex of ``prev_hash`` + canonical JSON of ``row`` without its ``record_hash``."""
    body = {k: v for k, v in row.items() if k != "record_hash"}
    return hashlib.sha256((prev_hash + _canonical_json(body)).encode("utf-8")).hexdigest()


def parse_anchor(text: str) -> dict[str, tuple[int, str]]:
    """``head()`` text -> {table: (last id, record_hash)}; ValueError naming the problem when malformed."""
    words = text.split()
    if not words or words[0] != ANCHOR_PREFIX:
        raise ValueError(f"anchor {text.strip()[:80]!r} does not start with {ANCHOR_PREFIX}. "
                         "Fix: pass a line printed by cxr-triage audit head")
    heads: dict[str, tuple[int, str]] = {}
    for word in words[1:]:
        name, _, value = word.partition("=")
        if name in CHAINS:
            last_id, _, digest = value.partition(":")
            if not last_id.isdigit() or len(digest) != 64:
                raise ValueError(f"anchor: {word!r} is not {name}=ID:SHA256. Fix: copy the whole line of audit head")
            heads[name] = (int(last_id), digest)
    if set(heads) != set(CHAINS):
        raise ValueError(f"anchor {text.strip()[:80]!r} lacks decisions= or reviews=. Fix: copy the whole line")
    return heads


class AuditStore:
    """The SQLite audit store at ``path``; a context manager. Creates the schema on first use.

    ``create=False`` refuses to create a new file (for read-only tools such as ``verify``).
    Raises ``AuditError`` naming the file and the fix when it cannot be opened or written.
    ``PostgresAuditStore`` (triage/audit_pg.py) overrides the backend methods in the
    "plumbing" section; everything else is shared, so both backends chain alike.
    """

    backend = "sqlite"

    def __new__(cls, path: str | Path, create: bool = True) -> "AuditStore":
        """``AuditStore(url)`` gives the PostgreSQL store, as ``open_store`` does, so no caller writes a file named like a URL."""
        if cls is AuditStore and is_url(path):
            from .audit_pg import PostgresAuditStore

            return super().__new__(PostgresAuditStore)
        return super().__new__(cls)

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        self.location = str(self.path)  # how messages name the store
        if not create and not self.path.is_file():
            raise AuditError(f"{self.path}: no audit store here. Fix: pass --audit-db the store the scorer wrote "
                             f"(default ${AUDIT_DB_ENV} or ./{DEFAULT_AUDIT_DB})")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise self._error("cannot open", error) from error
        try:
            self._db.row_factory = _dict_row
            with self._db_errors("cannot set up"):
                self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                self._db.execute("PRAGMA foreign_keys = ON")
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = FULL")
                self._create_schema()
        except AuditError:
            self._db.close()
            raise

    # -- plumbing (the backend-specific part) ---------------------------------------------

    _database_errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        """Run one statement (``?`` placeholders); its rows as dicts."""
        return self._db.execute(sql, tuple(params))

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(sql, [tuple(r) for r in rows])

    def _stream(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        """Rows of a whole-table scan without holding them all in memory; inside a transaction."""
        return self._execute(sql, params)  # sqlite3 cursors already fetch as they are iterated

    def _begin(self, write: bool) -> None:
        """BEGIN IMMEDIATE takes SQLite's single write lock, so concurrent appenders chain in turn."""
        self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")

    def _in_transaction(self) -> bool:
        return self._db.in_transaction

    def _lock_head(self, table: str) -> None:
        """Serialize appends to ``table``'s chain (SQLite: BEGIN IMMEDIATE already did)."""

    def _schema_statements(self) -> list[str]:
        return SCHEMA_STATEMENTS

    def _error_fix(self, error: BaseException) -> str | None:
        """A backend-specific fix for ``error``, or None for the generic ones."""
        text = str(error)
        if isinstance(error, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
            return "restore the audit store from backup, or move this file aside to start a new one"
        if "readonly" in text or "unable to open" in text or isinstance(error, OSError):
            return f"make the file and its folder writable, or pass --audit-db (or ${AUDIT_DB_ENV}) a writable path"
        return None

    def close(self) -> None:
        self._db.close()

    # -- shared -------------------------------------------------------------------------------

    def _error(self, doing: str, error: BaseException) -> AuditError:
        """An AuditError for ``error`` that names the store and how to fix it."""
        text = str(error).strip()
        fix = self._error_fix(error)
        if fix is not None:
            pass
        elif "append-only" in text:
            fix = "records are never changed; append a new decision with supersedes=<old id> instead"
        elif "FOREIGN KEY" in text or "foreign key" in text:
            fix = "supersedes and decision_id must name a decision already in this store"
        elif "locked" in text or "busy" in text:
            fix = "another program holds a lock on the store; wait for it to finish and retry"
        else:
            fix = "check the disk and the file, or restore the audit store from backup"
        return AuditError(f"{self.location}: {doing} the audit store ({text}). Fix: {fix}")

    @contextmanager
    def _db_errors(self, doing: str) -> Iterator[None]:
        """Turn any database error inside the block into an AuditError naming the store and the fix."""
        try:
            yield
        except self._database_errors as error:
            raise self._error(doing, error) from error

    _sqlite_errors = _db_errors  # the name before PostgreSQL existed

    @contextmanager
    def _transaction(self, doing: str, write: bool = True) -> Iterator[None]:
        """A write transaction (appenders chain in turn) or a read snapshot; COMMIT, or ROLLBACK on error."""
        with self._db_errors(doing):
            self._begin(write)
            try:
                yield
                self._execute("COMMIT")
            finally:
                if self._in_transaction():
                    self._execute("ROLLBACK")

    def _create_schema(self) -> None:
        with self._transaction("cannot create the schema of"):
            for statement in self._schema_statements():
                self._execute(statement)
            self._execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING", (str(SCHEMA_VERSION),))
            for table in CHAINS:
                head = json.dumps({"last_id": 0, "hash": GENESIS_HASH, "count": 0})
                self._execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT DO NOTHING", (f"head:{table}", head))
            found = int(_one(self._execute("SELECT value FROM meta WHERE key = 'schema_version'"))["value"])
        if found != SCHEMA_VERSION:
            raise AuditError(f"{self.location}: audit schema version {found}, this software ({__version__}) reads "
                             f"{SCHEMA_VERSION}. Fix: use the cxr-triage version that wrote it")

    def __enter__(self) -> "AuditStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the chains -----------------------------------------------------------------------

    def _head(self, table: str) -> dict[str, Any]:
        return json.loads(_one(self._execute("SELECT value FROM meta WHERE key = ?", (f"head:{table}",)))["value"])

    def _append_chained(self, table: str, kinds: dict[str, str], rows: Sequence[dict[str, Any]]) -> list[int]:
        """Hash and insert ``rows`` after the chain head; caller holds the write transaction."""
        self._lock_head(table)
        head = self._head(table)
        prev_hash, first_id = head["hash"], head["last_id"] + 1
        full_rows = []
        for next_id, row in enumerate(rows, start=first_id):
            full = _normalize(kinds, {**row, "id": next_id, "created_at": _utc_now(), "software_version": __version__,
                                      "prev_hash": prev_hash})
            full["record_hash"] = prev_hash = record_hash(prev_hash, full)
            full_rows.append(full)
        if not full_rows:
            return []
        names, marks = ", ".join(kinds), ", ".join("?" * len(kinds))
        self._executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", [list(r.values()) for r in full_rows])
        ids = [r["id"] for r in full_rows]
        new_head = {"last_id": ids[-1], "hash": prev_hash, "count": head["count"] + len(ids)}
        self._execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(new_head), f"head:{table}"))
        return ids

    def append_decisions(self, decisions: Sequence[Decision]) -> list[int]:
        """Append ``decisions`` in one transaction; returns their ids, in order."""
        rows = [dataclasses.asdict(d) for d in decisions]
        with self._transaction("cannot append to"):
            return self._append_chained("decisions", _DECISION_ROW_KINDS, rows)

    def append_review(self, decision_id: int, reviewer: str, verdict: str, finding: str = "", note: str = "",
                      study_uid: str | None = None) -> int:
        """Record a clinician's verdict on decision ``decision_id``; returns the review's id.

        ``verdict`` is one of ``VERDICTS``; ``study_uid`` defaults to the decision's.
        """
        if verdict not in VERDICTS:
            raise ValueError(f"append_review: verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
        if not reviewer.strip():
            raise ValueError("append_review: reviewer is empty. Fix: record who reviewed the study")
        with self._transaction("cannot append a review to"):
            found = list(self._execute("SELECT study_uid FROM decisions WHERE id = ?", (decision_id,)))
            if not found:
                raise ValueError(f"append_review: no decision with id {decision_id} in {self.location}")
            row = {"decision_id": decision_id, "study_uid": found[0]["study_uid"] if study_uid is None else study_uid,
                   "reviewer": reviewer, "verdict": verdict, "finding": finding, "note": note}
            return self._append_chained("reviews", _REVIEW_KINDS, [row])[0]

    # -- reading --------------------------------------------------------------------------

    def decisions(self, *, study_uid: str | None = None, run_id: str | None = None, bundle_sha256: str | None = None,
                  status: str | None = None, path: str | None = None, flagged: bool | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]:
        """Decision rows (dicts of every column, ``flagged`` as bool) in id order; each filter is equality."""
        filters = {"study_uid": study_uid, "run_id": run_id, "bundle_sha256": bundle_sha256, "status": status,
                   "path": path, "flagged": None if flagged is None else int(flagged)}
        used = {k: v for k, v in filters.items() if v is not None}
        where = " AND ".join(f"{k} = ?" for k in used) or "1 = 1"
        sql = f"SELECT * FROM decisions WHERE {where} ORDER BY id" + ("" if limit is None else f" LIMIT {int(limit)}")
        with self._db_errors("cannot read"):
            return [_decision_dict(r) for r in self._execute(sql, tuple(used.values()))]

    def decided_keys(self, bundle_sha256: str) -> dict[tuple[str, str], dict[str, Any]]:
        """(path, sha256) -> the latest decision row for that file by this bundle (for resumable runs)."""
        sql = ("SELECT * FROM decisions WHERE id IN (SELECT MAX(id) FROM decisions WHERE bundle_sha256 = ? "
               "GROUP BY path, sha256) ORDER BY id")
        with self._db_errors("cannot read"):
            return {(r["path"], r["sha256"]): _decision_dict(r) for r in self._execute(sql, (bundle_sha256,))}

    def reviews_for(self, study_uid: str) -> list[dict[str, Any]]:
        """Every review of ``study_uid``, oldest first."""
        with self._db_errors("cannot read"):
            return [dict(r) for r in self._execute("SELECT * FROM reviews WHERE study_uid = ? ORDER BY id", (study_uid,))]

    def reviews(self) -> list[dict[str, Any]]:
        """Every review of every study, oldest first (read-only; for the dashboards)."""
        with self._db_errors("cannot read"):
            return [dict(r) for r in self._execute("SELECT * FROM reviews ORDER BY id")]

    # -- pending work (not chained) -------------------------------------------------------

    def save_pending(self, rows: Iterable[tuple[str, str, str, dict[str, Any]]]) -> None:
        """Keep finished inferences: rows of (path, sha256, bundle_sha256, JSON-able payload); replaces by key."""
        now = _utc_now()
        values = [(p, s, b, json.dumps(payload, sort_keys=True), now) for p, s, b, payload in rows]
        with self._transaction("cannot save pending scores to"):
            self._executemany("INSERT INTO pending_scores VALUES (?, ?, ?, ?, ?) ON CONFLICT (path, sha256, bundle_sha256) "
                              "DO UPDATE SET payload = excluded.payload, created_at = excluded.created_at", values)

    def load_pending(self, bundle_sha256: str) -> dict[tuple[str, str], dict[str, Any]]:
        """(path, sha256) -> payload of every pending score for this bundle."""
        sql = "SELECT path, sha256, payload FROM pending_scores WHERE bundle_sha256 = ?"
        with self._db_errors("cannot read"):
            return {(r["path"], r["sha256"]): json.loads(r["payload"]) for r in self._execute(sql, (bundle_sha256,))}

    def clear_pending(self, keys: Iterable[tuple[str, str, str]]) -> None:
        """Forget pending scores by (path, sha256, bundle_sha256), once their decisions are appended."""
        with self._transaction("cannot clear pending scores in"):
            self._executemany("DELETE FROM pending_scores WHERE path = ? AND sha256 = ? AND bundle_sha256 = ?",
                              [tuple(k) for k in keys])

    # -- verification, anchoring and export -----------------------------------------------

    def chain_heads(self) -> dict[str, dict[str, Any]]:
        """{table: {"last_id", "hash", "count"}} as recorded in ``meta``: a cheap "has anything changed" check."""
        with self._db_errors("cannot read"):
            return {table: self._head(table) for table in CHAINS}

    def head(self) -> str:
        """One line naming the last record of each chain, to keep outside this store (see SECURITY.md).

        ``cxr-triage-audit-head decisions=ID:SHA256 reviews=ID:SHA256 at=UTC``; an empty chain is ``0:`` + 64 zeros.
        """
        with self._transaction("cannot read", write=False):
            parts = []
            for table in CHAINS:
                last = list(self._execute(f"SELECT id, record_hash FROM {table} ORDER BY id DESC LIMIT 1"))
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
        with self._transaction("cannot read", write=False):  # one consistent snapshot of both chains
            for table, columns in CHAINS.items():
                counts[table], bad = self._verify_chain(table, columns)
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

    def _verify_chain(self, table: str, columns: Sequence[str]) -> tuple[int, tuple[int, str, str] | None]:
        """(records in the table, (first bad id, why, its study) or None)."""
        prev_id, prev_hash, count, problem = 0, GENESIS_HASH, 0, None
        for row in self._stream(f"SELECT {', '.join(columns)} FROM {table} ORDER BY id"):
            count += 1
            if problem is None:
                link = _link_problem(prev_id, prev_hash, row)
                if link is not None:
                    problem = (*link, row["study_uid"] if link[0] == row["id"] else "")
                prev_id, prev_hash = row["id"], row["record_hash"]
        if problem is None:
            end = _head_problem(self._head(table), prev_id, prev_hash, count)
            if end is not None:
                found = list(self._execute(f"SELECT study_uid FROM {table} WHERE id = ?", (end[0],)))
                problem = (*end, found[0]["study_uid"] if found else "")
        return count, problem

    def _anchor_problem(self, anchor: dict[str, tuple[int, str]]) -> tuple[str, int, str, str] | None:
        """Why the chains do not pass through an anchored head, as (table, id, why, study); None when they do."""
        for table, (last_id, digest) in anchor.items():
            if last_id == 0:
                continue
            found = list(self._execute(f"SELECT record_hash, study_uid FROM {table} WHERE id = ?", (last_id,)))
            if not found:
                return table, last_id, "missing: an anchored head names this record, the table no longer has it", ""
            if found[0]["record_hash"] != digest:
                return (table, last_id, "its record_hash differs from the anchored head's: the chain was rewritten at "
                        "or before this record since the head was anchored", found[0]["study_uid"])
        return None

    def copy_to(self, target: "AuditStore", chunk: int = 5000) -> dict[str, int]:
        """Copy every record verbatim (ids, times, hashes) and the pending work into the empty store ``target``.

        For moving a site from SQLite to PostgreSQL: the copy verifies with the same heads,
        so anchors kept so far stay valid. Reads one snapshot of this store, so writers may
        keep running (what they add later is not copied). Refuses a source that does not
        verify and a target that holds records. Returns {table: records copied}; one target
        transaction, so all or nothing.
        """
        copied: dict[str, int] = {}
        with self._transaction("cannot read", write=False), target._transaction("cannot copy into"):
            for table, columns in CHAINS.items():
                count, problem = self._verify_chain(table, columns)
                if problem is not None:
                    raise AuditError(f"{self.location}: not copying a broken store: {table} record {problem[0]}: "
                                     f"{problem[1]}. Fix: investigate (and restore from backup) before moving it")
                target._lock_head(table)
                if target._head(table)["count"] or list(target._execute(f"SELECT id FROM {table} LIMIT 1")):
                    raise AuditError(f"{target.location}: the {table} table already holds records. Fix: copy into "
                                     "a new, empty store")
                copied[table] = self._copy_rows(target, table, columns, chunk)
                target._execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(self._head(table)),
                                                                            f"head:{table}"))
            pending = ", ".join(PENDING_COLUMNS)
            rows = [[r[c] for c in PENDING_COLUMNS] for r in self._execute(f"SELECT {pending} FROM pending_scores")]
            target._executemany(f"INSERT INTO pending_scores ({pending}) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                                rows)
        return copied

    def _copy_rows(self, target: "AuditStore", table: str, columns: Sequence[str], chunk: int) -> int:
        """Insert this store's ``table`` rows into ``target`` as they are, ``chunk`` rows per read; both in transactions."""
        names, marks, last_id, count = ", ".join(columns), ", ".join("?" * len(columns)), 0, 0
        while True:
            rows = list(self._execute(f"SELECT {names} FROM {table} WHERE id > ? ORDER BY id LIMIT {int(chunk)}",
                                      (last_id,)))
            if not rows:
                return count
            target._executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", [[r[c] for c in columns] for r in rows])
            last_id, count = rows[-1]["id"], count + len(rows)

    def export_csv(self, out_path: str | Path) -> int:
        """Write every decision (all columns, one header row) to ``out_path`` atomically; returns rows written.

        Floats are written as repr (exact); None as an empty cell; ``flagged`` as 0/1; text that a
        spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``...) gets a leading ``'``
        (``triage.present.csv_cell``). The store holds pseudonyms only, so the export holds no
        patient IDs or names.
        """
        out = Path(out_path)
        problem = output_file_problem(out)
        if problem:
            raise AuditError(f"{out}: cannot write the export here: {problem}. Fix: pass --out a file path in a "
                             "folder this account can write")
        try:
            handle = tempfile.NamedTemporaryFile("w", newline="", encoding="utf-8", dir=out.parent, delete=False,
                                                 prefix=f".{out.name}.", suffix=".tmp")
        except OSError as error:
            raise AuditError(f"{out}: cannot write the export ({error.strerror or error}). "
                             "Fix: choose a writable --out") from error
        try:
            with handle, self._transaction("cannot read", write=False):
                writer = csv.writer(handle)
                writer.writerow(DECISION_COLUMNS)
                count = 0
                for row in self._stream(f"SELECT {', '.join(DECISION_COLUMNS)} FROM decisions ORDER BY id"):
                    writer.writerow([_csv_cell(row[name]) for name in DECISION_COLUMNS])
                    count += 1
            os.replace(handle.name, out)
        except OSError as error:
            raise AuditError(f"{out}: cannot write the export ({error.strerror or error}). "
                             "Fix: choose a writable --out with free space") from error
        finally:
            if os.path.exists(handle.name):
                os.unlink(handle.name)
        return count


def output_file_problem(path: str | Path) -> str:
    """Why a file cannot be written at ``path`` as the CSV writers do (a temporary file beside it, renamed over it),
    "" when it can: it must be new or a regular file, in a folder where this account can create files. Creates
    missing folders; leaves nothing behind. Check it before long work, so a bad ``--out`` costs nothing."""
    path = Path(path)
    if path.is_dir():
        return "it is a folder"
    if path.exists() and not path.is_file():
        return "it is not a regular file (a device, FIFO or socket, or a link to one), which the rename would replace"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as error:
        return f"cannot create a file in {path.parent} ({error.strerror or error})"
    return ""


def _link_problem(prev_id: int, prev_hash: str, row: dict[str, Any]) -> tuple[int, str] | None:
    """Why ``row`` does not follow the record (prev_id, prev_hash), as (bad id, why); None when it does."""
    if row["id"] != prev_id + 1:
        missing = f"{prev_id + 1}" if row["id"] == prev_id + 2 else f"{prev_id + 1}..{row['id'] - 1}"
        return prev_id + 1, f"missing (deleted): record {row['id']} follows record {prev_id}; id(s) {missing} are gone"
    if row["prev_hash"] != prev_hash:
        return row["id"], ("its prev_hash does not match the previous record's hash "
                           "(the record before it was edited and rehashed, or this one was replaced or inserted)")
    if record_hash(row["prev_hash"], row) != row["record_hash"]:
        return row["id"], "its contents do not match its record_hash (the record was edited)"
    return None


def _head_problem(head: dict[str, Any], last_id: int, last_hash: str, count: int) -> tuple[int, str] | None:
    """Why an intact chain ending at (last_id, last_hash) with ``count`` records disagrees with the head."""
    recorded = f"the chain head records {head['count']} records ending at id {head['last_id']}"
    if (head["last_id"], head["hash"], head["count"]) == (last_id, last_hash, count):
        return None
    if last_id < head["last_id"] or count < head["count"]:
        return last_id + 1, f"missing (truncated): {recorded}, the table ends at id {last_id}"
    if last_id > head["last_id"] or count > head["count"]:
        return head["last_id"] + 1, f"inserted after the chain head: {recorded}, the table ends at id {last_id}"
    return last_id, "its record_hash differs from the chain head's (the last record was edited and rehashed)"


def _one(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The first row of a query that always returns one."""
    return next(iter(rows))


def _dict_row(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> dict[str, Any]:
    """sqlite3 row factory: rows as plain dicts, as psycopg's dict_row gives them."""
    return {column[0]: value for column, value in zip(cursor.description, values)}


def _csv_cell(value: Any) -> Any:
    """An export cell: None empty, a float exact (repr), text from a file neutralized for spreadsheets (csv_cell)."""
    return "" if value is None else repr(value) if isinstance(value, float) else csv_cell(value)


def _decision_dict(row: dict[str, Any]) -> dict[str, Any]:
    values = dict(row)
    values["flagged"] = bool(values["flagged"])
    return values
