"""The audit store on PostgreSQL: the same tables, hash chains and verification as SQLite.

For sites where many machines write decisions (Dask workers, several workstations, the
dashboard's reviews). ``triage.audit.open_store("postgresql://user@host/db")`` opens it.
Only the SQL differences live here; the chaining, reading and verification are
``AuditStore``'s. Concurrent appenders are serialized per chain by ``SELECT ... FOR
UPDATE`` on the chain's head row in ``meta``, inside the appending transaction, so the
chain never forks and ids stay gapless. Triggers refuse UPDATE, DELETE and TRUNCATE on
the chained tables. Needs ``psycopg`` (the ``scale`` extra).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .audit import CHAINS, SCHEMA_VERSION, AuditStore, redact, table_sql
from .errors import AuditError

try:
    import psycopg
    from psycopg.rows import dict_row
except ImportError:  # the scale extra is not installed
    psycopg = None

_PG_SQL_TYPE = {"text": "TEXT NOT NULL DEFAULT ''", "real": "DOUBLE PRECISION", "bool": "INTEGER NOT NULL DEFAULT 0",
                "int": "BIGINT"}
_SCHEMA_LOCK = 7_377_617_460_297_412  # pg_advisory_xact_lock key: one schema creator at a time
CONNECT_TIMEOUT_S = 10
STREAM_ROWS = 2000
_APPEND_ONLY_FUNCTION = (
    "CREATE OR REPLACE FUNCTION cxr_triage_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP; END $$"
)


def _append_only_triggers(table: str) -> list[str]:
    """Row triggers refusing UPDATE and DELETE, a statement trigger refusing TRUNCATE (PostgreSQL 14+)."""
    return [
        f"CREATE OR REPLACE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} FOR EACH "
        f"{'STATEMENT' if verb == 'TRUNCATE' else 'ROW'} EXECUTE FUNCTION cxr_triage_append_only()"
        for verb in ("UPDATE", "DELETE", "TRUNCATE")
    ]


SCHEMA_STATEMENTS = [
    f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})",  # concurrent first openers would race on CREATE TABLE
    *table_sql(_PG_SQL_TYPE, "id BIGINT PRIMARY KEY"),
    _APPEND_ONLY_FUNCTION,
    *(trigger for table in CHAINS for trigger in _append_only_triggers(table)),
]


class PostgresAuditStore(AuditStore):
    """The audit store in the PostgreSQL database at ``url``; a context manager.

    ``create=False`` refuses a database without the audit tables. Tables, triggers and the
    chain heads are created on first use only, so later a role that holds just the rights
    SECURITY.md lists (and does not own the tables, so cannot drop the triggers) can use
    the store. Raises ``AuditError`` naming
    the URL (password hidden) and the fix.
    """

    backend = "postgresql"

    def __init__(self, url: str, create: bool = True) -> None:  # noqa: D107 (the class says it)
        self.path = None  # type: ignore[assignment]  # no file
        self.url, self.location = url, redact(url)
        if psycopg is None:
            raise AuditError(f"{self.location}: PostgreSQL audit stores need psycopg. "
                             "Fix: pip install -e '.[scale]' (or pip install 'psycopg[binary]')")
        self._database_errors = (psycopg.Error,)
        self._depth = 0  # nesting of _transaction
        self._cursor_ids = itertools.count()
        self._db = self._connect()
        try:
            if create and not self._has_store():
                self._create_schema()  # DDL only on first use: a role without CREATE rights can use a made store
            else:
                self._check_schema()
        except AuditError:
            self._db.close()
            raise

    def _connect(self) -> "psycopg.Connection":
        try:
            return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as error:
            raise self._error("cannot connect to", error) from error

    def _has_store(self) -> bool:
        """True when the audit tables exist (complete: ``meta`` is created and filled in the same transaction)."""
        with self._db_errors("cannot read"):
            return bool(list(self._execute("SELECT to_regclass('meta') IS NOT NULL AS present"))[0]["present"])

    def _check_schema(self) -> None:
        """Refuse a database that has no audit store, or one of another schema version."""
        with self._db_errors("cannot read"):
            present = self._has_store()
            found = list(self._execute("SELECT value FROM meta WHERE key = 'schema_version'")) if present else []
        if not found:
            raise AuditError(f"{self.location}: no audit store in this database. Fix: pass --audit-db the URL the "
                             "scorer wrote to, or score once to create it")
        if int(found[0]["value"]) != SCHEMA_VERSION:
            raise AuditError(f"{self.location}: audit schema version {found[0]['value']}, this software reads "
                             f"{SCHEMA_VERSION}. Fix: use the cxr-triage version that wrote it")

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        return self._db.execute(sql.replace("?", "%s"), tuple(params) or None)

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self._db.cursor() as cursor:
                cursor.executemany(sql.replace("?", "%s"), [tuple(r) for r in rows])

    @contextmanager
    def _db_errors(self, doing: str) -> Iterator[None]:
        """As AuditStore's, first reconnecting if the server dropped the connection (a restart, a failover).

        Never inside a transaction: its statements must all run on the connection that began it.
        """
        if self._depth == 0 and (self._db.closed or self._db.info.status != psycopg.pq.ConnStatus.OK):
            self._db.close()
            self._db = self._connect()
        with super()._db_errors(doing):
            yield

    @contextmanager
    def _transaction(self, doing: str, write: bool = True) -> Iterator[None]:
        with super()._transaction(doing, write):
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1

    def _stream(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        """A server-side cursor, fetched STREAM_ROWS at a time (a client cursor would load the whole table)."""
        cursor = self._db.cursor(name=f"cxr_scan_{next(self._cursor_ids)}")
        cursor.itersize = STREAM_ROWS
        cursor.execute(sql.replace("?", "%s"), tuple(params) or None)
        return cursor

    def _begin(self, write: bool) -> None:
        self._db.execute("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _in_transaction(self) -> bool:
        return self._db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def _lock_head(self, table: str) -> None:
        """Row-lock the chain's head until COMMIT: other appenders wait here, then read the new head."""
        self._execute("SELECT value FROM meta WHERE key = ? FOR UPDATE", (f"head:{table}",))

    def _schema_statements(self) -> list[str]:
        return SCHEMA_STATEMENTS

    def _error_fix(self, error: BaseException) -> str | None:
        if isinstance(error, psycopg.errors.InsufficientPrivilege):
            return "grant this database role SELECT and INSERT on the audit tables (see SECURITY.md)"
        if isinstance(error, psycopg.OperationalError) and not isinstance(error, psycopg.errors.QueryCanceled):
            return ("check that the PostgreSQL server is running and reachable, and the URL's host, port, database, "
                    "user and password (PGPASSWORD or ~/.pgpass)")
        return None
