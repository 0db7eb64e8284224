"""Fit the bundle's out-of-distribution gate (``triage.ood``) and measure it on real files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triage.bundle import load_bundle
from triage.inference import load_model
from triage.ood import fit_gate, save_gate, threshold_at
from triage.pipeline import prepare, score_prepared
from triage.preprocess import PreprocessSpec

from .decode_check import SHARED_DICOM, relative
from .onnx_graph import FEATURES_NAME, onnx_outputs
from .parity import pipeline_files

OOD_PERCENTILE, OOD_COMPONENTS, OOD_MAX_TRAIN = 100.0, 64, 5000
# The gate is for images that are not human chest radiographs at all, so its threshold is the largest distance of a
# validation image (percentile 100, no validation image refused; margin 1.0). The 99.5th percentile refused an adult
# PA chest CR (a population shift that the drift monitor and the model card cover, not a wrong input): measured on
# the default model, validation median 1.02, 99.5th percentile 1.31, max 1.45; adult chest CRs 1.05-1.35; dog
# thorax, hip, extremity, dental 1.55-1.82. A fixed margin over the percentile did not transfer between models.
OOD_MARGIN = 1.0


def fit_ood(served: Path, out: Path, x_train: np.ndarray, val_features: np.ndarray,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Fit the gate on the served model's training features, threshold on validation (x ``OOD_MARGIN``), save ``ood.npz``."""
    train_features = onnx_outputs(served, x_train)[FEATURES_NAME]
    gate, val_d = threshold_at(fit_gate(train_features, OOD_COMPONENTS), val_features, OOD_PERCENTILE)
    percentile_value = gate.threshold
    gate = gate.with_threshold(percentile_value * OOD_MARGIN)
    save_gate(gate, out / "ood.npz")
    log(f"OOD gate: threshold {gate.threshold:.3f} = {OOD_MARGIN} x {percentile_value:.3f}, the {OOD_PERCENTILE}th "
        f"percentile of {len(val_d)} validation distances (median {np.median(val_d):.3f}, max {val_d.max():.3f})")
    return {"method": "mahalanobis_ppca", "file": "ood.npz", "features_output": FEATURES_NAME,
            "threshold": gate.threshold, "percentile": OOD_PERCENTILE, "percentile_distance": percentile_value,
            "margin": OOD_MARGIN, "n_components": int(gate.components.shape[0]),
            "fitted_on": f"{len(train_features)} training images", "threshold_on": f"{len(val_d)} validation images",
            "validation_distance": {"median": float(np.median(val_d)), "p99": float(np.percentile(val_d, 99)),
                                    "max": float(val_d.max()), "flagged_fraction": float(np.mean(val_d > gate.threshold))}}


def ood_check_files() -> list[Path]:
    """Sample studies and, when the shared data is beside the checkout, its real DICOM files (chest and out of scope)."""
    shared = sorted(p for p in SHARED_DICOM.glob("*/*.dcm")) if SHARED_DICOM.is_dir() else []
    return pipeline_files() + shared


def unchecked_input(path: Path, spec: PreprocessSpec) -> np.ndarray | None:
    """The model input of a DICOM file decoded WITHOUT triage's tag checks (to measure the gate on out-of-scope
    files that the tags already refuse); None when it cannot be decoded."""
    from triage.errors import BadInputError
    from triage.ingest import decode_pixels, ensure_transfer_syntax, parse_dicom, read_bytes
    from triage.preprocess import preprocess
    from triage.radiograph import ImageMeta, Radiograph

    try:
        ds = parse_dicom(str(path), read_bytes(path))
        ensure_transfer_syntax(ds, str(path))
        pixels = decode_pixels(ds, str(path))
    except (BadInputError, OSError):
        return None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if pixels.ndim != 2 or not photometric.startswith("MONOCHROME"):
        return None
    del ds.PixelData
    return preprocess(Radiograph(str(path), "", pixels, photometric, ImageMeta("", "", ""), ds), spec)


def ood_report(bundle_dir: Path, files: Sequence[Path]) -> dict[str, Any]:
    """Per file: the pipeline's status and reason with the bundle, and the gate's distance measured without tag checks."""
    bundle = load_bundle(bundle_dir)
    model = load_model(bundle, device="cpu")
    report = {}
    for path in files:
        decision = score_prepared(model, [prepare(str(path), bundle.preprocessing)], lambda pid: "")[0]
        x = unchecked_input(path, bundle.preprocessing)
        distance = None if x is None else float(model.ood.distances(model.run(x[None], cams=False).features)[0])
        report[relative(path)] = {"status": decision.status, "reason": decision.reason,
                                  "distance": None if distance is None else round(distance, 4),
                                  "over_threshold": None if distance is None else bool(distance > model.ood.threshold)}
    return report

