"""A tiny synthetic 3-finding run end to end: two sources -> train -> export -> serve -> evaluate -> calibrate
-> finetune. Real MONAI network at 64 px, real ONNX Runtime, real PNG files in the site format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="the multi-finding run needs the train extra (torch, monai)")
pytest.importorskip("monai", reason="the multi-finding run needs the train extra (torch, monai)")

from training.sources import DataSource, labelled_split  # noqa: E402
from triage.bundle import load_bundle  # noqa: E402
from triage.inference import calibrated_risk, load_model  # noqa: E402
from triage.pipeline import prepare, score_prepared  # noqa: E402
from triage.preprocess import PreprocessSpec  # noqa: E402

FINDINGS = ["pneumonia", "effusion", "cardiomegaly"]
SIZE = 64

pytestmark = pytest.mark.slow


def write_site(folder: Path, n_patients: int, seed: int, unknown_effusion: bool = False) -> Path:
    """A site-format folder: 2 PNGs per patient; each finding brightens its own image region (learnable)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for patient in range(n_patients):
        labels = rng.integers(0, 2, len(FINDINGS))
        for image in range(2):
            pixels = rng.normal(90, 20, (SIZE, SIZE))
            for k, present in enumerate(labels):
                if present:
                    pixels[8 + 16 * k: 24 + 16 * k, 8:56] += 60
            name = f"images/p{patient}-{image}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
            row = {"path": name, "patient_id": str(patient), "sex": "MF"[patient % 2], "age": str(20 + patient % 60),
                   "view": "PA", **{f: str(int(v)) for f, v in zip(FINDINGS, labels)}}
            if unknown_effusion and patient % 3 == 0:
                row["effusion"] = ""  # unknown, not negative
            rows.append(row)
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sites")
    return write_site(root / "site-a", 160, 0), write_site(root / "site-b", 60, 1, unknown_effusion=True)


@pytest.fixture(scope="module")
def run_dir(sites, tmp_path_factory) -> Path:
    from training.train import TrainConfig, run

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(data=[{"path": str(sites[0])}, {"path": str(sites[1]), "weight": 3.0}], findings=FINDINGS,
                      triage_finding="effusion", name="cxr-three", version="1.0.0", size=SIZE, size_frozen=SIZE,
                      stages=[[SIZE, 1]], batch_size=16, preprocessing=PreprocessSpec(size=(SIZE, SIZE)).to_dict(),
                      out=str(out), cache_dir=str(out.parent / "cache"), device="cpu", augment=False)
    run(cfg, log=lambda _: None, max_steps=6)
    return out


@pytest.fixture(scope="module")
def bundle_dir(run_dir, tmp_path_factory) -> Path:
    from training.export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "cxr-three"
    export_bundle(run_dir, out, log=lambda _: None)
    return out


def test_sources_are_split_by_patient_each_and_never_share_a_patient(sites):
    split = labelled_split([DataSource(str(sites[0])), DataSource(str(sites[1]))], FINDINGS, 0.2, 0,
                           log=lambda _: None)
    keys = lambda rows: {(split.records[i].dataset, split.records[i].patient_id) for i in rows}  # noqa: E731
    assert not keys(split.train_idx) & keys(split.val_idx)
    assert set(split.source_rows(split.val_idx)) == {"site-a", "site-b"}  # patient "0" of each site is its own
    alone = labelled_split([DataSource(str(sites[1]))], FINDINGS, 0.2, 0, log=lambda _: None)
    b_val = sorted(split.records[i].path for i in split.val_idx if split.records[i].dataset == "site-b")
    assert b_val == sorted(alone.records[i].path for i in alone.val_idx)  # a source's split does not depend on others
    effusion = split.y[:, FINDINGS.index("effusion")]
    assert np.isnan(effusion).sum() == 40  # 20 site-b patients x 2 images: unknown, not 0


