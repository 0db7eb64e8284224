"""Evaluation that looks at the errors: ``cxr-triage evaluate RUN_OR_BUNDLE DATA --out DIR``.

Scores a labelled data folder (``labels.csv``, see ``training.data``) with a bundle
(ONNX Runtime through ``triage.pipeline.prepare`` and ``triage.inference.Model``, no
torch) or a training run (its ``val_predictions.npz``, else its checkpoint), on the same
patient-level split as training, and writes ``metrics.json``, ``predictions.csv`` (one
row per image), PNG plots and one self-contained ``index.html`` (``training.report``).

The metric functions below are small and pure (numpy arrays in, numbers or dicts out);
plotting and HTML live in ``training.report``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from triage.errors import TriageError
from triage.inference import sigmoid
from triage.policy import flag_count
from triage.preprocess import PreprocessSpec

from . import data
from .calibration import TemperatureScaling, binary_nll, expected_calibration_error, flag_threshold_for_rate

FLAG_RATE = 0.05
ECE_BINS = 15
GALLERY_SIZE = 16
SPLITS = ("validation", "all")


class EvaluationError(TriageError, ValueError):
    """The source or data cannot be evaluated; the message says how to fix it."""


# --- metrics: pure functions on (N,) arrays ---------------------------------------------------


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count 1/2); NaN unless both classes occur.

    scores (N,) float, labels (N,) 0/1. Equals ``sklearn.metrics.roc_auc_score``.
    """
    scores, positive = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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


