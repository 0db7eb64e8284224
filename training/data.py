"""Kermany labels, a leak-free patient-level split, and images through triage's preprocessing.

Images are read by ``triage.ingest.read_radiograph`` and go through
``triage.preprocess.preprocess`` with the same ``PreprocessSpec`` that the bundle
stores, so training and serving cannot drift apart. Random
augmentation lives in ``training.augment``, never in ``triage``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triage.ingest import read_radiograph
from triage.preprocess import PreprocessSpec, preprocess
from triage.radiograph import Radiograph

from training import splits

FINDINGS = ("pneumonia",)
LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class Example:
    """One row of ``labels.csv``: image path (relative to the data folder) and labels."""

    path: str
    pneumonia: int
    subtype: str
    patient_id: str
    md5: str


def read_labels(data_dir: str | Path) -> list[Example]:
    """Rows of ``<data_dir>/labels.csv`` (columns path, pneumonia, subtype, patient_id, md5)."""
    labels_path = Path(data_dir) / LABELS_FILE
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path}: no labels file. Fix: pass --data the kermany-pneumonia-224 folder")
    with open(labels_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"path", "pneumonia", "subtype", "patient_id", "md5"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{labels_path}: missing columns {sorted(missing)}")
    return [Example(r["path"], int(r["pneumonia"]), r["subtype"], r["patient_id"], r["md5"]) for r in rows]


def patient_groups(examples: Sequence[Example]) -> dict[str, list[int]]:
    """Union-find over patients linked by a shared md5 -> {root patient: row indices} (``training.splits``)."""
    return splits.patient_groups(examples)


def split_patients(examples: Sequence[Example], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded split of row indices into (train, validation) by patient group.

    Patients that share a byte-identical image (same md5) form one group, so no
    patient and no image content is in both splits. About ``val_fraction`` of the
    groups go to validation. Same indices as before ``training.splits`` existed.
    """
    parts = splits.split_by_patient(examples, {"val": val_fraction, "train": 1.0 - val_fraction}, seed)
    return parts["train"], parts["val"]


def leakage(examples: Sequence[Example], train: Sequence[int], val: Sequence[int]) -> dict[str, list[str]]:
    """Patients and md5s found in both splits (both lists empty when the split is clean)."""
    report = splits.leakage(examples, {"train": train, "val": val})
    return {key: sorted(report[key]) for key in ("patient_id", "md5")}


def assert_no_leakage(examples: Sequence[Example], train: Sequence[int], val: Sequence[int]) -> dict[str, list[str]]:
    """Raise ``AssertionError`` naming the leaked patients/md5s; returns the (empty) report."""
    splits.assert_no_leakage(examples, {"train": train, "val": val})
    return leakage(examples, train, val)


def split_summary(examples: Sequence[Example], idx: Sequence[int]) -> dict[str, int]:
    """Counts of images, positives and patients in one split."""
    return {
        "n_images": len(idx),
        "n_pneumonia": sum(examples[i].pneumonia for i in idx),
        "n_patients": len({examples[i].patient_id for i in idx}),
    }


def read_image_radiograph(path: str | Path) -> Radiograph:
    """A PNG/JPEG file -> grey uint8 MONOCHROME2 ``Radiograph`` (dataset None), read by ``triage.ingest``."""
    return read_radiograph(path)


def load_images(data_dir: str | Path, examples: Sequence[Example], spec: PreprocessSpec) -> np.ndarray:
    """Preprocess every image once: -> (N, channels, H, W) float32, exactly the serving input."""
    out = np.empty((len(examples), spec.channels, *spec.size), dtype=np.float32)
    for i, ex in enumerate(examples):
        out[i] = preprocess(read_image_radiograph(Path(data_dir) / ex.path), spec)
    return out


def labels_array(examples: Sequence[Example]) -> np.ndarray:
    """(N, len(FINDINGS)) float32 targets in FINDINGS order."""
    return np.array([[ex.pneumonia] for ex in examples], dtype=np.float32)
