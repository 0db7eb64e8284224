"""What the audit store needs from a database (``Backend``), and the errors it raises naming the fix.

Statements use ``?`` placeholders and return rows as dicts; ``triage.audit.sqlite`` and
``triage.audit.postgres`` implement it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ..errors import AuditError


class Backend(Protocol):
    """One open connection to an audit store's database."""

    location: str                                  # how messages name the store (a URL without its password)
    errors: tuple[type[BaseException], ...]        # the driver's exceptions

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        """Run one statement; its rows as dicts."""

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement per row."""

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        """Rows of a whole-table scan without holding them all in memory; inside a transaction."""

    def begin(self, write: bool) -> None:
        """Start a write transaction (appenders chain in turn) or a read-only snapshot."""

    def in_transaction(self) -> bool:
        """True between ``begin`` and COMMIT or ROLLBACK."""

    def lock_head(self, table: str) -> None:
        """Serialize appends to ``table``'s chain until the transaction ends."""

    def needs_schema(self, create: bool) -> bool:
        """True when the store should run its (idempotent) schema statements now; else it only checks the version."""

    def schema(self) -> list[str]:
        """The CREATE statements of the store, one each, in this dialect."""

    def has_store(self) -> bool:
        """True when the database holds the audit tables."""

    def reconnect_if_dropped(self) -> None:
        """Reconnect when the server dropped the connection; called only outside transactions."""

    def error_fix(self, error: BaseException) -> str | None:
        """A backend-specific fix for ``error``, or None for the generic ones."""

    def close(self) -> None:
        """Close the connection."""


def audit_error(location: str, doing: str, error: BaseException, fix: str | None = None) -> AuditError:
    """An AuditError for ``error`` that names the store and how to fix it (``fix``, else one read from the text)."""
    text = str(error).strip()
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
    return AuditError(f"{location}: {doing} the audit store ({text}). Fix: {fix}")
