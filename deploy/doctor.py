"""``cxr-triage doctor``: will scoring work here, and on which device? One line per check, then a verdict.

It reports Python, the ONNX Runtime package (``onnxruntime`` or ``onnxruntime-gpu``) and the providers it
offers, whether an NVIDIA driver is visible (``nvidia-smi``, else ``/proc/driver/nvidia/version``), and what a
session on the bundle really gets (``--device auto``: CUDA when it can, else CPU and why), checked by running
the model once. Exit 0 when scoring works (on CPU too), 1 when the bundle cannot load or the model cannot run.
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triage.bundle import load_bundle
from triage.errors import TriageError
from triage.inference import CUDA, GPU_FIX, Model, load_model, package_name

from .paths import default_bundle_dir

MIN_DRIVER_MAJOR = 580  # the gpu extra's onnxruntime-gpu 1.31.1 is built with CUDA 13.0: NVIDIA driver R580 or newer
PROC_DRIVER = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class Driver:
    """The NVIDIA driver this machine shows: ``version`` ("" when none is seen) and what showed it."""

    version: str
    detail: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0]) if self.version[:1].isdigit() else 0


def find_driver(nvidia_smi: str | None = None, proc_version: Path = PROC_DRIVER) -> Driver:
    """The driver as ``nvidia-smi`` lists it (version, then one GPU per line), else as the kernel module reports it."""
    nvidia_smi = nvidia_smi or shutil.which("nvidia-smi")
    if nvidia_smi:
        try:
            listed = subprocess.run([nvidia_smi, "--query-gpu=driver_version,index,name,memory.total",
                                     "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as error:
            return Driver("", f"nvidia-smi did not answer ({error})")
        rows = [row.split(", ", 1) for row in listed.stdout.splitlines() if row.strip()]
        if listed.returncode == 0 and rows:
            return Driver(rows[0][0], "; ".join(f"GPU {gpu}" for _, gpu in rows))
        said = (listed.stderr or listed.stdout).strip()
        return Driver("", f"nvidia-smi failed: {said.splitlines()[0] if said else f'exit {listed.returncode}'}")
    try:
        text = proc_version.read_text()
    except OSError:
        return Driver("", f"not found (no nvidia-smi on PATH, no {proc_version})")
    found = re.search(r"Kernel Module\s+(\d+\.\d+(?:\.\d+)?)", text)
    return Driver(found.group(1) if found else "", text.splitlines()[0] if text else str(proc_version))


def driver_line(driver: Driver) -> str:
    """``nvidia driver:`` line, saying when the driver is too old for the gpu extra's CUDA 13."""
    if not driver.version:
        return f"nvidia driver: {driver.detail}"
    too_old = (f"; older than R{MIN_DRIVER_MAJOR}, which the gpu extra's CUDA 13 needs. Fix: update the NVIDIA driver"
               if driver.major < MIN_DRIVER_MAJOR else "")
    return f"nvidia driver: {driver.version} ({driver.detail}){too_old}"


def try_model(model: Model) -> None:
    """Run the model once on a zero batch of its input shape (symbolic dimensions as 1): a CUDA session can load
    and still fail to run (a GPU its kernels were not built for, memory). Raises ``InferenceError``."""
    shape = [d if isinstance(d, int) else 1 for d in model.session.get_inputs()[0].shape]
    model.run(np.zeros(shape, np.float32))


def verdict(model: Model, offered: Sequence[str], driver: Driver) -> str:
    """The verdict line for a model that loaded and ran."""
    if model.provider == CUDA:
        return "verdict: scoring works, on the GPU"
    if CUDA in offered and driver.version:
        return f"verdict: scoring works, on CPU only: the GPU is not used ({model.placement}). {GPU_FIX}"
    if CUDA in offered:
        return "verdict: scoring works, on CPU (no NVIDIA driver here, so no GPU to use)"
    if driver.version:
        return ("verdict: scoring works, on CPU; this machine has an NVIDIA driver: to use its GPU, install the gpu "
                "extra instead of the cpu one (pip uninstall onnxruntime, then pip install -e '.[gpu]')")
    return "verdict: scoring works, on CPU"


def doctor_lines(bundle_dir: Path | str) -> tuple[list[str], int]:
    """The report's lines and the exit code (0 scoring works, 1 it does not)."""
    import onnxruntime as ort

    offered = ort.get_available_providers()
    build = f", built for CUDA {ort.cuda_version}" if getattr(ort, "cuda_version", "") else ""
    driver = find_driver()
    lines = [f"python: {platform.python_version()} ({sys.executable})",
             f"onnxruntime: {package_name()} {ort.__version__}{build}",
             f"providers offered: {', '.join(offered)}",
             driver_line(driver)]
    if " + " in package_name():
        lines.append("warning: onnxruntime and onnxruntime-gpu are both installed and overwrite each other's files. "
                     "Fix: pip uninstall -y onnxruntime onnxruntime-gpu, then install one of the cpu and gpu extras")
    try:
        bundle = load_bundle(bundle_dir)
        lines.append(f"bundle: {bundle.name} {bundle.version} ({bundle.path})")
        model = load_model(bundle, "auto")
        lines.append(f"session: {model.placement}")
        try_model(model)
    except (TriageError, OSError) as error:
        return [*lines, f"verdict: cannot score: {error}"], 1
    return [*lines, verdict(model, offered, driver)], 0


def doctor_command(args: argparse.Namespace) -> int:
    """CLI entry for ``cxr-triage doctor``."""
    lines, code = doctor_lines(args.bundle)
    print("\n".join(lines))
    return code


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``doctor`` on the main CLI."""
    parser = subparsers.add_parser(
        "doctor", help="check that scoring works here and on which device (CPU, or the GPU and why not)",
        description="Print Python, the ONNX Runtime package and its providers, the NVIDIA driver, and the device a "
                    "session on the bundle really gets (run once), then a verdict. Exit 0 when scoring works "
                    "(CPU counts), 1 when the bundle cannot load or the model cannot run.")
    parser.add_argument("--bundle", default=str(default_bundle_dir()),
                        help="model bundle folder (default: the bundled demo model)")
    parser.set_defaults(func=doctor_command)
