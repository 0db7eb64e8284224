"""The audit store's records: a ``Decision``, the result of ``verify``, and the columns of each chained table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

VERDICTS = ("agree", "disagree", "not_assessable")


@dataclass(frozen=True)
class Decision:
    """What happened to one input file; one row of the ``decisions`` table."""

    path: str
    sha256: str            # of the source file
    status: str            # "scored" | "human_review"
    reason: str = ""       # code from triage.errors.REASONS; "" when scored
    detail: str = ""       # readable message (file, problem, fix); never patient names
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    patient_pseudo_id: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    manufacturer: str = ""
    bundle_name: str = ""
    bundle_version: str = ""
    bundle_sha256: str = ""
    finding: str = ""
    risk: float | None = None        # calibrated image risk
    study_risk: float | None = None  # max over the study's scored images
    threshold: float | None = None   # risk threshold in force
    flag_rate: float | None = None   # target flag rate
    policy: str = ""                 # "batch_top_k" (or "batch_top_k min_risk=R") | "stream_threshold" | ...
    flagged: bool = False            # study-level flag
    run_id: str = ""
    decode_ms: float | None = None
    infer_ms: float | None = None
    provider: str = ""               # ONNX Runtime execution provider
    supersedes: int | None = None    # id of an earlier decision this one replaces


def decision_from_row(row: dict[str, Any]) -> Decision:
    """An audit-store row (or a saved draft: any dict with the Decision fields) -> the Decision it records."""
    values = {f.name: row[f.name] for f in dataclasses.fields(Decision) if f.name in row}
    values["flagged"] = bool(values.get("flagged"))
    return Decision(**values)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of ``AuditStore.verify``: ``first_bad_id`` is in ``table`` when not ok."""

    ok: bool
    n_records: int                # decisions
    first_bad_id: int | None
    message: str
    n_reviews: int = 0
    table: str = ""               # "decisions" | "reviews" when not ok
    study_uid: str = ""           # the broken record's study, when the record is still there


# Column kinds: "text" (NOT NULL, "" default), "real" (nullable), "bool" (0/1), "int" (nullable).
_KIND_OF_ANNOTATION = {"str": "text", "float | None": "real", "bool": "bool", "int | None": "int"}
_DECISION_KINDS = {f.name: _KIND_OF_ANNOTATION[str(f.type)] for f in dataclasses.fields(Decision)}
_HEAD_KINDS = {"id": "int", "created_at": "text", "software_version": "text"}
_TAIL_KINDS = {"prev_hash": "text", "record_hash": "text"}
DECISION_KINDS = {**_HEAD_KINDS, **_DECISION_KINDS, **_TAIL_KINDS}
REVIEW_KINDS = {
    **_HEAD_KINDS, "decision_id": "int", "study_uid": "text", "reviewer": "text", "verdict": "text", "finding": "text",
    "note": "text", **_TAIL_KINDS,
}
DECISION_COLUMNS = tuple(DECISION_KINDS)
REVIEW_COLUMNS = tuple(REVIEW_KINDS)
CHAINS = {"decisions": DECISION_COLUMNS, "reviews": REVIEW_COLUMNS}
CHAIN_KINDS = {"decisions": DECISION_KINDS, "reviews": REVIEW_KINDS}
