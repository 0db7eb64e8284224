"""Dataset adapters: each reads one source's real layout into ``Record``s over the canonical findings.

Every adapter is a small function ``read_<dataset>(root, ...) -> list[Record]``. A
record's ``labels`` is a float32 vector in ``training.findings.NAMES`` order: 1 present,
0 absent, NaN when the source says nothing about that finding (unknown is not
negative). Sources with uncertain labels (CheXpert, MIMIC-CXR) take a named
``uncertain`` policy: ``"ignore"`` (NaN), ``"zeros"`` or ``"ones"``, or a mapping
{finding: policy} for the per-finding choices of the CheXpert paper (others ignored).

Adapters read label files only (and DICOM headers for RSNA); no pixel is decoded here.
``path`` is the image path joined to the dataset folder, whether or not the image exists
(users may bring labels before images). Splits: ``training.splits``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from training.findings import INDEX, N_FINDINGS, NAMES, is_canonical, normalize
from training.splits import patient_key

UNCERTAINTY_POLICIES: dict[str, float] = {"ignore": math.nan, "zeros": 0.0, "ones": 1.0}
FRONTAL_VIEWS = frozenset({"PA", "AP", "FRONTAL", "AP AXIAL", "PA LLD", "AP LLD", "AP RLD", "PA RLD"})
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm")

# CheXpert labeler columns (CheXpert and MIMIC-CXR-JPG) -> canonical names. Enlarged
# Cardiomediastinum, Lung Opacity, Lung Lesion, Pleural Other, Fracture and Support
# Devices have no canonical counterpart and are dropped.
CHEXPERT_TO_CANONICAL: dict[str, str] = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Pleural Effusion": "effusion",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "No Finding": "no_finding",
}


@dataclass(frozen=True, eq=False)
class Record:
    """One image of one dataset, labelled over the canonical findings.

    ``labels``: (len(NAMES),) float32, NaN = unknown. ``view``: upper case as the source
    writes it (PA, AP, LATERAL, LL, ...) or None; ``sex``: "M", "F" or None; ``age`` in
    years or None; ``md5``: hex digest of the file's bytes where known, else None.
    ``extra``: source-specific details (subtype, follow-up number, official split, boxes).
    """

    path: str
    patient_id: str
    study_id: str
    dataset: str
    labels: np.ndarray
    view: str | None = None
    sex: str | None = None
    age: float | None = None
    md5: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def label(self, name: str) -> float:
        """The label of one canonical finding (NaN when unknown)."""
        return float(self.labels[INDEX[name]])

    @property
    def is_frontal(self) -> bool:
        """True for PA/AP (frontal) views."""
        return self.view in FRONTAL_VIEWS


class DatasetLayoutError(ValueError):
    """A dataset folder or label file does not have the layout its adapter reads."""


# --- small helpers -----------------------------------------------------------------------------


def label_vector(values: Mapping[str, float]) -> np.ndarray:
    """{canonical name: value} -> (len(NAMES),) float32, NaN for findings not given."""
    out = np.full(N_FINDINGS, np.nan, dtype=np.float32)
    for name, value in values.items():
        out[INDEX[name]] = value
    return out


def label_matrix(records: Sequence[Record]) -> np.ndarray:
    """(N, len(NAMES)) float32 label matrix, NaN = unknown."""
    if not records:
        return np.zeros((0, N_FINDINGS), dtype=np.float32)
    return np.stack([r.labels for r in records]).astype(np.float32, copy=False)


def label_counts(records: Sequence[Record]) -> dict[str, dict[str, int]]:
    """{finding: {"positive", "negative", "unknown"}} counts over the records."""
    y = label_matrix(records)
    return {name: {"positive": int((y[:, j] == 1).sum()), "negative": int((y[:, j] == 0).sum()),
                   "unknown": int(np.isnan(y[:, j]).sum())} for j, name in enumerate(NAMES)}


def with_md5(records: Sequence[Record]) -> list[Record]:
    """Records with ``md5`` filled from the image files where it is missing and the file exists."""
    return [replace(r, md5=file_md5(r.path)) if r.md5 is None and os.path.isfile(r.path) else r for r in records]


def file_md5(path: str | Path) -> str:
    """Hex md5 of a file's bytes."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def open_text(path: Path) -> IO[str]:
    """Open a CSV, gzip-compressed when it ends in ``.gz``."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="")
    return open(path, newline="")


def read_rows(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    """CSV rows as dicts; ``DatasetLayoutError`` names missing columns."""
    with open_text(path) as handle:
        reader = csv.DictReader(handle)
        missing = set(required) - set(reader.fieldnames or ())
        if missing:
            raise DatasetLayoutError(f"{path}: missing columns {sorted(missing)}; found {reader.fieldnames}")
        return list(reader)


def find_file(root: Path, patterns: Sequence[str], what: str) -> Path:
    """First file under ``root`` matching one of ``patterns`` (glob); ``FileNotFoundError`` says what to pass."""
    for pattern in patterns:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"{root}: no {what} ({' or '.join(patterns)}). Fix: pass the dataset's top folder")


def parse_sex(text: str | None) -> str | None:
    """'M'/'Male'/'male' -> 'M', 'F'/'Female' -> 'F', anything else -> None."""
    value = (text or "").strip().upper()[:1]
    return value if value in ("M", "F") else None


def parse_age(text: str | None) -> float | None:
    """Years from '58', '58.0', '058Y', '006M' (DICOM AS); None when blank or not plausible (> 120)."""
    if text is not None and text.isdigit():
        return float(text) if int(text) <= 120 else None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*", (text or "").upper())
    if not match:
        return None
    years = float(match.group(1)) / {"": 1, "Y": 1, "M": 12, "W": 52.1775, "D": 365.25}[match.group(2)]
    return years if years <= 120 else None


def parse_view(text: str | None) -> str | None:
    """Upper-cased, stripped view position; None when blank."""
    value = (text or "").strip().upper()
    return value or None


def resolve_policy(uncertain: str | Mapping[str, str]) -> np.ndarray:
    """A named uncertainty policy -> (len(NAMES),) value that replaces -1 per finding (NaN = ignore)."""
    def value(policy: str) -> float:
        if policy not in UNCERTAINTY_POLICIES:
            raise ValueError(f"uncertain={policy!r}: choose one of {sorted(UNCERTAINTY_POLICIES)}")
        return UNCERTAINTY_POLICIES[policy]

    if isinstance(uncertain, str):
        return np.full(N_FINDINGS, value(uncertain), dtype=np.float32)
    out = np.full(N_FINDINGS, np.nan, dtype=np.float32)
    for name, policy in uncertain.items():
        if normalize(name) not in INDEX:
            raise ValueError(f"uncertain policy for {name!r}: not a canonical finding; choose from {', '.join(NAMES)}")
        out[INDEX[normalize(name)]] = value(policy)
    return out


def parse_label(text: str, where: str) -> float:
    """'1', '1.0', '0', '-1.0' -> float; blank -> NaN; anything else -> ``DatasetLayoutError`` naming ``where``."""
    text = text.strip()
    if not text:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        value = math.inf
    if value not in (1.0, 0.0, -1.0):
        raise DatasetLayoutError(f"{where}: label {text!r} is not 1, 0, -1 or blank")
    return value


def chexpert_labels(row: Mapping[str, str], policy: np.ndarray, where: str,
                    columns: Mapping[str, str] = CHEXPERT_TO_CANONICAL) -> np.ndarray:
    """CheXpert-labeler columns of one row -> canonical vector; -1 replaced by ``policy``, blank NaN."""
    out = np.full(N_FINDINGS, np.nan, dtype=np.float32)
    for column, name in columns.items():
        if column in row:
            value = parse_label(row[column] or "", f"{where} column {column!r}")
            j = INDEX[name]
            out[j] = policy[j] if value == -1.0 else value
    return out


def age_band(age: float | None, edges: Sequence[int] = (18, 40, 60, 80)) -> str:
    """Age in years -> '0-17', '18-39', '40-59', '60-79', '80+' (with the default edges) or 'unknown'."""
    if age is None or math.isnan(age):
        return "unknown"
    lower = 0
    for edge in edges:
        if age < edge:
            return f"{lower}-{edge - 1}"
        lower = edge
    return f"{lower}+"


def subgroup_table(records: Sequence[Record], findings: Sequence[str] = NAMES,
                   edges: Sequence[int] = (18, 40, 60, 80)) -> list[dict[str, Any]]:
    """Counts per (sex, age band, view): images, patients, and positives/known per finding.

    Returns one dict per subgroup present, sorted: ``{"sex", "age_band", "view",
    "n_images", "n_patients", "positive": {finding: n}, "known": {finding: n}}``;
    missing metadata shows as "unknown".
    """
    members: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        members[(r.sex or "unknown", age_band(r.age, edges), r.view or "unknown")].append(i)
    y = label_matrix(records)
    columns = [INDEX[name] for name in findings]
    table = []
    for (sex, band, view), idx in sorted(members.items()):
        sub = y[idx][:, columns]
        table.append({
            "sex": sex, "age_band": band, "view": view, "n_images": len(idx),
            "n_patients": len({patient_key(records[i]) for i in idx}),
            "positive": {name: int((sub[:, k] == 1).sum()) for k, name in enumerate(findings)},
            "known": {name: int((~np.isnan(sub[:, k])).sum()) for k, name in enumerate(findings)},
        })
    return table


# --- Kermany -----------------------------------------------------------------------------------


def kermany_patient_id(filename: str) -> str:
    """Kermany file name -> patient id: 'IM-0115-0001.jpeg' -> 'IM-0115', 'NORMAL2-IM-0383-0001.jpeg' ->
    'NORMAL2-IM-0383', 'person1000_virus_1681.jpeg' -> 'P1000' (the convention of the shared labels.csv)."""
    name = Path(filename).name
    if match := re.match(r"((?:NORMAL2-)?IM-\d+)-", name):
        return match.group(1)
    if match := re.match(r"person(\d+)_", name):
        return f"P{match.group(1)}"
    return Path(name).stem


def kermany_record(path: str, is_pneumonia: bool, subtype: str, patient_id: str, md5: str | None,
                   extra: Mapping[str, Any] | None = None) -> Record:
    """Kermany labels: pneumonia 1/0, no_finding its complement (the graders judged only these), rest NaN."""
    labels = label_vector({"pneumonia": float(is_pneumonia), "no_finding": float(not is_pneumonia)})
    return Record(path, patient_id, Path(path).stem, "kermany", labels, view="AP", md5=md5,
                  extra={"subtype": subtype, **(extra or {})})


def read_kermany_labels(root: str | Path) -> list[Record]:
    """The shared copy: ``<root>/labels.csv`` (path, pneumonia, subtype, patient_id, md5) + ``images/``."""
    root = Path(root)
    rows = read_rows(root / "labels.csv", ("path", "pneumonia", "subtype", "patient_id", "md5"))
    return [kermany_record(str(root / r["path"]), r["pneumonia"] == "1", r["subtype"], r["patient_id"], r["md5"])
            for r in rows]


def read_kermany_folders(root: str | Path, *, with_md5: bool = True) -> list[Record]:
    """The published tree: ``[train|val|test/]NORMAL/*.jpeg`` and ``PNEUMONIA/person*_{bacteria,virus}_*.jpeg``.

    Any folder named NORMAL or PNEUMONIA below ``root`` is read; the folder above it
    (train/val/test) is kept as ``extra["source_split"]``. ``__MACOSX`` and hidden files
    are skipped. md5 of each file when ``with_md5``.
    """
    root = Path(root)
    records = []
    for folder in sorted(p for p in root.rglob("*") if p.is_dir() and p.name.upper() in ("NORMAL", "PNEUMONIA")):
        if "__MACOSX" in folder.parts:
            continue
        is_pneumonia = folder.name.upper() == "PNEUMONIA"
        source_split = folder.parent.name if folder.parent != root else ""
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            subtype = next((s for s in ("bacteria", "virus") if s in path.name.lower()), "normal")
            extra = {"source_split": source_split} if source_split else {}
            records.append(kermany_record(str(path), is_pneumonia, subtype, kermany_patient_id(path.name),
                                          file_md5(path) if with_md5 else None, extra))
    if not records:
        raise FileNotFoundError(f"{root}: no NORMAL/ or PNEUMONIA/ folder of images. Fix: pass the chest_xray folder")
    return records


def read_kermany(root: str | Path) -> list[Record]:
    """Kermany pneumonia: ``labels.csv`` when present (the shared data), else the NORMAL/PNEUMONIA tree."""
    root = Path(root)
    return read_kermany_labels(root) if (root / "labels.csv").is_file() else read_kermany_folders(root)


# --- NIH ChestX-ray14 --------------------------------------------------------------------------

NIH_TO_CANONICAL: dict[str, str] = {f: normalize(f) for f in (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")}


def nih_image_index(root: Path) -> dict[str, Path]:
    """Image name -> folder for the Kaggle layout ``images_001/images/*.png`` ... (empty when absent)."""
    index: dict[str, Path] = {}
    for folder in sorted(root.glob("images_*/images")):
        for entry in os.scandir(folder):
            index[entry.name] = folder
    return index


