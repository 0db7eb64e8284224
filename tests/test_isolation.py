"""deploy.isolation on real processes and real (sparse) files: nothing outside a worker reads more than the file-size
limit, and a ``kill -9`` of the program takes its forkserver, decode processes and resource tracker along."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy.cli import main
from deploy.isolation import crashed, timed_out
from tests.conftest import build_dataset
from tests.processes import grandchildren, group, kill_9_leaves_nothing
from tests.tiny_bundle import build_tiny_bundle
from triage.audit import path_text
from triage.ingest import MAX_FILE_BYTES
from triage.pipeline import sha256_or_empty

REPO = Path(__file__).resolve().parents[1]


def bytes_read() -> int:
    """Bytes this process has read through read(2) and friends (/proc/self/io ``rchar``)."""
    line = next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:"))
    return int(line.split()[1])


def sparse(path: Path, size: int) -> Path:
    """A file of ``size`` zero bytes that takes no disk space."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def test_a_file_over_the_size_limit_is_never_read_to_be_hashed(tmp_path):
    huge = sparse(tmp_path / "huge.dcm", MAX_FILE_BYTES + 1)
    before, start = bytes_read(), time.monotonic()
    assert sha256_or_empty(str(huge)) == ""
    record = timed_out(str(huge), 3.0)  # the main process's record after a decode timeout
    assert record.sha256 == "" and record.meta is None and record.reason == "decode_timeout"
    assert bytes_read() - before < 2**20 and time.monotonic() - start < 1.0


def test_a_file_within_the_limit_is_hashed_and_one_past_it_is_not(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 1000)
    assert sha256_or_empty(str(path), limit_bytes=1000) == hashlib.sha256(b"x" * 1000).hexdigest()
    assert sha256_or_empty(str(path), limit_bytes=999) == ""


def test_a_fifo_is_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(sha256_or_empty(str(fifo))), daemon=True)
    reader.start()
    reader.join(timeout=2)
    assert result == [""], "sha256_or_empty blocked on a FIFO with no writer"



def test_a_file_name_that_is_not_utf8_is_still_hashed_and_named_when_its_decode_fails(tmp_path):
    """The record of a timed-out or crashed decode opened the listed text (``\\xfc``), not the file: no sha256, no study."""
    latin1 = os.fsdecode(os.fsencode(tmp_path) + b"/M\xfcller.dcm")  # Latin-1 from a legacy share: byte 0xfc
    dataset = build_dataset(rows=96, cols=96)
    dataset.save_as(latin1, enforce_file_format=True)
    listed = path_text(latin1)
    for record in (timed_out(listed, 3.0), crashed(listed)):
        assert record.path == listed and record.detail.startswith(f"{listed}: ")
        assert record.sha256 == hashlib.sha256(Path(latin1).read_bytes()).hexdigest()
        assert record.meta is not None and record.meta.study_uid == dataset.StudyInstanceUID

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


def test_an_oversized_file_is_too_large_at_once_never_a_decode_timeout(tmp_path, tiny, capsys):
    """A 16 GiB sparse file was hashed in the worker past the timeout, then again in the main process."""
    folder = tmp_path / "in"
    folder.mkdir()
    sparse(folder / "huge.dcm", 16 * 2**30)
    build_dataset(rows=96, cols=96).save_as(folder / "chest.dcm", enforce_file_format=True)
    out, db = tmp_path / "worklist.csv", tmp_path / "audit.sqlite"
    argv = ["score", str(folder), "--bundle", str(tiny), "--out", str(out), "--audit-db", str(db),
            "--workers", "1", "--decode-timeout", "2", "--device", "cpu"]
    start = time.monotonic()
    assert main(argv) == 0
    seconds = time.monotonic() - start
    with open(out, newline="") as handle:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    assert rows["huge.dcm"]["reason"] == "too_large" and rows["huge.dcm"]["sha256"] == ""
    assert "MiB limit" in rows["huge.dcm"]["detail"] and rows["chest.dcm"]["status"] == "scored"
    assert seconds < 30  # start-up on a busy machine; hashing 16 GiB twice took minutes
    assert main(argv) == 0 and "files: 2 (2 already audited" in capsys.readouterr().out  # a rerun decides it once


def test_a_killed_program_takes_its_forkserver_decode_processes_and_resource_tracker_along():
    """``kill -9`` of a program whose two decode processes hang: within a few seconds nothing it started is left."""
    script = ("from deploy.isolation import Decoder\nfrom tests.processes import hang\n"
              "with Decoder(2, None) as decoder:\n    list(decoder.map(hang, ['a', 'b', 'c']))\n")
    program = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True)
    # the program, its forkserver and resource tracker, two decode processes
    kill_9_leaves_nothing(program, lambda: len(grandchildren(program.pid)) >= 2 and len(group(program.pid)) >= 5)
