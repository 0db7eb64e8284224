"""The bundled demo model on real radiographs, end to end through the real pipeline."""

import csv
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from deploy.cli import main
from deploy.paths import DEMO_BUNDLE, SAMPLES
from triage.bundle import load_bundle
from triage.inference import load_model
from triage.pipeline import prepare, score_prepared


@pytest.fixture(scope="module")
def model():
    return load_model(load_bundle(DEMO_BUNDLE), device="cpu")


def risk_of(model, path) -> float:
    decision = score_prepared(model, [prepare(str(path), model.bundle.preprocessing)], lambda pid: "")[0]
    assert decision.status == "scored", decision.detail
    return decision.risk


def test_bundle_is_small_verified_and_records_its_validation(model):
    manifest = model.bundle.manifest
    assert sum(p.stat().st_size for p in DEMO_BUNDLE.iterdir()) <= 25 * 2**20
    assert manifest["metrics"]["validation"]["auroc"] >= 0.97
    assert manifest["metrics"]["parity"]["max_abs_risk_diff"] <= 1e-4
    assert "not a medical device" in (DEMO_BUNDLE / "MODEL_CARD.md").read_text().lower()


def test_same_radiograph_gives_the_same_risk_whatever_the_codec(model, shared_data):
    """pydicom-data's Philips chest CR: uncompressed, JPEG 2000 lossless, and JPEG-LS near-lossless."""
    risks = [risk_of(model, get_testdata_file("RG1_UNCR.dcm")), risk_of(model, get_testdata_file("RG1_J2KR.dcm")),
             risk_of(model, shared_data / "dicom" / "chest" / "philips-cr-pa-mono1-jpegls-nearlossless.dcm")]
    assert max(risks) - min(risks) <= 0.01, risks


def test_sample_pneumonias_rank_above_sample_normals(model):
    """The Kermany samples come from the validation split (never trained on)."""
    import pydicom

    risks = {p.name: risk_of(model, p) for p in sorted((SAMPLES / "kermany").glob("*.dcm"))}
    labels = {name: "/PNEUMONIA/" in str(pydicom.dcmread(SAMPLES / "kermany" / name).ImageComments) for name in risks}
    positives = [risks[n] for n in risks if labels[n]]
    negatives = [risks[n] for n in risks if not labels[n]]
    assert positives and negatives, labels
    pairs = [(p > n) for p in positives for n in negatives]
    assert sum(pairs) / len(pairs) >= 0.9


def test_real_shared_dicoms_are_scored_or_routed_with_their_reason(shared_data, tmp_path):
    out = tmp_path / "worklist.csv"
    assert main(["score", str(shared_data / "dicom"), "--out", str(out), "--audit-db", str(tmp_path / "a.sqlite"),
                 "--workers", "2"]) == 0
    with open(out, newline="") as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    for name in (p.name for p in (shared_data / "dicom" / "chest").iterdir()):
        assert rows[name]["status"] == "scored" and 0 <= float(rows[name]["risk"]) <= 1
    for name in ("fuji-cr-hip-mono2-jpegls-lossless.dcm", "fuji-cr-extremity-mono1-j2k-lossy.dcm",
                 "dental-panoramic-mono1-jpeg-lossless-modality-lut.dcm"):
        assert (rows[name]["status"], rows[name]["reason"]) == ("human_review", "body_part_out_of_scope")
        assert rows[name]["study_uid"]  # routed to a person, with the study it belongs to
    corrupt = rows["fuji-cr-hip-jpeg-extended-corrupt.dcm"]
    assert (corrupt["status"], corrupt["reason"]) == ("human_review", "decode_failed")
    assert "JPEG Extended" in corrupt["detail"] and "Fix:" in corrupt["detail"]
    assert sum(r["flagged"] == "1" for r in rows.values()) >= 1
