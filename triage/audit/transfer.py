"""Moving records out of an audit store: a verbatim copy into another store, and a CSV export of the decisions."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import AuditError
from ..present import csv_cell
from .paths import output_file_problem
from .pending import copy_pending
from .records import CHAINS, DECISION_COLUMNS
from .store import AuditStore


def copy_store(source: AuditStore, target: AuditStore, chunk: int = 5000) -> dict[str, int]:
    """Copy every record verbatim (ids, times, hashes) and the pending work of ``source`` into the empty ``target``.

    For moving a site from SQLite to PostgreSQL: the copy verifies with the same heads,
    so anchors kept so far stay valid. Reads one snapshot of ``source``, so writers may
    keep running (what they add later is not copied). Refuses a source that does not
    verify and a target that holds records. Returns {table: records copied}; one target
    transaction, so all or nothing.
    """
    copied: dict[str, int] = {}
    with source.transaction("cannot read", write=False), target.transaction("cannot copy into"):
        for table in CHAINS:
            _, problem = source.check_chain(table)
            if problem is not None:
                raise AuditError(f"{source.location}: not copying a broken store: {table} record {problem[0]}: "
                                 f"{problem[1]}. Fix: investigate (and restore from backup) before moving it")
            target.backend.lock_head(table)
            if target.chain_head(table)["count"] or list(target.backend.execute(f"SELECT id FROM {table} LIMIT 1")):
                raise AuditError(f"{target.location}: the {table} table already holds records. Fix: copy into "
                                 "a new, empty store")
            copied[table] = _copy_rows(source, target, table, CHAINS[table], chunk)
            target.backend.execute("UPDATE meta SET value = ? WHERE key = ?",
                                   (json.dumps(source.chain_head(table)), f"head:{table}"))
        copy_pending(source, target)
    return copied


def _copy_rows(source: AuditStore, target: AuditStore, table: str, columns: Sequence[str], chunk: int) -> int:
    """Insert ``source``'s ``table`` rows into ``target`` as they are, ``chunk`` rows per read; both in transactions."""
    names, marks, last_id, count = ", ".join(columns), ", ".join("?" * len(columns)), 0, 0
    while True:
        rows = list(source.backend.execute(f"SELECT {names} FROM {table} WHERE id > ? ORDER BY id LIMIT {int(chunk)}",
                                           (last_id,)))
        if not rows:
            return count
        target.backend.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})",
                                   [[r[c] for c in columns] for r in rows])
        last_id, count = rows[-1]["id"], count + len(rows)


def export_csv(store: AuditStore, out_path: str | Path) -> int:
    """Write every decision of ``store`` (all columns, one header row) to ``out_path`` atomically; returns rows.

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
        with handle, store.transaction("cannot read", write=False):
            writer = csv.writer(handle)
            writer.writerow(DECISION_COLUMNS)
            count = 0
            for row in store.backend.stream(f"SELECT {', '.join(DECISION_COLUMNS)} FROM decisions ORDER BY id"):
                writer.writerow([_export_cell(row[name]) for name in DECISION_COLUMNS])
                count += 1
        os.replace(handle.name, out)
    except OSError as error:
        raise AuditError(f"{out}: cannot write the export ({error.strerror or error}). "
                         "Fix: choose a writable --out with free space") from error
    finally:
        if os.path.exists(handle.name):
            os.unlink(handle.name)
    return count


def _export_cell(value: Any) -> Any:
    """An export cell: None empty, a float exact (repr), text from a file neutralized for spreadsheets (csv_cell)."""
    return "" if value is None else repr(value) if isinstance(value, float) else csv_cell(value)
