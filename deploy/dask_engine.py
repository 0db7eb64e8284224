"""``cxr-triage score --engine dask``: the batch scorer with decode and inference on Dask workers.

The client (this process) runs ``deploy.batch.run_engine``, the local engine's run (walk, resume,
unscorable entries, flags, audit, worklist), with the Dask cluster as its engine: it submits chunks of
files; each Dask worker decodes and preprocesses them (``deploy.batch.prepare_unless_known``, the local
engine's decode task) in a decode process of its own under the local engine's
isolation (``deploy.isolation.Decoder``, one per worker thread, kept in ``_DECODERS``), and runs
the model on one ONNX Runtime session per worker process, kept in ``_SESSIONS`` (keyed by
bundle folder, sha256 and device; CUDA when the worker has it, see
``triage.inference.choose_providers``); each worker refuses a bundle whose identity is not the client's,
which passed the site's pin (``--expect-bundle-sha256``). Workers return drafts without
pixels; the client pseudonymizes patient ids (the site secret never leaves it) and saves each
chunk's drafts as pending (an upsert keyed by path, sha256 and bundle); ``run_engine`` then
flags the top ``flag_rate`` of all studies and appends the audit records.

So a file whose decode runs past ``--decode-timeout`` or crashes its decode process gets the
local engine's ``decode_timeout``/``decode_failed`` record (naming its study), and the Dask worker
goes on. The decode processes are children of the worker, which therefore must not be a daemonic
process (``distributed.worker.daemon: False``; ``local_cluster`` sets it, ``WorkerSetupError`` names
the fix for workers started without it).

A lost worker costs nothing: Dask reruns its tasks elsewhere, and since only the client
writes, a rerun task cannot duplicate a record. A chunk that kills ``allowed-failures``
workers (the OOM killer, a crash in the model's runtime) is split into single-file tasks, and a
file that still kills its workers goes to human review as ``decode_failed``. A rerun of the same
command is idempotent: files already audited with the same path, sha256 and bundle are skipped.

``distributed`` is imported only when this engine runs (the ``scale`` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import socket
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from triage.audit import AuditStore, Decision
from triage.audit.pending import save_pending
from triage.bundle import Bundle, load_bundle
from triage.errors import BundleError, TriageError
from triage.inference import Model, load_model
from triage.pipeline import Prepared, draft
from triage.policy import DEFAULT_FLAG_RATE

from . import batch
from .isolation import DEFAULT_DECODE_TIMEOUT_S, Decoder, check_timeout, unscored

if TYPE_CHECKING:
    from distributed import Client, LocalCluster

MAX_CHUNK = batch.BATCH_SIZE  # files per task: one model batch
CHUNKS_PER_WORKER = 4  # at least this many tasks per worker, so a slow or lost one is a small share

CONNECT_TIMEOUT_S = 30
WORKER_WAIT_S = 120

_SESSIONS: dict[tuple[str, str, str], Model] = {}  # per worker process
_DECODERS: dict[tuple[int, float | None], Decoder] = {}  # per worker thread and decode timeout


class WorkerSetupError(TriageError, RuntimeError):
    """A Dask worker that cannot run this engine as it was started."""


@dataclass(frozen=True)
class ChunkResult:
    """What a worker returns for one chunk: drafts (no pseudonym yet) with each one's raw patient id
    (None when the file had no readable header), the (path, sha256) keys it skipped as already scored,
    and the ONNX Runtime provider that ran the model."""

    drafts: list[Decision]
    patient_ids: list[str | None]
    known: list[tuple[str, str]]
    provider: str


def worker_model(bundle_dir: str, bundle_sha256: str, device: str) -> Model:
    """This worker process's session on the bundle, loaded and verified on first use, pinned to the client's bundle
    identity ``bundle_sha256`` (which passed the site's ``--expect-bundle-sha256``) as the client's was pinned."""
    key = (bundle_dir, bundle_sha256, device)
    if key not in _SESSIONS:
        try:
            bundle = load_bundle(bundle_dir, expected_sha256=bundle_sha256)
        except BundleError as error:
            raise BundleError(f"Dask worker on {socket.gethostname()}: {error}; every worker must load the client's "
                              "bundle at the same path (a shared read-only folder, or the same release copied to each "
                              "machine)") from None
        _SESSIONS[key] = load_model(bundle, device, threads=worker_threads())
    return _SESSIONS[key]


def worker_threads() -> int:
    """ONNX Runtime intra-op threads: the Dask worker's thread count (0, ORT's choice, outside a worker)."""
    from distributed import get_worker

    try:
        return get_worker().state.nthreads
    except ValueError:  # not running inside a Dask worker
        return 0


def worker_decoder(timeout_s: float | None) -> Decoder:
    """This worker thread's decode process (``deploy.isolation.Decoder``), started on first use."""
    key = (threading.get_ident(), timeout_s)
    if key not in _DECODERS:
        if multiprocessing.current_process().daemon:
            raise WorkerSetupError(
                f"the Dask worker on {socket.gethostname()} is a daemonic process, which may not start the decode "
                "processes that bound each file's decode (--decode-timeout) and survive a crashing codec. Fix: start "
                "the workers with DASK_DISTRIBUTED__WORKER__DAEMON=False in their environment (see deploy/SCALE.md)")
        _DECODERS[key] = Decoder(1, timeout_s)
    return _DECODERS[key]


