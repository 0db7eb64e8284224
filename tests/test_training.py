"""training/: weights, split, fine-tune mechanics, ONNX parity, calibration, samples. Fast, on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training tests need the train extra (torch, monai)")
pytest.importorskip("monai", reason="training tests need the train extra (torch, monai)")

from training.calibration import (  # noqa: E402
    TemperatureScaling, binary_nll, expected_calibration_error, flag_threshold_for_rate, operating_metrics,
    validation_report)
from training.model import build_model, freeze_body, layer_groups, unfreeze  # noqa: E402
from training.train import predict_logits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained() -> torch.nn.Module:
    """EfficientNet-Lite0 with ImageNet weights (strict load), 1 channel, one logit."""
    torch.manual_seed(0)
    return build_model(1, in_channels=1, image_size=64)


# --- model -----------------------------------------------------------------------------------


def test_imagenet_weights_load_strict_into_one_channel_stem(pretrained):
    assert pretrained._conv_stem.in_channels == 1
    logits = predict_logits(pretrained, np.random.default_rng(0).normal(size=(3, 1, 64, 64)).astype(np.float32))
    assert logits.shape == (3, 1) and np.isfinite(logits).all()


def test_grey_stem_matches_rgb_stem_on_a_repeated_grey_image():
    rgb, grey = build_model(1000, in_channels=3).eval(), build_model(1000, in_channels=1).eval()
    grey._fc = rgb._fc
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        assert torch.allclose(rgb(x.repeat(1, 3, 1, 1)), grey(x), atol=1e-4)


def test_layer_groups_cover_every_parameter_once(pretrained):
    groups = layer_groups(pretrained)
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(pretrained.parameters()))
    freeze_body(pretrained)
    assert [p.requires_grad for p in pretrained.parameters()].count(True) == 2  # _fc weight and bias
    unfreeze(pretrained)
    assert all(p.requires_grad for p in pretrained.parameters())


# --- split -----------------------------------------------------------------------------------


def record(path: str, label: int, patient: str, md5: str):
    from training.datasets import Record, label_vector

    return Record(path, patient, path, "site", label_vector({"pneumonia": float(label)}), md5=md5)


def test_patients_sharing_an_image_land_in_one_split():
    from training import splits

    rows = [record(f"{p}.jpeg", i % 2, p, m) for i, (p, m) in
            enumerate([("A", "x"), ("B", "x"), ("B", "y"), ("C", "y"), *[(f"P{i}", f"m{i}") for i in range(40)]])]
    groups = splits.patient_groups(rows)
    assert any({rows[i].patient_id for i in g} == {"A", "B", "C"} for g in groups.values())
    for seed in range(5):
        parts = splits.split_by_patient(rows, {"val": 0.3, "train": 0.7}, seed)
        assert sorted(parts["train"] + parts["val"]) == list(range(len(rows)))
        assert splits.leakage(rows, parts) == {"patient_id": {}, "md5": {}}


def test_leakage_is_reported():
    from training import splits

    rows = [record("a", 0, "A", "x"), record("b", 1, "A", "y")]
    with pytest.raises(AssertionError, match="leaks 1 patients"):
        splits.assert_no_leakage(rows, {"train": [0], "val": [1]})


def test_real_kermany_split_through_the_site_format_is_the_bundled_models(shared_data):
    import json

    from training.sources import DataSource, labelled_split

    folder = shared_data / "kermany-pneumonia-224"
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"needs ../shared/data/kermany-pneumonia-224/labels.csv ({folder}), absent here")
    split = labelled_split([DataSource(str(folder))], ["pneumonia"], 0.2, 0, log=lambda _: None)
    assert len(split.train_idx) + len(split.val_idx) == len(split.records) == 5216
    assert (len(split.train_idx), len(split.val_idx)) == (4125, 1091)  # the split the 0.2 demo model recorded
    assert int(np.nansum(split.y[split.val_idx, 0])) == 818
    assert {r.extra["subtype"] for r in split.records} == {"normal", "bacteria", "virus"}


def test_export_rebuilds_the_trainers_split_from_the_run_config(shared_data):
    from dataclasses import asdict

    from training.runs import run_split
    from training.train import TrainConfig, prepare_split

    kermany, nih = shared_data / "kermany-pneumonia-224", shared_data / "nih-pneumonia-512"
    if not (kermany / "labels.csv").is_file() or not (nih / "labels.csv").is_file():
        pytest.skip(f"needs ../shared/data/kermany-pneumonia-224 and nih-pneumonia-512 ({shared_data}), absent here")
    cfg = TrainConfig(data=[{"path": str(kermany)}, {"path": str(nih), "weight": 4}])
    d = prepare_split(cfg, log=lambda _: None)
    again = run_split({**asdict(cfg), "findings": d.findings}, log=lambda _: None)
    assert (again.train_idx, again.val_idx) == (d.train_idx, d.val_idx)
    np.testing.assert_array_equal(again.y, d.y)
    assert set(d.source_rows(d.val_idx)) == {"kermany-pneumonia-224", "nih-pneumonia-512"}
    weights = d.sample_weights()
    assert set(weights.tolist()) == {1.0, 4.0} and (weights == 4.0).sum() == len(d.source_rows(d.train_idx)["nih-pneumonia-512"])


# --- export and calibration ------------------------------------------------------------------


def test_onnx_export_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    from training.onnx_graph import export_onnx, onnx_logits
    from training.parity import check_parity

    torch.manual_seed(0)
    net = build_model(1, image_size=64, pretrained=False).eval()
    path = export_onnx(net, tmp_path / "model.onnx", channels=1, size=(64, 64))
    x = np.random.default_rng(0).normal(size=(5, 1, 64, 64)).astype(np.float32)  # batch 5: the axis is dynamic
    ort = onnx_logits(path, x)
    assert ort.shape == (5, 1)
    assert check_parity(predict_logits(net, x), ort, min_images=5)["max_abs_risk_diff"] <= 1e-4


def test_parity_failure_is_loud():
    from training.parity import ParityError, check_parity

    with pytest.raises(ParityError, match="differs from PyTorch"):
        check_parity(np.zeros((64, 1)), np.full((64, 1), 0.01))


def test_temperature_scaling_does_not_worsen_nll_on_overconfident_logits():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(float)
    logits = 4.0 * z  # four times over-confident
    scaler = TemperatureScaling().fit(logits[:, None], labels[:, None])
    assert 3.0 < scaler.temperature_[0] < 5.0
    calibrated = scaler.predict_proba(logits[:, None])[:, 0]
    assert binary_nll(logits / scaler.temperature_[0], labels) <= binary_nll(logits, labels)
    assert expected_calibration_error(calibrated, labels) < expected_calibration_error(1 / (1 + np.exp(-logits)), labels)


def test_threshold_flags_about_five_percent():
    risks = np.random.default_rng(0).beta(2, 5, 2000)
    threshold = flag_threshold_for_rate(risks, 0.05)
    assert 0.045 <= float((risks >= threshold).mean()) <= 0.055
    labels = (risks > 0.5).astype(float)
    assert operating_metrics(risks, labels, threshold)["ppv"] == 1.0
    report = validation_report(np.log(risks / (1 - risks))[:, None], labels[:, None], 0.05)
    assert sum(report["risk_histogram"]["counts"]) == 2000 and len(report["risk_histogram"]["counts"]) == 20
    assert 0.045 <= report["operating"]["flagged_fraction"] <= 0.055


# --- CLI and samples -------------------------------------------------------------------------


def test_cli_registers_train_and_export_without_importing_torch():
    code = ("import argparse, sys; from training.cli import add_parsers; p = argparse.ArgumentParser(); "
            "add_parsers(p.add_subparsers()); a = p.parse_args(['train', '--out', 'r', '--limit', '8', "
            "'--stages', '128:1,224:2', '--ema', '0.99', '--lr-find']); "
            "b = p.parse_args(['export', 'r', '--out', 'b']); "
            "print(a.stages, a.epochs, a.limit, a.ema, a.lr_find, b.run_dir, callable(a.func), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[[128,", "1],", "[224,", "2]]", "None", "8", "0.99", "True", "r", "True", "False"]


def test_cli_flags_override_the_config_file(tmp_path):
    import argparse

    from training.cli import add_parsers, train_overrides
    from training.train import load_config

    (tmp_path / "run.json").write_text('{"out": "runs/x", "lr": 0.001, "seed": 3}')
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    args = parser.parse_args(["train", "--config", str(tmp_path / "run.json"), "--seed", "5", "--epochs", "2",
                              "--no-augment"])
    cfg = load_config(args.config, **train_overrides(args))
    assert (cfg.out, cfg.lr, cfg.seed, cfg.stages, cfg.augment) == ("runs/x", 0.001, 5, [[224, 2]], False)


def test_sample_dicom_reads_back_as_the_training_input(tmp_path):
    from triage.ingest import read_radiograph
    from triage.preprocess import PreprocessSpec, preprocess, standardize

    from training.samples import to_dicom

    pixels = np.random.default_rng(0).integers(0, 256, size=(224, 224), dtype=np.uint8)
    example = record("images/x.jpeg", 1, "P1", "abc")
    path = tmp_path / "s.dcm"
    to_dicom(pixels, example).save_as(path, enforce_file_format=True)
    radiograph = read_radiograph(path)
    assert (radiograph.meta.modality, radiograph.meta.body_part, radiograph.meta.view_position) == ("CR", "CHEST", "AP")
    assert radiograph.meta.patient_id == "P1" and radiograph.photometric == "MONOCHROME2"
    spec = PreprocessSpec()
    np.testing.assert_array_equal(preprocess(radiograph, spec), standardize(pixels / np.float32(255), spec))


def test_batchnorm_eval_keeps_the_running_statistics_while_the_weights_train():
    from training.train import batchnorm_eval

    torch.manual_seed(0)
    net = build_model(1, image_size=64, pretrained=False).train()
    batchnorm_eval(net)
    bn = net._bn0
    before_mean, before_weight = bn.running_mean.clone(), net._conv_stem.weight.clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.rand(4, 1, 64, 64) * 3).sum()
    loss.backward()
    optimizer.step()
    assert torch.equal(bn.running_mean, before_mean) and not bn.training
    assert not torch.equal(net._conv_stem.weight, before_weight)  # the weights still learn
