"""A training run -> a verified model bundle (``model.onnx``, ``ood.npz``, ``manifest.json``, ``MODEL_CARD.md``).

Steps (``export_bundle``):

1. Rebuild the network from the run's best checkpoint and export ONE graph (opset 17,
   dynamic batch) with three outputs: ``logits`` (N, F); ``cam`` (N, F, h, w), the class
   activation map computed in the graph (last feature map x classifier weights + bias,
   at feature-map resolution: its spatial mean is the logit); ``features`` (N, 848), what the
   input gate reads (``training.onnx_graph.GateNet``).
2. Parity, each one fails the export beyond its tolerance: ONNX Runtime vs PyTorch
   logits on every validation image (topped up with training images to 64 for a small site);
   the ONNX CAM vs MONAI's ``CAM`` (torch); the whole pipeline, DICOM file -> risk, on the
   sample studies (``PIPELINE_FILES``).
3. Calibration (temperature + bias per finding) and the 5% flag-rate threshold of the triage finding on
   the served model's validation logits; the same figures per source.
4. ``--int8``: static QDQ quantization (per-channel) calibrated on training images; served
   only if its validation AUROC is within ``INT8_MAX_AUROC_DROP`` of fp32; ms/image of both.
5. The input gate (``training.ood_fit``): statistics of the gate features (a frozen ImageNet
   backbone in the same graph) of the training images, cuts at the largest per-source
   ``GATE_PERCENTILE`` of the validation images; the gate's verdict on the sample and real
   out-of-scope files is recorded.
6. ``weights.npz``: the network's state dict as plain arrays (no pickle), so ``finetune`` can
   restart training from the bundle; pinned by sha256 in the manifest like every other file.
7. Manifest (``triage.bundle.write_manifest``), model card, reload with ``load_bundle``,
   and the served bundle re-scores the parity files through ``triage.pipeline``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triage.bundle import load_bundle, write_manifest
from triage.decode import RISK_TOLERANCE
from triage.inference import calibrated_risk
from triage.ood import source_weights
from triage.pipeline import prepare
from triage.preprocess import PreprocessSpec

from .calibration import source_report, validation_report
from .card import write_model_card
from .decode_check import decode_section, reduced_decode_diffs, reduced_decode_files
from .manifest import build_manifest
from .metrics import FLAG_RATE
from .onnx_graph import CAM_NAME, FEATURES_NAME, GATE_WHAT, OUTPUT_NAME, export_onnx, onnx_logits, onnx_outputs, torch_logits
from .ood_fit import OOD_MAX_TRAIN, fit_ood, gate_table, ood_check_files, ood_report
from .parity import (
    CAM_CHECK_IMAGES, MIN_PARITY_IMAGES, REPO, ParityError, check_cam_parity, check_parity, pipeline_files,
    pipeline_parity, verify_served)
from .quantize import INT8_CALIBRATION_IMAGES, try_int8
from .runs import load_inputs, load_run, run_split, sample_rows
from .weights import WEIGHTS_FILE, save_weights

MAX_BUNDLE_BYTES = 32 * 1024 * 1024  # model.onnx + weights.npz (fp32) of EfficientNet-Lite0: about 27 MiB


def check_split_matches_run(run_dir: Path, val_rows: Sequence[int], ort_logits: np.ndarray) -> None:
    """The re-made validation split is the run's (``val_predictions.npz`` rows and logits), else ``ParityError``."""
    saved = run_dir / "val_predictions.npz"
    if not saved.is_file():
        return
    with np.load(saved) as stored:
        rows, logits = stored["rows"], stored["logits"]
    if not np.array_equal(np.asarray(rows), np.asarray(val_rows)) or logits.shape != ort_logits.shape:
        raise ParityError(f"{saved}: the run's validation rows differ from the split re-made from its config. "
                          "Fix: export with the code version and --data the run was trained with")


def source_balance(val_sources: np.ndarray) -> np.ndarray | None:
    """(N_val,) weight 1 / (validation images of its source) per validation image (``val_sources``: each one's source),
    so the calibration and the flag-rate threshold treat every training population alike (a large source would
    otherwise set both); None for one source."""
    return source_weights(val_sources) if len(np.unique(val_sources)) > 1 else None


