"""A pydicom decoder plugin for 12-bit JPEG Extended (Transfer Syntax 1.2.840.10008.1.2.4.51) through GDCM.

pydicom 3.0.2's own GDCM and Pillow plugins refuse samples of 12-bit precision ("does not support
'JPEG Extended' for samples with 12-bit precision"); its only plugin that decodes them is
pylibjpeg-libjpeg, which is GPL-3.0. GDCM (python-gdcm: Apache-2.0 wrapper, BSD-3 library) bundles
the IJG libjpeg built for 8, 12 and 16 bits and decodes them: on pydicom's ``JPGExtended.dcm`` its
values are within 1 of libjpeg's (IDCT rounding, which the JPEG standard allows a lossy decoder).
GDCM first tries its 16-bit decoder and prints "Unsupported JPEG data precision 12" on stderr
before the 12-bit one succeeds (python-gdcm issue #35); the message carries no tag values.

The module follows pydicom's decoder plugin contract (``is_available``, ``DECODER_DEPENDENCIES``
and a frame function) and is registered by ``triage.ingest`` with ``Decoder.add_plugin``.
"""

from __future__ import annotations

from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.uid import JPEGExtended12Bit

try:
    import gdcm
except ImportError:  # python-gdcm is a base dependency; without it pydicom lists the plugin as missing
    gdcm = None

LABEL = "gdcm-12bit"
DECODER_DEPENDENCIES = {JPEGExtended12Bit: ("python-gdcm",)}


def is_available(uid: str) -> bool:
    """True for JPEG Extended when python-gdcm is installed (pydicom's plugin contract)."""
    return gdcm is not None and uid == JPEGExtended12Bit


def register() -> None:
    """Add this plugin to pydicom's JPEG Extended decoder (after its own plugins), once per process."""
    decoder = get_decoder(JPEGExtended12Bit)
    if LABEL not in decoder.available_plugins and not any(d.startswith(f"{LABEL} ") for d in decoder.missing_dependencies):
        decoder.add_plugin(LABEL, (__name__, "decode_frame"))


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One JPEG Extended frame of precision 9-12 bits, monochrome, as 16-bit little-endian samples.

    Bits Stored (0028,0101) 8 is left to pydicom's own plugins (``NotImplementedError`` here, as
    theirs raise for 12 bits). Raises ``ValueError`` when GDCM returns anything but Rows x Columns
    (0028,0010)/(0028,0011) samples, which is how a codestream it cannot decode shows.
    """
    if runner.samples_per_pixel != 1 or not 8 < runner.bits_stored <= 12 or runner.bits_allocated != 16:
        raise NotImplementedError(
            f"the {LABEL} plugin decodes monochrome JPEG Extended of Bits Stored 9-12 in Bits Allocated 16 only")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    photometric = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(photometric))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, runner.bits_stored, runner.bits_stored - 1, runner.pixel_representation))
    frame = (image.GetBuffer() or "").encode("utf-8", "surrogateescape")  # GDCM returns char* as str
    expected = runner.rows * runner.columns * 2
    if len(frame) != expected:
        raise ValueError(f"GDCM could not decode the JPEG Extended frame: it returned {len(frame)} bytes, "
                         f"not the {expected} of {runner.rows} x {runner.columns} 16-bit samples")
    return frame
