"""The workstation service: inputs (SCP, watched folder) -> assembler -> scoring -> audit, report, notification.

All audit-store work happens in the thread that calls ``Workstation.run``; the SCP
and the folder watcher only write files into the inbox and queue an ``Arrival``.
On start, ``.part`` leftovers are removed, every inbox file that this bundle has
not decided (by path and sha256) is queued again, and the report of every decided
study that never reached the outbox is rebuilt: nothing received is lost, nothing
decided is decided twice, no decision goes without its report. While the audit
store cannot be written (locked by another program, disk full) the studies stay
queued and are retried with exponential backoff; the service keeps receiving.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from triage.audit import AuditStore, Decision, decision_from_row, open_store
from triage.bundle import load_bundle, sha256_file
from triage.errors import AuditError, TriageError
from triage.heatmap import heatmap_input
from triage.inference import load_model
from triage.pipeline import SCORED, Policy, Prepared, decide, finalize, prepare, score_batch
from triage.policy import Flags
from triage.present import format_risk
from triage.pseudonym import default_secret_path, load_or_create_secret, pseudonymize

from ..isolation import Decoder
from ..paths import default_bundle_dir
from ..results.headers import readable_headers
from .assembler import PatientMismatchError, StudyAssembler, check_patient
from .config import Config, ConfigError, recordable_audit_db
from .inbox import (Arrival, DroppedFileError, claim_dropped, reject_dropped, remove_partials, stored_instances,
                    write_atomic)
from .outbox import Outbox, ReportLedger
from .report import build_heatmaps, build_study_report
from .scp import StorageSCP
from .stream import STARVATION_GUARD, SiteRecalibrator, StarvationGuard

log = logging.getLogger("cxr_triage.workstation")
RECOVERED_SITE = "inbox"



def stream_policy(recalibrator: SiteRecalibrator, site: str, study_uid: str) -> Policy:
    """The workstation's ``triage.pipeline.Policy`` for one study: flagged when its risk reaches the site's
    threshold (``SiteRecalibrator.flags``); a study with no scored image is never flagged."""
    def policy(risks: dict[str, float]) -> Flags:
        flags = recalibrator.flags(site, study_uid, max(risks.values()) if risks else None)
        return dataclasses.replace(flags, flagged=frozenset(risks) & flags.flagged)
    return policy

class Workstation:
    """Build with a validated ``Config``; ``run(stop)`` serves until ``stop`` is set."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.bundle = load_bundle(config.bundle or default_bundle_dir(), expected_sha256=config.expect_bundle_sha256)
        self.model = load_model(self.bundle, config.device)
        self._decoder: Decoder | None = None  # run() starts it; without it, decode in this thread
        self.arrivals: queue.Queue[Arrival] = queue.Queue()
        self.assembler = StudyAssembler(config.quiet_period_s)
        self.recalibrator = SiteRecalibrator(self.bundle.threshold, config.flag_rate, config.window, config.min_history)
        self.guard = StarvationGuard(config.max_wait_s)
        self.scp = StorageSCP(config.ae_title, config.allow_ae, config.studies_dir, self.arrivals.put,
                              config.host, config.port, config.max_associations, config.max_pdu_bytes,
                              config.max_instance_bytes, config.acse_timeout_s)
        self.outbox = Outbox(config.outbox_dir, config.destinations, config.ae_title,
                             config.retry_base_s, config.retry_max_s)
        self.reported = ReportLedger(config.outbox_dir / "reported.log")
        self.latencies_ms: list[tuple[str, float]] = []  # (study, last receipt -> audited), for the benchmark
        self.ready = threading.Event()
        self._received_at: dict[str, float] = {}
        self._study_sites: dict[str, str] = {}
        self._decided: dict[tuple[str, str], int] = {}
        self._latest_by_path: dict[str, int] = {}
        self._store_failures = 0                 # audit-store writes failed in a row
        self._store_retry_at = 0.0               # monotonic time before which no study is decided

    # -- lifecycle ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Recover, start the inputs and the outbox, then score studies as they complete, until ``stop``."""
        for folder in (self.config.incoming_dir, self.config.studies_dir, self.config.outbox_dir):
            folder.mkdir(parents=True, exist_ok=True)
        secret = load_or_create_secret(default_secret_path(self.config.audit_db))
        self._pseudonymize = lambda pid: pseudonymize(pid, secret)
        self._run_id = uuid.uuid4().hex
        self._decoder = Decoder(1, self.config.decode_timeout_s)  # decode in a process: off the GIL that the DICOM listener needs
        try:
            with open_store(self.config.audit_db) as store:
                self._load_state(store)
                self._listen()
                self.outbox.start()
                self._rebuild_reports(store)
                watcher = threading.Thread(target=self._watch_incoming, args=(stop,), name="incoming", daemon=True)
                watcher.start()
                self._save_state()
                self.ready.set()
                log.info("workstation ready: port %d, provider %s, bundle %s %s", self.scp.port, self.model.provider,
                         self.bundle.name, self.bundle.version)
                try:
                    self._serve(store, stop)
                finally:
                    self.scp.stop()
                    watcher.join(timeout=5)
                    self.outbox.stop()
        finally:
            self._decoder.close()
            self._decoder = None

    def _listen(self) -> None:
        """Start the DICOM SCP; a port that cannot be bound is a ConfigError with the fix."""
        try:
            self.scp.start()
        except OSError as error:
            raise ConfigError(f"cannot listen for DICOM on {self.config.host}:{self.config.port} "
                              f"({error.strerror or error}). Fix: stop the program using that port, or pass --port "
                              "another port (0 picks a free one)") from error

    def _serve(self, store: AuditStore, stop: threading.Event) -> None:
        next_guard = 0.0
        while not stop.is_set():
            wait = self.assembler.next_due_in(time.monotonic())
            try:
                self._accept(self.arrivals.get(timeout=0.2 if wait is None else min(wait, 0.2)))
                while True:
                    self._accept(self.arrivals.get_nowait())
            except queue.Empty:
                pass
            if time.monotonic() < self._store_retry_at:
                continue
            try:
                self._decide_ready(store)
                if time.monotonic() >= next_guard:
                    self.promote_starving(store, time.time())
                    next_guard = time.monotonic() + 1.0
            except AuditError as error:
                self._back_off(error)
            else:
                self._store_failures = 0

    def _decide_ready(self, store: AuditStore) -> None:
        """Decide every study that is complete; when the store fails, the undecided ones go back in the queue."""
        ready = self.assembler.ready(time.monotonic())
        for index, (key, site) in enumerate(ready):
            try:
                self.decide_study(store, key, site)
            except AuditError:
                due_now = time.monotonic() - self.config.quiet_period_s  # complete already: due once the store is back
                for later_key, later_site in ready[index:]:
                    self.assembler.add(later_key, later_site, due_now)
                raise

    def _back_off(self, error: AuditError) -> None:
        """Pause deciding for ``audit_retry_base_s`` doubling up to ``audit_retry_max_s``; the studies stay queued."""
        delay = min(self.config.audit_retry_max_s, self.config.audit_retry_base_s * 2 ** self._store_failures)
        self._store_failures += 1
        self._store_retry_at = time.monotonic() + delay
        log.error("%s; %d stud(y/ies) stay queued, retry in %.1f s (attempt %d)", error, len(self.assembler), delay,
                  self._store_failures)

    def _accept(self, arrival: Arrival) -> None:
        self.assembler.add(arrival.study_uid, arrival.site, arrival.received_at)
        self._received_at[arrival.study_uid] = arrival.received_at
        self._study_sites.setdefault(arrival.study_uid, arrival.site)

    def _watch_incoming(self, stop: threading.Event) -> None:
        """Claim files dropped into ``incoming/`` once their size and mtime are stable over one poll.

        A file that cannot be claimed (too large, unreadable, of another patient than its study) is
        moved to ``rejected/`` with an ERROR line naming it, the problem and the fix; one that cannot
        even be moved is left alone until its size or mtime changes. No file stops the watcher.
        """
        seen: dict[Path, tuple[int, int]] = {}
        stuck: dict[Path, tuple[int, int]] = {}
        while not stop.wait(self.config.poll_s):
            try:
                paths = sorted(p for p in self.config.incoming_dir.iterdir() if not p.name.startswith("."))
            except OSError as error:
                log.error("%s: cannot list the watched folder (%s). Fix: restore the folder and its permissions",
                          self.config.incoming_dir, error)
                continue
            current = {}
            for path in paths:
                try:
                    stat = path.stat()
                except OSError:
                    continue  # gone since the listing
                if not path.is_file() or stuck.get(path) == (stat.st_size, stat.st_mtime_ns):
                    continue
                current[path] = (stat.st_size, stat.st_mtime_ns)
                if seen.get(path) == current[path] and not self._claim(path):
                    stuck[path] = current[path]
            seen = current
            stuck = {path: key for path, key in stuck.items() if path in current or path.exists()}

    def _claim(self, path: Path) -> bool:
        """Claim one dropped file, or move it to ``rejected/``; False when it could do neither (left in place)."""
        try:
            study, target = claim_dropped(path, self.config.studies_dir, check_patient)
        except DroppedFileError as error:
            problem = str(error)
        except Exception as error:  # noqa: BLE001 - one dropped file must never stop the watcher thread, which would
            # stop all intake from the folder: OSError (unreadable), and anything a crafted file provokes
            problem = (f"{path}: cannot be claimed ({type(error).__name__}: {error}). Fix: check the file and its "
                       "permissions, then move it back into incoming/")
        else:
            self.arrivals.put(Arrival(study, target, RECOVERED_SITE))
            return True
        try:
            moved = reject_dropped(path, self.config.rejected_dir)
        except OSError as error:
            log.error("%s; it could not be moved to %s either (%s): left in place until it changes", problem,
                      self.config.rejected_dir, error)
            return False
        log.error("%s; moved to %s (not scored, no audit record)", problem, moved)
        return True

    # -- state ------------------------------------------------------------------------------

    def _load_state(self, store: AuditStore) -> None:
        """Rebuild what was decided, the per-site windows and the guard; queue undecided inbox files."""
        removed = remove_partials(self.config.studies_dir)
        if removed:
            log.warning("removed %d partial file(s) of an interrupted transfer (their senders saw no success)", removed)
        current = store.current_decisions(bundle_sha256=self.bundle.sha256)
        for row in current:
            self._decided[(row["path"], row["sha256"])] = row["id"]
            self._latest_by_path[row["path"]] = max(row["id"], self._latest_by_path.get(row["path"], 0))
        saved = self._read_state()
        for site, risks in saved.get("sites", {}).items():
            for risk in risks[-self.config.window:]:
                self.recalibrator.observe(site, float(risk))
        self._study_sites.update(saved.get("study_sites", {}))
        latest = {row["study_uid"]: row for row in current if row["status"] == SCORED}
        for uid, row in latest.items():
            decided_at = datetime.fromisoformat(row["created_at"]).timestamp()
            self.guard.track(uid, decided_at, row["flagged"] or bool(store.reviews_for(uid)))
        for key, path in stored_instances(self.config.studies_dir):
            if (str(path), sha256_file(path)) not in self._decided:
                self._accept(Arrival(key, path, self._study_sites.get(key, RECOVERED_SITE)))
        if len(self.assembler):
            log.info("recovered %d undecided stud(y/ies) from the inbox", len(self.assembler))
        self.reported.open(max(self._latest_by_path.values(), default=0))

    def _rebuild_reports(self, store: AuditStore) -> None:
        """Queue again the report of every study decided here whose latest decisions never reached the outbox
        (the service stopped, or the outbox could not be written, between the audit record and the report)."""
        studies: dict[str, dict[str, dict]] = {}
        inbox = f"{self.config.studies_dir}{os.sep}"
        for row in store.current_decisions(bundle_sha256=self.bundle.sha256):
            if row["path"].startswith(inbox):
                studies.setdefault(row["study_uid"], {})[row["path"]] = row
        for study_uid, latest in studies.items():
            last_id = max(row["id"] for row in latest.values())
            if not self.reported.is_reported(last_id):
                log.warning("study %s: its report never reached the outbox; rebuilt", study_uid)
                final = [decision_from_row(row) for row in latest.values()]
                self._send_report(final, [Path(d.path) for d in final], last_id)

    def _read_state(self) -> dict:
        try:
            return json.loads(self.config.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        state = {
            "pid": os.getpid(), "port": self.scp.port, "ae_title": self.config.ae_title,
            "provider": self.model.provider, "bundle": f"{self.bundle.name} {self.bundle.version}",
            "bundle_sha256": self.bundle.sha256, "audit_db": recordable_audit_db(self.config.audit_db),
            "sites": {site: list(risks) for site, risks in self.recalibrator.risks_.items()},
            "study_sites": self._study_sites,
        }
        write_atomic(self.config.state_file, json.dumps(state, indent=1).encode())

    # -- deciding ---------------------------------------------------------------------------

    def decide_study(self, store: AuditStore, key: str, site: str) -> list[Decision]:
        """Score every instance of study ``key`` when any is new; append, report, notify. Returns what was appended."""
        files = sorted((self.config.studies_dir / key).glob("*.dcm"))
        prepared = self._prepare_all([str(p) for p in files])  # reads and hashes each file once
        if all((p.path, p.sha256) in self._decided for p in prepared):
            return []  # a resend of what was already decided
        decisions = finalize(score_batch(prepared, self.model, self._run_id), self._pseudonymize)
        study_uid = next((d.study_uid for d in decisions if d.study_uid), key)
        final = [dataclasses.replace(d, supersedes=self._latest_by_path.get(d.path))
                 for d in decide(decisions, stream_policy(self.recalibrator, site, study_uid))]
        study_risk = max((d.study_risk for d in final if d.study_risk is not None), default=None)
        ids = store.append_decisions(final)  # AuditError: nothing learned yet, the caller queues the study again
        self.recalibrator.learn(site, study_risk)
        for decision, record_id in zip(final, ids):
            self._decided[(decision.path, decision.sha256)] = record_id
            self._latest_by_path[decision.path] = record_id
        if key in self._received_at:
            self.latencies_ms.append((key, (time.monotonic() - self._received_at.pop(key)) * 1000))
        if study_risk is not None:
            self.guard.track(study_uid, time.time(), any(d.flagged for d in final))
        self._study_sites.pop(key, None)
        self._save_state()
        self._log_decision(final, site)
        self._send_report(final, files, max(ids))
        return final

    def _prepare_all(self, paths: list[str]) -> list[Prepared]:
        """Decode and preprocess in the decoder process (see ``deploy.isolation.Decoder``): a file that
        crashes it or runs past the decode timeout goes to human review, and a fresh decoder takes over."""
        spec, reduced = self.bundle.preprocessing, self.bundle.reduced_decode
        if self._decoder is None:
            return [prepare(p, spec, reduced) for p in paths]
        prepared = list(self._decoder.map(prepare, paths, spec, reduced))  # prepare: one read of each file
        for item in prepared:
            if item.reason in ("decode_failed", "decode_timeout") and "process" in item.detail:
                log.error("%s", item.detail)
        return prepared

    def promote_starving(self, store: AuditStore, now: float) -> list[Decision]:
        """Starvation guard: flag unflagged, unreviewed studies decided more than ``max_wait_s`` ago.

        When the store fails (AuditError), the studies not yet promoted are due again at the next try."""
        promoted: list[Decision] = []
        due = self.guard.due(now)
        for index, study_uid in enumerate(due):
            try:
                promoted += self._promote(store, study_uid)
            except AuditError:
                for waiting in due[index:]:
                    self.guard.track(waiting, now - self.config.max_wait_s - 1, flagged=False)
                raise
        return promoted

    def _promote(self, store: AuditStore, study_uid: str) -> list[Decision]:
        """Append the starvation guard's flagged records for one study (none if reviewed or already flagged)."""
        if store.reviews_for(study_uid):
            return []
        rows = store.current_decisions(study_uid=study_uid, bundle_sha256=self.bundle.sha256)
        latest = {row["path"]: row for row in rows}
        if not latest or any(row["flagged"] for row in latest.values()):
            return []
        detail = f"promoted by the starvation guard: unreviewed for more than {self.config.max_wait_s:.0f} s"
        final = [dataclasses.replace(decision_from_row(row), flagged=True, policy=STARVATION_GUARD, supersedes=row["id"],
                                     run_id=self._run_id, detail=detail) for row in latest.values()]
        ids = store.append_decisions(final)
        for decision, record_id in zip(final, ids):
            self._latest_by_path[decision.path] = record_id
            self._decided[(decision.path, decision.sha256)] = record_id
        self._log_decision(final, "guard")
        self._send_report(final, [Path(d.path) for d in final], max(ids))
        return final

    def _log_decision(self, final: Sequence[Decision], site: str) -> None:
        first = final[0]
        risk = format_risk(first.study_risk) or "none"
        threshold = format_risk(first.threshold) or "none"
        reasons = ",".join(sorted({d.reason for d in final if d.reason})) or "-"
        log.info("decided study %s from %s: risk %s threshold %s policy %s flagged %s reasons %s",
                 first.study_uid, site, risk, threshold, first.policy, first.flagged, reasons)
        if first.flagged:
            log.warning("FLAGGED study %s (risk %s): read first", first.study_uid, risk)
            self._notify(first)

    def _notify(self, decision: Decision) -> None:
        """Run ``notify_command`` (argv, no shell) with the study in its environment; never blocks scoring.

        ``CXR_RISK`` is the risk as a person reads it (``triage.present.format_risk``: ``>0.9999``, never
        ``1.0000``; empty when no image was scored); ``CXR_RISK_VALUE`` the full-precision number for programs.
        """
        if not self.config.notify_command:
            return
        raw = "" if decision.study_risk is None else repr(float(decision.study_risk))
        env = {**os.environ, "CXR_STUDY_UID": decision.study_uid, "CXR_RISK": format_risk(decision.study_risk),
               "CXR_RISK_VALUE": raw, "CXR_POLICY": decision.policy}
        threading.Thread(target=_run_hook, args=(list(self.config.notify_command), env), daemon=True).start()

    def _send_report(self, final: Sequence[Decision], files: Sequence[Path], last_id: int) -> None:
        """Queue the SR for every destination and the heatmap SCs for those with ``heatmap`` (none when there are no
        destinations, or no file has a usable DICOM header), then record decision ``last_id`` as reported. A report
        that cannot be written is logged and rebuilt at the next start."""
        try:
            headers = readable_headers(files) if self.config.destinations else []
            if headers:
                self.outbox.put(build_study_report(final, headers))
                wanting = [d for d in self.config.destinations if d.heatmap]
                if wanting and self.model.has_cam:
                    for heatmap in build_heatmaps(final, headers, self.model, self._heatmap_input):
                        self.outbox.put(heatmap, wanting)
            self.reported.add(last_id)
        except PatientMismatchError as error:  # not recorded as reported: logged again at every start until fixed
            log.error("study %s: no report sent: %s", final[0].study_uid, error)
        except OSError as error:
            log.error("study %s: cannot queue its report in %s (%s); it is rebuilt at the next start. Fix: free disk "
                      "space and make the folder writable", final[0].study_uid, self.config.outbox_dir, error)

    def _heatmap_input(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """``triage.heatmap.heatmap_input`` in the decode process (as for scoring); TriageError when it fails there."""
        if self._decoder is None:
            return heatmap_input(path, self.bundle.preprocessing)
        result = next(self._decoder.map(heatmap_input, [path], self.bundle.preprocessing))
        if isinstance(result, Prepared):  # the decode process timed out or crashed
            raise TriageError(result.detail)
        return result


def _run_hook(argv: list[str], env: dict[str, str]) -> None:
    try:
        subprocess.run(argv, env=env, timeout=30, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("notify_command %s failed: %s", argv[0], error)
