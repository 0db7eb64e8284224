"""``cxr-triage finetune BUNDLE DATA --out NEW``: adapt a bundle's own network to a site's labelled studies.

The fast.ai idea that a few hundred labelled studies suffice: start from the bundle's weights
(``weights.npz``: plain arrays, sha256-pinned by the manifest, never unpickled), split DATA by
patient (a folder that was one of the bundle's training sources keeps the bundle's own split, so
the held-out patients are ones the parent never trained on), fine-tune with the recipe (head-only
one-cycle, then unfreeze and one cycle with discriminative learning rates), then export a new
bundle whose calibration, threshold and gate are fitted on the site's split and whose manifest
names its parent. Before and after are measured on the site's held-out patients with the served
ONNX models; a child worse than its parent there (AUROC) is not written unless ``force``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from triage.bundle import Bundle, load_bundle, write_manifest
from triage.errors import TriageError

from .card import write_model_card
from .evaluate import binary_report
from .recalibrate import next_version
from .scoring import EvalSet, TrainingRecord, eval_set, score_bundle, training_record
from .sources import DataSource, labelled_split, source_of

# BatchNorm statistics stay the parent's: a few hundred images of one site, 32 at a time, would otherwise pull them
# away (measured on NIH: the first unfrozen epoch's training loss rose from 0.44 to 1.0 with them updating).
FINETUNE_DEFAULTS = {"epochs_frozen": 1, "stages": None, "lr": 1e-3, "batch_size": 32, "batchnorm_eval": True}


class FinetuneError(TriageError, ValueError):
    """The bundle cannot be fine-tuned, or the result is worse than its parent; the message says what to do."""


def parent_network(bundle: Bundle):
    """The bundle's network (torch) with its shipped weights, strict load, in eval mode."""
    from .model import network_from_config
    from .weights import load_weights

    weights = bundle.manifest["model"].get("weights")
    if not weights:
        raise FinetuneError(f"{bundle.path}: the bundle ships no weights (model.weights), so training cannot restart "
                            "from it. Fix: re-export its run with this version's 'cxr-triage export'")
    spec = bundle.preprocessing
    net = network_from_config({"architecture": weights.get("architecture") or "efficientnet-lite0",
                               "findings": bundle.findings, "size": spec.size[0],
                               "preprocessing": {"channels": spec.channels}})
    net.load_state_dict(load_weights(bundle.path / weights["file"]), strict=True)
    return net.eval()


def site_source(record: TrainingRecord, data: str | Path, dataset: str) -> tuple[DataSource, bool]:
    """The site's data source, and whether it is one of the bundle's training sources (same name)."""
    trained = source_of(record.sources, data) if record.sources else None
    source = DataSource(str(data), dataset)
    return (replace(trained, path=str(data), weight=1.0) if trained else source), trained is not None


def held_out_figures(bundle_dir: Path, images: EvalSet, n_boot: int, seed: int, log: Callable[[str], None]) -> dict:
    """AUROC with CI, ECE (as served and cross-fitted), and PPV/sensitivity in the top 5% on ``images``."""
    scores, ok = score_bundle(bundle_dir, images, log=log)
    images = images.subset(ok)
    column = scores.column(scores.triage_finding)
    y = images.column(scores.triage_finding)
    known = ~np.isnan(y)
    report = binary_report(y[known], scores.logits[known, column], scores.calibrated_logits[known, column],
                           scores.threshold, images.groups[known], n_boot, seed)
    top = report["flag_rate_5pct"]
    return {"n": report["n"], "n_positive": report["n_positive"], "auroc": report["auroc"]["value"],
            "auroc_ci95": [report["auroc"]["ci95"]["low"], report["auroc"]["ci95"]["high"]],
            "ece": report["calibration"]["ece_calibrated"], "ece_cross_fitted": report["calibration"]["ece_cross_fitted"],
            "ppv_top5": top["ppv"], "sensitivity_top5": top["sensitivity"],
            "at_threshold": {k: report["operating_threshold"][k] for k in ("threshold", "sensitivity", "ppv",
                                                                           "flagged_fraction")}}


def comparison_table(parent: dict, child: dict) -> str:
    """Before/after on the site's held-out patients, one line per figure."""
    rows = [("AUROC", "auroc"), ("ECE (as served)", "ece"), ("ECE (cross-fitted)", "ece_cross_fitted"),
            ("PPV, top 5%", "ppv_top5"), ("sensitivity, top 5%", "sensitivity_top5")]
    lines = [f"{'held-out (n=' + str(child['n']) + ')':<26}{'parent':>10}{'fine-tuned':>12}"]
    lines += [f"{label:<26}{parent[key]:>10.4f}{child[key]:>12.4f}" for label, key in rows]
    lines.append(f"{'AUROC 95% CI':<26}{parent['auroc_ci95'][0]:>5.3f}-{parent['auroc_ci95'][1]:<5.3f}"
                 f"{child['auroc_ci95'][0]:>6.3f}-{child['auroc_ci95'][1]:.3f}")
    return "\n".join(lines)


