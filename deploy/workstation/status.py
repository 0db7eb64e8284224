"""``cxr-triage workstation status``: what is waiting, what was decided, how often we flag, on what provider."""

from __future__ import annotations

import json
from pathlib import Path

from triage.audit import is_url, open_store, redact
from triage.bundle import sha256_file
from triage.present import format_risk

from .config import Config
from .inbox import stored_instances

LAST_DECISIONS = 10


def audit_store(config: Config, state: dict) -> Path | str:
    """The store to read: an explicit ``audit_db`` (flag or file), else the one the running service recorded in
    ``workstation.json``, else the default."""
    if config.audit_db != Config.audit_db or not state.get("audit_db"):
        return config.audit_db
    recorded = state["audit_db"]
    return recorded if is_url(recorded) else Path(recorded)


def status_lines(config: Config) -> list[str]:
    """The status report as lines of text; reads the inbox, the state file and the audit store, writes nothing."""
    try:
        state = json.loads(config.state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    bundle_sha = state.get("bundle_sha256", "")
    incoming = [p for p in config.incoming_dir.glob("*") if p.is_file()] if config.incoming_dir.is_dir() else []
    outbox = list(config.outbox_dir.glob("*/*.dcm")) if config.outbox_dir.is_dir() else []
    rejected = [p for p in config.rejected_dir.glob("*") if p.is_file()] if config.rejected_dir.is_dir() else []
    audit_db = audit_store(config, state)
    if not is_url(audit_db) and not Path(audit_db).exists():
        where = "recorded in " + str(config.state_file) if state.get("audit_db") else "with this config"
        return [f"audit store {audit_db} does not exist yet: the workstation has not run {where}. Fix: pass "
                "--inbox and --audit-db as the service was started",
                f"queue: {len(incoming)} dropped file(s) waiting"]
    with open_store(audit_db, create=False) as store:
        decided = store.decided_keys(bundle_sha) if bundle_sha else {}
        waiting = [p for _, p in stored_instances(config.studies_dir) if (str(p), sha256_file(p)) not in decided]
        rows = store.decisions(bundle_sha256=bundle_sha) if bundle_sha else []
    latest_by_study = {row["study_uid"]: row for row in decided.values()}
    scored = [r for r in latest_by_study.values() if r["status"] == "scored"]
    flagged = sum(r["flagged"] for r in scored)
    rate = f"{flagged / len(scored):.1%} ({flagged} of {len(scored)} scored studies)" if scored else "n/a (no scored study)"
    lines = [
        f"queue: {len(waiting)} instance(s) received and not yet decided, {len(incoming)} dropped file(s) not yet "
        f"claimed, {len(outbox)} report(s) in the outbox",
        *([f"rejected: {len(rejected)} dropped file(s) in {config.rejected_dir} (not scored; the log says why)"]
          if rejected else []),
        f"audit store: {redact(audit_db) if is_url(audit_db) else audit_db}",
        f"realized flag rate: {rate}; target {config.flag_rate:.1%}",
        f"provider: {state.get('provider', 'unknown (the service has not started)')}",
        f"bundle: {state.get('bundle', 'unknown')}; listening: {state.get('ae_title', '?')} port {state.get('port', '?')}",
        f"last {min(LAST_DECISIONS, len(rows))} decisions:",
    ]
    for row in rows[-LAST_DECISIONS:][::-1]:
        risk = format_risk(row["study_risk"])
        lines.append(f"  #{row['id']} {row['created_at'][:19]} study {row['study_uid']} {row['status']} risk {risk or '-'} "
                     f"{'FLAGGED ' if row['flagged'] else ''}{row['policy']} {row['reason']}".rstrip())
    return lines
