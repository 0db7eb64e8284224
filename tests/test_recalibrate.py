"""Calibration with a bias (Platt scaling) at serving and training, and ``cxr-triage calibrate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deploy.paths import DEMO_BUNDLE, SAMPLES
from tests.test_evaluate import sample_labels
from tests.tiny_bundle import build_tiny_bundle
from training.calibration import TemperatureScaling, binary_nll, expected_calibration_error
from training.scoring import EvaluationError
from training.recalibrate import next_version, recalibrate_bundle
from triage.bundle import load_bundle, write_manifest
from triage.errors import BundleError
from triage.inference import calibrated_risk, load_model
from triage.pipeline import prepare, score_prepared


def shifted_logits(n: int = 6000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits 2 z + 1.5 of a model whose true log-odds are z: over-confident and shifted."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return 2.0 * z + 1.5, labels


def test_the_bias_term_recovers_a_shift_that_a_temperature_cannot():
    logits, labels = shifted_logits()
    platt = TemperatureScaling(fit_bias=True).fit(logits[:, None], labels[:, None])
    temperature_only = TemperatureScaling().fit(logits[:, None], labels[:, None])
    assert platt.temperature_[0] == pytest.approx(2.0, rel=0.1)
    assert platt.bias_[0] == pytest.approx(-0.75, abs=0.15)
    assert temperature_only.bias_[0] == 0.0
    ece = {name: expected_calibration_error(s.predict_proba(logits[:, None])[:, 0], labels)
           for name, s in (("platt", platt), ("temperature", temperature_only))}
    assert ece["platt"] < 0.02 < ece["temperature"]
    assert binary_nll(logits / platt.temperature_[0] + platt.bias_[0], labels) < binary_nll(
        logits / temperature_only.temperature_[0], labels)


def test_calibrated_risk_applies_temperature_then_bias():
    logits = np.array([[0.0], [2.0]])
    risk = calibrated_risk(logits, np.array([2.0]), np.array([-1.0]))
    np.testing.assert_allclose(risk[:, 0], 1 / (1 + np.exp(-np.array([-1.0, 0.0]))))
    np.testing.assert_array_equal(calibrated_risk(logits, np.array([2.0])), calibrated_risk(logits, np.array([2.0]), None))


def test_a_bundle_without_a_bias_serves_temperature_scaling(tmp_path):
    bundle = load_bundle(build_tiny_bundle(tmp_path / "tiny", temperature=2.0))
    assert bundle.bias("pneumonia") == 0.0
    assert load_model(bundle, "cpu").biases.tolist() == [0.0]


def test_a_non_finite_bias_is_refused(tmp_path):
    folder = build_tiny_bundle(tmp_path / "tiny")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["calibration"]["bias"] = {"pneumonia": float("nan")}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="calibration.bias"):
        load_bundle(folder)


def test_the_served_risk_is_the_manifest_calibration_of_the_logit():
    model = load_model(load_bundle(DEMO_BUNDLE), "cpu")
    path = str(SAMPLES / "kermany" / "kermany-01.dcm")
    prepared = prepare(path, model.bundle.preprocessing, model.bundle.reduced_decode)
    logit = float(model.logits(prepared.model_input[None])[0, 0])
    calibration = model.bundle.manifest["calibration"]
    expected = 1 / (1 + np.exp(-(logit / calibration["temperature"]["pneumonia"] + calibration["bias"]["pneumonia"])))
    assert score_prepared(model, [prepared], lambda _: "")[0].risk == pytest.approx(expected, abs=1e-9)


def test_the_bundled_model_meets_the_calibration_target():
    validation = load_bundle(DEMO_BUNDLE).manifest["metrics"]["validation"]
    assert validation["ece_after"] <= 0.03 < validation["ece_before"]


def test_next_version():
    assert next_version("0.2.0") == "0.2.1" and next_version("1.9") == "1.10" and next_version("dev") == "dev.1"


def with_bias(folder: Path, bias: float) -> Path:
    """The tiny bundle with a calibration bias (so recalibration has something to change)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["calibration"]["bias"] = {"pneumonia": bias}
    for key in ("files", "schema_version"):
        manifest.pop(key)
    write_manifest(folder, manifest)
    return folder


def test_calibrate_writes_a_new_verified_bundle_whose_risks_follow_the_new_fit(tmp_path):
    source = with_bias(build_tiny_bundle(tmp_path / "tiny", threshold=0.9), 3.0)
    data = sample_labels(tmp_path / "data", copies=2)
    out = tmp_path / "recalibrated"
    manifest = recalibrate_bundle(source, data, out, split="all", log=lambda _: None)
    new, old = load_bundle(out), load_bundle(source)
    assert new.version == "0.0.2" and manifest["recalibrated"]["from"]["sha256"] == old.sha256
    assert (out / "model.onnx").read_bytes() == (source / "model.onnx").read_bytes()
    assert new.bias("pneumonia") != 3.0 and new.threshold != 0.9
    assert manifest["metrics"]["validation"]["n"] == 24
    assert "## Recalibration" in (out / "MODEL_CARD.md").read_text()
    model = load_model(new, "cpu")
    path = str(sorted((SAMPLES / "kermany").glob("*.dcm"))[0])
    prepared = prepare(path, new.preprocessing)
    logit = float(model.logits(prepared.model_input[None])[0, 0])
    risk = score_prepared(model, [prepared], lambda _: "")[0].risk
    assert risk == pytest.approx(1 / (1 + np.exp(-(logit / new.temperature("pneumonia") + new.bias("pneumonia")))))
    assert load_bundle(source).sha256 == old.sha256  # the source bundle is untouched


def test_calibrate_refuses_to_overwrite(tmp_path):
    source = build_tiny_bundle(tmp_path / "tiny")
    data = sample_labels(tmp_path / "data")
    with pytest.raises(EvaluationError, match="the bundle itself"):
        recalibrate_bundle(source, data, source, split="all", log=lambda _: None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(EvaluationError, match="not empty"):
        recalibrate_bundle(source, data, tmp_path / "busy", split="all", log=lambda _: None)


def test_calibrate_cli(tmp_path, capsys):
    from deploy.cli import main

    source = build_tiny_bundle(tmp_path / "tiny")
    code = main(["calibrate", str(source), str(sample_labels(tmp_path / "data", copies=2)), "--out",
                 str(tmp_path / "new"), "--split", "all", "--version", "9.9.9"])
    assert code == 0 and load_bundle(tmp_path / "new").version == "9.9.9"
    assert "T " in capsys.readouterr().out
