"""training.findings, training.datasets, training.splits, training.losses: each adapter on a tiny tree in its
real layout, the real NIH label file, patient splits and the leakage report, masked BCE."""

from __future__ import annotations

import csv
import gzip
import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import build_dataset
from training import datasets as ds
from training import findings, splits

NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                   "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                   "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
MIMIC_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                "Pneumothorax", "Support Devices"]
MIMIC_META = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
              "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
              "PatientOrientationCodeSequence_CodeMeaning"]
# Published per-finding image counts of NIH ChestX-ray14 (Wang et al. 2017; unchanged in the v2020 file).
NIH_COUNTS = {"atelectasis": 11559, "cardiomegaly": 2776, "effusion": 13317, "infiltration": 19894, "mass": 5782,
              "nodule": 6331, "pneumonia": 1431, "pneumothorax": 5302, "consolidation": 4667, "edema": 2303,
              "emphysema": 2516, "fibrosis": 1686, "pleural_thickening": 3385, "hernia": 227, "no_finding": 60361}


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    """Write a CSV (gzip when the name ends in .gz), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wt", newline="") if path.suffix == ".gz" else open(path, "w", newline="")) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def touch(path: Path, content: bytes) -> Path:
    """Write bytes, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def by_name(record: ds.Record) -> dict[str, float]:
    """Known labels of a record as {finding: value}."""
    return {n: record.label(n) for n in findings.NAMES if not math.isnan(record.label(n))}


# --- canonical findings ------------------------------------------------------------------------


def test_canonical_list_is_the_nih_fourteen_then_no_finding():
    assert findings.N_FINDINGS == 15 and findings.NAMES[-1] == "no_finding"
    assert [f.display for f in findings.FINDINGS[:14]] == [
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
        "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural Thickening", "Hernia"]
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", n) for n in findings.NAMES) and len(set(findings.NAMES)) == 15
    assert findings.index_of("Pleural_Thickening") == findings.index_of("pleural thickening") == 12
    with pytest.raises(KeyError, match="not a canonical finding; choose one of atelectasis"):
        findings.index_of("Fracture")


# --- Kermany -----------------------------------------------------------------------------------


def test_kermany_labels_csv_layout(tmp_path):
    write_csv(tmp_path / "labels.csv", ["path", "pneumonia", "subtype", "patient_id", "md5"], [
        ["images/NORMAL/IM-0115-0001.jpeg", 0, "normal", "IM-0115", "aaa"],
        ["images/PNEUMONIA/person1_virus_6.jpeg", 1, "virus", "P1", "bbb"]])
    normal, sick = ds.read_kermany(tmp_path)
    assert by_name(normal) == {"pneumonia": 0.0, "no_finding": 1.0}
    assert by_name(sick) == {"pneumonia": 1.0, "no_finding": 0.0}
    assert (sick.patient_id, sick.md5, sick.extra["subtype"], sick.dataset) == ("P1", "bbb", "virus", "kermany")
    assert sick.path == str(tmp_path / "images/PNEUMONIA/person1_virus_6.jpeg")


def test_kermany_folder_tree_layout(tmp_path):
    root = tmp_path / "chest_xray"
    touch(root / "train/NORMAL/IM-0115-0001.jpeg", b"a")
    touch(root / "train/NORMAL/NORMAL2-IM-0383-0001.jpeg", b"b")
    touch(root / "train/PNEUMONIA/person1_bacteria_1.jpeg", b"c")
    touch(root / "train/PNEUMONIA/person1_virus_6.jpeg", b"d")
    touch(root / "test/PNEUMONIA/person7_virus_9.jpeg", b"a")  # byte-identical to IM-0115-0001
    touch(root / "train/NORMAL/.DS_Store", b"x")
    touch(tmp_path / "chest_xray/__MACOSX/train/NORMAL/IM-0115-0001.jpeg", b"junk")
    records = ds.read_kermany(root)
    assert sorted((Path(r.path).name, r.patient_id, r.extra["subtype"], r.extra["source_split"]) for r in records) == [
        ("IM-0115-0001.jpeg", "IM-0115", "normal", "train"),
        ("NORMAL2-IM-0383-0001.jpeg", "NORMAL2-IM-0383", "normal", "train"),
        ("person1_bacteria_1.jpeg", "P1", "bacteria", "train"), ("person1_virus_6.jpeg", "P1", "virus", "train"),
        ("person7_virus_9.jpeg", "P7", "virus", "test")]
    assert {r.md5 for r in records} == {hashlib.md5(c).hexdigest() for c in (b"a", b"b", b"c", b"d")}
    groups = splits.patient_groups(records)
    assert sorted(sorted(records[i].patient_id for i in g) for g in groups.values()) == [
        ["IM-0115", "P7"], ["NORMAL2-IM-0383"], ["P1", "P1"]]
    with pytest.raises(FileNotFoundError, match="Fix: pass the chest_xray folder"):
        ds.read_kermany(tmp_path / "chest_xray" / "train" / "NORMAL")


