"""Score labelled images with a bundle (ONNX Runtime, as served) or a training run, on the right split.

``select_images`` picks, for each data folder, the images a model never trained on: for a
folder that is one of the model's training sources (by name), that source's validation split
re-made from the recorded seed; for any other folder (an external site), every image.
``score_bundle`` runs ``triage.pipeline.prepare`` + ``Model.logits``; ``score_run`` uses a run's
``val_predictions.npz`` or its checkpoint. Used by ``evaluate``, ``calibrate`` and ``finetune``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from triage.errors import TriageError
from triage.inference import sigmoid
from triage.preprocess import PreprocessSpec

from . import splits
from .calibration import fit_per_finding, flag_threshold_for_rate
from .datasets import Record, label_matrix
from .findings import INDEX
from .metrics import FLAG_RATE
from .runs import load_inputs, sources_of
from .sources import DEFAULT_KIND, DataSource, labelled_split, source_of

SPLITS = ("validation", "all")


class EvaluationError(TriageError, ValueError):
    """The source or data cannot be evaluated; the message says how to fix it."""


@dataclass
class EvalSet:
    """The images to evaluate: records, labels (N, F) over the model's findings (NaN unknown), patient groups,
    and the split each came from."""

    records: list[Record]
    labels: np.ndarray
    findings: list[str]
    groups: np.ndarray
    split: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]

    @property
    def sources(self) -> np.ndarray:
        """(N,) the source (dataset) name of each image."""
        return np.array([r.dataset for r in self.records])

    def column(self, finding: str) -> np.ndarray:
        """(N,) labels of one finding (NaN unknown)."""
        return self.labels[:, self.findings.index(finding)]

    def subset(self, keep: np.ndarray) -> "EvalSet":
        """Only the images where boolean ``keep`` (N,) is true."""
        idx = np.flatnonzero(keep)
        return EvalSet([self.records[i] for i in idx], self.labels[idx], self.findings, self.groups[idx], self.split)


@dataclass(frozen=True)
class TrainingRecord:
    """What a model recorded about its training data: sources (None: an older bundle, whose one source is any
    folder it is evaluated on), findings, seed, validation fraction and split summary."""

    sources: list[DataSource] | None
    findings: list[str]
    seed: int = 0
    val_fraction: float = 0.2
    split: Mapping[str, Any] = field(default_factory=dict)


def training_record(path: str | Path) -> TrainingRecord:
    """The ``TrainingRecord`` of a bundle (``manifest.json``) or run folder (``config.json``)."""
    folder = Path(path)
    if source_kind(folder) == "bundle":
        manifest = json.loads((folder / "manifest.json").read_text())
        training, findings = manifest.get("training", {}), manifest["findings"]
        recorded = training.get("sources")
        return TrainingRecord(sources_of(recorded) if recorded else None, list(findings), int(training.get("seed", 0)),
                              float(training.get("val_fraction", 0.2)), training.get("split", {}))
    from .runs import run_sources

    config = json.loads((folder / "config.json").read_text())
    return TrainingRecord(run_sources(config), list(config["findings"]), int(config.get("seed", 0)),
                          float(config.get("val_fraction", 0.2)), config.get("split", {}))


def source_kind(path: str | Path) -> str:
    """"bundle" (has manifest.json) or "run" (has config.json); raises ``EvaluationError`` otherwise."""
    folder = Path(path)
    if (folder / "manifest.json").is_file():
        return "bundle"
    if (folder / "config.json").is_file():
        return "run"
    raise EvaluationError(f"{folder}: neither a bundle (manifest.json) nor a training run (config.json). "
                          "Fix: pass a bundle folder such as models/cxr-pneumonia or a run folder written by 'train'")


def labels_over(records: Sequence[Record], findings: Sequence[str]) -> np.ndarray:
    """(N, F) float64 labels of ``records`` over the model's ``findings`` (NaN where unknown or not canonical)."""
    y = label_matrix(records).astype(np.float64)
    return np.stack([y[:, INDEX[f]] if f in INDEX else np.full(len(records), np.nan) for f in findings], axis=1) \
        if len(records) else np.zeros((0, len(findings)))


def known_records(source: DataSource, findings: Sequence[str]) -> list[Record]:
    """The source's records with a known label for at least one of ``findings`` (the rows training would use)."""
    records = source.read()
    y = labels_over(records, findings)
    return [r for r, row in zip(records, y) if not np.isnan(row).all()]


