"""A real PostgreSQL server for tests: initdb + pg_ctl in a temporary folder, on loopback, a free port.

Import the fixtures into a test module (``from tests.pg import pg_server, pg_url``).
``pg_server`` (session) is the server's base URL; ``pg_url`` is a fresh empty database per
test, dropped afterwards. initdb refuses to run as root, so as root the server runs as
the ``postgres`` user (Debian's package creates it). Skips with the reason when the
server binaries or psycopg are absent.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SUPERUSER = "cxr"


def server_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin; None if absent."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(argv: list[str]) -> list[str]:
    """``argv`` run as the unprivileged ``postgres`` user when we are root (initdb refuses root)."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def unavailable_reason() -> str | None:
    """Why no temporary server can start here, or None when one can."""
    if server_bin_dir() is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl) not found. Fix: apt-get install postgresql "
                "(scripts/test.sh does when run as root)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed. Fix: pip install -e '.[scale]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no 'postgres' user to run the server as. Fix: apt-get install postgresql"
    return None


@contextmanager
def temporary_server(durable: bool = False) -> Iterator[str]:
    """Run a throwaway server; yields its URL without a database name (superuser ``cxr``, trust auth).

    ``durable=False`` turns fsync off (fast tests); benchmarks pass True to compare like with like.
    Check ``unavailable_reason()`` first.
    """
    bin_dir = server_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
    if os.geteuid() == 0:
        server_user = pwd.getpwnam("postgres")
        os.chown(root, server_user.pw_uid, server_user.pw_gid)
    data, port = root / "data", _free_port()
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    try:
        subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                                        "-E", "UTF8", "--no-sync", "--no-instructions"]), **run)
        options = f"-h 127.0.0.1 -p {port} -k {root} -c max_connections=60" + ("" if durable else " -F")
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                                        str(root / "server.log"), "-w", "-t", "60", "start"]), **run)
    except subprocess.CalledProcessError as error:
        log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"{error.cmd[-1]} failed: {error.stderr}\n{log}") from error
    try:
        yield f"postgresql://{SUPERUSER}@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A running PostgreSQL server for the session (fsync off); its URL without a database name."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with temporary_server() as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's server; dropped after the test."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield f"{pg_server}/{name}"
    with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
