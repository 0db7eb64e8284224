"""Risks shown to people never read as certainty; CSV cells from files never run as formulas."""

import csv
import io

import pytest

from triage.present import csv_cell, csv_row, format_risk


@pytest.mark.parametrize("risk, shown", [
    (0.99997, ">0.9999"), (0.99999, ">0.9999"), (1.0, ">0.9999"), (0.9999, "0.9999"), (0.5, "0.5000"),
    (0.00003, "<0.0001"), (0.0, "0.0000"), (0.0001, "0.0001"), (None, ""), (float("nan"), ""),
])
def test_format_risk_never_rounds_to_certainty(risk, shown):
    assert format_risk(risk) == shown


@pytest.mark.parametrize("value", ["=HYPERLINK(\"http://x\",\"y\")", "=1+1", "@SUM(A1:A2)", "+1", "-2+3", "\t=1",
                                   "\r=1", "\uff1d1+1"])
def test_formula_cells_are_neutralized(value):
    assert csv_cell(value) == "'" + value


@pytest.mark.parametrize("value", ["1.2.840.10008.1", "/data/x.dcm", "", 0.25, -0.5, 3, None])
def test_other_cells_are_unchanged(value):
    assert csv_cell(value) == value


def test_csv_row_round_trips_as_text():
    out = io.StringIO()
    writer = csv.DictWriter(out, ["path", "risk"])
    writer.writerow(csv_row({"path": "=cmd|' /C calc'!A0", "risk": 0.25}))
    assert out.getvalue().startswith("'=cmd")
