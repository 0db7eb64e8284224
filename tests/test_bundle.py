import json

import numpy as np
import pytest

from tests.tiny_bundle import SIZE, build_tiny_bundle
from triage.bundle import load_bundle
from triage.errors import BundleError
from triage.inference import calibrated_risk, load_model


@pytest.fixture
def tiny(tmp_path):
    return build_tiny_bundle(tmp_path / "tiny")


def test_a_valid_bundle_loads_with_its_spec_and_identity(tiny):
    bundle = load_bundle(tiny)
    assert bundle.findings == ["pneumonia"] and bundle.preprocessing.size == (SIZE, SIZE)
    assert len(bundle.sha256) == 64 and bundle.threshold == 0.5


def test_a_changed_model_file_is_refused_naming_the_file(tiny):
    with open(tiny / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 .* does not match"):
        load_bundle(tiny)


def test_a_missing_file_is_refused(tiny):
    (tiny / "MODEL_CARD.md").unlink()
    with pytest.raises(BundleError, match="MODEL_CARD.md is missing"):
        load_bundle(tiny)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("findings"), "missing key 'findings'"),
    (lambda m: m.update(schema_version=99), "schema_version 99"),
    (lambda m: m["calibration"]["temperature"].update(pneumonia=0), "temperature"),
    (lambda m: m["operating_point"].update(finding="cardiomegaly"), "not one of the findings"),
    (lambda m: m["preprocessing"].update(colour="yes"), "unknown keys"),
])
def test_schema_problems_are_named(tiny, edit, message):
    path = tiny / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(tiny)


def test_not_a_bundle_says_how_to_fix(tmp_path):
    with pytest.raises(BundleError, match="--bundle"):
        load_bundle(tmp_path)


