"""The audit store's SQLite backend: one file, WAL mode, one writer at a time (BEGIN IMMEDIATE)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import AuditError
from .backend import audit_error
from .paths import AUDIT_DB_ENV, DEFAULT_AUDIT_DB
from .schema import SQLITE_SCHEMA

BUSY_TIMEOUT_MS = 30_000


class SqliteBackend:
    """The SQLite file at ``path``; ``create=False`` refuses to create a new file (for read-only tools)."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        if not create and not self.path.is_file():
            raise AuditError(f"{self.path}: no audit store here. Fix: pass --audit-db the store the scorer wrote "
                             f"(default ${AUDIT_DB_ENV} or ./{DEFAULT_AUDIT_DB})")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise audit_error(self.location, "cannot open", error, self.error_fix(error)) from error
        self._db.row_factory = _dict_row
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as error:
            self._db.close()
            raise audit_error(self.location, "cannot set up", error, self.error_fix(error)) from error

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        return self._db.execute(sql, tuple(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(sql, [tuple(r) for r in rows])

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        return self.execute(sql, params)  # sqlite3 cursors already fetch as they are iterated

    def begin(self, write: bool) -> None:
        """BEGIN IMMEDIATE takes SQLite's single write lock, so concurrent appenders chain in turn."""
        self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")

    def in_transaction(self) -> bool:
        return self._db.in_transaction

    def lock_head(self, table: str) -> None:
        """Nothing: BEGIN IMMEDIATE already serialized the appenders."""

    def needs_schema(self, create: bool) -> bool:
        """Always: the statements are idempotent, so an older store gains what it lacks and dropped triggers return."""
        return True

    def schema(self) -> list[str]:
        return SQLITE_SCHEMA

    def has_store(self) -> bool:
        return bool(list(self.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'")))

    def reconnect_if_dropped(self) -> None:
        """Nothing: a file does not drop its connection."""

    def error_fix(self, error: BaseException) -> str | None:
        text = str(error)
        if isinstance(error, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
            return "restore the audit store from backup, or move this file aside to start a new one"
        if "readonly" in text or "unable to open" in text or isinstance(error, OSError):
            return f"make the file and its folder writable, or pass --audit-db (or ${AUDIT_DB_ENV}) a writable path"
        return None

    def close(self) -> None:
        self._db.close()


def _dict_row(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> dict[str, Any]:
    """sqlite3 row factory: rows as plain dicts, as psycopg's dict_row gives them."""
    return {column[0]: value for column, value in zip(cursor.description, values)}
