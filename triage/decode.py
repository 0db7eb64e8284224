"""Decode only what the model needs: compressed pixel data at a reduced resolution.

The model sees ``spec.size`` pixels (224 x 224 for the demo bundle); a chest CR holds
about 2000 x 2000. Two codecs can decode straight to a smaller image, for a fraction
of the work:

- JPEG 2000 (Transfer Syntax 1.2.840.10008.1.2.4.90/.91, and HTJ2K .201-.203): a
  resolution level of the wavelet transform (openjpeg's ``reduce``); level ``r`` is the
  low-pass image of ``ceil(rows / 2**r) x ceil(cols / 2**r)``, same value range.
- 8-bit JPEG baseline (1.2.840.10008.1.2.4.50): DCT scaling by 1/2, 1/4 or 1/8 (libjpeg's
  ``scale_denom``, Pillow's ``Image.draft``).

``decode_reduced`` picks the smallest image that is still at least ``at_least`` (rows,
cols) on both sides and returns ``None`` when it cannot help: another transfer syntax
(JPEG-LS, lossless JPEG, RLE, native), more than one frame or sample, signed or over
16-bit J2K data, a codestream whose precision or signedness disagrees with the header, an image already small, a codestream it does not understand, or any
codec error. The caller then decodes at full resolution as before, so every failure is
reported by the one full decoder (``triage.ingest.decode_pixels``).

When it returns pixels it rewrites the data set's geometry to match them: Rows
(0028,0010), Columns (0028,0011) and the spacing attributes (Pixel Spacing (0028,0030),
Imager Pixel Spacing (0018,1164), Nominal Scanned Pixel Spacing (0018,2010)) scaled
by the reduction, so no downstream code measures the reduced image in full-size pixels.
The decoders are Pillow's (openjpeg 2.5 and libjpeg-turbo, both in its wheels).
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Collection

import numpy as np
from PIL import Image, ImageFile
from pydicom import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import (UID, HTJ2K, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, JPEG2000Lossless,
                         JPEGBaseline8Bit)

from .preprocess import PreprocessSpec
from .scope import integer

OVERSAMPLE = 4
"""Decode at least this many times the model's input size. Measured with the demo model on
the Philips chest CR (JPEG 2000, 1955x1841): the level just above 224 px (245x231) moved
the risk by 0.02-0.12, twice that (489x461) by 0.02-0.03, four times (978x921) by < 0.01:
the model reads texture that the wavelet low-pass removes and a resampling filter keeps."""
J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
CODECS = {"jpeg2000": J2K_SYNTAXES, "jpeg_baseline": frozenset({JPEGBaseline8Bit})}
"""The codec families with a reduced decode, by the name a bundle manifest uses (``decode.reduced``)."""
RISK_TOLERANCE = 0.01
"""A bundle enables a family only when its reduced decode moved no checked file's risk by more than this."""
JPEG_SCALES = (8, 4, 2)  # DCT scaling denominators libjpeg offers, largest first
SPACING_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
J2K_SOC, J2K_SIZ, J2K_COD, J2K_COC, J2K_SOT = 0xFF4F, 0xFF51, 0xFF52, 0xFF53, 0xFF90
# Errors a decoder or a malformed codestream raises; any of them means "decode at full size instead".
REDUCED_ERRORS = (OSError, ValueError, SyntaxError, struct.error, IndexError, KeyError, TypeError,
                  AttributeError, Image.DecompressionBombError)


def decode_size(spec: PreprocessSpec) -> tuple[int, int]:
    """The smallest (rows, cols) to decode for a model with this preprocessing: ``OVERSAMPLE`` x its input."""
    return spec.size[0] * OVERSAMPLE, spec.size[1] * OVERSAMPLE


def codec_family(ds: Dataset) -> str | None:
    """The ``CODECS`` family of the data set's transfer syntax, or None when it has no reduced decode."""
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    return next((name for name, syntaxes in CODECS.items() if syntax in syntaxes), None)


def decode_reduced(ds: Dataset, at_least: tuple[int, int], codecs: Collection[str] = tuple(CODECS)) -> np.ndarray | None:
    """Stored values at the smallest reduced resolution >= ``at_least`` (rows, cols), or ``None``.

    ``ds`` is a checked single-frame monochrome data set with Pixel Data (7FE0,0010).
    Only the codec families named in ``codecs`` are reduced (see ``CODECS``).
    On success the geometry tags of ``ds`` are rewritten to the returned shape.
    """
    if codec_family(ds) not in codecs:
        return None
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if (integer(ds, "NumberOfFrames") or 1) != 1 or (integer(ds, "SamplesPerPixel") or 1) != 1:
        return None
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
        if syntax in J2K_SYNTAXES:
            pixels = j2k_reduced(frame, ds, at_least)
        else:
            pixels = jpeg_reduced(frame, ds, at_least)
    except REDUCED_ERRORS:
        return None
    if pixels is None:
        return None
    record_reduction(ds, pixels.shape)
    return pixels


# --- JPEG 2000 -------------------------------------------------------------------------------


