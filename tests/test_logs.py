"""Library warnings reach the log without the values they quote (issue 14 item 18)."""

import subprocess
import sys
from pathlib import Path

import pydicom

from triage.logs import redact

ROOT = Path(__file__).resolve().parents[1]
BIRTH_DATE, AGE = "SMITH^JOHN1930", "ALICE"


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (warning filters and logging as a program starts), logging to stderr."""
    prologue = "import logging, sys; logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)\n"
    return subprocess.run([sys.executable, "-c", prologue + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)


def test_malformed_birth_date_and_age_never_reach_stderr_or_the_log(make_dicom):
    """Read with triage and pydicom, then copied into a new data set (as a report is built): the values are kept,
    and never echoed to stderr or the log by pydicom's value validation."""
    path = make_dicom()
    ds = pydicom.dcmread(path)
    with pydicom.config.disable_value_validation():
        ds.PatientBirthDate, ds.PatientAge = BIRTH_DATE, AGE
        ds.save_as(path)
    result = run_python(
        "from triage.ingest import read_radiograph\n"
        f"r = read_radiograph({str(path)!r})\n"
        "import pydicom\n"
        f"ds = pydicom.dcmread({str(path)!r})\n"
        "copy = pydicom.Dataset(); copy.PatientBirthDate, copy.PatientAge = ds.PatientBirthDate, ds.PatientAge\n"
        f"print(copy.PatientBirthDate == {BIRTH_DATE!r}, copy.PatientAge)\n"
    )
    assert result.stdout.split()[0] == "True"  # the values are kept; only their echo is gone
    assert BIRTH_DATE not in result.stderr and AGE not in result.stderr


def test_python_warnings_go_through_logging_redacted():
    result = run_python(
        "import triage.ingest, warnings\n"
        "warnings.warn(\"Invalid value for VR PN: 'DOE^JANE'\", UserWarning)\n"
        "import pydicom.misc; pydicom.misc.warn_and_log(\"Invalid value for VR LO: b'MRN-0042'\")\n"
    )
    assert "DOE^JANE" not in result.stderr and "MRN-0042" not in result.stderr
    assert "WARNING:py.warnings:" in result.stderr and "Invalid value for VR PN: '…'" in result.stderr
    assert "WARNING:pydicom:Invalid value for VR LO: '…'" in result.stderr


def test_redact_replaces_every_quoted_value():
    assert redact("""a 'x' b "y z" c b'\\x01' d""") == "a '…' b '…' c '…' d"
    assert redact("no values here (0010,0030)") == "no values here (0010,0030)"
