"""read_radiograph: every codec, photometric, bit depth and scope rule; every bad input a BadInputError."""

from __future__ import annotations

import hashlib
import io
import os
import importlib.util
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    MPEG2MPML,
    RLELossless,
)

from tests.conftest import SYNTHETIC_PATIENT_ID, SYNTHETIC_PATIENT_NAME, build_dataset, chest_unit, stored_values
from triage.errors import REASONS, BadInputError, OutOfScopeError
from triage.ingest import DECODING_PLUGINS, decode_pixels, decoding_plugins, header_meta, read_radiograph
from triage.pipeline import prepare
from triage.preprocess import PreprocessSpec, preprocess
from triage.radiograph import Radiograph, is_valid_uid

pydicom_data = pytest.importorskip("pydicom.data")


def expect_error(path: Path, reason: str, kind: type[BadInputError] = BadInputError, **kwargs) -> BadInputError:
    """read_radiograph raises ``kind`` with ``reason``; the message names the file, never the patient."""
    with pytest.raises(kind) as caught:
        read_radiograph(path, **kwargs)
    error = caught.value
    assert error.reason == reason and reason in REASONS
    message = str(error)
    assert str(path) in message and error.path == str(path)
    assert error.detail and error.fix and "Fix:" in message
    for secret in (SYNTHETIC_PATIENT_ID, *SYNTHETIC_PATIENT_NAME.split("^")):
        assert secret not in message
    return error


def expected_stored(rows: int = 256, cols: int = 224, bits_stored: int = 12, signed: bool = False,
                    photometric: str = "MONOCHROME2") -> np.ndarray:
    unit = chest_unit(rows, cols)
    return stored_values(1.0 - unit if photometric == "MONOCHROME1" else unit, bits_stored, signed)


# --- codecs, photometric, bit depth ------------------------------------------------------------


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                    DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless],
                         ids=lambda uid: uid.keyword)
def test_lossless_transfer_syntaxes_decode_to_the_stored_values(make_dicom, syntax):
    path = make_dicom(transfer_syntax=syntax)
    radiograph = read_radiograph(path)
    assert isinstance(radiograph, Radiograph)
    np.testing.assert_array_equal(radiograph.pixels, expected_stored())
    assert radiograph.pixels.dtype == np.uint16 and radiograph.pixels.dtype.isnative
    assert radiograph.dataset.file_meta.TransferSyntaxUID == syntax


def test_jpeg_baseline_decodes_close_to_the_original(make_dicom):
    radiograph = read_radiograph(make_dicom(transfer_syntax=JPEGBaseline8Bit, bits_stored=8))
    assert radiograph.pixels.dtype == np.uint8
    difference = np.abs(radiograph.pixels.astype(int) - expected_stored(bits_stored=8).astype(int))
    assert difference.mean() < 1.5


@pytest.mark.parametrize("bits_stored", [8, 12, 16])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_bit_depths_signedness_and_photometrics(make_dicom, bits_stored, signed, photometric):
    radiograph = read_radiograph(make_dicom(bits_stored=bits_stored, signed=signed, photometric=photometric))
    expected = expected_stored(bits_stored=bits_stored, signed=signed, photometric=photometric)
    np.testing.assert_array_equal(radiograph.pixels, expected)
    assert radiograph.pixels.dtype == expected.dtype
    assert radiograph.photometric == photometric


def test_signed_12_bit_values_are_sign_extended_through_rle(make_dicom):
    radiograph = read_radiograph(make_dicom(transfer_syntax=RLELossless, signed=True, bits_stored=12))
    assert radiograph.pixels.min() == -2048 and radiograph.pixels.max() == 2047


