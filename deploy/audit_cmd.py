"""``cxr-triage audit verify`` and ``cxr-triage audit export``: check and read out the audit store."""

from __future__ import annotations

import argparse
import sys

from triage.audit import AUDIT_DB_ENV, DEFAULT_AUDIT_DB, AuditStore, default_audit_db
from triage.errors import AuditError


def verify_command(args: argparse.Namespace) -> int:
    """Walk both hash chains; 0 when intact, 1 when broken or unreadable (the first bad record is named)."""
    try:
        with AuditStore(args.audit_db, create=False) as store:
            result = store.verify()
    except AuditError as error:
        print(f"cxr-triage audit verify: error: {error}", file=sys.stderr)
        return 1
    print(result.message)
    return 0 if result.ok else 1


def export_command(args: argparse.Namespace) -> int:
    """Write every decision to a CSV (pseudonymized IDs only); 0 on success, 1 on failure."""
    try:
        with AuditStore(args.audit_db, create=False) as store:
            count = store.export_csv(args.out)
    except AuditError as error:
        print(f"cxr-triage audit export: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {count} decisions to {args.out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``audit verify`` and ``audit export`` on the main CLI."""
    parser = subparsers.add_parser("audit", help="verify or export the audit store",
                                   description="Check the audit store's hash chains, or export its decisions as CSV.")
    commands = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    db_help = f"SQLite audit store (default: ${AUDIT_DB_ENV} or ./{DEFAULT_AUDIT_DB})"

    verify = commands.add_parser("verify", help="check that no decision or review was edited, deleted or inserted",
                                 description="Recompute both hash chains. Exit 0 when intact; exit 1 and name the "
                                             "first bad record otherwise.")
    verify.add_argument("--audit-db", default=str(default_audit_db()), help=db_help)
    verify.set_defaults(func=verify_command)

    export = commands.add_parser("export", help="write every decision to a CSV (pseudonymized patient IDs only)",
                                 description="Write every decision, all columns, one header row, to --out.")
    export.add_argument("--audit-db", default=str(default_audit_db()), help=db_help)
    export.add_argument("--out", required=True, help="CSV file to write")
    export.set_defaults(func=export_command)
