"""Read one file (DICOM, PNG or JPEG) into a ``Radiograph``, or say exactly why not.

``read_radiograph`` is the only entry point. For bad input it raises only
``BadInputError`` (``OutOfScopeError`` for readable images the model was not made
for), each with a reason code from ``triage.errors.REASONS``, the file, what was
found and what a person can do; never anything else.

DICOM decoding is pydicom's: native (implicit/explicit VR little endian, explicit VR
big endian), deflated and RLE need nothing extra; the compressed syntaxes use the plugins of
``DECODING_PLUGINS``, all under permissive licences: Pillow (8-bit JPEG, JPEG 2000), ``pyjpegls``
(CharLS: JPEG-LS), libjpeg-turbo 3 from ``imagecodecs`` (12-bit JPEG Extended and lossless JPEG, through
``triage.jpeg_turbo``) and ``pylibjpeg`` with ``pylibjpeg-openjpeg`` (JPEG 2000, HTJ2K). Old ACR-NEMA files
without preamble or file meta are read too, their Transfer Syntax UID (0002,0010)
taken from how the data set is actually encoded. The scope checks of
``triage.scope`` run on the header before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import struct
import zlib
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_has_tag
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import _read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import (UID, HTJ2K, JPEG2000, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, HTJ2KLossless, HTJ2KLosslessRPCL, ImplicitVRLittleEndian,
                         JPEG2000Lossless, JPEG2000TransferSyntaxes, JPEGBaseline8Bit, JPEGExtended12Bit,
                         JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, JPEGLSTransferSyntaxes,
                         JPEGTransferSyntaxes, generate_uid)

from . import jpeg_turbo
from .decode import CODECS, decode_reduced, j2k_codestream, j2k_siz
from .errors import BadInputError, OutOfScopeError
from .logs import quiet_libraries
from .radiograph import ImageMeta, Radiograph, is_valid_uid, uid_text
from .scope import MAX_DECODED_BYTES, MIN_SIDE_PX, check_anatomy, check_image, check_modality, integer

quiet_libraries()  # every process that reads a file: no tag values in warnings or logs (triage.logs)
jpeg_turbo.register()  # 12-bit JPEG Extended and lossless JPEG, which pydicom's permissive plugins refuse

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
PIXEL_DATA_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010), little and big endian
ACR_NEMA_FIRST_GROUPS = (0x0000, 0x0002, 0x0008)  # a data set without preamble starts with one of these
UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_FILE_BYTES = 1024 * 2**20  # refuse to read larger files into memory
MAX_INFLATED_BYTES = MAX_DECODED_BYTES + 64 * 2**20  # a deflated data set: pixels plus a generous header
INFLATE_CHUNK_BYTES = 16 * 2**20
REEXPORT = "re-export the study from PACS uncompressed (Explicit VR Little Endian)"
PARSE_ERRORS = (InvalidDicomError, BytesLengthException, EOFError, OSError, struct.error, ValueError, KeyError,
                IndexError, NotImplementedError, TypeError, AttributeError, OverflowError, zlib.error)
DECODE_ERRORS = (RuntimeError, ValueError, NotImplementedError, AttributeError, KeyError, IndexError,
                 EOFError, struct.error, TypeError, OverflowError)
UID_TAGS = (("StudyInstanceUID", "Study Instance UID (0020,000D)", "study"),
            ("SeriesInstanceUID", "Series Instance UID (0020,000E)", "series"),
            ("SOPInstanceUID", "SOP Instance UID (0008,0018)", "sop"))  # keyword, name, part of a derived UID
CODESTREAM_SYNTAXES = frozenset(JPEG2000TransferSyntaxes + JPEGTransferSyntaxes + JPEGLSTransferSyntaxes)
"""Compressed syntaxes whose frames state their own size (checked before decoding)."""
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
DECODING_PLUGINS: dict[UID, tuple[str, ...]] = {
    JPEGBaseline8Bit: ("pillow",),  # strict about truncated data, where libjpeg-turbo fills with grey
    JPEGExtended12Bit: ("pillow", jpeg_turbo.LABEL),  # Pillow decodes 8-bit samples only
    JPEGLossless: (jpeg_turbo.LABEL,),
    JPEGLosslessSV1: (jpeg_turbo.LABEL,),
    JPEGLSLossless: ("pyjpegls",),
    JPEGLSNearLossless: ("pyjpegls",),
    JPEG2000Lossless: ("pylibjpeg", "pillow"),
    JPEG2000: ("pylibjpeg", "pillow"),
    HTJ2KLossless: ("pylibjpeg",),
    HTJ2KLosslessRPCL: ("pylibjpeg",),
    HTJ2K: ("pylibjpeg",),
}
"""The pydicom decoding plugins tried for each compressed Transfer Syntax UID (0002,0010), in order:
the fastest first (``benchmarks/bench_decode.py --backends``), none under a GPL licence
(tests/test_licences.py). Other syntaxes (native, deflated, RLE) use pydicom's own decoders."""
PLUGIN_PACKAGES = {"pillow": "pillow", jpeg_turbo.LABEL: "imagecodecs", "pyjpegls": "pyjpegls",
                   "pylibjpeg": "pylibjpeg and pylibjpeg-openjpeg"}
