"""training.evaluate + training.report: metric functions on small synthetic data with known answers,
and the report end to end on the 12 demo DICOMs (tiny test bundle, the real bundle, a fake run folder)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("matplotlib", reason="the evaluation report needs the train extra (matplotlib)")
pytest.importorskip("sklearn", reason="the evaluation report needs the train extra (scikit-learn)")

from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from training.calibration import expected_calibration_error  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.metrics import (  # noqa: E402
    auroc, bce_per_image, bootstrap_ci, confusion_counts, cross_fitted_ece, metrics_at_flag_rate, metrics_at_threshold,
    rates, reliability_bins, roc_curve_points, subgroup_table, top_k_flags, top_losses)
from training.scoring import EvaluationError, source_kind  # noqa: E402
from training.sources import DataSource, labelled_split  # noqa: E402

from tests.tiny_bundle import build_tiny_bundle  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "kermany"
REAL_BUNDLE = REPO / "models" / "pneumonia-demo"


# --- metrics ---------------------------------------------------------------------------------


def test_auroc_of_a_perfect_ranking_is_one_and_of_a_reversed_one_zero():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert auroc(scores, labels) == 1.0
    assert auroc(-scores, labels) == 0.0
    assert auroc(np.ones(5), labels) == 0.5  # all tied
    assert math.isnan(auroc(scores, np.ones(5)))


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(labels + rng.normal(size=300), 1)  # rounding makes ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def _noisy_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return labels * 1.5 + rng.normal(size=n), labels


def test_bootstrap_ci_contains_the_point_estimate_and_narrows_with_more_data():
    widths = []
    for n in (100, 2000):
        scores, labels = _noisy_scores(n, 1)
        ci = bootstrap_ci(lambda i: auroc(scores[i], labels[i]), np.arange(n), n_boot=300, seed=0)
        assert ci["low"] <= auroc(scores, labels) <= ci["high"]
        assert ci["n_valid"] == 300
        widths.append(ci["high"] - ci["low"])
    assert widths[1] < widths[0] / 2  # about 1/sqrt(20) as wide


def test_bootstrap_ci_is_seeded_and_draws_whole_groups():
    scores, labels = _noisy_scores(60, 2)
    groups = np.repeat(np.arange(20), 3)  # 3 images per patient
    drawn: list[np.ndarray] = []

    def statistic(idx: np.ndarray) -> float:
        drawn.append(idx)
        return auroc(scores[idx], labels[idx])

    first = bootstrap_ci(statistic, groups, n_boot=50, seed=7)
    assert first == bootstrap_ci(lambda i: auroc(scores[i], labels[i]), groups, n_boot=50, seed=7)
    for idx in drawn:
        assert len(idx) == 60
        counts = np.bincount(groups[idx], minlength=20)
        assert np.all(counts % 3 == 0), "a patient's images were split by the resampling"


def test_metrics_at_a_5_percent_flag_rate_on_a_constructed_example():
    # 100 images, 20 positive; the 5 riskiest are 4 positives and 1 negative
    risks = np.linspace(1.0, 0.01, 100)
    labels = np.zeros(100)
    labels[[0, 1, 2, 4]] = 1
    labels[50:66] = 1
    m = metrics_at_flag_rate(risks, labels, 0.05)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (4, 1, 16, 79)
    assert m["ppv"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(0.2)
    assert m["npv"] == pytest.approx(79 / 95)
    assert m["flagged_fraction"] == pytest.approx(0.05)
    assert m["lowest_flagged_risk"] == pytest.approx(risks[4])


def test_top_k_flags_flags_ceil_of_the_rate_and_breaks_ties_by_index():
    assert top_k_flags(np.arange(21.0), 0.05).sum() == 2  # ceil(1.05)
    assert top_k_flags(np.arange(20.0), 0.05).sum() == 1  # 0.05 * 20 is exactly 1
    flagged = top_k_flags(np.ones(40), 0.05)
    assert flagged.tolist() == [True, True] + [False] * 38


def test_rates_and_threshold_metrics():
    counts = confusion_counts(np.array([1, 1, 0, 0, 0], bool), np.array([1, 0, 1, 0, 0]))
    assert counts == {"tp": 1, "fp": 1, "fn": 1, "tn": 2}
    r = rates(counts)
    assert (r["sensitivity"], r["specificity"], r["ppv"], r["npv"]) == (0.5, pytest.approx(2 / 3), 0.5, pytest.approx(2 / 3))
    m = metrics_at_threshold(np.array([0.9, 0.6, 0.4, 0.2]), np.array([1, 0, 1, 0]), 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["threshold"]) == (1, 1, 1, 1, 0.5)
    assert math.isnan(rates({"tp": 0, "fp": 0, "fn": 0, "tn": 3})["sensitivity"])


def test_bce_per_image_and_top_losses():
    logits, labels = np.array([3.0, -3.0, 0.0, 2.0]), np.array([1, 1, 0, 0])
    expected = -np.log(np.where(labels == 1, 1 / (1 + np.exp(-logits)), 1 - 1 / (1 + np.exp(-logits))))
    np.testing.assert_allclose(bce_per_image(logits, labels), expected, rtol=1e-12)
    assert top_losses(bce_per_image(logits, labels), 2).tolist() == [1, 3]
    assert np.isfinite(bce_per_image(np.array([1000.0, -1000.0]), np.array([0, 1]))).all()


def test_reliability_bins_add_up_to_the_ece():
    rng = np.random.default_rng(3)
    risks = rng.uniform(size=500)
    labels = (rng.uniform(size=500) < risks ** 1.5).astype(float)
    bins = reliability_bins(risks, labels, 15)
    assert sum(b["count"] for b in bins) == 500
    ece = sum(b["count"] / 500 * abs(b["mean_risk"] - b["observed"]) for b in bins if b["count"])
    assert ece == pytest.approx(expected_calibration_error(risks, labels, 15))


def test_roc_curve_points_match_sklearn_and_integrate_to_the_auroc():
    scores, labels = _noisy_scores(200, 4)
    scores = np.round(scores, 1)
    fpr, tpr = roc_curve_points(scores, labels)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, labels))


def test_cross_fitted_ece_is_small_for_scaled_logits_of_a_calibrated_model():
    rng = np.random.default_rng(5)
    true_logits = rng.normal(0, 3, 4000)
    labels = (rng.uniform(size=4000) < 1 / (1 + np.exp(-true_logits))).astype(float)
    assert cross_fitted_ece(2.0 * true_logits, labels, np.arange(4000) // 2) < 0.03  # overconfident by 2x, refitted
    assert expected_calibration_error(1 / (1 + np.exp(-2.0 * true_logits)), labels) > 0.05


def test_subgroup_table_gives_sensitivity_per_positive_subtype():
    risks = np.array([0.9, 0.8, 0.2, 0.5, 0.1, 0.6, 0.3])
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    subtypes = ["bacteria", "bacteria", "bacteria", "virus", "normal", "normal", "normal"]
    rows = {r["subgroup"]: r for r in subgroup_table(risks, labels, subtypes, {"half": risks >= 0.5})}
    assert rows["bacteria"]["flagged_half"] == pytest.approx(2 / 3)  # its sensitivity
    assert rows["virus"]["flagged_half"] == 1.0
    assert rows["normal"]["flagged_half"] == pytest.approx(1 / 3)  # its false-positive rate
    assert rows["virus"]["auroc_vs_other_class"] == pytest.approx(2 / 3)  # 0.5 beats 0.1 and 0.3, not 0.6
    assert rows["bacteria"]["n"] == 3 and rows["normal"]["n_positive"] == 0


def test_source_kind_names_the_fix(tmp_path):
    with pytest.raises(EvaluationError, match="Fix: pass a bundle folder"):
        source_kind(tmp_path)


# --- end to end on the 12 demo DICOMs ------------------------------------------------------------


def sample_labels(folder: Path, copies: int = 1) -> Path:
    """labels.csv for samples/kermany (label from ImageComments' /PNEUMONIA/ path); ``copies`` fake patients per file."""
    rows = []
    for path in sorted(SAMPLES.glob("*.dcm")):
        source = str(pydicom.dcmread(path, stop_before_pixels=True).ImageComments)
        subtype = "bacteria" if "bacteria" in source else "virus" if "virus" in source else "normal"
        for copy in range(copies):  # one row per image: a copy is a file of its own
            image = path if copies == 1 else folder / "images" / f"{path.stem}-{copy}.dcm"
            if image != path:
                image.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, image)
            rows.append({"path": str(image), "pneumonia": int("/PNEUMONIA/" in source), "subtype": subtype,
                         "patient_id": f"{path.stem}-{copy}", "md5": f"{path.stem}-{copy}"})
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def check_report(out: Path, n: int, heatmaps: bool = False) -> dict:
    """Every file is there, metrics.json is strict JSON, the HTML embeds its PNGs."""
    for name in ("index.html", "metrics.json", "roc.png", "reliability.png", "confusion.png", "top_losses.png"):
        assert (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert metrics["n"] == n
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert ("The model exports heatmaps" if heatmaps else "No heatmaps") in page
    with open(out / "predictions.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == n
    return metrics


def test_report_end_to_end_with_the_tiny_bundle(tmp_path):
    bundle = build_tiny_bundle(tmp_path / "bundle", threshold=0.6)
    metrics = evaluate(bundle, sample_labels(tmp_path / "data"), tmp_path / "report", split="all", n_boot=50, log=lambda _: None)
    metrics = check_report(tmp_path / "report", 12)
    assert metrics["split"]["name"] == "all" and metrics["n_positive"] == 6
    assert metrics["source"]["kind"] == "bundle" and metrics["source"]["has_heatmaps"] is False
    assert 0 <= metrics["auroc"]["value"] <= 1
    assert metrics["operating_threshold"]["threshold"] == 0.6
    assert metrics["flag_rate_5pct"]["tp"] + metrics["flag_rate_5pct"]["fp"] == 1  # ceil(0.05 * 12)
    assert {r["subgroup"] for r in metrics["subgroups"]} == {"subtype=normal", "subtype=bacteria", "subtype=virus"}
    assert list(metrics["by_source"]) == ["data"] and metrics["by_source"]["data"]["n"] == 12
    assert list(metrics["per_finding"]) == ["pneumonia"]
    assert len(metrics["top_losses"]) == 12 and metrics["top_losses"][0]["bce"] >= metrics["top_losses"][-1]["bce"]


def test_cli_evaluates_the_real_bundle_on_the_demo_dicoms(tmp_path, capsys):
    from deploy.cli import main

    out = tmp_path / "report"
    assert main(["evaluate", str(REAL_BUNDLE), str(sample_labels(tmp_path / "data")), "--out", str(out),
                 "--split", "all", "--bootstrap", "50"]) == 0
    metrics = check_report(out, 12, heatmaps=True)  # the bundled model has an in-graph CAM output
    assert metrics["auroc"]["value"] >= 0.9  # validation images of the bundled model
    manifest = json.loads((REAL_BUNDLE / "manifest.json").read_text())
    assert metrics["calibration"]["temperature"] == pytest.approx(manifest["calibration"]["temperature"]["pneumonia"])
    assert "AUROC" in capsys.readouterr().out


def test_cli_reports_a_missing_source_with_exit_code_2(tmp_path, capsys):
    from deploy.cli import main

    assert main(["evaluate", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "Fix:" in capsys.readouterr().err


def test_run_folder_uses_its_validation_predictions(tmp_path):
    data_dir = sample_labels(tmp_path / "data", copies=4)  # 48 rows, 48 one-image patients
    split = labelled_split([DataSource(str(data_dir))], ["pneumonia"], 0.2, 0, log=lambda _: None)
    val_idx = split.val_idx
    labels = split.y[val_idx]
    assert 0 < labels.sum() < len(labels), "the seeded split should hold both classes"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"seed": 0, "val_fraction": 0.2, "findings": ["pneumonia"],
                                                 "data": str(data_dir), "preprocessing": {"size": [64, 64]}}))
    logits = (labels * 4 - 2 + np.random.default_rng(0).normal(0, 1.5, labels.shape)).astype(np.float32)
    np.savez(run / "val_predictions.npz", logits=logits, labels=labels, rows=np.array(val_idx))
    metrics = evaluate(run, data_dir, tmp_path / "report", n_boot=50, log=lambda _: None)
    metrics = check_report(tmp_path / "report", len(val_idx))
    assert metrics["source"]["logits_from"] == "val_predictions.npz"
    assert metrics["split"]["name"] == "validation"
    assert metrics["auroc"]["value"] == pytest.approx(roc_auc_score(labels[:, 0], logits[:, 0]))


def test_run_folder_without_predictions_runs_its_checkpoint(tmp_path):
    torch = pytest.importorskip("torch", reason="running a checkpoint needs the train extra (torch, monai)")
    from training.model import build_model

    data_dir = sample_labels(tmp_path / "data", copies=4)
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    torch.save(build_model(1, in_channels=1, image_size=64, pretrained=False).state_dict(), run / "best.pt")
    (run / "metrics.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"seed": 0, "val_fraction": 0.2, "findings": ["pneumonia"], "size": 64,
                                                 "data": str(data_dir), "preprocessing": {"size": [64, 64]}}))
    metrics = evaluate(run, data_dir, tmp_path / "report", split="all", n_boot=20, log=lambda _: None)
    assert metrics["source"]["logits_from"] == "best.pt (PyTorch)"
    assert metrics["split"]["name"] == "all" and metrics["n"] == 48
    assert "INCLUDING any the model trained on" in (tmp_path / "report" / "index.html").read_text()
