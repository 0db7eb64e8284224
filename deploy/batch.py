"""The hospital batch scorer's run (``cxr-triage score``, see ``deploy.score``) and its local engine.

Walks folders, decodes in worker processes, runs ONNX Runtime in this process,
flags the riskiest studies of the whole run, appends every decision to the audit
store and writes a worklist CSV. Resumable: files already audited with the same
path, sha256 and bundle are not scored again, and finished inferences of a killed
run are kept in the store's pending table.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import os
import stat
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from triage.audit import (AuditStore, Decision, decision_from_row, is_url, open_store,
                          output_file_problem, path_text)
from triage.audit.pending import clear_pending, load_pending, save_pending
from triage.bundle import Bundle
from triage.errors import AuditError
from triage.inference import load_model
from triage.pipeline import (SCORED, Draft, Known, Prepared, batch_top_k, decide, draft, finalize, prepare_file,
                             score_batch, unscorable as unscorable_file)
from triage.policy import BATCH_TOP_K, DEFAULT_FLAG_RATE, check_flag_rate, check_min_risk
from triage.preprocess import PreprocessSpec
from triage.present import csv_row, format_risk
from triage.pseudonym import default_secret_path, load_or_create_secret, pseudonymize

from .isolation import DEFAULT_DECODE_TIMEOUT_S, Decoder, check_timeout

# Files that sit beside studies and are never images: skipped when walking a folder.
IGNORED_NAMES = {"DICOMDIR"}
IGNORED_SUFFIXES = {".md", ".txt", ".csv", ".json", ".html", ".sqlite", ".key", ".log"}
WORKLIST_COLUMNS = ("path", "study_uid", "status", "risk", "study_risk", "flagged", "reason",
                    "finding", "threshold", "policy", "sha256", "detail", "flag_rule")
BATCH_SIZE = 16


Problem = tuple[str, str]  # what is wrong with an entry of the walk, and the fix


@dataclass(frozen=True)
class Inputs:
    """What a walk of the PATHs met: regular files to score (``path_text``, sorted), and the entries it cannot
    score (unreadable folders, FIFOs, devices, sockets, links to nothing or to folders), each a ``file_unreadable``
    ``Prepared`` so it is recorded for human review, never dropped."""

    files: list[str]
    unscorable: list[Prepared]


def walk_inputs(paths: Iterable[str]) -> Inputs:
    """Every file under ``paths`` (recursive, symbolic links to folders not followed), absolute, de-duplicated.

    Hidden files, DICOMDIR and documentation/data files (IGNORED_SUFFIXES) are skipped; every other entry is an
    input, so a stray non-image is recorded as such. Nothing that is not a regular file is ever opened (a FIFO
    would block the run).
    """
    files: set[str] = set()
    unscorable: dict[str, Prepared] = {}
    for root in map(os.fspath, paths):
        if not os.path.exists(root):
            raise FileNotFoundError(f"{path_text(root)}: no such file or folder. Fix: check the path given to "
                                    "'cxr-triage score'")
        for path, problem in _walk(root) if os.path.isdir(root) else [(root, None)]:
            if not problem and _is_ignored(os.path.basename(path)):
                continue
            problem = problem or _file_problem(path)
            if problem:
                text = path_text(os.path.abspath(path))
                unscorable[text] = unscorable_file(text, "file_unreadable", *problem)
            else:
                files.add(path_text(os.path.realpath(path)))
    return Inputs(sorted(files), [unscorable[p] for p in sorted(unscorable)])


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES or os.path.splitext(name)[1].lower() in IGNORED_SUFFIXES


def _walk(root: str) -> Iterator[tuple[str, Problem | None]]:
    """(path, None) for every entry under ``root`` that is not a folder (or is a link to one), and (path, (problem,
    fix)) for every folder the walk could not list (a service account without permission)."""
    unlisted: list[OSError] = []
    for folder, folders, names in os.walk(root, onerror=unlisted.append):
        links = [name for name in folders if os.path.islink(os.path.join(folder, name))]  # os.walk lists, never enters
        yield from ((os.path.join(folder, name), None) for name in names + links)
    for error in unlisted:
        yield error.filename, (f"a folder this account cannot list ({error.strerror}), so none of its files is "
                               "scored", "let the scorer's account read and enter it (and its sub-folders), then rerun")


def _file_problem(path: str) -> Problem | None:
    """Why ``path`` cannot be scored and the fix; None for a regular file (or a link to one). Never opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if os.path.islink(path) and isinstance(error, FileNotFoundError):
            return (f"a symbolic link to {path_text(os.readlink(path))}, which does not exist",
                    "restore the file it points to, or remove the link")
        return f"it cannot be examined ({error.strerror})", "check that this account may read it"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return ("a symbolic link to a folder, which the walk does not follow (a link can loop)",
                "pass the folder it points to as a PATH")
    kind = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(mode), "not a regular file")
    return f"{kind}, not a regular file: reading it could block the run", "copy the image into a regular file"


