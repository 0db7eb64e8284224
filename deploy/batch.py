"""The hospital batch scorer: ``cxr-triage score PATH...``.

Walks folders, decodes in worker processes, runs ONNX Runtime in this process,
flags the riskiest studies of the whole run, appends every decision to the audit
store and writes a worklist CSV. Resumable: files already audited with the same
path, sha256 and bundle are not scored again, and finished inferences of a killed
run are kept in the store's pending table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import logging
import os
import stat
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from triage.audit import (AuditStore, Decision, decision_from_row, default_audit_db, is_url, open_store, os_path,
                          output_file_problem, path_text)
from triage.audit.pending import clear_pending, load_pending, save_pending
from triage.bundle import Bundle, load_bundle
from triage.errors import AuditError, TriageError
from triage.inference import Model, load_model
from triage.pipeline import (SCORED, Prepared, draft, finalize, prepare, score_prepared, scored_study_risks,
                             sha256_or_empty)
from triage.policy import BATCH_TOP_K, DEFAULT_FLAG_RATE, check_flag_rate, check_min_risk, flag_top_k
from triage.preprocess import PreprocessSpec
from triage.present import csv_row, format_risk
from triage.pseudonym import default_secret_path, load_or_create_secret, pseudonymize

from .isolation import DEFAULT_DECODE_TIMEOUT_S, Decoder, check_timeout
from .paths import default_bundle_dir
from .results.send import Destination, DestinationError, send_results

# Files that sit beside studies and are never images: skipped when walking a folder.
IGNORED_NAMES = {"DICOMDIR"}
IGNORED_SUFFIXES = {".md", ".txt", ".csv", ".json", ".html", ".sqlite", ".key", ".log"}
WORKLIST_COLUMNS = ("path", "study_uid", "status", "risk", "study_risk", "flagged", "reason",
                    "finding", "threshold", "policy", "sha256", "detail", "flag_rule")
BATCH_SIZE = 16
EXIT_NOTHING_TO_SCORE = 3
SEND_AE = "CXR_TRIAGE"  # calling AE title of --send-results
BUNDLE_SHA256_ENV = "CXR_TRIAGE_BUNDLE_SHA256"  # a site's pinned bundle identity, the default of --expect-bundle-sha256


@dataclass(frozen=True)
class Known:
    """A file skipped because this bundle already scored it (audited or pending)."""

    path: str
    sha256: str


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
        for path, problem in _walk(root) if os.path.isdir(root) else [(root, "")]:
            if not problem and _is_ignored(os.path.basename(path)):
                continue
            problem = problem or _file_problem(path)
            if problem:
                text = path_text(os.path.abspath(path))
                detail = f"{text}: file_unreadable: {problem}"
                unscorable[text] = Prepared(text, "", reason="file_unreadable", detail=detail)
            else:
                files.add(path_text(os.path.realpath(path)))
    return Inputs(sorted(files), [unscorable[p] for p in sorted(unscorable)])


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES or os.path.splitext(name)[1].lower() in IGNORED_SUFFIXES


def _walk(root: str) -> Iterator[tuple[str, str]]:
    """(path, "") for every entry under ``root`` that is not a folder (or is a link to one), and (path, problem and
    fix) for every folder the walk could not list (a service account without permission)."""
    unlisted: list[OSError] = []
    for folder, folders, names in os.walk(root, onerror=unlisted.append):
        links = [name for name in folders if os.path.islink(os.path.join(folder, name))]  # os.walk lists, never enters
        yield from ((os.path.join(folder, name), "") for name in names + links)
    for error in unlisted:
        yield error.filename, (f"a folder this account cannot list ({error.strerror}), so none of its files is "
                               "scored. Fix: let the scorer's account read and enter it (and its sub-folders), then "
                               "rerun")


def _file_problem(path: str) -> str:
    """Why ``path`` cannot be scored, with the fix; "" for a regular file (or a link to one). Never opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if os.path.islink(path) and isinstance(error, FileNotFoundError):
            return (f"a symbolic link to {path_text(os.readlink(path))}, which does not exist. Fix: restore the file "
                    "it points to, or remove the link")
        return f"it cannot be examined ({error.strerror}). Fix: check that this account may read it"
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        return ("a symbolic link to a folder, which the walk does not follow (a link can loop). Fix: pass the folder "
                "it points to as a PATH")
    kind = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(mode), "not a regular file")
    return f"{kind}, not a regular file: reading it could block the run. Fix: copy the image into a regular file"