def test_kermany_patient_ids_match_the_shared_labels(shared_data):
    folder = shared_data / "kermany-pneumonia-224"
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"needs ../shared/data/kermany-pneumonia-224/labels.csv ({folder}), absent here")
    records = ds.read_kermany(folder)
    assert len(records) == 5216 and all(ds.kermany_patient_id(r.path) == r.patient_id for r in records)
    assert ds.label_counts(records)["pneumonia"] == {"positive": 3875, "negative": 1341, "unknown": 0}


# --- NIH ChestX-ray14 --------------------------------------------------------------------------


def test_nih_layout_with_kaggle_image_folders_and_official_lists(tmp_path):
    write_csv(tmp_path / "Data_Entry_2017_v2020.csv", NIH_HEADER, [
        ["00000001_000.png", "Cardiomegaly|Emphysema", 0, 1, 57, "M", "PA", 2682, 2749, 0.143, 0.143],
        ["00000002_000.png", "No Finding", 0, 2, 81, "F", "AP", 2500, 2048, 0.168, 0.168],
        ["00000003_001.png", "Pleural_Thickening", 1, 3, 0, "F", "PA", 2500, 2048, 0.168, 0.168]])
    touch(tmp_path / "images_001/images/00000001_000.png", b"png")
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n")
    a, b, c = ds.read_nih(tmp_path)
    assert by_name(a) == {n: float(n in ("cardiomegaly", "emphysema")) for n in findings.NAMES}
    assert by_name(b) == {n: float(n == "no_finding") for n in findings.NAMES}
    assert c.label("pleural_thickening") == 1.0 and c.extra == {"follow_up": "1"}
    assert (a.patient_id, a.study_id, a.sex, a.age, a.view) == ("1", "00000001_000", "M", 57.0, "PA")
    assert a.extra == {"follow_up": "0", "source_split": "train_val"}
    assert (b.sex, b.view, b.is_frontal, b.extra["source_split"]) == ("F", "AP", True, "test")
    assert a.path == str(tmp_path / "images_001/images/00000001_000.png")
    assert b.path == str(tmp_path / "images/00000002_000.png")  # not found: where the plain layout keeps it


def test_nih_unknown_finding_names_the_line(tmp_path):
    write_csv(tmp_path / "Data_Entry_2017.csv", NIH_HEADER, [["x.png", "Fracture", 0, 1, 5, "M", "PA", 1, 1, 1, 1]])
    with pytest.raises(ds.DatasetLayoutError, match="line 2: unknown finding 'Fracture'"):
        ds.read_nih(tmp_path)
    with pytest.raises(FileNotFoundError, match="no NIH label file"):
        ds.read_nih(tmp_path / "elsewhere")


@pytest.fixture(scope="module")
def nih_records() -> list[ds.Record]:
    labels = Path(__file__).resolve().parents[2] / "shared/data/labels/nih-chestxray14-Data_Entry_2017_v2020.csv.gz"
    if not labels.is_file():
        pytest.skip(f"needs the real NIH label file in ../shared/data/labels ({labels}), absent here")
    return ds.read_nih(labels.parent, labels_file=labels)


def test_real_nih_label_file_parses(nih_records):
    assert len(nih_records) == 112120
    assert {n: c["positive"] for n, c in ds.label_counts(nih_records).items()} == NIH_COUNTS
    assert not np.isnan(ds.label_matrix(nih_records)).any()
    assert len({r.patient_id for r in nih_records}) == 30805
    assert {r.sex for r in nih_records} == {"M", "F"} and {r.view for r in nih_records} == {"PA", "AP"}
    ages = np.array([r.age for r in nih_records])
    assert 0 <= ages.min() and ages.max() <= 120 and 40 < np.median(ages) < 60


