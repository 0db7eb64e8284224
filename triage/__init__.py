"""cxr-triage runtime core: DICOM in, calibrated risk and an audited triage decision out.

Never imports torch: a workstation install stays small.
"""

__version__ = "0.1.0"