def test_radiograph_fields_sha256_meta_and_dataset_without_pixel_data(make_dicom):
    path = make_dicom(rescale=(2.0, -100.0), window=(2048, 4096), voi_lut_function="LINEAR_EXACT", voi_lut=True)
    radiograph = read_radiograph(path)
    assert radiograph.path == str(path)
    assert radiograph.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    ds = radiograph.dataset
    assert "PixelData" not in ds
    assert float(ds.RescaleSlope) == 2.0 and float(ds.WindowCenter) == 2048 and ds.VOILUTFunction == "LINEAR_EXACT"
    assert len(ds.VOILUTSequence) == 1
    meta = radiograph.meta
    assert (meta.study_uid, meta.series_uid, meta.sop_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert meta.patient_id == SYNTHETIC_PATIENT_ID and meta.patient_sex == "F" and meta.patient_age == "045Y"
    assert (meta.modality, meta.body_part, meta.view_position) == ("DX", "CHEST", "PA")
    assert meta.manufacturer == "SYNTHETIC" and meta.study_date == "20240131" and meta.source_format == "dicom"


def test_modality_lut_sequence_is_kept(make_dicom):
    ds = read_radiograph(make_dicom(modality_lut=True)).dataset
    assert len(ds.ModalityLUTSequence) == 1 and "RescaleSlope" not in ds


def test_missing_uids_are_derived_from_the_sha256(make_dicom, tmp_path):
    ds = build_dataset()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        delattr(ds, keyword)
    path = tmp_path / "no-uids.dcm"
    ds.save_as(path, enforce_file_format=True)
    copy = tmp_path / "copy.dcm"
    shutil.copy(path, copy)
    first, second = read_radiograph(path).meta, read_radiograph(copy).meta
    assert first.study_uid == second.study_uid and first.series_uid == second.series_uid
    assert len({first.study_uid, first.series_uid, first.sop_uid}) == 3
    assert pydicom.uid.UID(first.study_uid).is_valid


def test_acr_nema_file_without_preamble_or_file_meta(tmp_path):
    ds = build_dataset(bits_stored=10)
    del ds.file_meta
    path = tmp_path / "acr-nema.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    radiograph = read_radiograph(path)
    np.testing.assert_array_equal(radiograph.pixels, expected_stored(bits_stored=10))


# --- scope ------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality, body_part", [("CR", "CHEST"), ("DX", "CHEST"), ("OT", "CHEST")])
def test_in_scope_modalities(make_dicom, modality, body_part):
    assert read_radiograph(make_dicom(modality=modality, body_part=body_part)).meta.modality == modality


@pytest.mark.parametrize("modality, body_part", [("CT", "CHEST"), ("MR", "CHEST"), ("OT", ""), ("OT", None)])
def test_out_of_scope_modalities(make_dicom, modality, body_part):
    error = expect_error(make_dicom(modality=modality, body_part=body_part), "modality_out_of_scope", OutOfScopeError)
    assert "(0008,0060)" in error.detail and "Modality" in error.detail


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("body_part", ["CHEST", "THORAX", "LUNG", "chest", "", None])
def test_chest_or_unspecified_body_part_is_in_scope(make_dicom, body_part):
    read_radiograph(make_dicom(body_part=body_part))


@pytest.mark.parametrize("body_part", ["HIP", "KNEE", "SKULL", "EXTREMITY", "ABDOMEN"])
def test_other_body_parts_are_out_of_scope(make_dicom, body_part):
    error = expect_error(make_dicom(body_part=body_part), "body_part_out_of_scope", OutOfScopeError)
    assert "(0018,0015)" in error.detail and body_part in error.detail


@pytest.mark.parametrize("descriptions", [
    {"StudyDescription": "MODALITYLUT - TEETH"}, {"SeriesDescription": "L HAND 2 VIEWS"},
    {"ProtocolName": "PELVIS AP"}, {"StudyDescription": "XR SPINE LUMBAR"},
])
def test_empty_body_part_with_non_chest_description_is_out_of_scope(make_dicom, descriptions):
    error = expect_error(make_dicom(body_part="", descriptions=descriptions), "body_part_out_of_scope", OutOfScopeError)
    assert "Body Part Examined (0018,0015) is empty" in error.detail


@pytest.mark.parametrize("descriptions", [{"StudyDescription": "CHEST PA"}, {"SeriesDescription": "view: PA"},
                                          {"StudyDescription": "BILATERAL CHEST"}])
def test_empty_body_part_with_chest_or_neutral_description_is_in_scope(make_dicom, descriptions):
    read_radiograph(make_dicom(body_part="", descriptions=descriptions))


def test_chest_body_part_wins_over_descriptions(make_dicom):
    read_radiograph(make_dicom(body_part="CHEST", descriptions={"StudyDescription": "HIP"}))


@pytest.mark.parametrize("view", ["PA", "AP", "", None])
def test_frontal_or_unspecified_views_are_in_scope(make_dicom, view):
    read_radiograph(make_dicom(view=view))


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "RLD"])
def test_lateral_and_other_views_are_out_of_scope(make_dicom, view):
    error = expect_error(make_dicom(view=view), "view_out_of_scope", OutOfScopeError)
    assert "View Position (0018,5101)" in error.detail and view in error.detail


