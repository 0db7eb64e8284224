"""``cxr-triage dashboard``: serve the Streamlit review and audit app (localhost by default).

Streamlit runs as a child process that dies with this one: SIGTERM, SIGINT and SIGHUP are
passed on to it, and on Linux ``PR_SET_PDEATHSIG`` has the kernel send it SIGTERM should
this process die without passing anything on (``kill -9``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from triage.audit import AUDIT_DB_ENV, DEFAULT_AUDIT_DB, default_audit_db, is_url, open_store, redact
from triage.errors import AuditError

from .paths import REPO_ROOT, default_bundle_dir

APP = REPO_ROOT / "dashboards" / "app.py"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def streamlit_command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line for ``args``."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", args.address,
            "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]


def dashboard_command(args: argparse.Namespace) -> int:
    """Check the paths and the logins, then run Streamlit until it stops; returns its exit code."""
    from dashboards.auth import AuthConfigError, default_config_path, is_local_address, load_users

    audit_db = args.audit_db if is_url(args.audit_db) else Path(args.audit_db).resolve()
    if not is_url(audit_db) and not audit_db.is_file():
        print(f"cxr-triage dashboard: error: {audit_db}: no audit store here. Fix: pass --audit-db the store "
              "that cxr-triage score wrote", file=sys.stderr)
        return 1
    try:
        if is_url(audit_db):
            open_store(audit_db, create=False).close()  # reachable, and a store is there
        config = Path(args.config) if args.config else default_config_path(audit_db)
        users = load_users(config)
    except (AuthConfigError, AuditError) as error:
        print(f"cxr-triage dashboard: error: {error}", file=sys.stderr)
        return 1
    if not users and not is_local_address(args.address):
        print(f"cxr-triage dashboard: error: refusing to listen on {args.address} with no logins configured in "
              f"{config}. Fix: python -m dashboards.users --config {config} add NAME, or keep the default "
              "--address 127.0.0.1", file=sys.stderr)
        return 1
    try:
        import streamlit  # noqa: F401
    except ImportError:
        print("cxr-triage dashboard: error: Streamlit is not installed. Fix: pip install -e '.[dashboard]'",
              file=sys.stderr)
        return 1
    env = {**os.environ, "CXR_DASHBOARD_AUDIT_DB": str(audit_db),
           "CXR_DASHBOARD_BUNDLE": str(Path(args.bundle).resolve()), "CXR_DASHBOARD_CONFIG": str(config.resolve())}
    shown = redact(audit_db) if is_url(audit_db) else audit_db
    print(f"dashboard on http://{args.address}:{args.port} (audit store {shown}, logins {config})", flush=True)
    return run_child(streamlit_command(args), env)


def die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when this process dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()  # loaded before the fork, not in the child

    def hook() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def run_child(command: Sequence[str], env: dict[str, str]) -> int:
    """Run ``command`` until it exits, passing on SIGTERM/SIGINT/SIGHUP; its exit code (128 + N after signal N)."""
    child = subprocess.Popen(command, env=env, preexec_fn=die_with_parent_hook())
    previous = {signum: signal.signal(signum, lambda signum, _frame: child.send_signal(signum))
                for signum in FORWARDED_SIGNALS}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``dashboard`` on the main CLI."""
    parser = subparsers.add_parser("dashboard", help="serve the review and audit dashboard (Streamlit)",
                                   description="Serve the review and audit dashboard. Logins are required; add them "
                                               "with python -m dashboards.users add NAME.")
    parser.add_argument("--audit-db", default=str(default_audit_db()),
                        help=f"audit store: a SQLite file or a postgresql:// URL (default: ${AUDIT_DB_ENV} or "
                             f"./{DEFAULT_AUDIT_DB})")
    parser.add_argument("--bundle", default=str(default_bundle_dir()), help="model bundle folder (default: the demo)")
    parser.add_argument("--port", type=int, default=8501, help="TCP port (default 8501)")
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other needs logins configured)")
    parser.add_argument("--config", default=None,
                        help="login config file (default: $CXR_DASHBOARD_CONFIG, else dashboard-users.json beside "
                             "the audit store)")
    parser.set_defaults(func=dashboard_command)
