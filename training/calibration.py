"""Calibration (temperature scaling, optionally with a bias: Platt scaling), the flag-rate
threshold and the metrics stored in a bundle.

Serving computes ``sigmoid(logit / T + b)`` (``triage.inference.calibrated_risk``); this
module fits ``T`` (and ``b``) and describes the resulting risks on the validation set.
A temperature alone rescales the logits but cannot move them: a model whose middle risks
are too high for the observed rate (the demo model, ECE 0.035 after T alone) needs the bias.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from sklearn.metrics import roc_auc_score

from triage.inference import calibrated_risk, sigmoid
from triage.policy import DEFAULT_FLAG_RATE


def binary_nll(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean (optionally ``weights``-weighted) binary cross-entropy of (N,) logits against (N,) 0/1 labels, stable."""
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    return float(np.average(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))), weights=weights))


class TemperatureScaling:
    """One temperature (and with ``fit_bias``, one bias) per finding, fitted by minimizing the validation NLL.

    ``fit(logits (N, F), labels (N, F))`` sets ``temperature_`` and ``bias_`` (F,) and returns self;
    ``predict_proba(logits)`` gives ``sigmoid(logits / temperature_ + bias_)`` (N, F) float64.
    Each step is kept only if it lowers the NLL (so the result never calibrates worse than the raw logits).
    """

    def __init__(self, log_t_bounds: tuple[float, float] = (-3.0, 3.0), fit_bias: bool = False) -> None:
        self.log_t_bounds = log_t_bounds
        self.fit_bias = fit_bias

    def fit(self, logits: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray | None = None) -> "TemperatureScaling":
        logits, labels = np.atleast_2d(np.asarray(logits, np.float64).T).T, np.atleast_2d(np.asarray(labels, np.float64).T).T
        w = sample_weight
        if logits.shape != labels.shape or len(logits) == 0:
            raise ValueError(f"TemperatureScaling.fit: logits {logits.shape} and labels {labels.shape} must be the same non-empty (N, F)")
        temps = []
        for f in range(logits.shape[1]):
            z, y = logits[:, f], labels[:, f]
            result = minimize_scalar(lambda log_t: binary_nll(z / np.exp(log_t), y, w), bounds=self.log_t_bounds,
                                     method="bounded", options={"xatol": 1e-6})
            temps.append(float(np.exp(result.x)) if binary_nll(z / np.exp(result.x), y, w) <= binary_nll(z, y, w) else 1.0)
        self.temperature_ = np.array(temps)
        self.bias_ = np.zeros(logits.shape[1])
        if self.fit_bias:
            for f in range(logits.shape[1]):
                self.temperature_[f], self.bias_[f] = fit_platt(logits[:, f], labels[:, f], self.temperature_[f],
                                                                self.log_t_bounds, w)
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        if not hasattr(self, "temperature_"):
            raise AttributeError("TemperatureScaling is not fitted yet. Fix: call fit(logits, labels) first")
        return calibrated_risk(np.atleast_2d(np.asarray(logits).T).T, self.temperature_, self.bias_)


def fit_platt(z: np.ndarray, y: np.ndarray, temperature: float, log_t_bounds: tuple[float, float],
              weights: np.ndarray | None = None) -> tuple[float, float]:
    """(T, b) minimizing the (weighted) NLL of ``sigmoid(z / T + b)``, started at (``temperature``, 0); that start
    when no better."""
    start = np.array([np.log(temperature), 0.0])
    nll = lambda p: binary_nll(z / np.exp(p[0]) + p[1], y, weights)  # noqa: E731
    result = minimize(nll, start, method="L-BFGS-B", bounds=[log_t_bounds, (-10.0, 10.0)])
    best = result.x if result.success and nll(result.x) < nll(start) else start
    return float(np.exp(best[0])), float(best[1])


def flag_threshold_for_rate(risks: np.ndarray, flag_rate: float, weights: np.ndarray | None = None) -> float:
    """The risk at the (1 - flag_rate) quantile: about ``flag_rate`` of ``risks`` are >= it. With ``weights``
    (N,), the weighted quantile: the riskiest images whose weights add up to ``flag_rate`` of the total."""
    if not 0 < flag_rate < 1:
        raise ValueError(f"flag_rate={flag_rate!r} must be in (0, 1), e.g. 0.05")
    risks = np.asarray(risks, np.float64)
    if weights is None:
        return float(np.quantile(risks, 1 - flag_rate, method="higher"))
    order = np.argsort(-risks, kind="stable")
    share = np.cumsum(np.asarray(weights, np.float64)[order]) / np.sum(weights)
    return float(risks[order][min(int(np.searchsorted(share, flag_rate)), len(risks) - 1)])


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE over ``n_bins`` equal-width bins of predicted probability (binary, positive class)."""
    probs, labels = np.asarray(probs, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(probs[in_bin].mean() - labels[in_bin].mean())
    return float(ece)


def operating_metrics(risks: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, PPV and flagged fraction for ``risk >= threshold``."""
    flagged, positive = np.asarray(risks).ravel() >= threshold, np.asarray(labels).ravel() > 0.5
    tp, fp = int((flagged & positive).sum()), int((flagged & ~positive).sum())
    fn, tn = int((~flagged & positive).sum()), int((~flagged & ~positive).sum())
    ratio = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731
    return {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp),
            "flagged_fraction": ratio(tp + fp, len(flagged))}


