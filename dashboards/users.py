"""``python -m dashboards.users add NAME [--config F]``: create or replace a dashboard login."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence

from triage.audit import default_audit_db

from .auth import AuthConfigError, add_user, default_config_path, load_users


def main(argv: Sequence[str] | None = None) -> int:
    """Add a user (password from the prompt, or one line of stdin with --password-stdin) or list users."""
    parser = argparse.ArgumentParser(prog="python -m dashboards.users", description=__doc__)
    parser.add_argument("--config", default=None, help="login config file (default: $CXR_DASHBOARD_CONFIG, "
                                                        "else dashboard-users.json beside the audit store)")
    commands = parser.add_subparsers(dest="action", required=True)
    add = commands.add_parser("add", help="add or replace a user")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin (scripts)")
    commands.add_parser("list", help="list user names")
    args = parser.parse_args(argv)
    try:
        config = args.config or str(default_config_path(default_audit_db()))  # a postgresql:// store: needs --config
        if args.action == "list":
            print("\n".join(sorted(load_users(config))))
            return 0
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = getpass.getpass(f"password for {args.name}: ")
            if password != getpass.getpass("again: "):
                print("python -m dashboards.users: error: the passwords differ", file=sys.stderr)
                return 1
        add_user(config, args.name, password)
    except (AuthConfigError, ValueError) as error:
        print(f"python -m dashboards.users: error: {error}", file=sys.stderr)
        return 1
    print(f"{config}: user {args.name.strip()} saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
