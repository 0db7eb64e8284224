"""Dashboard logins: salted scrypt password hashes in a JSON config file.

The config file (default ``$CXR_DASHBOARD_CONFIG``, else ``dashboard-users.json`` beside the
audit store) looks like::

    {"users": {"alice": {"password": "scrypt$16384$8$1$<salt hex>$<hash hex>"}}}

Create entries with ``python -m dashboards.users add NAME``; never write hashes by hand.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

CONFIG_ENV = "CXR_DASHBOARD_CONFIG"
CONFIG_FILENAME = "dashboard-users.json"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES = 16
LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")


class AuthConfigError(ValueError):
    """The login config file is missing, unreadable or malformed; the message says how to fix it."""


def default_config_path(audit_db: str | Path) -> Path:
    """$CXR_DASHBOARD_CONFIG, else ``dashboard-users.json`` in the audit store's folder.

    A ``postgresql://`` store has no folder: then AuthConfigError says to pass the config file.
    """
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override)
    if str(audit_db).startswith(("postgresql://", "postgres://")):
        raise AuthConfigError(f"the audit store is a PostgreSQL database, so there is no folder to find the login "
                              f"config in. Fix: pass --config FILE (or set ${CONFIG_ENV})")
    return Path(audit_db).parent / CONFIG_FILENAME


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$hash`` with a fresh random salt (hex)."""
    if not password:
        raise ValueError("hash_password: the password is empty. Fix: choose a password")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    """True when ``password`` matches a ``hash_password`` string (constant-time compare)."""
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected) // 2)
    except ValueError:
        return False
    return hmac.compare_digest(digest.hex(), expected)


def load_users(path: str | Path) -> dict[str, dict[str, Any]]:
    """{name: entry} from the config file; {} when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AuthConfigError(f"{path}: cannot read the login config ({error}). "
                              "Fix: restore it, or move it aside and add users with python -m dashboards.users add NAME") from error
    users = config.get("users") if isinstance(config, dict) else None
    if not isinstance(users, dict) or not all(isinstance(e, dict) and "password" in e for e in users.values()):
        raise AuthConfigError(f"{path}: expected {{\"users\": {{NAME: {{\"password\": ...}}}}}}. "
                              "Fix: add users with python -m dashboards.users add NAME")
    return users


def authenticate(users: dict[str, dict[str, Any]], name: str, password: str) -> bool:
    """True when ``name`` is a configured user and ``password`` is theirs."""
    entry = users.get(name.strip())
    return entry is not None and check_password(password, str(entry["password"]))


def add_user(path: str | Path, name: str, password: str, **scrypt_params: int) -> None:
    """Add or replace ``name`` in the config file (written atomically, mode 0600)."""
    name = name.strip()
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"add_user: user name {name!r} must be non-empty without spaces")
    path = Path(path)
    users = load_users(path)
    users[name] = {"password": hash_password(password, **scrypt_params)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"users": users}, handle, indent=2, sort_keys=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_local_address(address: str) -> bool:
    """True for loopback addresses, where an unconfigured dashboard is reachable only from this machine."""
    return address in LOCAL_ADDRESSES or address.startswith("127.")
