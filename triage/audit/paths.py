"""Where an audit store is, and how file paths are held as text: store locations, URLs, output files."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEFAULT_AUDIT_DB = "cxr-triage-audit.sqlite"
AUDIT_DB_ENV = "CXR_TRIAGE_AUDIT_DB"


def is_url(target: str | Path) -> bool:
    """True when ``target`` names a PostgreSQL database (``postgresql://`` or ``postgres://``) rather than a file."""
    return str(target).startswith(("postgresql://", "postgres://"))


def default_audit_db() -> Path | str:
    """$CXR_TRIAGE_AUDIT_DB (a path, or a ``postgresql://`` URL kept as text), else ``./cxr-triage-audit.sqlite``."""
    target = os.environ.get(AUDIT_DB_ENV) or DEFAULT_AUDIT_DB
    return target if is_url(target) else Path(target)


def redact(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` parameter) replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = "&".join("password=***" if q.lower().startswith("password=") else q for q in parts.query.split("&"))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_PATH_ESCAPE = re.compile(rb"\\(\\|x[0-9a-f]{2})")  # what path_text writes: a backslash doubled, or \xNN


def path_text(path: str | os.PathLike[str]) -> str:
    """A file path as the audit store, the worklist and the resume key hold it: UTF-8 text that maps back to the file.

    A byte of the name that is not UTF-8 (``M\\xfcller.dcm`` in Latin-1 from a legacy share, which Python holds as
    a lone surrogate) is written ``\\xfc`` and a backslash ``\\\\``, so the mapping is one-to-one; any other path
    is unchanged. ``os_path`` maps the text back to the file.
    """
    return os.fsencode(path).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def os_path(text: str) -> str:
    """The file path whose ``path_text`` is ``text`` (the inverse), as ``open`` takes it."""
    def byte(escape: re.Match[bytes]) -> bytes:
        return b"\\" if escape[1] == b"\\" else bytes.fromhex(escape[1][1:].decode("ascii"))

    return os.fsdecode(_PATH_ESCAPE.sub(byte, text.encode("utf-8")))


def output_file_problem(path: str | Path) -> str:
    """Why a file cannot be written at ``path`` as the CSV writers do (a temporary file beside it, renamed over it),
    "" when it can: it must be new or a regular file, in a folder where this account can create files. Creates
    missing folders; leaves nothing behind. Check it before long work, so a bad ``--out`` costs nothing."""
    path = Path(path)
    if path.is_dir():
        return "it is a folder"
    if path.exists() and not path.is_file():
        return "it is not a regular file (a device, FIFO or socket, or a link to one), which the rename would replace"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as error:
        return f"cannot create a file in {path.parent} ({error.strerror or error})"
    return ""
