"""Batch scoring throughput next to its bounds, measured side by side in one run.

For each codec (uncompressed, JPEG 2000 lossless: pydicom-data's Philips chest CR
RG1, 1955x1841, 15-bit), on N copies of the file:
  decode-only   triage.pipeline.prepare (read, hash, decode, preprocess), one process
  model-only    ONNX Runtime on the preprocessed inputs, batch 16
  bound         files/s if each file cost exactly decode + model, one after the other
  end-to-end    ``cxr-triage score`` (hashing, workers, audit, worklist) with 1 and 2 workers

Usage: python benchmarks/bench_batch.py [--bundle DIR] [--n 24]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file

from deploy.batch import run_score
from deploy.paths import default_bundle_dir
from triage.bundle import load_bundle
from triage.inference import load_model
from triage.pipeline import prepare

CODECS = {"uncompressed": "RG1_UNCR.dcm", "jpeg2000-lossless": "RG1_J2KR.dcm"}


def copies(source: str, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = [folder / f"{i:04d}.dcm" for i in range(n)]
    for path in paths:
        shutil.copy(source, path)
    return paths


def decode_only(paths: list[Path], bundle) -> tuple[float, list[np.ndarray]]:
    """What a decode process does per file (``triage.pipeline.prepare``: read, hash, decode at the bundle's
    reduced size where it asks for one, preprocess), in this process."""
    start = time.perf_counter()
    inputs = [prepare(str(p), bundle.preprocessing, bundle.reduced_decode).model_input for p in paths]
    return (time.perf_counter() - start) * 1000 / len(paths), inputs


def model_only(model, inputs: list[np.ndarray], batch: int = 16) -> float:
    model.risks(np.stack(inputs[:batch]))  # warm-up
    start = time.perf_counter()
    for i in range(0, len(inputs), batch):
        model.risks(np.stack(inputs[i:i + batch]))
    return (time.perf_counter() - start) * 1000 / len(inputs)


def end_to_end(paths: list[Path], bundle, workers: int, scratch: Path) -> float:
    tag = f"w{workers}-{time.monotonic_ns()}"
    summary = run_score([str(paths[0].parent)], bundle, scratch / f"{tag}.sqlite", scratch / f"{tag}.csv",
                        workers=workers, progress=False)
    return len(paths) / summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(default_bundle_dir()))
    parser.add_argument("--n", type=int, default=24, help="copies of each file")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    model = load_model(bundle, "cpu")
    print(f"bundle {bundle.name} {bundle.version}, provider {model.provider}, {args.n} files per codec")
    header = f"{'codec':<18} {'decode ms':>9} {'model ms':>9} {'bound f/s':>9} {'e2e 1w f/s':>10} {'ratio':>6} {'e2e 2w f/s':>10} {'2w/1w':>6}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for codec, name in CODECS.items():
            paths = copies(get_testdata_file(name), scratch / codec, args.n)
            decode_ms, inputs = decode_only(paths, bundle)
            model_ms = model_only(model, inputs)
            bound = 1000 / (decode_ms + model_ms)
            one = end_to_end(paths, bundle, 1, scratch)
            two = end_to_end(paths, bundle, 2, scratch)
            print(f"{codec:<18} {decode_ms:9.1f} {model_ms:9.2f} {bound:9.2f} {one:10.2f} {one / bound:6.2f} {two:10.2f} {two / one:6.2f}")


if __name__ == "__main__":
    main()
