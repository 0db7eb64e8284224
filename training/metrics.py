"""Evaluation metrics: small pure functions, numpy arrays in, numbers or dicts out.

AUROC and the ROC curve are scikit-learn's; the rest (operating points in stream and batch
mode, the patient-group bootstrap, reliability bins, cross-fitted ECE, subgroup tables) are
short enough to read at once and test on synthetic data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from triage.policy import DEFAULT_FLAG_RATE, flag_count

from .calibration import TemperatureScaling, expected_calibration_error

FLAG_RATE = DEFAULT_FLAG_RATE
ECE_BINS = 15
GALLERY_SIZE = 16


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``; ties count 1/2); NaN unless both classes occur.

    scores (N,) float, labels (N,) 0/1.
    """
    scores, positive = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0.5
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, scores))


def roc_curve_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of every distinct threshold, from (0, 0) to (1, 1) (``sklearn.metrics.roc_curve``)."""
    positive = np.asarray(labels).ravel() > 0.5
    if positive.all() or not positive.any():
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    fpr, tpr, _ = roc_curve(positive, np.asarray(scores, np.float64).ravel(), drop_intermediate=False)
    return fpr, tpr


def confusion_counts(flagged: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    """tp, fp, fn, tn of boolean ``flagged`` (N,) against 0/1 ``labels`` (N,)."""
    flagged, positive = np.asarray(flagged, bool).ravel(), np.asarray(labels).ravel() > 0.5
    return {"tp": int((flagged & positive).sum()), "fp": int((flagged & ~positive).sum()),
            "fn": int((~flagged & positive).sum()), "tn": int((~flagged & ~positive).sum())}


def _ratio(a: int, b: int) -> float:
    """a / b, NaN when b is 0."""
    return float(a / b) if b else float("nan")


def rates(counts: dict[str, int]) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV and flagged fraction from ``confusion_counts``."""
    tp, fp, fn, tn = counts["tp"], counts["fp"], counts["fn"], counts["tn"]
    return {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp), "ppv": _ratio(tp, tp + fp),
            "npv": _ratio(tn, tn + fn), "flagged_fraction": _ratio(tp + fp, tp + fp + fn + tn)}


