"""The heatmap Secondary Capture (PS3.3 A.8.1): one per scored image, built with highdicom.

The triage finding's class activation map over the image (``triage.heatmap.overlay``) as
RGB, with "NOT FOR DIAGNOSTIC USE" burned into the pixels ((0028,0301) Burned In
Annotation YES), in a new series of the source study. Patient and study attributes as in
the SR (``sr.reference_header``); (0008,2112) Source Image Sequence names the image.
"""

from __future__ import annotations

import numpy as np
from highdicom import ContributingEquipment
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from triage.heatmap import overlay

from .sr import MANUFACTURER, names_kept_out_of_logs, reference_header, set_device_uid

SC_SERIES_NUMBER = 9902
LEGEND = "NOT FOR DIAGNOSTIC USE"
_ORIENTATIONS = set("AFHLPR")


def burn_legend(rgb: np.ndarray, text: str = LEGEND) -> np.ndarray:
    """uint8 (H, W, 3) -> a copy with ``text`` in white on a black band across the top."""
    image = Image.fromarray(rgb)
    size = max(10, rgb.shape[0] // 30)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((size // 2, size // 2), text, font=font)
    draw.rectangle((0, 0, rgb.shape[1], bottom + size // 2), fill=(0, 0, 0))
    draw.text((size // 2, size // 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(image, dtype=np.uint8)


def patient_orientation(header: Dataset) -> tuple[str, str] | None:
    """The source's (0020,0020) Patient Orientation when it is two valid values, else None."""
    values = list(header.get("PatientOrientation") or [])
    return (values[0], values[1]) if len(values) == 2 and all(set(v) <= _ORIENTATIONS and v for v in values) else None


def build_heatmap(header: Dataset, identity: Dataset, display: np.ndarray, cam: np.ndarray, series_uid: str,
                  instance_number: int, bundle_name: str, bundle_version: str, bundle_sha256: str) -> SCImage:
    """The SC for one scored image.

    ``header``: the image's header (UIDs, orientation); ``identity``: the study's first header (patient and
    study attributes, as in the SR); ``display``: uint8 (H, W) image; ``cam``: (h, w) float32 map; ``series_uid``:
    the heatmap series of this study (one per study).
    """
    kept = reference_header(header, identity)
    orientation = patient_orientation(header)
    equipment = ContributingEquipment(MANUFACTURER, codes.DCM.ProcessingEquipment, manufacturer_model_name=bundle_name,
                                      software_versions=bundle_version,
                                      contribution_description="heatmap of the AI triage (not for diagnostic use)")
    with names_kept_out_of_logs():
        sc = SCImage(
            pixel_array=burn_legend(overlay(display, cam)), photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", study_instance_uid=str(kept.StudyInstanceUID), series_instance_uid=series_uid,
            series_number=SC_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=instance_number,
            manufacturer=MANUFACTURER, patient_id=kept.PatientID, patient_name=kept.PatientName,
            patient_birth_date=kept.PatientBirthDate, patient_sex=kept.PatientSex,
            accession_number=kept.AccessionNumber,
            study_id=kept.StudyID, study_date=kept.StudyDate, study_time=kept.StudyTime,
            referring_physician_name=kept.ReferringPhysicianName, patient_orientation=orientation or ("L", "F"),
            contributing_equipment=[equipment], specific_character_set=kept.get("SpecificCharacterSet"))
    if orientation is None:
        sc.PatientOrientation = None  # Type 2C: empty rather than guessed when the source does not say
    sc.Laterality = None  # Type 2C (General Series): empty, the chest is not a paired body part
    if "PatientAge" in kept:
        sc.PatientAge = kept.PatientAge
    set_device_uid(sc, bundle_sha256)
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "CXR triage heatmap (not for diagnostic use)"
    sc.DerivationDescription = f"class activation map of {bundle_name} {bundle_version} over the image"[:1024]
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
    sc.SourceImageSequence = [source]
    return sc
