"""Which codec families a bundle may decode at reduced resolution (the manifest's ``decode`` section).

A reduced decode (``triage.decode``) is not bit-identical to a resized full decode, and how
much that moves the risk depends on the model and its calibration. So it is measured, on real
compressed chest radiographs, whenever a bundle's risks are set: by ``export`` and by
``calibrate``. A family is enabled only if no checked file moved by more than 0.01.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triage.bundle import load_bundle
from triage.decode import OVERSAMPLE, RISK_TOLERANCE, codec_family, decode_size
from triage.errors import BadInputError
from triage.inference import calibrated_risk, load_model
from triage.ingest import read_radiograph
from triage.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"
REDUCED_DECODE_FILES = ("samples/dicom/*.dcm",)


def relative(path: Path) -> str:
    """``path`` relative to the checkout (``../shared/...`` beside it), else as given."""
    resolved = Path(path).resolve()
    for root, prefix in ((REPO, ""), (REPO.parent, "../")):
        if resolved.is_relative_to(root):
            return prefix + str(resolved.relative_to(root))
    return str(path)


def reduced_decode_files() -> list[Path]:
    """Real compressed chest radiographs for the reduced-decode check: the samples and, when the shared data is
    beside the checkout, its chest files (JPEG baseline, JPEG 2000, JPEG-LS). A codec family with no checked
    file stays at full decode."""
    shared = sorted((SHARED_DICOM / "chest").glob("*.dcm")) if SHARED_DICOM.is_dir() else []
    repo = sorted(p for pattern in REDUCED_DECODE_FILES for p in REPO.glob(pattern) if p.is_file())
    return repo + shared


def reduced_decode_diffs(bundle_dir: Path, files: Sequence[Path]) -> dict[str, list[tuple[str, float]]]:
    """Per codec family: (file, |risk of a reduced decode - risk of a full decode|) for each file the
    reduced path changes. Files that are not in scope or not reducible are skipped."""
    model = load_model(load_bundle(bundle_dir), device="cpu")
    spec, column = model.bundle.preprocessing, model.bundle.findings.index(model.bundle.triage_finding)
    diffs: dict[str, list[tuple[str, float]]] = {}
    for path in files:
        try:
            full, reduced = read_radiograph(path), read_radiograph(path, reduce_to=decode_size(spec))
        except BadInputError:
            continue
        if reduced.pixels.shape == full.pixels.shape:
            continue
        x = np.stack([preprocess(full, spec), preprocess(reduced, spec)])
        risks = calibrated_risk(model.run(x, cams=False, features=False).logits, model.temperatures,
                                model.biases)[:, column]
        diffs.setdefault(codec_family(full.dataset), []).append((relative(path), abs(float(risks[1] - risks[0]))))
    return diffs


def decode_section(diffs: dict[str, list[tuple[str, float]]], tolerance: float = RISK_TOLERANCE) -> dict[str, Any]:
    """The manifest's ``decode`` section: reduce a codec family only when no checked file of it moved by more
    than ``tolerance``; a family with no checked file stays at full decode."""
    checked = {family: {"files": [name for name, _ in rows], "max_abs_risk_diff": round(max(d for _, d in rows), 6)}
               for family, rows in sorted(diffs.items())}
    return {"reduced": [family for family, c in checked.items() if c["max_abs_risk_diff"] <= tolerance],
            "oversample": OVERSAMPLE, "tolerance": tolerance, "checked": checked}