def folder_images(data: str | Path, split: str, record: TrainingRecord, dataset: str = DEFAULT_KIND,
                  log: Callable[[str], None] = print) -> tuple[list[Record], dict[str, Any]]:
    """The records of one data folder to evaluate, and how they were chosen (``selection``)."""
    trained = source_of(record.sources, data) if record.sources else None
    source = replace(trained, path=str(data)) if trained else DataSource(str(data), dataset)
    if split == "all":
        return known_records(source, record.findings), {"name": source.name, "selection": "all", "description":
               "every image of the folder, INCLUDING any the model trained on (optimistic when it is a training source)"}
    if record.sources is None:  # an older bundle recorded no sources: its own source is the folder whose split matches
        part = labelled_split([source], record.findings, record.val_fraction, record.seed, log=log)
        recorded = record.split.get("validation", {}).get("n_images")
        trained = source if recorded is None or recorded == len(part.val_idx) else None
    if trained is None:
        return known_records(source, record.findings), {"name": source.name, "selection": "external", "description":
               "every image: not one of the model's training sources (an external site)"}
    part = labelled_split([source], record.findings, record.val_fraction, record.seed, log=log)
    return [part.records[i] for i in part.val_idx], {
        "name": source.name, "selection": "validation",
        "description": f"the validation patients of this training source (patient-level split, seed {record.seed}, "
                       f"{record.val_fraction:.0%} of patient groups, re-made as training made it; leakage checked)"}


def select_images(data: Sequence[str | Path], split: str, record: TrainingRecord, dataset: str = DEFAULT_KIND,
                  log: Callable[[str], None] = print) -> EvalSet:
    """The images of every data folder that the model never trained on (``split="validation"``), or all of them."""
    if split not in SPLITS:
        raise EvaluationError(f"split {split!r} is not one of {SPLITS}")
    records, parts = [], []
    for folder in data:
        recs, how = folder_images(folder, split, record, dataset, log)
        records += recs
        parts.append({**how, "n_images": len(recs)})
    images = eval_set(records, record.findings)
    images.split = {"name": split, "seed": record.seed, "val_fraction": record.val_fraction, "sources": parts,
                    "n_images": len(records), "n_patients": len(set(images.groups.tolist()))}
    expected = (record.split.get("validation", {}).get("by_source") or {}) if split == "validation" else {}
    if record.sources is None and split == "validation" and len(parts) == 1:
        expected = {parts[0]["name"]: record.split.get("validation", {})}
    for part in parts:
        n = expected.get(part["name"], {}).get("n_images")
        part["matches_training_record"] = None if n is None or part["selection"] != "validation" else n == part["n_images"]
    return images


def eval_set(records: Sequence[Record], findings: Sequence[str], split: Mapping[str, Any] | None = None) -> EvalSet:
    """``records`` as an ``EvalSet``: labels over ``findings`` and patient groups (patients linked by a shared image
    md5, as the splits group them) for the bootstrap."""
    roots = {i: root for root, members in splits.patient_groups(records).items() for i in members}
    return EvalSet(list(records), labels_over(records, findings), list(findings),
                   np.array([roots[i] for i in range(len(records))]), dict(split or {}))


@dataclass
class Scores:
    """What a model said about an ``EvalSet``: raw logits (N, F), calibration (F,) and the operating point."""

    logits: np.ndarray
    temperatures: np.ndarray
    biases: np.ndarray
    findings: list[str]
    triage_finding: str
    threshold: float
    spec: PreprocessSpec
    source: dict[str, Any]
    unscorable: list[dict[str, str]] = field(default_factory=list)

    @property
    def calibrated_logits(self) -> np.ndarray:
        """logit / temperature + bias (N, F) float64: the served risk is its sigmoid."""
        return self.logits.astype(np.float64) / self.temperatures[None, :] + self.biases[None, :]

    @property
    def risks(self) -> np.ndarray:
        """Calibrated risks (N, F) float64, as served."""
        return sigmoid(self.calibrated_logits)

    def column(self, finding: str) -> int:
        return self.findings.index(finding)

    def subset(self, keep: np.ndarray) -> "Scores":
        """The scores of the images where boolean ``keep`` (N,) is true."""
        return Scores(self.logits[keep], self.temperatures, self.biases, self.findings, self.triage_finding,
                      self.threshold, self.spec, self.source, self.unscorable)