def finetune_bundle(bundle_dir: str | Path, data: str | Path, out: str | Path, *, dataset: str = "site",
                    version: str | None = None, force: bool = False, device: str = "auto", n_boot: int = 500,
                    overrides: dict[str, Any] | None = None, max_steps: int = 0,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune ``bundle_dir`` on ``data`` and write the new bundle to ``out``; returns its manifest.

    ``overrides``: ``TrainConfig`` fields for the recipe (default: 1 head-only epoch, then 2 unfrozen epochs at the
    bundle's input size, lr 1e-3). ``max_steps`` (tests) caps the batches per epoch.
    """
    import torch

    from .export import export_bundle
    from .train import Caches, TrainConfig, build_trainer, fine_tune, make_loss, pick_device, seed_everything

    start = time.perf_counter()
    bundle_dir, out = Path(bundle_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FinetuneError(f"{out}: not empty. Fix: pass --out a new folder (or remove it)")
    parent = load_bundle(bundle_dir)
    net = parent_network(parent)
    record = training_record(bundle_dir)
    source, was_trained_on = site_source(record, data, dataset)
    size = parent.preprocessing.size[0]
    settings = {**parent.manifest.get("training", {}).get("settings", {}), **FINETUNE_DEFAULTS,
                **{k: v for k, v in (overrides or {}).items() if v is not None}}
    known_fields = set(TrainConfig.__dataclass_fields__)
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k in known_fields and k not in ("epochs", "limit")} | {
        "data": [source.to_dict()], "findings": parent.findings, "triage_finding": parent.triage_finding,
        "size": size, "preprocessing": parent.preprocessing.to_dict(), "seed": record.seed,
        "val_fraction": record.val_fraction, "stages": settings["stages"] or [[size, 2]], "device": device,
        "architecture": parent.manifest["model"]["weights"].get("architecture") or "efficientnet-lite0",
        "name": parent.name, "version": version or next_version(parent.version), "out": str(out), "ema": 0.0})
    split = labelled_split(cfg.sources, cfg.findings, cfg.val_fraction, cfg.seed, log=log)
    images = eval_set([split.records[i] for i in split.val_idx], cfg.findings, {"name": "site held-out"})
    log(f"site {source.name}: {len(split.train_idx)} training and {len(split.val_idx)} held-out images (patient split, "
        f"seed {cfg.seed}{'; the parent was trained on this source: its own validation patients are held out' if was_trained_on else ''})")
    before = held_out_figures(bundle_dir, images, n_boot, 0, log)
    log(f"parent {parent.name} {parent.version} on the held-out patients: AUROC {before['auroc']:.4f}, "
        f"ECE {before['ece']:.4f}")

    seed_everything(cfg.seed)
    torch_device = pick_device(cfg.device)
    loss_fn, _ = make_loss(cfg, split.y[split.train_idx], torch_device)
    trainer = build_trainer(replace(cfg, weights=""), len(cfg.findings), loss_fn, torch_device, log)
    trainer.net.load_state_dict(net.state_dict())
    history: list[dict[str, Any]] = []

    def on_epoch(entry: dict[str, Any]) -> None:
        history.append(entry)
        log(f"finetune {entry['phase']} epoch {entry['epoch']} at {entry['size']} px: train loss "
            f"{entry['train_loss']:.4f}, {entry['images_per_second']} img/s")

    with tempfile.TemporaryDirectory(prefix="cxr-finetune-cache-") as cache_dir:
        caches = Caches(split.records, split.train_idx, parent.preprocessing, Path(cache_dir), log)
        fine_tune(trainer, caches, split.train_idx, split.y, cfg, on_epoch, max_steps)
    tuned = trainer.evaluated.to("cpu").eval().to(memory_format=torch.contiguous_format)
    parent_ref = {"name": parent.name, "version": parent.version, "sha256": parent.sha256}
    config = {**asdict(cfg), "recipe": "finetune from " + f"{parent.name} {parent.version}: " + cfg.recipe,
              "findings": cfg.findings, "split": split.describe(cfg.val_fraction, cfg.seed), "parent": parent_ref,
              "code_version": parent.manifest.get("training", {}).get("code_version"), "device": torch_device.type,
              "torch_threads": torch.get_num_threads(), "frameworks": {"torch": torch.__version__},
              "changelog": [*parent.manifest.get("changelog", []), {"version": cfg.version, "change":
                            f"fine-tuned from {parent.name} {parent.version} on {source.name}"}],
              "metrics": {"epochs": history, "wall_seconds": round(time.perf_counter() - start, 1)}}
    staging = Path(tempfile.mkdtemp(prefix=".finetune-", dir=out.parent if out.parent.exists() else None))
    try:
        export_bundle(staging, staging, config_override=config, net=tuned, log=log)
        after = held_out_figures(staging, images, n_boot, 0, log)
        log(comparison_table(before, after))
        if after["auroc"] < before["auroc"] and not force:
            raise FinetuneError(f"the fine-tuned model is worse than its parent on the {after['n']} held-out patients' "
                                f"images (AUROC {after['auroc']:.4f} < {before['auroc']:.4f}): not written. Fix: more "
                                "labelled studies, another recipe (--stages, --lr), or --force to write it anyway")
        manifest = {k: v for k, v in load_bundle(staging).manifest.items() if k not in ("files", "schema_version")}
        manifest["metrics"]["finetune"] = {"held_out": f"{after['n']} images of {source.name} (patient split, seed "
                                                       f"{cfg.seed})", "parent": before, "child": after,
                                           "forced": bool(force and after["auroc"] < before["auroc"])}
        write_model_card(staging / "MODEL_CARD.md", manifest)
        write_manifest(staging, manifest)
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            shutil.move(str(item), out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    child = load_bundle(out)
    log(f"bundle {child.name} {child.version} -> {out} in {time.perf_counter() - start:.0f} s "
        f"(parent {parent.name} {parent.version})")
    return child.manifest
