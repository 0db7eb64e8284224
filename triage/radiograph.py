"""The in-memory form of one image, between the file reader and preprocessing."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from pydicom import Dataset
from pydicom.uid import RE_VALID_UID

UID_MAX_CHARS = 64


def uid_text(value: object) -> str:
    """A UI value as text without the NUL/space padding around it; "" when absent."""
    return "" if value is None else str(value).strip("\x00 ")


def is_valid_uid(value: object) -> bool:
    """``uid_text(value)`` is a DICOM UID (PS3.5 9.1): components of digits joined by dots, no component
    with a leading zero ("0" alone is one), at most 64 characters. pydicom's pattern, matched in full
    (its ``UID.is_valid`` uses ``re.match``, whose ``$`` also accepts a trailing newline)."""
    text = uid_text(value)
    return len(text) <= UID_MAX_CHARS and re.fullmatch(RE_VALID_UID, text) is not None


@dataclass(frozen=True)
class ImageMeta:
    """What the pipeline needs to know about an image besides its pixels.

    UIDs are always set and always valid (``is_valid_uid``): for a PNG/JPEG file, or a DICOM
    lacking them or holding an invalid one, they are derived deterministically from the
    file's sha256 (each such file is one study).
    ``patient_id`` is the raw identifier and must be pseudonymized before it is stored.
    """

    study_uid: str
    series_uid: str
    sop_uid: str
    patient_id: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    manufacturer: str = ""
    study_date: str = ""
    source_format: str = "dicom"  # "dicom" or "image" (PNG/JPEG)


@dataclass(frozen=True)
class Radiograph:
    """One decoded, in-scope, single-frame monochrome image.

    ``pixels``: (rows, cols) array of stored values exactly as decoded (any integer
    dtype for DICOM, honouring Bits Stored (0028,0101) and Pixel Representation
    (0028,0103); uint8 for PNG/JPEG). ``dataset`` holds the DICOM tags without
    Pixel Data, for the modality and VOI LUT steps; ``None`` for PNG/JPEG.
    ``photometric`` is "MONOCHROME1" (high value = dark) or "MONOCHROME2".
    """

    path: str
    sha256: str
    pixels: np.ndarray
    photometric: str
    meta: ImageMeta
    dataset: Dataset | None = field(default=None, repr=False, compare=False)
