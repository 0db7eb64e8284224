"""Stream-mode decisions: one study at a time, against a threshold that tracks the target flag rate.

Each site (calling AE title, or "inbox") keeps a rolling window of its last ``window``
study risks. Until it holds ``min_history`` studies the bundle's calibrated threshold
is used; then the threshold is the window's (1 - flag_rate) quantile, so a site whose
case mix or scanner shifts the risks still sees about ``flag_rate`` of its studies flagged.
The starvation guard promotes an unflagged study that nobody has reviewed within
``max_wait_s``, so no study waits forever behind the flagged ones.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from triage.policy import STREAM_THRESHOLD, Flags, check_flag_rate

STREAM_RECALIBRATED = "stream_recalibrated"
STARVATION_GUARD = "starvation_guard"


@dataclass
class SiteRecalibrator:
    """Per-site rolling thresholds. ``flags`` decides one study; ``learn`` adds its risk once the decision is recorded."""

    bundle_threshold: float
    flag_rate: float
    window: int = 200
    min_history: int = 20
    risks_: dict[str, deque] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_flag_rate(self.flag_rate)

    def threshold(self, site: str) -> tuple[float, str]:
        """(threshold in force for ``site``, policy name) from the risks seen so far."""
        history = self.risks_.get(site, ())
        if len(history) < self.min_history:
            return self.bundle_threshold, STREAM_THRESHOLD
        return float(np.quantile(np.fromiter(history, float), 1 - self.flag_rate, method="higher")), STREAM_RECALIBRATED

    def observe(self, site: str, risk: float) -> None:
        self.risks_.setdefault(site, deque(maxlen=self.window)).append(risk)

    def flags(self, site: str, study_uid: str, risk: float | None) -> Flags:
        """Flag ``study_uid`` when its risk reaches the site's threshold; learns nothing (see ``learn``)."""
        threshold, policy = self.threshold(site)
        flagged = risk is not None and math.isfinite(risk) and risk >= threshold
        return Flags(frozenset({study_uid}) if flagged else frozenset(), threshold, policy, self.flag_rate)

    def learn(self, site: str, risk: float | None) -> None:
        """Add a decided study's risk to the site's window (once its decision is recorded)."""
        if risk is not None and math.isfinite(risk):
            self.observe(site, risk)


@dataclass
class StarvationGuard:
    """Unflagged scored studies waiting for a reader; ``due`` names those waiting longer than ``max_wait_s``."""

    max_wait_s: float
    waiting_: dict[str, float] = field(default_factory=dict)  # study_uid -> decided at (epoch seconds)

    def track(self, study_uid: str, decided_at: float, flagged: bool) -> None:
        if flagged:
            self.waiting_.pop(study_uid, None)
        else:
            self.waiting_[study_uid] = decided_at

    def forget(self, study_uid: str) -> None:
        self.waiting_.pop(study_uid, None)

    def due(self, now: float) -> list[str]:
        """Studies waiting longer than ``max_wait_s``, oldest first (removed from tracking)."""
        late = sorted((t, uid) for uid, t in self.waiting_.items() if now - t > self.max_wait_s)
        for _, uid in late:
            del self.waiting_[uid]
        return [uid for _, uid in late]
