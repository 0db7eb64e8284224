"""``cxr-triage audit verify | head | copy | export``: check, anchor, move and read out the audit store.

``--audit-db`` takes a SQLite file or a ``postgresql://`` URL (``triage.audit.open_store``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from triage.audit import ANCHOR_PREFIX, AUDIT_DB_ENV, DEFAULT_AUDIT_DB, default_audit_db, open_store
from triage.audit.transfer import copy_store, export_csv
from triage.errors import AuditError


def read_anchors(args: argparse.Namespace) -> list[str]:
    """The anchored heads from ``--anchor`` texts and from every matching line of ``--anchors`` files."""
    anchors = list(args.anchor or [])
    for name in args.anchors or []:
        try:
            lines = Path(name).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as error:
            raise AuditError(f"{name}: cannot read the anchors file ({error.strerror or error}). "
                             "Fix: pass the log where audit head lines were kept") from error
        found = [line[line.index(ANCHOR_PREFIX):] for line in lines if ANCHOR_PREFIX in line]
        if not found:
            raise AuditError(f"{name}: no '{ANCHOR_PREFIX}' line in it. Fix: pass the log where audit head lines "
                             "were kept")
        anchors += found
    return anchors


def verify_command(args: argparse.Namespace) -> int:
    """Walk both hash chains and the anchors; 0 when intact, 1 when broken or unreadable (the first bad record named)."""
    try:
        anchors = read_anchors(args)
        with open_store(args.audit_db, create=False) as store:
            result = store.verify(anchors)
    except (AuditError, ValueError) as error:
        print(f"cxr-triage audit verify: error: {error}", file=sys.stderr)
        return 1
    print(result.message)
    return 0 if result.ok else 1


def head_command(args: argparse.Namespace) -> int:
    """Verify, then print the chains' head line to keep outside the store; 1 (and no head) when broken."""
    try:
        with open_store(args.audit_db, create=False) as store:
            result = store.verify()
            head = store.head() if result.ok else ""
    except AuditError as error:
        print(f"cxr-triage audit head: error: {error}", file=sys.stderr)
        return 1
    if not result.ok:
        print(f"cxr-triage audit head: error: not anchoring a broken chain. {result.message}", file=sys.stderr)
        return 1
    print(head)
    return 0


def export_command(args: argparse.Namespace) -> int:
    """Write every decision to a CSV (pseudonymized IDs only); 0 on success, 1 on failure."""
    try:
        with open_store(args.audit_db, create=False) as store:
            count = export_csv(store, args.out)
    except AuditError as error:
        print(f"cxr-triage audit export: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {count} decisions to {args.out}")
    return 0


def copy_command(args: argparse.Namespace) -> int:
    """Copy a store verbatim into a new one (e.g. SQLite to PostgreSQL), then verify the copy; 0 when it verifies."""
    try:
        with open_store(args.audit_db, create=False) as source, open_store(args.to) as target:
            copied = copy_store(source, target)
            result = target.verify()
    except AuditError as error:
        print(f"cxr-triage audit copy: error: {error}", file=sys.stderr)
        return 1
    print(f"copied {copied['decisions']} decisions and {copied['reviews']} reviews; the copy: {result.message}")
    return 0 if result.ok else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``audit verify``, ``head``, ``copy`` and ``export`` on the main CLI."""
    parser = subparsers.add_parser("audit", help="verify, anchor, copy or export the audit store",
                                   description="Check the audit store's hash chains, print their head to keep "
                                               "elsewhere, or export its decisions as CSV.")
    commands = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    db_help = f"audit store: a SQLite file or a postgresql:// URL (default: ${AUDIT_DB_ENV} or ./{DEFAULT_AUDIT_DB})"

    verify = commands.add_parser("verify", help="check that no decision or review was edited, deleted or inserted",
                                 description="Recompute both hash chains (decisions and reviews), then check that "
                                             "they still pass through every anchored head. Exit 0 when intact; exit 1 "
                                             "and name the first bad record (table, id, study, what is wrong) otherwise.")
    verify.add_argument("--audit-db", default=str(default_audit_db()), help=db_help)
    verify.add_argument("--anchor", action="append", metavar="HEAD", help="a line printed earlier by 'audit head' "
                        "(repeatable)")
    verify.add_argument("--anchors", action="append", metavar="FILE", help="a log holding 'audit head' lines; every "
                        "such line is checked (repeatable)")
    verify.set_defaults(func=verify_command)

    head = commands.add_parser("head", help="print the chains' head, to keep outside the store (log, ticket, email)",
                               description="Verify, then print one line naming the last decision and review and "
                                           "their hashes. Keep it where the store's administrators cannot rewrite it; "
                                           "later, audit verify --anchor LINE proves the store was not rewritten.")
    head.add_argument("--audit-db", default=str(default_audit_db()), help=db_help)
    head.set_defaults(func=head_command)

    copy = commands.add_parser("copy", help="copy the store into a new one, e.g. SQLite to PostgreSQL",
                               description="Copy every decision and review verbatim (same ids and hashes, so anchored "
                                           "heads stay valid) into a new, empty store, then verify the copy. Refuses "
                                           "a source that does not verify.")
    copy.add_argument("--audit-db", default=str(default_audit_db()), help=db_help)
    copy.add_argument("--to", required=True, metavar="TARGET", help="the new store: a SQLite file or a postgresql:// URL")
    copy.set_defaults(func=copy_command)

    export = commands.add_parser("export", help="write every decision to a CSV (pseudonymized patient IDs only)",
                                 description="Write every decision, all columns, one header row, to --out.")
    export.add_argument("--audit-db", default=str(default_audit_db()), help=db_help)
    export.add_argument("--out", required=True, help="CSV file to write")
    export.set_defaults(func=export_command)
