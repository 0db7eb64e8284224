"""triage.preprocess: DICOM LUT/window semantics, MONOCHROME1, percentile fallback, output format, spec."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset

from tests.conftest import chest_unit
from triage.errors import BundleError
from triage.ingest import read_radiograph
from triage.preprocess import (
    BLOCK_PIXELS,
    RESAMPLE,
    PreprocessSpec,
    modality_percentiles,
    modality_values,
    preprocess,
    resize_rows,
    resize_unit,
    standardize,
    stretch_unit,
    unit_image,
    voi_lut_unit,
    window_unit,
)
from triage.radiograph import ImageMeta, Radiograph

SPEC = PreprocessSpec()


def linear_reference(x: float, c: float, w: float) -> float:
    """PS3.3 C.11.2.1.2.1 'LINEAR', output range [0, 1], written as the standard states it."""
    if x <= c - 0.5 - (w - 1) / 2:
        return 0.0
    if x > c - 0.5 + (w - 1) / 2:
        return 1.0
    return (x - (c - 0.5)) / (w - 1) + 0.5


def linear_exact_reference(x: float, c: float, w: float) -> float:
    """PS3.3 C.11.2.1.3.2 'LINEAR_EXACT', output range [0, 1]."""
    if x <= c - w / 2:
        return 0.0
    if x > c + w / 2:
        return 1.0
    return (x - c) / w + 0.5


def image_radiograph(pixels: np.ndarray, photometric: str = "MONOCHROME2", dataset=None) -> Radiograph:
    return Radiograph("mem.png", "0" * 64, pixels, photometric, ImageMeta("1.2.3", "1.2.3.4", "1.2.3.4.5"), dataset)


def percentile_reference(pixels: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """The percentile window computed on a float64 copy of the whole image."""
    values = pixels.astype(np.float64)
    return stretch_unit(values, *np.percentile(values, window))


# --- window_unit against DICOM PS3.3 C.11.2.1.2 ---------------------------------------------------


@pytest.mark.parametrize("center, width", [(40, 400), (2048, 4096), (15000, 30000), (100.5, 2), (10, 1), (127.5, 256)])
def test_linear_window_matches_the_standard(center, width):
    x = np.linspace(center - width, center + width, 1001)
    x = np.concatenate([x, [center - 0.5, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2]])
    expected = [linear_reference(v, center, width) for v in x]
    np.testing.assert_allclose(window_unit(x, center, width), expected, atol=1e-12)
    np.testing.assert_allclose(window_unit(x, center, width, "LINEAR"), expected, atol=1e-12)


def test_linear_window_known_values():
    x = np.array([-160.0, -159.0, 39.5, 239.0, 240.0])
    np.testing.assert_allclose(window_unit(x, 40, 400), [0.0, 1 / 399, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("center, width", [(40, 400), (100, 50), (0.5, 0.25)])
def test_linear_exact_window_matches_the_standard(center, width):
    x = np.linspace(center - width, center + width, 1001)
    expected = [linear_exact_reference(v, center, width) for v in x]
    np.testing.assert_allclose(window_unit(x, center, width, "LINEAR_EXACT"), expected, atol=1e-12)
    np.testing.assert_allclose(window_unit(np.array([center]), center, width, "LINEAR_EXACT"), [0.5])


def test_sigmoid_window_matches_the_standard():
    """PS3.3 C.11.2.1.3.1: y = 1 / (1 + exp(-4 (x - c) / w))."""
    center, width = 100.0, 50.0
    x = np.array([center - width / 2, center, center + width / 2, center + 10 * width])
    expected = [1 / (1 + math.exp(2)), 0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-40))]
    np.testing.assert_allclose(window_unit(x, center, width, "SIGMOID"), expected, rtol=1e-12)
    np.testing.assert_allclose(window_unit(x, center, width, "sigmoid"), expected, rtol=1e-12)


def test_degenerate_widths_threshold_without_nan():
    with np.errstate(all="raise"):
        linear = window_unit(np.array([98.0, 99.5, 99.6, 101.0]), 100, 1)
        exact = window_unit(np.array([99.0, 100.0, 100.1]), 100, 0, "LINEAR_EXACT")
    np.testing.assert_array_equal(linear, [0, 0, 1, 1])
    np.testing.assert_array_equal(exact, [0, 0, 1])


# --- modality LUT, VOI LUT, window from the dataset ----------------------------------------------


def test_rescale_slope_and_intercept(make_dicom):
    radiograph = read_radiograph(make_dicom(rescale=(2.0, -100.0)))
    values = modality_values(radiograph.pixels, radiograph.dataset)
    np.testing.assert_array_equal(values, radiograph.pixels * 2.0 - 100.0)


def test_synthetic_modality_lut_sequence(make_dicom):
    radiograph = read_radiograph(make_dicom(modality_lut=True, bits_stored=12))
    values = modality_values(radiograph.pixels, radiograph.dataset)
    expected = np.round(np.sqrt(radiograph.pixels / 4095.0) * 4095)
    np.testing.assert_array_equal(values, expected)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the dental file's UIDs are not valid UIDs
def test_real_modality_lut_sequence(shared_data, tmp_path):
    """The dental panoramic's Modality LUT Sequence (0028,3000), applied entry by entry."""
    source = shared_data / "dicom" / "out-of-scope" / "dental-panoramic-mono1-jpeg-lossless-modality-lut.dcm"
    ds = pydicom.dcmread(source)
    ds.BodyPartExamined, ds.StudyDescription, ds.SeriesDescription = "CHEST", "", ""  # to get past the scope check
    ds.SOPInstanceUID = pydicom.uid.generate_uid()  # its '999.999.01.23.45.6789' is not a valid UID
    ds.save_as(tmp_path / "dental.dcm")
    radiograph = read_radiograph(tmp_path / "dental.dcm")
    item = radiograph.dataset.ModalityLUTSequence[0]
    count, first, _ = item.LUTDescriptor
    lut = np.frombuffer(item.LUTData, "<u2") if isinstance(item.LUTData, bytes) else np.asarray(item.LUTData)
    expected = lut[np.clip(radiograph.pixels.astype(int) - first, 0, (count or 65536) - 1)]
    values = modality_values(radiograph.pixels, radiograph.dataset)
    np.testing.assert_array_equal(values, expected)
    assert not np.array_equal(values, radiograph.pixels)  # the LUT is not the identity


