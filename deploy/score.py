"""``cxr-triage score PATH...``: the one scoring command, over either ``--engine`` (``deploy.batch.LocalEngine``,
``deploy.dask_engine.DaskEngine``); the run itself is ``deploy.batch.run_engine``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from triage.audit import Decision, default_audit_db, is_url, path_text
from triage.bundle import load_bundle
from triage.errors import TriageError
from triage.policy import DEFAULT_FLAG_RATE

from .batch import IGNORED_SUFFIXES, Engine, LocalEngine, RunSummary, run_engine
from .dask_engine import DaskEngine
from .isolation import DEFAULT_DECODE_TIMEOUT_S, check_timeout
from .paths import default_bundle_dir
from .results.send import Destination, DestinationError, send_results

EXIT_NOTHING_TO_SCORE = 3
SEND_AE = "CXR_TRIAGE"  # calling AE title of --send-results
BUNDLE_SHA256_ENV = "CXR_TRIAGE_BUNDLE_SHA256"  # a site's pinned bundle identity, the default of --expect-bundle-sha256


def score_command(args: argparse.Namespace) -> int:
    """``cxr-triage score``: ``run_engine`` with the ``--engine`` chosen (``engine_of``); the bundle is loaded first
    (refused unless its identity is ``--expect-bundle-sha256`` when a site pinned one); exit 1 for an operational
    failure, 3 when there was nothing to score."""
    show_notices()
    try:
        engine = engine_of(args)
        bundle = load_bundle(args.bundle, expected_sha256=args.expect_bundle_sha256)
        audit_db = args.audit_db if is_url(args.audit_db) else Path(args.audit_db)
        summary = run_engine(args.paths, bundle, audit_db, Path(args.out), engine, args.flag_rate, args.min_risk)
    except (TriageError, OSError, ValueError) as error:  # OSError: also a Dask scheduler that does not answer
        print(f"cxr-triage score: error: {error}", file=sys.stderr)
        return 1
    print(f"bundle: {bundle.name} {bundle.version} (sha256 {bundle.sha256})")
    if not isinstance(engine, LocalEngine):
        print(f"engine: {engine.name}")
    code = report(summary, args)
    return send_run_results(summary.decisions, args.send_results, args.send_ae) or code if args.send_results else code


def engine_of(args: argparse.Namespace) -> Engine:
    """The ``Engine`` that ``--engine`` (and ``--scheduler``, ``--workers``, ``--device``, ``--decode-timeout``)
    name; ``ValueError`` for ``--scheduler`` without ``--engine dask``."""
    check_timeout(args.decode_timeout)
    if args.engine == "local":
        if args.scheduler:
            raise ValueError("--scheduler needs --engine dask")
        return LocalEngine(args.workers, args.device, decode_timeout_s=args.decode_timeout)
    return DaskEngine(args.scheduler, max(1, args.workers), args.device, decode_timeout_s=args.decode_timeout)


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
    parser.add_argument("--engine", choices=("local", "dask"), default="local",
                        help="local (default): decode in worker processes of this machine; dask: decode and score on "
                             "Dask workers (the 'scale' extra)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="with --engine dask: a running Dask scheduler (tcp://host:8786); without it, a local "
                             "cluster of --workers single-thread worker processes is started")
    parser.set_defaults(func=score_command)
