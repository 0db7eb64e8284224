"""Pixels to model input: the one implementation, used by serving and by training.

Every setting comes from the bundle's ``preprocessing`` spec (``PreprocessSpec``);
nothing is re-declared elsewhere. Steps, in order:

1. Modality LUT (0028,3000) or Rescale Slope/Intercept (0028,1053)/(0028,1052).
2. VOI: the first VOI LUT Sequence (0028,3010) item, else the first Window Center /
   Width (0028,1050)/(0028,1051) pair with VOI LUT Function (0028,1056); without
   either, a percentile window. Output in [0, 1].
3. MONOCHROME1 inversion, so that bone is bright for every input.
4. Resize to the spec's size (aspect squashed, antialiased), then standardize.

Memory: steps 1-4a run on blocks of about ``BLOCK_PIXELS`` rows' pixels, and the percentile
window comes from a histogram of the stored values, so besides the decoded pixels
``preprocess`` holds a few 8 MiB float64 temporaries and a (rows, W) float32 array, never a
float copy of the whole image (which was 4-14 times the decoded bytes). The numbers are
those of the whole-image computation (tests/test_preprocess.py checks equality).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut

from .errors import BundleError
from .radiograph import Radiograph

VOI_MODES = ("dicom_window_else_percentile", "percentile")
BLOCK_PIXELS = 2**20
"""Pixels per row block of steps 1-4a: each float64 temporary of a block is 8 MiB."""
MAX_COUNTED_SPAN = 2**20
"""Widest range of stored values counted in a histogram for the percentile window."""
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class PreprocessSpec:
    """Settings of every deterministic step; stored in the bundle manifest."""

    size: tuple[int, int] = (224, 224)
    resample: str = "bilinear"
    voi: str = "dicom_window_else_percentile"
    percentile_window: tuple[float, float] = (0.5, 99.5)
    mean: float = 0.449
    std: float = 0.226
    channels: int = 1
    version: int = 1
    aspect: str = field(default="squash")

    def __post_init__(self) -> None:
        problems = []
        if len(self.size) != 2 or min(self.size) < 8:
            problems.append(f"size={self.size!r} must be two integers >= 8")
        if self.resample not in RESAMPLE:
            problems.append(f"resample={self.resample!r} must be one of {sorted(RESAMPLE)}")
        if self.voi not in VOI_MODES:
            problems.append(f"voi={self.voi!r} must be one of {VOI_MODES}")
        low, high = self.percentile_window
        if not 0 <= low < high <= 100:
            problems.append(f"percentile_window={self.percentile_window!r} must satisfy 0 <= low < high <= 100")
        if self.std <= 0:
            problems.append(f"std={self.std!r} must be > 0")
        if self.channels not in (1, 3):
            problems.append(f"channels={self.channels!r} must be 1 or 3")
        if self.aspect != "squash":
            problems.append(f"aspect={self.aspect!r}: only 'squash' is implemented")
        if problems:
            raise BundleError("PreprocessSpec: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> "PreprocessSpec":
        """Build from a manifest's ``preprocessing`` object; unknown keys are an error."""
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise BundleError(f"PreprocessSpec: unknown keys {sorted(unknown)} in the manifest's preprocessing")
        values = dict(spec)
        for key in ("size", "percentile_window"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def modality_values(pixels: np.ndarray, dataset: Dataset | None) -> np.ndarray:
    """Stored values -> modality values (float64), via the Modality LUT or rescale."""
    if dataset is None:
        return pixels.astype(np.float64)
    return np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float64)


def has_value(ds: Dataset, keyword: str) -> bool:
    """The attribute is present with a value (an empty one, e.g. a zero-length Window Center, counts as absent)."""
    value = ds.get(keyword)
    return value is not None and value != ""


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DICOM number."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, str)):
        return float(value[0])
    return float(value)


