"""Where the model runs: providers asked for, providers the session got, the one line that says so, the
``--device cuda`` refusal, and ``cxr-triage doctor``. Runs anywhere; the onnxruntime-gpu checks run when
``CXR_TRIAGE_GPU_WHEEL_PYTHON`` names the python of a venv with the plain ``onnxruntime-gpu`` wheel."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import main
from tests.tiny_bundle import build_tiny_bundle
from triage.bundle import load_bundle
from triage.inference import CPU, CUDA, DeviceError, choose_providers, load_model, placement_line, used_provider

REPO = Path(__file__).resolve().parents[1]
GPU_WHEEL_PYTHON = os.environ.get("CXR_TRIAGE_GPU_WHEEL_PYTHON", "")
ORT_NOISE = ("[E:onnxruntime", "[W:onnxruntime", "Failed to load", "EP Error", "libonnxruntime_providers_cuda")


@pytest.fixture
def tiny(tmp_path):
    return build_tiny_bundle(tmp_path / "tiny")


def test_providers_asked_for_prefer_cuda_then_cpu():
    assert choose_providers([CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers(["TensorrtExecutionProvider", CUDA, CPU], "cuda") == [CUDA, CPU]
    assert choose_providers([CPU]) == [CPU]
    assert choose_providers([CUDA, CPU], "cpu") == [CPU]


def test_cuda_asked_of_a_cpu_only_package_is_refused_with_the_fix():
    with pytest.raises(DeviceError, match=r"no CUDA provider .*Fix: install the gpu extra.*R580.*--device cpu"):
        choose_providers(["AzureExecutionProvider", CPU], "cuda")


def test_the_provider_used_is_the_one_the_session_got():
    assert used_provider("auto", [CUDA, CPU], "") == CUDA
    assert used_provider("auto", [CPU], "libcublasLt.so.13: cannot open shared object file") == CPU
    assert used_provider("cpu", [CPU], "") == CPU


def test_cuda_asked_for_but_not_got_is_refused_naming_why_and_the_fix():
    with pytest.raises(DeviceError) as caught:
        used_provider("cuda", [CPU], "libcublasLt.so.13: cannot open shared object file")
    assert isinstance(caught.value, RuntimeError)
    assert "--device cuda: ONNX Runtime cannot use CUDA here (libcublasLt.so.13" in str(caught.value)
    assert "cxr-triage doctor" in str(caught.value) and "--device cpu" in str(caught.value)


def test_placement_line_names_the_gpu_or_why_cpu():
    assert placement_line(CUDA, "auto", "", "1") == "ONNX Runtime: CUDAExecutionProvider (GPU 1)"
    assert placement_line(CPU, "cpu", "") == "ONNX Runtime: CPU (--device cpu)"
    assert placement_line(CPU, "auto", "libcuda.so.1: cannot open shared object file") == (
        "ONNX Runtime: CPU (CUDA not usable: libcuda.so.1: cannot open shared object file)")


def test_auto_on_this_machine_logs_one_line_and_onnx_runtime_says_nothing(tiny, caplog, capfd):
    caplog.set_level(logging.INFO, logger="triage.inference")
    model = load_model(load_bundle(tiny))
    lines = [r.getMessage() for r in caplog.records if r.name == "triage.inference" and r.levelno >= logging.INFO]
    assert lines == [model.placement]
    if model.provider == CPU:  # CI and this project's machines: no GPU
        assert model.placement.startswith("ONNX Runtime: CPU (CUDA not usable: ")
    out, err = capfd.readouterr()
    assert not [n for n in ORT_NOISE if n in out + err], out + err


def test_score_device_cuda_without_cuda_exits_1_with_the_fix(tmp_path, tiny, make_dicom, capsys):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    if CUDA in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here; the GPU wheel checks below cover it")
    code = main(["score", str(make_dicom()), "--bundle", str(tiny), "--device", "cuda", "--workers", "1",
                 "--out", str(tmp_path / "w.csv"), "--audit-db", str(tmp_path / "a.sqlite")])
    err = capsys.readouterr().err
    assert code == 1 and "--device cuda: this ONNX Runtime package has no CUDA provider" in err
    assert "Fix: install the gpu extra" in err


LOAD = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
        "from triage.bundle import load_bundle; from triage.inference import load_model; "
        "print(load_model(load_bundle('models/pneumonia-demo'), sys.argv[-1]).provider)")


def gpu_wheel_load(device: str) -> subprocess.CompletedProcess:
    """``load_model`` of the bundled model for ``device`` under the onnxruntime-gpu venv's python (this checkout on
    its path, logging at INFO to stderr), printing the provider used."""
    if not GPU_WHEEL_PYTHON:
        pytest.skip("set CXR_TRIAGE_GPU_WHEEL_PYTHON to a venv python with onnxruntime-gpu (without its CUDA "
                    "extras), numpy, pydicom and pillow to check the gpu wheel on a machine without CUDA")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([GPU_WHEEL_PYTHON, "-c", LOAD, device], capture_output=True, text=True, env=env, timeout=60,
                          cwd=REPO)


def test_gpu_wheel_without_cuda_auto_is_cpu_with_one_line_and_no_onnx_runtime_text():
    run = gpu_wheel_load("auto")
    if "CUDAExecutionProvider\n" == run.stdout:
        pytest.skip("this machine has a usable GPU")
    assert run.returncode == 0 and run.stdout == "CPUExecutionProvider\n", run.stderr
    assert run.stderr.startswith("ONNX Runtime: CPU (CUDA not usable: ") and run.stderr.count("\n") == 1, run.stderr
    assert not [n for n in ORT_NOISE if n in run.stderr], run.stderr


def test_gpu_wheel_without_cuda_refuses_device_cuda():
    run = gpu_wheel_load("cuda")
    if "CUDAExecutionProvider\n" == run.stdout:
        pytest.skip("this machine has a usable GPU")
    assert run.returncode == 1 and run.stdout == ""
    assert "DeviceError: --device cuda: ONNX Runtime cannot use CUDA here (" in run.stderr
    assert not [n for n in ORT_NOISE if n in run.stderr], run.stderr


def test_doctor_on_this_machine_says_scoring_works(tiny, capsys):
    assert main(["doctor", "--bundle", str(tiny)]) == 0
    out = capsys.readouterr().out
    for heading in ("python:", "onnxruntime:", "providers offered:", "nvidia driver:", "session:", "verdict:"):
        assert heading in out, out
    assert sys.version.split()[0] in out
    verdict = out.splitlines()[-1]
    assert verdict.startswith("verdict: scoring works")


def test_doctor_exits_1_when_the_bundle_cannot_load(tmp_path, capsys):
    assert main(["doctor", "--bundle", str(tmp_path)]) == 1
    verdict = capsys.readouterr().out.splitlines()[-1]
    assert verdict.startswith("verdict: cannot score: ") and str(tmp_path) in verdict


@pytest.mark.slow
def test_gpu_benchmark_runs_on_a_machine_without_cuda(tmp_path):
    figures = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--copies", "2", "--workers", "1",
                          "--batch-sizes", "1,4", "--seconds", "0.2", "--json", str(figures)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    rates = json.loads(figures.read_text())["images_per_s"]
    assert rates["end to end (score)"]["cpu"] > 0 and rates["model batch 4"]["cpu"] > 0
    if "cuda" not in json.loads(figures.read_text())["devices"]:
        assert run.stdout.splitlines()[-1].startswith("no CUDA here")
