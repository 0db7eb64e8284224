"""Evaluation that looks at the errors: ``cxr-triage evaluate RUN_OR_BUNDLE DATA... --out DIR``.

Scores labelled data folders (site format: ``labels.csv`` + images, ``training.datasets.read_site``)
with a bundle (ONNX Runtime through ``triage.pipeline.prepare``, no torch) or a training run
(its ``val_predictions.npz``, else its checkpoint). For a folder that is one of the model's
training sources only its validation patients are scored; any other folder (an external
site) is scored whole (``training.scoring.select_images``). Writes ``metrics.json`` (the
triage finding in full, AUROC with CI per finding, a table per source), ``predictions.csv``,
PNG plots and one self-contained ``index.html`` (``training.report``).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triage.inference import sigmoid

from .calibration import binary_nll, expected_calibration_error
from .datasets import age_band
from .metrics import (
    ECE_BINS, FLAG_RATE, GALLERY_SIZE, auroc, bce_per_image, bootstrap_ci, confusion_counts, cross_fitted_ece,
    metrics_at_flag_rate, metrics_at_threshold, rates, reliability_bins, roc_curve_points, subgroup_table, top_k_flags,
    top_losses)
from .scoring import EvalSet, EvaluationError, Scores, score_bundle, score_run, select_images, source_kind, training_record


def binary_report(y: np.ndarray, z: np.ndarray, calibrated: np.ndarray, threshold: float, groups: np.ndarray,
                  n_boot: int, seed: int) -> dict[str, Any]:
    """Discrimination, operating points and calibration of one finding: labels ``y`` (N,) 0/1, raw logits ``z``,
    calibrated logits, the bundle threshold (risk) and patient groups (N,) for the bootstrap."""
    risks = sigmoid(calibrated)

    def ci_of(statistic: Callable[[np.ndarray], float]) -> dict[str, Any]:
        return bootstrap_ci(statistic, groups, n_boot, seed)

    def at_threshold(key: str) -> Callable[[np.ndarray], float]:
        return lambda i: rates(confusion_counts(risks[i] >= threshold, y[i]))[key]

    def at_rate(key: str) -> Callable[[np.ndarray], float]:
        return lambda i: metrics_at_flag_rate(risks[i], y[i], FLAG_RATE)[key]

    return {
        "n": int(len(y)), "n_positive": int(y.sum()), "prevalence": float(y.mean()) if len(y) else float("nan"),
        "auroc": {"value": auroc(z, y), "ci95": ci_of(lambda i: auroc(z[i], y[i]))},
        "operating_threshold": {**metrics_at_threshold(risks, y, threshold),
                                "sensitivity_ci95": ci_of(at_threshold("sensitivity")),
                                "specificity_ci95": ci_of(at_threshold("specificity"))},
        "flag_rate_5pct": {**metrics_at_flag_rate(risks, y, FLAG_RATE), "ppv_ci95": ci_of(at_rate("ppv")),
                           "sensitivity_ci95": ci_of(at_rate("sensitivity"))},
        "risk_0.5": metrics_at_threshold(risks, y, 0.5),
        "calibration": {
            "n_bins": ECE_BINS, "ece_calibrated": expected_calibration_error(risks, y, ECE_BINS),
            "ece_uncalibrated": expected_calibration_error(sigmoid(z), y, ECE_BINS),
            "ece_cross_fitted": cross_fitted_ece(z, y, groups, seed),
            "nll_calibrated": binary_nll(calibrated, y), "nll_uncalibrated": binary_nll(z, y),
            "brier_calibrated": float(np.mean((risks - y) ** 2)), "mean_risk": float(risks.mean()) if len(y) else
            float("nan"), "reliability": reliability_bins(risks, y, ECE_BINS)},
    }


def subgroup_labels(images: EvalSet) -> list[tuple[str, list[str]]]:
    """(dimension, one label per image) for each dimension with more than one value: source, subtype, sex, age, view."""
    records = images.records
    dimensions = [("source", [r.dataset for r in records]),
                  ("subtype", [str(r.extra.get("subtype") or "unknown") for r in records]),
                  ("sex", [r.sex or "unknown" for r in records]),
                  ("age", [age_band(r.age) for r in records]),
                  ("view", [r.view or "unknown" for r in records])]
    return [(name, labels) for name, labels in dimensions if len(set(labels)) > 1 or
            (name == "subtype" and labels and labels[0] != "unknown")]


def compute_metrics(images: EvalSet, scores: Scores, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every figure of the report, as a JSON-ready dict (no plotting): the triage finding in full (images with a
    known label for it), AUROC with CI and ECE per finding, and per source."""
    finding = scores.triage_finding
    column = scores.column(finding)
    known = ~np.isnan(images.column(finding))
    main, sub = images.subset(known), scores.subset(known)
    y, z, calibrated = main.column(finding), sub.logits[:, column], sub.calibrated_logits[:, column]
    risks = sigmoid(calibrated)
    report = {"finding": finding, **binary_report(y, z, calibrated, scores.threshold, main.groups, n_boot, seed)}
    report["calibration"].update(temperature=float(scores.temperatures[column]), bias=float(scores.biases[column]))
    flags = {"operating_threshold": risks >= scores.threshold, "flag_rate_5pct": top_k_flags(risks, FLAG_RATE),
             "risk_0.5": risks >= 0.5}
    report["subgroups"] = [{**row, "subgroup": f"{name}={row['subgroup']}"} for name, labels in subgroup_labels(main)
                           for row in subgroup_table(risks, y, labels, flags)]
    losses = bce_per_image(calibrated, y)
    report["top_losses"] = [{"path": main.paths[i], "label": int(y[i]), "source": main.records[i].dataset,
                             "subtype": str(main.records[i].extra.get("subtype") or main.records[i].dataset),
                             "risk": float(risks[i]), "bce": float(losses[i])} for i in top_losses(losses, GALLERY_SIZE)]
    report["per_finding"] = per_finding(images, scores, n_boot, seed)
    names = main.sources
    report["by_source"] = {name: binary_report(y[names == name], z[names == name], calibrated[names == name],
                                               scores.threshold, main.groups[names == name], n_boot, seed)
                           for name in dict.fromkeys(names.tolist())}
    return report


