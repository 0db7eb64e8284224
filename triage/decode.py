"""Decode only what the model needs: compressed pixel data at a reduced resolution.

The model sees ``spec.size`` pixels (224 x 224 for the demo bundle); a chest CR holds
about 2000 x 2000. Two codecs can decode straight to a smaller image, for a fraction
of the work:

- JPEG 2000 (Transfer Syntax 1.2.840.10008.1.2.4.90/.91, and HTJ2K .201-.203): a
  resolution level of the wavelet transform (openjpeg's ``reduce``); level ``r`` is the
  low-pass image of ``ceil(rows / 2**r) x ceil(cols / 2**r)``, same value range.
- 8-bit JPEG baseline (1.2.840.10008.1.2.4.50): DCT scaling by 1/2, 1/4 or 1/8 (libjpeg-turbo's
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
The decoders are Pillow's (openjpeg 2.5 and libjpeg-turbo, both in its wheels); Pillow is also the
first full decoder of 8-bit JPEG (``triage.ingest.DECODING_PLUGINS``), so the two paths share libjpeg-turbo.

The JPEG 2000 header readers here (``j2k_codestream``, ``j2k_siz``) also serve the size check
of ``triage.ingest.check_codestream_size``: a frame may be a raw codestream or, though PS3.5
A.4.4 forbids it, a JP2 file whose boxes (ISO/IEC 15444-1 Annex I) are walked to its 'jp2c'.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Collection, Iterator

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
J2K_SIZ, J2K_COD, J2K_COC, J2K_SOT = 0xFF51, 0xFF52, 0xFF53, 0xFF90
J2K_SOC_BYTES = b"\xff\x4f"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # the JP2 Signature box (ISO/IEC 15444-1 I.5.1)
MAX_JP2_BOXES = 64  # a JP2 file has about 5 top-level boxes; more is a crafted file
MAX_J2K_SEGMENTS = 4096  # main-header marker segments (a few per component at most in real files)
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


def jp2_boxes(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, content start, content end) of each top-level box of a JP2 file (ISO/IEC 15444-1 I.4).

    A box is LBox (4 bytes) and TBox (4 bytes), then XLBox (8 bytes) when LBox is 1;
    LBox 0 means the box runs to the end of the file. Raises ``ValueError`` for a length
    that does not fit the data, and after ``MAX_JP2_BOXES`` boxes.
    """
    offset = 0
    for _ in range(MAX_JP2_BOXES):
        if len(data) - offset < 8:  # the end, or the byte that pads a DICOM fragment to an even length
            return
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        start = offset + 8
        if length == 1:
            if start + 8 > len(data):
                raise ValueError(f"a JP2 box XLBox at byte {start} runs past the end of the data")
            length, start = struct.unpack(">Q", data[start:start + 8])[0], start + 8
        end = len(data) if length == 0 else offset + length
        if end < start or end > len(data):
            raise ValueError(f"the JP2 box {kind!r} at byte {offset} declares {length} bytes; {len(data) - offset} remain")
        yield kind, start, end
        offset = end
    raise ValueError(f"more than {MAX_JP2_BOXES} JP2 boxes")


def j2k_codestream(frame: bytes) -> bytes:
    """The JPEG 2000 codestream of a frame: the frame itself (SOC first), or the content of the first
    Contiguous Codestream box ('jp2c') of a JP2 file (ISO/IEC 15444-1 I.5.4).

    Raises ``ValueError`` when the frame is neither.
    """
    if frame.startswith(JP2_SIGNATURE):
        box = next(((start, end) for kind, start, end in jp2_boxes(frame) if kind == b"jp2c"), None)
        if box is None:
            raise ValueError("a JP2 file without a Contiguous Codestream box ('jp2c')")
        return frame[box[0]:box[1]]
    if frame[:2] != J2K_SOC_BYTES:
        raise ValueError("neither a JPEG 2000 codestream (SOC marker FF4F) nor a JP2 file (signature box)")
    return frame


def j2k_marker_segments(codestream: bytes) -> Iterator[tuple[int, bytes]]:
    """(marker, segment body) of the main header, SOC to the first tile (SOT) (ISO/IEC 15444-1 A.4).

    Raises ``ValueError`` without SOC, for a segment that runs past the data, and after
    ``MAX_J2K_SEGMENTS`` segments.
    """
    if codestream[:2] != J2K_SOC_BYTES:
        raise ValueError("not a JPEG 2000 codestream (no SOC marker)")
    offset = 2
    for _ in range(MAX_J2K_SEGMENTS):
        if offset + 4 > len(codestream):
            return
        marker, length = struct.unpack(">HH", codestream[offset:offset + 4])
        if marker == J2K_SOT:
            return
        if length < 2 or offset + 2 + length > len(codestream):
            raise ValueError(f"the marker segment {marker:04X} at byte {offset} declares {length} bytes; "
                             f"{len(codestream) - offset - 2} remain")
        yield marker, codestream[offset + 4:offset + 2 + length]
        offset += 2 + length
    raise ValueError(f"more than {MAX_J2K_SEGMENTS} marker segments in the main header")


def j2k_siz(codestream: bytes) -> dict[str, int]:
    """Size, offsets, components, precision and signedness from SIZ (ISO/IEC 15444-1 A.5.1).

    Marker segments are walked from SOC up to SIZ only (the standard puts it first), so a
    later damaged segment is left to the decoder. Raises ``ValueError`` when there is no SIZ.
    """
    for marker, body in j2k_marker_segments(codestream):
        if marker == J2K_SIZ:
            if len(body) < 37:
                raise ValueError(f"the SIZ marker segment holds {len(body)} bytes, fewer than 37")
            _, cols, rows, x0, y0, _, _, _, _, components = struct.unpack(">HIIIIIIIIH", body[:36])
            return dict(rows=max(0, rows - y0), cols=max(0, cols - x0), x0=x0, y0=y0, components=components,
                        precision=(body[36] & 0x7F) + 1, signed=body[36] >> 7)
    raise ValueError("no SIZ marker segment in the main header")


def j2k_header(codestream: bytes) -> dict[str, int]:
    """``j2k_siz`` and the decomposition levels from COD (ISO/IEC 15444-1 A.6.1).

    ``levels`` is absent when COD is missing or a COC marker may give a component other levels
    (this module then does not reduce). Raises ``ValueError`` for a main header it cannot walk.
    """
    header = j2k_siz(codestream)
    segments = dict(j2k_marker_segments(codestream))  # marker -> its last body: COD is unique, COC's presence is enough
    if J2K_COD in segments and J2K_COC not in segments and len(segments[J2K_COD]) >= 6:
        header["levels"] = segments[J2K_COD][5]
    return header


def reduction_level(rows: int, cols: int, at_least: tuple[int, int], max_level: int) -> int:
    """Largest r <= max_level with ceil(rows / 2**r) >= at_least[0] and ceil(cols / 2**r) >= at_least[1]."""
    level = 0
    while level < max_level and all(math.ceil(n / 2 ** (level + 1)) >= m for n, m in zip((rows, cols), at_least)):
        level += 1
    return level


def j2k_reduced(frame: bytes, ds: Dataset, at_least: tuple[int, int]) -> np.ndarray | None:
    """Decode a J2K frame (codestream or JP2) at its reduction level for ``at_least``; None when that level is 0."""
    codestream = j2k_codestream(frame)
    header = j2k_header(codestream)
    if ("levels" not in header or header["components"] != 1 or header["signed"] or header["precision"] > 16
            or header["x0"] or header["y0"] or (header["rows"], header["cols"]) != (int(ds.Rows), int(ds.Columns))
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
