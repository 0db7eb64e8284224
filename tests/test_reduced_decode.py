"""Reduced-resolution decode (triage.decode): same risk as a full decode on real chest files, smaller pixels,
geometry rewritten, and a full decode whenever the reduced path cannot help."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, get_frame

from deploy.paths import default_bundle_dir
from tests.tiny_bundle import build_tiny_bundle
from triage.bundle import load_bundle
from triage.decode import (RISK_TOLERANCE, codec_family, decode_reduced, decode_size, j2k_header,
                           record_reduction, reduction_level)
from triage.errors import BadInputError, BundleError
from triage.inference import load_model
from triage.ingest import read_radiograph
from triage.pipeline import prepare
from triage.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[1]
SHARED_CHEST = ROOT.parent / "shared" / "data" / "dicom" / "chest"
NO_SHARED = f"needs the real chest DICOM files of ../shared/data/dicom/chest ({SHARED_CHEST} is absent)"
J2K_LOSSLESS = get_testdata_file("RG1_J2KR.dcm")  # pydicom-data: Philips chest CR, 1955x1841, 15-bit
J2K_LOSSY = str(ROOT / "samples" / "dicom" / "philips-cr-chest-pa-j2k.dcm")
JPEG_BASELINE = str(ROOT / "tests" / "data" / "reduced" / "philips-cr-pa-jpeg-baseline.dcm")


@pytest.fixture(scope="module")
def model():
    return load_model(load_bundle(default_bundle_dir()), "cpu")


def risk(model, radiograph) -> float:
    column = model.bundle.findings.index(model.bundle.triage_finding)
    return float(model.risks(preprocess(radiograph, model.bundle.preprocessing)[None])[0, column])


def shared(name: str) -> str:
    path = SHARED_CHEST / name
    if not path.is_file():
        pytest.skip(NO_SHARED)
    return str(path)


REDUCIBLE = {
    "j2k-lossless": lambda: J2K_LOSSLESS,
    "j2k-lossy": lambda: J2K_LOSSY,
    "jpeg-baseline-philips": lambda: JPEG_BASELINE,
    "j2k-lossy-shared": lambda: shared("philips-cr-pa-mono1-j2k-lossy.dcm"),
    "jpeg-baseline-konica": lambda: shared("konica-cr-pa-mono1-jpeg-baseline.dcm"),
}
NOT_REDUCIBLE = {  # decoded at full size: JPEG-LS has no reduced decode; 1024 px is under 2 x 896
    "jpegls": lambda: shared("philips-cr-pa-mono1-jpegls-nearlossless.dcm"),
    "jpeg-baseline-small": lambda: shared("siim-cr-mono2-jpeg-baseline.dcm"),
    "native-acr-nema": lambda: shared("fuji-cr-mono1-no-file-meta.dcm"),
    "native-kermany": lambda: str(ROOT / "samples" / "kermany" / "kermany-01.dcm"),
}


@pytest.mark.parametrize("name", sorted(REDUCIBLE))
def test_reduced_decode_takes_the_smallest_level_that_fits(model, name):
    path = REDUCIBLE[name]()
    size = decode_size(model.bundle.preprocessing)
    full = read_radiograph(path)
    reduced = read_radiograph(path, reduce_to=size)
    assert reduced.pixels.shape < full.pixels.shape, "the reduced path was not taken"
    assert all(r >= s for r, s in zip(reduced.pixels.shape, size))
    assert any(-(-r // 2) < s for r, s in zip(reduced.pixels.shape, size)), "not the smallest level that fits"
    assert reduced.pixels.dtype == full.pixels.dtype
    assert (int(reduced.dataset.Rows), int(reduced.dataset.Columns)) == reduced.pixels.shape
    assert reduced.meta == full.meta and reduced.sha256 == full.sha256


def test_the_bundled_model_reduces_at_least_one_codec(model):
    assert model.bundle.reduced_decode, "the default bundle decodes everything at full size"


@pytest.mark.parametrize("name", sorted(REDUCIBLE))
def test_a_codec_is_reduced_only_where_its_risk_stays_within_tolerance(model, name):
    """Where the bundle reduces a codec, the risk of a reduced decode is within 0.01 of a full decode;
    where it does not, its export measured a larger difference."""
    path = REDUCIBLE[name]()
    family = codec_family(dcmread(path, stop_before_pixels=True))
    if family in model.bundle.reduced_decode:
        full, reduced = read_radiograph(path), read_radiograph(path, reduce_to=decode_size(model.bundle.preprocessing))
        assert abs(risk(model, reduced) - risk(model, full)) <= RISK_TOLERANCE
    else:
        assert model.bundle.manifest["decode"]["checked"][family]["max_abs_risk_diff"] > RISK_TOLERANCE


@pytest.mark.parametrize("path", [JPEG_BASELINE, J2K_LOSSY], ids=["jpeg-baseline", "j2k"])
def test_the_pipeline_decodes_as_the_bundle_says(model, path):
    spec = model.bundle.preprocessing
    served = prepare(path, spec, model.bundle.reduced_decode).model_input
    full = prepare(path, spec).model_input
    reduced = preprocess(read_radiograph(path, reduce_to=decode_size(spec)), spec)
    family = codec_family(dcmread(path, stop_before_pixels=True))
    np.testing.assert_array_equal(served, reduced if family in model.bundle.reduced_decode else full)
    assert not np.array_equal(full, reduced)


def test_the_export_enables_only_codecs_within_tolerance():
    from training.decode_check import decode_section

    section = decode_section({"jpeg2000": [("a.dcm", 0.02), ("b.dcm", 0.001)],
                              "jpeg_baseline": [("c.dcm", 0.005), ("d.dcm", 0.0099)]})
    assert section["reduced"] == ["jpeg_baseline"]
    assert section["checked"]["jpeg2000"] == {"files": ["a.dcm", "b.dcm"], "max_abs_risk_diff": 0.02}


def test_a_manifest_naming_an_unknown_codec_is_refused(tmp_path):
    bundle = build_tiny_bundle(tmp_path / "tiny")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["decode"] = {"reduced": ["jpeg_xl"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="decode.reduced"):
        load_bundle(bundle)


@pytest.mark.parametrize("name", sorted(NOT_REDUCIBLE))
def test_other_files_are_decoded_at_full_size(model, name):
    path = NOT_REDUCIBLE[name]()
    full = read_radiograph(path)
    same = read_radiograph(path, reduce_to=decode_size(model.bundle.preprocessing))
    np.testing.assert_array_equal(same.pixels, full.pixels)
    assert (int(same.dataset.Rows), int(same.dataset.Columns)) == full.pixels.shape


def test_an_image_smaller_than_the_target_is_decoded_at_full_size():
    full = read_radiograph(J2K_LOSSLESS, reduce_to=(2000, 2000))
    assert full.pixels.shape == (1955, 1841)


def test_spacing_is_rewritten_for_the_reduced_pixels():
    ds = Dataset()
    ds.Rows, ds.Columns = 2446, 2010
    ds.ImagerPixelSpacing = [0.175, 0.175]
    ds.PixelSpacing = [0.1, 0.2]
    record_reduction(ds, (1223, 1005))
    assert (ds.Rows, ds.Columns) == (1223, 1005)
    assert [float(v) for v in ds.ImagerPixelSpacing] == [0.35, 0.35]
    assert [float(v) for v in ds.PixelSpacing] == [0.2, 0.4]


def test_real_spacing_follows_the_decoded_size():
    path = shared("konica-cr-pa-mono1-jpeg-baseline.dcm")
    full, reduced = read_radiograph(path), read_radiograph(path, reduce_to=(896, 896))
    factor = full.pixels.shape[0] / reduced.pixels.shape[0]
    assert factor == 2
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        if keyword in full.dataset:
            assert [float(v) for v in reduced.dataset[keyword].value] == pytest.approx(
                [float(v) * factor for v in full.dataset[keyword].value])


@pytest.mark.parametrize(("rows", "cols", "target", "levels", "expected"), [
    (1955, 1841, (224, 224), 5, 3),   # 245 x 231
    (1955, 1841, (896, 896), 5, 1),   # 978 x 921
    (1955, 1841, (224, 224), 2, 2),   # no more levels in the codestream
    (1955, 1841, (1000, 1000), 5, 0),
    (448, 448, (224, 224), 5, 1),
])
def test_reduction_level_is_the_smallest_image_still_large_enough(rows, cols, target, levels, expected):
    assert reduction_level(rows, cols, target, levels) == expected


def codestream(path: str) -> tuple[Dataset, bytes]:
    ds = dcmread(path)
    return ds, get_frame(ds.PixelData, 0, number_of_frames=1)


def test_j2k_header_reads_the_real_codestream():
    _, stream = codestream(J2K_LOSSLESS)
    header = j2k_header(stream)
    assert (header["rows"], header["cols"], header["precision"], header["signed"]) == (1955, 1841, 15, 0)
    assert header["levels"] == 5 and header["components"] == 1


def with_coc(stream: bytes) -> bytes:
    """The codestream with a COC marker (same coding style, for component 0) inserted after COD."""
    cod = stream.index(b"\xff\x52")
    length = struct.unpack(">H", stream[cod + 2:cod + 4])[0]
    spcod = stream[cod + 9:cod + 14]  # levels, code-block width/height, style, transform
    coc = b"\xff\x53" + struct.pack(">HBB", 9, 0, 0) + spcod
    return stream[:cod + 2 + length] + coc + stream[cod + 2 + length:]


def test_a_codestream_it_does_not_understand_is_decoded_at_full_size(tmp_path):
    ds, stream = codestream(J2K_LOSSY)
    ds.PixelData = encapsulate([with_coc(stream)])
    path = tmp_path / "coc.dcm"
    ds.save_as(path)
    assert decode_reduced(dcmread(path), (896, 896)) is None
    assert read_radiograph(path, reduce_to=(896, 896)).pixels.shape == (1955, 1841)


def test_multi_frame_or_other_syntaxes_are_left_to_the_full_decoder():
    ds, _ = codestream(J2K_LOSSY)
    ds.NumberOfFrames = 2
    assert decode_reduced(ds, (224, 224)) is None
    native = dcmread(ROOT / "samples" / "kermany" / "kermany-01.dcm")
    assert decode_reduced(native, (8, 8)) is None


@pytest.mark.parametrize(("keyword", "value"), [("PixelRepresentation", 1), ("BitsStored", 12), ("Rows", 1000)])
def test_a_header_that_disagrees_with_the_codestream_is_left_to_the_full_decoder(keyword, value):
    ds, _ = codestream(J2K_LOSSY)
    setattr(ds, keyword, value)
    assert decode_reduced(ds, (224, 224)) is None
    assert int(ds.Rows) == (1000 if keyword == "Rows" else 1955)  # geometry untouched


def test_a_damaged_codestream_gets_the_full_decoders_verdict(tmp_path):
    ds, stream = codestream(J2K_LOSSY)
    tile = stream.index(b"\xff\x93")  # start of the first tile's data
    ds.PixelData = encapsulate([stream[:tile + 64] + b"\x00" * 8 + b"\xff\xd9"])
    path = tmp_path / "damaged.dcm"
    ds.save_as(path)
    with pytest.raises(BadInputError) as full:
        read_radiograph(path)
    with pytest.raises(BadInputError) as reduced:
        read_radiograph(path, reduce_to=(896, 896))
    assert reduced.value.reason == full.value.reason


def test_the_test_jpeg_is_8_bit_baseline():
    ds = dcmread(JPEG_BASELINE, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50" and ds.BitsStored == 8  # see make_jpeg_baseline.py