def window_unit(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing mapped onto [0, 1] instead of the output bit range."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:  # invalid (Window Width shall be > 0): the limit, a threshold at the center
            return (values > center).astype(np.float64)
        return np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0)
    if width <= 1:  # the standard's width-1 case (and invalid smaller widths): a threshold, no 0/0
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def voi_lut_unit(values: np.ndarray, item: Dataset, little_endian: bool = True) -> np.ndarray:
    """Apply one VOI LUT Sequence item (0028,3010) and scale its output to [0, 1].

    ``little_endian``: byte order of an OW LUT Data (0028,3006), that of the file's transfer syntax.
    """
    count, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    count = count or 65536
    if isinstance(item.LUTData, bytes):
        lut = np.frombuffer(item.LUTData, dtype="<u2" if little_endian else ">u2")
    else:
        lut = np.atleast_1d(np.asarray(item.LUTData))
    lut = lut[:count].astype(np.float64)
    index = np.clip(np.round(values - first_mapped), 0, count - 1).astype(np.int64)
    return lut[index] / float(2**bits - 1)


def stretch_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Stretch [low, high] onto [0, 1] (all zeros when high <= low)."""
    if high <= low:
        return np.zeros_like(values, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def row_blocks(rows: int, cols: int) -> Iterator[slice]:
    """Slices of consecutive rows holding about ``BLOCK_PIXELS`` pixels each."""
    step = max(1, BLOCK_PIXELS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def value_counts(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of an integer image (ascending, in its dtype) and how often each occurs.

    Counted in row blocks with ``np.bincount`` when the values span at most ``MAX_COUNTED_SPAN``
    (every image up to 20 bits stored); wider (32-bit) data is sorted whole by ``np.unique``.
    """
    low, high = int(pixels.min()), int(pixels.max())
    if not np.issubdtype(pixels.dtype, np.integer) or high - low >= MAX_COUNTED_SPAN:
        return np.unique(pixels, return_counts=True)
    counts = np.zeros(high - low + 1, dtype=np.int64)
    for rows in row_blocks(*pixels.shape):
        counts += np.bincount((pixels[rows].astype(np.int64) - low).ravel(), minlength=len(counts))
    present = np.flatnonzero(counts)
    return (present + low).astype(pixels.dtype), counts[present]


def modality_percentiles(pixels: np.ndarray, dataset: Dataset, window: tuple[float, float]) -> tuple[float, float]:
    """``np.percentile(modality_values(pixels, dataset), window)`` (its 'linear' method, same arithmetic),
    from the distinct stored values and their counts: no float64 copy of the image."""
    stored, counts = value_counts(pixels)
    mapped = modality_values(stored, dataset)
    order = np.argsort(mapped, kind="stable")
    mapped, cumulative = mapped[order], np.cumsum(counts[order])
    position = (int(cumulative[-1]) - 1) * (np.asarray(window, dtype=np.float64) / 100)
    below = np.floor(position)
    gamma = position - below
    rank = below.astype(np.int64)
    a = mapped[np.searchsorted(cumulative, rank, side="right")]
    b = mapped[np.searchsorted(cumulative, np.minimum(rank + 1, int(cumulative[-1]) - 1), side="right")]
    low, high = np.where(gamma >= 0.5, b - (b - a) * (1 - gamma), a + (b - a) * gamma)  # numpy's _lerp
    return float(low), float(high)


