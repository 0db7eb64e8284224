"""GPU serving: images/s for decode, model and end to end, CPU and CUDA side by side, and fp16 parity.

One prepared script for issue 17. NOT YET RUN ON A GPU: on a CPU machine it runs the CPU column, says
"no CUDA here" and exits 0. It installs nothing: run it under a venv with the gpu extra
(``pip install -e ".[gpu]"``; for the fp16 part also ``pip install onnx onnxconverter-common``).

Files: the bundled samples (``samples/``) and ``--copies`` copies of the real chest radiographs in
``../shared/data/dicom/chest`` (JPEG baseline, JPEG 2000, JPEG-LS, no-file-meta CR), copied round-robin into
a temporary folder so each is a file of its own.

1. Decode: ``triage.pipeline.prepare`` (read, decode, preprocess: the batch scorer's per-file work, on CPU
   whatever the device) on one core and on ``--workers`` processes.
2. Model: ``Model.run`` as the batch scorer calls it (logits and gate features, no maps) on real inputs, per
   batch size of ``--batch-sizes``, per device.
3. End to end: ``cxr-triage score`` (``deploy.batch.run_score``: walk, decode workers, model, audit store,
   worklist) over all the files, per device, each into a fresh audit store.
4. Parity: the whole pipeline's result per file (calibrated risk, input-gate verdict) of the CUDA session and of
   an fp16 conversion of the model (``onnxconverter_common.float16``, float32 inputs and outputs kept) against
   fp32 on CPU: max |risk difference| (target <= 0.01) and gate verdicts that change. On a machine without
   CUDA the fp16 model runs on CPU, so the script is tested; its speed there means nothing.

Usage: python benchmarks/bench_gpu.py [--copies 300] [--workers N] [--batch-sizes 1,8,...] [--seconds 2]
       [--bundle DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from deploy.batch import run_score
from deploy.paths import REPO_ROOT, SAMPLES, default_bundle_dir
from triage.bundle import Bundle, load_bundle
from triage.errors import TriageError
from triage.inference import CPU, CUDA, Model, load_model, session_options
from triage.pipeline import Prepared, Result, forward, prepare

CHEST = REPO_ROOT.parent / "shared" / "data" / "dicom" / "chest"
RISK_TARGET = 0.01


def gather_files(copies: int, folder: Path) -> list[str]:
    """The bundled samples and ``copies`` copies of the shared chest DICOMs (round-robin) under ``folder``."""
    samples = sorted(str(p) for p in SAMPLES.rglob("*.dcm"))
    chest = sorted(CHEST.glob("*.dcm"))
    if copies and not chest:
        print(f"note: no chest DICOMs in {CHEST}; using the bundled samples only")
    copied = []
    for i in range(copies if chest else 0):
        source = chest[i % len(chest)]
        target = folder / f"{i:05d}-{source.name}"
        shutil.copyfile(source, target)
        copied.append(str(target))
    return samples + copied


def images_per_s(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def decode_rates(files: Sequence[str], bundle: Bundle, workers: int) -> tuple[dict[str, float], list[Prepared]]:
    """images/s of ``prepare`` on one core and on ``workers`` processes; the prepared files."""
    work = partial(prepare, spec=bundle.preprocessing, reduced_decode=bundle.reduced_decode)
    start = time.perf_counter()
    single = [work(f) for f in files[: max(1, len(files) // 4)]]
    one_core = images_per_s(len(single), time.perf_counter() - start)
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        prepared = list(pool.map(work, files, chunksize=8))
    pooled = images_per_s(len(files), time.perf_counter() - start)
    return {"decode 1 core": one_core, f"decode {workers} workers": pooled}, prepared


def model_rates(model: Model, inputs: np.ndarray, batch_sizes: Sequence[int], seconds: float = 2.0) -> dict[int, float]:
    """images/s of ``Model.run`` (as the batch scorer calls it) per batch size, for about ``seconds`` each."""
    rates = {}
    for size in batch_sizes:
        batch = np.ascontiguousarray(inputs[np.arange(size) % len(inputs)])
        model.run(batch, cams=False, features=model.ood is not None)  # warm-up: allocations, cuDNN algorithm search
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.run(batch, cams=False, features=model.ood is not None)
            done += size
        rates[size] = images_per_s(done, time.perf_counter() - start)
    return rates


def end_to_end_rate(files: Sequence[str], bundle: Bundle, device: str, workers: int, folder: Path) -> float:
    """images/s of a whole ``cxr-triage score`` run over ``files`` (listed one by one) into a fresh audit store."""
    run = folder / f"run-{device}"
    run.mkdir()
    start = time.perf_counter()
    run_score(list(files), bundle, run / "audit.sqlite", run / "worklist.csv", workers=workers, device=device,
              progress=False)
    return images_per_s(len(files), time.perf_counter() - start)


def fp16_model(model: Model, providers: list[str]) -> Model | str:
    """``model`` with its graph converted to float16 (inputs and outputs stay float32), on ``providers``; or why not."""
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError as error:
        return f"skipped: {error.name} is not installed (pip install onnx onnxconverter-common)"
    import onnxruntime as ort

    converted = float16.convert_float_to_float16(onnx.load(str(model.bundle.model_path)), keep_io_types=True)
    session = ort.InferenceSession(converted.SerializeToString(), sess_options=session_options(ort, 0),
                                   providers=providers)
    return dataclasses.replace(model, session=session, provider=session.get_providers()[0])


def results(model: Model, inputs: np.ndarray, batch_size: int = 16) -> list[Result]:
    """The pipeline's (risk, gate reason, gate score) per input, in batches as the batch scorer runs them."""
    return [r for i in range(0, len(inputs), batch_size) for r in forward(model, list(inputs[i:i + batch_size]))]


