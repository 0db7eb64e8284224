"""Parity checks of an export: ONNX Runtime vs PyTorch on validation images, the ONNX CAM vs MONAI's,
and the whole pipeline (DICOM file -> calibrated risk) on the sample studies; each fails the export
beyond its tolerance (``ParityError``). ``parity_risks`` re-scores the parity files with a written bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from triage.bundle import load_bundle
from triage.errors import TriageError
from triage.inference import calibrated_risk, load_model, sigmoid
from triage.pipeline import prepare
from triage.preprocess import PreprocessSpec

from .decode_check import relative
from .onnx_graph import onnx_logits, torch_cam, torch_logits

PARITY_TOLERANCE = 1e-4  # max |sigmoid(torch) - sigmoid(onnx)| over the parity images
PIPELINE_TOLERANCE = 1e-4  # max |risk(torch) - risk(onnx)|, DICOM file -> calibrated risk
CAM_TOLERANCE = 1e-3  # max |cam(onnx) - cam(MONAI, torch)| in logit units
CAM_CHECK_IMAGES = 16
MIN_PARITY_IMAGES = 64
REPO = Path(__file__).resolve().parents[1]
PIPELINE_FILES = ("samples/kermany/*.dcm", "samples/dicom/*.dcm")  # unscorable ones (out of scope) are skipped


class ParityError(TriageError, AssertionError):
    """ONNX Runtime and PyTorch disagree on the same inputs beyond the tolerance."""


def check_parity(torch_logits: np.ndarray, ort_logits: np.ndarray, tolerance: float = PARITY_TOLERANCE,
                 min_images: int = MIN_PARITY_IMAGES) -> dict[str, Any]:
    """Max abs difference of sigmoid probabilities; raises ``ParityError`` above ``tolerance``."""
    if len(torch_logits) < min_images:
        raise ParityError(f"parity needs at least {min_images} images, got {len(torch_logits)}")
    diff = float(np.max(np.abs(sigmoid(torch_logits.astype(np.float64)) - sigmoid(ort_logits.astype(np.float64)))))
    if not diff <= tolerance:
        raise ParityError(f"ONNX Runtime differs from PyTorch by {diff:.2e} in probability (> {tolerance:.0e}) on "
                          f"{len(torch_logits)} images. Fix: check the export opset and unsupported ops, then re-export")
    return {"max_abs_risk_diff": diff, "n_images": int(len(torch_logits))}


def check_cam_parity(net: nn.Module, x: np.ndarray, ort_cams: np.ndarray, tolerance: float = CAM_TOLERANCE) -> dict[str, Any]:
    """ONNX CAMs (N, F, h, w) vs MONAI's torch CAM on the same inputs; ``ParityError`` above ``tolerance``."""
    reference = torch_cam(net, torch.from_numpy(np.ascontiguousarray(x)))
    if reference.shape != ort_cams.shape:
        raise ParityError(f"CAM shapes differ: ONNX {ort_cams.shape}, MONAI CAM {reference.shape}. Fix: re-export")
    diff = float(np.max(np.abs(reference - ort_cams)))
    if not diff <= tolerance:
        raise ParityError(f"the ONNX CAM differs from MONAI's CAM by {diff:.2e} (> {tolerance:.0e}) on {len(x)} images. "
                          "Fix: check feature_map() against the network's forward, then re-export")
    return {"cam_max_abs_diff": diff, "cam_n_images": int(len(x)), "cam_reference": "monai.visualize.CAM"}


def pipeline_files(patterns: Sequence[str] = PIPELINE_FILES, root: Path = REPO) -> list[Path]:
    """The files of the whole-pipeline parity check, sorted."""
    return sorted(p for pattern in patterns for p in root.glob(pattern) if p.is_file())


def pipeline_parity(net: nn.Module, model_path: Path, files: Sequence[Path], spec: PreprocessSpec,
                    temperatures: np.ndarray, biases: np.ndarray | None = None,
                    tolerance: float = PIPELINE_TOLERANCE, column: int = 0) -> dict[str, Any]:
    """DICOM file -> calibrated risk with PyTorch vs ONNX Runtime, through triage's decode and preprocessing.

    Raises ``ParityError`` above ``tolerance`` or when no file is scorable.
    """
    prepared = [prepare(str(f), spec) for f in files]
    used = [(f, p) for f, p in zip(files, prepared) if p.model_input is not None]
    if not used:
        raise ParityError(f"no scorable file among {len(files)} pipeline parity files. Fix: restore samples/")
    x = np.stack([p.model_input for _, p in used])
    risk_torch = calibrated_risk(torch_logits(net, x), temperatures, biases)
    risk_onnx = calibrated_risk(onnx_logits(model_path, x), temperatures, biases)
    diff = float(np.max(np.abs(risk_torch - risk_onnx)))
    if not diff <= tolerance:
        raise ParityError(f"DICOM -> risk differs between PyTorch and ONNX Runtime by {diff:.2e} (> {tolerance:.0e}) "
                          f"on {len(used)} files. Fix: check the export, then re-export")
    return {"pipeline_max_abs_risk_diff": diff, "pipeline_tolerance": tolerance,
            "pipeline_onnx_model": Path(model_path).name,
            "pipeline_files": [relative(f) for f, _ in used],
            "pipeline_skipped": {relative(f): p.reason for f, p in zip(files, prepared) if p.model_input is None},
            "pipeline_onnx_risks": [round(float(r), 8) for r in risk_onnx[:, column]]}


def verify_served(bundle_dir: Path, parity: dict[str, Any], is_int8: bool) -> float:
    """The written bundle, loaded like a scorer loads it, re-scores the parity files: max |risk - recorded risk|."""
    risks = parity_risks(bundle_dir, parity["pipeline_files"])
    diff = float(np.max(np.abs(risks - np.asarray(parity["pipeline_onnx_risks"]))))
    if not is_int8 and not diff <= PIPELINE_TOLERANCE:
        raise ParityError(f"{bundle_dir}: the served bundle's risks differ from the export's by {diff:.2e}. Fix: re-export")
    return diff



def parity_risks(bundle_dir: Path, files: list[str]) -> np.ndarray:
    """The served risks (N,) of the parity files (paths relative to the checkout), loaded and calibrated as a
    scorer does (full decode, as the parity check records them)."""
    bundle = load_bundle(bundle_dir)
    model = load_model(bundle, device="cpu")
    x = np.stack([prepare(str(REPO / f), bundle.preprocessing).model_input for f in files])
    column = bundle.findings.index(bundle.triage_finding)
    return calibrated_risk(model.logits(x), model.temperatures, model.biases)[:, column]
