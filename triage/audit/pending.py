"""The batch scorer's resume table ``pending_scores``: finished inferences of a run kept until their decisions
are appended, so a killed run does not score them again. Not chained; rows are replaced and deleted.

It lives beside the store, not in ``deploy/``, because it is part of the store's database: the schema creates it
(stores of 0.1.0 already hold it), and ``transfer.copy_store`` moves it with the chains from SQLite to PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from .store import AuditStore

PENDING_COLUMNS = ("path", "sha256", "bundle_sha256", "payload", "created_at")


def save_pending(store: AuditStore, rows: Iterable[tuple[str, str, str, dict[str, Any]]]) -> None:
    """Keep finished inferences: rows of (path, sha256, bundle_sha256, JSON-able payload); replaces by key."""
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    values = [(p, s, b, json.dumps(payload, sort_keys=True), now) for p, s, b, payload in rows]
    with store.transaction("cannot save pending scores to"):
        store.backend.executemany("INSERT INTO pending_scores VALUES (?, ?, ?, ?, ?) ON CONFLICT (path, sha256, "
                                  "bundle_sha256) DO UPDATE SET payload = excluded.payload, "
                                  "created_at = excluded.created_at", values)


def load_pending(store: AuditStore, bundle_sha256: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(path, sha256) -> payload of every pending score for this bundle."""
    sql = "SELECT path, sha256, payload FROM pending_scores WHERE bundle_sha256 = ?"
    with store.database_errors("cannot read"):
        rows = store.backend.execute(sql, (bundle_sha256,))
        return {(r["path"], r["sha256"]): json.loads(r["payload"]) for r in rows}


def clear_pending(store: AuditStore, keys: Iterable[tuple[str, str, str]]) -> None:
    """Forget pending scores by (path, sha256, bundle_sha256), once their decisions are appended."""
    with store.transaction("cannot clear pending scores in"):
        store.backend.executemany("DELETE FROM pending_scores WHERE path = ? AND sha256 = ? AND bundle_sha256 = ?",
                                  [tuple(k) for k in keys])


def copy_pending(source: AuditStore, target: AuditStore) -> None:
    """Add ``source``'s pending rows to ``target`` (inside the callers' transactions); keys already there stay."""
    names = ", ".join(PENDING_COLUMNS)
    rows = [[r[c] for c in PENDING_COLUMNS] for r in source.backend.execute(f"SELECT {names} FROM pending_scores")]
    target.backend.executemany(f"INSERT INTO pending_scores ({names}) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                               rows)
