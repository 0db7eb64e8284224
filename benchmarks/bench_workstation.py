"""Workstation latency: receipt -> audited decision, next to decode-only + model-only time for the same files.

Runs the real service in this process (pynetdicom SCP on a free port, the bundled demo
model, a fresh audit store) and sends pydicom-data's chest CR RG1_UNCR.dcm
(uncompressed) and RG1_J2KR.dcm (JPEG 2000 lossless) with a pynetdicom SCU, each copy
as a new study (fresh UIDs), one at a time. Two latencies per study:

- receipt -> audited: from the instance being durable in the inbox to its decision
  committed in the audit store (measured by the service);
- C-STORE -> audited: from the SCU starting the C-STORE to the decision (includes the
  network transfer and writing the file).

In the same run, ``prepare`` (decode + preprocess) and the model alone are timed on the
same files. Goal (issue 4): p95 <= 1.5 x (decode + model).

    .venv/bin/python benchmarks/bench_workstation.py --repeats 15 --quiet-period 0
"""

from __future__ import annotations

import argparse
import logging
import copy
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.workstation.config import Config  # noqa: E402
from deploy.workstation.service import Workstation  # noqa: E402
from triage.pipeline import prepare  # noqa: E402

FILES = {"uncompressed": "RG1_UNCR.dcm", "JPEG 2000": "RG1_J2KR.dcm"}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def offline_ms(station: Workstation, path: str, repeats: int) -> tuple[float, float]:
    """Median (decode + preprocess, model on one image) in ms for ``path``."""
    decode, model = [], []
    for _ in range(repeats):
        prepared = prepare(path, station.bundle.preprocessing)
        decode.append(prepared.decode_ms)
        batch = prepared.model_input[None]
        start = time.perf_counter()
        station.model.risks(batch)
        model.append((time.perf_counter() - start) * 1000)
    return float(np.median(decode)), float(np.median(model))


def send_and_wait(station: Workstation, assoc, ds, timeout_s: float = 60) -> float:
    """C-STORE one fresh copy of ``ds``; returns C-STORE start -> audited decision in ms."""
    copy_ = copy.deepcopy(ds)
    copy_.StudyInstanceUID, copy_.SeriesInstanceUID = generate_uid(), generate_uid()
    copy_.SOPInstanceUID = copy_.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    before = len(station.latencies_ms)
    start = time.perf_counter()
    status = assoc.send_c_store(copy_)
    if status.Status != 0:
        raise RuntimeError(f"C-STORE failed with status 0x{status.Status:04X}")
    deadline = time.monotonic() + timeout_s
    while len(station.latencies_ms) == before:
        if time.monotonic() > deadline:
            raise TimeoutError("no decision within the timeout")
        time.sleep(0.001)
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="studies sent per file (default 15)")
    parser.add_argument("--quiet-period", type=float, default=0.0, help="study quiet period in s (default 0)")
    args = parser.parse_args(argv)
    logging.getLogger("cxr_triage.workstation").setLevel(logging.ERROR)  # no per-study log lines in the table
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(port=0, allow_ae=("BENCH",), inbox=Path(tmp) / "inbox", audit_db=Path(tmp) / "audit.sqlite",
                        quiet_period_s=args.quiet_period, device="cpu")
        station, stop = Workstation(config), threading.Event()
        thread = threading.Thread(target=station.run, args=(stop,), daemon=True)
        thread.start()
        station.ready.wait(60)
        ae = AE(ae_title="BENCH")
        datasets = {label: dcmread(get_testdata_file(name)) for label, name in FILES.items()}
        for ds in datasets.values():
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", station.scp.port, ae_title=config.ae_title)
        print(f"cpu cores: {os.cpu_count()}; provider: {station.model.provider}; bundle: {station.bundle.name} "
              f"{station.bundle.version}; quiet period: {args.quiet_period:g} s; {args.repeats} studies per file")
        print(f"{'file':<14}{'decode ms':>10}{'model ms':>10}{'sum ms':>9}{'recv->audit p50':>17}{'p95':>8}"
              f"{'p95/sum':>9}{'C-STORE->audit p50':>20}{'p95':>8}")
        try:
            for label, ds in datasets.items():
                send_and_wait(station, assoc, ds)  # warm-up (codec import, first session run)
                first = len(station.latencies_ms)
                client = [send_and_wait(station, assoc, ds) for _ in range(args.repeats)]
                served = [ms for _, ms in station.latencies_ms[first:]]
                decode, model = offline_ms(station, get_testdata_file(FILES[label]), args.repeats)
                bound = decode + model
                print(f"{label:<14}{decode:>10.1f}{model:>10.1f}{bound:>9.1f}{percentile(served, 50):>17.1f}"
                      f"{percentile(served, 95):>8.1f}{percentile(served, 95) / bound:>9.2f}"
                      f"{percentile(client, 50):>20.1f}{percentile(client, 95):>8.1f}")
        finally:
            assoc.release()
            stop.set()
            thread.join(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