def test_real_nih_patient_split_has_no_leakage_and_subgroups_add_up(nih_records):
    parts = splits.split_by_patient(nih_records, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0)
    assert sorted(i for idx in parts.values() for i in idx) == list(range(len(nih_records)))
    assert splits.assert_no_leakage(nih_records, parts) == {"patient_id": {}, "md5": {}}
    assert 0.15 < len(parts["test"]) / len(nih_records) < 0.25
    table = ds.subgroup_table(nih_records, ["pneumonia", "no_finding"])
    assert sum(row["n_images"] for row in table) == 112120
    assert sum(row["positive"]["pneumonia"] for row in table) == 1431
    assert {row["view"] for row in table} == {"PA", "AP"} and {row["sex"] for row in table} == {"M", "F"}
    assert {row["age_band"] for row in table} <= {"0-17", "18-39", "40-59", "60-79", "80+"}
    assert len(table) <= 2 * 5 * 2


# --- CheXpert ----------------------------------------------------------------------------------


def chexpert_tree(tmp_path: Path) -> Path:
    root = tmp_path / "CheXpert-v1.0-small"
    labels = dict.fromkeys(CHEXPERT_HEADER[5:], "")
    rows = []
    for path, sex, age, fl, appa, values in [
        ("train/patient00001/study1/view1_frontal.jpg", "Female", 68, "Frontal", "AP",
         {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0", "Fracture": "1.0"}),
        ("train/patient00001/study1/view2_lateral.jpg", "Female", 68, "Lateral", "", {"No Finding": "1.0"}),
        ("train/patient00002/study2/view1_frontal.jpg", "Unknown", 0, "Frontal", "PA", {"Atelectasis": "-1.0"}),
    ]:
        rows.append([f"CheXpert-v1.0-small/{path}", sex, age, fl, appa, *{**labels, **values}.values()])
    write_csv(root / "train.csv", CHEXPERT_HEADER, rows)
    write_csv(root / "valid.csv", CHEXPERT_HEADER, [["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
                                                     "Male", 73, "Frontal", "AP", *["0.0"] * 14]])
    return root


def test_chexpert_layout_and_uncertainty_policies(tmp_path):
    root = chexpert_tree(tmp_path)
    first, lateral, second = ds.read_chexpert(root)
    assert by_name(first) == {"cardiomegaly": 1.0, "effusion": 0.0}  # edema uncertain: ignored; fracture: not canonical
    assert (first.patient_id, first.study_id) == ("patient00001", "patient00001/study1")
    assert (first.sex, first.age, first.view) == ("F", 68.0, "AP")
    assert first.path == str(tmp_path / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    assert (lateral.view, lateral.is_frontal, by_name(lateral)) == ("LATERAL", False, {"no_finding": 1.0})
    assert (second.sex, second.view) == (None, "PA")
    assert ds.read_chexpert(root, uncertain="zeros")[0].label("edema") == 0.0
    assert ds.read_chexpert(root, uncertain="ones")[0].label("edema") == 1.0
    mixed = ds.read_chexpert(root, uncertain={"Edema": "ones", "atelectasis": "zeros"})
    assert mixed[0].label("edema") == 1.0 and mixed[2].label("atelectasis") == 0.0
    both = ds.read_chexpert(root, split="both")
    assert len(both) == 4 and both[-1].extra["source_split"] == "valid" and both[-1].label("no_finding") == 0.0
    with pytest.raises(ValueError, match="uncertain='U-Ones': choose one of"):
        ds.read_chexpert(root, uncertain="U-Ones")
    renamed = root.rename(tmp_path / "chexpert")  # the CSV still says CheXpert-v1.0-small/...
    assert ds.read_chexpert(renamed)[0].path == str(renamed / "train/patient00001/study1/view1_frontal.jpg")


# --- RSNA Pneumonia ----------------------------------------------------------------------------


def test_rsna_labels_one_row_per_box_and_dicom_headers(tmp_path):
    header = ["patientId", "x", "y", "width", "height", "Target"]
    write_csv(tmp_path / "stage_2_train_labels.csv", header, [
        ["0004cfab-14fd", "", "", "", "", 0],
        ["00436515-870c", 264.0, 152.0, 213.0, 379.0, 1],
        ["00436515-870c", 562.0, 152.0, 256.0, 453.0, 1]])
    labels_only = ds.read_rsna_pneumonia(tmp_path)
    assert [(r.patient_id, r.label("pneumonia"), len(r.extra["boxes"])) for r in labels_only] == [
        ("0004cfab-14fd", 0.0, 0), ("00436515-870c", 1.0, 2)]
    assert by_name(labels_only[1]) == {"pneumonia": 1.0} and labels_only[1].sex is None
    (tmp_path / "stage_2_train_images").mkdir()
    for image_id, sex, age, view in [("0004cfab-14fd", "F", "051Y", "PA"), ("00436515-870c", "M", "048Y", "AP")]:
        dicom = build_dataset(rows=16, cols=16, view=view, patient_id=image_id)
        dicom.PatientSex, dicom.PatientAge = sex, age
        dicom.save_as(tmp_path / "stage_2_train_images" / f"{image_id}.dcm", enforce_file_format=True)
    negative, positive = ds.read_rsna_pneumonia(tmp_path)
    assert (negative.sex, negative.age, negative.view) == ("F", 51.0, "PA")
    assert (positive.sex, positive.age, positive.view) == ("M", 48.0, "AP")
    assert positive.extra["boxes"] == ((264.0, 152.0, 213.0, 379.0), (562.0, 152.0, 256.0, 453.0))
    assert positive.path == str(tmp_path / "stage_2_train_images/00436515-870c.dcm")
    assert ds.read_rsna_pneumonia(tmp_path, read_headers=False)[0].sex is None


# --- MIMIC-CXR-JPG -----------------------------------------------------------------------------


def test_mimic_cxr_jpg_layout(tmp_path):
    def labels(**values: str) -> list[str]:
        return [values.get(c.replace(" ", "_"), "") for c in MIMIC_LABELS]

    write_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *MIMIC_LABELS], [
        [10000032, 50414267, *labels(Pneumonia="-1.0", Pleural_Effusion="1.0", Lung_Opacity="1.0")],
        [10000764, 57375967, *labels(No_Finding="1.0")]])
    write_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_META, [
        ["02aa804e-bde0afdd", 10000032, 50414267, "CHEST (PA AND LAT)", "PA", 3056, 2544, 21800506, 2130, "", "", ""],
        ["174413ec-4ec4c1f7", 10000032, 50414267, "CHEST (PA AND LAT)", "LATERAL", 3056, 2544, 21800506, 1, "", "", ""],
        ["abcd", 10000764, 57375967, "", "AP", 1, 1, 1, 1, "", "", ""],
        ["nolabel", 10000898, 50771383, "", "", 1, 1, 1, 1, "", "", ""]])
    write_csv(tmp_path / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
              [["abcd", 57375967, 10000764, "test"]])
    pa, lateral, ap, unlabelled = ds.read_mimic_cxr(tmp_path)
    assert pa.path == str(tmp_path / "files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg")
    assert (pa.patient_id, pa.study_id, pa.view) == ("10000032", "50414267", "PA")
    assert (lateral.view, lateral.is_frontal) == ("LATERAL", False)
    assert by_name(pa) == {"effusion": 1.0} == by_name(lateral)
    assert by_name(ap) == {"no_finding": 1.0} and ap.extra == {"source_split": "test"}
    assert np.isnan(unlabelled.labels).all() and unlabelled.view is None
    assert ds.read_mimic_cxr(tmp_path, uncertain="ones")[0].label("pneumonia") == 1.0