@pytest.mark.parametrize("modality_lut", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_voi_lut_sequence_wins_over_the_window(make_dicom, modality_lut, signed):
    """The fixture's VOI LUT is a square-root curve onto 8 bits over the modality output range."""
    radiograph = read_radiograph(make_dicom(voi_lut=True, modality_lut=modality_lut, signed=signed, window=(10, 20)))
    values = modality_values(radiograph.pixels, radiograph.dataset)
    first, count = (-2048 if signed and not modality_lut else 0), 4096
    expected = np.round(((values - first) / (count - 1)) ** 0.5 * 255) / 255
    np.testing.assert_allclose(unit_image(radiograph, SPEC), expected, atol=1e-6)


def test_dataset_window_with_voi_lut_function(make_dicom):
    radiograph = read_radiograph(make_dicom(window=(1000, 2000), voi_lut_function="SIGMOID"))
    expected = window_unit(radiograph.pixels.astype(float), 1000, 2000, "SIGMOID")
    np.testing.assert_allclose(unit_image(radiograph, SPEC), expected, atol=1e-6)


def test_first_of_several_windows_is_used(make_dicom):
    path = make_dicom()
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = [1000, 3000], [500, 100]
    ds.save_as(path)
    radiograph = read_radiograph(path)
    np.testing.assert_allclose(unit_image(radiograph, SPEC), window_unit(radiograph.pixels.astype(float), 1000, 500),
                               atol=1e-6)


def test_percentile_fallback_without_a_window(make_dicom):
    radiograph = read_radiograph(make_dicom())
    assert "WindowCenter" not in radiograph.dataset and "VOILUTSequence" not in radiograph.dataset
    unit = unit_image(radiograph, SPEC)
    np.testing.assert_allclose(unit, percentile_reference(radiograph.pixels, SPEC.percentile_window), atol=1e-6)
    assert unit.min() == 0.0 and unit.max() == 1.0
    assert 0.004 < (unit == 0).mean() < 0.02 and 0.004 < (unit == 1).mean() < 0.02  # about 0.5 % clipped each side


def test_percentile_mode_ignores_the_dicom_window(make_dicom):
    radiograph = read_radiograph(make_dicom(window=(10, 20)))
    spec = PreprocessSpec(voi="percentile")
    np.testing.assert_allclose(unit_image(radiograph, spec),
                               percentile_reference(radiograph.pixels, spec.percentile_window), atol=1e-6)


def test_constant_image_percentile_is_zero_not_nan():
    assert not unit_image(image_radiograph(np.full((80, 80), 7, np.uint16), dataset=Dataset()), SPEC).any()


# --- MONOCHROME1 --------------------------------------------------------------------------------


def test_monochrome1_is_inverted():
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 251
    mono2 = unit_image(image_radiograph(pixels.astype(np.uint8)), SPEC)
    mono1 = unit_image(image_radiograph(pixels.astype(np.uint8), "MONOCHROME1"), SPEC)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-7)


