"""The persistent outbox: result objects wait as files until every destination has accepted them.

``outbox/<destination key>/<SOP Instance UID>.dcm``, one copy per destination (heatmap
Secondary Captures only for destinations with ``heatmap``), written atomically. A sender
thread C-STOREs them (or posts them by STOW-RS to a DICOMweb destination); a file is deleted only on a success status,
otherwise retried with exponential backoff (``retry_base_s`` doubling up to
``retry_max_s``). Files left by a previous run are sent after a restart.

``outbox/reported.log`` (``ReportLedger``) lists the decisions whose report reached the
outbox, so a start-up can rebuild the report of a decided study that never got there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset, dcmread

from ..results.send import Destination, send
from .inbox import PART_SUFFIX, write_atomic

log = logging.getLogger("cxr_triage.workstation")


def destination_key(destination: Destination) -> str:
    """A folder name for ``destination`` built from a hash, never from the configured text itself."""
    return hashlib.sha256(str(destination).encode()).hexdigest()[:16]


class ReportLedger:
    """``reported.log``: the id of the last decision of every study report already queued (or that needed none).

    The first line, ``since N``, is written when the ledger is created: decisions up to N
    predate it and count as reported. Then one decision id per line, appended and fsynced.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.since_: int = 0
        self.ids_: set[int] = set()

    def open(self, latest_decision_id: int) -> "ReportLedger":
        """Read the ledger, creating it as ``since latest_decision_id`` when there is none; returns self."""
        if not self.path.is_file():
            write_atomic(self.path, f"since {latest_decision_id}\n".encode())
        for line in self.path.read_text(encoding="ascii").splitlines():
            word, _, value = line.partition(" ")
            if word == "since" and value.isdigit():
                self.since_ = int(value)
            elif word.isdigit():
                self.ids_.add(int(word))
        return self

    def is_reported(self, decision_id: int) -> bool:
        return decision_id <= self.since_ or decision_id in self.ids_

    def add(self, decision_id: int) -> None:
        """Record that the report ending at ``decision_id`` is queued (durable before this returns)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="ascii") as handle:
            handle.write(f"{decision_id}\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.ids_.add(decision_id)


class Outbox:
    """Queue reports for ``destinations`` and deliver them from one background thread."""

    def __init__(self, folder: Path, destinations: Sequence[Destination], calling_ae: str,
                 retry_base_s: float = 2.0, retry_max_s: float = 300.0) -> None:
        self.folder, self.destinations, self.calling_ae = folder, tuple(destinations), calling_ae
        self.retry_base_s, self.retry_max_s = retry_base_s, retry_max_s
        self._attempts: dict[Path, tuple[int, float]] = {}  # path -> (failures, next try, monotonic)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def put(self, dataset: Dataset, destinations: Sequence[Destination] | None = None) -> list[Path]:
        """Write one copy of ``dataset`` per destination (default: all of them); returns the files."""
        from io import BytesIO

        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        chosen = self.destinations if destinations is None else destinations
        paths = [self.folder / destination_key(d) / f"{dataset.SOPInstanceUID}.dcm" for d in chosen]
        for path in paths:
            write_atomic(path, buffer.getvalue())
        self._wake.set()
        return paths

    def pending(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("*/*.dcm")) if self.folder.is_dir() else []

    def deliver_once(self) -> int:
        """Try every file that is due; returns how many were delivered."""
        delivered = 0
        for destination in self.destinations:
            folder = self.folder / destination_key(destination)
            for path in sorted(folder.glob("*.dcm")) if folder.is_dir() else []:
                failures, next_try = self._attempts.get(path, (0, 0.0))
                if time.monotonic() < next_try or self._stop.is_set():
                    continue
                problem = send(dcmread(path), destination, self.calling_ae)
                if not problem:
                    path.unlink()
                    self._attempts.pop(path, None)
                    delivered += 1
                    log.info("sent %s to %s", path.name, destination)
                    continue
                delay = min(self.retry_max_s, self.retry_base_s * 2**failures)
                self._attempts[path] = (failures + 1, time.monotonic() + delay)
                log.warning("could not send %s to %s (%s); retry in %.0f s", path.name, destination, problem, delay)
        return delivered

    def _run(self) -> None:
        while not self._stop.is_set():
            self.deliver_once()
            waits = [t for _, t in self._attempts.values()]
            timeout = max(0.05, min(waits) - time.monotonic()) if waits else 5.0
            self._wake.wait(timeout)
            self._wake.clear()

    def start(self) -> None:
        """Remove half-written reports left by a crash (once, before any ``put``: a ``put`` from the service's
        thread may be writing its ``.part`` while a delivery pass runs), then deliver in the background."""
        for part in self.folder.glob(f"*/*{PART_SUFFIX}"):
            part.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
