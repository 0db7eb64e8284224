"""Fuzz the ingest path with atheris: mutated bytes -> ``read_radiograph`` -> ``preprocess``.

Half the mutations are libFuzzer's byte-level ones, half structural (``custom_mutator``:
parse, change one element's value, VR or presence, a pixel attribute, the transfer
syntax or a LUT, write back). Any exception outside the project's ``TriageError``
family is a crash (libFuzzer saves the input as ``crash-<sha1>``); so is an input that
takes longer than ``-timeout`` seconds. Seeds: ``tests/fuzz/corpus/``. A bounded run::

    PYTHONPATH=. .venv/bin/python tests/fuzz/fuzz_ingest.py -runs=10000 -timeout=10 -seed=1 \
        -artifact_prefix=out/fuzz/ out/fuzz/corpus tests/fuzz/corpus

``scripts/fuzz.sh`` runs a longer campaign. ``check_one(data)`` is the property
itself; ``tests/test_fuzz.py`` replays the saved crashers of ``tests/fuzz/regressions/``.
"""

from __future__ import annotations

import io
import logging
import os
import random
import struct
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["triage", "pydicom"]):
    from pydicom import Dataset, dcmread
    from pydicom.dataelem import DataElement
    from pydicom.errors import BytesLengthException, InvalidDicomError
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                             ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
                             JPEGLSLossless, JPEGLossless, RLELossless)

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


# --- structure-aware mutation: change one DICOM element the way broken exporters do ---------------

PIXEL_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                  "SamplesPerPixel", "NumberOfFrames", "PlanarConfiguration")
TEXT_VALUES = ("", " ", "abc", "-1", "0", "1", "-0", "1e400", "-1e400", "nan", "inf", "4096", "65535", "65536",
               "2147483648", "1\\2\\3", "MONOCHROME1", "MONOCHROME3", "RGB", "PALETTE COLOR", "CHEST", "LATERAL",
               "SIGMOID", "LINEAR_EXACT", "\x00\xff", "010-.0")
INT_VALUES = (0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 24, 31, 32, 33, 63, 64, 65, 255, 256, 4095, 4096, 32767, 32768, 65535)
VRS = ("LO", "DS", "IS", "US", "SS", "UL", "OB", "OW", "UN", "SQ", "CS", "FD")
SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
            RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, JPEG2000)
MUTATOR_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, NotImplementedError,
                  struct.error, zlib.error, EOFError, OSError, InvalidDicomError, BytesLengthException, RecursionError)


def mutate_element(ds: Dataset, rng: random.Random) -> None:
    """One structural change: a pixel attribute, a value, a VR, a deletion, the transfer syntax or a LUT."""
    elements = [e for e in ds.iterall() if e.tag != 0x7FE00010]
    choice = rng.randrange(6)
    if choice == 0:
        setattr(ds, rng.choice(PIXEL_KEYWORDS), rng.choice(INT_VALUES))
    elif choice == 1 and elements:
        element = rng.choice(elements)
        element.value = rng.choice(TEXT_VALUES) if element.VR not in ("US", "SS", "UL", "SL") else rng.choice(INT_VALUES)
    elif choice == 2 and elements:
        element = rng.choice(elements)
        element.VR = rng.choice(VRS)
    elif choice == 3 and elements:
        tag = rng.choice(elements).tag
        if tag in ds:
            del ds[tag]
    elif choice == 4:
        ds.file_meta.TransferSyntaxUID = rng.choice(SYNTAXES)
    else:
        item = Dataset()
        item.add(DataElement(0x00283002, rng.choice(("US", "SS")), [rng.choice(INT_VALUES) for _ in range(rng.randrange(4))]))
        item.add(DataElement(0x00283006, rng.choice(("OW", "US")), bytes(rng.randrange(0, 64))))
        setattr(ds, rng.choice(("ModalityLUTSequence", "VOILUTSequence")), [item])


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Half the time libFuzzer's byte mutations; otherwise parse, change one element, write back."""
    rng = random.Random(seed)
    if rng.random() < 0.5:
        return atheris.Mutate(data, max_size)
    try:
        ds = dcmread(io.BytesIO(data), force=True)
        mutate_element(ds, rng)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=False)
    except MUTATOR_ERRORS:  # a data set too broken to write back: mutate its bytes instead
        return atheris.Mutate(data, max_size)
    return out.getvalue()[:max_size]


def quiet() -> None:
    """pydicom warns and logs on every odd element; a fuzzer makes millions of them."""
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def main() -> None:
    quiet()
    atheris.Setup(sys.argv, check_one, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