def nih_official_splits(root: Path) -> dict[str, str]:
    """Image name -> 'train_val' / 'test' from ``train_val_list.txt`` / ``test_list.txt`` when present."""
    out: dict[str, str] = {}
    for name, split in (("train_val_list.txt", "train_val"), ("test_list.txt", "test")):
        if (root / name).is_file():
            out.update((line.strip(), split) for line in (root / name).read_text().splitlines() if line.strip())
    return out


def read_nih(root: str | Path, labels_file: str | Path | None = None) -> list[Record]:
    """NIH ChestX-ray14: ``Data_Entry_2017*.csv[.gz]`` + ``images/`` (or Kaggle's ``images_0NN/images/``).

    Columns read: Image Index, Finding Labels ('|'-separated, 'No Finding'), Follow-up #,
    Patient ID, Patient Age, Patient Gender, View Position. All fourteen findings are
    known for every image (1 listed, 0 not); no_finding is 1 only for 'No Finding'.
    ``train_val_list.txt``/``test_list.txt`` in ``root`` go to ``extra["source_split"]``.
    """
    root = Path(root)
    labels_path = Path(labels_file) if labels_file else find_file(
        root, ("Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz"), "NIH label file")
    rows = read_rows(labels_path, ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender",
                                   "View Position"))
    located, official = nih_image_index(root), nih_official_splits(root)
    images_dir = str(root / "images")
    columns = {f: INDEX[canon] for f, canon in NIH_TO_CANONICAL.items()} | {"No Finding": INDEX["no_finding"]}
    template = np.full(N_FINDINGS, np.nan, dtype=np.float32)
    template[list(columns.values())] = 0.0
    records = []
    for n, row in enumerate(rows, start=2):
        name = row["Image Index"].strip()
        labels = template.copy()
        for finding in row["Finding Labels"].split("|"):
            if (j := columns.get(finding.strip())) is None:
                raise DatasetLayoutError(f"{labels_path} line {n}: unknown finding {finding!r} for {name}")
            labels[j] = 1.0
        extra: dict[str, Any] = {"follow_up": row.get("Follow-up #", "").strip()}
        if name in official:
            extra["source_split"] = official[name]
        folder = str(located[name]) if name in located else images_dir
        records.append(Record(os.path.join(folder, name), row["Patient ID"].strip(), name.rsplit(".", 1)[0], "nih",
                              labels, parse_view(row["View Position"]), parse_sex(row["Patient Gender"]),
                              parse_age(row["Patient Age"]), None, extra))
    return records


