"""The audit store's tables, indexes and append-only triggers, in SQLite's and PostgreSQL's dialects.

Four tables: ``decisions`` and ``reviews`` (hash-chained, append-only), ``meta`` (schema version and each chain's
head) and ``pending_scores`` (the batch scorer's resume table, ``triage.audit.pending``). Every statement is
idempotent (``IF NOT EXISTS``), so opening a store of an older release adds what it lacks.
"""

from __future__ import annotations

from .records import CHAIN_KINDS, CHAINS

SCHEMA_VERSION = 1
_SQLITE_TYPE = {"text": "TEXT NOT NULL DEFAULT ''", "real": "REAL", "bool": "INTEGER NOT NULL DEFAULT 0",
                "int": "INTEGER"}
_PG_TYPE = {"text": "TEXT NOT NULL DEFAULT ''", "real": "DOUBLE PRECISION", "bool": "INTEGER NOT NULL DEFAULT 0",
            "int": "BIGINT"}
_PG_SCHEMA_LOCK = 7_377_617_460_297_412  # pg_advisory_xact_lock key: one schema creator at a time
_PG_APPEND_ONLY_FUNCTION = (
    "CREATE OR REPLACE FUNCTION cxr_triage_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP; END $$"
)


def table_sql(sql_type: dict[str, str], id_sql: str) -> list[str]:
    """CREATE TABLE/INDEX statements of the four tables, given a dialect's column types and id column."""
    def column(name: str, kind: str) -> str:
        if name == "id":
            return id_sql
        if name in ("supersedes", "decision_id"):
            not_null = " NOT NULL" if name == "decision_id" else ""
            return f"{name} {sql_type['int']}{not_null} REFERENCES decisions(id)"
        return f"{name} {sql_type[kind]}"

    def create(table: str) -> str:
        return f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(column(n, k) for n, k in CHAIN_KINDS[table].items())})"

    return [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        create("decisions"),
        "CREATE INDEX IF NOT EXISTS decisions_by_key ON decisions (bundle_sha256, path, sha256)",
        "CREATE INDEX IF NOT EXISTS decisions_by_study ON decisions (study_uid)",
        create("reviews"),
        "CREATE INDEX IF NOT EXISTS reviews_by_study ON reviews (study_uid)",
        "CREATE TABLE IF NOT EXISTS pending_scores (path TEXT NOT NULL, sha256 TEXT NOT NULL, "
        "bundle_sha256 TEXT NOT NULL, payload TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (path, sha256, bundle_sha256))",
    ]


def _sqlite_append_only(table: str) -> list[str]:
    return [
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END"
        for verb in ("UPDATE", "DELETE")
    ]


def _pg_append_only(table: str) -> list[str]:
    """Row triggers refusing UPDATE and DELETE, a statement trigger refusing TRUNCATE (PostgreSQL 14+)."""
    return [
        f"CREATE OR REPLACE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} FOR EACH "
        f"{'STATEMENT' if verb == 'TRUNCATE' else 'ROW'} EXECUTE FUNCTION cxr_triage_append_only()"
        for verb in ("UPDATE", "DELETE", "TRUNCATE")
    ]


# One statement each: sqlite3's executescript would COMMIT the transaction that guards schema creation.
SQLITE_SCHEMA = [
    *table_sql(_SQLITE_TYPE, "id INTEGER PRIMARY KEY AUTOINCREMENT"),
    *(trigger for table in CHAINS for trigger in _sqlite_append_only(table)),
]
POSTGRES_SCHEMA = [
    f"SELECT pg_advisory_xact_lock({_PG_SCHEMA_LOCK})",  # concurrent first openers would race on CREATE TABLE
    *table_sql(_PG_TYPE, "id BIGINT PRIMARY KEY"),
    _PG_APPEND_ONLY_FUNCTION,
    *(trigger for table in CHAINS for trigger in _pg_append_only(table)),
]
