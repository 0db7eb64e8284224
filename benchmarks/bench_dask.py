"""Dask engine throughput with 1 and 2 local workers next to the local engine, side by side in one run.

N copies of a real chest CR (default: the JPEG 2000 Philips PA of samples/dicom, decode-bound like a
hospital archive) are scored end to end (hashing, decode, model, pending rows, audit append, worklist),
each configuration into a fresh audit store, in interleaved rounds:
  local 1w / local 2w   ``cxr-triage score --workers N`` (decode processes, model in the main process)
  dask 1w / dask 2w     ``cxr-triage score --engine dask`` on ``deploy.dask_engine.local_cluster(N)`` (N
                        single-thread, non-daemonic worker processes), started once before the rounds (its start
                        time is printed apart)
Ratios of medians are the result; absolute files/s depend on the shared CPU.

Usage: python benchmarks/bench_dask.py [--bundle DIR] [--n 16] [--rounds 2] [--file DCM]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from deploy.batch import run_score
from deploy.dask_engine import local_cluster, run_dask
from deploy.paths import default_bundle_dir
from triage.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[1]


def copies(source: Path, folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        shutil.copy(source, folder / f"{i:04d}.dcm")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(default_bundle_dir()))
    parser.add_argument("--n", type=int, default=16, help="copies of the file")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--file", default=str(ROOT / "samples" / "dicom" / "philips-cr-chest-pa-j2k.dcm"))
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    rates: dict[str, list[float]] = {"local 1w": [], "local 2w": [], "dask 1w": [], "dask 2w": []}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        scratch = Path(tmp)
        inputs = copies(Path(args.file), scratch / "in", args.n)
        clusters, starts = {}, {}
        for workers in (1, 2):
            start = time.perf_counter()
            clusters[workers] = stack.enter_context(local_cluster(workers))  # closed when the stack unwinds
            starts[workers] = time.perf_counter() - start
        for round_ in range(args.rounds):
            for name in rates:
                tag = f"{name.replace(' ', '-')}-{round_}"
                db, out = scratch / f"{tag}.sqlite", scratch / f"{tag}.csv"
                workers = int(name.split()[1][0])
                if name.startswith("local"):
                    summary = run_score([str(inputs)], bundle, db, out, workers=workers, device="cpu", progress=False)
                else:
                    summary = run_dask([str(inputs)], bundle, db, out, scheduler=clusters[workers].scheduler_address,
                                       device="cpu", progress=False)
                rates[name].append(summary.files / summary.seconds)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"bundle {bundle.name} {bundle.version}; {args.n} copies of {Path(args.file).name}; {args.rounds} interleaved "
          f"rounds; {os.cpu_count()} CPUs shared with other work: absolute files/s are indicative, ratios are the result")
    print(f"LocalCluster start: 1 worker {starts[1]:.1f} s, 2 workers {starts[2]:.1f} s (not in the files/s)")
    for name, value in median.items():
        print(f"{name:<9} {value:7.2f} files/s  (rounds: {', '.join(f'{v:.2f}' for v in rates[name])})")
    print(f"dask 2w / dask 1w   {median['dask 2w'] / median['dask 1w']:.2f}x")
    print(f"local 2w / local 1w {median['local 2w'] / median['local 1w']:.2f}x")
    print(f"dask 1w / local 1w  {median['dask 1w'] / median['local 1w']:.2f}x")
    print(f"dask 2w / local 2w  {median['dask 2w'] / median['local 2w']:.2f}x")


if __name__ == "__main__":
    main()
