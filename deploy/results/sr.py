"""The result report: a TID 1500 Measurement Report in a Comprehensive 3D SR (PS3.3 A.35.13), built with highdicom.

The shape the IHE AI Results (AIR) profile expects: one Measurement Group (TID 1501) with
the triage finding as a qualitative evaluation (flagged / not flagged / not assessable, and
a coded reason for every image sent to a person), the calibrated study risk and the
threshold in force as measurements (UCUM ``{probability}``), the algorithm identification
(TID 4019: bundle name, version, and its sha256 as a parameter), the source images; the
Contributing Equipment Sequence (0018,A001) names the software as Processing Equipment
with a (0018,1002) Device UID derived from the bundle sha256, so it changes whenever the
model does. The codes are listed in deploy/workstation/README.md ("Result objects").

Identifiers: the report is filed by the PACS into the source patient's study, so it
copies, unchanged from the source header, the Patient module's Type 2 attributes
(Patient's Name, Patient ID, Birth Date, Sex: PACS match and reconcile on them), the
General Study module's (Study Date, Time, ID, Accession Number, Referring Physician's
Name: the RIS links the report to the order by Accession Number), Patient's Age and the
Study Instance UID. Nothing else (no other IDs, address, institution, operator) reaches
highdicom, which copies whatever Patient and Study module attributes its evidence holds.
``build_study_report`` refuses (PatientMismatchError) instances of more than one patient.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import highdicom as hd
from highdicom.sr import (AlgorithmIdentification, CodedConcept, Comprehensive3DSR, DeviceObserverIdentifyingAttributes,
                          Measurement, MeasurementReport, MeasurementsAndQualitativeEvaluations, ObservationContext,
                          ObserverContext, QualitativeEvaluation, SourceImageForMeasurementGroup, TextContentItem,
                          TrackingIdentifier)
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from triage.audit import Decision
from triage.errors import REASONS

from ..workstation.assembler import PatientMismatchError, differing, patient_digests

MANUFACTURER = "cxr-triage"
SCHEME = "99CXRT"  # private coding scheme: only concepts no standard scheme has (README "Result objects")
SR_SERIES_NUMBER = 9901
NOT_FOR_DIAGNOSTIC_USE = ("Not for diagnostic use. Research triage aid that orders the worklist; "
                          "it does not diagnose. The clinician stays in charge.")
COPIED_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate",
                   "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID")
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "AccessionNumber", "ReferringPhysicianName", "StudyID")
_REFERENCE_KEYWORDS = ("SpecificCharacterSet", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")

PLAIN_CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")
TRIAGE_FLAG = CodedConcept("CXRT-FLAG", SCHEME, "Worklist triage flag")
HUMAN_REVIEW_REASON = CodedConcept("CXRT-REASON", SCHEME, "Reason for human review")
FLAGGED = CodedConcept("373066001", "SCT", "Yes")
NOT_FLAGGED = CodedConcept("373067005", "SCT", "No")
NOT_ASSESSED = CodedConcept("373121007", "SCT", "Not Evaluated")
RISK = CodedConcept("122157", "DCM", "Probability")
THRESHOLD = CodedConcept("122411", "DCM", "Threshold Value")
PROBABILITY_UNIT = CodedConcept("{probability}", "UCUM", "probability")


@contextmanager
def names_kept_out_of_logs() -> Iterator[None]:
    """Silence highdicom's warning about a one-component person name: it quotes the patient's name, and Python
    warnings reach our logs (``triage.logs``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*person name", category=UserWarning)
        yield


def device_uid(bundle_sha256: str) -> str:
    """(0018,1002) Device UID of the model: ``2.25.`` + the first 128 bits of its sha256 (a UUID-derived UID,
    PS3.5 B.2), so the same bundle always gets the same UID and another bundle another one."""
    return f"2.25.{int(bundle_sha256[:32] or '0', 16)}"


def finding_code(finding: str) -> CodedConcept:
    """The bundle's triage finding as a private code (bundles name their own findings)."""
    return CodedConcept(finding or "unknown", SCHEME, (finding or "unknown finding")[:64])


def reason_code(reason: str) -> CodedConcept:
    """A ``triage.errors.REASONS`` code as a private code; its meaning is the reason's text (64 characters)."""
    return CodedConcept(reason, SCHEME, REASONS.get(reason, reason)[:64])


def check_one_patient(headers: Sequence[Dataset]) -> None:
    """PatientMismatchError naming the first instance whose patient differs from the first header's."""
    expected = patient_digests(headers[0])
    for header in headers[1:]:
        mismatched = differing(expected, patient_digests(header))
        if mismatched:
            raise PatientMismatchError(str(headers[0].get("StudyInstanceUID", "")),
                                       str(header.get("SOPInstanceUID", "")), mismatched)


def reference_header(header: Dataset, identity: Dataset | None = None) -> Dataset:
    """The attributes a result object may take from a source instance: its UIDs, and the copied patient and study
    attributes of ``identity`` (default: ``header``), Type 2 ones empty when absent."""
    identity = header if identity is None else identity
    kept = Dataset()
    for keyword in _REFERENCE_KEYWORDS:
        if keyword in header:
            kept[keyword] = header.data_element(keyword)
    for keyword in COPIED_KEYWORDS:
        if keyword in identity:
            kept[keyword] = identity.data_element(keyword)
        elif keyword in _TYPE2:
            setattr(kept, keyword, None)
    return kept


def unique_instances(headers: Sequence[Dataset]) -> list[Dataset]:
    """``headers`` without repeats of one SOP Instance UID (two stored versions are referenced once)."""
    return list({str(h.SOPInstanceUID): h for h in reversed(headers)}.values())[::-1]


def build_study_report(decisions: Sequence[Decision], headers: Sequence[Dataset]) -> Comprehensive3DSR:
    """The SR for one study's final decisions from the headers of its source instances (the first gives the
    patient and study attributes); PatientMismatchError when they are not all of one patient."""
    check_one_patient(headers)
    evidence = [reference_header(h, headers[0]) for h in unique_instances(headers)]
    first = decisions[0]
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=first.bundle_name or "unknown", software_versions=first.bundle_version or "unknown",
        contribution_description="AI triage of the study (not for diagnostic use)")
    with names_kept_out_of_logs():
        sr = Comprehensive3DSR(
            evidence=evidence, content=measurement_report(decisions, evidence),
            series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=True, is_verified=False,
            series_description="CXR triage (not for diagnostic use)", contributing_equipment=[equipment])
    set_device_uid(sr, first.bundle_sha256)
    return sr


