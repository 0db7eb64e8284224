"""ONNX Runtime session for a bundle: GPU when present, CPU otherwise, reported.

``Model.run`` returns every output the bundle declares in one pass: logits, and for
bundles that have them the class activation maps (heatmaps computed in the graph,
no gradients) and the features read by the input gate (``triage.ood``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .bundle import Bundle
from .errors import BundleError, TriageError
from .ood import InputGate, load_input_gate

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class InferenceError(TriageError, RuntimeError):
    """ONNX Runtime failed on a batch (its own exception types subclass plain ``Exception``)."""


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types ONNX Runtime raises: its pybind11 ones (``InvalidProtobuf``, ``InvalidArgument``, ``Fail``,
    ``RuntimeException``... which subclass plain ``Exception``) and Python's ``RuntimeError``/``ValueError``."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)
                and v.__module__ == state.__name__)
    return (*own, RuntimeError, ValueError)


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


def calibrated_risk(logits: np.ndarray, temperatures: np.ndarray, biases: np.ndarray | None = None) -> np.ndarray:
    """Calibrated probabilities ``sigmoid(logit / T + b)`` (Platt scaling; b = 0 is temperature scaling).
    logits (N, F) float, temperatures (F,), biases (F,) or None -> (N, F) float64."""
    shifted = np.asarray(logits, dtype=np.float64) / temperatures[None, :]
    return sigmoid(shifted if biases is None else shifted + np.asarray(biases, np.float64)[None, :])


class Outputs(NamedTuple):
    """One forward pass. ``logits`` (N, F) float32; ``cams`` (N, F, h, w) float32 in logit units (the spatial
    mean of a map is its logit) or None; ``features`` (N, D) float32 pooled features or None."""

    logits: np.ndarray
    cams: np.ndarray | None = None
    features: np.ndarray | None = None


@dataclass
class Model:
    """A bundle's ONNX model ready to score batches. Build with ``load_model``.

    ``ood`` is the bundle's out-of-distribution gate, or None when it has none.
    """

    bundle: Bundle
    session: "object"
    provider: str
    temperatures: np.ndarray
    ood: InputGate | None = None
    biases: np.ndarray | None = None  # calibration shifts (F,); None for temperature-only bundles

    @property
    def has_cam(self) -> bool:
        return self.bundle.cam_output is not None

    def run(self, batch: np.ndarray, cams: bool = True, features: bool = True) -> Outputs:
        """Model inputs (N, C, H, W) float32 -> ``Outputs``; maps/features the bundle lacks (or not asked for) are None."""
        names = [self.bundle.logits_output]
        optional = {"cams": self.bundle.cam_output if cams else None,
                    "features": self.bundle.features_output if features else None}
        names += [n for n in optional.values() if n]
        try:
            values = dict(zip(names, self.session.run(names, {self.bundle.input_name: batch})))
        except ort_errors() as error:
            raise InferenceError(f"ONNX Runtime failed on a batch of {len(batch)} ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''})") from error
        return Outputs(values[names[0]], *(values[n] if n else None for n in optional.values()))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Model inputs (N, C, H, W) float32 -> raw logits (N, F) float32."""
        return self.session.run([self.bundle.logits_output], {self.bundle.input_name: batch})[0]

    def risks(self, batch: np.ndarray) -> np.ndarray:
        """Model inputs (N, C, H, W) float32 -> calibrated risk per finding (N, F) float64."""
        return calibrated_risk(self.logits(batch), self.temperatures, self.biases)


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
    except ort_errors() as error:  # InvalidProtobuf & co. subclass plain Exception
        raise BundleError(f"{bundle.model_path}: ONNX Runtime could not load the model ({error}). Fix: rebuild the bundle") from error
    names = {i.name for i in session.get_inputs()}
    if bundle.input_name not in names:
        raise BundleError(f"{bundle.model_path}: no input named {bundle.input_name!r} (model has {sorted(names)}); manifest and model disagree")
    outputs = {o.name for o in session.get_outputs()}
    declared = [n for n in (bundle.logits_output, bundle.cam_output, bundle.features_output) if n]
    if missing := [n for n in declared if n not in outputs]:
        raise BundleError(f"{bundle.model_path}: no output named {missing} (model has {sorted(outputs)}); "
                          "manifest and model disagree. Fix: rebuild the bundle")
    temperatures = np.array([bundle.temperature(f) for f in bundle.findings], dtype=np.float64)
    biases = np.array([bundle.bias(f) for f in bundle.findings], dtype=np.float64)
    ood = load_input_gate(bundle.path / bundle.ood["file"], bundle.ood) if bundle.ood else None
    return Model(bundle, session, session.get_providers()[0], temperatures, ood, biases)
