"""The bundled demo model on real radiographs, end to end through the real pipeline."""

import csv
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from deploy.cli import main
from deploy.paths import DEMO_BUNDLE, SAMPLES
from triage.bundle import load_bundle
from triage.inference import load_model
from triage.pipeline import prepare, score_prepared

SAMPLE_CHESTS = sorted((SAMPLES / "kermany").glob("*.dcm")) + [SAMPLES / "dicom" / "philips-cr-chest-pa-j2k.dcm"]


@pytest.fixture(scope="module")
def model():
    return load_model(load_bundle(DEMO_BUNDLE), device="cpu")


def decide(model, path):
    return score_prepared(model, [prepare(str(path), model.bundle.preprocessing)], lambda pid: "")[0]


def risk_of(model, path) -> float:
    decision = decide(model, path)
    assert decision.status == "scored", decision.detail
    return decision.risk


def test_bundle_is_small_verified_and_records_its_validation(model):
    manifest = model.bundle.manifest
    assert sum(p.stat().st_size for p in DEMO_BUNDLE.iterdir()) <= 32 * 2**20  # model.onnx + weights.npz
    assert manifest["metrics"]["validation"]["auroc"] >= 0.985
    parity = manifest["metrics"]["parity"]
    assert parity["max_abs_risk_diff"] <= 1e-4 and parity["pipeline_max_abs_risk_diff"] <= 1e-4
    assert parity["cam_max_abs_diff"] <= 1e-3
    assert "samples/dicom/philips-cr-chest-pa-j2k.dcm" in parity["pipeline_files"]
    assert len(parity["pipeline_files"]) == 13
    card = (DEMO_BUNDLE / "MODEL_CARD.md").read_text()
    assert "not a medical device" in card.lower() and "## Input gate" in card and "lateral" in card
    served = manifest["model"]
    assert served["precision"] == ("int8" if served.get("int8", {}).get("accepted") else "fp32")
    if "int8" in served:
        assert served["int8"]["auroc_drop"] <= 0.005 or not served["int8"]["accepted"]


def test_heatmap_of_a_real_radiograph_comes_from_the_onnx_graph(model):
    x = prepare(str(SAMPLES / "kermany" / "kermany-01.dcm"), model.bundle.preprocessing).model_input[None]
    logits, cams, features = model.run(x)
    assert model.has_cam and cams.shape == (1, 1, 7, 7) and features.shape == (1, 848)  # the input gate's features
    tolerance = 1e-4 if model.bundle.manifest["model"]["precision"] == "fp32" else 0.1 * (1 + abs(logits[0, 0]))
    assert abs(cams[0, 0].mean() - logits[0, 0]) <= tolerance  # the map's mean is the logit


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


def test_ood_gate_catches_the_dog_thorax_and_passes_every_chest_sample(model, shared_data):
    """The dog's tags say DX THORAX, so only the image can tell; every chest sample (pediatric and adult) is scored."""
    assert model.ood is not None
    for path in SAMPLE_CHESTS:
        assert decide(model, path).status == "scored", path
    dog = decide(model, shared_data / "dicom" / "out-of-scope" / "dx-thorax-dog-veterinary.dcm")
    assert (dog.status, dog.reason, dog.risk) == ("human_review", "out_of_distribution", None)
    assert dog.study_uid and "Fix:" in dog.detail


def lateral_views(shared_data: Path) -> list[Path]:
    """The 12 real lateral chest radiographs (CC BY-NC-SA: for tests only, never fitted on)."""
    return sorted((shared_data / "lateral-views" / "images").iterdir())


def test_the_gate_refuses_real_lateral_views_as_views(model, shared_data):
    decisions = [decide(model, path) for path in lateral_views(shared_data)]
    assert len(decisions) == 12 and all(d.status in ("scored", "human_review") for d in decisions)
    refused = [d for d in decisions if d.reason in ("view_out_of_scope", "out_of_distribution")]
    assert len(refused) >= 11, [(Path(d.path).name, d.reason) for d in decisions]
    views = [d for d in refused if d.reason == "view_out_of_scope"]
    assert len(views) >= 9 and all("not a frontal (PA/AP) one" in d.detail and "Fix:" in d.detail for d in views)


