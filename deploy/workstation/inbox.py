"""The inbox: received instances stored as ``studies/<Study UID>/<SOP Instance UID>.<sha256>.dcm``.

Names are built only from UIDs that pass PS3.5 section 9 (digits and dots, at most 64
characters, no leading zeros), never from sender strings, and carry the sha256 of the
file's bytes: a resend of identical bytes lands on the file already there, and a resend
of the same SOP Instance UID with other bytes is a new file beside it, so a file that a
decision was recorded for is never overwritten. Every write goes to a uniquely named
``.part`` file in the same folder, is fsynced, then renamed: a crash leaves either the
whole file or a ``.part`` that the next start removes (its sender saw no success).
Files dropped into ``incoming/`` by modalities that export files are claimed the same
way; one that cannot be claimed is moved to ``rejected/``.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread

from triage.ingest import MAX_FILE_BYTES, PARSE_ERRORS
from triage.radiograph import is_valid_uid, uid_text

PART_SUFFIX = ".part"
NO_UID_PREFIX = "no-uid-"  # folder prefix for dropped files without valid UIDs: each is its own study
log = logging.getLogger("cxr_triage.workstation")


class InvalidUIDError(ValueError):
    """A UID that cannot name a file: not PS3.5 section 9 syntax."""


class DroppedFileError(ValueError):
    """A file dropped in ``incoming/`` that cannot enter the inbox; the message names the file, the problem and the fix."""


def check_uid(value: object, tag: str) -> str:
    """``value`` as a str when it is a valid UID (``triage.radiograph.is_valid_uid``), else InvalidUIDError naming
    ``tag``: the one UID rule of the batch scorer and the workstation."""
    text = uid_text(value)
    if not is_valid_uid(text):
        raise InvalidUIDError(f"{tag} {text[:80]!r} is not a valid UID (digits and dots, <= 64 chars)")
    return text


@dataclass(frozen=True)
class Arrival:
    """One instance now safely in the inbox."""

    study_uid: str
    path: Path
    site: str  # calling AE title, or "inbox" for dropped files
    received_at: float = field(default_factory=time.monotonic)  # when it became durable (monotonic s)


def instance_path(studies_dir: Path, study_uid: str, sop_uid: str, sha256: str) -> Path:
    """Where the instance whose bytes hash to ``sha256`` lives; both UIDs must pass ``check_uid``."""
    sop = check_uid(sop_uid, "SOP Instance UID")
    return studies_dir / check_uid(study_uid, "Study Instance UID") / f"{sop}.{sha256}.dcm"


def store_instance(studies_dir: Path, study_uid: str, sop_uid: str, data: bytes | mmap.mmap) -> Path:
    """Write ``data`` (bytes, or a read-only memory map of a received file) under its UIDs and sha256, atomically,
    unless that very file is already there; returns its path."""
    path = instance_path(studies_dir, study_uid, sop_uid, hashlib.sha256(data).hexdigest())
    if not path.is_file():  # content-addressed: an existing file of this name holds these bytes
        write_atomic(path, data)
    return path


def write_atomic(path: Path, data: bytes | mmap.mmap) -> None:
    """Write ``data`` to ``path`` via a uniquely named ``.part`` in its folder + fsync + rename (+ fsync of the folder).

    Unique names let several threads write the same ``path`` at once: the last rename wins, none fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=PART_SUFFIX, delete=False)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
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


def read_header(path: Path) -> Dataset | None:
    """The DICOM header of a stored or dropped file (no pixel data), or None when it cannot be parsed."""
    try:
        return dcmread(path, stop_before_pixels=True, force=True)
    except Exception as error:  # noqa: BLE001 - sender-made bytes: RecursionError (sequences nested 400 deep),
        # MemoryError, pydicom's own errors; any of them only means "no usable header", never a stopped service
        log.warning("%s: no readable DICOM header (%s)", path.name, type(error).__name__)
        return None


def header_uids(header: Dataset | None) -> tuple[str, str]:
    """(Study Instance UID (0020,000D), SOP Instance UID (0008,0018)) of ``header``; InvalidUIDError when unusable."""
    if header is None:
        raise InvalidUIDError("no DICOM header")
    try:
        study_uid, sop_uid = header.get("StudyInstanceUID"), header.get("SOPInstanceUID")
    except PARSE_ERRORS as error:  # a damaged element fails when pydicom converts it
        raise InvalidUIDError(f"unreadable UID element ({type(error).__name__})") from error
    return check_uid(study_uid, "Study Instance UID (0020,000D)"), check_uid(sop_uid, "SOP Instance UID (0008,0018)")


def claim_dropped(path: Path, studies_dir: Path, admit: Callable[[Path, Dataset], None]) -> tuple[str, Path]:
    """Move a file dropped in ``incoming/`` into the inbox under its UIDs; returns (study key, new path).

    A file over ``triage.ingest.MAX_FILE_BYTES`` is refused (``DroppedFileError``) before it is
    read. ``admit(study folder, header)`` raises ValueError when the file may not join its study
    (the service passes ``assembler.check_patient``: another patient); the file is then refused
    (``DroppedFileError``) and nothing is stored. A file whose header gives no valid Study/SOP
    Instance UID (not DICOM, damaged, bad UIDs) is kept under ``no-uid-<sha256 prefix>/<sha256>.dcm``
    so it is still scored and recorded. The original is removed only after the copy is durable.
    """
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DroppedFileError(f"{path}: the file is {size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES / 2**20:.0f} MiB "
                               "limit for one image. Fix: check what this file is; a chest radiograph is well under 100 MiB")
    data = path.read_bytes()
    header = read_header(path)
    try:
        study_uid, sop_uid = header_uids(header)
    except InvalidUIDError as error:
        log.warning("%s: no valid UIDs (%s); kept as its own study", path.name, error)
        digest = hashlib.sha256(data).hexdigest()
        study_uid = NO_UID_PREFIX + digest[:32]
        target = studies_dir / study_uid / f"{digest}.dcm"
        write_atomic(target, data)
    else:
        try:
            admit(studies_dir / study_uid, header)
        except ValueError as error:
            raise DroppedFileError(f"{path}: {error}") from error
        target = store_instance(studies_dir, study_uid, sop_uid, data)
    path.unlink()
    return study_uid, target


def reject_dropped(path: Path, rejected_dir: Path) -> Path:
    """Move a dropped file that cannot be claimed to ``rejected_dir`` (a rename: nothing is read); returns the new path."""
    rejected_dir.mkdir(parents=True, exist_ok=True)
    target = rejected_dir / path.name
    suffix = 1
    while target.exists():
        target = rejected_dir / f"{path.name}.{suffix}"
        suffix += 1
    os.replace(path, target)
    return target
