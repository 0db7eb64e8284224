"""The DICOM Comprehensive SR sent back for each decided study (PS3.3 A.35.3).

The report joins the source study (same Study Instance UID, a new series) and
holds: the source instances (Current Requested Procedure Evidence Sequence
(0040,A375) and IMAGE content items), the study risk and threshold (NUM), the flag,
the model name and version, reason codes for images that could not be scored,
and the statement that it is not for diagnostic use. Codes are private to this
project (coding scheme "99CXRT"), apart from UCUM units.

Identifiers: the report is filed by the PACS into the source patient's study, so it
copies, unchanged from the source header, the Patient module's Type 2 attributes
(Patient's Name, Patient ID, Birth Date, Sex: PACS match and reconcile on them, and a
value that differed from the study's would split or "correct" the patient record), the
General Study module's (Study Date, Time, ID, Accession Number, Referring Physician's
Name: the RIS links the report to the order by Accession Number) and Patient's Age.
Nothing else from the source (no other IDs, address, telephone, institution, operator)
is copied, and the report only goes to the configured destinations and the outbox.
``build_study_report`` refuses (PatientMismatchError) to build one report over instances
whose (0010,0020) Patient ID, (0010,0010) Patient's Name or (0010,0030) Birth Date differ:
such a report would file one patient's result under another's identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from triage.audit import Decision

from .assembler import PatientMismatchError, differing, patient_digests

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SCHEME = "99CXRT"
NOT_FOR_DIAGNOSTIC_USE = ("Not for diagnostic use. Research triage aid that orders the worklist; "
                          "it does not diagnose. The clinician stays in charge.")
_PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate",
                     "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID")


def code(value: str, meaning: str, scheme: str = SCHEME) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _item(value_type: str, name: Dataset, relationship: str = "CONTAINS") -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType, item.ConceptNameCodeSequence = relationship, value_type, [name]
    return item


def text_item(value: str, meaning: str, concept: str) -> Dataset:
    item = _item("TEXT", code(concept, meaning))
    item.TextValue = value[:1024]
    return item


def num_item(value: float, meaning: str, concept: str) -> Dataset:
    item = _item("NUM", code(concept, meaning))
    measured = Dataset()
    measured.NumericValue = f"{value:.6f}"[:16]
    measured.MeasurementUnitsCodeSequence = [code("1", "no units", "UCUM")]
    item.MeasuredValueSequence = [measured]
    return item


def image_item(sop_class_uid: str, sop_uid: str) -> Dataset:
    item = _item("IMAGE", code("SRC", "Source image"))
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class_uid, sop_uid
    item.ReferencedSOPSequence = [ref]
    return item


def _evidence(study_uid: str, instances: Sequence[tuple[str, str, str]]) -> DicomSequence:
    """(series UID, SOP class UID, SOP instance UID) triples -> Hierarchical SOP Instance Reference items."""
    by_series: dict[str, list[Dataset]] = {}
    for series_uid, sop_class, sop_uid in instances:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_uid
        by_series.setdefault(series_uid, []).append(ref)
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = []
    for series_uid, refs in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID, series.ReferencedSOPSequence = series_uid, refs
        study.ReferencedSeriesSequence.append(series)
    return DicomSequence([study])


def build_study_report(decisions: Sequence[Decision], headers: Sequence[Dataset], now: datetime | None = None) -> Dataset:
    """The SR for one study from the headers of its source instances (the first gives the Patient and
    General Study modules); PatientMismatchError when they do not all share one patient (see ``check_one_patient``)."""
    check_one_patient(headers)
    instances = dict.fromkeys((str(h.get("SeriesInstanceUID", "")), str(h.SOPClassUID), str(h.SOPInstanceUID))
                              for h in headers)  # two stored versions of one instance are referenced once
    return build_report(decisions, headers[0], list(instances), now)


def check_one_patient(headers: Sequence[Dataset]) -> None:
    """PatientMismatchError naming the first instance whose patient differs from the first header's."""
    expected = patient_digests(headers[0])
    for header in headers[1:]:
        mismatched = differing(expected, patient_digests(header))
        if mismatched:
            raise PatientMismatchError(str(headers[0].get("StudyInstanceUID", "")), str(header.get("SOPInstanceUID", "")),
                                       mismatched)


def build_report(decisions: Sequence[Decision], source: Dataset, instances: Sequence[tuple[str, str, str]],
                 now: datetime | None = None) -> Dataset:
    """One study's decisions (finalized, same study) -> a Comprehensive SR data set with file meta.

    Prefer ``build_study_report``, which checks that the instances share one patient.
    ``source``: any source instance's header (patient and study modules are copied from it);
    ``instances``: (series UID, SOP class UID, SOP instance UID) of the source images.
    """
    now = now or datetime.now()
    ds = Dataset()
    for keyword in _PATIENT_KEYWORDS:
        if keyword in source:
            setattr(ds, keyword, source.data_element(keyword).value)
    ds.SOPClassUID, ds.SOPInstanceUID = COMPREHENSIVE_SR, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = str(source.StudyInstanceUID), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 9901, 1
    ds.Manufacturer, ds.SeriesDescription = "cxr-triage", "CXR triage (not for diagnostic use)"
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [code("CXRT-REPORT", "Chest X-ray triage report")]
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(ds.StudyInstanceUID, instances)
    ds.ContentSequence = content_items(decisions, instances)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID, ds.file_meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    return ds


def content_items(decisions: Sequence[Decision], instances: Sequence[tuple[str, str, str]]) -> list[Dataset]:
    """The report's content tree below the root container."""
    first = decisions[0]
    items = [text_item(NOT_FOR_DIAGNOSTIC_USE, "Disclaimer", "CXRT-DISCLAIMER")]
    items.append(text_item("FLAGGED: read first" if first.flagged else "not flagged", "Triage flag", "CXRT-FLAG"))
    if first.study_risk is not None:
        items.append(num_item(first.study_risk, f"Study risk of {first.finding}", "CXRT-RISK"))
    if first.threshold is not None:
        items.append(num_item(first.threshold, "Flag threshold", "CXRT-THRESHOLD"))
    items.append(text_item(first.policy or "none", "Decision policy", "CXRT-POLICY"))
    items.append(text_item(f"{first.bundle_name} {first.bundle_version}", "Model name and version", "CXRT-MODEL"))
    reasons = sorted({d.reason for d in decisions if d.reason})
    items.append(text_item(", ".join(reasons) or "none", "Reason codes", "CXRT-REASONS"))
    items += [image_item(sop_class, sop_uid) for _, sop_class, sop_uid in instances]
    return items
