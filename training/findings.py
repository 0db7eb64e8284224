"""The canonical list of findings: every dataset adapter maps its labels onto it.

The fourteen NIH ChestX-ray14 findings (Wang et al., CVPR 2017) in their published
order, then "No Finding". Label vectors are float32 in this order, with NaN where a
dataset says nothing about a finding (unknown is not negative). Names are stable
snake_case identifiers (they go into bundles and run folders); display names are for
people. Never reorder or rename: append.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    """One canonical finding: stable ``name`` (snake_case) and ``display`` name."""

    name: str
    display: str


FINDINGS: tuple[Finding, ...] = (
    Finding("atelectasis", "Atelectasis"),
    Finding("cardiomegaly", "Cardiomegaly"),
    Finding("effusion", "Effusion"),
    Finding("infiltration", "Infiltration"),
    Finding("mass", "Mass"),
    Finding("nodule", "Nodule"),
    Finding("pneumonia", "Pneumonia"),
    Finding("pneumothorax", "Pneumothorax"),
    Finding("consolidation", "Consolidation"),
    Finding("edema", "Edema"),
    Finding("emphysema", "Emphysema"),
    Finding("fibrosis", "Fibrosis"),
    Finding("pleural_thickening", "Pleural Thickening"),
    Finding("hernia", "Hernia"),
    Finding("no_finding", "No Finding"),
)
NAMES: tuple[str, ...] = tuple(f.name for f in FINDINGS)
INDEX: dict[str, int] = {name: i for i, name in enumerate(NAMES)}
N_FINDINGS = len(FINDINGS)


def normalize(label: str) -> str:
    """'Pleural Thickening', 'Pleural_Thickening', 'pleural-thickening' -> 'pleural_thickening'."""
    return re.sub(r"[^a-z0-9]+", "_", label.strip().lower()).strip("_")


def index_of(label: str) -> int:
    """Position of a finding given its name or display name (any case/separator); ``KeyError`` names the choices."""
    key = normalize(label)
    if key not in INDEX:
        raise KeyError(f"{label!r} is not a canonical finding; choose one of {', '.join(NAMES)} (training.findings)")
    return INDEX[key]


def is_canonical(label: str) -> bool:
    """True when ``label`` names a canonical finding (any case/separator)."""
    return normalize(label) in INDEX
