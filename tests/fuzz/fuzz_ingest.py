"""Fuzz the ingest path with atheris: mutated bytes -> ``read_radiograph`` -> ``preprocess``.

Any exception outside the project's ``TriageError`` family is a crash (libFuzzer saves
the input as ``crash-<sha1>``); so is an input that takes longer than ``-timeout``
seconds. Seeds: ``tests/fuzz/corpus/``. Bounded run as the CI test does it::

    .venv/bin/python tests/fuzz/fuzz_ingest.py -runs=20000 -timeout=10 -seed=1 \
        -artifact_prefix=out/fuzz/ out/fuzz/corpus tests/fuzz/corpus

``scripts/fuzz.sh`` runs a longer campaign. ``check_one(data)`` is the property
itself, for regression tests of saved crashers.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["triage", "pydicom"]):
    from triage.errors import TriageError
    from triage.ingest import read_radiograph
    from triage.preprocess import PreprocessSpec, preprocess

SPEC = PreprocessSpec(size=(32, 32))  # small: the fuzzer is after the decode path, not resizing speed
_INPUT = Path(tempfile.mkdtemp(prefix="cxr-fuzz-")) / "input.dcm"


def check_one(data: bytes, path: Path = _INPUT) -> None:
    """Write ``data`` to a file and ingest it the way the batch scorer does; raise only on a bug.

    Bad input must end as a ``TriageError`` (``BadInputError`` with a reason); anything
    else propagates. A success must give a finite (1, 32, 32) float32 model input.
    """
    path.write_bytes(data)
    try:
        model_input = preprocess(read_radiograph(path), SPEC)
    except TriageError:
        return
    if model_input.shape != (1, 32, 32) or str(model_input.dtype) != "float32":
        raise AssertionError(f"model input {model_input.shape} {model_input.dtype}, expected (1, 32, 32) float32")


def quiet() -> None:
    """pydicom warns and logs on every odd element; a fuzzer makes millions of them."""
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def main() -> None:
    quiet()
    atheris.Setup(sys.argv, check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
