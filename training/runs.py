"""A training run folder (``config.json``, ``metrics.json``, ``best.pt``): its data, its split, its network.

``run_sources`` and ``run_split`` rebuild a run's labelled data and patient split from its config
(torch-free, for export, evaluate and calibrate); ``load_run`` rebuilds its network (torch).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from triage.ingest import read_radiograph
from triage.preprocess import PreprocessSpec, preprocess

from .datasets import Record
from .sources import DEFAULT_KIND, DataSource, LabelledSplit, as_sources, labelled_split, source_of


def sources_of(recorded: Any, dataset: str = DEFAULT_KIND, data: Sequence[str | Path] = ()) -> list[DataSource]:
    """The sources a run or bundle recorded, each ``data`` path replacing the path of the source of the same name.

    ``recorded``: a config's ``data`` (a path, a table, or a list of tables). ``ValueError`` when a
    ``data`` path names none of the recorded sources.
    """
    sources = as_sources(recorded, dataset)
    for path in data:
        match = source_of(sources, path)
        if match is None:
            raise ValueError(f"{path}: not one of the run's data sources ({', '.join(s.name for s in sources)}). "
                             "Fix: pass a folder with one of those names, or none to use the recorded paths")
        sources = [replace(s, path=str(path)) if s is match else s for s in sources]
    return sources


def run_sources(config: Mapping[str, Any], data: Sequence[str | Path] = ()) -> list[DataSource]:
    """A run config's data sources (older configs: ``data`` a path read by ``dataset``)."""
    raw = config["data"]
    if isinstance(raw, str):
        raw = {"path": raw, "dataset": config.get("dataset", DEFAULT_KIND), "options": config.get("dataset_options", {})}
    return sources_of(raw, config.get("dataset", DEFAULT_KIND), data)


def run_split(config: Mapping[str, Any], data: Sequence[str | Path] = (), log: Callable[[str], None] = print) -> LabelledSplit:
    """The run's patient split, re-made from its config exactly as ``train`` made it."""
    return labelled_split(run_sources(config, data), config["findings"], float(config.get("val_fraction", 0.2)),
                          int(config.get("seed", 0)), int(config.get("limit", 0) or 0), log)


def load_inputs(records: Sequence[Record], spec: PreprocessSpec) -> np.ndarray:
    """Each record's image through ``triage.ingest`` and ``triage.preprocess``: (N, C, H, W) float32, the serving input."""
    out = np.empty((len(records), spec.channels, *spec.size), dtype=np.float32)
    for i, record in enumerate(records):
        out[i] = preprocess(read_radiograph(record.path), spec)
    return out


def sample_rows(rows: Sequence[int], n: int, seed: int) -> list[int]:
    """A seeded sample of at most ``n`` of ``rows``, in order."""
    if len(rows) <= n:
        return list(rows)
    return [rows[i] for i in np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))]


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, metrics) of a finished run folder; ``FileNotFoundError`` says how to finish it."""
    run_dir = Path(run_dir)
    for name in ("config.json", "metrics.json", "best.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} is missing. Fix: run 'train --out {run_dir}' to completion first")
    return json.loads((run_dir / "config.json").read_text()), json.loads((run_dir / "metrics.json").read_text())


def load_run(run_dir: str | Path):
    """(config, metrics, network with the best checkpoint in eval mode) of a run folder (torch)."""
    import torch

    from .model import network_from_config

    config, metrics = read_run(run_dir)
    net = network_from_config(config)
    net.load_state_dict(torch.load(Path(run_dir) / "best.pt", map_location="cpu", weights_only=True))
    return config, metrics, net.eval()