def test_real_onnx_session_gives_calibrated_risk(tiny):
    model = load_model(load_bundle(tiny), device="cpu")
    assert model.provider == "CPUExecutionProvider"
    batch = np.stack([np.full((1, SIZE, SIZE), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    risks = model.risks(batch)[:, 0]
    assert risks.shape == (3,) and np.all(np.diff(risks) > 0)
    np.testing.assert_allclose(risks, 1 / (1 + np.exp(-4.0 * np.array([-1.0, 0.0, 1.0]))), rtol=1e-6)


def test_temperature_softens_risk_without_reordering():
    logits = np.array([[-3.0], [0.5], [4.0]])
    sharp, soft = calibrated_risk(logits, np.array([1.0])), calibrated_risk(logits, np.array([2.0]))
    assert np.all(np.argsort(sharp[:, 0]) == np.argsort(soft[:, 0]))
    assert np.all(np.abs(soft - 0.5) <= np.abs(sharp - 0.5))


def test_run_returns_logits_cams_and_features_in_one_pass(tmp_path):
    model = load_model(load_bundle(build_tiny_bundle(tmp_path / "cam", with_cam=True)), device="cpu")
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(3, 1, SIZE, SIZE)).astype(np.float32)
    logits, cams, features = model.run(batch)
    assert model.has_cam and cams.shape == (3, 1, SIZE // 8, SIZE // 8) and features.shape == (3, 64)
    np.testing.assert_allclose(cams.mean(axis=(2, 3)), logits, atol=1e-5)  # the map's mean is the logit
    np.testing.assert_allclose(logits, model.logits(batch), atol=1e-6)
    # the brightest block of the image is the hottest cell of its map
    hot = np.zeros((1, 1, SIZE, SIZE), np.float32)
    hot[0, 0, 8:16, 40:48] = 3.0
    assert np.unravel_index(np.argmax(model.run(hot).cams[0, 0]), (8, 8)) == (1, 5)


def test_an_older_bundle_without_cam_still_scores(tmp_path):
    model = load_model(load_bundle(build_tiny_bundle(tmp_path / "old")), device="cpu")
    batch = np.zeros((2, 1, SIZE, SIZE), np.float32)
    outputs = model.run(batch)
    assert not model.has_cam and outputs.cams is None and outputs.features is None
    np.testing.assert_allclose(outputs.logits, model.logits(batch))


def test_a_declared_output_the_graph_lacks_is_refused(tmp_path):
    folder = build_tiny_bundle(tmp_path / "b", with_cam=True)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model"]["outputs"]["cam"] = "heatmap"
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no output named \\['heatmap'\\]"):
        load_model(load_bundle(folder), device="cpu")


def test_a_model_onnx_runtime_cannot_load_is_a_bundle_error_naming_the_fix(tmp_path) -> None:
    """InvalidProtobuf subclasses plain Exception: it must still become a BundleError, not a traceback."""
    import json

    from triage.bundle import sha256_file

    folder = build_tiny_bundle(tmp_path / "b")
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf model" * 10)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(folder / "model.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"model.onnx: ONNX Runtime could not load the model.*Fix: rebuild the bundle"):
        load_model(load_bundle(folder), device="cpu")


def test_a_batch_onnx_runtime_fails_on_is_retried_image_by_image(tmp_path) -> None:
    """One input ONNX Runtime rejects (wrong size: InvalidArgument) goes to inference_failed; the rest are scored."""
    from triage.pipeline import Prepared, score_prepared

    model = load_model(load_bundle(build_tiny_bundle(tmp_path / "b")), device="cpu")
    good = np.zeros((1, SIZE, SIZE), np.float32)
    batch = [Prepared("a.dcm", "a" * 64, model_input=good), Prepared("bad.dcm", "b" * 64,
                                                                    model_input=np.zeros((1, 8, 8), np.float32)),
             Prepared("c.dcm", "c" * 64, model_input=good + 0.5)]
    a, bad, c = score_prepared(model, batch, lambda pid: "")
    assert a.status == c.status == "scored" and c.risk > a.risk
    assert (bad.status, bad.reason, bad.risk) == ("human_review", "inference_failed", None)
    assert bad.detail.startswith("bad.dcm: inference_failed: ONNX Runtime failed") and "Fix:" in bad.detail
    alone = score_prepared(model, [batch[1]], lambda pid: "")[0]
    assert alone.reason == "inference_failed" and "InvalidArgument" in alone.detail


def save_with_external_data(folder, location="weights.bin"):
    """Re-save the tiny bundle's model with its initializers in an external-data file beside it."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(folder / "model.onnx")
    for tensor in model.graph.initializer:  # only raw_data tensors go external
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)


def rewrite_manifest(folder):
    from triage.bundle import write_manifest

    manifest = json.loads((folder / "manifest.json").read_text())
    write_manifest(folder, {k: v for k, v in manifest.items() if k not in ("files", "schema_version")})


def test_external_data_is_pinned_by_the_manifest_and_scores(tiny):
    save_with_external_data(tiny)
    rewrite_manifest(tiny)
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert "weights.bin" in manifest["files"]
    model = load_model(load_bundle(tiny), device="cpu")
    logits = model.run(np.full((1, 1, SIZE, SIZE), 0.5, np.float32)).logits
    assert logits.shape == (1, 1) and np.isfinite(logits).all()


def test_swapped_external_data_is_refused(tiny):
    save_with_external_data(tiny)
    rewrite_manifest(tiny)
    weights = tiny / "weights.bin"
    weights.write_bytes(np.float32([400.0, 3.0]).tobytes())  # same size and name, other values: another risk
    with pytest.raises(BundleError, match=r"weights\.bin: sha256 .* does not match"):
        load_bundle(tiny)


def test_external_data_the_manifest_does_not_list_is_refused(tiny):
    save_with_external_data(tiny)
    manifest = json.loads((tiny / "manifest.json").read_text())
    from triage.bundle import sha256_file

    manifest["files"]["model.onnx"] = sha256_file(tiny / "model.onnx")  # model re-pinned, weights.bin not listed
    (tiny / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"external data 'weights\.bin', which the manifest does not pin"):
        load_bundle(tiny)


def test_external_data_outside_the_bundle_is_refused(tiny, tmp_path):
    from triage.bundle import check_external_data

    save_with_external_data(tiny)  # onnx itself refuses to write '..'; a crafted file says it anyway (same length)
    model = tiny / "model.onnx"
    model.write_bytes(model.read_bytes().replace(b"weights.bin", b"../wgts.bin"))
    with pytest.raises(BundleError, match=r"external data from '\.\./wgts\.bin', outside the bundle folder"):
        check_external_data(model, {"../wgts.bin": "0" * 64})


def test_a_pinned_bundle_identity_is_checked(tiny):
    from triage.bundle import sha256_file

    identity = sha256_file(tiny / "manifest.json")
    assert load_bundle(tiny, expected_sha256=identity.upper()).sha256 == identity
    with pytest.raises(BundleError, match="is not the pinned"):
        load_bundle(tiny, expected_sha256="0" * 64)
    with pytest.raises(BundleError, match="not 64 hex digits"):
        load_bundle(tiny, expected_sha256="abc")


def test_the_demo_bundle_has_no_external_data():
    from deploy.paths import default_bundle_dir
    from triage.bundle import external_data_locations

    assert list(external_data_locations((default_bundle_dir() / "model.onnx").read_bytes())) == []