def unit_transform(radiograph: Radiograph, spec: PreprocessSpec) -> Callable[[np.ndarray], np.ndarray]:
    """Steps 1-3 as a function from a block of stored values to float64 unit values (bright = dense).

    What depends on the whole image (the percentile window) is measured here, once.
    """
    ds = radiograph.dataset
    if ds is None:  # PNG/JPEG: already a display image
        top = float(2 ** (16 if radiograph.pixels.dtype == np.uint16 else 8) - 1)

        def voi(block: np.ndarray) -> np.ndarray:
            return modality_values(block, None) / top
    elif spec.voi == "dicom_window_else_percentile" and "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item, little_endian = ds.VOILUTSequence[0], ds.original_encoding[1] is not False

        def voi(block: np.ndarray) -> np.ndarray:
            return voi_lut_unit(modality_values(block, ds), item, little_endian)
    elif spec.voi == "dicom_window_else_percentile" and has_value(ds, "WindowCenter") and has_value(ds, "WindowWidth"):
        center, width, function = _first(ds.WindowCenter), _first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR"))

        def voi(block: np.ndarray) -> np.ndarray:
            return window_unit(modality_values(block, ds), center, width, function)
    else:
        low, high = modality_percentiles(radiograph.pixels, ds, spec.percentile_window)

        def voi(block: np.ndarray) -> np.ndarray:
            return stretch_unit(modality_values(block, ds), low, high)
    if radiograph.photometric == "MONOCHROME1":
        return lambda block: 1.0 - voi(block)
    return voi


def unit_rows(radiograph: Radiograph, spec: PreprocessSpec) -> Iterator[np.ndarray]:
    """Steps 1-3 in row blocks: (block rows, cols) float32 in [0, 1], top to bottom."""
    transform = unit_transform(radiograph, spec)
    for rows in row_blocks(*radiograph.pixels.shape):
        yield transform(radiograph.pixels[rows]).astype(np.float32)


def unit_image(radiograph: Radiograph, spec: PreprocessSpec) -> np.ndarray:
    """Steps 1-3: a (rows, cols) float32 image in [0, 1], bright = dense (bone)."""
    unit = np.empty(radiograph.pixels.shape, dtype=np.float32)
    start = 0
    for block in unit_rows(radiograph, spec):
        unit[start:start + len(block)] = block
        start += len(block)
    return unit


def resampled(image: np.ndarray, width: int, height: int, resample: str) -> np.ndarray:
    """One Pillow resize of a (rows, cols) float32 array to (height, width)."""
    if image.shape == (height, width):
        return image.astype(np.float32, copy=False)
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize((width, height), RESAMPLE[resample])
    return np.asarray(resized, dtype=np.float32)


def resize_rows(blocks: Iterable[np.ndarray], rows: int, spec: PreprocessSpec) -> np.ndarray:
    """Step 4a on an image given as float32 row blocks: (rows, cols) -> spec.size float32, antialiased.

    Pillow resamples a float image across first, then down, each pass with float32 output;
    doing the first pass block by block gives the same numbers while holding only
    (rows, W) floats instead of a float copy of the whole image.
    """
    height, width = spec.size
    across = np.empty((rows, width), dtype=np.float32)
    start = 0
    for block in blocks:
        across[start:start + len(block)] = resampled(block, width, len(block), spec.resample)
        start += len(block)
    return resampled(across, width, height, spec.resample)


def resize_unit(unit: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Step 4a: (rows, cols) float32 -> spec.size float32, antialiased, aspect squashed."""
    return resize_rows((unit[rows] for rows in row_blocks(*unit.shape)), unit.shape[0], spec)


def standardize(resized: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Step 4b: (H, W) in [0, 1] -> (channels, H, W) float32, (x - mean) / std."""
    x = (np.clip(resized, 0.0, 1.0) - spec.mean) / spec.std
    return np.repeat(x[None].astype(np.float32), spec.channels, axis=0)


def preprocess(radiograph: Radiograph, spec: PreprocessSpec) -> np.ndarray:
    """A decoded radiograph -> model input of shape (channels, H, W), float32.

    Steps 1-4a run in row blocks (``unit_rows``, ``resize_rows``), so besides the decoded
    pixels this holds about ``BLOCK_PIXELS`` x 8 bytes per temporary and (rows, W) floats,
    never a float copy of the whole image.
    """
    return standardize(resize_rows(unit_rows(radiograph, spec), radiograph.pixels.shape[0], spec), spec)