def j2k_header(codestream: bytes) -> dict[str, int]:
    """Size, offsets, components, precision, signedness and decomposition levels from SIZ/COD.

    Raises ``ValueError`` for a codestream this module does not reduce (a COC marker that may
    give the component other levels, or a missing SIZ/COD).
    """
    if struct.unpack(">H", codestream[:2])[0] != J2K_SOC:
        raise ValueError("not a JPEG 2000 codestream (no SOC marker)")
    header: dict[str, int] = {}
    offset = 2
    while offset + 4 <= len(codestream):
        marker, length = struct.unpack(">HH", codestream[offset:offset + 4])
        body = codestream[offset + 4:offset + 2 + length]
        if marker == J2K_SIZ:
            _, cols, rows, x0, y0, _, _, _, _, components = struct.unpack(">HIIIIIIIIH", body[:36])
            ssiz = body[36]
            header.update(rows=rows - y0, cols=cols - x0, x0=x0, y0=y0, components=components,
                          precision=(ssiz & 0x7F) + 1, signed=ssiz >> 7)
        elif marker == J2K_COD:
            header["levels"] = body[5]
        elif marker == J2K_COC:
            raise ValueError("a COC marker: per-component coding style")
        elif marker == J2K_SOT:
            break
        offset += 2 + length
    if not {"rows", "levels"} <= set(header):
        raise ValueError("no SIZ or COD marker before the first tile")
    return header


def reduction_level(rows: int, cols: int, at_least: tuple[int, int], max_level: int) -> int:
    """Largest r <= max_level with ceil(rows / 2**r) >= at_least[0] and ceil(cols / 2**r) >= at_least[1]."""
    level = 0
    while level < max_level and all(math.ceil(n / 2 ** (level + 1)) >= m for n, m in zip((rows, cols), at_least)):
        level += 1
    return level


def j2k_reduced(codestream: bytes, ds: Dataset, at_least: tuple[int, int]) -> np.ndarray | None:
    """Decode a J2K codestream at its reduction level for ``at_least``; None when that level is 0."""
    header = j2k_header(codestream)
    if (header["components"] != 1 or header["signed"] or header["precision"] > 16 or header["x0"] or header["y0"]
            or (header["rows"], header["cols"]) != (int(ds.Rows), int(ds.Columns))
            or header["precision"] != integer(ds, "BitsStored") or integer(ds, "PixelRepresentation") != 0):
        return None  # what pydicom would make of a mismatch is left to pydicom
    level = reduction_level(header["rows"], header["cols"], at_least, header["levels"])
    if level == 0:
        return None
    with Image.open(io.BytesIO(codestream), formats=["JPEG2000"]) as image:
        decoded = load_j2k_level(image, level)
    bits = 8 if decoded.dtype == np.uint8 else 16  # Pillow scales each sample to the full bits of its mode
    shift = bits - header["precision"]
    return decoded >> shift if shift > 0 else decoded


def load_j2k_level(image: Image.Image, level: int) -> np.ndarray:
    """Decode resolution level ``level`` of an opened JPEG 2000 image.

    Pillow's ``reduce`` property rounds the reduced size (``(n + 2**(r-1)) // 2**r``) where
    openjpeg takes the ceiling, and then refuses the data for most sizes; so the tile is set
    here to openjpeg's size with the same decoder arguments Pillow uses.
    """
    power = 1 << level
    size = (math.ceil(image.width / power), math.ceil(image.height / power))
    tile = image.tile[0]
    codec, _, layers, fd, length = tile.args
    image._size = size
    image.tile = [ImageFile._Tile(tile.codec_name, (0, 0, *size), tile.offset, (codec, level, layers, fd, length))]
    ImageFile.ImageFile.load(image)
    pixels = np.asarray(image)
    if pixels.shape != (size[1], size[0]):
        raise ValueError(f"decoded {pixels.shape}, expected {(size[1], size[0])}")
    return pixels


# --- JPEG baseline ---------------------------------------------------------------------------


def jpeg_reduced(stream: bytes, ds: Dataset, at_least: tuple[int, int]) -> np.ndarray | None:
    """Decode an 8-bit greyscale baseline JPEG with DCT scaling; None when no scale fits ``at_least``."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    scale = next((s for s in JPEG_SCALES if math.ceil(rows / s) >= at_least[0] and math.ceil(cols / s) >= at_least[1]), 1)
    if scale == 1 or integer(ds, "BitsStored") != 8:
        return None
    with Image.open(io.BytesIO(stream), formats=["JPEG"]) as image:
        if image.mode != "L" or image.size != (cols, rows):
            return None
        image.draft("L", (cols // scale, rows // scale))  # Pillow picks the largest scale s with size // request >= s
        image.load()
        pixels = np.asarray(image, dtype=np.uint8)
    if pixels.shape != (math.ceil(rows / scale), math.ceil(cols / scale)):
        raise ValueError(f"DCT scaling 1/{scale} gave {pixels.shape}")
    return pixels


# --- geometry --------------------------------------------------------------------------------


def record_reduction(ds: Dataset, shape: tuple[int, ...]) -> None:
    """Rows/Columns to the decoded shape; spacing attributes (row, column spacing in mm) scaled alike."""
    row_factor, col_factor = int(ds.Rows) / shape[0], int(ds.Columns) / shape[1]
    for keyword in SPACING_KEYWORDS:
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            ds[keyword].value = [round(float(value[0]) * row_factor, 6), round(float(value[1]) * col_factor, 6)]
    ds.Rows, ds.Columns = shape[0], shape[1]