def test_empty_view_with_lateral_description_is_out_of_scope(make_dicom):
    expect_error(make_dicom(view="", descriptions={"SeriesDescription": "CHEST LAT"}), "view_out_of_scope",
                 OutOfScopeError)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_is_not_monochrome(make_dicom, photometric):
    error = expect_error(make_dicom(photometric=photometric), "not_monochrome", OutOfScopeError)
    assert "(0028,0004)" in error.detail


def test_multi_frame(make_dicom):
    error = expect_error(make_dicom(frames=3, rows=64, cols=64), "multi_frame", OutOfScopeError)
    assert "Number of Frames (0028,0008) is 3" in error.detail


def test_tiny_image_against_the_minimum_size(make_dicom):
    path = make_dicom(rows=48, cols=300)
    error = expect_error(path, "image_too_small", OutOfScopeError)
    assert "48 x 300" in error.detail
    assert read_radiograph(path, min_side_px=32).pixels.shape == (48, 300)
    expect_error(make_dicom(name="big.dcm", rows=256, cols=256), "image_too_small", OutOfScopeError, min_side_px=512)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"DICM? no, just text", b"hello\n" * 100, bytes(range(256)) * 4,
                                     b"%PDF-1.4\n" + bytes(300), b"\x08\x00" + bytes(range(256)) * 2])
def test_not_dicom(tmp_path, content):
    path = tmp_path / "not-dicom.dcm"
    path.write_bytes(content)
    expect_error(path, "not_dicom")


def test_missing_file_is_unreadable(tmp_path):
    expect_error(tmp_path / "missing.dcm", "file_unreadable")


def test_no_pixel_data(tmp_path):
    ds = build_dataset()
    del ds.PixelData
    for keyword in ("Rows", "Columns"):
        delattr(ds, keyword)
    path = tmp_path / "no-pixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    error = expect_error(path, "no_pixel_data")
    assert "(7FE0,0010)" in error.detail


@pytest.mark.parametrize("cut", [1, 1000, 50_000])
def test_truncated_native_pixel_data(make_dicom, cut):
    path = make_dicom()
    path.write_bytes(path.read_bytes()[:-cut])
    error = expect_error(path, "truncated")
    assert "Pixel Data (7FE0,0010)" in error.detail


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless], ids=lambda uid: uid.keyword)
def test_truncated_encapsulated_pixel_data(make_dicom, syntax):
    path = make_dicom(transfer_syntax=syntax)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data) // 4])
    expect_error(path, "truncated")


def test_truncated_header(make_dicom):
    path = make_dicom()
    path.write_bytes(path.read_bytes()[:700])
    expect_error(path, "truncated")


def test_corrupt_codestream_is_decode_failed(make_dicom):
    path = make_dicom(transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:40] + bytes(len(frame) - 40)])  # header kept, codestream zeroed
    ds.save_as(path)
    error = expect_error(path, "decode_failed")
    assert "(0002,0010)" in error.detail and "JPEG 2000" in error.detail