def metrics_at_threshold(risks: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """Counts and rates when every image with ``risk >= threshold`` is flagged (stream mode)."""
    counts = confusion_counts(np.asarray(risks).ravel() >= threshold, labels)
    return {"threshold": float(threshold), **counts, **rates(counts)}


def top_k_flags(risks: np.ndarray, flag_rate: float) -> np.ndarray:
    """Boolean (N,): exactly ``ceil(flag_rate * N)`` riskiest images flagged, ties by index (batch mode)."""
    risks = np.asarray(risks, np.float64).ravel()
    order = np.lexsort((np.arange(len(risks)), -risks))
    flagged = np.zeros(len(risks), bool)
    flagged[order[:flag_count(flag_rate, len(risks))]] = True
    return flagged


def metrics_at_flag_rate(risks: np.ndarray, labels: np.ndarray, flag_rate: float = FLAG_RATE) -> dict[str, Any]:
    """Counts and rates when the riskiest ``flag_rate`` of this set is flagged (``top_k_flags``)."""
    flagged = top_k_flags(risks, flag_rate)
    counts = confusion_counts(flagged, labels)
    lowest = float(np.asarray(risks, np.float64).ravel()[flagged].min()) if flagged.any() else float("nan")
    return {"flag_rate": float(flag_rate), "lowest_flagged_risk": lowest, **counts, **rates(counts)}


def bootstrap_ci(statistic: Callable[[np.ndarray], float], groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, Any]:
    """Percentile bootstrap CI of ``statistic(indices)``, resampling whole groups with replacement.

    ``groups`` (N,): a group id per image (patient groups here, so images of one patient
    are drawn together). Replicates where the statistic is NaN (e.g. one class only) are
    dropped and counted. Returns {"low", "high", "level", "n_boot", "n_valid", "resampled"}.
    """
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        chosen = rng.integers(0, len(members), len(members))
        value = statistic(np.concatenate([members[g] for g in chosen]))
        if math.isfinite(value):
            values.append(value)
    low, high = (np.quantile(values, [(1 - level) / 2, (1 + level) / 2]) if values else (float("nan"),) * 2)
    return {"low": float(low), "high": float(high), "level": level, "n_boot": n_boot, "n_valid": len(values),
            "resampled": f"{len(members)} groups (patients) with replacement"}


def bce_per_image(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) binary cross-entropy of each (calibrated) logit against its 0/1 label, numerically stable."""
    z, y = np.asarray(logits, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def top_losses(losses: np.ndarray, k: int = GALLERY_SIZE) -> np.ndarray:
    """Indices of the ``k`` highest losses, highest first (ties by index)."""
    losses = np.asarray(losses, np.float64).ravel()
    return np.lexsort((np.arange(len(losses)), -losses))[:k]


def reliability_bins(risks: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per equal-width risk bin (as in ``expected_calibration_error``): edges, count, mean risk, observed rate."""
    risks, labels = np.asarray(risks, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    bins = np.minimum((risks * n_bins).astype(int), n_bins - 1)
    rows = []
    for b in range(n_bins):
        inside = bins == b
        rows.append({"low": b / n_bins, "high": (b + 1) / n_bins, "count": int(inside.sum()),
                     "mean_risk": float(risks[inside].mean()) if inside.any() else float("nan"),
                     "observed": float(labels[inside].mean()) if inside.any() else float("nan")})
    return rows


def cross_fitted_ece(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int = 0,
                     n_bins: int = ECE_BINS) -> float:
    """ECE when the calibration (temperature and bias, as export fits it) is fitted on one half of the
    groups and applied to the other (2-fold).

    An honest companion to the in-sample ECE when the bundle's calibration was fitted on
    the same images. NaN when a fold lacks a class.
    """
    logits, labels = np.asarray(logits, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    unique = np.unique(np.asarray(groups))
    np.random.default_rng(seed).shuffle(unique)
    fold_a = np.isin(np.asarray(groups), unique[: len(unique) // 2])
    risks = np.empty_like(logits)
    for fit, apply in ((fold_a, ~fold_a), (~fold_a, fold_a)):
        if len(np.unique(labels[fit])) < 2 or not apply.any():
            return float("nan")
        scaler = TemperatureScaling(fit_bias=True).fit(logits[fit, None], labels[fit, None])
        risks[apply] = scaler.predict_proba(logits[apply, None])[:, 0]
    return expected_calibration_error(risks, labels, n_bins)


def subgroup_table(risks: np.ndarray, labels: np.ndarray, subgroups: Sequence[str],
                   flags: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per subgroup: n, positives, mean risk, AUROC against all negatives, flagged fraction per point.

    ``flags``: operating point name -> boolean (N,). For a positive-only subgroup (e.g.
    bacterial pneumonia) the flagged fraction is its sensitivity; for a negative-only one
    it is its false-positive rate (1 - specificity).
    """
    risks, labels, subgroups = np.asarray(risks, np.float64), np.asarray(labels) > 0.5, np.asarray(subgroups)
    rows = []
    for name in sorted(set(subgroups.tolist())):
        inside = subgroups == name
        versus = inside  # a mixed subgroup: its own AUROC
        if labels[inside].all():
            versus = inside | ~labels  # positives of this subgroup against every negative
        elif not labels[inside].any():
            versus = inside | labels  # negatives of this subgroup against every positive
        row = {"subgroup": str(name), "n": int(inside.sum()), "n_positive": int(labels[inside].sum()),
               "mean_risk": float(risks[inside].mean()), "auroc_vs_other_class": auroc(risks[versus], labels[versus])}
        row.update({f"flagged_{point}": float(flag[inside].mean()) for point, flag in flags.items()})
        rows.append(row)
    return rows

