"""Shared fixtures. Grouped by owner; add new groups below their own heading."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import set_pixel_data
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    generate_uid,
)

# --- Ingest / preprocessing: synthetic DICOMs and the shared real data -------------------------

SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
             "CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4", "OT": "1.2.840.10008.5.1.4.1.1.7"}
SYNTHETIC_PATIENT_NAME = "Doe^Jane^Synthetic"
SYNTHETIC_PATIENT_ID = "PID-SECRET-0042"


def chest_unit(rows: int, cols: int) -> np.ndarray:
    """A smooth synthetic 'chest': (rows, cols) float64 in [0, 1], bright = dense.

    Dark lung fields with rib stripes, a bright mediastinum and spine, a diaphragm
    dome and soft tissue at the edges; the top-to-bottom gradient makes resizing
    and windowing measurable.
    """
    y, x = np.mgrid[0:rows, 0:cols]
    v, u = y / max(rows - 1, 1), x / max(cols - 1, 1)
    body = 0.55 + 0.15 * v
    lungs = np.zeros_like(u)
    for cx in (0.3, 0.7):
        lungs = np.maximum(lungs, np.clip(1 - ((u - cx) / 0.17) ** 2 - ((v - 0.45) / 0.32) ** 2, 0, 1))
    ribs = 0.08 * (0.5 + 0.5 * np.sin(2 * np.pi * 9 * (v + 0.15 * np.abs(u - 0.5))))
    mediastinum = 0.25 * np.exp(-(((u - 0.5) / 0.07) ** 2))
    diaphragm = 0.2 * (v > 0.78 - 0.1 * np.cos(np.pi * (u - 0.5) * 2) ** 2)
    unit = body - 0.45 * lungs + ribs * (lungs > 0) + mediastinum + diaphragm
    return np.clip((unit - unit.min()) / (unit.max() - unit.min()), 0.0, 1.0)


def stored_values(unit: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """[0, 1] -> the full stored range of ``bits_stored`` bits, uint8/16 or int8/16."""
    values = np.round(unit * (2**bits_stored - 1)).astype(np.int64)
    if signed:
        values -= 2 ** (bits_stored - 1)
    dtype = {(False, 8): np.uint8, (False, 16): np.uint16, (True, 8): np.int8, (True, 16): np.int16}
    return values.astype(dtype[(signed, 8 if bits_stored <= 8 else 16)])


def lut_item(first_mapped: int, lut: np.ndarray, bits: int) -> Dataset:
    """One Modality/VOI LUT Sequence item with (0028,3002) LUT Descriptor and (0028,3006) LUT Data."""
    item = Dataset()
    item.add_new(0x00283002, "SS" if first_mapped < 0 else "US", [len(lut) % 65536, first_mapped, bits])
    item.add_new(0x00283006, "OW", np.asarray(lut, dtype="<u2").tobytes())
    return item


def build_dataset(
    *,
    rows: int = 256,
    cols: int = 224,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    modality: str = "DX",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    frames: int = 1,
    rescale: tuple[float, float] | None = None,
    modality_lut: bool = False,
    window: tuple[float, float] | None = None,
    voi_lut_function: str | None = None,
    voi_lut: bool = False,
    patient_name: str = SYNTHETIC_PATIENT_NAME,
    patient_id: str = SYNTHETIC_PATIENT_ID,
    descriptions: dict[str, str] | None = None,
    unit: np.ndarray | None = None,
) -> Dataset:
    """A valid uncompressed (Explicit VR Little Endian) radiograph data set; see ``make_dicom``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = SOP_CLASS.get(modality, SOP_CLASS["OT"])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientSex, ds.PatientAge, ds.StudyDate = "F", "045Y", "20240131"
    ds.Modality, ds.Manufacturer = modality, "SYNTHETIC"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    for keyword, value in (descriptions or {}).items():
        setattr(ds, keyword, value)

    unit = chest_unit(rows, cols) if unit is None else unit
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit  # same anatomy: after MONOCHROME1 inversion it looks like the MONOCHROME2 one
    if photometric in ("RGB", "YBR_FULL"):
        grey = stored_values(unit, 8, False)
        arr, bits_stored = np.stack([grey, grey // 2, 255 - grey], axis=-1), 8
    else:
        arr = stored_values(unit, bits_stored, signed)
    if frames > 1:
        arr = np.stack([arr] * frames)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    set_pixel_data(ds, arr, photometric, bits_stored)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

    low = -(2 ** (bits_stored - 1)) if signed else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if modality_lut:  # a square-root curve onto 12 bits, over the stored range
        count = 2**bits_stored
        ds.ModalityLUTSequence = [lut_item(low, np.round(np.sqrt(np.arange(count) / (count - 1)) * 4095), 16)]
        ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut_function is not None:
        ds.VOILUTFunction = voi_lut_function
    if voi_lut:  # a gamma curve from the full modality range onto 8 bits
        count = 4096 if modality_lut else 2**bits_stored
        first = 0 if modality_lut else low
        ds.VOILUTSequence = [lut_item(first, np.round((np.arange(count) / (count - 1)) ** 0.5 * 255), 8)]
    return ds


def encode(ds: Dataset, transfer_syntax: str) -> Dataset:
    """Re-encode ``ds`` (built uncompressed) with the given transfer syntax, in place."""
    syntax = UID(transfer_syntax)
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax == ExplicitVRBigEndian:
        arr = np.frombuffer(ds.PixelData, dtype=f"<{'u' if ds.PixelRepresentation == 0 else 'i'}{ds.BitsAllocated // 8}")
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
        for keyword in ("ModalityLUTSequence", "VOILUTSequence"):  # OW LUT Data is written as given
            for item in ds.get(keyword, []):
                item.LUTData = np.frombuffer(item.LUTData, dtype="<u2").astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    elif syntax == JPEG2000Lossless:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    elif syntax == JPEGBaseline8Bit:
        encode_jpeg_baseline(ds)
    else:
        raise ValueError(f"make_dicom: transfer_syntax {syntax.name!r} is not one the fixture can encode")
    return ds


def encode_jpeg_baseline(ds: Dataset) -> None:
    """Pillow-encode the (8-bit, single-frame, grey) pixels as JPEG baseline and encapsulate them."""
    if ds.BitsAllocated != 8 or ds.SamplesPerPixel != 1 or ds.PixelRepresentation != 0:
        raise ValueError("make_dicom: JPEG baseline needs bits_stored=8, unsigned, monochrome")
    arr = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(int(ds.Rows), int(ds.Columns))
    buffer = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buffer, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit


@pytest.fixture
def make_dicom(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_dicom(name="image.dcm", transfer_syntax=ExplicitVRLittleEndian, **build_dataset kwargs)``.

    Writes a synthetic chest radiograph (see ``chest_unit``) and returns its path.
    ``transfer_syntax``: explicit/implicit VR little endian, explicit VR big endian,
    deflated, RLE (pydicom's encoder), JPEG 2000 lossless (pylibjpeg-openjpeg) or JPEG
    baseline (Pillow, needs ``bits_stored=8``). Other keywords: rows, cols, photometric
    (MONOCHROME1/2, RGB), bits_stored (8, 12, 16), signed, modality, body_part, view
    (None omits the tag), frames, rescale=(slope, intercept), modality_lut,
    window=(center, width), voi_lut_function, voi_lut, patient_name, patient_id,
    descriptions={keyword: text}, unit (an explicit [0, 1] image).
    """
    def make(name: str = "image.dcm", transfer_syntax: str = ExplicitVRLittleEndian, **kwargs) -> Path:
        ds = encode(build_dataset(**kwargs), transfer_syntax)
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        return path

    return make


@pytest.fixture
def shared_data() -> Path:
    """The shared real data folder (../shared/data beside the repository); skips when absent."""
    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not folder.is_dir():
        pytest.skip(f"needs the real data folder ../shared/data ({folder}), absent in this checkout")
    return folder
