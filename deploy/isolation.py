"""Decode in processes of their own, so a crashing or stuck codec (or the OOM killer) costs one file, not the program.

``Decoder.map`` runs a task over paths in a pool of processes and yields the results in
order. A process that dies (a crashing codec, the OOM killer) costs no file: the files
in flight are retried one process each, and one that kills its process again is
recorded as ``decode_failed``. A file whose task runs past ``timeout_s`` has its process
killed and is recorded as ``decode_timeout``; the other files in flight are retried.
Either way the file goes to human review, and a fresh pool takes over.

The decode processes die with the program, even with a ``kill -9`` (Linux): the forkserver
(started by the program) exits as soon as the program ends (``exit_with``, run by
``deploy.forkserver_preload``), and every decode process (started by the forkserver) has asked
the kernel for SIGKILL when the forkserver dies (``die_with_parent``), which works even while a
codec holds the GIL; multiprocessing's resource tracker then reads end-of-file and exits.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Any

from triage.audit import os_path
from triage.ingest import header_meta
from triage.pipeline import Prepared, sha256_or_empty, unscorable

DEFAULT_DECODE_TIMEOUT_S = 60.0
"""Seconds one file may take to decode and preprocess in a worker (a chest radiograph takes well under 5 s)."""
QUEUED_PER_WORKER = 4
WARM_UP_S = 60.0  # at most this long to see every worker of a new pool start (their start-up is not a file's time)


FORKSERVER_PRELOAD = ["__main__", "deploy.forkserver_preload"]  # imported by the forkserver when it starts
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def decoder_pool(workers: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A pool of decode processes started from a clean forkserver (no inherited ONNX Runtime threads); the
    forkserver and the processes die with this one (see the module docstring), then ``initializer(*initargs)``."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)  # takes effect when the forkserver (one per process) starts
    return ProcessPoolExecutor(workers, mp_context=context, initializer=start_worker,
                               initargs=(os.getpid(), initializer, initargs))


def start_worker(owner_pid: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """Initializer of each decode process: die with the forkserver (its parent), or exit now if ``owner_pid`` (the
    program, whose death takes the forkserver) died before this process could ask; then ``initializer(*initargs)``."""
    die_with_parent()
    try:
        os.kill(owner_pid, 0)
    except ProcessLookupError:
        os._exit(1)
    if initializer is not None:
        initializer(*initargs)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it ends (Linux ``prctl(PR_SET_PDEATHSIG)``:
    the forkserver's only thread for a decode process; elsewhere nothing is done)."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")


def exit_with(pid: int) -> None:
    """End this process as soon as process ``pid`` ends, however it ends: a daemon thread waits on a Linux pidfd
    (the whole process, not one of its threads, so it suits a forkserver started by any thread of the program;
    elsewhere nothing is done). Only for a process whose threads never hold the GIL for long (not a decoder)."""
    if not hasattr(os, "pidfd_open"):
        return
    try:
        process = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)

    def wait_then_exit() -> None:
        select.select([process], [], [])  # readable once the process has ended
        os._exit(1)

    threading.Thread(target=wait_then_exit, name=f"exit-with-{pid}", daemon=True).start()


def ready() -> int:
    """A short task that says which worker ran it: once it returns, that process has started and run its initializer."""
    time.sleep(0.01)  # long enough for the next one to go to another worker
    return os.getpid()


def warm_pool(workers: int, initializer: Callable[..., None] | None, initargs: tuple,
              start_up_s: float = WARM_UP_S) -> ProcessPoolExecutor:
    """A started pool: process start-up and imports (seconds on a busy machine) never count against a file's timeout."""
    pool = decoder_pool(workers, initializer, initargs)
    started, deadline = set(), time.monotonic() + start_up_s
    try:
        while len(started) < workers and time.monotonic() < deadline:
            started.update(future.result() for future in [pool.submit(ready) for _ in range(workers)])
    except BrokenProcessPool:
        kill(pool)
        raise
    return pool


def check_timeout(timeout_s: float | None) -> None:
    """A decode timeout is a positive number of seconds (or None: no limit)."""
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"decode timeout {timeout_s!r} s must be > 0. Fix: pass --decode-timeout with a positive number of seconds")


def crashed(path: str) -> Prepared:
    """The record of a file whose decoding process died twice: human review, never dropped."""
    return unscored(path, "decode_failed", "the decoding process died while reading this file (twice)",
                    "re-export the study from PACS uncompressed, and report the file to the maintainers")


