"""``cxr-triage workstation status``: what is waiting, what was decided, how often we flag, on what provider."""

from __future__ import annotations

import json
from pathlib import Path

from triage.audit import AuditStore, is_url
from triage.bundle import sha256_file

from .config import Config
from .inbox import stored_instances

LAST_DECISIONS = 10


def status_lines(config: Config) -> list[str]:
    """The status report as lines of text; reads the inbox, the state file and the audit store, writes nothing."""
    try:
        state = json.loads(config.state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    bundle_sha = state.get("bundle_sha256", "")
    incoming = [p for p in config.incoming_dir.glob("*") if p.is_file()] if config.incoming_dir.is_dir() else []
    outbox = list(config.outbox_dir.glob("*/*.dcm")) if config.outbox_dir.is_dir() else []
    if not is_url(config.audit_db) and not Path(config.audit_db).exists():
        return [f"audit store {config.audit_db} does not exist yet: the workstation has not run with this config",
                f"queue: {len(incoming)} dropped file(s) waiting"]
    with AuditStore(config.audit_db, create=False) as store:
        decided = store.decided_keys(bundle_sha) if bundle_sha else {}
        waiting = [p for _, p in stored_instances(config.studies_dir) if (str(p), sha256_file(p)) not in decided]
        rows = store.decisions(bundle_sha256=bundle_sha) if bundle_sha else []
    latest_by_study: dict[str, dict] = {}
    for row in rows:
        latest_by_study[row["study_uid"]] = row
    scored = [r for r in latest_by_study.values() if r["status"] == "scored"]
    flagged = sum(r["flagged"] for r in scored)
    rate = f"{flagged / len(scored):.1%} ({flagged} of {len(scored)} scored studies)" if scored else "n/a (no scored study)"
    lines = [
        f"queue: {len(waiting)} instance(s) received and not yet decided, {len(incoming)} dropped file(s) not yet "
        f"claimed, {len(outbox)} report(s) in the outbox",
        f"realized flag rate: {rate}; target {config.flag_rate:.1%}",
        f"provider: {state.get('provider', 'unknown (the service has not started)')}",
        f"bundle: {state.get('bundle', 'unknown')}; listening: {state.get('ae_title', '?')} port {state.get('port', '?')}",
        f"last {min(LAST_DECISIONS, len(rows))} decisions:",
    ]
    for row in rows[-LAST_DECISIONS:][::-1]:
        risk = "" if row["study_risk"] is None else f"{row['study_risk']:.4f}"
        lines.append(f"  #{row['id']} {row['created_at'][:19]} study {row['study_uid']} {row['status']} risk {risk or '-'} "
                     f"{'FLAGGED ' if row['flagged'] else ''}{row['policy']} {row['reason']}".rstrip())
    return lines
