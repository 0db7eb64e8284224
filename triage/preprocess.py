"""Pixels to model input: the one implementation, used by serving and by training.

Every setting comes from the bundle's ``preprocessing`` spec (``PreprocessSpec``);
nothing is re-declared elsewhere. Steps, in order:

1. Modality LUT (0028,3000) or Rescale Slope/Intercept (0028,1053)/(0028,1052).
2. VOI: the first VOI LUT Sequence (0028,3010) item, else the first Window Center /
   Width (0028,1050)/(0028,1051) pair with VOI LUT Function (0028,1056); without
   either, a percentile window. Output in [0, 1].
3. MONOCHROME1 inversion, so that bone is bright for every input.
4. Resize to the spec's size (aspect squashed, antialiased), then standardize.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut

from .errors import BundleError
from .radiograph import Radiograph

VOI_MODES = ("dicom_window_else_percentile", "percentile")
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


def percentile_unit(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Stretch the [low, high] percentiles of the image onto [0, 1]."""
    low, high = np.percentile(values, window)
    if high <= low:
        return np.zeros_like(values, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def unit_image(radiograph: Radiograph, spec: PreprocessSpec) -> np.ndarray:
    """Steps 1-3: a (rows, cols) float32 image in [0, 1], bright = dense (bone)."""
    ds = radiograph.dataset
    values = modality_values(radiograph.pixels, ds)
    if ds is None:  # PNG/JPEG: already a display image
        bits = 16 if radiograph.pixels.dtype == np.uint16 else 8
        unit = values / float(2**bits - 1)
    elif spec.voi == "dicom_window_else_percentile" and "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        unit = voi_lut_unit(values, ds.VOILUTSequence[0], little_endian=ds.original_encoding[1] is not False)
    elif spec.voi == "dicom_window_else_percentile" and has_value(ds, "WindowCenter") and has_value(ds, "WindowWidth"):
        unit = window_unit(values, _first(ds.WindowCenter), _first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR")))
    else:
        unit = percentile_unit(values, spec.percentile_window)
    if radiograph.photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32)


def resize_unit(unit: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Step 4a: (rows, cols) float32 -> spec.size float32, antialiased, aspect squashed."""
    height, width = spec.size
    if unit.shape == (height, width):
        return unit.astype(np.float32, copy=False)
    image = Image.fromarray(unit.astype(np.float32), mode="F")
    return np.asarray(image.resize((width, height), RESAMPLE[spec.resample]), dtype=np.float32)


def standardize(resized: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Step 4b: (H, W) in [0, 1] -> (channels, H, W) float32, (x - mean) / std."""
    x = (np.clip(resized, 0.0, 1.0) - spec.mean) / spec.std
    return np.repeat(x[None].astype(np.float32), spec.channels, axis=0)


def preprocess(radiograph: Radiograph, spec: PreprocessSpec) -> np.ndarray:
    """A decoded radiograph -> model input of shape (channels, H, W), float32."""
    return standardize(resize_unit(unit_image(radiograph, spec), spec), spec)