@pytest.mark.parametrize("window", [None, (2048, 4096)])
def test_monochrome1_and_monochrome2_of_the_same_anatomy_agree(make_dicom, window):
    """The fixture stores MONOCHROME1 images inverted, so after preprocessing both look alike (bone bright)."""
    mono2 = read_radiograph(make_dicom(name="m2.dcm", window=window))
    mono1_window = None if window is None else (4095 - window[0], window[1])
    mono1 = read_radiograph(make_dicom(name="m1.dcm", photometric="MONOCHROME1", window=mono1_window))
    assert np.abs(preprocess(mono1, SPEC) - preprocess(mono2, SPEC)).max() < 0.02
    center, side = unit_image(mono2, SPEC)[128, 112], unit_image(mono2, SPEC)[128, 40]
    assert center > side  # mediastinum brighter than lung


# --- images, output format ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535)])
def test_png_pixels_scale_by_bit_depth(dtype, top):
    pixels = np.array([[0, top // 2], [top, top]], dtype=dtype).repeat(8, 0).repeat(8, 1)
    unit = unit_image(image_radiograph(pixels), SPEC)
    np.testing.assert_allclose(unit[0, :8], 0.0)
    np.testing.assert_allclose(unit[-1], 1.0)


@pytest.mark.parametrize("size, channels", [((224, 224), 1), ((256, 192), 3), ((32, 48), 1)])
def test_output_shape_dtype_and_standardization(make_dicom, size, channels):
    spec = PreprocessSpec(size=size, channels=channels)
    x = preprocess(read_radiograph(make_dicom(window=(2048, 4096))), spec)
    assert x.shape == (channels, *size) and x.dtype == np.float32 and np.isfinite(x).all()
    unit = x * spec.std + spec.mean
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    for channel in x[1:]:
        np.testing.assert_array_equal(channel, x[0])


@pytest.mark.parametrize("resample", ["bilinear", "box", "bicubic"])
def test_resize_keeps_the_picture(resample):
    unit = chest_unit(512, 448).astype(np.float32)
    spec = PreprocessSpec(size=(128, 112), resample=resample)
    small = resize_unit(unit, spec)
    assert small.shape == (128, 112) and small.dtype == np.float32
    assert abs(float(small.mean()) - float(unit.mean())) < 0.01
    blocks = unit.reshape(128, 4, 112, 4).mean(axis=(1, 3))
    assert np.abs(small - blocks).mean() < 0.005 and np.abs(small - blocks).max() < 0.2


def test_resize_is_identity_at_the_target_size():
    unit = chest_unit(224, 224).astype(np.float32)
    assert resize_unit(unit, SPEC) is unit or np.array_equal(resize_unit(unit, SPEC), unit)


def test_standardize_clips_and_repeats():
    x = standardize(np.array([[-1.0, 0.5, 2.0]], dtype=np.float32), PreprocessSpec(mean=0.5, std=0.25, channels=3))
    assert x.shape == (3, 1, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], [-2.0, 0.0, 2.0])


# --- the spec ----------------------------------------------------------------------------------


@pytest.mark.parametrize("change, key", [
    ({"size": (4, 4)}, "size="), ({"size": (224,)}, "size="), ({"resample": "nearest"}, "resample="),
    ({"voi": "window"}, "voi="), ({"percentile_window": (60.0, 40.0)}, "percentile_window="),
    ({"std": 0.0}, "std="), ({"channels": 2}, "channels="), ({"aspect": "pad"}, "aspect="),
])
def test_spec_validation_names_the_bad_key(change, key):
    with pytest.raises(BundleError, match="PreprocessSpec") as caught:
        PreprocessSpec(**change)
    assert key in str(caught.value) and isinstance(caught.value, ValueError)


def test_spec_reports_every_problem_at_once():
    with pytest.raises(BundleError) as caught:
        PreprocessSpec(std=-1.0, channels=4)
    assert "std=" in str(caught.value) and "channels=" in str(caught.value)


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(BundleError, match="interpolation"):
        PreprocessSpec.from_dict({**SPEC.to_dict(), "interpolation": "bilinear"})


def test_to_dict_from_dict_round_trip_through_json():
    spec = PreprocessSpec(size=(256, 192), resample="box", voi="percentile", percentile_window=(1.0, 99.0),
                          mean=0.5, std=0.25, channels=3)
    stored = json.loads(json.dumps(spec.to_dict()))
    assert stored["size"] == [256, 192] and stored["percentile_window"] == [1.0, 99.0]
    assert PreprocessSpec.from_dict(stored) == spec
    assert PreprocessSpec.from_dict({}) == PreprocessSpec()
    assert replace(spec, size=(224, 224)).to_dict()["size"] == [224, 224]


# --- row blocks: the numbers of the whole-image computation, without its float copies -----------


def whole_image_reference(radiograph: Radiograph, spec: PreprocessSpec) -> np.ndarray:
    """Steps 1-4 as they ran before row blocks: float64 on the whole image, one Pillow resize."""
    ds = radiograph.dataset
    values = modality_values(radiograph.pixels, ds)
    if "VOILUTSequence" in ds:
        unit = voi_lut_unit(values, ds.VOILUTSequence[0])
    elif "WindowCenter" in ds:
        unit = window_unit(values, float(ds.WindowCenter), float(ds.WindowWidth))
    else:
        unit = stretch_unit(values, *np.percentile(values, spec.percentile_window))
    if radiograph.photometric == "MONOCHROME1":
        unit = 1.0 - unit
    resized = Image.fromarray(unit.astype(np.float32)).resize(spec.size[::-1], RESAMPLE[spec.resample])
    return standardize(np.asarray(resized, dtype=np.float32), spec)


@pytest.mark.parametrize("kwargs", [
    {}, {"window": (2048, 4096)}, {"modality_lut": True}, {"voi_lut": True, "signed": True},
    {"photometric": "MONOCHROME1", "rescale": (-1.5, 4000.0)}, {"bits_stored": 16, "signed": True, "rescale": (0.5, -3.0)},
], ids=["percentile", "window", "modality-lut", "voi-lut-signed", "mono1-negative-slope", "signed-16-bit"])
def test_preprocessing_in_row_blocks_equals_the_whole_image_computation(make_dicom, kwargs):
    radiograph = read_radiograph(make_dicom(rows=1100, cols=1000, **kwargs))
    assert radiograph.pixels.size > BLOCK_PIXELS  # two blocks, the second one partial
    np.testing.assert_array_equal(preprocess(radiograph, SPEC), whole_image_reference(radiograph, SPEC))


def test_a_real_chest_model_input_is_unchanged_by_row_blocks(shared_data):
    """Philips CR, JPEG-LS, 1955 x 1841 15-bit, MONOCHROME1 with a window: four blocks; max abs difference 0."""
    radiograph = read_radiograph(shared_data / "dicom" / "chest" / "philips-cr-pa-mono1-jpegls-nearlossless.dcm")
    blocked, whole = preprocess(radiograph, SPEC), whole_image_reference(radiograph, SPEC)
    assert np.abs(blocked - whole).max() == 0.0


@pytest.mark.parametrize("resample", sorted(RESAMPLE))
@pytest.mark.parametrize("shape, size", [((1100, 900), (224, 224)), ((97, 300), (224, 160)), ((500, 224), (224, 224)),
                                         ((224, 500), (224, 224)), ((64, 64), (224, 224))])
def test_resizing_row_blocks_equals_one_resize_of_the_whole_image(resample, shape, size):
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    blocks = np.array_split(image, [1, 2, shape[0] // 2, shape[0] - 3])  # uneven, with one-row blocks
    whole = np.asarray(Image.fromarray(image).resize(size[::-1], RESAMPLE[resample]), dtype=np.float32)
    np.testing.assert_array_equal(resize_rows(blocks, shape[0], PreprocessSpec(size=size, resample=resample)), whole)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.uint32])
@pytest.mark.parametrize("rescale", [None, (0.37, -1024.5), (-2.0, 10.0)])
def test_percentiles_from_value_counts_equal_numpys(dtype, rescale):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(1)
    pixels = rng.integers(info.min, min(info.max, 2**24), (300, 257), endpoint=True, dtype=dtype)
    pixels[:100] = pixels[0, 0]  # many ties
    ds = Dataset()
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    for window in [(0.5, 99.5), (0.0, 100.0), (25.0, 75.0), (1.234, 98.7)]:
        assert modality_percentiles(pixels, ds, window) == tuple(np.percentile(modality_values(pixels, ds), window))
