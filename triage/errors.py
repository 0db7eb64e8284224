"""One family of errors for the whole project.

Bad-input errors subclass ``ValueError`` and carry the file, a machine-readable
``reason`` code (recorded in the audit store) and the fix a person should apply.
A study that raises one is still recorded and routed to human review.
"""

from __future__ import annotations

from typing import Any


class TriageError(Exception):
    """Base of every error this project raises on purpose."""


class BadInputError(TriageError, ValueError):
    """An input file that cannot be scored.

    ``reason`` is a short snake_case code from ``REASONS``; ``detail`` says what was
    found; ``fix`` says what a person can do about it; ``meta`` carries the image's
    UIDs and tags when they could be read, so the record still names the study.
    """

    def __init__(self, path: str, reason: str, detail: str, fix: str, meta: Any = None) -> None:
        if reason not in REASONS:
            raise KeyError(f"BadInputError: unknown reason code {reason!r}; add it to triage.errors.REASONS")
        self.path, self.reason, self.detail, self.fix = str(path), reason, detail, fix
        self.meta = meta  # triage.radiograph.ImageMeta when the header could be read
        super().__init__(f"{self.path}: {reason}: {detail}. Fix: {fix}")

    def __reduce__(self):  # pickle across worker processes with every field
        return (type(self), (self.path, self.reason, self.detail, self.fix, self.meta))


class OutOfScopeError(BadInputError):
    """A readable image that the model was not made for (wrong modality, anatomy, view...)."""


class BundleError(TriageError, ValueError):
    """A model bundle that is missing, malformed or fails its integrity check."""


class AuditError(TriageError, RuntimeError):
    """The audit store is unwritable, or its hash chain does not verify."""


# Every reason code that can appear in an audit record, with what it means.
REASONS: dict[str, str] = {
    "file_unreadable": "the file could not be opened or read (missing, permissions, I/O error)",
    "not_dicom": "not a DICOM file nor a PNG/JPEG image",
    "unreadable_image": "a PNG/JPEG file that could not be decoded",
    "truncated": "the file ends before its pixel data does",
    "no_pixel_data": "the DICOM has no Pixel Data (7FE0,0010)",
    "decode_failed": "no installed codec could decode the pixel data",
    "unsupported_pixel_format": "pixel attributes the decoder cannot interpret",
    "not_monochrome": "colour image (Photometric Interpretation is not MONOCHROME1/2)",
    "multi_frame": "more than one frame (Number of Frames > 1)",
    "modality_out_of_scope": "Modality (0008,0060) is not CR or DX",
    "body_part_out_of_scope": "Body Part Examined (0018,0015) or the descriptions name non-chest anatomy",
    "view_out_of_scope": "not a frontal (PA/AP) view: View Position (0018,5101) or a description says so, or, with no "
                         "view in the header, the input gate judges the image a chest radiograph in another view "
                         "(a lateral)",
    "too_large": "file or decoded pixel data over the size limit (a decompression bomb, or not a radiograph)",
    "image_too_small": "fewer rows or columns than the minimum (64 px by default): a thumbnail, not a radiograph",
    "malformed_file": "reading the file raised an unexpected error (e.g. sequences nested too deep: RecursionError; "
                      "more memory than available: MemoryError): a damaged or crafted file",
    "inference_failed": "ONNX Runtime failed on this image",
    "decode_timeout": "decoding took longer than the per-file decode timeout (default 60 s), so its worker process was "
                      "stopped; fix: re-export the study uncompressed, or raise --decode-timeout if the file is valid",
    "invalid_uid": "Study Instance UID (0020,000D), Series Instance UID (0020,000E) or SOP Instance UID (0008,0018) "
                   "is not a valid DICOM UID (PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 "
                   "characters); the record carries UIDs derived from the file's sha256 instead",
    "out_of_distribution": "the input gate judges the image unlike the frontal chest radiographs the model was trained "
                           "on (not a human chest radiograph, or a device or population the training data lacks)",
}
