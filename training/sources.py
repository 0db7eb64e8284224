"""A run's labelled data: one or more sources, each split by patient on its own, over chosen findings.

A ``DataSource`` is a folder (or label file) read by an adapter of ``training.datasets``
(``site``: a folder with ``labels.csv``, the default), with a ``name`` (default: the
folder's name, recorded as ``Record.dataset``) and a sampling ``weight``. ``labelled_split``
reads every source, keeps the images with a known label for at least one finding, and
splits each source by patient on its own (``training.splits``), so a source's validation
images are the same whether it is trained alone or with others: leave-one-source-out
comparisons use the same held-out patients. Torch-free: train, export, evaluate and
calibrate all rebuild a run's split with this module from its ``config.json`` or manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import datasets, splits
from .findings import INDEX, NAMES

DEFAULT_KIND = "site"
SOURCE_KEYS = ("path", "dataset", "name", "weight", "options", "license", "description")


@dataclass(frozen=True)
class DataSource:
    """One labelled data source of a run: ``path`` read by adapter ``dataset``; ``weight`` multiplies the
    sampling probability of each of its training images (1: every image of every source equally likely).
    ``license`` and ``description`` (optional) go into the bundle's data statement and model card."""

    path: str
    dataset: str = DEFAULT_KIND
    name: str = ""
    weight: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)
    license: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.dataset not in datasets.ADAPTERS:
            raise ValueError(f"data source {self.path!r}: dataset={self.dataset!r}; choose one of "
                             f"{', '.join(datasets.ADAPTERS)}")
        if not float(self.weight) > 0:
            raise ValueError(f"data source {self.path!r}: weight={self.weight!r} must be a positive number")
        if not self.name:
            path = Path(self.path)
            object.__setattr__(self, "name", (path.parent.name if path.suffix else path.name) or str(path))

    @classmethod
    def from_value(cls, value: "str | Mapping[str, Any] | DataSource", dataset: str = DEFAULT_KIND) -> "DataSource":
        """A path (read with ``dataset``), a ``[[data]]`` table / dict with ``SOURCE_KEYS``, or a DataSource."""
        if isinstance(value, DataSource):
            return value
        if isinstance(value, (str, Path)):
            return cls(str(value), dataset)
        unknown = set(value) - set(SOURCE_KEYS)
        if unknown or "path" not in value:
            raise ValueError(f"data source {dict(value)}: {'unknown keys ' + str(sorted(unknown)) if unknown else 'no path'}."
                             f" Fix: a [[data]] table has path and optionally {', '.join(SOURCE_KEYS[1:])}")
        return cls(**{"dataset": dataset, **value, "path": str(value["path"]), "options": dict(value.get("options", {}))})

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "dataset": self.dataset, "name": self.name, "weight": float(self.weight)}
        out.update({k: v for k, v in (("options", dict(self.options)), ("license", self.license),
                                      ("description", self.description)) if v})
        return out

    def read(self) -> list[datasets.Record]:
        """The source's records, with ``dataset`` set to the source's name."""
        return [replace(r, dataset=self.name) for r in datasets.read_dataset(self.dataset, self.path, **self.options)]


def as_sources(data: "str | Mapping[str, Any] | Iterable[Any]", dataset: str = DEFAULT_KIND) -> list[DataSource]:
    """A config's ``data`` (one path, one table, or a list of either) -> sources with distinct names."""
    items = [data] if isinstance(data, (str, Path, Mapping, DataSource)) else list(data)
    sources = [DataSource.from_value(item, dataset) for item in items]
    names = [s.name for s in sources]
    if not sources:
        raise ValueError("no data source. Fix: give data (a folder with labels.csv) or [[data]] tables")
    if len(set(names)) < len(names):
        raise ValueError(f"data sources {names}: two share a name. Fix: give each [[data]] table a distinct name")
    return sources


def finding_names(requested: Sequence[str], labels: np.ndarray) -> list[str]:
    """The canonical findings to use: ``requested``, or with ``["auto"]`` every one with known positives and negatives."""
    if list(requested) == ["auto"]:
        return [n for j, n in enumerate(NAMES) if np.nansum(labels[:, j]) > 0 and (labels[:, j] == 0).any()]
    unknown = [n for n in requested if n not in INDEX]
    if unknown or not requested:
        raise ValueError(f"findings {list(requested)}: {unknown or 'none'} not canonical. Fix: use names from "
                         f"training.findings ({', '.join(NAMES)})")
    return list(requested)


