"""The source headers a result object may reference."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydicom import Dataset

from triage.ingest import PARSE_ERRORS

from ..workstation.inbox import InvalidUIDError, header_uids, read_header


def can_be_referenced(header: Dataset) -> bool:
    """True when a result can reference ``header``: valid (0020,000D) Study and (0008,0018) SOP Instance UIDs (the
    Study UID files the result), and readable (0008,0016) SOP Class UID and (0020,000E) Series Instance UID."""
    try:
        header_uids(header)
        header.get("SeriesInstanceUID")  # converted now: a damaged value fails here, not while building the result
        return bool(header.SOPClassUID)
    except (*PARSE_ERRORS, InvalidUIDError):  # a missing or damaged UID (AttributeError is in PARSE_ERRORS)
        return False


def readable_headers(paths: Iterable[Path]) -> list[Dataset]:
    """The headers (no pixel data) of the files among ``paths`` that a result can reference, in order."""
    return [header for header in filter(None, map(read_header, paths)) if can_be_referenced(header)]
