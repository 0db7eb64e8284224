"""Decode in processes of their own, so a crashing codec (or the OOM killer) costs one file, not the program."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from triage.pipeline import Prepared, sha256_or_empty


def decoder_pool(workers: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A pool of decode processes started from a clean forkserver (no inherited ONNX Runtime threads)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                               initializer=initializer, initargs=initargs)


def crashed(path: str) -> Prepared:
    """The record of a file whose decoding process died twice: human review, never dropped."""
    detail = (f"{path}: decode_failed: the decoding process died while reading this file (twice). "
              "Fix: re-export the study from PACS uncompressed, and report the file to the maintainers")
    return Prepared(path, sha256_or_empty(path), reason="decode_failed", detail=detail)


def run_alone(task: Callable[..., Any], path: str, *args: Any, initializer: Callable[..., None] | None = None,
              initargs: tuple = ()) -> Any:
    """``task(path, *args)`` in a process of its own; ``crashed(path)`` if that process dies too."""
    with decoder_pool(1, initializer, initargs) as pool:
        try:
            return pool.submit(task, path, *args).result()
        except BrokenProcessPool:
            return crashed(path)
