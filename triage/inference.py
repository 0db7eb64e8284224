"""ONNX Runtime session for a bundle: on CUDA only when the session really gets it, else CPU, said in one line.

``Model.run`` returns every output the bundle declares in one pass: logits, and for
bundles that have them the class activation maps (heatmaps computed in the graph,
no gradients) and the features read by the input gate (``triage.ood``).

With the ``gpu`` extra, ONNX Runtime lists ``CUDAExecutionProvider`` whether or not CUDA can run here: a
session asked for it falls back to CPU when a CUDA library, the NVIDIA driver or the GPU is missing, and
prints its own red error text. ``load_model`` therefore loads the CUDA and cuDNN libraries of the extra's
``nvidia-*`` wheels first (``onnxruntime.preload_dlls``), keeps ONNX Runtime's log quiet during the attempt,
reads the providers the session got, and logs one line saying where the model runs and, on CPU, why.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .bundle import Bundle
from .errors import BundleError, TriageError
from .ood import InputGate, load_input_gate

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
PREFERRED_PROVIDERS = (CUDA, CPU)
ORT_ERRORS_ONLY = 3  # ONNX Runtime log severity (0 verbose .. 4 fatal) of sessions and of its default logger
ORT_FATAL_ONLY = 4  # during the CUDA attempt: a failed provider library load is an ERROR line we explain ourselves
GPU_FIX = ("Fix: install the gpu extra (pip install -e '.[gpu]': onnxruntime-gpu with CUDA 13 and cuDNN 9 from PyPI) "
           "on a machine with the NVIDIA driver R580 or newer (nvidia-smi shows it), check with cxr-triage doctor, "
           "or use --device cpu")

log = logging.getLogger(__name__)


class InferenceError(TriageError, RuntimeError):
    """ONNX Runtime failed on a batch (its own exception types subclass plain ``Exception``)."""


class DeviceError(TriageError, RuntimeError):
    """The device asked for (``--device cuda``) cannot be used here; the message says why and the fix."""


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types ONNX Runtime raises: its pybind11 ones (``InvalidProtobuf``, ``InvalidArgument``, ``Fail``,
    ``RuntimeException``... which subclass plain ``Exception``) and Python's ``RuntimeError``/``ValueError``."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)
                and v.__module__ == state.__name__)
    return (*own, RuntimeError, ValueError)


def choose_providers(available: Sequence[str], device: str = "auto") -> list[str]:
    """Providers to ask for, best first, from those the installed ONNX Runtime offers
    (``onnxruntime.get_available_providers()``). ``device`` is "auto", "cpu" or "cuda"."""
    if device == "cpu":
        return [CPU]
    wanted = [p for p in PREFERRED_PROVIDERS if p in available]
    if device == "cuda" and CUDA not in wanted:
        raise DeviceError(f"--device cuda: this ONNX Runtime package has no CUDA provider (it offers "
                          f"{', '.join(available)}). {GPU_FIX}")
    return wanted or [CPU]


def used_provider(device: str, providers: Sequence[str], cuda_problem: str) -> str:
    """The provider a session runs on, from those it reports (``session.get_providers()``, best first). Raises
    ``DeviceError`` when ``device`` is "cuda" and the session did not get CUDA; ``cuda_problem`` says why."""
    if device == "cuda" and CUDA not in providers:
        raise DeviceError(f"--device cuda: ONNX Runtime cannot use CUDA here ({cuda_problem}). {GPU_FIX}")
    return providers[0]


def placement_line(provider: str, device: str, cuda_problem: str, device_id: str = "0") -> str:
    """The one line a program logs about where the model runs: the GPU, or CPU and why."""
    if provider == CUDA:
        return f"ONNX Runtime: {CUDA} (GPU {device_id})"
    why = "--device cpu" if device == "cpu" else f"CUDA not usable: {cuda_problem}"
    return f"ONNX Runtime: CPU ({why})"


def preload_cuda(ort: Any) -> None:
    """Load the CUDA and cuDNN libraries that the gpu extra's ``nvidia-*`` wheels install
    (``onnxruntime.preload_dlls``, absent before 1.21); the line it prints per library it cannot find goes
    to the debug log, not to standard output."""
    if not hasattr(ort, "preload_dlls"):
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ort.preload_dlls()
    for line in printed.getvalue().splitlines():
        log.debug("onnxruntime.preload_dlls: %s", line)


def cuda_library_problem(ort: Any) -> str:
    """Why ONNX Runtime's CUDA provider library does not load here, in the dynamic loader's words
    (``libcublasLt.so.13: cannot open shared object file: No such file or directory``); "" when it loads.
    Loads it as ONNX Runtime does: its ``providers_shared`` library first, with global symbols."""
    capi = Path(ort.capi.__file__).parent
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
    except OSError as error:
        return str(error).splitlines()[0]
    return ""


def session_options(ort: Any, threads: int) -> Any:
    """Options for every session: ``threads`` intra-op threads (0: ONNX Runtime's choice), all graph optimizations,
    and only ONNX Runtime's errors in the log (its warnings are about provider assignment, not about a result)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = ORT_ERRORS_ONLY
    return options


def new_session(ort: Any, bundle: Bundle, options: Any, providers: list[str]) -> Any:
    """An ``InferenceSession`` on the bundle's model. No silent fallback: a provider that fails while running
    raises (the study goes to human review) instead of switching the session to CPU behind ``Model.provider``."""
    try:
        return ort.InferenceSession(str(bundle.model_path), sess_options=options, providers=providers,
                                    enable_fallback=0)
    except ort_errors() as error:  # InvalidProtobuf & co. subclass plain Exception
        raise BundleError(f"{bundle.model_path}: ONNX Runtime could not load the model ({error}). "
                          "Fix: rebuild the bundle") from error


def open_session(ort: Any, bundle: Bundle, device: str, threads: int) -> tuple[Any, str]:
    """A session on the bundle's model for ``device`` ("auto", "cpu" or "cuda"), and why it did not get CUDA ("" when
    it did, or was not asked to). CUDA is tried quietly; the reason is then ONNX Runtime's own exception, or the
    dynamic loader's message about the CUDA provider library."""
    options = session_options(ort, threads)
    providers = choose_providers(ort.get_available_providers(), device)
    if CUDA not in providers:
        missing = "" if device == "cpu" else f"the {package_name()} package has no CUDA provider; install the gpu extra"
        return new_session(ort, bundle, options, providers), missing
    preload_cuda(ort)
    ort.set_default_logger_severity(ORT_FATAL_ONLY)
    try:
        session = new_session(ort, bundle, options, providers)
    except BundleError as error:  # CUDA's own failure (driver, device) or the model's: CPU alone tells which
        session = new_session(ort, bundle, session_options(ort, threads), [CPU])
        return session, str(error.__cause__).splitlines()[0]
    finally:
        ort.set_default_logger_severity(ORT_ERRORS_ONLY)
    if CUDA in session.get_providers():
        return session, ""
    return session, cuda_library_problem(ort) or "the session did not get CUDA; cxr-triage doctor says more"


ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")  # the alternative wheels that provide the ``onnxruntime`` module


def package_name() -> str:
    """The installed distribution(s) of ``ORT_DISTRIBUTIONS`` (both when they were installed together), looked up by
    name: ``packages_distributions()`` reads every installed package's metadata (150-330 ms per model load)."""
    from importlib.metadata import PackageNotFoundError, distribution

    def installed(name: str) -> bool:
        try:
            distribution(name)
        except PackageNotFoundError:
            return False
        return True

    return " + ".join(filter(installed, ORT_DISTRIBUTIONS)) or "onnxruntime"


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
    placement: str = ""  # the line logged at load: "ONNX Runtime: CUDAExecutionProvider (GPU 0)" or "... CPU (why)"

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
    """Open an ONNX Runtime session on the bundle's model (see ``open_session``) and log where it runs, one line.

    ``device`` "auto" runs on CUDA when the session gets it, else CPU (a warning when the gpu extra is installed);
    "cuda" raises ``DeviceError`` naming the reason and the fix instead of running on CPU. ``threads`` = 0 lets
    ONNX Runtime choose the intra-op thread count.
    """
    import onnxruntime as ort

    session, cuda_problem = open_session(ort, bundle, device, threads)
    provider = used_provider(device, session.get_providers(), cuda_problem)
    device_id = str(session.get_provider_options().get(CUDA, {}).get("device_id", "0"))
    placement = placement_line(provider, device, cuda_problem, device_id)
    is_cuda_missed = provider != CUDA and CUDA in ort.get_available_providers() and device != "cpu"
    log.log(logging.WARNING if is_cuda_missed else logging.INFO, "%s", placement)
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
    return Model(bundle, session, provider, temperatures, ood, biases, placement)
