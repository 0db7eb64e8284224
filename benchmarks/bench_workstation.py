"""Workstation latency: receipt -> audited decision, next to decode-only + model-only time for the same files.

Runs the real service in this process (pynetdicom SCP on a free port, the bundled demo
model, a fresh audit store) and sends pydicom-data's chest CR RG1_UNCR.dcm
(uncompressed) and RG1_J2KR.dcm (JPEG 2000 lossless) with dcmtk storescu, one association
per study as a modality does, each copy a new study (fresh UIDs), one at a time. Two latencies per study:

- receipt -> audited: from the instance being durable in the inbox to its decision
  committed in the audit store (measured by the service);
- storescu -> audited: from starting storescu to the decision (includes starting the
  process, association, the network transfer and writing the file).

In the same run, interleaved with the sends, ``prepare`` (decode + preprocess) and the
model alone are timed on the same files (medians). Goal (issue 4): p95 <= 1.5 x (decode + model).

    .venv/bin/python benchmarks/bench_workstation.py --repeats 15 --quiet-period 0
"""

from __future__ import annotations

import argparse
import logging
import copy
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.workstation.config import Config  # noqa: E402
from deploy.workstation.service import Workstation  # noqa: E402
from triage.pipeline import prepare  # noqa: E402

FILES = {"uncompressed": "RG1_UNCR.dcm", "JPEG 2000": "RG1_J2KR.dcm"}
PROPOSE = {"1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.4.90": "-xv"}  # storescu: propose the file's own syntax


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def offline_ms(station: Workstation, path: str) -> tuple[float, float]:
    """(decode + preprocess, model on one image) in ms for ``path``, measured once."""
    prepared = prepare(path, station.bundle.preprocessing)
    start = time.perf_counter()
    station.model.risks(prepared.model_input[None])
    return prepared.decode_ms, (time.perf_counter() - start) * 1000


def fresh_copies(ds, folder: Path, count: int) -> list[Path]:
    """``count`` copies of ``ds`` as new studies (fresh Study/Series/SOP Instance UIDs), same pixel bytes."""
    paths = []
    for i in range(count):
        copy_ = copy.deepcopy(ds)
        copy_.StudyInstanceUID, copy_.SeriesInstanceUID = generate_uid(), generate_uid()
        copy_.SOPInstanceUID = copy_.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(folder / f"{i}.dcm")
        copy_.save_as(paths[-1])
    return paths


def send_and_wait(station: Workstation, path: Path, propose: str, timeout_s: float = 60) -> float:
    """storescu one file (its own association, like a modality); returns storescu start -> audited decision in ms."""
    before = len(station.latencies_ms)
    start = time.perf_counter()
    subprocess.run(["storescu", propose, "-aet", "BENCH", "-aec", station.config.ae_title, "127.0.0.1",
                    str(station.scp.port), str(path)], check=True, timeout=timeout_s, capture_output=True)
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
        print(f"cpu cores: {os.cpu_count()}; provider: {station.model.provider}; bundle: {station.bundle.name} "
              f"{station.bundle.version}; quiet period: {args.quiet_period:g} s; {args.repeats} studies per file")
        print(f"{'file':<14}{'decode ms':>10}{'model ms':>10}{'sum ms':>9}{'recv->audit p50':>17}{'p95':>8}"
              f"{'p95/sum':>9}{'storescu->audit p50':>21}{'p95':>8}")
        try:
            for label, name in FILES.items():
                ds = dcmread(get_testdata_file(name))
                propose = PROPOSE[str(ds.file_meta.TransferSyntaxUID)]
                copies = fresh_copies(ds, Path(tmp), args.repeats + 1)
                send_and_wait(station, copies[0], propose)  # warm-up (codec import, first session run)
                first, client, offline = len(station.latencies_ms), [], []
                for path in copies[1:]:  # interleaved, so both see the same machine load
                    client.append(send_and_wait(station, path, propose))
                    offline.append(offline_ms(station, get_testdata_file(name)))
                served = [ms for _, ms in station.latencies_ms[first:]]
                decode, model = (float(np.median(column)) for column in zip(*offline))
                bound = decode + model
                print(f"{label:<14}{decode:>10.1f}{model:>10.1f}{bound:>9.1f}{percentile(served, 50):>17.1f}"
                      f"{percentile(served, 95):>8.1f}{percentile(served, 95) / bound:>9.2f}"
                      f"{percentile(client, 50):>21.1f}{percentile(client, 95):>8.1f}")
        finally:
            stop.set()
            thread.join(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