def per_source(split, y_val: np.ndarray, logits: np.ndarray, report: dict[str, Any], column: int) -> dict[str, Any]:
    """``source_report`` of each source's validation images (triage finding, the bundle's calibration and threshold)."""
    risks = calibrated_risk(logits, np.array(report["temperatures"]), np.array(report["biases"]))[:, column]
    out = {}
    for name, pos in split.source_rows(split.val_idx).items():
        known = pos[~np.isnan(y_val[pos, column])]
        if len(known):
            out[name] = source_report(risks[known], y_val[known, column], report["threshold"], FLAG_RATE)
    return out


def export_bundle(run_dir: str | Path, out: str | Path, data: Sequence[str | Path] = (), int8: bool = False,
                  name: str | None = None, version: str | None = None, triage_finding: str | None = None,
                  log: Callable[[str], None] = lambda line: print(line, flush=True),
                  config_override: dict[str, Any] | None = None, net=None) -> dict[str, Any]:
    """Export ``run_dir`` to the bundle folder ``out``; returns the manifest as written and verified.

    ``data``: folders replacing the recorded path of the run's source of the same name. ``name``, ``version``
    and ``triage_finding`` default to the run config's (else ``cxr-<findings>``, 0.1.0, the first finding).
    ``config_override``/``net``: a run held in memory (``finetune``) instead of ``run_dir``'s files.
    """
    start = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    if net is None:
        config, metrics, net = load_run(run_dir)
    else:
        config, metrics = config_override, config_override.get("metrics", {})
    findings = list(config["findings"])
    finding = triage_finding or config.get("triage_finding") or findings[0]
    if finding not in findings:
        raise ValueError(f"triage finding {finding!r} is not one of the run's findings {findings}")
    column = findings.index(finding)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.onnx", "model-int8.onnx", "ood.npz", WEIGHTS_FILE):
        (out / stale).unlink(missing_ok=True)
    spec = PreprocessSpec.from_dict(config["preprocessing"])
    fp32_path = export_onnx(net, out / "model.onnx", spec.channels, spec.size)
    split = run_split(config, data, log)
    val_records = [split.records[i] for i in split.val_idx]
    x_val, y_val = load_inputs(val_records, spec), split.y[split.val_idx].astype(np.float64)
    fp32 = onnx_outputs(fp32_path, x_val)
    check_split_matches_run(run_dir, split.val_idx, fp32[OUTPUT_NAME])
    train_rows = sample_rows(split.train_idx, OOD_MAX_TRAIN, int(config.get("seed", 0)))
    x_train = load_inputs([split.records[i] for i in train_rows], spec)
    top_up = x_train[:max(0, MIN_PARITY_IMAGES - len(x_val))]  # a small site: add training images to 64
    x_parity = np.concatenate([x_val, top_up])
    ort_parity = np.concatenate([fp32[OUTPUT_NAME], onnx_logits(fp32_path, top_up)]) if len(top_up) else fp32[OUTPUT_NAME]
    parity = check_parity(torch_logits(net, x_parity), ort_parity)
    parity.update(check_cam_parity(net, x_val[:CAM_CHECK_IMAGES], fp32[CAM_NAME][:CAM_CHECK_IMAGES]))
    log(f"parity on {parity['n_images']} images: max |risk diff| {parity['max_abs_risk_diff']:.2e}; "
        f"CAM vs MONAI on {parity['cam_n_images']}: max |diff| {parity['cam_max_abs_diff']:.2e}")
    val_sources = np.array([split.records[i].dataset for i in split.val_idx])
    weights = source_balance(val_sources)
    fp32_report = validation_report(fp32[OUTPUT_NAME], y_val, FLAG_RATE, column, weights)
    temperatures, biases = np.array(fp32_report["temperatures"]), np.array(fp32_report["biases"])
    parity.update(pipeline_parity(net, fp32_path, pipeline_files(), spec, temperatures, biases, column=column))
    log(f"pipeline parity (DICOM -> risk) on {len(parity['pipeline_files'])} files: "
        f"max |risk diff| {parity['pipeline_max_abs_risk_diff']:.2e}")
    served, served_out, int8_section = fp32_path, fp32, None
    if int8:
        x_cal = x_train[np.sort(np.random.default_rng(0).choice(len(x_train), min(INT8_CALIBRATION_IMAGES,
                                                                                   len(x_train)), replace=False))]
        int8_section, int8_out = try_int8(fp32_path, out, x_cal, x_val, y_val, fp32[OUTPUT_NAME], log, column)
        if int8_out is not None:
            fp32_path.unlink()
            served, served_out = out / "model-int8.onnx", int8_out
    report = fp32_report if served_out is fp32 else validation_report(served_out[OUTPUT_NAME], y_val, FLAG_RATE, column,
                                                                      weights)
    if served_out is not fp32:  # the served model's own risks on the parity files, calibrated with its temperature
        x_files = np.stack([prepare(str(REPO / f), spec).model_input for f in parity["pipeline_files"]])
        served_risks = calibrated_risk(onnx_logits(served, x_files), np.array(report["temperatures"]),
                                       np.array(report["biases"]))[:, column]
        parity["pipeline_onnx_risks"] = [round(float(r), 8) for r in served_risks]
    train_sources = [split.records[i].dataset for i in train_rows]
    ood = fit_ood(served, out, x_train, train_sources, served_out[FEATURES_NAME], val_sources, log)
    cam_shape = list(fp32[CAM_NAME].shape[1:])
    model_section = {"file": served.name, "precision": "int8" if served_out is not fp32 else "fp32",
                     "outputs": {"logits": OUTPUT_NAME, "cam": CAM_NAME, "features": FEATURES_NAME},
                     "cam": {"shape": ["batch", *cam_shape], "units": "logit: the spatial mean of a map is its logit",
                             "method": "last feature map x classifier weights + bias (1x1 convolution), in the graph"},
                     "features": {"shape": ["batch", int(fp32[FEATURES_NAME].shape[1])],
                                  "what": GATE_WHAT}}
    if int8_section is not None:
        model_section["int8"] = int8_section
        if served_out is not fp32:
            model_section["fp32_not_shipped"] = "re-export without --int8 for the fp32 graph"
    model_section["weights"] = {"file": save_weights(net, out / WEIGHTS_FILE).name, "format": "numpy .npz of the "
                                "PyTorch state dict (no pickle), for finetune", "architecture": config.get("architecture")}
    by_source = per_source(split, y_val, served_out[OUTPUT_NAME], report, column)
    for source_name, figures in by_source.items():
        log(f"validation {source_name}: n {figures['n']}, AUROC {figures['auroc']:.4f}, ECE {figures['ece']:.4f}, "
            f"flagged at the threshold {figures['at_threshold']['flagged_fraction']:.3f}")
    manifest = build_manifest(config, metrics, report, parity, model_section, ood, name=name, version=version,
                              triage_finding=finding, by_source=by_source, changelog=config.get("changelog"))
    write_model_card(out / "MODEL_CARD.md", manifest)
    write_manifest(out, manifest)
    manifest["ood"]["checked"] = ood_report(out, ood_check_files())
    log(f"input gate refuses (tags aside): {gate_table(manifest['ood']['checked'])}")
    parity["served_pipeline_max_abs_risk_diff"] = verify_served(out, parity, served_out is not fp32)
    manifest["decode"] = decode_section(reduced_decode_diffs(out, reduced_decode_files()))
    log(f"reduced decode: {manifest['decode']['reduced'] or 'none'} within {RISK_TOLERANCE} "
        f"({ {f: c['max_abs_risk_diff'] for f, c in manifest['decode']['checked'].items()} })")
    write_model_card(out / "MODEL_CARD.md", manifest)
    write_manifest(out, manifest)
    bundle = load_bundle(out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    if size > MAX_BUNDLE_BYTES:
        raise ValueError(f"{out}: bundle is {size / 2**20:.1f} MiB, over the {MAX_BUNDLE_BYTES / 2**20:.0f} MiB limit")
    log(f"bundle {bundle.name} {bundle.version} ({size / 2**20:.1f} MiB) written to {out} in "
        f"{time.perf_counter() - start:.0f} s; sha256 {bundle.sha256[:12]}")
    return bundle.manifest
