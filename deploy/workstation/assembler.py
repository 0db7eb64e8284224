"""Study completion: a study is ready when no instance has arrived for ``quiet_period_s``."""

from __future__ import annotations

from dataclasses import dataclass, field


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
