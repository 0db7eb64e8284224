"""Fit the bundle's input gate (``triage.ood.InputGate``) on frontal chests and measure it on real files.

Fitted and thresholded on the training sources' frontal chest radiographs only: no lateral view, and nothing
fitted or tuned on one, ever goes into a bundle (``../shared/data/lateral-views`` is for tests and benchmarks).
Each part's statistics come from the training images; its cut, and the threshold of the refusal score, are
the largest per-source ``GATE_PERCENTILE`` of the validation images, so every covered population is held to
the same false-refusal rate (about 1 - percentile on its own validation images).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triage.bundle import load_bundle
from triage.inference import load_model
from triage.ood import fit_input_gate, save_input_gate
from triage.pipeline import Prepared, prepare, score_prepared
from triage.preprocess import PreprocessSpec

from .decode_check import SHARED_DICOM, relative
from .onnx_graph import FEATURES_NAME, GATE_PARTS, GATE_SCORE_PARTS, GATE_VIEW_PART, GATE_WHAT, onnx_outputs
from .parity import pipeline_files

GATE_PERCENTILE, GATE_COMPONENTS, OOD_MAX_TRAIN = 99.5, 64, 5000
# Chosen on frontal validation images and real DICOMs, then measured on the lateral views (benchmarks/bench_gate.py;
# issue 13): the 2x2 layouts of ImageNet stages 3 and 4 refused 12 of 12 laterals and 0 of 5 chest DICOMs at 0.1%
# / 1.0% of the Kermany / NIH validation frontals; the classifier's own pooled features refused 0 of 12 laterals,
# ImageNet's last pooled features 10 of 12.


def fit_ood(served: Path, out: Path, x_train: np.ndarray, train_sources: Sequence[str], val_features: np.ndarray,
            val_sources: Sequence[str], log: Callable[[str], None]) -> dict[str, Any]:
    """Fit the gate on the served graph's features of the training images, cut on validation, save ``ood.npz``;
    the manifest's ``ood`` section."""
    train_features = onnx_outputs(served, x_train)[FEATURES_NAME]
    sources = np.asarray(val_sources)
    gate = fit_input_gate(train_features, np.asarray(train_sources), val_features, sources, GATE_PARTS,
                          GATE_SCORE_PARTS, GATE_VIEW_PART, GATE_PERCENTILE, GATE_COMPONENTS)
    section = save_input_gate(gate, out / "ood.npz")
    verdict = gate.assess(val_features)
    by_source = {str(s): {"n": int((sources == s).sum()), "refused": int(verdict.refused[sources == s].sum()),
                          "score_median": float(np.median(verdict.score[sources == s]))} for s in np.unique(sources)}
    log(f"input gate: threshold {gate.threshold:.3f} on the mean of {', '.join(GATE_SCORE_PARTS)}; validation refused "
        + ", ".join(f"{s} {f['refused']}/{f['n']}" for s, f in by_source.items()))
    return {"method": "imagenet_ppca_parts", "file": "ood.npz", "features_output": FEATURES_NAME, **section,
            "features": GATE_WHAT, "percentile": GATE_PERCENTILE, "n_components": GATE_COMPONENTS,
            "rule": f"refused when the mean over {list(GATE_SCORE_PARTS)} of distance / part cut is over the threshold; "
                    f"then view_out_of_scope when '{GATE_VIEW_PART}' is within its cut (chest-like texture, not a "
                    "frontal layout), else out_of_distribution",
            "cuts": f"each part's cut and the threshold: the largest per-source {GATE_PERCENTILE}th percentile of the "
                    "validation images",
            "fitted_on": f"{len(train_features)} training images (frontal chests; every source weighted alike)",
            "threshold_on": f"{len(sources)} validation images (frontal chests)", "validation": by_source}


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


def gate_input(path: Path, spec: PreprocessSpec, prepared: Prepared | None = None) -> np.ndarray | None:
    """The model input of any file the pipeline reads (PNG/JPEG or DICOM), a DICOM's tag checks skipped;
    ``prepared``: the file's ``prepare`` result when the caller has it already."""
    prepared = prepare(str(path), spec) if prepared is None else prepared
    return prepared.model_input if prepared.model_input is not None else unchecked_input(path, spec)


def ood_report(bundle_dir: Path, files: Sequence[Path]) -> dict[str, Any]:
    """Per file: the pipeline's status and reason with the bundle, and the gate's score and reason measured without
    tag checks."""
    bundle = load_bundle(bundle_dir)
    model = load_model(bundle, device="cpu")
    report: dict[str, Any] = {}
    for path in files:
        prepared = prepare(str(path), bundle.preprocessing)
        decision = score_prepared(model, [prepared], lambda pid: "")[0]
        x = gate_input(path, bundle.preprocessing, prepared)
        verdict = None if x is None else model.ood.assess(model.run(x[None], cams=False).features)
        report[relative(path)] = {"status": decision.status, "reason": decision.reason,
                                  "gate_score": None if verdict is None else round(float(verdict.score[0]), 4),
                                  "gate_reason": None if verdict is None else verdict.reasons[0]}
    return report


def gate_table(report: Mapping[str, Any]) -> list[str]:
    """The files the gate refused (measured without tag checks), for the export log."""
    return [f"{name} ({r['gate_reason']})" for name, r in report.items() if r.get("gate_reason")]