# --- CheXpert ----------------------------------------------------------------------------------


def chexpert_path(root: Path, csv_path: str) -> Path:
    """CSV paths start with the dataset folder ('CheXpert-v1.0-small/train/...'): resolve inside ``root``,
    whatever the folder is called here."""
    parts = Path(csv_path).parts
    return root / csv_path if parts and parts[0] in ("train", "valid", "test") else root.joinpath(*parts[1:])


def read_chexpert(root: str | Path, split: str = "train",
                  uncertain: str | Mapping[str, str] = "ignore") -> list[Record]:
    """CheXpert: ``<root>/train.csv`` or ``valid.csv`` (``split="both"`` reads both).

    Columns: Path, Sex, Age, Frontal/Lateral, AP/PA, then the labeler's 14 columns
    (1.0, 0.0, -1.0 uncertain, blank unmentioned = NaN). Patient and study come from the
    path (``patientNNNNN/studyN``). View: AP/PA column for frontal images, 'LATERAL' else.
    """
    root = Path(root)
    if split not in ("train", "valid", "both"):
        raise ValueError(f"split={split!r}: choose 'train', 'valid' or 'both'")
    policy = resolve_policy(uncertain)
    records = []
    for part in (("train", "valid") if split == "both" else (split,)):
        csv_file = root / f"{part}.csv"
        if not csv_file.is_file():
            raise FileNotFoundError(f"{csv_file}: absent. Fix: pass the CheXpert folder that holds {part}.csv")
        for n, row in enumerate(read_rows(csv_file, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")), start=2):
            match = re.search(r"(patient\d+)/(study\d+)", row["Path"])
            if not match:
                raise DatasetLayoutError(f"{csv_file} line {n}: no patientNNNNN/studyN in path {row['Path']!r}")
            is_frontal = row["Frontal/Lateral"].strip().lower() == "frontal"
            view = (parse_view(row["AP/PA"]) or "FRONTAL") if is_frontal else "LATERAL"
            patient, study = match.group(1), f"{match.group(1)}/{match.group(2)}"
            labels = chexpert_labels(row, policy, f"{csv_file} line {n}")
            records.append(Record(str(chexpert_path(root, row["Path"])), patient, study, "chexpert", labels, view,
                                  parse_sex(row["Sex"]), parse_age(row["Age"]), None, {"source_split": part}))
    return records


# --- RSNA Pneumonia ----------------------------------------------------------------------------

RSNA_TAGS = ("PatientID", "PatientSex", "PatientAge", "ViewPosition", "StudyInstanceUID")


def dicom_tags(path: Path) -> dict[str, str]:
    """PatientSex (0010,0040), PatientAge (0010,1010), ViewPosition (0018,5101), StudyInstanceUID (0020,000D),
    PatientID (0010,0020) read without pixel data."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True, specific_tags=list(RSNA_TAGS))
    return {tag: str(ds.get(tag, "") or "") for tag in RSNA_TAGS}


def read_rsna_pneumonia(root: str | Path, labels_file: str = "stage_2_train_labels.csv",
                        images_dir: str = "stage_2_train_images", read_headers: bool | None = None) -> list[Record]:
    """RSNA Pneumonia Detection: ``stage_2_train_labels.csv`` (patientId, x, y, width, height, Target), one row
    per box, + ``stage_2_train_images/<patientId>.dcm``.

    One record per patientId (one image each): pneumonia = Target (1 when any box), other
    findings NaN; boxes (x, y, width, height) in ``extra["boxes"]``. With ``read_headers``
    (default: when the images folder exists) sex, age, view and study come from each file's
    DICOM header (no pixels read; about a millisecond a file).
    """
    root = Path(root)
    rows = read_rows(root / labels_file, ("patientId", "x", "y", "width", "height", "Target"))
    targets: dict[str, float] = {}
    boxes: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for n, row in enumerate(rows, start=2):
        image_id = row["patientId"].strip()
        target = parse_label(row["Target"], f"{root / labels_file} line {n} column 'Target'")
        targets[image_id] = max(targets.get(image_id, 0.0), target)
        if row["x"].strip():
            boxes[image_id].append(tuple(float(row[k]) for k in ("x", "y", "width", "height")))
    if read_headers is None:
        read_headers = (root / images_dir).is_dir()
    records = []
    for image_id, target in targets.items():
        path = root / images_dir / f"{image_id}.dcm"
        tags = dicom_tags(path) if read_headers else {}
        records.append(Record(str(path), tags.get("PatientID") or image_id, tags.get("StudyInstanceUID") or image_id,
                              "rsna_pneumonia", label_vector({"pneumonia": target}),
                              parse_view(tags.get("ViewPosition")),
                              parse_sex(tags.get("PatientSex")), parse_age(tags.get("PatientAge")), None,
                              {"boxes": tuple(boxes.get(image_id, ()))}))
    return records


# --- MIMIC-CXR-JPG -----------------------------------------------------------------------------


def read_mimic_cxr(root: str | Path, uncertain: str | Mapping[str, str] = "ignore",
                   labeler: str = "chexpert") -> list[Record]:
    """MIMIC-CXR-JPG 2.0.0: ``mimic-cxr-2.0.0-metadata.csv[.gz]`` (one row per dicom_id) joined on
    (subject_id, study_id) to ``mimic-cxr-2.0.0-<labeler>.csv[.gz]`` (labeler chexpert or negbio).

    Images: ``files/p<first 2 digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg``. View:
    ViewPosition. Studies without a label row are all NaN. Sex and age are not in these
    files (they live in MIMIC-IV). ``mimic-cxr-2.0.0-split.csv[.gz]`` -> ``extra["source_split"]``.
    """
    root = Path(root)
    policy = resolve_policy(uncertain)
    labels_path = find_file(root, (f"mimic-cxr-2.0.0-{labeler}.csv", f"mimic-cxr-2.0.0-{labeler}.csv.gz"),
                            f"MIMIC-CXR {labeler} label file")
    meta_path = find_file(root, ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz"),
                          "MIMIC-CXR metadata file")
    labels: dict[tuple[str, str], np.ndarray] = {}
    for n, row in enumerate(read_rows(labels_path, ("subject_id", "study_id")), start=2):
        labels[(row["subject_id"], row["study_id"])] = chexpert_labels(row, policy, f"{labels_path} line {n}")
    official: dict[str, str] = {}
    split_files = sorted(root.glob("mimic-cxr-2.0.0-split.csv*"))
    if split_files:
        official = {r["dicom_id"]: r["split"] for r in read_rows(split_files[0], ("dicom_id", "split"))}
    unknown = np.full(N_FINDINGS, np.nan, dtype=np.float32)
    records = []
    for row in read_rows(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition")):
        subject, study, dicom_id = row["subject_id"], row["study_id"], row["dicom_id"]
        path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg"
        extra = {"source_split": official[dicom_id]} if dicom_id in official else {}
        records.append(Record(str(path), subject, study, "mimic_cxr", labels.get((subject, study), unknown).copy(),
                              parse_view(row["ViewPosition"]), None, None, None, extra))
    return records


# --- generic CSV and the plain site format ------------------------------------------------------

GENERIC_META_COLUMNS = ("patient_id", "study_id", "view", "sex", "age", "md5")
SITE_LABELS = "labels.csv"
SEX_VALUES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": None, "OTHER": None, "": None}


def strict_sex(text: str | None, where: str) -> str | None:
    """'M'/'Male' -> 'M', 'F'/'Female' -> 'F', 'O'/'Other'/blank -> None; else ``DatasetLayoutError``."""
    value = (text or "").strip().upper()
    if value not in SEX_VALUES:
        raise DatasetLayoutError(f"{where}: sex {text!r} is not M, F, O or blank")
    return SEX_VALUES[value]


def strict_age(text: str | None, where: str) -> float | None:
    """Years ('58', '58.5', '058Y', '006M'); blank -> None; anything else -> ``DatasetLayoutError``."""
    if not (text or "").strip():
        return None
    age = parse_age(text.strip())
    if age is None:
        raise DatasetLayoutError(f"{where}: age {text!r} is not a number of years (0-120) or a DICOM age like 058Y")
    return age


def missing_images(records: Sequence[Record], labels_path: Path) -> None:
    """Raise ``DatasetLayoutError`` naming the CSV lines whose image file does not exist (never drop them)."""
    missing = [(n, r.path) for n, r in enumerate(records, start=2) if not os.path.isfile(r.path)]
    if missing:
        shown = "; ".join(f"line {n}: {path}" for n, path in missing[:5])
        raise DatasetLayoutError(f"{labels_path}: {len(missing)} of {len(records)} images are missing ({shown}"
                                 f"{' ...' if len(missing) > 5 else ''}). Fix: copy the images beside the labels file, "
                                 "correct the paths (relative to its folder), or remove those rows")


def read_generic_csv(csv_file: str | Path, root: str | Path | None = None, *, path_column: str = "path",
                     patient_column: str = "patient_id", dataset: str | None = None,
                     uncertain: str | Mapping[str, str] = "ignore", check_images: bool = False) -> list[Record]:
    """Any CSV with a path column and label columns named after canonical findings.

    Label columns: every column whose name is a canonical finding, by name or display name
    in any case ('Pleural Thickening', 'pleural_thickening'); values 1, 0, -1 (by the
    ``uncertain`` policy) or blank (NaN); findings without a column are NaN. Optional
    columns: ``patient_column`` (without it each image is its own patient, so a patient
    with several images could straddle splits), study_id, view, sex (M/F/O/blank), age
    (years or DICOM AS), md5; any other column is kept in ``Record.extra`` (e.g. Kermany's
    ``subtype``, NIH's ``finding_labels``). Paths are relative to ``root`` (default: the CSV's
    folder). ``dataset``: default the CSV's stem. A bad value raises ``DatasetLayoutError``
    naming file, line and column; with ``check_images`` so does a missing image file.
    """
    csv_file = Path(csv_file)
    root = Path(root) if root is not None else csv_file.parent
    policy = resolve_policy(uncertain)
    rows = read_rows(csv_file, (path_column,))
    if not rows:
        return []
    columns = [c for c in rows[0] if c not in (path_column, patient_column)
               and c not in GENERIC_META_COLUMNS and is_canonical(c)]
    if not columns:
        raise DatasetLayoutError(f"{csv_file}: no label column named after a canonical finding; "
                                 f"name columns after {', '.join(NAMES)}")
    by_finding = Counter(normalize(c) for c in columns)
    if (twice := [f for f, k in by_finding.items() if k > 1]):
        raise DatasetLayoutError(f"{csv_file}: several columns name the same finding(s) {twice}")
    others = [c for c in rows[0] if c not in (path_column, patient_column, *GENERIC_META_COLUMNS, *columns)]
    records, seen = [], {}
    for n, row in enumerate(rows, start=2):
        where = f"{csv_file} line {n}"
        path = (row[path_column] or "").strip()
        if not path:
            raise DatasetLayoutError(f"{where} column {path_column!r}: empty path. Fix: name the image file")
        if path in seen:
            raise DatasetLayoutError(f"{where} column {path_column!r}: {path} is also on line {seen[path]}. "
                                     "Fix: one row per image")
        seen[path] = n
        labels = np.full(N_FINDINGS, np.nan, dtype=np.float32)
        for column in columns:
            j = INDEX[normalize(column)]
            value = parse_label(row[column] or "", f"{where} column {column!r}")
            labels[j] = policy[j] if value == -1.0 else value
        patient = (row.get(patient_column) or "").strip() or path
        records.append(Record(str(root / path), patient, (row.get("study_id") or "").strip() or Path(path).stem,
                              dataset or csv_file.stem.removesuffix(".csv"), labels, parse_view(row.get("view")),
                              strict_sex(row.get("sex"), f"{where} column 'sex'"),
                              strict_age(row.get("age"), f"{where} column 'age'"),
                              (row.get("md5") or "").strip() or None,
                              {c: (row.get(c) or "").strip() for c in others}))
    if check_images:
        missing_images(records, csv_file)
    return records


def read_site(root: str | Path, *, name: str | None = None, labels_file: str = SITE_LABELS,
              uncertain: str | Mapping[str, str] = "ignore", check_images: bool = True) -> list[Record]:
    """The plain site format: a folder with ``labels.csv`` and the images (DICOM, PNG or JPEG).

    ``labels.csv``: ``path`` (relative to the folder), one 0/1/blank column per canonical finding
    (``training.findings``; blank = unknown), optional ``patient_id`` (strongly advised: splits are by
    patient), ``study_id``, ``sex``, ``age``, ``view``, ``md5``; other columns go to ``Record.extra``.
    Both shared folders (kermany-pneumonia-224, nih-pneumonia-512) are in this format. ``name``
    (default: the folder's name) becomes ``Record.dataset``, the source name in splits and reports.
    Every image must exist (``DatasetLayoutError`` lists the missing ones).
    """
    root = Path(root)
    labels_path = root / labels_file
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path}: no labels file. Fix: pass a folder with {labels_file} (columns path, "
                                "one 0/1/blank column per finding, e.g. pneumonia, and patient_id) beside its images")
    return read_generic_csv(labels_path, root, dataset=name or root.resolve().name, uncertain=uncertain,
                            check_images=check_images)


ADAPTERS = {"kermany": read_kermany, "nih": read_nih, "chexpert": read_chexpert, "rsna_pneumonia": read_rsna_pneumonia,
            "mimic_cxr": read_mimic_cxr, "csv": read_generic_csv, "site": read_site}


def read_dataset(kind: str, root: str | Path, **options: Any) -> list[Record]:
    """``read_<kind>(root, **options)`` for a kind named in ``ADAPTERS`` (for configs and command lines)."""
    if kind not in ADAPTERS:
        raise ValueError(f"dataset kind {kind!r}: choose one of {', '.join(ADAPTERS)}")
    return ADAPTERS[kind](root, **options)