def per_finding(images: EvalSet, scores: Scores, n_boot: int, seed: int) -> dict[str, Any]:
    """{finding: n, positives, AUROC with its patient-bootstrap CI, calibrated ECE} over the images labelled for it."""
    out = {}
    for j, finding in enumerate(scores.findings):
        labels = images.column(finding) if finding in images.findings else np.full(len(images.records), np.nan)
        known = ~np.isnan(labels)
        y, z = labels[known], scores.logits[known, j]
        risks = sigmoid(scores.calibrated_logits[known, j])
        groups = images.groups[known]
        out[finding] = {"n": int(known.sum()), "n_positive": int(np.nansum(y)),
                        "auroc": {"value": auroc(z, y), "ci95": bootstrap_ci(lambda i: auroc(z[i], y[i]), groups,
                                                                             n_boot, seed)},
                        "ece_calibrated": expected_calibration_error(risks, y, ECE_BINS) if known.any() else float("nan")}
    return out


def write_predictions(path: Path, images: EvalSet, scores: Scores) -> Path:
    """One CSV row per scored image: path, source, patient group, then label, logit and calibrated risk per finding."""
    risks = scores.risks
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "source", "patient_group"] + [f"{k}_{f}" for f in scores.findings
                                                               for k in ("label", "logit", "risk")])
        for i, record in enumerate(images.records):
            cells = []
            for j, finding in enumerate(scores.findings):
                label = images.column(finding)[i] if finding in images.findings else np.nan
                cells += ["" if np.isnan(label) else int(label), f"{scores.logits[i, j]:.6g}", f"{risks[i, j]:.6g}"]
            writer.writerow([record.path, record.dataset, images.groups[i], *cells])
    return path


def evaluate(source: str | Path, data: str | Path | Sequence[str | Path], out_dir: str | Path,
             split: str = "validation", n_boot: int = 1000, seed: int = 0, device: str = "cpu",
             dataset: str = "site", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score the data folders with a bundle or run, compute the metrics and write the report into ``out_dir``.

    Returns the dict also written to ``out_dir/metrics.json``.
    """
    from .report import write_report  # matplotlib only here

    folders = [data] if isinstance(data, (str, Path)) else list(data)
    kind = source_kind(source)
    images = select_images(folders, split, training_record(source), dataset, log)
    if not images.paths:
        raise EvaluationError(f"{', '.join(map(str, folders))}: the {split} split is empty. "
                              "Fix: pass a data folder with labels.csv rows")
    for part in images.split["sources"]:
        if part["matches_training_record"] is False:
            log(f"warning: {part['name']}: {part['n_images']} validation images here, another count was recorded at "
                "training: a different labels.csv, so some images may have been seen in training")
    scores, ok = score_bundle(source, images, device=device, log=log) if kind == "bundle" else score_run(source, images, log)
    images = images.subset(ok)
    labels = images.column(scores.triage_finding)
    if len(np.unique(labels[~np.isnan(labels)])) < 2:
        raise EvaluationError(f"{', '.join(map(str, folders))}: the {split} split has only one class of "
                              f"{scores.triage_finding} among its scorable images; AUROC and sensitivity/specificity "
                              "need both. Fix: use a larger data folder or --split all")
    metrics = {"source": scores.source, "data": ", ".join(map(str, folders)), "split": images.split,
               "bootstrap": {"n_boot": n_boot, "seed": seed, "resampling": "patient groups (patients linked by a "
                             "shared image md5), with replacement; percentile 95% interval"},
               "unscorable": scores.unscorable, **compute_metrics(images, scores, n_boot, seed)}
    column, known = scores.column(scores.triage_finding), ~np.isnan(labels)
    write_report(Path(out_dir), metrics, scores.spec, roc_curve_points(scores.logits[known, column], labels[known]))
    write_predictions(Path(out_dir) / "predictions.csv", images, scores)
    log(f"report -> {Path(out_dir) / 'index.html'}")
    return metrics