def score_chunk(paths: Sequence[str], bundle_dir: str, bundle_sha256: str, device: str,
                known: frozenset[tuple[str, str]], run_id: str, decode_timeout_s: float | None) -> ChunkResult:
    """Worker task: the local engine's decode task (``deploy.batch.prepare_unless_known``: skip the files whose
    (path, sha256) is in ``known``) in this thread's decode process (at most ``decode_timeout_s`` each), then the
    local engine's model batch (``deploy.batch.score_batch``)."""
    model = worker_model(bundle_dir, bundle_sha256, device)
    items = list(worker_decoder(decode_timeout_s).map(
        batch.prepare_unless_known, paths, model.bundle.preprocessing, model.bundle.reduced_decode, known))
    drafts, seen = batch.score_batch(model, items, lambda _: "", run_id)  # the client pseudonymizes
    patient_ids = [item.meta.patient_id if item.meta else None for item in items if isinstance(item, Prepared)]
    return ChunkResult(drafts, patient_ids, seen, model.provider)


def partition(files: Sequence[str], workers: int) -> list[list[str]]:
    """Consecutive chunks of at most ``MAX_CHUNK`` files, at least ``CHUNKS_PER_WORKER`` per worker when possible."""
    size = max(1, min(MAX_CHUNK, math.ceil(len(files) / max(1, CHUNKS_PER_WORKER * workers))))
    return [list(files[i:i + size]) for i in range(0, len(files), size)]


def pseudonymized(result: ChunkResult, pseudonymize_id: Callable[[str], str]) -> list[Decision]:
    """The chunk's drafts with the keyed pseudonym of each patient id, as the local engine writes them."""
    return [d if pid is None else dataclasses.replace(d, patient_pseudo_id=pseudonymize_id(pid))
            for d, pid in zip(result.drafts, result.patient_ids)]


def killed_result(path: str, bundle: Bundle, run_id: str) -> ChunkResult:
    """A file whose task killed every worker that ran it, alone: human review, never dropped."""
    detail = (f"{path}: decode_failed: every Dask worker that scored this file died (the OOM killer, or a crash "
              "while scoring it). Fix: re-export the study from PACS uncompressed, and report the file to the maintainers")
    crashed = unscored(path, "decode_failed", detail)
    patient_id = crashed.meta.patient_id if crashed.meta else None
    return ChunkResult([draft(crashed, bundle, lambda _: "", run_id=run_id)], [patient_id], [], "")


@contextmanager
def dask_client(scheduler: str | None, workers: int) -> Iterator["Client"]:
    """A client of the scheduler at ``scheduler``, else of a ``local_cluster`` of ``workers`` processes."""
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except OSError as error:
            raise OSError(f"{scheduler}: cannot reach the Dask scheduler ({error}). Fix: start it with 'dask scheduler' "
                          "on that machine and check the address and the firewall (see deploy/SCALE.md)") from None
        with client:
            try:
                client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            except TimeoutError:
                raise TimeoutError(f"{scheduler}: no Dask worker joined within {WORKER_WAIT_S} s. Fix: start workers "
                                   f"with 'dask worker {scheduler}' (see deploy/SCALE.md)") from None
            yield client
        return
    with local_cluster(workers) as cluster, Client(cluster) as client:
        yield client