_WORKER: dict[str, object] = {}


def _init_worker(spec: PreprocessSpec, reduced: frozenset[str], known: frozenset[tuple[str, str]]) -> None:
    _WORKER["spec"], _WORKER["reduced"], _WORKER["known"] = spec, reduced, known


def _prepare_unless_known(path: str) -> Prepared | Known:
    """Decode task of the local engine: ``prepare_unless_known`` with the settings ``_init_worker`` stored."""
    return prepare_unless_known(path, _WORKER["spec"], _WORKER["reduced"], _WORKER["known"])


def prepare_unless_known(path: str, spec: PreprocessSpec, reduced: frozenset[str],
                         known: Container[tuple[str, str]]) -> Prepared | Known:
    """Decode task of both engines: skip a file this bundle already scored (its (path, sha256) in ``known``), else
    decode and preprocess it (``prepare_listed``). ``path`` is ``path_text``, as ``walk_inputs`` lists it."""
    digest = sha256_or_empty(os_path(path))
    if (path, digest) in known:
        return Known(path, digest)
    return prepare_listed(path, spec, reduced)


def prepare_listed(path: str, spec: PreprocessSpec, reduced: frozenset[str]) -> Prepared:
    """``prepare`` the file that ``path`` (as ``walk_inputs`` lists it: ``path_text``) names; the result, its detail
    included, names the file by that text, so a name that is not UTF-8 reaches the audit store and worklist intact."""
    real = os_path(path)
    prepared = prepare(real, spec, reduced)
    if real == path:
        return prepared
    return dataclasses.replace(prepared, path=path, detail=prepared.detail.replace(real, path))


def _prepared_stream(files: Sequence[str], spec: PreprocessSpec, reduced: frozenset[str], known: frozenset[tuple[str, str]],
                     workers: int, decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S) -> Iterator[Prepared | Known]:
    """Prepare files in ``workers`` processes (at least one: never in this process), in order.

    A worker that dies (a crashing decoder, the OOM killer) or runs past ``decode_timeout_s``
    on one file costs no other file and stalls nothing (see ``deploy.isolation.Decoder``):
    the file goes to human review as ``decode_failed`` or ``decode_timeout``.
    """
    with Decoder(max(workers, 1), decode_timeout_s, _init_worker, (spec, reduced, known)) as decoder:
        yield from decoder.map(_prepare_unless_known, files)


def _batches(stream: Iterable[Prepared | Known], size: int) -> Iterator[list[Prepared | Known]]:
    batch: list[Prepared | Known] = []
    for item in stream:
        batch.append(item)
        if sum(isinstance(i, Prepared) and i.model_input is not None for i in batch) >= size:
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
    """What an engine made of a run's files: drafts (each saved as pending when made), the (path, sha256) keys of the
    files it skipped as already scored by this bundle, and the ONNX Runtime provider(s) that ran the model."""

    fresh: list[Decision]
    known: list[tuple[str, str]]
    provider: str


ScoreFiles = Callable[[Sequence[str], AuditStore, frozenset[tuple[str, str]], str, Callable[[str], str]], Scored]
"""An engine: ``(files, store, known, run_id, pseudonymize_id) -> Scored`` for the regular files of a walk."""


