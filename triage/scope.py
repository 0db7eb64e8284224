"""Is this image one the model was made for? Header-only checks (format before decoding, anatomy after).

Each check raises ``OutOfScopeError`` with a reason code from ``triage.errors.REASONS``:

- Modality (0008,0060) is CR or DX. A Secondary Capture ("OT") is accepted only when
  Body Part Examined (0018,0015) names the chest explicitly: digitized chest films are
  stored that way, but an "OT" image without it may be anything (a screenshot, a scanned
  form), so the empty-means-chest rule below does not extend to it.
- Body Part Examined names the chest, or is empty. When it is empty, Study Description
  (0008,1030), Series Description (0008,103E) and Protocol Name (0018,1030) must not name
  other anatomy (``TEETH``, ``HIP``, ``KNEE``...) unless they also name the chest.
- View Position (0018,5101) is PA or AP, or empty; when empty, the descriptions must not
  say ``LATERAL``/``LAT``.
- A single frame (Number of Frames (0028,0008) <= 1) of a monochrome image
  (Photometric Interpretation (0028,0004) MONOCHROME1/2), at least ``min_side_px`` pixels
  on each side (Rows (0028,0010), Columns (0028,0011)).
"""

from __future__ import annotations

import re

from pydicom import Dataset

from .errors import OutOfScopeError

MODALITIES = frozenset({"CR", "DX"})
SECONDARY_CAPTURE = "OT"
CHEST_TERMS = frozenset({"CHEST", "THORAX", "TORAX", "THORACIC", "LUNG", "LUNGS", "PULMONARY", "CXR"})
NON_CHEST_TERMS = frozenset({
    "TEETH", "TOOTH", "DENTAL", "PANORAMIC", "PANO", "OPG", "MANDIBLE", "JAW", "MAXILLA", "SINUS", "SINUSES",
    "SKULL", "HEAD", "FACE", "ORBIT", "ORBITS", "NECK", "CSPINE", "TSPINE", "LSPINE", "SPINE", "CERVICAL",
    "LUMBAR", "SACRUM", "COCCYX", "PELVIS", "HIP", "HIPS", "ABDOMEN", "KUB", "BREAST", "MAMMO", "MAMMOGRAPHY",
    "SHOULDER", "CLAVICLE", "SCAPULA", "HUMERUS", "ELBOW", "FOREARM", "WRIST", "HAND", "FINGER", "THUMB",
    "FEMUR", "KNEE", "PATELLA", "TIBIA", "FIBULA", "LEG", "ANKLE", "FOOT", "HEEL", "CALCANEUS", "TOE",
    "EXTREMITY", "ARM",
})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_TERMS = frozenset({"LAT", "LATERAL", "DECUBITUS"})
MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
DESCRIPTION_TAGS = (
    ("StudyDescription", "(0008,1030) Study Description"),
    ("SeriesDescription", "(0008,103E) Series Description"),
    ("ProtocolName", "(0018,1030) Protocol Name"),
)
MAX_DECODED_BYTES = 512 * 2**20
"""Largest decoded pixel data accepted: refused before decoding (decompression bombs)."""
MIN_SIDE_PX = 64
"""Default smallest Rows/Columns accepted: below this nothing is left to triage (the
model input is resampled to the bundle's size anyway)."""


def text(ds: Dataset, keyword: str) -> str:
    """A tag's value as a stripped upper-case string ("" when absent or empty)."""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip().upper()


def words(value: str) -> set[str]:
    """Upper-case words of a free-text value: 'MODALITYLUT - TEETH' -> {'MODALITYLUT', 'TEETH'}."""
    return set(re.split(r"[^A-Z0-9]+", value.upper())) - {""}


