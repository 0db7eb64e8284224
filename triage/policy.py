"""Scores to flags.

Batch mode flags exactly ``ceil(flag_rate * N)`` studies with the highest risk
(N = studies with at least one scored image); ties are broken by study UID so the
result never depends on input order. Stream mode flags risk >= the bundle's
calibrated threshold. A study's risk is the maximum over its scored images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

BATCH_TOP_K = "batch_top_k"
STREAM_THRESHOLD = "stream_threshold"
DEFAULT_FLAG_RATE = 0.05


@dataclass(frozen=True)
class Flags:
    """The outcome of a policy: which studies are flagged, and the threshold in force."""

    flagged: frozenset[str]
    threshold: float | None
    policy: str
    flag_rate: float


def check_flag_rate(flag_rate: float) -> float:
    """Return ``flag_rate`` if it is in (0, 1], else raise ValueError saying so."""
    if not 0 < flag_rate <= 1:
        raise ValueError(f"flag rate {flag_rate!r} must be in (0, 1], e.g. 0.05 for the riskiest 5%")
    return flag_rate


def study_risks(image_risks: Iterable[tuple[str, float]]) -> dict[str, float]:
    """(study_uid, image risk) pairs -> study_uid -> max risk."""
    risks: dict[str, float] = {}
    for study_uid, risk in image_risks:
        risks[study_uid] = max(risk, risks.get(study_uid, -math.inf))
    return risks


def flag_count(flag_rate: float, n_studies: int) -> int:
    """ceil(flag_rate * n), robust to float error (0.05 * 20 is 1, not 2)."""
    return min(n_studies, math.ceil(round(check_flag_rate(flag_rate) * n_studies, 9)))


def rank_studies(risks: Mapping[str, float]) -> list[str]:
    """Study UIDs, riskiest first; ties by UID for determinism."""
    return sorted(risks, key=lambda uid: (-risks[uid], uid))


def flag_top_k(risks: Mapping[str, float], flag_rate: float = DEFAULT_FLAG_RATE) -> Flags:
    """Batch mode: flag exactly ceil(flag_rate * N) of the N studies, the riskiest."""
    k = flag_count(flag_rate, len(risks))
    chosen = rank_studies(risks)[:k]
    threshold = risks[chosen[-1]] if chosen else None
    return Flags(frozenset(chosen), threshold, BATCH_TOP_K, flag_rate)


def flag_threshold(risks: Mapping[str, float], threshold: float, flag_rate: float = DEFAULT_FLAG_RATE) -> Flags:
    """Stream mode: flag every study whose risk is at least the calibrated threshold."""
    return Flags(frozenset(uid for uid, r in risks.items() if r >= threshold), threshold, STREAM_THRESHOLD, flag_rate)