def test_transfer_syntax_without_decoder_is_decode_failed(make_dicom):
    path = make_dicom(transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(path)
    error = expect_error(path, "decode_failed")
    assert "no decoder" in error.detail


@pytest.mark.parametrize("change, tag", [
    ({"BitsStored": 20}, "(0028,0101)"), ({"BitsAllocated": 12}, "(0028,0100)"),
    ({"PixelRepresentation": 2}, "(0028,0103)"), ({"Rows": 0}, "(0028,0010)"), ({"SamplesPerPixel": 3}, "(0028,0002)"),
])
def test_inconsistent_pixel_attributes(tmp_path, change, tag):
    ds = build_dataset()
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    path = tmp_path / "inconsistent.dcm"
    ds.save_as(path, enforce_file_format=True)
    error = expect_error(path, "unsupported_pixel_format")
    assert tag in error.detail


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_damaged_files_raise_only_bad_input_errors(make_dicom, tmp_path):
    """Cuts and byte flips anywhere in small files: never anything but a BadInputError (or a Radiograph)."""
    rng = random.Random(0)
    sources = [make_dicom(name="native.dcm", rows=64, cols=64), make_dicom(name="j2k.dcm", rows=64, cols=64,
                                                                            transfer_syntax=JPEG2000Lossless)]
    path = tmp_path / "damaged.dcm"
    for source in sources:
        data = source.read_bytes()
        for _ in range(40):
            damaged = bytearray(data[: rng.randrange(len(data))] if rng.random() < 0.5 else data)
            for _ in range(3):
                if damaged:
                    damaged[rng.randrange(min(len(damaged), 1200))] = rng.randrange(256)
            path.write_bytes(bytes(damaged))
            try:
                read_radiograph(path, min_side_px=8)
            except BadInputError as error:
                assert error.reason in REASONS and str(path) in str(error)


# --- PNG / JPEG images -------------------------------------------------------------------------


def save_image(path: Path, pixels: np.ndarray, **kwargs) -> Path:
    Image.fromarray(pixels).save(path, **kwargs)
    return path


def test_png_8_bit(tmp_path):
    pixels = stored_values(chest_unit(200, 180), 8, False)
    radiograph = read_radiograph(save_image(tmp_path / "chest.png", pixels))
    np.testing.assert_array_equal(radiograph.pixels, pixels)
    assert radiograph.photometric == "MONOCHROME2" and radiograph.dataset is None
    assert radiograph.meta.source_format == "image" and radiograph.meta.patient_id == ""


def test_png_16_bit_stays_16_bit(tmp_path):
    pixels = stored_values(chest_unit(200, 180), 16, False)
    radiograph = read_radiograph(save_image(tmp_path / "chest16.png", pixels))
    assert radiograph.pixels.dtype == np.uint16
    np.testing.assert_array_equal(radiograph.pixels, pixels)


def test_rgb_jpeg_becomes_grey_uint8(tmp_path):
    grey = stored_values(chest_unit(200, 180), 8, False)
    radiograph = read_radiograph(save_image(tmp_path / "chest.jpg", np.stack([grey] * 3, axis=-1), quality=95))
    assert radiograph.pixels.dtype == np.uint8 and radiograph.pixels.shape == (200, 180)
    assert np.abs(radiograph.pixels.astype(int) - grey).mean() < 1.5


def test_image_uids_are_derived_from_the_content(tmp_path):
    pixels = stored_values(chest_unit(128, 128), 8, False)
    first = read_radiograph(save_image(tmp_path / "a.png", pixels)).meta
    again = read_radiograph(save_image(tmp_path / "b.png", pixels)).meta
    other = read_radiograph(save_image(tmp_path / "c.png", pixels[::-1].copy())).meta
    assert (first.study_uid, first.series_uid, first.sop_uid) == (again.study_uid, again.series_uid, again.sop_uid)
    assert first.study_uid != other.study_uid and len({first.study_uid, first.series_uid, first.sop_uid}) == 3


@pytest.mark.parametrize("name, keep", [("cut.png", 0.5), ("cut.jpg", 0.3), ("header-only.png", 0.0)])
def test_undecodable_images(tmp_path, name, keep):
    buffer = io.BytesIO()
    Image.fromarray(stored_values(chest_unit(128, 128), 8, False)).save(buffer, format="PNG" if name.endswith("png") else "JPEG")
    data = buffer.getvalue()
    path = tmp_path / name
    path.write_bytes(data[: max(int(len(data) * keep), 12)])
    expect_error(path, "unreadable_image")


def test_tiny_png(tmp_path):
    expect_error(save_image(tmp_path / "tiny.png", np.zeros((20, 400), np.uint8)), "image_too_small", OutOfScopeError)


# --- real files ------------------------------------------------------------------------------

CHEST = ["philips-cr-pa-mono1-jpegls-nearlossless.dcm", "philips-cr-pa-mono1-j2k-lossy.dcm",
         "konica-cr-pa-mono1-jpeg-baseline.dcm", "fuji-cr-mono1-no-file-meta.dcm", "siim-cr-mono2-jpeg-baseline.dcm"]
NOT_CHEST = ["fuji-cr-hip-mono2-jpegls-lossless.dcm", "fuji-cr-extremity-mono1-j2k-lossy.dcm",
             "dental-panoramic-mono1-jpeg-lossless-modality-lut.dcm"]
UNDECODABLE = "undecodable/fuji-cr-hip-jpeg-extended-corrupt.dcm"


def test_every_real_chest_file_is_listed(shared_data):
    assert sorted(p.name for p in (shared_data / "dicom" / "chest").glob("*.dcm")) == sorted(CHEST)


@pytest.mark.parametrize("name", CHEST)
def test_real_chest_files_read(shared_data, name):
    path = shared_data / "dicom" / "chest" / name
    radiograph = read_radiograph(path)
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    assert radiograph.pixels.shape == (ds.Rows, ds.Columns)
    assert radiograph.photometric == ds.PhotometricInterpretation and radiograph.meta.modality == "CR"
    assert radiograph.pixels.max() > radiograph.pixels.min()
    assert np.isfinite(preprocess(radiograph, PreprocessSpec())).all()


def test_real_file_without_file_meta_gets_its_transfer_syntax(shared_data):
    radiograph = read_radiograph(shared_data / "dicom" / "chest" / "fuji-cr-mono1-no-file-meta.dcm")
    assert radiograph.dataset.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert radiograph.pixels.max() < 2**10


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the dental file's UIDs are not valid UIDs
@pytest.mark.parametrize("name", NOT_CHEST)
def test_real_non_chest_files_are_out_of_scope(shared_data, name):
    expect_error(shared_data / "dicom" / "out-of-scope" / name, "body_part_out_of_scope", OutOfScopeError)


def test_real_dog_thorax_reads(shared_data):
    """Its tags say chest; recognising a dog is out-of-distribution detection's job, not ingest's."""
    radiograph = read_radiograph(shared_data / "dicom" / "out-of-scope" / "dx-thorax-dog-veterinary.dcm")
    assert radiograph.meta.modality == "DX" and radiograph.pixels.shape == (169, 211)


def as_chest(source: Path, folder: Path, keep_uids: bool = False) -> Path:
    """A copy of a real file whose header says CHEST, with its pixel data byte for byte; unless ``keep_uids``,
    an invalid SOP Instance UID (the dental file's '999.999.01.23.45.6789') is replaced by a valid one."""
    ds = pydicom.dcmread(source)
    ds.BodyPartExamined = "CHEST"
    if not keep_uids and not is_valid_uid(ds.SOPInstanceUID):
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
    for keyword in ("StudyDescription", "SeriesDescription"):
        ds.pop(keyword, None)
    path = folder / f"chest-{source.name}"
    ds.save_as(path)
    return path


def test_real_12_bit_jpeg_extended_decodes_as_dcmtk_does(shared_data, tmp_path):
    """The Fuji hip CR's 12-bit JPEG Extended frame has SOS parameters a sequential JPEG should not carry:
    pylibjpeg-libjpeg (GPL, gone since issue 15) refused it; GDCM's IJG libjpeg, like DCMTK's, decodes it."""
    source = shared_data / "dicom" / UNDECODABLE
    error = expect_error(source, "body_part_out_of_scope", OutOfScopeError)  # decoded, then refused: a hip
    assert error.meta.study_uid and error.meta.body_part == "HIP"
    radiograph = read_radiograph(as_chest(source, tmp_path))
    assert radiograph.dataset.file_meta.TransferSyntaxUID == JPEGExtended12Bit and radiograph.pixels.dtype == np.uint16
    if not shutil.which("dcmdjpeg"):
        pytest.skip("dcmtk's dcmdjpeg is not installed (Debian package dcmtk): decoded, not compared")
    reference = dcmtk_decoded(source, tmp_path)
    np.testing.assert_array_equal(radiograph.pixels, reference)


def dcmtk_decoded(source: Path, folder: Path) -> np.ndarray:
    """The stored values DCMTK's ``dcmdjpeg`` (IJG libjpeg 6b, 8/12/16 bit) decodes from a JPEG DICOM file."""
    out = folder / f"dcmtk-{source.name}"
    subprocess.run(["dcmdjpeg", str(source), str(out)], check=True, capture_output=True, timeout=60)
    return pydicom.dcmread(out).pixel_array


def test_a_12_bit_jpeg_extended_test_file_decodes_as_dcmtk_does(tmp_path):
    """pydicom's JPGExtended.dcm (12-bit, 1024 x 256) through ``triage.jpeg_turbo``."""
    source = Path(pydicom.data.get_testdata_file("JPGExtended.dcm"))
    ds = pydicom.dcmread(source)
    pixels = decode_pixels(ds, str(source))
    assert pixels.shape == (1024, 256) and pixels.dtype == np.uint16 and 0 < pixels.max() < 2**12
    if not shutil.which("dcmdjpeg"):
        pytest.skip("dcmtk's dcmdjpeg is not installed (Debian package dcmtk): decoded, not compared")
    np.testing.assert_array_equal(pixels, dcmtk_decoded(source, tmp_path))


def test_no_gpl_decoder_is_installed_and_each_compressed_syntax_has_a_permissive_plugin():
    """pylibjpeg-libjpeg (GPL-3.0) is gone; every syntax ``DECODING_PLUGINS`` lists has an installed plugin."""
    assert importlib.util.find_spec("libjpeg") is None, "pylibjpeg-libjpeg (GPL-3.0) is installed: pip uninstall it"
    for syntax, plugins in DECODING_PLUGINS.items():
        assert decoding_plugins(syntax), f"no installed plugin of {plugins} for {syntax.name}"
    assert decoding_plugins(JPEGLossless) == ("libjpeg-turbo",) and decoding_plugins(JPEGBaseline8Bit)[0] == "pillow"
    assert importlib.util.find_spec("gdcm") is None, "python-gdcm aborts the process on some frames: not a decoder"


@pytest.mark.parametrize("damage, reason", [("scrambled", "decode_failed"), ("cut", "truncated")])
def test_a_damaged_real_jpeg_is_refused_not_decoded_to_grey(shared_data, tmp_path, damage, reason):
    """The SIIM chest's JPEG baseline, its entropy-coded data scrambled or cut at half: every plugin refuses it
    (pylibjpeg-libjpeg, before issue 15, returned the cut one with its lower half grey)."""
    ds = pydicom.dcmread(shared_data / "dicom" / "chest" / "siim-cr-mono2-jpeg-baseline.dcm")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    start = frame.index(b"\xff\xda") + 64  # SOI..SOS kept: the size check still reads the SOF header
    damaged = {"scrambled": frame[:start] + bytes(b ^ 0x5A for b in frame[start:-2]) + frame[-2:],
               "cut": frame[:len(frame) // 2]}[damage]
    ds.PixelData = encapsulate([damaged])
    path = tmp_path / f"{damage}-jpeg.dcm"
    ds.save_as(path)
    error = expect_error(path, reason)
    assert "JPEG Baseline" in error.detail and "pillow" in error.detail


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG-LL.dcm"])
def test_a_cut_12_bit_or_lossless_jpeg_frame_is_refused_not_filled_with_grey(tmp_path, name):
    """libjpeg-turbo (``triage.jpeg_turbo``) only warns about a codestream that stops early; the plugin refuses a
    frame without its EOI marker, so half an image never reaches the model."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:len(frame) * 2 // 3]])
    path = tmp_path / f"cut-{name}"
    ds.save_as(path)
    with pytest.raises(BadInputError) as caught:
        read_radiograph(path, min_side_px=1, scope=False)
    assert caught.value.reason in ("decode_failed", "truncated") and "EOI" in caught.value.detail


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_out_of_scope_errors_carry_the_study_identity(shared_data):
    error = expect_error(shared_data / "dicom" / "out-of-scope" / NOT_CHEST[0], "body_part_out_of_scope", OutOfScopeError)
    assert error.meta.study_uid and error.meta.modality == "CR"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("name, syntax", [
    ("fuji-cr-hip-mono2-jpegls-lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("dental-panoramic-mono1-jpeg-lossless-modality-lut.dcm", "1.2.840.10008.1.2.4.70"),
])
def test_real_jpeg_ls_and_jpeg_lossless_decode(shared_data, tmp_path, name, syntax):
    radiograph = read_radiograph(as_chest(shared_data / "dicom" / "out-of-scope" / name, tmp_path))
    assert radiograph.dataset.file_meta.TransferSyntaxUID == syntax
    assert radiograph.pixels.dtype == np.uint16 and 0 < radiograph.pixels.max() < 2**10


def test_same_study_through_three_codecs_gives_the_same_model_input(shared_data):
    """Philips chest CR: uncompressed, JPEG 2000 lossless (pydicom-data) and JPEG-LS near-lossless."""
    spec = PreprocessSpec()
    paths = [pydicom_data.get_testdata_file("RG1_UNCR.dcm"), pydicom_data.get_testdata_file("RG1_J2KR.dcm"),
             shared_data / "dicom" / "chest" / "philips-cr-pa-mono1-jpegls-nearlossless.dcm"]
    radiographs = [read_radiograph(path) for path in paths]
    np.testing.assert_array_equal(radiographs[0].pixels, radiographs[1].pixels)
    uncompressed, j2k, jpeg_ls = (preprocess(r, spec) for r in radiographs)
    assert np.abs(uncompressed - j2k).max() == 0
    assert np.abs(uncompressed - jpeg_ls).mean() < 1e-3 and np.abs(uncompressed - jpeg_ls).max() < 1e-2
    lossy = preprocess(read_radiograph(shared_data / "dicom" / "chest" / "philips-cr-pa-mono1-j2k-lossy.dcm"), spec)
    assert np.abs(uncompressed - lossy).mean() < 5e-3  # JPEG 2000 lossy of the same study: still close


# --- resource guards -------------------------------------------------------------------------


def test_header_claiming_a_huge_image_is_refused_before_decoding(make_dicom):
    path = make_dicom(rows=128, cols=128)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 40000, 40000  # 3 GB decoded at 16 bits; the pixel data is only 32 KB
    ds.save_as(path)
    error = expect_error(path, "too_large", OutOfScopeError)
    assert "over the 512 MiB limit" in error.detail and "(0028,0010)" in error.detail


def test_oversized_file_is_refused_before_reading(make_dicom, monkeypatch):
    import triage.ingest

    path = make_dicom(rows=128, cols=128)
    monkeypatch.setattr(triage.ingest, "MAX_FILE_BYTES", 1000)
    assert "over the 0 MiB limit" in expect_error(path, "too_large").detail


# --- UIDs (PS3.5 9.1) ------------------------------------------------------------------------


@pytest.mark.parametrize("value, valid", [
    ("1.2.840.10008.5.1.4.1.1.1", True), ("0", True), ("1.0.2", True), ("1.2.3\x00", True), (" 1.2.3 ", True),
    ("1." + "2" * 62, True), ("1." + "2" * 63, False), ("1.02.3", False), ("999.999.01.23.45.6789", False),
    ("1..2", False), (".1", False), ("1.", False), ("1.2.a", False), ("1.2\n", False), ("", False), (None, False),
    ('=HYPERLINK("http://x")', False), ("1.2\\3.4", False),
])
def test_the_one_uid_rule(value, valid):
    assert is_valid_uid(value) is valid


def test_pydicoms_own_check_accepts_a_trailing_newline_ours_does_not():
    assert pydicom.uid.UID("1.2\n").is_valid and not is_valid_uid("1.2\n")


INVALID_UIDS = [("StudyInstanceUID", "Study Instance UID (0020,000D)", "1.2.03.4"),
                ("SeriesInstanceUID", "Series Instance UID (0020,000E)", '=HYPERLINK("http://x/")'),
                ("SOPInstanceUID", "SOP Instance UID (0008,0018)", "1." + "2" * 70)]


def with_uid(tmp_path: Path, keyword: str, value: str) -> Path:
    """A scorable synthetic chest radiograph whose ``keyword`` UID is ``value``."""
    ds = build_dataset(rows=96, cols=96)
    setattr(ds, keyword, value)
    path = tmp_path / "uid.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("keyword, name, value", INVALID_UIDS, ids=[k for k, _, _ in INVALID_UIDS])
def test_an_invalid_uid_goes_to_a_person_and_never_into_the_record(tmp_path, keyword, name, value):
    path = with_uid(tmp_path, keyword, value)
    error = expect_error(path, "invalid_uid")
    assert f"{name} {value[:80]!r}: not a valid DICOM UID" in error.detail
    kept = {k: str(getattr(pydicom.dcmread(path), k)) for k, _, _ in INVALID_UIDS if k != keyword}
    for meta in (error.meta, header_meta(path, "0" * 64)):  # header_meta: the record after a decode timeout
        uids = {"StudyInstanceUID": meta.study_uid, "SeriesInstanceUID": meta.series_uid, "SOPInstanceUID": meta.sop_uid}
        assert all(is_valid_uid(uid) for uid in uids.values()) and uids[keyword] != value
        assert all(uids[k] == v for k, v in kept.items())  # the valid ones are kept
    prepared = prepare(str(path), PreprocessSpec())  # the batch scorer's path
    assert prepared.reason == "invalid_uid" and prepared.model_input is None and prepared.meta == error.meta


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_real_file_with_an_invalid_sop_instance_uid(shared_data, tmp_path):
    dental = shared_data / "dicom" / "out-of-scope" / "dental-panoramic-mono1-jpeg-lossless-modality-lut.dcm"
    error = expect_error(as_chest(dental, tmp_path, keep_uids=True), "invalid_uid")
    assert "SOP Instance UID (0008,0018) '999.999.01.23.45.6789'" in error.detail
    assert error.meta.sop_uid != "999.999.01.23.45.6789" and is_valid_uid(error.meta.sop_uid)
    out_of_scope = expect_error(dental, "body_part_out_of_scope", OutOfScopeError)  # scope is reported first
    assert is_valid_uid(out_of_scope.meta.sop_uid)


# --- reading an image for a person to view (the dashboard) --------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the dental file's UIDs are not valid UIDs
@pytest.mark.parametrize("name", NOT_CHEST)
def test_scope_false_reads_an_out_of_scope_file_for_viewing(shared_data, name):
    path = shared_data / "dicom" / "out-of-scope" / name
    radiograph = read_radiograph(path, scope=False)
    assert radiograph.pixels.shape == (radiograph.dataset.Rows, radiograph.dataset.Columns)
    assert radiograph.meta.study_uid and radiograph.pixels.max() > radiograph.pixels.min()


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_scope_false_skips_only_the_scope_checks(make_dicom):
    ct = make_dicom("ct.dcm", modality="CT", view="LL")
    expect_error(ct, "modality_out_of_scope", OutOfScopeError)
    assert read_radiograph(ct, scope=False).meta.modality == "CT"  # Modality, View Position: not checked
    colour = make_dicom("rgb.dcm", photometric="RGB")  # cannot be shown as a grey radiograph: still refused
    assert expect_error(colour, "not_monochrome", scope=False).reason == expect_error(colour, "not_monochrome").reason
    cut = make_dicom("cut.dcm", transfer_syntax=JPEG2000Lossless)
    cut.write_bytes(cut.read_bytes()[:-200])
    expect_error(cut, "truncated", scope=False)


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path):
    """``read_radiograph`` (the dashboard's and training's path) opens like the batch scorer: a FIFO with no writer
    is refused as file_unreadable instead of blocking the reader forever."""
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    error = expect_error(fifo, "file_unreadable")
    assert "not a regular file" in error.detail
