"""A pinned worklist: the same inputs give the same worklist, whatever the code's layout.

The inputs are the bundled samples plus a few synthetic bad files (not DICOM, truncated, empty, over the
size limit); the worklist of a ``cxr-triage score`` run over them is compared with
``tests/data/worklist/golden.csv``, recorded before the decision path was reorganized (issue 16). Paths are
compared relative to the input folder; risks as ``format_risk`` writes them (4 decimals).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import pydicom

from deploy.batch import run_score
from triage.bundle import load_bundle
from triage.ingest import MAX_FILE_BYTES

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "worklist" / "golden.csv"
SAMPLES = ROOT / "samples"
BUNDLE = ROOT / "models" / "pneumonia-demo"


def pinned(path: Path, number: int) -> bytes:
    """The synthetic file at ``path`` with fixed UIDs (the fixture draws new ones), as bytes."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.1016.{number}", f"1.2.826.0.1.3680043.10.1016.{number}.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1016.{number}.1.1"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def golden_inputs(folder: Path, make_dicom) -> None:
    """The pinned input set in ``folder``: every sample DICOM, a synthetic chest, a synthetic lateral and CT, and
    bad files (not DICOM, empty, truncated, over the size limit as a sparse file)."""
    for sample in sorted(SAMPLES.rglob("*.dcm")):
        shutil.copy(sample, folder / f"{sample.parent.name}-{sample.name}")
    chest = pinned(make_dicom("chest.dcm", patient_id="GOLDEN-1"), 1)
    (folder / "synthetic-chest.dcm").write_bytes(chest)
    (folder / "synthetic-lateral.dcm").write_bytes(pinned(make_dicom("lateral.dcm", view="LL"), 2))
    (folder / "synthetic-ct.dcm").write_bytes(pinned(make_dicom("ct.dcm", modality="CT"), 3))
    (folder / "bad-not-dicom.dcm").write_bytes(b"this is not an image\n" * 8)
    (folder / "bad-empty.dcm").write_bytes(b"")
    (folder / "bad-truncated.dcm").write_bytes(chest[: len(chest) - 200])
    with open(folder / "bad-too-large.dcm", "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used, and must never be read whole


def normalized(worklist: Path, folder: Path) -> list[dict[str, str]]:
    """The worklist's rows with paths relative to ``folder`` (in cells and details)."""
    prefix = f"{folder.resolve()}/"
    with open(worklist, newline="") as handle:
        return [{k: v.replace(prefix, "") for k, v in row.items()} for row in csv.DictReader(handle)]


def score_to_rows(tmp_path: Path, make_dicom) -> list[dict[str, str]]:
    folder = tmp_path / "inputs"
    folder.mkdir()
    golden_inputs(folder, make_dicom)
    out = tmp_path / "worklist.csv"
    run_score([str(folder)], load_bundle(BUNDLE), tmp_path / "audit.sqlite", out, flag_rate=0.25, workers=1,
              device="cpu", progress=False)
    return normalized(out, folder)


def test_the_worklist_of_the_pinned_inputs_is_the_recorded_one(tmp_path, make_dicom):
    rows = score_to_rows(tmp_path, make_dicom)
    if not GOLDEN.exists():  # recording, once, on purpose: delete the file and run this test
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        with open(GOLDEN, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        pytest.fail(f"{GOLDEN} recorded; check it and commit it")
    with open(GOLDEN, newline="") as handle:
        assert rows == list(csv.DictReader(handle))