@contextmanager
def local_cluster(workers: int) -> Iterator["LocalCluster"]:
    """A Dask cluster of ``workers`` single-thread worker processes on this machine that may start decode processes
    (not daemonic), also when one is restarted after a crash: the setting holds while the cluster runs."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.worker.daemon": False}), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster


def run_dask(paths: Sequence[str], bundle: Bundle, audit_db: Path | str, out: Path,
             flag_rate: float = DEFAULT_FLAG_RATE, scheduler: str | None = None, workers: int = 2,
             device: str = "auto", progress: bool | None = None,
             on_chunk: Callable[["Client"], None] | None = None,
             decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S, min_risk: float = 0.0) -> batch.RunSummary:
    """Score every file under ``paths`` on Dask workers: ``deploy.batch.run_engine``, as ``batch.run_score``, with
    the cluster scoring the files; the same decisions, audit and worklist.

    ``decode_timeout_s`` bounds each file's decode, as in the local engine. ``on_chunk(client)`` is called after
    each finished chunk is saved (progress reports, tests). Raises on operational failure only (bundle, store,
    worklist, scheduler, a worker that cannot start decode processes).
    """
    check_timeout(decode_timeout_s)

    def score_files(files: Sequence[str], store: AuditStore, known: frozenset[tuple[str, str]], run_id: str,
                    pseudonymize_id: Callable[[str], str]) -> batch.Scored:
        with dask_client(scheduler, workers) as client:
            chunks = partition(files, max(1, len(client.nthreads())))
            results = score_on_cluster(client, chunks, bundle, device, known, run_id, store, pseudonymize_id,
                                       progress, on_chunk, decode_timeout_s)
        fresh = [d for i in range(len(chunks)) for d in results[i][0]]
        seen_known = [k for i in range(len(chunks)) for k in results[i][1]]
        providers = ", ".join(sorted({p for _, _, p in results.values() if p})) or "none (no file was scored)"
        return batch.Scored(fresh, seen_known, providers)

    return batch.run_engine(paths, bundle, audit_db, out, score_files, flag_rate, min_risk)


def score_on_cluster(client: "Client", chunks: list[list[str]], bundle: Bundle, device: str,
                     known: frozenset[tuple[str, str]], run_id: str, store: AuditStore,
                     pseudonymize_id: Callable[[str], str],
                     progress: bool | None, on_chunk: Callable[["Client"], None] | None,
                     decode_timeout_s: float | None) -> dict[int, tuple[list[Decision], list[tuple[str, str]], str]]:
    """Chunk index -> (pseudonymized drafts, skipped keys, provider); each chunk's drafts saved as pending on arrival."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    known_by_path: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for key in known:
        known_by_path[key[0]].add(key)
    bundle_dir = str(Path(bundle.path).resolve())

    def submit(paths: list[str], tag: str):
        chunk_known = frozenset(key for p in paths for key in known_by_path.get(p, ()))
        return client.submit(score_chunk, paths, bundle_dir, bundle.sha256, device, chunk_known, run_id,
                             decode_timeout_s, key=f"cxr-triage-score-{run_id}-{tag}", pure=False)

    futures = {submit(chunk, str(i)): i for i, chunk in enumerate(chunks)}
    results: dict[int, tuple[list[Decision], list[tuple[str, str]], str]] = {}
    total = sum(map(len, chunks))
    with tqdm(total=total, unit="file", disable=None if progress is None else not progress, file=sys.stderr) as bar:
        for future in as_completed(futures):
            index = futures[future]
            try:
                parts = [future.result()]
            except KilledWorker:
                parts = [alone_or_killed(submit([p], f"{index}-{j}"), p, bundle, run_id, KilledWorker)
                         for j, p in enumerate(chunks[index])]
            drafts = [d for part in parts for d in pseudonymized(part, pseudonymize_id)]
            save_pending(store, [(d.path, d.sha256, bundle.sha256, dataclasses.asdict(d)) for d in drafts])
            results[index] = (drafts, [k for part in parts for k in part.known],
                              next((part.provider for part in parts if part.provider), ""))
            future.release()  # saved: let the worker free it, and a later loss not recompute it
            bar.update(len(chunks[index]))
            if on_chunk is not None:
                on_chunk(client)
    return results


def alone_or_killed(future, path: str, bundle: Bundle, run_id: str, killed: type[Exception]) -> ChunkResult:
    """The result of a single-file task, or the human-review record when it kills its workers too."""
    try:
        return future.result()
    except killed:
        return killed_result(path, bundle, run_id)


# --- command line ------------------------------------------------------------------------


def add_engine_flags(score_parser: argparse.ArgumentParser) -> None:
    """Add ``--engine`` and ``--scheduler`` to ``cxr-triage score`` and route the command through ``score_command``."""
    score_parser.add_argument("--engine", choices=("local", "dask"), default="local",
                              help="local (default): decode in worker processes of this machine; dask: decode and "
                                   "score on Dask workers (the 'scale' extra)")
    score_parser.add_argument("--scheduler", metavar="ADDRESS",
                              help="with --engine dask: a running Dask scheduler (tcp://host:8786); without it, a "
                                   "local cluster of --workers single-thread worker processes is started")
    score_parser.set_defaults(func=score_command)


def score_command(args: argparse.Namespace) -> int:
    """``cxr-triage score``: the local engine, or the Dask engine with ``--engine dask``."""
    if args.engine == "local":
        if args.scheduler:
            print("cxr-triage score: error: --scheduler needs --engine dask", file=sys.stderr)
            return 1
        return batch.score_command(args)
    workers = max(1, args.workers)
    where = f"scheduler {args.scheduler}" if args.scheduler else f"local cluster of {workers} worker processes"
    engine = f"dask ({where})"
    return batch.run_command(args, lambda bundle, audit_db: run_dask(  # OSError: also a scheduler that does not answer
        args.paths, bundle, audit_db, Path(args.out), args.flag_rate, args.scheduler, workers, args.device,
        decode_timeout_s=args.decode_timeout, min_risk=args.min_risk), engine)