# --- generic CSV -------------------------------------------------------------------------------


def test_generic_csv_maps_columns_named_after_findings(tmp_path):
    header = ["path", "patient_id", "Pleural Thickening", "pneumonia", "NO_FINDING", "age", "sex", "Comment"]
    csv_file = write_csv(tmp_path / "site-a.csv", header, [
        ["img/1.png", "A", 1, "", 0, 44, "female", "x"],
        ["img/2.png", "", 0, -1, 0, "", "", ""]])
    first, second = ds.read_generic_csv(csv_file, uncertain="zeros")
    assert by_name(first) == {"pleural_thickening": 1.0, "no_finding": 0.0}
    assert by_name(second) == {"pleural_thickening": 0.0, "pneumonia": 0.0, "no_finding": 0.0}
    assert (first.patient_id, first.dataset, first.sex, first.age) == ("A", "site-a", "F", 44.0)
    assert first.path == str(tmp_path / "img/1.png")
    assert second.patient_id == "img/2.png"  # no patient: the image is its own patient
    touch(tmp_path / "img/1.png", b"pixels")
    filled = ds.with_md5([first, second])
    assert (filled[0].md5, filled[1].md5, first.md5) == (hashlib.md5(b"pixels").hexdigest(), None, None)
    bad = write_csv(tmp_path / "bad.csv", ["path", "label"], [["a.png", 1]])
    with pytest.raises(ds.DatasetLayoutError, match="no label column named after a canonical finding"):
        ds.read_generic_csv(bad)
    assert [r.path for r in ds.read_dataset("csv", csv_file)] == [first.path, second.path]
    with pytest.raises(ValueError, match="dataset kind 'padchest': choose one of kermany, nih"):
        ds.read_dataset("padchest", tmp_path)
    odd = write_csv(tmp_path / "odd.csv", ["path", "edema"], [["a.png", "yes"]])
    with pytest.raises(ds.DatasetLayoutError, match=r"line 2 column 'edema': label 'yes' is not 1, 0, -1 or blank"):
        ds.read_generic_csv(odd)


