"""The audit store: every triage decision and every clinician review, append-only, hash-chained.

One idea per module:

- ``records``: ``Decision``, ``VerifyResult`` and the columns of each chained table;
- ``chain``: hashing, anchors and why a chain does not hold (pure, no database);
- ``schema``: tables, indexes, append-only triggers and the schema version, per SQL dialect;
- ``backend``: what the store needs from a database; ``sqlite`` and ``postgres`` provide it;
- ``store``: ``open_store`` (the only constructor) and ``AuditStore``: append, read, the current-decision rule, verify;
- ``pending``: the batch scorer's resume table (not chained);
- ``transfer``: copy a store verbatim (SQLite to PostgreSQL), export decisions as CSV;
- ``paths``: where a store is (path or URL, passwords hidden) and file paths as text.

The names below are the package's public interface.
"""

from .chain import ANCHOR_PREFIX, GENESIS_HASH, parse_anchor, record_hash
from .paths import (AUDIT_DB_ENV, DEFAULT_AUDIT_DB, default_audit_db, is_url, os_path, output_file_problem,
                    path_text, redact)
from .records import CHAINS, DECISION_COLUMNS, REVIEW_COLUMNS, VERDICTS, Decision, VerifyResult, decision_from_row
from .schema import SCHEMA_VERSION
from .store import AuditStore, open_store

__all__ = [
    "ANCHOR_PREFIX", "AUDIT_DB_ENV", "CHAINS", "DECISION_COLUMNS", "DEFAULT_AUDIT_DB", "GENESIS_HASH", "REVIEW_COLUMNS",
    "SCHEMA_VERSION", "VERDICTS", "AuditStore", "Decision", "VerifyResult", "decision_from_row", "default_audit_db",
    "is_url", "open_store", "os_path", "output_file_problem", "parse_anchor", "path_text", "record_hash", "redact",
]