def risk_histogram(risks: np.ndarray, n_bins: int = 20) -> dict[str, list]:
    """Counts of risks in ``n_bins`` equal bins over [0, 1]: the drift monitor's reference."""
    counts, edges = np.histogram(np.clip(np.asarray(risks, np.float64).ravel(), 0, 1), bins=n_bins, range=(0.0, 1.0))
    return {"bin_edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def calibration_section(report: dict, findings: list[str], fitted_on: str) -> dict:
    """The manifest's ``calibration`` from a ``validation_report``: temperature and bias per finding."""
    return {"method": "platt" if any(report["biases"]) else "temperature",
            "temperature": dict(zip(findings, report["temperatures"])), "bias": dict(zip(findings, report["biases"])),
            "fitted_on": fitted_on}


def fit_per_finding(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Temperature and bias (F,) per finding, each fitted on the images whose label is known (NaN = unknown),
    optionally weighted (N,); T = 1, b = 0 for a finding without both classes."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    temps, biases = np.ones(logits.shape[1]), np.zeros(logits.shape[1])
    for j in range(logits.shape[1]):
        known = ~np.isnan(labels[:, j])
        if len(np.unique(labels[known, j])) == 2:
            scaler = TemperatureScaling(fit_bias=True).fit(logits[known, j:j + 1], labels[known, j:j + 1],
                                                           None if weights is None else weights[known])
            temps[j], biases[j] = scaler.temperature_[0], scaler.bias_[0]
    return temps, biases


def validation_report(logits: np.ndarray, labels: np.ndarray, flag_rate: float = DEFAULT_FLAG_RATE, column: int = 0,
                      weights: np.ndarray | None = None) -> dict:
    """Fit the calibration (temperature and bias) of every finding and compute the validation figures the manifest
    stores for the triage finding ``column`` (images with a known label for it), plus AUROC per finding.

    logits, labels: (N, F); labels NaN where unknown. ``weights`` (N,): how much each image counts in the fit and
    the flag-rate threshold (export: 1 / the size of its source, so every population counts the same).
    """
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    temps, biases = fit_per_finding(logits, labels, weights)
    known = ~np.isnan(labels[:, column])
    z, y = logits[known, column], labels[known, column]
    risks = calibrated_risk(z[:, None], temps[column:column + 1], biases[column:column + 1])[:, 0]
    threshold = flag_threshold_for_rate(risks, flag_rate, None if weights is None else weights[known])
    aurocs = [float(roc_auc_score(labels[k, j], logits[k, j])) if len(np.unique(labels[k, j])) == 2 else float("nan")
              for j in range(labels.shape[1]) for k in [~np.isnan(labels[:, j])]]
    return {
        "temperatures": [float(t) for t in temps], "biases": [float(b) for b in biases],
        "temperature": float(temps[column]), "bias": float(biases[column]),
        "threshold": threshold,
        "operating": operating_metrics(risks, y, threshold),
        "auroc": float(roc_auc_score(y, z)),
        "auroc_per_finding": aurocs,
        "n": int(len(y)),
        "n_positive": int(y.sum()),
        "nll_before": binary_nll(z, y),
        "nll_after": binary_nll(z / temps[column] + biases[column], y),
        "ece_before": expected_calibration_error(sigmoid(z), y),
        "ece_after": expected_calibration_error(risks, y),
        "risk_histogram": risk_histogram(risks),
    }


def source_report(risks: np.ndarray, labels: np.ndarray, threshold: float, flag_rate: float = DEFAULT_FLAG_RATE) -> dict:
    """One source's validation figures for the triage finding at the bundle's threshold: AUROC, ECE, mean risk,
    flagged fraction, sensitivity/PPV at the threshold, the source's own flag-rate threshold, risk histogram."""
    risks, labels = np.asarray(risks, np.float64), np.asarray(labels, np.float64)
    both = len(np.unique(labels)) == 2
    return {"n": int(len(labels)), "n_positive": int(labels.sum()), "auroc": float(roc_auc_score(labels, risks))
            if both else float("nan"), "ece": expected_calibration_error(risks, labels), "mean_risk": float(risks.mean()),
            "prevalence": float(labels.mean()), "at_threshold": operating_metrics(risks, labels, threshold),
            "own_threshold_at_flag_rate": flag_threshold_for_rate(risks, flag_rate), "risk_histogram": risk_histogram(risks)}
