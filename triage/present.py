"""How values reach people: risks a clinician cannot misread, text a spreadsheet or a browser cannot run.

One source of truth for every program that shows a risk (batch summary, worklist notes,
workstation log and hooks, dashboard, evaluate report) and for every CSV cell or page
text that comes from a file (tags, paths, UIDs), since a DICOM tag is attacker-chosen text.
"""

from __future__ import annotations

import math

RISK_DIGITS = 4
_RISK_CEILING = 1 - 10 ** -RISK_DIGITS  # 0.9999: above it, 4 digits would round to "1.0000"
_RISK_FLOOR = 10 ** -RISK_DIGITS  # 0.0001: below it, 4 digits would round to "0.0000"
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")
"""Characters that make a spreadsheet (Excel, LibreOffice, Sheets) treat a cell as a formula (OWASP CSV injection),
including the full-width forms some of them accept."""


def format_risk(risk: float | None) -> str:
    """A calibrated risk in [0, 1] as text with 4 decimals that never reads as certainty.

    ``0.99997`` -> ``">0.9999"`` (never ``"1.0000"``), ``0.00003`` -> ``"<0.0001"``, ``None``/NaN -> ``""``.
    """
    if risk is None or not math.isfinite(risk):
        return ""
    if risk > _RISK_CEILING:
        return f">{_RISK_CEILING:.{RISK_DIGITS}f}"
    if 0 < risk < _RISK_FLOOR:
        return f"<{_RISK_FLOOR:.{RISK_DIGITS}f}"
    return f"{risk:.{RISK_DIGITS}f}"


def csv_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: a string starting with ``= + - @`` (or tab/CR/LF) gets a leading
    apostrophe (OWASP's neutralization); numbers and other values are returned unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def csv_row(values: dict[str, object]) -> dict[str, object]:
    """``csv_cell`` over every value of a ``csv.DictWriter`` row."""
    return {key: csv_cell(value) for key, value in values.items()}
