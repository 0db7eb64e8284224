"""Rebuild the fuzzing seed corpus ``tests/fuzz/corpus/`` (small real and synthetic inputs, < 2 MB in all).

Run from the repository root: ``.venv/bin/python -m tests.fuzz.make_corpus``. Real files
are the shared chest DICOMs (``../shared/data/dicom``, downscaled, their headers kept)
and pydicom-data's small codec files re-tagged as chest DX so that the fuzzer reaches
the pixel decoders; synthetic ones come from ``tests.conftest``'s builders.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless)

from tests.conftest import build_dataset, chest_unit, encode

CORPUS = Path(__file__).resolve().parent / "corpus"
SHARED_DICOM = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom"
SIDE = 72  # just above the 64 px minimum: small files, fast executions
CODEC_FILES = ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
               "JPGExtended.dcm", "JPEG2000.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm", "SC_rgb_jpeg_gdcm.dcm")


def synthetic() -> dict[str, bytes]:
    """Tiny synthetic chests: every transfer syntax the fixture encodes, LUTs, windows, photometrics."""
    cases = {
        "syn-explicit-le.dcm": (ExplicitVRLittleEndian, {}),
        "syn-implicit-le-mono1.dcm": (ImplicitVRLittleEndian, {"photometric": "MONOCHROME1"}),
        "syn-big-endian-signed.dcm": (ExplicitVRBigEndian, {"signed": True, "rescale": (2.0, -100.0)}),
        "syn-deflated-window.dcm": (DeflatedExplicitVRLittleEndian, {"window": (2048, 4000), "voi_lut_function": "SIGMOID"}),
        "syn-rle-16bit.dcm": (RLELossless, {"bits_stored": 16}),
        "syn-j2k-lossless.dcm": (JPEG2000Lossless, {}),
        "syn-jpeg-baseline.dcm": (JPEGBaseline8Bit, {"bits_stored": 8}),
        "syn-modality-lut-voi-lut.dcm": (ExplicitVRLittleEndian, {"bits_stored": 8, "modality_lut": True, "voi_lut": True}),
        "syn-voi-lut-big-endian.dcm": (ExplicitVRBigEndian, {"bits_stored": 8, "voi_lut": True}),
        "syn-multi-frame.dcm": (ExplicitVRLittleEndian, {"bits_stored": 8, "frames": 2}),
        "syn-rgb.dcm": (ExplicitVRLittleEndian, {"photometric": "RGB"}),
    }
    return {name: to_bytes(encode(build_dataset(rows=SIDE, cols=SIDE, **kwargs), syntax))
            for name, (syntax, kwargs) in cases.items()}


def images() -> dict[str, bytes]:
    """A grey PNG (8 and 16 bit) and a JPEG of the synthetic chest."""
    unit = chest_unit(SIDE, SIDE)
    out = {}
    for name, array, fmt in (("syn-8bit.png", (unit * 255).astype(np.uint8), "PNG"),
                             ("syn-16bit.png", (unit * 65535).astype(np.uint16), "PNG"),
                             ("syn.jpg", (unit * 255).astype(np.uint8), "JPEG")):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt)
        out[name] = buffer.getvalue()
    return out


def as_chest(ds: Dataset) -> Dataset:
    """Re-tag as a frontal chest DX so the scope checks let the fuzzer reach the decoder."""
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    if "NumberOfFrames" in ds:
        del ds.NumberOfFrames
    return ds


def codec_files() -> dict[str, bytes]:
    """pydicom-data's small real codec test files (JPEG-LS, JPEG 2000, RLE, JPEG extended, deflated, big endian)."""
    return {f"pydicom-{name}": to_bytes(as_chest(dcmread(get_testdata_file(name)))) for name in CODEC_FILES}


def downscaled(source: Path, step: int, syntax: str) -> bytes:
    """A real chest file's header with its pixels subsampled by ``step`` and re-encoded with ``syntax``."""
    ds = dcmread(source, force=True)
    pixels = ds.pixel_array[::step, ::step]
    if syntax == JPEGBaseline8Bit and pixels.dtype != np.uint8:
        pixels = (pixels >> (int(ds.BitsStored) - 8)).astype(np.uint8)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = min(int(ds.BitsStored), ds.BitsAllocated)
    ds.HighBit = ds.BitsStored - 1
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in ds:
            delattr(ds, keyword)
    ds["PixelData"].VR = "OW" if ds.BitsAllocated == 16 else "OB"
    ds["PixelData"].is_undefined_length = False
    return to_bytes(encode(ds, syntax))


def real_chests() -> dict[str, bytes]:
    """The shared real chest radiographs, downscaled; the old ACR-NEMA one kept without file meta."""
    if not SHARED_DICOM.is_dir():
        raise SystemExit(f"make_corpus: needs the shared data folder {SHARED_DICOM}. Fix: run beside ../shared/data")
    chest = SHARED_DICOM / "chest"
    out = {
        "real-siim-cr-jpeg-baseline.dcm": downscaled(chest / "siim-cr-mono2-jpeg-baseline.dcm", 12, JPEGBaseline8Bit),
        "real-konica-cr-mono1-rle.dcm": downscaled(chest / "konica-cr-pa-mono1-jpeg-baseline.dcm", 28, RLELossless),
        "real-philips-cr-mono1-j2k.dcm": downscaled(chest / "philips-cr-pa-mono1-j2k-lossy.dcm", 24, JPEG2000Lossless),
        "real-dx-thorax-dog.dcm": downscaled(SHARED_DICOM / "out-of-scope" / "dx-thorax-dog-veterinary.dcm", 4,
                                             ExplicitVRLittleEndian),
    }
    acr = dcmread(chest / "fuji-cr-mono1-no-file-meta.dcm", force=True)
    acr.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    pixels = acr.pixel_array[::5, ::5]
    acr.PixelData, (acr.Rows, acr.Columns) = np.ascontiguousarray(pixels).tobytes(), pixels.shape
    acr.file_meta = type(acr.file_meta)()
    buffer = io.BytesIO()
    acr.save_as(buffer, implicit_vr=True, little_endian=True)  # no preamble, no file meta: as the original
    out["real-fuji-cr-acr-nema.dcm"] = buffer.getvalue()
    return out


def to_bytes(ds: Dataset) -> bytes:
    """The data set as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def main() -> None:
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    CORPUS.mkdir(parents=True)
    files = {**synthetic(), **images(), **codec_files(), **real_chests()}
    for name, data in files.items():
        (CORPUS / name).write_bytes(data)
    total = sum(len(d) for d in files.values())
    print(f"{len(files)} seed files, {total / 1024:.0f} KiB, largest {max(map(len, files.values())) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
