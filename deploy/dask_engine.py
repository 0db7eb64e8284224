"""``cxr-triage score --engine dask``: the batch scorer with decode and inference on Dask workers.

The client (this process) runs ``deploy.batch.run_engine``, the local engine's run (walk, resume,
unscorable entries, flags, audit, worklist), with the Dask cluster as its engine: it submits chunks of
files; each Dask worker reads each file once, decodes and preprocesses it (``triage.pipeline.prepare_file``, the
local engine's decode task) in a decode process of its own under the local engine's
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

from triage.bundle import Bundle, load_bundle
from triage.errors import BundleError, TriageError
from triage.inference import Model, load_model
from triage.pipeline import Known, Prepared, draft, prepare_file, score_batch
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
                known: frozenset[tuple[str, str]], run_id: str, decode_timeout_s: float | None) -> batch.Scored:
    """Worker task: the local engine's decode task (``triage.pipeline.prepare_file``: read once, skip the files whose
    (path, sha256) is in ``known``) in this thread's decode process (at most ``decode_timeout_s`` each), then
    ``triage.pipeline.score_batch``. The drafts carry raw patient ids: the client pseudonymizes them."""
    model = worker_model(bundle_dir, bundle_sha256, device)
    items = list(worker_decoder(decode_timeout_s).map(
        prepare_file, paths, model.bundle.preprocessing, model.bundle.reduced_decode, known))
    drafts = score_batch([item for item in items if isinstance(item, Prepared)], model, run_id)
    return batch.Scored(drafts, [(item.path, item.sha256) for item in items if isinstance(item, Known)],
                        model.provider)


def partition(files: Sequence[str], workers: int) -> list[list[str]]:
    """Consecutive chunks of at most ``MAX_CHUNK`` files, at least ``CHUNKS_PER_WORKER`` per worker when possible."""
    size = max(1, min(MAX_CHUNK, math.ceil(len(files) / max(1, CHUNKS_PER_WORKER * workers))))
    return [list(files[i:i + size]) for i in range(0, len(files), size)]


def killed_result(path: str, bundle: Bundle, run_id: str) -> batch.Scored:
    """A file whose task killed every Dask worker that ran it, alone: human review, never dropped."""
    crashed = unscored(path, "decode_failed", "every Dask worker that scored this file died (the OOM killer, or a "
                       "crash while scoring it)", "re-export the study from PACS uncompressed, and report the file "
                       "to the maintainers")
    return batch.Scored([draft(crashed, bundle, run_id=run_id)], [], "")


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


@dataclass(frozen=True)
class DaskEngine:
    """A ``deploy.batch.Engine`` on Dask workers: the scheduler at ``scheduler``, else a ``local_cluster`` of
    ``workers`` processes. ``on_chunk(client)`` is called after each finished chunk is saved (progress, tests)."""

    scheduler: str | None = None
    workers: int = 2
    device: str = "auto"
    progress: bool | None = None
    decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S
    on_chunk: Callable[["Client"], None] | None = None

    @property
    def name(self) -> str:
        where = f"scheduler {self.scheduler}" if self.scheduler else f"local cluster of {self.workers} worker processes"
        return f"dask ({where})"

    def score(self, files: Sequence[str], bundle: Bundle, known: frozenset[tuple[str, str]],
              run_id: str) -> Iterator[batch.Scored]:
        """Each chunk's ``Scored`` as it finishes (a chunk that kills its workers is retried file by file)."""
        check_timeout(self.decode_timeout_s)
        with dask_client(self.scheduler, self.workers) as client:
            chunks = partition(files, max(1, len(client.nthreads())))
            yield from self._score_on(client, chunks, bundle, known, run_id)

    def _score_on(self, client: "Client", chunks: list[list[str]], bundle: Bundle, known: frozenset[tuple[str, str]],
                  run_id: str) -> Iterator[batch.Scored]:
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        known_by_path: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for key in known:
            known_by_path[key[0]].add(key)
        bundle_dir = str(Path(bundle.path).resolve())

        def submit(paths: list[str], tag: str):
            chunk_known = frozenset(key for p in paths for key in known_by_path.get(p, ()))
            return client.submit(score_chunk, paths, bundle_dir, bundle.sha256, self.device, chunk_known, run_id,
                                 self.decode_timeout_s, key=f"cxr-triage-score-{run_id}-{tag}", pure=False)

        futures = {submit(chunk, str(i)): i for i, chunk in enumerate(chunks)}
        disable = None if self.progress is None else not self.progress
        with tqdm(total=sum(map(len, chunks)), unit="file", disable=disable, file=sys.stderr) as bar:
            for future in as_completed(futures):
                index = futures[future]
                try:
                    yield future.result()
                except KilledWorker:
                    for j, path in enumerate(chunks[index]):
                        yield alone_or_killed(submit([path], f"{index}-{j}"), path, bundle, run_id, KilledWorker)
                future.release()  # saved: let the worker free it, and a later loss not recompute it
                bar.update(len(chunks[index]))
                if self.on_chunk is not None:
                    self.on_chunk(client)


def run_dask(paths: Sequence[str], bundle: Bundle, audit_db: Path | str, out: Path,
             flag_rate: float = DEFAULT_FLAG_RATE, scheduler: str | None = None, workers: int = 2,
             device: str = "auto", progress: bool | None = None,
             on_chunk: Callable[["Client"], None] | None = None,
             decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S, min_risk: float = 0.0) -> batch.RunSummary:
    """Score every file under ``paths`` on Dask workers: ``deploy.batch.run_engine`` with a ``DaskEngine``; the same
    decisions, audit and worklist as the local engine. Raises on operational failure only (bundle, store, worklist,
    scheduler, a worker that cannot start decode processes)."""
    check_timeout(decode_timeout_s)
    engine = DaskEngine(scheduler, workers, device, progress, decode_timeout_s, on_chunk)
    return batch.run_engine(paths, bundle, audit_db, out, engine, flag_rate, min_risk)


def alone_or_killed(future, path: str, bundle: Bundle, run_id: str, killed: type[Exception]) -> batch.Scored:
    """The result of a single-file task, or the human-review record when it kills its workers too."""
    try:
        return future.result()
    except killed:
        return killed_result(path, bundle, run_id)
