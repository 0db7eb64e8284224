"""Recalibrate a bundle: refit its calibration and 5% threshold on labelled images, keep its model.

``cxr-triage calibrate BUNDLE DATA --out NEW`` scores DATA with the bundle through triage
(ONNX Runtime, the served decode and preprocessing), fits ``risk = sigmoid(logit / T + b)``
on the chosen split and writes a new bundle folder: same model and gate, new ``calibration``,
``operating_point``, validation metrics, parity risks, model card and version. Two uses:

- the training source's validation split (``--split validation``, the default): what export
  would have fitted, e.g. to move an older temperature-only bundle to the bias term;
- a site's own labelled studies (``--split all``): calibrate to the local population.

No torch is needed: the model is run as served.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from triage.bundle import MANIFEST, load_bundle, write_manifest
from triage.inference import sigmoid

from .calibration import calibration_section, source_report, validation_report
from .card import recalibration_text, write_model_card
from .decode_check import decode_section, reduced_decode_diffs, reduced_decode_files
from .parity import parity_risks
from .scoring import EvaluationError, score_bundle, select_images, training_record


def next_version(version: str) -> str:
    """``0.2.0`` -> ``0.2.1``; a version without a numeric last part gets ``.1`` appended."""
    head, _, last = version.rpartition(".")
    return f"{head}.{int(last) + 1}" if head and last.isdigit() else f"{version}.1"


def recalibrated_manifest(manifest: dict[str, Any], report: dict[str, Any], fitted_on: str, version: str,
                          source: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``manifest`` (without ``files``/``schema_version``) with the new calibration, threshold and figures."""
    new = {k: v for k, v in json.loads(json.dumps(manifest)).items() if k not in ("files", "schema_version")}
    new["version"] = version
    new["calibration"] = calibration_section(report, new["findings"], fitted_on)
    new["operating_point"]["threshold"] = report["threshold"]
    new["operating_point"]["validation"] = {k: report["operating"][k] for k in ("sensitivity", "specificity", "ppv",
                                                                               "flagged_fraction")}
    new["metrics"]["validation"].update({k: report[k] for k in ("auroc", "n", "n_positive", "ece_before", "ece_after",
                                                                "nll_before", "nll_after", "risk_histogram")})
    new["recalibrated"] = source
    return new


def update_card(path: Path, manifest: dict[str, Any]) -> None:
    """Rewrite the card of a bundle that export made; for any other bundle, append the recalibration to its card."""
    if "split" in manifest.get("training", {}):
        write_model_card(path, manifest)
        return
    finding = manifest["operating_point"]["finding"]
    calibration, validation = manifest["calibration"], manifest["metrics"]["validation"]
    path.write_text(path.read_text().rstrip() + "\n\n" + recalibration_text(manifest).rstrip() + "\n\n"
                    f"Now: risk = sigmoid(logit / {calibration['temperature'][finding]:.4f} + "
                    f"{calibration['bias'][finding]:.4f}); ECE {validation['ece_after']:.4f}; threshold "
                    f"{manifest['operating_point']['threshold']:.6f}.\n")


def recalibrate_bundle(bundle_dir: str | Path, data_dir: str | Path, out: str | Path, split: str = "validation",
                       version: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the recalibrated copy of ``bundle_dir`` to ``out``; returns its manifest as loaded back.

    ``split="validation"``: the validation patients of ``data_dir`` when it is one of the bundle's training
    sources, else (an external site) every image; ``"all"``: every image."""
    start = time.perf_counter()
    bundle_dir, out = Path(bundle_dir), Path(out)
    if out.resolve() == bundle_dir.resolve():
        raise EvaluationError(f"{out}: the output folder is the bundle itself. Fix: pass --out a new folder")
    if out.exists() and any(out.iterdir()):
        raise EvaluationError(f"{out}: not empty. Fix: pass --out a new folder (or remove it)")
    old = load_bundle(bundle_dir)
    images = select_images([data_dir], split, training_record(bundle_dir), log=log)
    part = images.split["sources"][0]
    if part["matches_training_record"] is False:
        raise EvaluationError(f"{data_dir}: {len(images.paths)} validation images here, another count was recorded at "
                              "training: not the data the bundle was trained on. Fix: pass that data folder, or "
                              "--split all for a site's own labelled images")
    scores, ok = score_bundle(bundle_dir, images, log=log)
    images = images.subset(ok)
    column = old.findings.index(old.triage_finding)
    labels = images.column(old.triage_finding)
    if len(np.unique(labels[~np.isnan(labels)])) < 2:
        raise EvaluationError(f"{data_dir}: the {split} split has one class only among its scorable images; "
                              "calibration needs both. Fix: add labelled images of the other class")
    report = validation_report(scores.logits, images.labels, old.flag_rate, column)
    fitted_on = f"{part['selection']} images of {part['name']} ({report['n']} images)"
    source = {"from": {"name": old.name, "version": old.version, "sha256": old.sha256},
              "data": str(data_dir), "split": split, "n_images": report["n"],
              "ece_before_recalibration": float(old.manifest["metrics"]["validation"].get("ece_after", float("nan")))
              if split == "validation" else None}
    manifest = recalibrated_manifest(old.manifest, report, fitted_on, version or next_version(old.version), source)
    known = ~np.isnan(labels)
    risks = sigmoid(scores.logits[known, column] / report["temperature"] + report["bias"])
    manifest["metrics"]["recalibration_data"] = {part["name"]: source_report(risks, labels[known], report["threshold"],
                                                                             old.flag_rate)}
    shutil.copytree(bundle_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
    write_manifest(out, manifest)
    parity = manifest["metrics"].get("parity", {})
    if parity.get("pipeline_files"):
        parity["pipeline_onnx_risks"] = [round(float(r), 8) for r in parity_risks(out, parity["pipeline_files"])]
    manifest["decode"] = decode_section(reduced_decode_diffs(out, reduced_decode_files()))  # risks moved: re-measure
    update_card(out / "MODEL_CARD.md", manifest)
    write_manifest(out, manifest)
    new = load_bundle(out)
    log(f"bundle {new.name} {new.version} -> {out}: T {report['temperature']:.4f}, b {report['bias']:.4f}; ECE "
        f"{report['ece_before']:.4f} uncalibrated, {report['ece_after']:.4f} calibrated on {report['n']} images; "
        f"threshold {report['threshold']:.6f}; reduced decode {new.reduced_decode and sorted(new.reduced_decode) or 'none'}; "
        f"{time.perf_counter() - start:.0f} s")
    return new.manifest