"""The PyPI distributions each plugin of ``DECODING_PLUGINS`` needs (all base dependencies of cxr-triage)."""


def read_radiograph(path: str | PathLike[str], *, min_side_px: int = MIN_SIDE_PX,
                    reduce_to: tuple[int, int] | None = None, reduce_codecs: Collection[str] = tuple(CODECS),
                    scope: bool = True) -> Radiograph:
    """Read a DICOM, PNG or JPEG file into a checked, decoded ``Radiograph``.

    The file is read once; its sha256 is of those bytes. ``pixels`` is (rows, cols):
    for DICOM the stored values as pydicom decodes them (honouring Bits Stored
    (0028,0101) and Pixel Representation (0028,0103)); for PNG/JPEG uint8 grey, or
    uint16 for a 16-bit PNG. Images with fewer than ``min_side_px`` rows or columns are
    out of scope. Raises ``BadInputError``/``OutOfScopeError`` for any bad input.
    ``reduce_to`` (rows, cols), e.g. ``triage.decode.decode_size(spec)``: decode JPEG 2000 / 8-bit
    JPEG baseline DICOM (the families of ``reduce_codecs``) at the smallest reduced resolution
    still at least that size, with Rows/Columns/spacing of ``dataset`` rewritten to match
    (``triage.decode``); else full size. ``scope=False``: see ``read_radiograph_bytes``.
    """
    return read_radiograph_bytes(str(path), read_bytes(path), min_side_px=min_side_px, reduce_to=reduce_to,
                                 reduce_codecs=reduce_codecs, scope=scope)


def read_radiograph_bytes(path: str, data: bytes, *, sha256: str | None = None, min_side_px: int = MIN_SIDE_PX,
                          reduce_to: tuple[int, int] | None = None, reduce_codecs: Collection[str] = tuple(CODECS),
                          scope: bool = True) -> Radiograph:
    """``read_radiograph`` of the bytes ``data`` already read from ``path`` (the sha256 is theirs: pass ``sha256``,
    their hex digest, when the caller has computed it, so a large file is not hashed twice; it is not checked).

    ``scope=False`` reads an image for a person to look at, whatever the model was made for:
    the model's scope checks (Modality (0008,0060), Body Part Examined (0018,0015), View
    Position (0018,5101)) and the check of the record's UIDs are skipped; every check that
    the image can be decoded and shown (one monochrome frame, the size limits, the pixel and
    display attributes, the codestream size) still runs.
    """
    sha256 = sha256 or hashlib.sha256(data).hexdigest()
    if is_dicom_part10(data):
        return read_dicom(path, data, sha256, min_side_px, reduce_to, reduce_codecs, scope)
    if data.startswith((PNG_MAGIC, JPEG_MAGIC)):
        return read_image(path, data, sha256, min_side_px)
    if may_be_acr_nema(data):
        return read_dicom(path, data, sha256, min_side_px, reduce_to, reduce_codecs, scope)
    raise BadInputError(
        path, "not_dicom", f"the file ({len(data)} bytes) has no DICOM 'DICM' prefix at byte 128, "
        "is not an ACR-NEMA data set and is not a PNG or JPEG image",
        "send DICOM files (or PNG/JPEG images); remove other files from the input folder")


FILE_FIX = "check that the file exists and that this program may read it"
TOO_LARGE_FIX = "check what this file is; a chest radiograph is well under 100 MiB"