_WORKER: dict[str, object] = {}


def _init_worker(spec: PreprocessSpec, reduced: frozenset[str], known: frozenset[tuple[str, str]]) -> None:
    _WORKER["spec"], _WORKER["reduced"], _WORKER["known"] = spec, reduced, known


def _prepare_unless_known(path: str) -> Prepared | Known:
    """Decode task of the local engine: ``triage.pipeline.prepare_file`` (read once, skip what is known, decode)
    with the settings ``_init_worker`` stored."""
    return prepare_file(path, _WORKER["spec"], _WORKER["reduced"], _WORKER["known"])


def _decoder(workers: int, spec: PreprocessSpec, reduced: frozenset[str], known: frozenset[tuple[str, str]],
             decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S) -> Decoder:
    """``workers`` decode processes (at least one: never this process) for ``_prepare_unless_known``.

    A worker that dies (a crashing decoder, the OOM killer) or runs past ``decode_timeout_s``
    on one file costs no other file and stalls nothing (see ``deploy.isolation.Decoder``):
    the file goes to human review as ``decode_failed`` or ``decode_timeout``.
    """
    return Decoder(max(workers, 1), decode_timeout_s, _init_worker, (spec, reduced, known))


def model_threads(workers: int) -> int:
    """ONNX Runtime's intra-op threads in this process: the cores that ``workers`` decode processes leave, at least
    one. More threads than free cores wait on the ones a decoder holds (on 2 cores with 1 worker, ONNX Runtime's
    own choice of 2 threads scored ~7% fewer files/s than 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - workers)


def _batches(stream: Iterable[Prepared | Known], size: int,
             next_is_ready: Callable[[], bool]) -> Iterator[list[Prepared | Known]]:
    """The items of ``stream`` in order, in batches of at most ``size`` scorable files: a batch is cut as soon as
    the next item is not ready yet (``next_is_ready``), so the model runs while the decoders work instead of
    waiting for a full batch."""
    batch: list[Prepared | Known] = []
    for item in stream:
        batch.append(item)
        if not next_is_ready() or sum(isinstance(i, Prepared) and i.model_input is not None for i in batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def sort_worklist(decisions: Iterable[Decision]) -> list[Decision]:
    """Flagged studies first, then by study risk (highest first); files with no scored image last."""
    def key(d: Decision) -> tuple:
        has_risk = d.study_risk is not None
        return (not d.flagged, not has_risk, -(d.study_risk or 0.0), d.study_uid, d.path)
    return sorted(decisions, key=key)


def flag_rule(decision: Decision) -> str:
    """How a batch run flagged studies, in words, from its record: relative to the batch ("" for other policies)."""
    if not decision.policy.startswith(BATCH_TOP_K) or decision.threshold is None or decision.flag_rate is None:
        return ""
    top = f"top {decision.flag_rate * 100:g}% of this batch"
    needed = f"(study risk threshold {format_risk(decision.threshold)})"
    if decision.policy == BATCH_TOP_K:
        return f"{top} {needed}: relative to the batch, flagged however low the risk (see --min-risk)"
    return f"{top} and at least --min-risk {needed}"


def write_worklist(decisions: Sequence[Decision], out: Path) -> None:
    """Write the worklist CSV atomically: one row per input file; risks as ``format_risk`` shows them."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", newline="", dir=out.parent, delete=False, suffix=".tmp") as handle:
        writer = csv.DictWriter(handle, fieldnames=WORKLIST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for d in sort_worklist(decisions):
            row = csv_row(dataclasses.asdict(d))  # tags, paths and details come from files: no formulas
            row["flagged"] = int(d.flagged)
            row["flag_rule"] = flag_rule(d)
            for name in ("risk", "study_risk", "threshold"):
                row[name] = format_risk(row[name])
            writer.writerow(row)
    os.replace(handle.name, out)


def check_writable(path: Path) -> None:
    """Fail before any work if the worklist cannot be written at ``path`` (``triage.audit.output_file_problem``)."""
    problem = output_file_problem(path)
    if problem:
        raise OSError(f"{path}: cannot write the worklist here: {problem}. Fix: pass --out a file path in a folder "
                      "this account can write")


@dataclass
class RunSummary:
    files: int
    skipped: int
    decisions: list[Decision]
    provider: str
    seconds: float
    unscorable: int = 0  # of ``files``: entries the walk met but cannot score (unreadable folders, FIFOs...)

    @property
    def is_empty(self) -> bool:
        """True when the walk found no file to score (only ignored names, or only unscorable entries)."""
        return self.files == self.unscorable

    def lines(self) -> list[str]:
        scored = [d for d in self.decisions if d.status == SCORED]
        review = Counter(d.reason for d in self.decisions if d.status != SCORED)
        studies = {d.study_uid for d in scored}
        flagged = {d.study_uid for d in self.decisions if d.flagged}
        new = self.files - self.skipped
        rate = new / self.seconds if self.seconds > 0 else 0.0
        rule = next(filter(None, map(flag_rule, self.decisions)), "")
        lines = [
            f"files: {self.files} ({self.skipped} already audited with this bundle, skipped)",
            *([f"not scorable where found: {self.unscorable} (folders this account cannot list, FIFOs, devices, "
               "sockets, broken or folder links), each recorded for human review as file_unreadable"]
              if self.unscorable else []),
            f"scored: {len(scored)} files in {len(studies)} studies",
            f"flagged: {len(flagged)} of {len(studies)} studies" + (f": {rule}" if rule else ""),
            f"human review: {sum(review.values())} files"
            + "".join(f"\n  {reason}: {count}" for reason, count in sorted(review.items())),
            f"provider: {self.provider}",
            f"throughput: {rate:.1f} files/s ({new} new files in {self.seconds:.1f} s)",
        ]
        return lines


@contextmanager
def run_lock(audit_db: Path | str) -> Iterator[None]:
    """One ``score`` run per SQLite audit store at a time: an exclusive ``flock`` on ``<store>.run-lock`` (the kernel
    releases it when the run ends, even when it is killed). Two runs would decide the same files twice. A
    PostgreSQL store is not locked here yet (its append lock keeps the chain whole, but two runs can decide a file
    twice)."""
    if is_url(audit_db):
        yield
        return
    path = Path(f"{audit_db}.run-lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AuditError(f"{audit_db}: another cxr-triage score run is using this audit store (it holds {path}). "
                             "Fix: wait for that run to finish (a rerun then scores only new files), or pass another "
                             "--audit-db") from None
        yield


@dataclass(frozen=True)
class Scored:
    """One part of a run as an engine scored it: drafts (raw patient ids, pseudonymized by the run before anything
    is stored), the (path, sha256) keys of the files it skipped as already scored by this bundle, and the ONNX
    Runtime provider that ran the model ("" when it ran on no file)."""

    drafts: list[Draft]
    known: list[tuple[str, str]]
    provider: str


class Engine(Protocol):
    """Where a run's regular files are decoded and scored: ``LocalEngine`` (this machine's processes) or
    ``deploy.dask_engine.DaskEngine``. Each reads a file once (``triage.pipeline.prepare_file``, skipping the
    ``known`` keys) and runs ``triage.pipeline.score_batch``; the run (``run_engine``) does the rest."""

    name: str

    def score(self, files: Sequence[str], bundle: Bundle, known: frozenset[tuple[str, str]],
              run_id: str) -> Iterator[Scored]:
        """The parts of ``files`` as they are scored; the run saves each part (pending) before asking for the next."""
        ...


@dataclass(frozen=True)
class LocalEngine:
    """Decode in ``workers`` processes of this machine (``deploy.isolation.Decoder``, at most ``decode_timeout_s``
    a file), run the model here on the files decoded so far (batches of at most ``BATCH_SIZE``) with the cores
    the decoders leave (``model_threads``)."""

    workers: int = 1
    device: str = "auto"
    progress: bool | None = None
    decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S
    name: str = "local"

    def score(self, files: Sequence[str], bundle: Bundle, known: frozenset[tuple[str, str]],
              run_id: str) -> Iterator[Scored]:
        check_timeout(self.decode_timeout_s)
        disable = None if self.progress is None else not self.progress
        decoder = _decoder(self.workers, bundle.preprocessing, bundle.reduced_decode, known, self.decode_timeout_s)
        with decoder, ThreadPoolExecutor(1, thread_name_prefix="load-model") as loader, \
                tqdm(total=len(files), unit="file", disable=disable, file=sys.stderr) as bar:
            # loaded while the decode processes start and decode the first files
            loading = loader.submit(load_model, bundle, self.device, model_threads(self.workers))
            stream = decoder.map(_prepare_unless_known, files)
            for items in _batches(stream, BATCH_SIZE, decoder.next_is_ready):
                model = loading.result()
                prepared = [item for item in items if isinstance(item, Prepared)]
                yield Scored(score_batch(prepared, model, run_id),
                             [(item.path, item.sha256) for item in items if isinstance(item, Known)], model.provider)
                bar.update(len(items))
            loading.result()  # a model that cannot load fails the run, also when no file needed it


def run_engine(paths: Sequence[str], bundle: Bundle, audit_db: Path | str, out: Path, engine: Engine,
               flag_rate: float = DEFAULT_FLAG_RATE, min_risk: float = 0.0) -> RunSummary:
    """A run of any engine: check the settings and ``out``, walk ``paths``, lock and open the store, let ``engine``
    score the regular files (each part pseudonymized here, where the site secret is, and saved as pending), record
    the entries the walk cannot score, flag the top ``flag_rate`` of the run's studies whose risk is >= ``min_risk``,
    append the decisions, write the worklist."""
    start = time.perf_counter()
    check_flag_rate(flag_rate)
    check_min_risk(min_risk)
    check_writable(out)
    inputs = walk_inputs(paths)
    run_id = uuid.uuid4().hex
    secret = load_or_create_secret(default_secret_path(audit_db))
    fresh: list[Decision] = []
    seen_known: list[tuple[str, str]] = []
    providers: set[str] = set()
    with run_lock(audit_db), open_store(audit_db) as store:
        state = resume_state(store, bundle)
        for part in engine.score(inputs.files, bundle, state.known, run_id):
            decisions = finalize(part.drafts, lambda pid: pseudonymize(pid, secret))
            save_pending(store, [(d.path, d.sha256, bundle.sha256, dataclasses.asdict(d)) for d in decisions])
            fresh += decisions
            seen_known += part.known
            providers.add(part.provider)
        order = {path: i for i, path in enumerate(inputs.files)}
        fresh.sort(key=lambda d: order[d.path])  # file order, however the engine's parts arrived
        walked, walked_known = unscorable_drafts(inputs.unscorable, state.known, bundle, run_id)
        final_new, final_previous = record_run(store, bundle, state, fresh + walked, seen_known + walked_known,
                                               flag_rate, run_id, min_risk)
    write_worklist(final_new + final_previous, out)
    provider = ", ".join(sorted(providers - {""})) or "none (no file was scored)"
    return RunSummary(len(inputs.files) + len(inputs.unscorable), len(final_previous), final_new + final_previous,
                      provider, time.perf_counter() - start, len(inputs.unscorable))


def run_score(paths: Sequence[str], bundle: Bundle, audit_db: Path | str, out: Path,
              flag_rate: float = DEFAULT_FLAG_RATE, workers: int = 1, device: str = "auto", progress: bool | None = None,
              decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S, min_risk: float = 0.0) -> RunSummary:
    """Score every file under ``paths`` on this machine (``run_engine`` with a ``LocalEngine``); returns the run
    summary. Raises on operational failure only."""
    check_timeout(decode_timeout_s)
    return run_engine(paths, bundle, audit_db, out, LocalEngine(workers, device, progress, decode_timeout_s),
                      flag_rate, min_risk)


def unscorable_drafts(unscorable: Sequence[Prepared], known: frozenset[tuple[str, str]], bundle: Bundle,
                      run_id: str) -> tuple[list[Decision], list[tuple[str, str]]]:
    """Human-review drafts for the entries the walk cannot score that this bundle has not recorded yet, and the
    (path, sha256) keys of those it has."""
    seen = [(p.path, p.sha256) for p in unscorable if (p.path, p.sha256) in known]
    new = [draft(p, bundle, run_id=run_id).decision  # no header read, so no patient id to pseudonymize
           for p in unscorable if (p.path, p.sha256) not in known]
    return new, seen


@dataclass(frozen=True)
class ResumeState:
    """What earlier runs of a bundle left in the store: appended decisions and pending (unappended) drafts."""

    rows: dict[tuple[str, str], dict]
    decided: dict[tuple[str, str], Decision]
    pending: dict[tuple[str, str], Decision]

    @property
    def known(self) -> frozenset[tuple[str, str]]:
        """(path, sha256) of every file this bundle has already scored."""
        return frozenset(self.decided) | frozenset(self.pending)


def resume_state(store: AuditStore, bundle: Bundle) -> ResumeState:
    """Read what earlier runs of ``bundle`` left; pending rows whose decision was appended are cleared."""
    rows = store.decided_keys(bundle.sha256)
    decided = {k: decision_from_row(v) for k, v in rows.items()}
    saved = load_pending(store, bundle.sha256)
    # A run killed between its audit append and clearing its pending rows left them behind.
    clear_pending(store, [(*k, bundle.sha256) for k in saved if k in decided])
    return ResumeState(rows, decided, {k: decision_from_row(v) for k, v in saved.items() if k not in decided})


def record_run(store: AuditStore, bundle: Bundle, state: ResumeState, fresh: Sequence[Decision],
               seen_known: Sequence[tuple[str, str]], flag_rate: float, run_id: str,
               min_risk: float = 0.0) -> tuple[list[Decision], list[Decision]]:
    """Flag the top ``flag_rate`` of all the run's studies (new drafts, pending and earlier decisions) whose risk is
    >= ``min_risk``, append the new decisions and the earlier ones whose flag changed, clear pending; (new, earlier)
    finalized."""
    new = list(fresh) + [state.pending[k] for k in seen_known if k in state.pending]
    previous = [state.decided[k] for k in seen_known if k in state.decided]
    decided = decide(new + previous, batch_top_k(flag_rate, min_risk))
    final_new, final_previous = decided[:len(new)], decided[len(new):]
    superseding = [
        dataclasses.replace(now, supersedes=state.rows[(before.path, before.sha256)]["id"], run_id=run_id)
        for before, now in zip(previous, final_previous)
        if now.flagged != before.flagged
    ]
    store.append_decisions(final_new + superseding)
    clear_pending(store, [(d.path, d.sha256, bundle.sha256) for d in new])
    return final_new, final_previous
