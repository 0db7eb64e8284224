"""Finding a program's processes from outside, as an operator (or the OOM killer) would, and a decode task that hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state letter) of every process, from /proc/<pid>/stat."""
    processes = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited while we looked
            continue
        processes[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return processes


def below(pid: int, levels: int) -> list[int]:
    """PIDs exactly ``levels`` levels below ``pid`` (a Dask engine's decode processes are 3 below the program:
    Dask worker, its forkserver, decode process)."""
    parents = {p: parent for p, (parent, _, _) in table().items()}
    found = {pid}
    for _ in range(levels):
        found = {p for p, parent in parents.items() if parent in found}
    return sorted(found)


def grandchildren(pid: int) -> list[int]:
    """PIDs two levels below ``pid`` (decode workers sit under the program's forkserver)."""
    return below(pid, 2)


def group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``: a program started in a session of its own and
    everything it started (forkserver, decode workers, resource tracker), wherever they were re-parented."""
    return sorted(p for p, (_, g, state) in table().items() if g == pgid and state != "Z")


def gone_within(pgid: int, seconds: float) -> list[int]:
    """Wait up to ``seconds`` for process group ``pgid`` to empty; the processes still alive then ([] when none)."""
    deadline = time.monotonic() + seconds
    while (left := group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def hang(path: str) -> None:
    """A decode task that never returns, as a stuck codec would not."""
    time.sleep(3600)


def kill_9_leaves_nothing(program: subprocess.Popen, started: Callable[[], bool], start_s: float = 60.0) -> None:
    """Wait until ``started()`` (the program's children are up), SIGKILL the program (started with
    ``start_new_session=True``), and assert that nothing of its process group is left within 5 s."""
    try:
        deadline = time.monotonic() + start_s
        while not started() and program.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started(), f"the children of {program.args!r} did not start"
        time.sleep(0.5)  # into the work
        os.kill(program.pid, signal.SIGKILL)
        program.wait(timeout=10)
        assert gone_within(program.pid, 5.0) == []
    finally:
        for pid in group(program.pid):
            os.kill(pid, signal.SIGKILL)