@contextmanager
def open_bounded(path: str | PathLike[str], limit_bytes: int | None = None) -> Iterator[BinaryIO]:
    """A regular file of at most ``limit_bytes`` (default ``MAX_FILE_BYTES``), opened for reading.

    The size is checked before anything is read, so a 40 GB file costs a ``stat``; opening never waits (a FIFO
    is refused, not read). Raises ``BadInputError`` (``file_unreadable``, ``too_large``); a reader that finds the
    file grown past the limit raises ``too_large`` through ``check_within``.
    """
    limit = MAX_FILE_BYTES if limit_bytes is None else limit_bytes
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not wait for a writer
    except OSError as error:
        raise unreadable(path, error) from None
    with open(handle, "rb") as stream:
        try:
            status = os.fstat(handle)
        except OSError as error:
            raise unreadable(path, error) from None
        if not stat.S_ISREG(status.st_mode):
            raise BadInputError(str(path), "file_unreadable", "not a regular file (a FIFO, device or folder)",
                                "copy the image into a regular file")
        check_within(path, status.st_size, limit)
        yield stream


def check_within(path: str | PathLike[str], size: int, limit_bytes: int | None = None) -> None:
    """``too_large`` when ``size`` bytes are over ``limit_bytes`` (default ``MAX_FILE_BYTES``)."""
    limit = MAX_FILE_BYTES if limit_bytes is None else limit_bytes
    if size > limit:
        raise BadInputError(str(path), "too_large", f"the file is {size / 2**20:.0f} MiB, over the "
                            f"{limit / 2**20:.0f} MiB limit", TOO_LARGE_FIX)


def unreadable(path: str | PathLike[str], error: OSError) -> BadInputError:
    """The ``file_unreadable`` error for an ``OSError`` met opening or reading ``path``."""
    return BadInputError(str(path), "file_unreadable", f"the file could not be read ({type(error).__name__}: "
                         f"{error.strerror or error})", FILE_FIX)


def read_bytes(path: str | PathLike[str], limit_bytes: int | None = None) -> bytes:
    """The whole regular file, at most ``limit_bytes`` (``open_bounded``); ``BadInputError`` otherwise."""
    limit = MAX_FILE_BYTES if limit_bytes is None else limit_bytes
    with open_bounded(path, limit) as stream:
        try:
            data = stream.read(limit + 1)
        except OSError as error:
            raise unreadable(path, error) from None
    check_within(path, len(data), limit)  # it grew while it was read
    return data