def parity(reference: list[Result], other: list[Result]) -> dict[str, float]:
    """Max |risk difference| and the number of gate verdicts that differ, ``other`` against ``reference``."""
    risk_diff = max(abs(a[0] - b[0]) for a, b in zip(reference, other))
    changed = sum(a[1] != b[1] for a, b in zip(reference, other))
    return {"max_abs_risk_diff": risk_diff, "gate_verdicts_changed": changed, "within_target": risk_diff <= RISK_TARGET}


def table(rows: dict[str, dict[str, float]], columns: Sequence[str]) -> str:
    """Rows of images/s per column (device), aligned."""
    lines = [f"{'images/s':<24}" + "".join(f"{c:>12}" for c in columns)]
    lines += [f"{name:<24}" + "".join(f"{values.get(c, float('nan')):>12.1f}" for c in columns)
              for name, values in rows.items()]
    return "\n".join(lines)


def run(args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    """The whole benchmark; returns its figures."""
    import onnxruntime as ort

    bundle = load_bundle(args.bundle)
    try:
        cuda_model = load_model(bundle, "cuda")
    except TriageError as error:
        cuda_model = None
        say(f"no CUDA here: {error}")
    devices = ["cpu"] + (["cuda"] if cuda_model else [])
    say(f"onnxruntime {ort.__version__}; providers offered: {', '.join(ort.get_available_providers())}; "
        f"bundle {bundle.name} {bundle.version}; {os.cpu_count()} CPUs")
    figures: dict = {"devices": devices}
    with tempfile.TemporaryDirectory() as tmp:
        files = gather_files(args.copies, Path(tmp))
        say(f"files: {len(files)} ({args.copies} copies of {CHEST} and the bundled samples)")
        decode, prepared = decode_rates(files, bundle, args.workers)
        inputs = np.stack([p.model_input for p in prepared if p.model_input is not None])
        say(f"scorable: {len(inputs)} of {len(files)}")
        models = {"cpu": load_model(bundle, "cpu"), **({"cuda": cuda_model} if cuda_model else {})}
        rows = {name: {d: rate for d in devices} for name, rate in decode.items()}
        for device, model in models.items():
            for size, rate in model_rates(model, inputs, args.batch_sizes, args.seconds).items():
                rows.setdefault(f"model batch {size}", {})[device] = rate
        for device in devices:
            rows.setdefault("end to end (score)", {})[device] = end_to_end_rate(files, bundle, device, args.workers,
                                                                                Path(tmp))
        say("decode runs on CPU for both columns (no GPU decode yet)\n" + table(rows, devices))
        figures["images_per_s"] = rows
        reference = results(models["cpu"], inputs)
        if cuda_model:
            figures["parity_cuda_fp32"] = parity(reference, results(cuda_model, inputs))
            say(f"parity CUDA fp32 vs CPU fp32: {figures['parity_cuda_fp32']}")
        half = fp16_model(models["cpu"], [CUDA, CPU] if cuda_model else [CPU])
        if isinstance(half, str):
            say(f"fp16: {half}")
        else:
            figures["parity_fp16"] = {"provider": half.provider, **parity(reference, results(half, inputs))}
            say(f"parity fp16 on {half.provider} vs CPU fp32: {figures['parity_fp16']}")
            figures["fp16_model_images_per_s"] = model_rates(half, inputs, args.batch_sizes, args.seconds)
            say(f"fp16 model images/s on {half.provider}: "
                + ", ".join(f"batch {k}: {v:.1f}" for k, v in figures["fp16_model_images_per_s"].items()))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(default_bundle_dir()))
    parser.add_argument("--copies", type=int, default=300, help="copies of the shared chest DICOMs (default 300)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes (default: all CPUs)")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8, 16, 32, 64, 128, 256], help="model batch sizes, comma-separated")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per model batch size (default 2)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run(args, print)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if "cuda" not in figures["devices"]:
        print("no CUDA here: CPU column only; run this on a GPU machine for the CUDA column")
    return 0


if __name__ == "__main__":
    sys.exit(main())
