"""Rebuild ``philips-cr-pa-jpeg-baseline.dcm``: pydicom-data's Philips chest CR (RG1_UNCR.dcm,
1955x1841, 15-bit MONOCHROME1) windowed to 8 bits by its own Window Center/Width and
recompressed as 8-bit JPEG baseline (1.2.840.10008.1.2.4.50, quality 90) with Pillow.
Window tags are removed (the 8-bit values are already windowed), so scoring uses the
percentile window. Run: .venv/bin/python tests/data/reduced/make_jpeg_baseline.py
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from triage.preprocess import window_unit

OUT = Path(__file__).with_name("philips-cr-pa-jpeg-baseline.dcm")


def main() -> None:
    ds = dcmread(get_testdata_file("RG1_UNCR.dcm"))
    unit = window_unit(ds.pixel_array.astype(np.float64), float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter),
                       float(ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth))
    pixels = np.round(unit * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for keyword in ("WindowCenter", "WindowWidth", "SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(OUT, enforce_file_format=True)
    print(f"{OUT}: {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
