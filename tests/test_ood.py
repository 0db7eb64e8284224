"""The out-of-distribution gate: numpy statistics (triage.ood), the bundle, and the pipeline's routing."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import chest_unit
from tests.tiny_bundle import SIZE, build_tiny_bundle
from triage.bundle import load_bundle
from triage.errors import REASONS, BundleError
from triage.inference import load_model
from triage.ood import fit_gate, load_gate, load_input_gate, save_gate, threshold_at
from triage.pipeline import Prepared, score_prepared
from triage.radiograph import ImageMeta
from triage.preprocess import PreprocessSpec, resize_unit, standardize

SPEC = PreprocessSpec(size=(SIZE, SIZE))


def model_input(unit: np.ndarray) -> np.ndarray:
    """A [0, 1] image -> the tiny bundle's (1, SIZE, SIZE) input through triage's resize + standardize."""
    return standardize(resize_unit(unit.astype(np.float32), SPEC), SPEC)


def synthetic_chests(n: int, seed: int) -> np.ndarray:
    """(n, 1, SIZE, SIZE) chest-like inputs: a synthetic chest, randomly cropped, contrast-jittered and noisy."""
    rng = np.random.default_rng(seed)
    base = chest_unit(300, 280)
    out = []
    for _ in range(n):
        top, left = rng.integers(0, 30, size=2)
        crop = base[top:top + 260, left:left + 240]
        unit = np.clip(crop ** rng.uniform(0.8, 1.25) + rng.normal(0, 0.03, crop.shape), 0, 1)
        out.append(model_input(unit))
    return np.stack(out)


def non_chests(seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs that are not chest radiographs: noise, gradients, flat fields, a checkerboard, an inverted chest."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:256] / 255.0
    images = {
        "uniform noise": rng.uniform(0, 1, (256, 256)),
        "horizontal gradient": x,
        "vertical gradient": y,
        "flat grey": np.full((256, 256), 0.5),
        "black": np.zeros((256, 256)),
        "checkerboard": ((np.floor(x * 8) + np.floor(y * 8)) % 2),
        "inverted chest": 1.0 - chest_unit(256, 256),
    }
    return {name: model_input(unit)[None] for name, unit in images.items()}


def test_distance_is_about_one_in_distribution_and_large_outside() -> None:
    rng = np.random.default_rng(0)
    cov = np.diag(np.r_[np.full(4, 9.0), np.full(28, 0.01)])
    train = rng.multivariate_normal(np.zeros(32), cov, size=2000)
    gate = fit_gate(train, n_components=4)
    inside = gate.distances(rng.multivariate_normal(np.zeros(32), cov, size=500))
    assert 0.8 < np.median(inside) < 1.2
    # a small step along a low-variance direction is far; the same step along a high-variance one is not
    step = np.zeros((1, 32))
    step[0, 10] = 1.0
    along_big = np.zeros((1, 32))
    along_big[0, 0] = 1.0
    assert gate.distances(step)[0] > 1.5 > gate.distances(along_big)[0]


def test_threshold_is_the_validation_percentile_and_nan_is_out() -> None:
    rng = np.random.default_rng(1)
    gate = fit_gate(rng.normal(size=(400, 16)), n_components=4)
    validation = rng.normal(size=(1000, 16))
    gate, d = threshold_at(gate, validation, 99.0)
    assert gate.threshold == pytest.approx(np.percentile(d, 99.0))
    assert 0.005 <= gate.is_out(validation).mean() <= 0.011
    assert gate.is_out(np.full((1, 16), np.nan))[0]


def test_saved_statistics_round_trip_and_bad_files_name_the_fix(tmp_path) -> None:
    rng = np.random.default_rng(2)
    gate = fit_gate(rng.normal(size=(200, 8)), n_components=3).with_threshold(2.0)
    path = save_gate(gate, tmp_path / "ood.npz")
    loaded = load_gate(path, 2.0)
    x = rng.normal(size=(5, 8))
    np.testing.assert_allclose(loaded.distances(x), gate.distances(x), rtol=1e-5)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="bad.npz.*re-export"):
        load_gate(tmp_path / "bad.npz", 2.0)
    with pytest.raises(ValueError, match=r"features must be \(N, 8\)"):
        gate.distances(np.zeros((1, 9)))


def test_gate_in_a_tiny_bundle_separates_synthetic_non_chests(tmp_path) -> None:
    bundle = load_bundle(build_tiny_bundle(tmp_path / "b", ood_inputs=synthetic_chests(400, seed=0)))
    assert bundle.ood["file"] in bundle.manifest["files"]  # hashed like every other file
    model = load_model(bundle, device="cpu")
    fresh = synthetic_chests(200, seed=7)
    outside = non_chests()
    chest_d = model.ood.scores(model.run(fresh).features)  # a bundle before 0.4: one part, distance / its cut
    other_d = {name: float(model.ood.scores(model.run(x).features)[0]) for name, x in outside.items()}
    assert np.mean(chest_d <= model.ood.threshold) >= 0.97
    assert all(d > model.ood.threshold for d in other_d.values()), (model.ood.threshold, other_d)
    assert min(other_d.values()) > np.max(chest_d), "a margin between every chest and every non-chest"


def test_pipeline_routes_out_of_distribution_to_human_review(tmp_path) -> None:
    model = load_model(load_bundle(build_tiny_bundle(tmp_path / "b", ood_inputs=synthetic_chests(400, seed=0))), "cpu")
    batch = [Prepared("chest.dcm", "a" * 64, model_input=synthetic_chests(1, seed=11)[0]),
             Prepared("noise.dcm", "b" * 64, model_input=non_chests()["uniform noise"][0]),
             Prepared("broken.dcm", "c" * 64, reason="decode_failed", detail="x")]
    chest, noise, broken = score_prepared(model, batch, lambda pid: "")
    assert chest.status == "scored" and chest.risk is not None
    assert (noise.status, noise.reason, noise.risk) == ("human_review", "out_of_distribution", None)
    assert "threshold" in noise.detail and "Fix:" in noise.detail and noise.infer_ms is not None
    assert (broken.status, broken.reason) == ("human_review", "decode_failed")
    assert "out_of_distribution" in REASONS


def test_a_bundle_without_gate_scores_everything(tmp_path) -> None:
    model = load_model(load_bundle(build_tiny_bundle(tmp_path / "b")), "cpu")
    assert model.ood is None
    decision = score_prepared(model, [Prepared("noise.dcm", "b" * 64, model_input=non_chests()["uniform noise"][0])],
                              lambda pid: "")[0]
    assert decision.status == "scored"


def test_ood_without_features_output_is_a_schema_error(tmp_path) -> None:
    import json

    folder = build_tiny_bundle(tmp_path / "b", ood_inputs=synthetic_chests(100, seed=0))
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["model"]["outputs"]["features"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="model.outputs.features"):
        load_bundle(folder)


def half_inverted(seed: int) -> np.ndarray:
    """A synthetic chest whose top half is untouched and bottom half inverted: familiar texture where the view part
    looks, an unfamiliar layout overall (the tiny bundle's stand-in for a lateral view)."""
    x = synthetic_chests(1, seed)[0].copy()
    x[:, SIZE // 2:] = -x[:, SIZE // 2:]
    return x


def test_the_parts_gate_tells_a_view_from_a_non_chest_and_a_frontal_tag_wins(tmp_path) -> None:
    folder = build_tiny_bundle(tmp_path / "b", ood_inputs=synthetic_chests(400, seed=0), gate_parts=True)
    model = load_model(load_bundle(folder), "cpu")
    assert model.ood.score_parts == ("layout",) and model.ood.view_part == "texture"
    untagged, frontal = ImageMeta("1", "2", "3"), ImageMeta("1", "2", "4", view_position="PA")
    batch = [Prepared("chest.png", "a" * 64, untagged, synthetic_chests(1, seed=11)[0]),
             Prepared("other-view.png", "b" * 64, untagged, half_inverted(12)),
             Prepared("noise.png", "c" * 64, untagged, non_chests()["uniform noise"][0]),
             Prepared("tagged-pa.dcm", "d" * 64, frontal, half_inverted(12)),
             Prepared("tagged-pa-noise.dcm", "e" * 64, frontal, non_chests()["uniform noise"][0])]
    chest, view, noise, tagged, tagged_noise = score_prepared(model, batch, lambda pid: "")
    assert chest.status == "scored" and chest.detail == ""
    assert (view.status, view.reason, view.risk) == ("human_review", "view_out_of_scope", None)
    assert "frontal" in view.detail and "Fix: send the frontal image" in view.detail
    assert (noise.status, noise.reason) == ("human_review", "out_of_distribution")
    assert "unlike the frontal chest radiographs" in noise.detail and "Fix:" in noise.detail
    assert tagged.status == "scored" and tagged.risk is not None  # the header's PA wins over the view judgement
    assert "View Position (0018,5101) is 'PA' and the header wins" in tagged.detail
    assert tagged_noise.reason == "out_of_distribution"  # but a frontal tag does not make noise a chest


def test_parts_gate_round_trips_and_a_malformed_section_names_the_fix(tmp_path) -> None:
    import json

    folder = build_tiny_bundle(tmp_path / "b", ood_inputs=synthetic_chests(200, seed=0), gate_parts=True)
    section = json.loads((folder / "manifest.json").read_text())["ood"]
    gate = load_input_gate(folder / "ood.npz", section)
    x = np.random.default_rng(3).normal(size=(4, 64))
    assert gate.scores(x).shape == (4,) and all(r in ("", "view_out_of_scope", "out_of_distribution")
                                                for r in gate.assess(x).reasons)
    assert gate.assess(np.full((1, 64), np.nan)).refused[0]
    broken = {**section, "parts": {"layout": {"columns": [0, 60], "threshold": 1.0}}, "score_parts": ["layout"]}
    with pytest.raises(BundleError, match="do not match their columns.*re-export"):
        load_input_gate(folder / "ood.npz", broken)
    with pytest.raises(BundleError, match="malformed.*re-export"):
        load_input_gate(folder / "ood.npz", {**section, "parts": {"layout": {"threshold": 1.0}}})