def timed_out(path: str, timeout_s: float) -> Prepared:
    """The record of a file whose decoding ran past the timeout (its process was killed): human review."""
    return unscored(path, "decode_timeout", f"decoding did not finish within {timeout_s:g} s, so its process was "
                    "stopped", "re-export the study from PACS uncompressed; if the file is valid, raise "
                    "--decode-timeout and report it to the maintainers")


def unscored(path: str, reason: str, problem: str, fix: str) -> Prepared:
    """A human-review ``Prepared`` (``triage.pipeline.unscorable``) that still names the study: one more read of the
    file in this process, for its sha256 (never past the size limit) and, when it has one, its header's tags.
    ``path`` is the text the file is listed and recorded by (``triage.audit.path_text``), so a name that is not
    UTF-8 is opened by its bytes (``os_path``)."""
    real = os_path(path)
    digest = sha256_or_empty(real)
    return unscorable(path, reason, problem, fix, digest, header_meta(real, digest) if digest else None)


def kill(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now, killing its processes (a stuck codec never returns to be shut down politely)."""
    for process in list((pool._processes or {}).values()):  # CPython 3.8+: pid -> Process; no public way to kill
        process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def run_alone(task: Callable[..., Any], path: str, *args: Any, initializer: Callable[..., None] | None = None,
              initargs: tuple = (), timeout_s: float | None = None) -> Any:
    """``task(path, *args)`` in a process of its own; ``crashed``/``timed_out(path)`` if that process dies or hangs."""
    pool = decoder_pool(1, initializer, initargs)
    try:
        pool.submit(ready).result()  # start-up is not the file's time
        return pool.submit(task, path, *args).result(timeout=timeout_s)
    except BrokenProcessPool:
        return crashed(path)
    except TimeoutError:
        return timed_out(path, timeout_s or 0.0)
    finally:
        kill(pool)


class Decoder:
    """A pool of ``workers`` decode processes that survives crashed and stuck tasks.

    ``timeout_s`` bounds each file: the clock starts when the file is the oldest one
    in flight in a started pool (so a file gets at least ``timeout_s`` of its own; None
    means no limit).
    Use as a context manager, or call ``close``.
    """

    def __init__(self, workers: int, timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S,
                 initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> None:
        check_timeout(timeout_s)
        self.workers, self.timeout_s = max(1, workers), timeout_s
        self.initializer, self.initargs = initializer, initargs
        self._pool: ProcessPoolExecutor | None = None
        self._in_flight: deque[tuple[str, Future]] = deque()

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (idle ones exit; busy ones are killed)."""
        if self._pool is not None:
            kill(self._pool)
            self._pool = None

    def next_is_ready(self) -> bool:
        """True when the next result of the running ``map`` is already done, so taking it will not wait (a caller
        can use the time it would wait, e.g. to run the model on the files it holds)."""
        return bool(self._in_flight) and self._in_flight[0][1].done()

    def map(self, task: Callable[..., Any], paths: Iterable[str], *args: Any) -> Iterator[Any]:
        """``task(path, *args)`` for every path, in worker processes, yielded in order."""
        queued, in_flight = iter(paths), deque()
        self._in_flight = in_flight
        while True:
            room = QUEUED_PER_WORKER * self.workers - len(in_flight)
            in_flight.extend((p, self._submit(task, p, *args)) for p in islice(queued, room))
            if not in_flight:
                return
            path, future = in_flight.popleft()
            try:
                yield future.result(timeout=self.timeout_s)
            except BrokenProcessPool:
                yield from self._recover(task, [(path, future)] + list(in_flight), args)
                in_flight.clear()
            except TimeoutError:
                yield timed_out(path, self.timeout_s or 0.0)
                yield from self._recover(task, list(in_flight), args)
                in_flight.clear()

    def _submit(self, task: Callable[..., Any], path: str, *args: Any) -> Future:
        """Submit to the pool; one whose process died while idle (killed from outside) is replaced first."""
        for _ in range(2):
            try:
                if self._pool is None:
                    self._pool = warm_pool(self.workers, self.initializer, self.initargs)
                return self._pool.submit(task, path, *args)
            except BrokenProcessPool:
                self.close()
        raise BrokenProcessPool(f"{path}: a fresh decoder pool broke before its first task. Fix: check memory limits")

    def _recover(self, task: Callable[..., Any], in_flight: list[tuple[str, Future]], args: tuple) -> Iterator[Any]:
        """After a dead or stuck process: finished results kept, the other files in flight alone, a fresh pool later."""
        self.close()
        for path, future in in_flight:
            if future.done() and not future.cancelled() and future.exception() is None:
                yield future.result()
            else:
                yield run_alone(task, path, *args, initializer=self.initializer, initargs=self.initargs,
                                timeout_s=self.timeout_s)