def test_run_records_its_sources_findings_and_per_source_validation(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    assert [s["name"] for s in config["data"]] == ["site-a", "site-b"] and config["data"][1]["weight"] == 3.0
    assert config["findings"] == FINDINGS
    best = json.loads((run_dir / "metrics.json").read_text())["best"]
    assert set(best["val_auroc_by_source"]) == {"site-a", "site-b"} and len(best["val_auroc_per_finding"]) == 3


def test_three_finding_bundle_serves_calibrates_and_orders_by_its_triage_finding(bundle_dir, sites):
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    assert (bundle.name, bundle.version, bundle.findings, bundle.triage_finding) == (
        "cxr-three", "1.0.0", FINDINGS, "effusion")
    assert set(manifest["calibration"]["temperature"]) == set(FINDINGS) == set(manifest["calibration"]["bias"])
    assert set(manifest["metrics"]["validation_by_source"]) == {"site-a", "site-b"}
    assert [s["name"] for s in manifest["training"]["sources"]] == ["site-a", "site-b"]
    assert "weights.npz" in manifest["files"]
    card = (bundle_dir / "MODEL_CARD.md").read_text()
    data_section = card[card.index("## Training data"):card.index("## Model")]
    for text in (data_section, manifest["description"], json.dumps(manifest["training"])):
        assert "kermany" not in text.lower() and "pediatric" not in text.lower() and "nih" not in text.lower()
    assert "site-a" in data_section and "site-b" in data_section
    model = load_model(bundle, "cpu")
    path = str(sites[0] / "images" / "p0-0.png")
    prepared = prepare(path, bundle.preprocessing)
    logits = model.logits(prepared.model_input[None])
    assert logits.shape == (1, 3)
    expected = calibrated_risk(logits, model.temperatures, model.biases)[0, FINDINGS.index("effusion")]
    decision = score_prepared(model, [prepared], lambda _: "")[0]
    assert decision.finding == "effusion" and decision.risk == pytest.approx(expected)


def test_evaluate_reports_every_finding_and_every_source(bundle_dir, sites, tmp_path):
    from training.evaluate import evaluate

    metrics = evaluate(bundle_dir, list(sites), tmp_path / "report", n_boot=20, log=lambda _: None)
    assert metrics["finding"] == "effusion" and list(metrics["per_finding"]) == FINDINGS
    assert metrics["per_finding"]["effusion"]["n"] < metrics["per_finding"]["pneumonia"]["n"]  # unknowns left out
    assert set(metrics["by_source"]) == {"site-a", "site-b"}
    assert [p["selection"] for p in metrics["split"]["sources"]] == ["validation", "validation"]
    assert all(p["matches_training_record"] for p in metrics["split"]["sources"])
    assert "Per source" in (tmp_path / "report" / "index.html").read_text()


def test_calibrate_refits_every_finding(bundle_dir, sites, tmp_path):
    from training.recalibrate import recalibrate_bundle

    manifest = recalibrate_bundle(bundle_dir, sites[1], tmp_path / "recal", split="all", log=lambda _: None)
    old = load_bundle(bundle_dir).manifest["calibration"]
    assert set(manifest["calibration"]["temperature"]) == set(FINDINGS)
    assert manifest["calibration"]["temperature"] != old["temperature"]
    assert list(manifest["metrics"]["recalibration_data"]) == ["site-b"]


def test_finetune_starts_from_the_bundle_weights_and_records_its_parent(bundle_dir, sites, tmp_path):
    from training.finetune import FinetuneError, finetune_bundle, parent_network

    parent = load_bundle(bundle_dir)
    net = parent_network(parent)
    x = prepare(str(sites[1] / "images" / "p1-0.png"), parent.preprocessing).model_input[None]
    np.testing.assert_allclose(net(torch.from_numpy(x)).detach().numpy(), load_model(parent, "cpu").logits(x), atol=1e-4)
    lines: list[str] = []
    manifest = finetune_bundle(bundle_dir, sites[1], tmp_path / "tuned", force=True, device="cpu", n_boot=20,
                               max_steps=3, log=lines.append)
    child = load_bundle(tmp_path / "tuned")
    assert child.version == "1.0.1" and manifest["training"]["parent"]["sha256"] == parent.sha256
    assert [s["name"] for s in manifest["training"]["sources"]] == ["site-b"]
    figures = manifest["metrics"]["finetune"]
    assert {"auroc", "ece", "ppv_top5", "sensitivity_top5", "auroc_ci95"} <= set(figures["parent"]) == set(figures["child"])
    table = next(line for line in lines if line.startswith("held-out"))
    assert "parent" in table and "fine-tuned" in table and "\nAUROC " in table and "Fine-tuned from cxr-three" in (
        tmp_path / "tuned" / "MODEL_CARD.md").read_text()
    try:  # without --force a worse child is refused and nothing is written
        finetune_bundle(bundle_dir, sites[1], tmp_path / "again", device="cpu", n_boot=20, max_steps=3,
                        log=lambda _: None)
        assert load_bundle(tmp_path / "again").manifest["metrics"]["finetune"]["child"]["auroc"] >= figures["parent"]["auroc"]
    except FinetuneError as error:
        assert "worse than its parent" in str(error) and not (tmp_path / "again").exists()


def test_a_bundle_without_weights_cannot_be_finetuned(tmp_path):
    from tests.tiny_bundle import build_tiny_bundle
    from training.finetune import FinetuneError, parent_network

    with pytest.raises(FinetuneError, match="ships no weights"):
        parent_network(load_bundle(build_tiny_bundle(tmp_path / "tiny")))