# --- the plain site format ----------------------------------------------------------------------


def test_site_format_reads_labels_metadata_and_extra_columns(tmp_path):
    site = tmp_path / "hospital-x"
    for name in ("a.png", "b.dcm", "c.jpg"):
        touch(site / "images" / name, b"x")
    write_csv(site / "labels.csv", ["path", "pneumonia", "effusion", "patient_id", "sex", "age", "view", "note"], [
        ["images/a.png", 1, "", "P1", "F", "61", "pa", "portable"],
        ["images/b.dcm", 0, 1, "P1", "O", "", "", ""],
        ["images/c.jpg", "", 0, "P2", "male", "007Y", "AP", ""]])
    a, b, c = ds.read_site(site)
    assert (a.dataset, a.patient_id, a.sex, a.age, a.view, a.extra) == ("hospital-x", "P1", "F", 61.0, "PA",
                                                                        {"note": "portable"})
    assert by_name(a) == {"pneumonia": 1.0} and by_name(b) == {"pneumonia": 0.0, "effusion": 1.0}
    assert (b.sex, b.age, c.sex, c.age) == (None, None, "M", 7.0) and np.isnan(c.label("pneumonia"))
    assert ds.read_dataset("site", site, name="renamed")[0].dataset == "renamed"


@pytest.mark.parametrize(("row", "message"), [
    (["images/a.png", "2", "P1", "F", "40"], r"labels.csv line 2 column 'pneumonia': label '2' is not 1, 0, -1 or blank"),
    (["images/a.png", "1", "P1", "X", "40"], r"labels.csv line 2 column 'sex': sex 'X' is not M, F, O or blank"),
    (["images/a.png", "1", "P1", "F", "old"], r"labels.csv line 2 column 'age': age 'old' is not a number"),
    (["", "1", "P1", "F", "40"], r"labels.csv line 2 column 'path': empty path"),
    (["images/gone.png", "1", "P1", "F", "40"], r"1 of 1 images are missing \(line 2: .*gone.png\)\. Fix:"),
])
def test_bad_site_rows_name_file_line_and_column(tmp_path, row, message):
    touch(tmp_path / "images" / "a.png", b"x")
    write_csv(tmp_path / "labels.csv", ["path", "pneumonia", "patient_id", "sex", "age"], [row])
    with pytest.raises(ds.DatasetLayoutError, match=message):
        ds.read_site(tmp_path)


def test_a_site_image_listed_twice_and_a_folder_without_labels_are_refused(tmp_path):
    touch(tmp_path / "images" / "a.png", b"x")
    write_csv(tmp_path / "labels.csv", ["path", "pneumonia"], [["images/a.png", 1], ["images/a.png", 0]])
    with pytest.raises(ds.DatasetLayoutError, match="line 3 column 'path': images/a.png is also on line 2"):
        ds.read_site(tmp_path)
    with pytest.raises(FileNotFoundError, match="no labels file. Fix: pass a folder with labels.csv"):
        ds.read_site(tmp_path / "images")


