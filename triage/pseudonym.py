"""Patient pseudonyms: a keyed hash of Patient ID (0010,0020), never the ID itself.

Each site keeps one random 32-byte secret beside its audit store. The same patient
gets the same pseudonym at the same site, so studies can be grouped, but nobody
without the secret can link a pseudonym to a patient ID by hashing candidate IDs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from .errors import AuditError

SECRET_BYTES = 32
SECRET_FILENAME = "site-secret.key"
SECRET_ENV = "CXR_TRIAGE_SECRET"
PSEUDONYM_HEX_CHARS = 16


def default_secret_path(audit_db_path: str | Path) -> Path:
    """$CXR_TRIAGE_SECRET, else ``site-secret.key`` in the audit database's folder.

    A ``postgresql://`` store has no folder, and the secret must not live in the shared
    database, so $CXR_TRIAGE_SECRET is then required (``AuditError`` with the fix otherwise).
    """
    override = os.environ.get(SECRET_ENV)
    if override:
        return Path(override)
    if str(audit_db_path).startswith(("postgresql://", "postgres://")):
        raise AuditError(f"a PostgreSQL audit store has no folder for the pseudonymization secret. Fix: set "
                         f"${SECRET_ENV} to a file path on this machine; it is created (mode 0600) on first use, and "
                         "every machine writing to the same store must hold a copy of the same file")
    return Path(audit_db_path).parent / SECRET_FILENAME


def load_or_create_secret(path: str | Path) -> bytes:
    """The site secret at ``path``; on first use, 32 random bytes written there with mode 0600.

    Creation is atomic and never overwrites: when two processes race, both end up with
    the winner's secret. Raises ``AuditError`` naming the file and the fix when it cannot
    be read or created, or does not hold exactly 32 bytes.
    """
    path = Path(path)
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    try:
        _create_secret(path)
    except FileExistsError:
        pass  # another process created it first: use theirs
    except OSError as error:
        raise AuditError(
            f"{path}: cannot create the pseudonymization secret ({error.strerror or error}). "
            f"Fix: make {path.parent} writable, or point ${SECRET_ENV} at a writable location"
        ) from error
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    """Read and check an existing secret; FileNotFoundError passes through."""
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as error:
        raise AuditError(
            f"{path}: cannot read the pseudonymization secret ({error.strerror or error}). "
            "Fix: run as the user that owns it, or restore it from the site's backup "
            "(a new secret would give every patient a new pseudonym)"
        ) from error
    if len(secret) != SECRET_BYTES:
        raise AuditError(
            f"{path}: the pseudonymization secret holds {len(secret)} bytes, not {SECRET_BYTES}; it is damaged. "
            "Fix: restore it from the site's backup (a new secret would give every patient a new pseudonym)"
        )
    return secret


def _create_secret(path: Path) -> None:
    """Write a fresh secret to a 0600 temporary file, then hard-link it into place (fails if taken)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(secrets.token_bytes(SECRET_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp_name, path)  # atomic and refuses to replace an existing file
    finally:
        os.unlink(tmp_name)


def pseudonymize(patient_id: str, secret: bytes) -> str:
    """First 16 hex characters of HMAC-SHA256(secret, patient_id); "" for an empty ID.

    Surrounding whitespace is ignored (DICOM pads values with spaces).
    """
    patient_id = (patient_id or "").strip()
    if not patient_id:
        return ""
    return hmac.new(secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX_CHARS]