def test_the_gate_refuses_every_out_of_scope_image_even_without_its_tags(model, shared_data):
    """The header checks refuse the hip, extremity and dental files first; without their tags the image alone must."""
    from training.ood_fit import gate_input

    files = sorted((shared_data / "dicom" / "out-of-scope").glob("*.dcm"))
    features = model.run(np.stack([gate_input(p, model.bundle.preprocessing) for p in files]), cams=False).features
    assert len(files) == 4 and model.ood.assess(features).reasons == ["out_of_distribution"] * 4


def test_tags_win_a_frontal_tag_overrides_the_view_judgement_and_a_lateral_tag_refuses_first(model, shared_data,
                                                                                            make_dicom):
    from PIL import Image

    lateral = next(p for p in lateral_views(shared_data) if decide(model, p).reason == "view_out_of_scope")
    unit = np.asarray(Image.open(lateral).convert("L"), dtype=np.float64) / 255.0
    rows, cols = unit.shape
    untagged = decide(model, make_dicom("untagged.dcm", view=None, unit=unit, rows=rows, cols=cols, bits_stored=8))
    assert untagged.reason == "view_out_of_scope" and "input gate" in untagged.detail
    tagged_pa = decide(model, make_dicom("pa.dcm", view="PA", unit=unit, rows=rows, cols=cols, bits_stored=8))
    assert tagged_pa.status == "scored" and tagged_pa.risk is not None
    assert "View Position (0018,5101) is 'PA' and the header wins" in tagged_pa.detail
    tagged_ll = decide(model, make_dicom("ll.dcm", view="LL", unit=unit, rows=rows, cols=cols, bits_stored=8))
    assert tagged_ll.reason == "view_out_of_scope" and "View Position (0018,5101) is 'LL'" in tagged_ll.detail
    assert "input gate" not in tagged_ll.detail


def test_real_shared_dicoms_are_scored_or_routed_with_their_reason(shared_data, tmp_path):
    out = tmp_path / "worklist.csv"
    assert main(["score", str(shared_data / "dicom"), "--out", str(out), "--audit-db", str(tmp_path / "a.sqlite"),
                 "--workers", "2"]) == 0
    with open(out, newline="") as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    chests = [rows[p.name] for p in (shared_data / "dicom" / "chest").iterdir()]
    for row in chests:  # adult chests from other vendors: scored, or routed to a person by the OOD gate; never dropped
        assert row["status"] == "scored" and 0 <= float(row["risk"]) <= 1 or row["reason"] == "out_of_distribution"
    assert sum(row["status"] == "scored" for row in chests) == 5  # adult chests of 4 vendors: none refused
    for name in ("fuji-cr-hip-mono2-jpegls-lossless.dcm", "fuji-cr-extremity-mono1-j2k-lossy.dcm",
                 "dental-panoramic-mono1-jpeg-lossless-modality-lut.dcm"):
        assert (rows[name]["status"], rows[name]["reason"]) == ("human_review", "body_part_out_of_scope")
        assert rows[name]["study_uid"]  # routed to a person, with the study it belongs to
    dog = rows["dx-thorax-dog-veterinary.dcm"]
    assert (dog["status"], dog["reason"]) == ("human_review", "out_of_distribution")
    # 12-bit JPEG Extended that pylibjpeg-libjpeg refused (the shared data calls it undecodable: "one common decoder
    # rejects" it); GDCM decodes it as DCMTK's dcmdjpeg does, so it now reaches the scope check: a hip
    hip12 = rows["fuji-cr-hip-jpeg-extended-corrupt.dcm"]
    assert (hip12["status"], hip12["reason"]) == ("human_review", "body_part_out_of_scope")
    assert sum(r["flagged"] == "1" for r in rows.values()) >= 1
