"""ONNX Runtime session for a bundle: GPU when present, CPU otherwise, reported."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import Bundle
from .errors import BundleError

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(available: list[str], device: str = "auto") -> list[str]:
    """Providers to ask for, best first. ``device`` is "auto", "cpu" or "cuda"."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    wanted = [p for p in PREFERRED_PROVIDERS if p in available]
    if device == "cuda" and "CUDAExecutionProvider" not in wanted:
        raise BundleError(
            "device 'cuda' asked for, but ONNX Runtime offers only "
            f"{available}. Fix: install the gpu extra (pip install -e '.[gpu]') with a matching CUDA, or use --device cpu"
        )
    return wanted or ["CPUExecutionProvider"]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def calibrated_risk(logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """Temperature-scaled probabilities. logits (N, F) float, temperatures (F,) -> (N, F) float64."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / temperatures[None, :])


@dataclass
class Model:
    """A bundle's ONNX model ready to score batches. Build with ``load_model``."""

    bundle: Bundle
    session: "object"
    provider: str
    temperatures: np.ndarray

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Model inputs (N, C, H, W) float32 -> raw logits (N, F) float32."""
        return self.session.run([self.bundle.logits_output], {self.bundle.input_name: batch})[0]

    def risks(self, batch: np.ndarray) -> np.ndarray:
        """Model inputs (N, C, H, W) float32 -> calibrated risk per finding (N, F) float64."""
        return calibrated_risk(self.logits(batch), self.temperatures)


def load_model(bundle: Bundle, device: str = "auto", threads: int = 0) -> Model:
    """Open an ONNX Runtime session on the bundle's model with explicit providers.

    ``threads`` = 0 lets ONNX Runtime choose the intra-op thread count.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = choose_providers(ort.get_available_providers(), device)
    try:
        session = ort.InferenceSession(str(bundle.model_path), sess_options=options, providers=providers)
    except (RuntimeError, ValueError) as error:  # onnxruntime raises its own subclasses of these
        raise BundleError(f"{bundle.model_path}: ONNX Runtime could not load the model ({error}). Fix: rebuild the bundle") from error
    names = {i.name for i in session.get_inputs()}
    if bundle.input_name not in names:
        raise BundleError(f"{bundle.model_path}: no input named {bundle.input_name!r} (model has {sorted(names)}); manifest and model disagree")
    temperatures = np.array([bundle.temperature(f) for f in bundle.findings], dtype=np.float64)
    return Model(bundle, session, session.get_providers()[0], temperatures)