def set_device_uid(dataset: Dataset, bundle_sha256: str) -> None:
    """(0018,1002) Device UID on our Contributing Equipment item (highdicom appends one naming itself; highdicom's
    ContributingEquipment takes no Device UID)."""
    for item in dataset.ContributingEquipmentSequence:
        if item.Manufacturer == MANUFACTURER:
            item.DeviceUID = device_uid(bundle_sha256)


def measurement_report(decisions: Sequence[Decision], evidence: Sequence[Dataset]) -> MeasurementReport:
    """TID 1500: observation context (the model as device observer), procedure, one TID 1501 group, and the
    not-for-diagnostic-use statement as a (DCM 121106) Comment at the root."""
    first = decisions[0]
    observer = ObserverContext(codes.DCM.Device, DeviceObserverIdentifyingAttributes(
        uid=device_uid(first.bundle_sha256), name=first.bundle_name or "unknown", manufacturer_name=MANUFACTURER,
        model_name=f"{first.bundle_name} {first.bundle_version}".strip() or "unknown"))
    report = MeasurementReport(ObservationContext(observer_device_context=observer), PLAIN_CHEST_XRAY,
                               [triage_group(decisions, evidence)], title=codes.cid7021.ImagingMeasurementReport)
    report[0].ContentSequence.append(TextContentItem(codes.DCM.Comment, NOT_FOR_DIAGNOSTIC_USE, "CONTAINS"))
    return report


def triage_group(decisions: Sequence[Decision], evidence: Sequence[Dataset]) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 for the study: algorithm, finding, flag, reasons, risk and threshold, source images."""
    first = decisions[0]
    parameters = [f"sha256={first.bundle_sha256}", f"policy={first.policy or 'none'}"]
    algorithm = AlgorithmIdentification(first.bundle_name or "unknown", first.bundle_version or "unknown",
                                        parameters=parameters, manufacturer=MANUFACTURER)
    assessed = first.study_risk is not None
    evaluations = [QualitativeEvaluation(TRIAGE_FLAG, (FLAGGED if first.flagged else NOT_FLAGGED) if assessed
                                         else NOT_ASSESSED)]
    evaluations += [QualitativeEvaluation(HUMAN_REVIEW_REASON, reason_code(r))
                    for r in sorted({d.reason for d in decisions if d.reason})]
    values = [(RISK, first.study_risk), (THRESHOLD, first.threshold)]
    measurements = [Measurement(name, float(value), PROBABILITY_UNIT, algorithm_id=algorithm)
                    for name, value in values if value is not None]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(identifier=f"cxr-triage {first.finding or 'study'}"),
        finding_type=finding_code(first.finding), algorithm_id=algorithm, measurements=measurements or None,
        qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in evidence])
