"""Library warnings reach the log as one line, without the values they quote.

pydicom validates every value it reads and warns (and logs) ``Invalid value for VR DA:
'<the patient's birth date>'``: tag values of a hostile or merely odd file would reach a
terminal or the workstation log. ``quiet_libraries`` turns that validation off for reading
(triage reads the tags it needs itself and refuses what it cannot use), sends Python
warnings through ``logging``, and strips quoted values from what pydicom and warnings
log. It is idempotent and runs when ``triage.ingest`` is imported, so every
process that reads a file (the CLI, decode workers, Dask workers, the workstation) has it.
"""

from __future__ import annotations

import logging
import re

import pydicom.config

QUOTED = re.compile(r"""b?'[^']*'|b?"[^"]*\"""")
REDACTED = "'…'"
LIBRARY_LOGGERS = ("py.warnings", "pydicom")


def redact(message: str) -> str:
    """``message`` with every quoted value (``'...'``, ``"..."``, ``b'...'``) replaced by ``'…'``."""
    return QUOTED.sub(REDACTED, message)


class RedactValues(logging.Filter):
    """A filter that rewrites a record's message with ``redact`` (its arguments folded in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        return True


def quiet_libraries() -> None:
    """No value validation on reading (pydicom), warnings through ``logging``, library log lines redacted."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactValues) for f in logger.filters):
            logger.addFilter(RedactValues())