def score_bundle(path: str | Path, images: EvalSet, batch_size: int = 32, device: str = "cpu",
                 log: Callable[[str], None] = print) -> tuple[Scores, np.ndarray]:
    """Score with ONNX Runtime through triage (``prepare`` + ``Model.logits``), decoding as the bundle says.

    Returns the scores of the scorable images and the boolean (N,) mask of which ones
    were scorable; the others are listed in ``Scores.unscorable`` with triage's reason.
    """
    from triage.bundle import load_bundle
    from triage.inference import load_model
    from triage.pipeline import prepare

    bundle = load_bundle(path)
    model = load_model(bundle, device=device)
    logits, ok, unscorable = [], np.zeros(len(images.paths), bool), []
    start = time.perf_counter()
    paths = images.paths
    for first in range(0, len(paths), batch_size):
        prepared = [prepare(p, bundle.preprocessing, bundle.reduced_decode) for p in paths[first:first + batch_size]]
        for offset, item in enumerate(prepared):
            ok[first + offset] = item.model_input is not None
            if item.model_input is None:
                unscorable.append({"path": item.path, "reason": item.reason, "detail": item.detail})
        scorable = [p.model_input for p in prepared if p.model_input is not None]
        if scorable:
            logits.append(model.logits(np.stack(scorable)).astype(np.float64))
    seconds = time.perf_counter() - start
    log(f"scored {int(ok.sum())} images with {bundle.name} {bundle.version} ({model.provider}) in {seconds:.1f} s")
    source = {"kind": "bundle", "path": str(path), "name": bundle.name, "version": bundle.version,
              "sha256": bundle.sha256, "provider": model.provider, "scoring_seconds": round(seconds, 1),
              "calibration_fitted_on": bundle.manifest["calibration"].get("fitted_on", "unknown"),
              "threshold_flag_rate": bundle.flag_rate, "has_heatmaps": "cam" in bundle.manifest["model"]["outputs"]}
    scores = Scores(np.concatenate(logits) if logits else np.zeros((0, len(bundle.findings))), model.temperatures,
                    model.biases if model.biases is not None else np.zeros(len(bundle.findings)), bundle.findings,
                    bundle.triage_finding, bundle.threshold, bundle.preprocessing, source, unscorable)
    return scores, ok


def run_logits(path: str | Path, images: EvalSet, validation_rows: np.ndarray | None) -> tuple[np.ndarray, str]:
    """A run's logits (N, F): its ``val_predictions.npz`` when ``images`` are exactly its validation images
    (``validation_rows`` given), else its checkpoint (torch)."""
    predictions = Path(path) / "val_predictions.npz"
    if validation_rows is not None and predictions.is_file():
        with np.load(predictions) as saved:
            if np.array_equal(saved["rows"], validation_rows):
                return saved["logits"].astype(np.float64), "val_predictions.npz"
    from .runs import load_run  # torch, only when the checkpoint must be run
    from .train import predict_logits

    config, _, net = load_run(path)
    x = load_inputs(images.records, PreprocessSpec.from_dict(config["preprocessing"]))
    return predict_logits(net, x).astype(np.float64), "best.pt (PyTorch)"


def score_run(path: str | Path, images: EvalSet, log: Callable[[str], None] = print) -> tuple[Scores, np.ndarray]:
    """Score with a training run; calibration and the 5% threshold are fitted as export does, on its validation logits."""
    from .runs import run_split

    config = json.loads((Path(path) / "config.json").read_text())
    start = time.perf_counter()
    split = run_split(config, log=lambda _: None)
    val_records = [split.records[i] for i in split.val_idx]
    same = [r.path for r in val_records] == images.paths
    logits, how = run_logits(path, images, np.array(split.val_idx) if same else None)
    val_logits = logits if same else run_logits(path, eval_set(val_records, split.findings),
                                                np.array(split.val_idx))[0]
    findings, column = list(split.findings), 0
    temps, biases = fit_per_finding(val_logits, labels_over(val_records, findings))
    risks = sigmoid(val_logits[:, column] / temps[column] + biases[column])
    threshold = flag_threshold_for_rate(risks, FLAG_RATE)
    log(f"run {path}: logits from {how} in {time.perf_counter() - start:.1f} s")
    source = {"kind": "run", "path": str(path), "name": Path(path).name, "logits_from": how,
              "calibration_fitted_on": "validation (fitted here, as export would)", "threshold_flag_rate": FLAG_RATE,
              "has_heatmaps": False}
    scores = Scores(logits, temps, biases, findings, findings[column], threshold,
                    PreprocessSpec.from_dict(config["preprocessing"]), source)
    return scores, np.ones(len(images.paths), bool)