def run_engine(paths: Sequence[str], bundle: Bundle, audit_db: Path | str, out: Path, score_files: ScoreFiles,
               flag_rate: float = DEFAULT_FLAG_RATE, min_risk: float = 0.0) -> RunSummary:
    """A run of either engine: check the settings and ``out``, walk ``paths``, lock and open the store, let
    ``score_files`` score the regular files, record the entries the walk cannot score, flag the top ``flag_rate``
    of the run's studies whose risk is >= ``min_risk``, append the decisions, write the worklist."""
    start = time.perf_counter()
    check_flag_rate(flag_rate)
    check_min_risk(min_risk)
    check_writable(out)
    inputs = walk_inputs(paths)
    run_id = uuid.uuid4().hex
    secret = load_or_create_secret(default_secret_path(audit_db))
    with run_lock(audit_db), open_store(audit_db) as store:
        state = resume_state(store, bundle)
        scored = score_files(inputs.files, store, state.known, run_id, lambda pid: pseudonymize(pid, secret))
        walked, walked_known = unscorable_drafts(inputs.unscorable, state.known, bundle, run_id)
        final_new, final_previous = record_run(store, bundle, state, scored.fresh + walked,
                                               scored.known + walked_known, flag_rate, run_id, min_risk)
    write_worklist(final_new + final_previous, out)
    return RunSummary(len(inputs.files) + len(inputs.unscorable), len(final_previous), final_new + final_previous,
                      scored.provider, time.perf_counter() - start, len(inputs.unscorable))


def run_score(paths: Sequence[str], bundle: Bundle, audit_db: Path | str, out: Path,
              flag_rate: float = DEFAULT_FLAG_RATE, workers: int = 1, device: str = "auto", progress: bool | None = None,
              decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S, min_risk: float = 0.0) -> RunSummary:
    """Score every file under ``paths`` on this machine (``run_engine``); returns the run summary. Raises on
    operational failure only.

    ``decode_timeout_s`` bounds each file's decode in one of ``workers`` decode processes; the model runs here.
    """
    check_timeout(decode_timeout_s)

    def score_files(files: Sequence[str], store: AuditStore, known: frozenset[tuple[str, str]], run_id: str,
                    pseudonymize_id: Callable[[str], str]) -> Scored:
        model = load_model(bundle, device)
        fresh, seen_known = _score_new_files(files, model, store, known, workers, pseudonymize_id, run_id, progress,
                                             decode_timeout_s)
        return Scored(fresh, seen_known, model.provider)

    return run_engine(paths, bundle, audit_db, out, score_files, flag_rate, min_risk)


