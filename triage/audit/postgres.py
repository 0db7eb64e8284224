"""The audit store's PostgreSQL backend, for sites where many machines write decisions (Dask workers, several
workstations, the dashboard's reviews). Needs ``psycopg`` (the ``scale`` extra).

Concurrent appenders are serialized per chain by ``SELECT ... FOR UPDATE`` on the chain's head row in ``meta``,
inside the appending transaction, so the chain never forks and ids stay gapless. Triggers refuse UPDATE, DELETE
and TRUNCATE on the chained tables. Tables, triggers and chain heads are created on first use only, so later a
role that holds just the rights SECURITY.md lists (and does not own the tables, so cannot drop the triggers) can
use the store.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import AuditError
from .backend import audit_error
from .paths import redact
from .schema import POSTGRES_SCHEMA

try:
    import psycopg
    from psycopg.rows import dict_row
except ImportError:  # the scale extra is not installed
    psycopg = None

CONNECT_TIMEOUT_S = 10
STREAM_ROWS = 2000


class PostgresBackend:
    """The PostgreSQL database at ``url``; messages name it without its password."""

    def __init__(self, url: str) -> None:
        self.url, self.location = url, redact(url)
        if psycopg is None:
            raise AuditError(f"{self.location}: PostgreSQL audit stores need psycopg. "
                             "Fix: pip install -e '.[scale]' (or pip install 'psycopg[binary]')")
        self.errors: tuple[type[BaseException], ...] = (psycopg.Error,)
        self._cursor_ids = itertools.count()
        self._db = self._connect()

    def _connect(self) -> "psycopg.Connection":
        try:
            return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as error:
            raise audit_error(self.location, "cannot connect to", error, self.error_fix(error)) from error

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        return self._db.execute(sql.replace("?", "%s"), tuple(params) or None)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self._db.cursor() as cursor:
                cursor.executemany(sql.replace("?", "%s"), [tuple(r) for r in rows])

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        """A server-side cursor, fetched STREAM_ROWS at a time (a client cursor would load the whole table)."""
        cursor = self._db.cursor(name=f"cxr_scan_{next(self._cursor_ids)}")
        cursor.itersize = STREAM_ROWS
        cursor.execute(sql.replace("?", "%s"), tuple(params) or None)
        return cursor

    def begin(self, write: bool) -> None:
        self._db.execute("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def in_transaction(self) -> bool:
        return self._db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def lock_head(self, table: str) -> None:
        """Row-lock the chain's head until COMMIT: other appenders wait here, then read the new head."""
        self.execute("SELECT value FROM meta WHERE key = ? FOR UPDATE", (f"head:{table}",))

    def needs_schema(self, create: bool) -> bool:
        """Only on first use: a role without CREATE rights can use a store made by another."""
        return create and not self.has_store()

    def schema(self) -> list[str]:
        return POSTGRES_SCHEMA

    def has_store(self) -> bool:
        """True when the audit tables exist (complete: ``meta`` is created and filled in the same transaction)."""
        return bool(list(self.execute("SELECT to_regclass('meta') IS NOT NULL AS present"))[0]["present"])

    def reconnect_if_dropped(self) -> None:
        """After a server restart or a failover; never inside a transaction, whose statements need its connection."""
        if self._db.closed or self._db.info.status != psycopg.pq.ConnStatus.OK:
            self._db.close()
            self._db = self._connect()

    def error_fix(self, error: BaseException) -> str | None:
        if isinstance(error, psycopg.errors.InsufficientPrivilege):
            return "grant this database role SELECT and INSERT on the audit tables (see SECURITY.md)"
        if isinstance(error, psycopg.OperationalError) and not isinstance(error, psycopg.errors.QueryCanceled):
            return ("check that the PostgreSQL server is running and reachable, and the URL's host, port, database, "
                    "user and password (PGPASSWORD or ~/.pgpass)")
        return None

    def close(self) -> None:
        self._db.close()