@dataclass
class LabelledSplit:
    """Records of every source, labels ``y`` (N, F) float32 over ``findings`` (NaN unknown), and row indices."""

    records: list[datasets.Record]
    findings: list[str]
    y: np.ndarray
    train_idx: list[int]
    val_idx: list[int]
    sources: list[DataSource]

    def source_rows(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """{source name: positions within ``rows`` of that source's images}, in source order (empty ones left out)."""
        names = np.array([self.records[i].dataset for i in rows])
        return {s.name: np.flatnonzero(names == s.name) for s in self.sources if (names == s.name).any()}

    def sample_weights(self) -> np.ndarray:
        """(len(train_idx),) float64 sampling weight of each training image (its source's weight)."""
        weight = {s.name: float(s.weight) for s in self.sources}
        return np.array([weight[self.records[i].dataset] for i in self.train_idx], np.float64)

    def summary(self, rows: Sequence[int]) -> dict[str, Any]:
        """Images, patients and positives per finding, overall and per source."""
        def counts(idx: Sequence[int]) -> dict[str, Any]:
            y = self.y[np.asarray(idx, int)] if len(idx) else np.zeros((0, len(self.findings)))
            return {"n_images": len(idx), "n_patients": len({splits.patient_key(self.records[i]) for i in idx}),
                    **{f"n_{name}": int(np.nansum(y[:, j])) for j, name in enumerate(self.findings)}}

        rows = list(rows)
        return {**counts(rows), "by_source": {name: counts([rows[p] for p in pos])
                                              for name, pos in self.source_rows(rows).items()}}

    def describe(self, val_fraction: float, seed: int) -> dict[str, Any]:
        """The ``split`` record of a run's config and a bundle's manifest."""
        return {"method": f"patient-level per source, seeded ({seed}), {1 - val_fraction:.0%}/{val_fraction:.0%} of "
                          "each source's patient groups; patients sharing a byte-identical image (md5) kept together; "
                          "leakage checked: none",
                "train": self.summary(self.train_idx), "validation": self.summary(self.val_idx)}


def labelled_split(sources: Sequence[DataSource], findings: Sequence[str], val_fraction: float = 0.2, seed: int = 0,
                   limit: int = 0, log: Callable[[str], None] = print) -> LabelledSplit:
    """Read every source, keep images with a known label, split each source by patient, concatenate.

    ``limit`` > 0 keeps a seeded subset of that many training images (validation untouched).
    Raises ``ValueError`` when a split is empty, ``LeakageError`` if a patient or image straddles splits.
    """
    per_source = [(source, source.read()) for source in sources]
    names = finding_names(findings, datasets.label_matrix([r for _, recs in per_source for r in recs]))
    columns = [INDEX[n] for n in names]
    records: list[datasets.Record] = []
    ys, train_idx, val_idx = [], [], []
    for source, recs in per_source:
        y = datasets.label_matrix(recs)[:, columns]
        keep = [i for i in range(len(recs)) if not np.isnan(y[i]).all()]
        if len(keep) < len(recs):
            log(f"{source.name}: {len(recs) - len(keep)} images have no known label for {names}: left out")
        recs, y = [recs[i] for i in keep], y[keep]
        parts = splits.split_by_patient(recs, {"val": val_fraction, "train": 1.0 - val_fraction}, seed)
        if not parts["train"] or not parts["val"]:
            raise ValueError(f"{source.path}: {len(parts['train'])} training and {len(parts['val'])} validation "
                             "images. Fix: more images/patients, or another val_fraction")
        offset = len(records)
        train_idx += [offset + i for i in parts["train"]]
        val_idx += [offset + i for i in parts["val"]]
        records += recs
        ys.append(y)
    splits.assert_no_leakage(records, {"train": train_idx, "val": val_idx})
    if limit and limit < len(train_idx):
        rng = np.random.default_rng(seed)
        train_idx = sorted(rng.choice(train_idx, limit, replace=False).tolist())
    return LabelledSplit(records, names, np.concatenate(ys).astype(np.float32), train_idx, val_idx, list(sources))


def source_of(sources: Sequence[DataSource], data: str | Path) -> DataSource | None:
    """The source among ``sources`` that ``data`` (a folder or label file) is, by name; None when it is none of them."""
    probe = DataSource(str(data), sources[0].dataset if sources else DEFAULT_KIND)
    return next((s for s in sources if s.name == probe.name), None)
