"""A pydicom decoder plugin for JPEG (Transfer Syntaxes 1.2.840.10008.1.2.4.51/57/70) through libjpeg-turbo 3.

pydicom 3.0.2's permissive plugins leave two gaps: its Pillow plugin decodes 8-bit samples only, and
the only one of its plugins that decodes 12-bit JPEG Extended and lossless JPEG (process 14) without
GDCM is pylibjpeg-libjpeg, which is GPL-3.0. libjpeg-turbo 3 decodes 8-, 12- and 16-bit and lossless
JPEG; ``imagecodecs`` (BSD-3-Clause) ships it with an error manager that turns every codec error into
a Python exception (GDCM, the other candidate, aborted the process with an uncaught C++ exception on a
fuzzed frame). Its output equals GDCM's and DCMTK's on the real 12-bit and lossless files we hold.
libjpeg-turbo only warns about a codestream that stops early and fills the rest with grey, so a frame
must end with its EOI marker (8-bit baseline stays with Pillow, which refuses such data itself).

The module follows pydicom's decoder plugin contract (``is_available``, ``DECODER_DEPENDENCIES`` and a
frame function) and is registered by ``triage.ingest`` with ``Decoder.add_plugin``.
"""

from __future__ import annotations

from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.uid import JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1

try:
    import imagecodecs
except ImportError:  # a base dependency; without it pydicom lists the plugin as missing
    imagecodecs = None

LABEL = "libjpeg-turbo"
SYNTAXES = (JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)
EOI = b"\xff\xd9"  # End Of Image marker (ITU T.81 B.2.1)
DECODER_DEPENDENCIES = {uid: ("imagecodecs",) for uid in SYNTAXES}


def is_available(uid: str) -> bool:
    """True for the JPEG syntaxes above when imagecodecs is installed (pydicom's plugin contract)."""
    return imagecodecs is not None and uid in SYNTAXES


def register() -> None:
    """Add this plugin to pydicom's decoders of ``SYNTAXES`` (after their own plugins), once per process."""
    for uid in SYNTAXES:
        decoder = get_decoder(uid)
        if LABEL not in decoder.available_plugins and not any(d.startswith(f"{LABEL} ")
                                                              for d in decoder.missing_dependencies):
            decoder.add_plugin(LABEL, (__name__, "decode_frame"))


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One monochrome JPEG frame as little-endian samples of Bits Allocated (0028,0100).

    Colour frames are left to Pillow (``NotImplementedError``, as pydicom's plugins raise for what they
    do not decode). Raises ``ValueError`` when libjpeg-turbo rejects the codestream or returns anything
    but Rows x Columns (0028,0010)/(0028,0011) samples.
    """
    if runner.samples_per_pixel != 1 or runner.bits_allocated not in (8, 16):
        raise NotImplementedError(f"the {LABEL} plugin decodes monochrome frames of Bits Allocated 8 or 16 only")
    if not src.rstrip(b"\x00\xff").endswith(EOI):  # padding after EOI (00 or FF) is allowed; FF D9 cannot
        # occur inside entropy-coded data (an FF there is followed by 00 or a restart marker), so this is the end
        raise ValueError("the JPEG frame does not end with its EOI marker (FFD9): it was cut short")
    try:
        pixels = imagecodecs.jpeg8_decode(src)
    except imagecodecs.Jpeg8Error as error:
        raise ValueError(f"libjpeg-turbo could not decode the JPEG frame: {error}") from error
    if pixels.shape != (runner.rows, runner.columns):
        raise ValueError(f"libjpeg-turbo returned {pixels.shape} samples, not the {runner.rows} x {runner.columns} "
                         "of Rows x Columns")
    if pixels.dtype.itemsize * 8 > runner.bits_allocated:
        raise ValueError(f"the JPEG frame holds {pixels.dtype.itemsize * 8}-bit samples, more than Bits Allocated "
                         f"{runner.bits_allocated}")
    return pixels.astype("<u1" if runner.bits_allocated == 8 else "<u2", copy=False).tobytes()
