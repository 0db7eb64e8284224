"""The inbox: received instances stored as ``studies/<Study UID>/<SOP Instance UID>.dcm``.

Names are built only from UIDs that pass PS3.5 section 9 (digits and dots, at most 64
characters, no leading zeros), never from sender strings. Every write goes to a
``.part`` file in the same folder, is fsynced, then renamed: a crash leaves either
the whole file or a ``.part`` that the next start removes (its sender saw no success).
Files dropped into ``incoming/`` by modalities that export files are claimed the same way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

PART_SUFFIX = ".part"
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")  # PS3.5 9.1
NO_UID_PREFIX = "no-uid-"  # folder prefix for dropped files without valid UIDs: each is its own study
log = logging.getLogger("cxr_triage.workstation")


class InvalidUIDError(ValueError):
    """A UID that cannot name a file: not PS3.5 section 9 syntax."""


def check_uid(value: object, tag: str) -> str:
    """``value`` as a str when it is a valid UID (PS3.5 9.1), else InvalidUIDError naming ``tag``."""
    text = str(value or "").strip("\x00 ")
    if len(text) > 64 or not _UID.match(text):
        raise InvalidUIDError(f"{tag} {text[:80]!r} is not a valid UID (digits and dots, <= 64 chars)")
    return text


@dataclass(frozen=True)
class Arrival:
    """One instance now safely in the inbox."""

    study_uid: str
    path: Path
    site: str  # calling AE title, or "inbox" for dropped files
    received_at: float = field(default_factory=time.monotonic)  # when it became durable (monotonic s)


def instance_path(studies_dir: Path, study_uid: str, sop_uid: str) -> Path:
    """Where an instance lives; both UIDs must already have passed ``check_uid``."""
    return studies_dir / check_uid(study_uid, "Study Instance UID") / f"{check_uid(sop_uid, 'SOP Instance UID')}.dcm"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via ``path.part`` + fsync + rename (+ fsync of the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + PART_SUFFIX)
    with open(part, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def remove_partials(studies_dir: Path) -> int:
    """Delete ``.part`` leftovers of a crash; returns how many (their senders got no success status)."""
    removed = 0
    for part in studies_dir.rglob(f"*{PART_SUFFIX}"):
        part.unlink(missing_ok=True)
        removed += 1
    return removed


def stored_instances(studies_dir: Path) -> Iterator[tuple[str, Path]]:
    """(study folder name, path) of every complete instance in the inbox, sorted."""
    if not studies_dir.is_dir():
        return
    for path in sorted(studies_dir.glob("*/*.dcm")):
        yield path.parent.name, path


def claim_dropped(path: Path, studies_dir: Path) -> tuple[str, Path]:
    """Move a file dropped in ``incoming/`` into the inbox under its UIDs; returns (study key, new path).

    A file whose header gives no valid Study/SOP Instance UID (not DICOM, damaged, or
    bad UIDs) is kept under ``no-uid-<sha256 prefix>/<sha256>.dcm`` so it is still scored and recorded.
    The original is removed only after the copy is durable.
    """
    data = path.read_bytes()
    try:
        header = dcmread(path, stop_before_pixels=True, force=True)
        study_uid = check_uid(header.get("StudyInstanceUID"), "Study Instance UID")
        target = instance_path(studies_dir, study_uid, check_uid(header.get("SOPInstanceUID"), "SOP Instance UID"))
    except (InvalidDicomError, InvalidUIDError, OSError, ValueError, TypeError, AttributeError) as error:
        log.warning("%s: no valid UIDs (%s); kept as its own study", path.name, error)
        digest = hashlib.sha256(data).hexdigest()
        study_uid = NO_UID_PREFIX + digest[:32]
        target = studies_dir / study_uid / f"{digest}.dcm"
    write_atomic(target, data)
    path.unlink()
    return study_uid, target