def integer(ds: Dataset, keyword: str) -> int | None:
    """A tag's value when it is an integer (US, SS, UL, IS...); None when absent, empty or anything else.

    Strict on purpose: pydicom's decoders reshape with these values, so a Rows (0028,0010)
    read as a float or a string (a damaged VR) must not pass for a number.
    """
    value = ds.get(keyword)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_decoded_size(ds: Dataset, path: str, limit_bytes: int = MAX_DECODED_BYTES) -> None:
    """Refuse before decoding when Rows x Columns x frames x samples x bytes exceeds the limit."""
    bytes_per_sample = max(1, (integer(ds, "BitsAllocated") or 16) // 8)
    size = 1
    for keyword in ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel"):
        size *= max(1, integer(ds, keyword) or 1)
    size *= bytes_per_sample
    if size > limit_bytes:
        raise OutOfScopeError(
            path, "too_large", f"Rows x Columns x frames x samples x bytes (0028,0010)/(0028,0011)/(0028,0008)/"
            f"(0028,0002)/(0028,0100) is {size / 2**20:.0f} MiB, over the {limit_bytes / 2**20:.0f} MiB limit",
            "check the file with the modality vendor; a chest radiograph decodes to well under 100 MiB")


def check_modality(ds: Dataset, path: str) -> None:
    """CR or DX; OT only with an explicit chest Body Part Examined."""
    modality = text(ds, "Modality")
    if modality in MODALITIES or (modality == SECONDARY_CAPTURE and text(ds, "BodyPartExamined") in CHEST_TERMS):
        return
    found = "absent" if not modality else f"{modality!r}"
    raise OutOfScopeError(
        path, "modality_out_of_scope", f"Modality (0008,0060) is {found}; only CR or DX radiographs are scored "
        "(OT only with Body Part Examined (0018,0015) CHEST)",
        "send only chest radiographs (CR/DX); review this study without the model")


def check_body_part(ds: Dataset, path: str) -> None:
    """Body Part Examined names the chest, or is empty and no description names other anatomy."""
    body_part = text(ds, "BodyPartExamined")
    if body_part:
        if body_part in CHEST_TERMS:
            return
        raise OutOfScopeError(
            path, "body_part_out_of_scope", f"Body Part Examined (0018,0015) is {body_part!r}, not the chest",
            "send only chest radiographs; review this study without the model")
    for keyword, name in DESCRIPTION_TAGS:
        found = words(text(ds, keyword))
        other = sorted(found & NON_CHEST_TERMS)
        if other and not found & CHEST_TERMS:
            raise OutOfScopeError(
                path, "body_part_out_of_scope", f"Body Part Examined (0018,0015) is empty and {name} names {other[0]!r}",
                "send only chest radiographs; if this is a chest, set Body Part Examined (0018,0015) to CHEST")


def check_view(ds: Dataset, path: str) -> None:
    """View Position PA/AP or empty; an empty one must not be contradicted by a description."""
    view = text(ds, "ViewPosition")
    if view in FRONTAL_VIEWS:
        return
    if view:
        raise OutOfScopeError(
            path, "view_out_of_scope", f"View Position (0018,5101) is {view!r}; only frontal (PA/AP) views are scored",
            "send the frontal (PA or AP) image of the study")
    for keyword, name in DESCRIPTION_TAGS:
        lateral = sorted(words(text(ds, keyword)) & LATERAL_TERMS)
        if lateral:
            raise OutOfScopeError(
                path, "view_out_of_scope", f"View Position (0018,5101) is empty and {name} says {lateral[0]!r}",
                "send the frontal (PA or AP) image of the study; if this is frontal, set View Position (0018,5101)")


def check_image(ds: Dataset, path: str, min_side_px: int = MIN_SIDE_PX) -> None:
    """Monochrome, a single frame, and at least ``min_side_px`` on each side."""
    photometric = text(ds, "PhotometricInterpretation")
    if photometric and photometric not in MONOCHROME:
        raise OutOfScopeError(
            path, "not_monochrome", f"Photometric Interpretation (0028,0004) is {photometric!r}, not MONOCHROME1/2",
            "send the original greyscale radiograph, not a colour rendering")
    frames = integer(ds, "NumberOfFrames")
    if frames is not None and frames > 1:
        raise OutOfScopeError(
            path, "multi_frame", f"Number of Frames (0028,0008) is {frames}; one frame per image is scored",
            "send each radiograph as its own single-frame image")
    rows, cols = integer(ds, "Rows"), integer(ds, "Columns")
    check_decoded_size(ds, path)
    if rows and cols and 0 < min(rows, cols) < min_side_px:  # absent or zero: a pixel-format problem
        raise OutOfScopeError(
            path, "image_too_small", f"Rows x Columns (0028,0010)/(0028,0011) is {rows} x {cols}, "
            f"below the minimum of {min_side_px} pixels a side",
            "send the full-resolution image, not a thumbnail")


def check_format(ds: Dataset, path: str, min_side_px: int = MIN_SIDE_PX) -> None:
    """Before decoding: raise ``OutOfScopeError`` unless this is a single-frame monochrome CR/DX image."""
    check_modality(ds, path)
    check_image(ds, path, min_side_px)


def check_anatomy(ds: Dataset, path: str) -> None:
    """After decoding: raise ``OutOfScopeError`` unless the header describes a frontal chest.

    Run after the decode so that a damaged file is reported as such (a person cannot
    read it either), whatever its anatomy.
    """
    check_body_part(ds, path)
    check_view(ds, path)

