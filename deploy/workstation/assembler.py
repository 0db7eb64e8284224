"""Study completion (a study is ready when no instance has arrived for ``quiet_period_s``) and
study identity (every instance of a study must belong to its first instance's patient)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_description

from triage.errors import TriageError

from .inbox import PART_SUFFIX, write_atomic


@dataclass
class StudyAssembler:
    """Arrivals in, ready studies out. Times are monotonic seconds supplied by the caller."""

    quiet_period_s: float
    last_arrival_: dict[str, float] = field(default_factory=dict)
    sites_: dict[str, str] = field(default_factory=dict)

    def add(self, study_key: str, site: str, now: float) -> None:
        self.last_arrival_[study_key] = now
        self.sites_.setdefault(study_key, site)

    def ready(self, now: float) -> list[tuple[str, str]]:
        """(study key, site) of every study quiet for at least ``quiet_period_s``, oldest first; removed."""
        done = sorted((t, key) for key, t in self.last_arrival_.items() if now - t >= self.quiet_period_s)
        out = []
        for _, key in done:
            del self.last_arrival_[key]
            out.append((key, self.sites_.pop(key)))
        return out

    def next_due_in(self, now: float) -> float | None:
        """Seconds until the next study is ready; None when nothing is waiting."""
        if not self.last_arrival_:
            return None
        return max(0.0, min(self.last_arrival_.values()) + self.quiet_period_s - now)

    def __len__(self) -> int:
        return len(self.last_arrival_)


# -- one patient per study ------------------------------------------------------------------------

PATIENT_TAGS = {"PatientID": 0x00100020, "PatientName": 0x00100010, "PatientBirthDate": 0x00100030}
STUDY_PATIENT_FILE = ".patient.json"  # in the study's inbox folder: digests of its patient's PATIENT_TAGS


class PatientMismatchError(TriageError, ValueError):
    """An instance whose patient differs from its study's. The message names UIDs and tags, never values."""

    def __init__(self, study_uid: str, sop_uid: str, keywords: Sequence[str]) -> None:
        self.study_uid, self.sop_uid, self.keywords = study_uid, sop_uid, tuple(keywords)
        tags = ", ".join(f"({PATIENT_TAGS[k] >> 16:04X},{PATIENT_TAGS[k] & 0xFFFF:04X}) {dictionary_description(PATIENT_TAGS[k])}"
                         for k in self.keywords)
        super().__init__(f"instance {sop_uid} of study {study_uid}: {tags} differ(s) from the study's first instance. "
                         "Fix: correct the patient at the modality or RIS and send the study again under a new "
                         "Study Instance UID, or remove the study from the inbox first")


def patient_digests(header: Dataset) -> dict[str, str]:
    """sha256 of each PATIENT_TAGS value (DICOM padding stripped), by keyword: compared, never logged."""
    return {keyword: hashlib.sha256(str(header.get(keyword) or "").strip(" \x00").encode()).hexdigest()
            for keyword in PATIENT_TAGS}


def differing(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    """Keywords of PATIENT_TAGS whose digests differ."""
    return [keyword for keyword in PATIENT_TAGS if expected.get(keyword) != found.get(keyword)]


def check_patient(study_dir: Path, header: Dataset) -> None:
    """Admit ``header`` into the study whose inbox folder is ``study_dir`` only if its patient is the study's.

    Call before storing an instance, from every input (the SCP, the watched folder). The
    study's patient, (0010,0020) Patient ID, (0010,0010) Patient's Name and (0010,0030)
    Birth Date, is fixed by its first admitted instance: recorded as digests in
    ``study_dir/.patient.json``, created atomically so two senders cannot both be first
    (for a study stored before this record existed, its stored instance fixes it).
    Raises PatientMismatchError naming the tags that differ.
    """
    found = patient_digests(header)
    mismatched = differing(_study_patient(study_dir, found), found)
    if mismatched:
        raise PatientMismatchError(study_dir.name, str(header.get("SOPInstanceUID", "")), mismatched)


def _study_patient(study_dir: Path, candidate: dict[str, str]) -> dict[str, str]:
    """The digests recorded for the study; the first caller's (or a stored instance's) become the record."""
    record = study_dir / STUDY_PATIENT_FILE
    if not record.exists():
        stored = next(iter(sorted(study_dir.glob("*.dcm"))), None)
        first = candidate if stored is None else patient_digests(dcmread(stored, stop_before_pixels=True))
        part = study_dir / f"{STUDY_PATIENT_FILE}.{uuid.uuid4().hex}{PART_SUFFIX}"
        study_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(part, json.dumps(first).encode())
        try:
            os.link(part, record)  # atomic: fails when another sender was first
        except FileExistsError:
            pass
        finally:
            part.unlink()
    return json.loads(record.read_text(encoding="utf-8"))
