"""Patient-level splits for any dataset, duplicates kept together, and a leakage report.

Works on any sequence of records with ``patient_id`` and ``md5`` attributes (and an
optional ``dataset``, which namespaces patient ids so two datasets' "1" differ).
Patients linked by a byte-identical image (same md5) form one group (union-find), and
whole groups are assigned to splits, so no patient and no image content straddles two
splits. A missing md5 (``None`` or ``""``) links nothing.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any


class LeakageError(AssertionError):
    """A split puts one patient or one image content (md5) in more than one split."""


def patient_key(record: Any) -> str:
    """``dataset/patient_id`` when the record has a dataset, else ``patient_id``."""
    dataset = getattr(record, "dataset", None)
    return f"{dataset}/{record.patient_id}" if dataset else str(record.patient_id)


def patient_groups(records: Sequence[Any]) -> dict[str, list[int]]:
    """Union-find over patients linked by a shared md5 -> {root patient key: row indices}."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    keys = [patient_key(r) for r in records]
    first_patient_of_md5: dict[str, str] = {}
    for key, record in zip(keys, records):
        find(key)
        if record.md5:
            other = first_patient_of_md5.setdefault(record.md5, key)
            parent[find(key)] = find(other)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[find(key)].append(i)
    return dict(groups)


def split_by_patient(records: Sequence[Any], fractions: Mapping[str, float], seed: int = 0) -> dict[str, list[int]]:
    """Seeded split of row indices into named splits by patient group.

    ``fractions`` maps split name -> fraction of patient groups, e.g.
    ``{"train": 0.8, "val": 0.1, "test": 0.1}``; they must sum to 1. Groups are sorted,
    shuffled with ``random.Random(seed)`` and cut in the mapping's order (cumulative
    rounding, so every group lands in exactly one split). Returns {name: sorted indices}.
    """
    total = sum(fractions.values())
    if not fractions or abs(total - 1.0) > 1e-6 or min(fractions.values()) < 0:
        raise ValueError(f"split fractions {dict(fractions)} must be >= 0 and sum to 1 (they sum to {total:g})")
    groups = patient_groups(records)
    roots = sorted(groups)
    random.Random(seed).shuffle(roots)
    out: dict[str, list[int]] = {}
    start, cumulative = 0, 0.0
    for n, (name, fraction) in enumerate(fractions.items()):
        cumulative += fraction
        stop = len(roots) if n == len(fractions) - 1 else round(len(roots) * cumulative)
        out[name] = sorted(i for root in roots[start:stop] for i in groups[root])
        start = stop
    return out


def leakage(records: Sequence[Any], splits: Mapping[str, Sequence[int]]) -> dict[str, dict[str, list[str]]]:
    """Patients and md5s present in more than one split.

    Returns ``{"patient_id": {patient key: [split names]}, "md5": {md5: [split names]}}``;
    both empty when the split is clean. A row index in two splits shows up as both.
    """
    seen: dict[str, dict[str, set[str]]] = {"patient_id": defaultdict(set), "md5": defaultdict(set)}
    for name, indices in splits.items():
        for i in indices:
            seen["patient_id"][patient_key(records[i])].add(name)
            if records[i].md5:
                seen["md5"][records[i].md5].add(name)
    return {kind: {k: sorted(v) for k, v in sorted(found.items()) if len(v) > 1} for kind, found in seen.items()}


def assert_no_leakage(records: Sequence[Any], splits: Mapping[str, Sequence[int]]) -> dict[str, dict[str, list[str]]]:
    """Raise ``LeakageError`` naming leaked patients/md5s; returns the (empty) report."""
    report = leakage(records, splits)
    patients, md5s = report["patient_id"], report["md5"]
    if patients or md5s:
        raise LeakageError(
            f"split leaks {len(patients)} patients (e.g. {list(patients)[:3]}) and {len(md5s)} md5s "
            f"(e.g. {list(md5s)[:3]}) into more than one split. Fix: split with training.splits.split_by_patient"
        )
    return report