@pytest.mark.parametrize(("folder", "n", "positives", "extra"), [
    ("kermany-pneumonia-224", 5216, 3875, "subtype"), ("nih-pneumonia-512", 515, 260, "finding_labels")])
def test_both_shared_folders_read_in_the_site_format(shared_data, folder, n, positives, extra):
    records = ds.read_site(shared_data / folder)
    assert len(records) == n and sum(r.label("pneumonia") for r in records) == positives
    assert all(extra in r.extra for r in records) and {r.dataset for r in records} == {folder}
    if folder.startswith("nih"):
        assert {r.view for r in records} <= {"PA", "AP"} and all(r.age is not None and r.sex for r in records)


# --- splits and leakage ------------------------------------------------------------------------


def record(patient: str, md5: str | None, dataset: str = "d") -> ds.Record:
    return ds.Record(f"{patient}-{md5}.png", patient, "s", dataset, ds.label_vector({}), md5=md5)


def test_three_way_split_keeps_patients_and_duplicates_together():
    rows = [record("A", "x"), record("B", "x"), record("B", "y"), record("C", "y"),
            record("D", None), record("E", None),
            *[record(f"P{i}", f"m{i}") for i in range(60)], record("1", "q", "nih"), record("1", "r", "chexpert")]
    groups = splits.patient_groups(rows)
    assert any({rows[i].patient_id for i in g} == {"A", "B", "C"} for g in groups.values())
    assert not any({"D", "E"} <= {rows[i].patient_id for i in g} for g in groups.values())  # no md5 links nothing
    assert len(groups) == 2 + 1 + 60 + 2  # the two datasets' patient "1" differ
    for seed in range(5):
        parts = splits.split_by_patient(rows, {"train": 0.6, "val": 0.2, "test": 0.2}, seed)
        assert sorted(i for idx in parts.values() for i in idx) == list(range(len(rows)))
        assert splits.leakage(rows, parts) == {"patient_id": {}, "md5": {}}
    with pytest.raises(ValueError, match="must be >= 0 and sum to 1"):
        splits.split_by_patient(rows, {"train": 0.8, "val": 0.1})


def test_leakage_report_names_patients_md5s_and_splits():
    rows = [record("A", "x"), record("A", "y"), record("B", "x"), record("C", "z")]
    report = splits.leakage(rows, {"train": [0], "val": [1, 3], "test": [2]})
    assert report == {"patient_id": {"d/A": ["train", "val"]}, "md5": {"x": ["test", "train"]}}
    with pytest.raises(splits.LeakageError, match=r"leaks 1 patients \(e.g. \['d/A'\]\) and 1 md5s"):
        splits.assert_no_leakage(rows, {"train": [0], "val": [1, 3], "test": [2]})


# --- masked BCE --------------------------------------------------------------------------------


def test_masked_bce_ignores_unknown_labels_and_weights_positives():
    torch = pytest.importorskip("torch", reason="the loss needs the train extra (torch)")
    from training.losses import masked_bce_with_logits, positive_weights

    bce = torch.nn.functional.binary_cross_entropy_with_logits
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, -2.0]], requires_grad=True)
    targets = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, 1.0]])
    loss = masked_bce_with_logits(logits, targets)
    known = ~torch.isnan(targets)
    assert torch.allclose(loss, bce(logits[known], targets[known]))
    loss.backward()
    assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).all()
    full = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    weight = torch.tensor([3.0, 1.0, 0.5])
    assert torch.allclose(masked_bce_with_logits(logits, full, weight), bce(logits, full, pos_weight=weight))
    none = masked_bce_with_logits(logits, torch.full_like(targets, float("nan")))
    assert none.item() == 0.0 and none.requires_grad
    labels = np.array([[1, 0, np.nan], [0, 0, np.nan], [0, np.nan, np.nan], [0, 1, np.nan]], dtype=np.float32)
    np.testing.assert_allclose(positive_weights(labels), [3.0, 2.0, 1.0])  # 3 neg/1 pos, 2/1, none known