def roc_curve_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of every distinct threshold, from (0, 0) to (1, 1); both (M,) float64."""
    scores, positive = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0.5
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.diff(scores) != 0, True]
    tps, fps = np.cumsum(positive)[last_of_tie], np.cumsum(~positive)[last_of_tie]
    n_pos, n_neg = max(int(positive.sum()), 1), max(int((~positive).sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


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


# --- the evaluation set -------------------------------------------------------------------------


@dataclass
class EvalSet:
    """The images to evaluate: absolute paths and, per image, label, subtype and patient group."""

    paths: list[str]
    labels: np.ndarray
    subtypes: list[str]
    groups: np.ndarray
    rows: np.ndarray
    split: dict[str, Any] = field(default_factory=dict)

    def subset(self, keep: np.ndarray) -> "EvalSet":
        """Only the images where boolean ``keep`` (N,) is true."""
        idx = np.flatnonzero(keep)
        return EvalSet([self.paths[i] for i in idx], self.labels[idx], [self.subtypes[i] for i in idx],
                       self.groups[idx], self.rows[idx], self.split)


def select_images(data_dir: str | Path, split: str, seed: int, val_fraction: float) -> EvalSet:
    """Read ``labels.csv`` and pick the rows of ``split`` ("validation": the training split's held-out patients)."""
    if split not in SPLITS:
        raise EvaluationError(f"split {split!r} is not one of {SPLITS}")
    examples = data.read_labels(data_dir)
    train_idx, val_idx = data.split_patients(examples, val_fraction, seed)
    data.assert_no_leakage(examples, train_idx, val_idx)
    rows = val_idx if split == "validation" else list(range(len(examples)))
    root_of = {i: root for root, members in data.patient_groups(examples).items() for i in members}
    description = (f"validation: patient-level split, seed {seed}, {val_fraction:.0%} of patient groups (the images the "
                   "model never trained on), rebuilt exactly as training.data.split_patients does; leakage checked: none"
                   if split == "validation" else
                   "all: every image of the data folder, INCLUDING the images the model trained on (optimistic)")
    return EvalSet([str(Path(data_dir) / examples[i].path) for i in rows],
                   np.array([examples[i].pneumonia for i in rows], np.float64),
                   [examples[i].subtype for i in rows], np.array([root_of[i] for i in rows]), np.array(rows, np.int64),
                   {"name": split, "description": description, "seed": seed, "val_fraction": val_fraction,
                    **data.split_summary(examples, rows)})


# --- sources: a bundle (ONNX Runtime) or a training run --------------------------------------------


@dataclass
class Scores:
    """What a model said about an ``EvalSet``: raw logits, the calibration and operating threshold used."""

    logits: np.ndarray
    temperature: float
    threshold: float
    spec: PreprocessSpec
    source: dict[str, Any]
    unscorable: list[dict[str, str]] = field(default_factory=list)
    bias: float = 0.0

    @property
    def calibrated_logits(self) -> np.ndarray:
        """logit / temperature + bias (N,) float64: the served risk is its sigmoid."""
        return self.logits.astype(np.float64) / self.temperature + self.bias

    @property
    def risks(self) -> np.ndarray:
        """Calibrated risks (N,) float64: sigmoid(logit / temperature + bias), as served."""
        return sigmoid(self.calibrated_logits)


def source_kind(path: str | Path) -> str:
    """"bundle" (has manifest.json) or "run" (has config.json); raises ``EvaluationError`` otherwise."""
    folder = Path(path)
    if (folder / "manifest.json").is_file():
        return "bundle"
    if (folder / "config.json").is_file():
        return "run"
    raise EvaluationError(f"{folder}: neither a bundle (manifest.json) nor a training run (config.json). "
                          "Fix: pass a bundle folder such as models/pneumonia-demo or a run folder written by 'train'")


def split_settings(path: str | Path) -> tuple[int, float, dict[str, Any]]:
    """(seed, val_fraction, expected split summary) recorded by the bundle or run that made the model."""
    folder = Path(path)
    if source_kind(folder) == "bundle":
        training = json.loads((folder / "manifest.json").read_text()).get("training", {})
        return int(training.get("seed", 0)), float(training.get("val_fraction", 0.2)), training.get("split", {})
    config = json.loads((folder / "config.json").read_text())
    return int(config.get("seed", 0)), float(config.get("val_fraction", 0.2)), config.get("split", {})


def score_bundle(path: str | Path, images: EvalSet, batch_size: int = 32, device: str = "cpu",
                 log: Callable[[str], None] = print) -> tuple[Scores, np.ndarray]:
    """Score with ONNX Runtime through triage (``prepare`` + ``Model.logits``).

    Returns the scores of the scorable images and the boolean (N,) mask of which ones
    were scorable; the others are listed in ``Scores.unscorable`` with triage's reason.
    """
    from triage.bundle import load_bundle
    from triage.inference import load_model
    from triage.pipeline import prepare

    bundle = load_bundle(path)
    model = load_model(bundle, device=device)
    column = bundle.findings.index(bundle.triage_finding)
    logits, ok, unscorable = [], np.zeros(len(images.paths), bool), []
    start = time.perf_counter()
    for first in range(0, len(images.paths), batch_size):
        prepared = [prepare(p, bundle.preprocessing, bundle.reduced_decode)
                    for p in images.paths[first:first + batch_size]]
        for offset, item in enumerate(prepared):
            ok[first + offset] = item.model_input is not None
            if item.model_input is None:
                unscorable.append({"path": item.path, "reason": item.reason, "detail": item.detail})
        scorable = [p.model_input for p in prepared if p.model_input is not None]
        if scorable:
            logits.append(model.logits(np.stack(scorable))[:, column].astype(np.float64))
    seconds = time.perf_counter() - start
    log(f"scored {int(ok.sum())} images with {bundle.name} {bundle.version} ({model.provider}) in {seconds:.1f} s")
    source = {"kind": "bundle", "path": str(path), "name": bundle.name, "version": bundle.version,
              "sha256": bundle.sha256, "provider": model.provider, "scoring_seconds": round(seconds, 1),
              "calibration_fitted_on": bundle.manifest["calibration"].get("fitted_on", "unknown"),
              "threshold_flag_rate": bundle.flag_rate, "has_heatmaps": "cam" in bundle.manifest["model"]["outputs"]}
    scores = Scores(np.concatenate(logits) if logits else np.zeros(0), bundle.temperature(bundle.triage_finding),
                    bundle.threshold, bundle.preprocessing, source, unscorable, bundle.bias(bundle.triage_finding))
    return scores, ok


def run_logits(path: str | Path, data_dir: str | Path, images: EvalSet) -> tuple[np.ndarray, str]:
    """A run's logits (N,) for ``images``: its ``val_predictions.npz`` when the rows match, else its checkpoint (torch)."""
    predictions = Path(path) / "val_predictions.npz"
    if predictions.is_file():
        saved = np.load(predictions)
        if np.array_equal(saved["rows"], images.rows):
            return saved["logits"][:, 0].astype(np.float64), "val_predictions.npz"
    from .export import load_run  # torch, only when the checkpoint must be run
    from .train import predict_logits

    config, _, net = load_run(path)
    examples = data.read_labels(data_dir)
    x = data.load_images(data_dir, [examples[i] for i in images.rows], PreprocessSpec.from_dict(config["preprocessing"]))
    return predict_logits(net, x)[:, 0].astype(np.float64), "best.pt (PyTorch)"


def score_run(path: str | Path, data_dir: str | Path, images: EvalSet,
              log: Callable[[str], None] = print) -> tuple[Scores, np.ndarray]:
    """Score with a training run. Temperature and 5% threshold are fitted as export does, on its validation logits."""
    config = json.loads((Path(path) / "config.json").read_text())
    start = time.perf_counter()
    logits, how = run_logits(path, data_dir, images)
    validation = images if images.split.get("name") == "validation" else select_images(
        data_dir, "validation", int(config.get("seed", 0)), float(config.get("val_fraction", 0.2)))
    val_logits = logits if validation is images else run_logits(path, data_dir, validation)[0]
    scaler = TemperatureScaling(fit_bias=True).fit(val_logits[:, None], validation.labels[:, None])
    temperature, bias = float(scaler.temperature_[0]), float(scaler.bias_[0])
    threshold = flag_threshold_for_rate(scaler.predict_proba(val_logits[:, None])[:, 0], FLAG_RATE)
    log(f"run {path}: logits from {how} in {time.perf_counter() - start:.1f} s")
    source = {"kind": "run", "path": str(path), "name": Path(path).name, "logits_from": how,
              "calibration_fitted_on": "validation (fitted here, as export would)", "threshold_flag_rate": FLAG_RATE,
              "has_heatmaps": False}
    scores = Scores(logits, temperature, threshold, PreprocessSpec.from_dict(config["preprocessing"]), source, bias=bias)
    return scores, np.ones(len(images.paths), bool)


# --- putting it together ---------------------------------------------------------------------------


def compute_metrics(images: EvalSet, scores: Scores, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every figure of the report, as a JSON-ready dict (no plotting)."""
    y, z, risks = images.labels, scores.logits, scores.risks
    operating = metrics_at_threshold(risks, y, scores.threshold)
    top_rate = metrics_at_flag_rate(risks, y, FLAG_RATE)
    at_half = metrics_at_threshold(risks, y, 0.5)

    def ci_of(statistic: Callable[[np.ndarray], float]) -> dict[str, Any]:
        return bootstrap_ci(statistic, images.groups, n_boot, seed)

    def at_threshold(key: str) -> Callable[[np.ndarray], float]:
        return lambda i: rates(confusion_counts(risks[i] >= scores.threshold, y[i]))[key]

    def at_rate(key: str) -> Callable[[np.ndarray], float]:
        return lambda i: metrics_at_flag_rate(risks[i], y[i], FLAG_RATE)[key]

    point = auroc(z, y)
    losses = bce_per_image(scores.calibrated_logits, y)
    flags = {"operating_threshold": risks >= scores.threshold, "flag_rate_5pct": top_k_flags(risks, FLAG_RATE),
             "risk_0.5": risks >= 0.5}
    return {
        "n": int(len(y)), "n_positive": int(y.sum()), "prevalence": float(y.mean()) if len(y) else float("nan"),
        "auroc": {"value": point, "ci95": ci_of(lambda i: auroc(z[i], y[i]))},
        "operating_threshold": {**operating, "sensitivity_ci95": ci_of(at_threshold("sensitivity")),
                                "specificity_ci95": ci_of(at_threshold("specificity"))},
        "flag_rate_5pct": {**top_rate, "ppv_ci95": ci_of(at_rate("ppv")), "sensitivity_ci95": ci_of(at_rate("sensitivity"))},
        "risk_0.5": at_half,
        "calibration": {
            "temperature": scores.temperature, "bias": scores.bias, "n_bins": ECE_BINS,
            "ece_calibrated": expected_calibration_error(risks, y, ECE_BINS),
            "ece_uncalibrated": expected_calibration_error(sigmoid(z), y, ECE_BINS),
            "ece_cross_fitted": cross_fitted_ece(z, y, images.groups, seed),
            "nll_calibrated": binary_nll(scores.calibrated_logits, y), "nll_uncalibrated": binary_nll(z, y),
            "brier_calibrated": float(np.mean((risks - y) ** 2)),
            "reliability": reliability_bins(risks, y, ECE_BINS),
        },
        "subgroups": subgroup_table(risks, y, images.subtypes, flags),
        "top_losses": [{"path": images.paths[i], "label": int(y[i]), "subtype": images.subtypes[i],
                        "risk": float(risks[i]), "bce": float(losses[i])} for i in top_losses(losses, GALLERY_SIZE)],
    }


def write_predictions(path: Path, images: EvalSet, scores: Scores) -> Path:
    """One CSV row per scored image: path, label, subtype, patient group, logit, calibrated risk, BCE."""
    losses = bce_per_image(scores.calibrated_logits, images.labels)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subtype", "patient_group", "logit", "risk", "bce"])
        for i, image_path in enumerate(images.paths):
            writer.writerow([image_path, int(images.labels[i]), images.subtypes[i], images.groups[i],
                             f"{scores.logits[i]:.6g}", f"{scores.risks[i]:.6g}", f"{losses[i]:.6g}"])
    return path


def evaluate(source: str | Path, data_dir: str | Path, out_dir: str | Path, split: str = "validation",
             n_boot: int = 1000, seed: int = 0, device: str = "cpu", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score ``data_dir`` with a bundle or run, compute the metrics and write the report into ``out_dir``.

    Returns the dict also written to ``out_dir/metrics.json``.
    """
    from .report import write_report  # matplotlib only here

    kind = source_kind(source)
    split_seed, val_fraction, expected = split_settings(source)
    images = select_images(data_dir, split, split_seed, val_fraction)
    if not images.paths:
        raise EvaluationError(f"{data_dir}: the {split} split is empty. Fix: pass a data folder with labels.csv rows")
    expected_n = expected.get(split, {}).get("n_images") if split == "validation" else None
    images.split["matches_training_record"] = None if expected_n is None else expected_n == len(images.paths)
    if images.split["matches_training_record"] is False:
        log(f"warning: {len(images.paths)} validation images here, {expected_n} recorded at training: "
            "a different data folder or labels.csv, so some images may have been seen in training")
    if kind == "bundle":
        scores, ok = score_bundle(source, images, device=device, log=log)
    else:
        scores, ok = score_run(source, data_dir, images, log=log)
    images = images.subset(ok)
    if len(np.unique(images.labels)) < 2:
        raise EvaluationError(f"{data_dir}: the {split} split has only one class among its scorable images; "
                              "AUROC and sensitivity/specificity need both. Fix: use a larger data folder or --split all")
    metrics = {"source": scores.source, "data": str(data_dir), "split": images.split,
               "bootstrap": {"n_boot": n_boot, "seed": seed, "resampling": "patient groups (patients linked by a "
                             "shared image md5), with replacement; percentile 95% interval"},
               "unscorable": scores.unscorable, **compute_metrics(images, scores, n_boot, seed)}
    write_report(Path(out_dir), metrics, scores.spec, roc_curve_points(scores.logits, images.labels))
    write_predictions(Path(out_dir) / "predictions.csv", images, scores)
    log(f"report -> {Path(out_dir) / 'index.html'}")
    return metrics