def unscorable_drafts(unscorable: Sequence[Prepared], known: frozenset[tuple[str, str]], bundle: Bundle,
                      run_id: str) -> tuple[list[Decision], list[tuple[str, str]]]:
    """Human-review drafts for the entries the walk cannot score that this bundle has not recorded yet, and the
    (path, sha256) keys of those it has."""
    seen = [(p.path, p.sha256) for p in unscorable if (p.path, p.sha256) in known]
    new = [draft(p, bundle, lambda _: "", run_id=run_id)  # no header read, so no patient id to pseudonymize
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
    risks = scored_study_risks(new + previous)
    flags = flag_top_k(risks, flag_rate, min_risk)
    final_new, final_previous = finalize(new, flags, risks), finalize(previous, flags, risks)
    superseding = [
        dataclasses.replace(now, supersedes=state.rows[(before.path, before.sha256)]["id"], run_id=run_id)
        for before, now in zip(previous, final_previous)
        if now.flagged != before.flagged
    ]
    store.append_decisions(final_new + superseding)
    clear_pending(store, [(d.path, d.sha256, bundle.sha256) for d in new])
    return final_new, final_previous


def _score_new_files(files: Sequence[str], model: Model, store: AuditStore, known: frozenset[tuple[str, str]],
                     workers: int, pseudonymize_id: Callable[[str], str], run_id: str,
                     progress: bool | None, decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S,
                     ) -> tuple[list[Decision], list[tuple[str, str]]]:
    """Drafts for the files this bundle has not scored (saved as pending per batch), and the keys it had."""
    fresh: list[Decision] = []
    seen_known: list[tuple[str, str]] = []
    stream = _prepared_stream(files, model.bundle.preprocessing, model.bundle.reduced_decode, known, workers,
                              decode_timeout_s)
    with tqdm(total=len(files), unit="file", disable=None if progress is None else not progress, file=sys.stderr) as bar:
        for batch in _batches(stream, BATCH_SIZE):
            drafts, skipped = score_batch(model, batch, pseudonymize_id, run_id)
            seen_known += skipped
            save_pending(store, [(d.path, d.sha256, model.bundle.sha256, dataclasses.asdict(d)) for d in drafts])
            fresh += drafts
            bar.update(len(batch))
    return fresh, seen_known


def score_batch(model: Model, items: Sequence[Prepared | Known], pseudonymize_id: Callable[[str], str],
                run_id: str) -> tuple[list[Decision], list[tuple[str, str]]]:
    """One model batch of either engine's decode stream: drafts for the prepared files (in order), and the
    (path, sha256) keys of the files skipped as already scored."""
    skipped = [(item.path, item.sha256) for item in items if isinstance(item, Known)]
    drafts = score_prepared(model, [item for item in items if isinstance(item, Prepared)], pseudonymize_id, run_id)
    return drafts, skipped


def score_command(args: argparse.Namespace) -> int:
    """CLI entry for ``cxr-triage score`` (the local engine); see ``run_command``."""
    return run_command(args, lambda bundle, audit_db: run_score(
        args.paths, bundle, audit_db, Path(args.out), args.flag_rate, args.workers, args.device,
        decode_timeout_s=args.decode_timeout, min_risk=args.min_risk))


def run_command(args: argparse.Namespace, run: Callable[[Bundle, Path | str], RunSummary], engine: str = "") -> int:
    """``cxr-triage score`` with either engine's ``run(bundle, audit_db)``: the bundle is loaded first (refused unless
    its identity is ``--expect-bundle-sha256`` when a site pinned one); exit 1 for an operational failure, 3 when
    there was nothing to score."""
    show_notices()
    try:
        bundle = load_bundle(args.bundle, expected_sha256=args.expect_bundle_sha256)
        summary = run(bundle, args.audit_db if is_url(args.audit_db) else Path(args.audit_db))
    except (TriageError, OSError, ValueError) as error:
        print(f"cxr-triage score: error: {error}", file=sys.stderr)
        return 1
    print(f"bundle: {bundle.name} {bundle.version} (sha256 {bundle.sha256})")
    if engine:
        print(f"engine: {engine}")
    code = report(summary, args)
    return send_run_results(summary.decisions, args.send_results, args.send_ae) or code if args.send_results else code


def show_notices() -> None:
    """The core's one-line notices on stderr (``triage.*`` at INFO: where ONNX Runtime runs and why; library
    warnings, redacted by ``triage.logs``); other libraries' logging stays at WARNING."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    logging.getLogger("triage").setLevel(logging.INFO)


def send_run_results(decisions: Sequence[Decision], destinations: Sequence[Destination], calling_ae: str) -> int:
    """``--send-results``: the SR of every study of the run to each destination (``deploy.results.send``); 1 (each
    study not sent printed with why, the worklist and audit being written) or 0."""
    problems = {uid: problem for uid, problem in send_results(decisions, destinations, calling_ae).items() if problem}
    sent = len({d.study_uid for d in decisions if d.study_uid and d.sop_uid}) - len(problems)
    print(f"results: {sent} study report(s) sent to {', '.join(map(str, destinations))}")
    for study_uid, problem in problems.items():
        print(f"cxr-triage score: error: study {study_uid}: report not sent: {problem}", file=sys.stderr)
    return 1 if problems else 0


def destination_argument(text: str) -> Destination:
    """argparse type of ``--send-results``: a destination, or the parse error with its example."""
    try:
        destination = Destination.parse(text)
    except DestinationError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    if destination.heatmap:
        raise argparse.ArgumentTypeError(f"{text!r}: score --send-results sends each study's SR only, not heatmaps. "
                                         "Fix: drop ',heatmap' (the workstation sends heatmaps: its --destination)")
    return destination


def report(summary: RunSummary, args: argparse.Namespace) -> int:
    """Print a finished run's summary; its exit code: 0, or 3 (with a warning) when there was nothing to score."""
    print("\n".join(summary.lines()))
    print(f"worklist: {args.out}\naudit: {args.audit_db}")
    if not summary.is_empty:
        return 0
    unscorable = f"; the {summary.unscorable} not scorable where found are in the worklist" if summary.unscorable else ""
    print(f"cxr-triage score: warning: nothing to score under {' '.join(map(path_text, args.paths))}: no file but "
          f"hidden ones, DICOMDIR and {' '.join(sorted(IGNORED_SUFFIXES))} files{unscorable}. Fix: check the PATH",
          file=sys.stderr)
    return EXIT_NOTHING_TO_SCORE


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``score`` on the main CLI."""
    parser = subparsers.add_parser(
        "score", help="score DICOM/PNG/JPEG files or folders, flag the riskiest studies, audit every decision",
        description="Score every file under PATH (recursive). Writes a worklist CSV (flagged studies first) "
                    "and appends one audit record per file. Bad files are recorded for human review, never dropped.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or folders to score")
    parser.add_argument("--bundle", default=str(default_bundle_dir()), help="model bundle folder (default: the bundled demo model)")
    parser.add_argument("--expect-bundle-sha256", metavar="SHA256", default=os.environ.get(BUNDLE_SHA256_ENV) or None,
                        help="refuse to score unless the bundle's identity (sha256 of its manifest.json, as 'bundle:' "
                             f"prints it) is this one, the bundle the site approved (default: ${BUNDLE_SHA256_ENV})")
    parser.add_argument("--flag-rate", type=float, default=DEFAULT_FLAG_RATE,
                        help="fraction of the run's studies to flag, the riskiest: relative to the batch (default 0.05)")
    parser.add_argument("--min-risk", type=float, default=0.0, metavar="RISK",
                        help="flag a study of that top fraction only if its risk is at least RISK, so a batch of low "
                             "risks can flag none (default 0: always flag the top fraction)")
    parser.add_argument("--out", default="worklist.csv", help="worklist CSV to write (default worklist.csv)")
    parser.add_argument("--audit-db", default=str(default_audit_db()), help="audit store: a SQLite file or a postgresql:// URL (default: $CXR_TRIAGE_AUDIT_DB or ./cxr-triage-audit.sqlite)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decode worker processes (default: CPU count, at most 4)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime device (default auto: CUDA if present)")
    parser.add_argument("--decode-timeout", type=float, default=DEFAULT_DECODE_TIMEOUT_S, metavar="SECONDS",
                        help=f"per-file decode limit in a worker process; a file past it goes to human review as "
                             f"decode_timeout (default {DEFAULT_DECODE_TIMEOUT_S:g})")
    parser.add_argument("--send-results", nargs="+", type=destination_argument, default=[],
                        metavar="AE@HOST:PORT|URL", help="after the run, send each study's DICOM SR (TID 1500) to these "
                        "PACS: a C-STORE SCP or a DICOMweb (STOW-RS) URL; exit 1 if one is not sent")
    parser.add_argument("--send-ae", default=SEND_AE, metavar="AE", help=f"our AE title for --send-results C-STOREs "
                        f"(default {SEND_AE})")
    parser.set_defaults(func=score_command)
