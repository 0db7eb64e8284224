"""Dashboard logins: salted scrypt password hashes in a JSON config file.

The config file (default ``$CXR_DASHBOARD_CONFIG``, else ``dashboard-users.json`` beside the
audit store) looks like::

    {"users": {"alice": {"password": "scrypt$16384$8$1$<salt hex>$<hash hex>"}}}

Create entries with ``python -m dashboards.users add NAME``; never write hashes by hand.

Failed logins are limited per user name and per client address (``LoginGuard``): too many
in a window lock that name or address out for a while, doubling with each further lockout,
and every failure is logged (name and address, never the password).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_ENV = "CXR_DASHBOARD_CONFIG"
CONFIG_FILENAME = "dashboard-users.json"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES = 16
LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")
MAX_FAILURES_PER_USER = 5       # failed logins of one user name within FAILURE_WINDOW_S before it is locked
MAX_FAILURES_PER_ADDRESS = 20   # ... of one client address (several people may share one, e.g. behind a proxy)
FAILURE_WINDOW_S = 15 * 60.0
LOCKOUT_S = 60.0                # the first lockout; each further one doubles, up to MAX_LOCKOUT_S
MAX_LOCKOUT_S = 60 * 60.0

log = logging.getLogger(__name__)


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


@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)  # failures within the window, oldest first
    lockouts: int = 0
    locked_until: float = 0.0


class FailureLimiter:
    """Failures per key (a user name or a client address): ``max_failures`` of them within ``window_s`` lock the
    key for ``lockout_s``, doubled for each further lockout up to ``max_lockout_s``. Thread-safe: one instance
    serves every session of the server process. A key quiet for ``window_s`` after its lockout starts afresh."""

    def __init__(self, max_failures: int, window_s: float = FAILURE_WINDOW_S, lockout_s: float = LOCKOUT_S,
                 max_lockout_s: float = MAX_LOCKOUT_S, clock: Callable[[], float] = time.monotonic) -> None:
        if max_failures < 1 or not 0 < lockout_s <= max_lockout_s or window_s <= 0:
            raise ValueError(f"FailureLimiter: max_failures {max_failures} must be >= 1 and 0 < lockout_s "
                             f"{lockout_s} <= max_lockout_s {max_lockout_s}, window_s {window_s} > 0")
        self.max_failures, self.window_s = max_failures, window_s
        self.lockout_s, self.max_lockout_s, self.clock = lockout_s, max_lockout_s, clock
        self._keys: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def wait_s(self, key: str) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        with self._lock:
            entry = self._keys.get(key)
            return max(0.0, entry.locked_until - self.clock()) if entry else 0.0

    def fail(self, key: str) -> float:
        """Count a failure of ``key``; the seconds it is now locked for (0: not locked)."""
        with self._lock:
            now = self.clock()
            self._forget_quiet(now)
            entry = self._keys.setdefault(key, _Failures())
            entry.times.append(now)
            if len(entry.times) >= self.max_failures:
                entry.times.clear()
                entry.lockouts += 1
                entry.locked_until = now + min(self.lockout_s * 2 ** (entry.lockouts - 1), self.max_lockout_s)
            return max(0.0, entry.locked_until - now)

    def clear(self, key: str) -> None:
        """Forget ``key``'s failures and lockouts (after it logged in)."""
        with self._lock:
            self._keys.pop(key, None)

    def _forget_quiet(self, now: float) -> None:
        """Drop failures older than the window, and keys with none left whose lockout ended a window ago."""
        for key, entry in list(self._keys.items()):
            while entry.times and entry.times[0] <= now - self.window_s:
                entry.times.popleft()
            if not entry.times and entry.locked_until <= now - self.window_s:
                del self._keys[key]


@dataclass(frozen=True)
class LoginOutcome:
    """``ok`` when logged in; else ``wait_s`` > 0 while the name or address is locked out (no password is checked
    then), 0 for a wrong name or password that locked nothing."""

    ok: bool
    wait_s: float = 0.0


@dataclass(frozen=True)
class LoginGuard:
    """Password logins limited per user name and per client address, each failure logged without the password."""

    users: FailureLimiter = field(default_factory=lambda: FailureLimiter(MAX_FAILURES_PER_USER))
    addresses: FailureLimiter = field(default_factory=lambda: FailureLimiter(MAX_FAILURES_PER_ADDRESS))

    def attempt(self, accounts: dict[str, dict[str, Any]], name: str, password: str, address: str) -> LoginOutcome:
        """Check ``name``/``password`` against ``accounts`` unless ``name`` or ``address`` is locked out."""
        name = name.strip()
        wait_s = max(self.users.wait_s(name), self.addresses.wait_s(address))
        if wait_s > 0:
            log.warning("dashboard login refused: user %r from %s is locked out for %.0f s more", name, address, wait_s)
            return LoginOutcome(False, wait_s)
        if authenticate(accounts, name, password):
            self.users.clear(name)  # the address keeps its count: one good account must not reset it
            log.info("dashboard login: user %r from %s", name, address)
            return LoginOutcome(True)
        wait_s = max(self.users.fail(name), self.addresses.fail(address))
        log.warning("dashboard login failed: user %r from %s%s", name, address,
                    f"; locked out for {wait_s:.0f} s" if wait_s else "")
        return LoginOutcome(False, wait_s)
