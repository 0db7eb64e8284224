"""Demo DICOMs from the validation split: ``python -m training.samples --data DIR --out samples/kermany --n 12``.

Each image becomes one CR study (8-bit MONOCHROME2, uncompressed, Body Part Examined
CHEST, View Position AP) with UIDs derived from its md5, so reruns write identical files,
and a LINEAR_EXACT window that reproduces the training input exactly.
Only validation images are used: the demo model never trained on them.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import set_pixel_data
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from .datasets import Record
from .sources import DataSource, labelled_split

ATTRIBUTION = "Kermany et al., Cell 2018, CC BY 4.0"
CITATION = ('Kermany DS, Goldbaum M, Cai W, et al. "Identifying Medical Diagnoses and Treatable Diseases by '
            'Image-Based Deep Learning". Cell 172(5):1122-1131, 2018. doi:10.1016/j.cell.2018.02.010')


def choose_examples(data_dir: str | Path, n: int, seed: int = 0, val_fraction: float = 0.2) -> list[Record]:
    """``n`` validation images (pneumonia split, seeded) of distinct patients, half normal and half pneumonia."""
    split = labelled_split([DataSource(str(data_dir))], ["pneumonia"], val_fraction, seed, log=lambda _: None)
    examples = split.records
    rng = random.Random(seed)
    chosen: list[Record] = []
    for label, count in ((0, n // 2), (1, n - n // 2)):
        pool = [examples[i] for i in split.val_idx if examples[i].label("pneumonia") == label]
        rng.shuffle(pool)
        seen: set[str] = set()
        for ex in pool:
            if ex.patient_id not in seen and len(seen) < count:
                seen.add(ex.patient_id)
                chosen.append(ex)
    return chosen


def to_dicom(pixels: np.ndarray, example: Record) -> Dataset:
    """(rows, cols) uint8 grey -> a CR Image Storage data set, one study, UIDs derived from the md5."""
    uid = lambda part: generate_uid(entropy_srcs=["kermany", example.md5, part])  # noqa: E731
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid("sop")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, uid("sop")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "AP"
    ds.PatientID, ds.PatientName, ds.PatientIdentityRemoved = example.patient_id, "", "YES"
    ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.PatientSex = ds.PatientBirthDate = ""
    ds.StudyDescription = "Pediatric chest X-ray (demo sample)"
    ds.ImageComments = f"Demo image from {ATTRIBUTION}; source {relative_path(example)}"
    ds.ContentCreatorName = "Kermany^DS"
    ds.Manufacturer = "cxr-triage demo (converted from JPEG)"
    ds.ConversionType = "WSD"
    set_pixel_data(ds, np.ascontiguousarray(pixels, dtype=np.uint8), "MONOCHROME2", 8, generate_instance_uid=False)
    # Window Center/Width (0028,1050)/(0028,1051) with VOI LUT Function (0028,1056) LINEAR_EXACT map
    # 0..255 onto [0, 1] as value / 255: the exact unit image the model was trained on from the JPEG.
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = "127.5", "255", "LINEAR_EXACT"
    return ds


def relative_path(example: Record) -> str:
    """The image path as the dataset names it (``images/...``), without the local folder above it."""
    parts = Path(example.path).parts
    return "/".join(parts[parts.index("images"):]) if "images" in parts else Path(example.path).name


def write_samples(data_dir: str | Path, out: str | Path, n: int = 12, seed: int = 0) -> list[tuple[str, Record]]:
    """Write ``n`` validation images as DICOM files plus ``ATTRIBUTION.md``; returns (file name, example)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, ex in enumerate(choose_examples(data_dir, n, seed), start=1):
        with Image.open(ex.path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.uint8)
        name = f"kermany-{k:02d}.dcm"
        to_dicom(pixels, ex).save_as(out / name, enforce_file_format=True)
        written.append((name, ex))
    (out / "ATTRIBUTION.md").write_text(attribution_text(written))
    return written


def attribution_text(written: Sequence[tuple[str, Record]]) -> str:
    """Markdown naming the source, license, changes and the label of each file."""
    rows = "\n".join(f"| `{name}` | {relative_path(ex)} | {ex.extra.get('subtype', '')} | {ex.patient_id} |"
                     for name, ex in written)
    return f"""# Kermany sample images: attribution

These DICOM files are pediatric anterior-posterior chest radiographs from

> {CITATION}

licensed under CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/).

Changes: taken from a public copy resized to 224x224 (aspect squashed) and JPEG-compressed, then
converted here to uncompressed 8-bit MONOCHROME2 CR DICOM by `python -m training.samples`, with new
UIDs, Body Part Examined CHEST, View Position AP, an empty Patient Name and the dataset's own patient
code as Patient ID. Every image is from the **validation** split of the demo model
(`models/pneumonia-demo`): the model was not trained on them. Labels below are the dataset's.

| file | source image | label | dataset patient code |
|---|---|---|---|
{rows}
"""


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the demo samples."""
    parser = argparse.ArgumentParser(prog="python -m training.samples", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/kermany-pneumonia-224", help="kermany-pneumonia-224 folder")
    parser.add_argument("--out", default="samples/kermany")
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="split seed (must match the model's training seed)")
    args = parser.parse_args(argv)
    try:
        written = write_samples(args.data, args.out, args.n, args.seed)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} DICOM files and ATTRIBUTION.md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
