"""Preprocessing cache: decode and run ``triage.preprocess``'s deterministic steps once per resolution.

One uint8 memory-mapped array per (image list, preprocessing spec, size):
``<cache_dir>/<key>.u8`` holds (N, H, W) uint8, ``<key>.json`` its sidecar (shape,
spec, the image list's hash). ``key`` hashes every image's path and identity (md5
when known, else size and mtime) with the spec, so a changed file list or spec gets a
new cache and an old one is never read by mistake. The sidecar is written last: a
cache without it is incomplete and is rebuilt.

What is stored is steps 1-4a of ``triage.preprocess`` (window, invert, resize; a
[0, 1] image) quantized as ``round(255 * unit)``. The model input is
``input_lut(spec)[u8]``: the 256 values ``standardize(k / 255)`` computed with
``triage.preprocess.standardize`` itself. For 8-bit PNG/JPEG images already at the
cached size (the shared Kermany data at 224 px) the unit image is exactly ``k / 255``
and the cached input equals the serving input bit for bit. Otherwise (a resize, or a
DICOM window) the unit image is off by at most 0.5/255 before standardization, so the
model input is off by at most ``QUANTIZATION_BOUND / spec.std`` (0.0087 for std 0.226).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from triage.ingest import read_radiograph
from triage.preprocess import PreprocessSpec, resize_unit, standardize, unit_image

QUANTIZATION_BOUND = 0.5 / 255  # max |unit - u8 / 255| of a cached image
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CachedImages:
    """A built cache: ``images`` (N, H, W) uint8 memmap (read-only) and the spec it was built with."""

    images: np.ndarray
    spec: PreprocessSpec
    path: Path

    def __len__(self) -> int:
        return len(self.images)

    def inputs(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Model inputs (n, channels, H, W) float32 of ``rows``: ``input_lut[u8]``."""
        return to_inputs(self.images[np.asarray(rows)], self.spec)


def resolution_spec(spec: PreprocessSpec, size: int | tuple[int, int] | None) -> PreprocessSpec:
    """``spec`` at another square size (progressive resizing); ``None`` keeps the serving size."""
    if size is None:
        return spec
    return replace(spec, size=(size, size) if isinstance(size, int) else tuple(size))


def input_lut(spec: PreprocessSpec) -> np.ndarray:
    """(256,) float32: ``standardize`` of each representable unit value ``k / 255``, as serving computes it."""
    unit = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
    return standardize(unit[None, :], spec)[0, 0]


def to_inputs(u8: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(n, H, W) uint8 cached images -> (n, channels, H, W) float32 model inputs."""
    x = input_lut(spec)[u8]
    return np.repeat(x[:, None], spec.channels, axis=1)


def quantize_unit(unit: np.ndarray) -> np.ndarray:
    """A [0, 1] float image -> uint8 ``round(255 * clip(unit))`` (what ``standardize`` clips to)."""
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def unit_resized(path: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """Steps 1-4a of ``triage.preprocess`` for one file: (H, W) float32 in [0, 1] (unclipped resize output)."""
    return resize_unit(unit_image(read_radiograph(path), spec), spec)


def file_identity(path: str, md5: str | None) -> str:
    """What identifies an image's content in the key: its md5, else size and mtime."""
    if md5:
        return md5
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def cache_key(paths: Sequence[str], md5s: Sequence[str | None], spec: PreprocessSpec) -> str:
    """sha256 (24 hex digits) of the image list (paths + identities), the spec and the format version."""
    digest = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "spec": spec.to_dict()}, sort_keys=True).encode())
    for path, md5 in zip(paths, md5s, strict=True):
        digest.update(f"{os.path.abspath(path)}\0{file_identity(path, md5)}\n".encode())
    return digest.hexdigest()[:24]


def open_cache(base: Path, spec: PreprocessSpec) -> CachedImages | None:
    """The complete cache at ``base`` (``.u8`` + ``.json``), or None when absent, incomplete or inconsistent."""
    sidecar, array = base.with_suffix(".json"), base.with_suffix(".u8")
    if not (sidecar.is_file() and array.is_file()):
        return None
    meta = json.loads(sidecar.read_text())
    shape = tuple(meta.get("shape", ()))
    if meta.get("spec") != spec.to_dict() or len(shape) != 3 or array.stat().st_size != int(np.prod(shape)):
        return None
    return CachedImages(np.memmap(array, dtype=np.uint8, mode="r", shape=shape), spec, array)


def build_cache(paths: Sequence[str], md5s: Sequence[str | None], spec: PreprocessSpec, cache_dir: str | Path,
                log: Callable[[str], None] = print) -> CachedImages:
    """Open the cache of these images at ``spec``, building it first when absent (decode each image once)."""
    key = cache_key(paths, md5s, spec)
    base = Path(cache_dir) / key
    found = open_cache(base, spec)
    if found is not None:
        return found
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    height, width = spec.size
    shape = (len(paths), height, width)
    partial = base.with_suffix(f".u8.{os.getpid()}.partial")
    start, max_error = time.perf_counter(), 0.0
    if not paths:
        raise ValueError(f"{cache_dir}: no images to cache. Fix: check the dataset folder and its label file")
    out = np.memmap(partial, dtype=np.uint8, mode="w+", shape=shape)
    for i, path in enumerate(paths):
        unit = np.clip(unit_resized(path, spec), 0.0, 1.0)
        out[i] = quantize_unit(unit)
        max_error = max(max_error, float(np.abs(out[i] / np.float32(255) - unit).max()))
    out.flush()
    del out
    os.replace(partial, base.with_suffix(".u8"))
    seconds = time.perf_counter() - start
    meta = {"format_version": FORMAT_VERSION, "shape": list(shape), "dtype": "uint8", "spec": spec.to_dict(),
            "n_images": len(paths), "max_unit_error": max_error, "build_seconds": round(seconds, 1),
            "stores": "round(255 * clip(unit image after window, inversion and resize)); input = input_lut(spec)[u8]"}
    base.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"cache {base.name}: {len(paths)} images at {height}x{width} px in {seconds:.0f} s "
        f"(max quantization error {max_error * 255:.3f}/255)")
    found = open_cache(base, spec)
    if found is None:
        raise OSError(f"{base}.u8: the cache just written does not read back. Fix: delete {base}.* and check disk space")
    return found
