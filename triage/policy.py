"""Scores to flags.

Batch mode flags the ``ceil(flag_rate * N)`` studies with the highest risk (N = studies
with at least one scored image), so the flag is relative to the batch: a batch of low
risks still flags its riskiest; a ``min_risk`` floor lets it flag none. Ties are broken
by study UID so the result never depends on input order. Stream mode flags risk >= the
bundle's calibrated threshold. A study's risk is the maximum over its scored images.
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


def check_min_risk(min_risk: float) -> float:
    """Return ``min_risk`` if it is in [0, 1], else raise ValueError saying so."""
    if not 0 <= min_risk <= 1:
        raise ValueError(f"min risk {min_risk!r} must be in [0, 1], e.g. 0.5 to flag no study whose risk is below 50%")
    return min_risk


def batch_policy(min_risk: float = 0.0) -> str:
    """The policy an audit record names for batch top-k: ``batch_top_k``, or ``batch_top_k min_risk=0.5`` with a
    floor."""
    return BATCH_TOP_K if min_risk == 0 else f"{BATCH_TOP_K} min_risk={min_risk!r}"


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


def flag_top_k(risks: Mapping[str, float], flag_rate: float = DEFAULT_FLAG_RATE, min_risk: float = 0.0) -> Flags:
    """Batch mode: of the ceil(flag_rate * N) riskiest of the N studies, flag those whose risk is >= ``min_risk``.

    With ``min_risk`` 0 (the default) exactly ceil(flag_rate * N) are flagged however low their risks. ``threshold``
    is the study risk a study needed: the k-th riskiest's, or ``min_risk`` when higher (then perhaps none reached it);
    None when there is no study.
    """
    check_min_risk(min_risk)
    top = rank_studies(risks)[:flag_count(flag_rate, len(risks))]
    threshold = max(risks[top[-1]], min_risk) if top else None
    chosen = frozenset(uid for uid in top if risks[uid] >= min_risk)
    return Flags(chosen, threshold, batch_policy(min_risk), flag_rate)


def flag_threshold(risks: Mapping[str, float], threshold: float, flag_rate: float = DEFAULT_FLAG_RATE) -> Flags:
    """Stream mode: flag every study whose risk is at least the calibrated threshold."""
    return Flags(frozenset(uid for uid, r in risks.items() if r >= threshold), threshold, STREAM_THRESHOLD, flag_rate)