def is_dicom_part10(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then 'DICM'."""
    return data[128:132] == b"DICM"


def may_be_acr_nema(data: bytes) -> bool:
    """A data set without preamble/file meta (ACR-NEMA style) starts with a low group number."""
    return len(data) >= 8 and struct.unpack("<H", data[:2])[0] in ACR_NEMA_FIRST_GROUPS


def derived_uid(sha256: str, part: str) -> str:
    """A UID derived deterministically from the file's sha256 (one study per such file)."""
    return generate_uid(entropy_srcs=[sha256, part])


# --- DICOM -----------------------------------------------------------------------------------


def read_dicom(path: str, data: bytes, sha256: str, min_side_px: int, reduce_to: tuple[int, int] | None = None,
               reduce_codecs: Collection[str] = tuple(CODECS), scope: bool = True) -> Radiograph:
    """DICOM bytes -> Radiograph: parse, check the header, then decode (``scope``: ``read_radiograph_bytes``)."""
    ds = parse_dicom(path, data)
    try:
        check_pixel_data_present(ds, path)
        if scope:
            check_modality(ds, path)
        check_image(ds, path, min_side_px)
        check_pixel_attributes(ds, path)
        check_display_attributes(ds, path)
        ensure_transfer_syntax(ds, path)
        check_codestream_size(ds, path)
        pixels = decode_reduced(ds, reduce_to, reduce_codecs) if reduce_to else None
        if pixels is None:
            pixels = decode_pixels(ds, path)
        if scope:
            check_anatomy(ds, path)
            check_uids(ds, path)
    except BadInputError as error:
        error.meta = dicom_meta(ds, sha256)  # so the human-review record still names the study
        raise
    del ds.PixelData
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    return Radiograph(path, sha256, pixels, photometric, dicom_meta(ds, sha256), ds)


def parse_dicom(path: str, data: bytes) -> Dataset:
    """Parse the whole data set and convert every element (pixel data stays undecoded bytes)."""
    try:
        check_inflated_size(path, data)
        ds = dcmread(io.BytesIO(data), force=True)
        cut = where_cut(ds, data)
        if not cut:
            for _ in ds.iterall():  # convert raw values now, so a damaged element fails here, not later
                pass
    except BadInputError:
        raise
    except PARSE_ERRORS as error:
        raise BadInputError(
            path, "not_dicom", f"the DICOM header could not be parsed ({type(error).__name__}: {error})",
            f"{REEXPORT}; the file may be damaged") from None
    if not is_dicom_part10(data) and not looks_like_data_set(ds):
        raise BadInputError(
            path, "not_dicom", "no preamble or 'DICM' prefix, and the bytes do not read as DICOM data elements",
            "send DICOM files (or PNG/JPEG images); remove other files from the input folder")
    if cut:
        raise truncated(path, cut)
    return ds


def check_inflated_size(path: str, data: bytes, limit_bytes: int = MAX_INFLATED_BYTES) -> None:
    """A Deflated Explicit VR Little Endian file must inflate to at most ``limit_bytes`` (a zip bomb, else).

    pydicom inflates the whole data set in one call, before any element is read, so it
    is measured here first, in bounded chunks that are thrown away.
    """
    if not is_dicom_part10(data):
        return
    stream = io.BytesIO(data)
    stream.seek(132)
    meta = _read_file_meta_info(stream)  # pydicom's own file meta reader: where the data set starts
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflater, pending, total = zlib.decompressobj(-zlib.MAX_WBITS), data[stream.tell():], 0
    while pending and not inflater.eof:
        total += len(inflater.decompress(pending, INFLATE_CHUNK_BYTES))
        pending = inflater.unconsumed_tail
        if total > limit_bytes:
            raise BadInputError(
                path, "too_large", f"the deflated data set (Transfer Syntax UID (0002,0010) {DeflatedExplicitVRLittleEndian}) "
                f"inflates to over {limit_bytes / 2**20:.0f} MiB from {len(data)} bytes (a zip bomb)",
                "check what this file is; re-export the study from PACS uncompressed (Explicit VR Little Endian)")


def looks_like_data_set(ds: Dataset) -> bool:
    """Without a 'DICM' prefix: at least 3 standard elements and no unknown public tag (garbage reads as those)."""
    public = [tag for tag in ds.keys() if not tag.is_private and tag.element != 0]  # (gggg,0000): group lengths
    return len(public) >= 3 and all(dictionary_has_tag(tag) for tag in public)


def where_cut(ds: Dataset, data: bytes) -> str:
    """How the file was cut short, from the still-raw elements; "" when it was not."""
    raw = ds.get_item("PixelData")
    if isinstance(raw, RawDataElement):
        if raw.length != UNDEFINED_LENGTH and len(raw.value or b"") < raw.length:
            return f"Pixel Data (7FE0,0010) declares {raw.length} bytes but the file ends after {len(raw.value or b'')}"
        return ""
    if any(tag in data for tag in PIXEL_DATA_TAG_BYTES):
        return f"the file ({len(data)} bytes) ends inside Pixel Data (7FE0,0010): its fragments are not terminated"
    tags = list(ds.keys())
    last = ds.get_item(tags[-1]) if tags else None
    if last is None or (isinstance(last, RawDataElement) and last.length != UNDEFINED_LENGTH and (
            len(last.value or b"") < last.length or last.value_tell + last.length < len(data) - 1)):
        return f"the file ({len(data)} bytes) ends inside the header, before Pixel Data (7FE0,0010)"
    return ""


def check_pixel_data_present(ds: Dataset, path: str) -> None:
    """Pixel Data (7FE0,0010) present, else ``no_pixel_data`` (``unsupported_pixel_format`` for float data)."""
    if "PixelData" in ds:
        return
    other = [name for name in ("FloatPixelData", "DoubleFloatPixelData") if name in ds]
    sop_class = ds.get("SOPClassUID")
    sop = f"; SOP Class UID (0008,0016) is {UID(str(sop_class)).name!r}" if sop_class else ""
    if "Rows" in ds and not other:
        sop += "; Rows (0028,0010) is set, so the file may have been cut short"
    raise BadInputError(
        path, "unsupported_pixel_format" if other else "no_pixel_data",
        f"the data set has {other[0] if other else 'no Pixel Data (7FE0,0010)'}{sop}",
        "send image objects only (not reports, key-object notes or presentation states)")


def truncated(path: str, detail: str) -> BadInputError:
    """The error for a file cut short."""
    return BadInputError(path, "truncated", detail, f"copy the file again from its source, or {REEXPORT}")


def check_pixel_attributes(ds: Dataset, path: str) -> None:
    """Group 0028 attributes a decoder needs are present and consistent, else ``unsupported_pixel_format``."""
    problems = []
    for keyword, tag in (("Rows", "(0028,0010)"), ("Columns", "(0028,0011)")):
        value = integer(ds, keyword)
        if value is None or value < 1:
            problems.append(f"{keyword} {tag} is {ds.get(keyword)!r}")
    allocated, stored = integer(ds, "BitsAllocated"), integer(ds, "BitsStored")
    if allocated not in (8, 16, 32):
        problems.append(f"Bits Allocated (0028,0100) is {ds.get('BitsAllocated')!r}, not 8, 16 or 32")
    elif stored is None or not 1 <= stored <= allocated:
        problems.append(f"Bits Stored (0028,0101) is {ds.get('BitsStored')!r} with Bits Allocated {allocated}")
    if integer(ds, "PixelRepresentation") not in (0, 1):
        problems.append(f"Pixel Representation (0028,0103) is {ds.get('PixelRepresentation')!r}, not 0 or 1")
    if integer(ds, "SamplesPerPixel") not in (None, 1):
        problems.append(f"Samples per Pixel (0028,0002) is {ds.get('SamplesPerPixel')!r} for a monochrome image")
    for keyword, tag in (("NumberOfFrames", "(0028,0008)"), ("HighBit", "(0028,0102)"), ("PlanarConfiguration", "(0028,0006)")):
        if ds.get(keyword) not in (None, "") and integer(ds, keyword) is None:
            problems.append(f"{keyword} {tag} is {ds.get(keyword)!r}, not an integer")
    if not str(ds.get("PhotometricInterpretation") or "").strip():
        problems.append("Photometric Interpretation (0028,0004) is missing")
    if problems:
        raise BadInputError(path, "unsupported_pixel_format", "; ".join(problems),
                            f"{REEXPORT}; report the modality's export settings to its vendor")
    if "SamplesPerPixel" not in ds:
        ds.SamplesPerPixel = 1  # Type 1, but missing from some old files; 1 is the only monochrome value


def check_display_attributes(ds: Dataset, path: str) -> None:
    """Rescale, window and LUT attributes that preprocessing reads are well formed, else ``unsupported_pixel_format``."""
    problems = [rescale_problem(ds), window_problem(ds),
                lut_problem(ds, "ModalityLUTSequence", "Modality LUT Sequence (0028,3000)", (8, 16), exact_ow=True),
                lut_problem(ds, "VOILUTSequence", "VOI LUT Sequence (0028,3010)", tuple(range(1, 17)))]
    problems = [p for p in problems if p]
    if problems:
        raise BadInputError(path, "unsupported_pixel_format", "; ".join(problems),
                            f"{REEXPORT}; report the modality's export settings to its vendor")


def numbers(ds: Dataset, keyword: str) -> list[float] | None:
    """A numeric tag's values as finite floats; None when absent or empty; ValueError when not numbers."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    values = [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{value!r}")
    return values


def rescale_problem(ds: Dataset) -> str:
    """Rescale Slope/Intercept (0028,1053)/(0028,1052): one finite number each, when present."""
    for keyword, tag in (("RescaleSlope", "(0028,1053)"), ("RescaleIntercept", "(0028,1052)")):
        try:
            values = numbers(ds, keyword)
        except (TypeError, ValueError):
            return f"{keyword} {tag} is {ds.get(keyword)!r}, not a finite number"
        if values is not None and len(values) != 1:
            return f"{keyword} {tag} has {len(values)} values, not 1"
    return ""


def window_problem(ds: Dataset) -> str:
    """Window Center/Width (0028,1050)/(0028,1051): finite numbers, when present."""
    for keyword, tag in (("WindowCenter", "(0028,1050)"), ("WindowWidth", "(0028,1051)")):
        try:
            numbers(ds, keyword)
        except (TypeError, ValueError):
            return f"{keyword} {tag} is {ds.get(keyword)!r}, not finite numbers"
    return ""


def lut_problem(ds: Dataset, keyword: str, name: str, bits_allowed: tuple[int, ...], exact_ow: bool = False) -> str:
    """The first LUT item has a 3-value LUT Descriptor (0028,3002) and at least that many LUT Data (0028,3006) entries
    (``exact_ow``: exactly that many when the data are OW bytes, as pydicom's ``apply_modality_lut`` unpacks them)."""
    items = ds.get(keyword)
    if items is None or (not isinstance(items, Sequence) and not items):
        return ""
    if not isinstance(items, Sequence) or (len(items) and not isinstance(items[0], Dataset)):
        return f"{name} is not a sequence of items (VR {ds[keyword].VR}, value {str(items)[:40]!r})"
    if not items:
        return ""
    item = items[0]
    descriptor = item.get("LUTDescriptor")
    values = list(descriptor) if isinstance(descriptor, (list, tuple, MultiValue)) else [descriptor]
    if descriptor is None or len(values) != 3 or not all(isinstance(v, int) for v in values):
        return f"{name}: LUT Descriptor (0028,3002) is {descriptor!r}, not 3 integers"
    count, bits = values[0] or 65536, values[2]
    if bits not in bits_allowed:
        return f"{name}: LUT Descriptor (0028,3002) gives {bits} bits per entry, not {bits_allowed[0]}-{bits_allowed[-1]}"
    data = item.get("LUTData")
    entries = lut_entries(data)
    if entries < count or (exact_ow and isinstance(data, bytes) and len(data) != 2 * count):
        return f"{name}: LUT Data (0028,3006) holds {entries} entries, LUT Descriptor (0028,3002) declares {count}"
    return ""


def lut_entries(data: object) -> int:
    """Entries in LUT Data (0028,3006): 16-bit words when OW bytes (as pydicom and preprocessing read them), else values."""
    if data is None:
        return 0
    if isinstance(data, bytes):
        return len(data) // 2
    return len(data) if isinstance(data, (list, tuple, MultiValue)) else 1


def ensure_transfer_syntax(ds: Dataset, path: str) -> None:
    """Give a file without file meta the Transfer Syntax UID (0002,0010) it was actually read with."""
    if "TransferSyntaxUID" in ds.file_meta:
        return
    if ds["PixelData"].is_undefined_length:
        raise BadInputError(
            path, "decode_failed", "Transfer Syntax UID (0002,0010) is missing and Pixel Data (7FE0,0010) is "
            "compressed (encapsulated), so its codec is unknown", REEXPORT)
    implicit, little = ds.original_encoding
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def codestream_shape(frame: bytes, syntax: UID) -> tuple[int, int, int]:
    """(rows, columns, components) from a compressed frame's own header.

    JPEG 2000 / HTJ2K syntaxes: SIZ (ISO/IEC 15444-1 A.5.1) of the raw codestream, or of the
    codestream inside a JP2 file's 'jp2c' box (Annex I), found by walking boxes and marker
    segments. JPEG and JPEG-LS syntaxes: the SOF header (pydicom's own reader). Raises
    ``ValueError`` when the header cannot be found.
    """
    if syntax in JPEG2000TransferSyntaxes:
        header = j2k_siz(j2k_codestream(frame))
        return header["rows"], header["cols"], header["components"]
    info = _get_jpg_parameters(frame)
    if not info.get("width"):
        raise ValueError("no JPEG SOF or JPEG-LS SOF55 marker segment after SOI")
    return info["height"], info["width"], info["components"]


def check_codestream_size(ds: Dataset, path: str, limit_bytes: int = MAX_DECODED_BYTES) -> None:
    """Before decoding: the compressed frame's own header must match Rows x Columns (0028,0010)/(0028,0011).

    A codec allocates what its codestream header says, not what the DICOM header says, so a
    1 kB JPEG 2000 frame claiming 60000 x 60000 pixels would bypass the decoded-size limit;
    a frame whose header cannot be found is refused for the same reason. RLE frames carry
    no size of their own (pydicom's decoder allocates from Rows x Columns).
    """
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if not ds["PixelData"].is_undefined_length or syntax not in CODESTREAM_SYNTAXES:
        return
    try:
        rows, cols, components = codestream_shape(get_frame(ds.PixelData, 0, number_of_frames=1), syntax)
    except (ValueError, struct.error, EOFError) as error:
        raise BadInputError(
            path, "decode_failed", f"the compressed frame's own header could not be read (Transfer Syntax UID (0002,0010) "
            f"{syntax.name}), so its decoded size cannot be checked: {error}", f"{REEXPORT}; the compressed data may be corrupt") from None
    size = rows * cols * components * max(1, (integer(ds, "BitsAllocated") or 16) // 8)
    if size > limit_bytes:
        raise BadInputError(
            path, "too_large", f"the compressed frame's header claims {rows} x {cols} x {components} samples "
            f"({size / 2**20:.0f} MiB decoded), over the {limit_bytes / 2**20:.0f} MiB limit",
            "check the file with the modality vendor; a chest radiograph decodes to well under 100 MiB")
    if (rows and rows != integer(ds, "Rows")) or cols != integer(ds, "Columns"):
        raise BadInputError(
            path, "decode_failed", f"the compressed frame is {rows} x {cols} pixels but Rows x Columns "
            f"(0028,0010)/(0028,0011) say {ds.get('Rows')} x {ds.get('Columns')}", f"{REEXPORT}; the file is inconsistent")


def check_uids(ds: Dataset, path: str) -> None:
    """Study, Series and SOP Instance UIDs that are present are valid DICOM UIDs (``is_valid_uid``), else ``invalid_uid``.

    Checked last, so a damaged or out-of-scope file is reported as such; either way its record
    never carries an invalid UID (``dicom_meta`` derives one from the file's sha256 instead).
    """
    bad = [f"{name} {text[:80]!r}" for keyword, name, _ in UID_TAGS
           if (text := uid_text(ds.get(keyword))) and not is_valid_uid(text)]
    if bad:
        raise BadInputError(
            path, "invalid_uid", f"{'; '.join(bad)}: not a valid DICOM UID (PS3.5 9.1: digits and dots, no leading "
            "zero in a component, at most 64 characters); the record uses UIDs derived from the file's sha256",
            "a person reviews this study on PACS; ask the sender to fix the modality's UID settings and re-export it")


def decoding_plugins(syntax: UID) -> tuple[str, ...]:
    """The installed plugins of ``DECODING_PLUGINS`` for ``syntax``, in order; ``("",)`` (pydicom's own
    choice) for a syntax it does not list; empty when none of its plugins is installed."""
    if syntax not in DECODING_PLUGINS:
        return ("",)
    installed = get_decoder(syntax).available_plugins
    return tuple(plugin for plugin in DECODING_PLUGINS[syntax] if plugin in installed)


def decode_pixels(ds: Dataset, path: str) -> np.ndarray:
    """Pixel Data -> (rows, cols) stored values, with the codec's failure turned into a reason.

    Each plugin of ``decoding_plugins`` is tried in turn; the file fails when all of them do.
    """
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    syntax_text = f"Transfer Syntax UID (0002,0010) {str(syntax)!r} ({syntax.name})"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise BadInputError(path, "decode_failed", f"no decoder exists for {syntax_text}", REEXPORT) from None
    plugins = decoding_plugins(syntax)
    if not decoder.is_available or not plugins:
        packages = sorted({PLUGIN_PACKAGES[plugin] for plugin in DECODING_PLUGINS.get(syntax, ())})
        missing = ", ".join(packages) or "; ".join(decoder.missing_dependencies)
        raise BadInputError(path, "decode_failed", f"no installed plugin decodes {syntax_text}",
                            f"install the decoder ({missing}: pip install 'cxr-triage[cpu]' brings it), or {REEXPORT}")
    if not syntax.is_compressed:
        check_native_length(ds, path)
    failures = []
    for plugin in plugins:
        try:
            pixels = pixel_array(ds, decoding_plugin=plugin)
            break
        except DECODE_ERRORS as error:
            failures.append(" ".join(str(error).split()))
    else:
        message = " ".join(failures)
        if any(word in message.lower() for word in ("truncat", "premature", "end of file", "less than expected")):
            raise truncated(path, f"{syntax_text}: {message}")
        raise BadInputError(path, "decode_failed", f"{syntax_text} could not be decoded: {message}",
                            f"{REEXPORT}; the compressed data may be corrupt")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if pixels.shape != (rows, cols):
        raise BadInputError(
            path, "unsupported_pixel_format", f"decoded shape {pixels.shape} is not Rows x Columns "
            f"(0028,0010)/(0028,0011) {rows} x {cols}", REEXPORT)
    return pixels.astype(pixels.dtype.newbyteorder("="), copy=False)


def check_native_length(ds: Dataset, path: str) -> None:
    """Uncompressed Pixel Data holds at least Rows x Columns x Bits Allocated / 8 bytes."""
    expected = int(ds.Rows) * int(ds.Columns) * (integer(ds, "NumberOfFrames") or 1) * int(ds.BitsAllocated) // 8
    found = len(ds.PixelData)
    if found < expected:
        raise truncated(path, f"Pixel Data (7FE0,0010) holds {found} bytes; Rows x Columns x Bits Allocated "
                              f"(0028,0010/0011/0100) need {expected}")


def header_meta(path: str | PathLike[str], sha256: str) -> ImageMeta | None:
    """The identifying tags of a DICOM file from its header alone (no pixel data, no checks), or None.

    For the record of a file whose decoding failed in another process (a crash, a timeout), so
    the human-review record still names the study. Only files within ``MAX_FILE_BYTES`` that
    are not deflated (whose header would have to be inflated) are read. Its UIDs are
    ``dicom_meta``'s: an invalid one is replaced by one derived from ``sha256``.
    """
    try:
        if Path(path).stat().st_size > MAX_FILE_BYTES:
            return None
        ds = dcmread(path, stop_before_pixels=True, force=True)
        if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian or "StudyInstanceUID" not in ds:
            return None
        return dicom_meta(ds, sha256)
    except Exception:  # noqa: BLE001 - any unreadable header just leaves the record without tags
        return None


def record_uid(ds: Dataset, keyword: str, sha256: str, part: str) -> str:
    """The tag's UID when valid (``is_valid_uid``), else one derived from the file's sha256."""
    text = uid_text(ds.get(keyword))
    return text if is_valid_uid(text) else derived_uid(sha256, part)


def dicom_meta(ds: Dataset, sha256: str) -> ImageMeta:
    """ImageMeta from the tags; a missing or invalid UID (``is_valid_uid``) derived from the file's sha256."""
    def tag(keyword: str) -> str:
        value = ds.get(keyword)
        return "" if value is None else str(value).strip()

    study_uid, series_uid, sop_uid = (record_uid(ds, keyword, sha256, part) for keyword, _, part in UID_TAGS)
    return ImageMeta(
        study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
        patient_id=tag("PatientID"), patient_sex=tag("PatientSex"), patient_age=tag("PatientAge"),
        modality=tag("Modality").upper(), body_part=tag("BodyPartExamined").upper(),
        view_position=tag("ViewPosition").upper(), manufacturer=tag("Manufacturer"), study_date=tag("StudyDate"),
        source_format="dicom",
    )


# --- PNG / JPEG ------------------------------------------------------------------------------


def read_image(path: str, data: bytes, sha256: str, min_side_px: int) -> Radiograph:
    """PNG/JPEG bytes -> Radiograph (one study per file, MONOCHROME2, no dataset)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            pixels = grey_pixels(ImageOps.exif_transpose(image))
    except IMAGE_ERRORS as error:
        kind = "PNG" if data.startswith(PNG_MAGIC) else "JPEG"
        raise BadInputError(path, "unreadable_image", f"the {kind} image could not be decoded ({error})",
                            "export the image again, or send the DICOM original") from None
    rows, cols = pixels.shape
    if min(rows, cols) < min_side_px:
        raise OutOfScopeError(path, "image_too_small", f"the image is {rows} x {cols} pixels, below the minimum of "
                                                        f"{min_side_px} pixels a side",
                              "send the full-resolution image, not a thumbnail")
    meta = ImageMeta(derived_uid(sha256, "study"), derived_uid(sha256, "series"), derived_uid(sha256, "sop"),
                     source_format="image")
    return Radiograph(path, sha256, pixels, "MONOCHROME2", meta, None)


def grey_pixels(image: Image.Image) -> np.ndarray:
    """(rows, cols) grey values: uint16 for 16-bit grey PNG modes, else uint8 from mode 'L'."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
    return np.asarray(image.convert("L"), dtype=np.uint8)
