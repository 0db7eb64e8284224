"""fast.ai-style ``fine_tune`` of EfficientNet-Lite0 on Kermany pneumonia, on CPU.

Recipe (the default ``TrainConfig``): one head-only one-cycle epoch with the body
frozen (BatchNorm in eval mode) at 160 px (progressive resizing), then unfreeze and
one one-cycle epoch at 224 px with discriminative learning rates (early layer groups
lower), AdamW, ``pos_weight`` = negatives/positives. Validation is always at the
serving size. A run folder holds ``config.json``, ``metrics.json`` (one entry per
epoch), ``best.pt`` (best validation AUROC) and ``val_predictions.npz``.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from triage.preprocess import PreprocessSpec

from . import data
from .augment import default_augment
from .model import build_model, freeze_body, layer_groups, unfreeze

RECIPE = ("fine_tune: 1 head-only one-cycle epoch (body frozen, BatchNorm eval) at 160 px, then unfreeze and "
          "one-cycle at 224 px with discriminative learning rates slice(lr/lr_mult, lr)/2 over 3 layer groups; "
          "AdamW, BCE with pos_weight, small affine + intensity augmentation, no flips")


@dataclass
class TrainConfig:
    """Every setting of a training run; saved as the run's ``config.json``."""

    data: str = "../shared/data/kermany-pneumonia-224"
    out: str = "runs/pneumonia"
    epochs_frozen: int = 1
    epochs: int = 1
    size_frozen: int = 160
    size: int = 224
    batch_size: int = 32
    lr: float = 2e-3
    lr_mult: float = 100.0
    weight_decay: float = 0.01
    val_fraction: float = 0.2
    seed: int = 0
    limit: int = 0  # 0: every training image; N: a seeded subset of N
    preprocessing: dict[str, Any] = field(default_factory=lambda: PreprocessSpec().to_dict())


def code_version() -> str:
    """``git rev-parse HEAD`` of this checkout, with ``-dirty`` when training/ has local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "training"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def framework_versions() -> dict[str, str]:
    """Versions of the libraries a run depends on."""
    import monai
    import sklearn

    return {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__}


def one_cycle(optimizer: torch.optim.Optimizer, max_lrs: Sequence[float], total_steps: int, pct_start: float,
              div: float = 25.0) -> torch.optim.lr_scheduler.OneCycleLR:
    """fastai's one-cycle: cosine warm-up to ``max_lrs`` over ``pct_start``, cosine down; momentum 0.95-0.85-0.95.

    Fewer than 4 steps are scheduled as 4 (torch's OneCycleLR needs >= 1 step per phase).
    """
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=list(max_lrs), total_steps=max(total_steps, 4), pct_start=pct_start, div_factor=div,
        final_div_factor=1e5 / div, base_momentum=0.85, max_momentum=0.95, cycle_momentum=True)


def discriminative_lrs(lr_low: float, lr_high: float, n_groups: int) -> list[float]:
    """fastai's ``slice(lr_low, lr_high)``: learning rates spaced geometrically, early groups lowest."""
    return list(np.geomspace(lr_low, lr_high, n_groups)) if n_groups > 1 else [lr_high]


def as_batch(x: np.ndarray) -> torch.Tensor:
    """(N, C, H, W) float32 array -> channels-last tensor (about 1.5x faster convolutions on CPU)."""
    return torch.from_numpy(np.ascontiguousarray(x)).contiguous(memory_format=torch.channels_last)


def tune_allocator() -> None:
    """Keep glibc from returning big activation buffers to the OS after every step.

    Without it, eager CPU training spends about half its time in page faults (sys time).
    Same effect as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_; a no-op off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return


@torch.inference_mode()
def predict_logits(net: nn.Module, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Model inputs (N, C, H, W) float32 -> logits (N, F) float32, eval mode."""
    net.eval()
    out = [net(as_batch(x[i:i + batch_size])).float().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def evaluate(net: nn.Module, x: np.ndarray, y: np.ndarray, pos_weight: float) -> dict[str, float]:
    """Validation loss and AUROC (first finding)."""
    logits = predict_logits(net, x)
    loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(y),
                                              pos_weight=torch.tensor([pos_weight])).item()
    auroc = float(roc_auc_score(y[:, 0], logits[:, 0])) if 0 < y[:, 0].sum() < len(y) else float("nan")
    return {"val_loss": loss, "val_auroc": auroc}


def train_epoch(net: nn.Module, x: np.ndarray, y: np.ndarray, cfg_size: int, batch_size: int,
                optimizer: torch.optim.Optimizer, scheduler, loss_fn: nn.Module, is_frozen: bool,
                generator: torch.Generator, augment: Callable | None = None, max_steps: int = 0) -> float:
    """One pass over shuffled (x, y) (last partial batch dropped); returns the mean training loss."""
    net.train()
    if is_frozen:
        freeze_body(net)
    order = torch.randperm(len(x), generator=generator).numpy()
    n_batches = max(len(x) // batch_size, 1)
    losses = []
    for b in range(n_batches if not max_steps else min(n_batches, max_steps)):
        idx = np.sort(order[b * batch_size:(b + 1) * batch_size])
        xb, yb = as_batch(x[idx]), torch.from_numpy(y[idx])
        if augment is not None:
            xb = augment(xb, generator)
        if xb.shape[-1] != cfg_size:
            xb = F.interpolate(xb, size=(cfg_size, cfg_size), mode="bilinear", antialias=True, align_corners=False)
        xb = xb.contiguous(memory_format=torch.channels_last)
        loss = loss_fn(net(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def fit_one_cycle(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lrs: Sequence[float],
                  params: Sequence[Sequence[nn.Parameter]], size: int, batch_size: int, weight_decay: float,
                  pos_weight: float, generator: torch.Generator, is_frozen: bool, pct_start: float, div: float = 25.0,
                  augment: Callable | None = None, on_epoch: Callable[[int, float], None] | None = None,
                  max_steps: int = 0) -> list[float]:
    """AdamW + one-cycle over ``epochs``; ``params`` and ``lrs`` are per layer group. Returns epoch losses."""
    optimizer = torch.optim.AdamW([{"params": list(p), "lr": lr} for p, lr in zip(params, lrs)], weight_decay=weight_decay)
    steps = max(len(x) // batch_size, 1)
    steps = min(steps, max_steps) if max_steps else steps
    scheduler = one_cycle(optimizer, lrs, steps * epochs, pct_start, div)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]))
    losses = []
    for epoch in range(epochs):
        losses.append(train_epoch(net, x, y, size, batch_size, optimizer, scheduler, loss_fn, is_frozen, generator,
                                  augment, max_steps))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return losses


def fine_tune(net: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, pos_weight: float,
              on_epoch: Callable[[dict[str, Any]], None] | None = None, augment: Callable | None = None,
              max_steps: int = 0) -> list[float]:
    """fastai's fine_tune: freeze, one cycle on the head; unfreeze, one cycle with discriminative LRs."""
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []

    def report(phase: str, size: int) -> Callable[[int, float], None]:
        start = time.perf_counter()

        def done(epoch: int, loss: float) -> None:
            nonlocal start
            if on_epoch is not None:
                on_epoch({"phase": phase, "epoch": epoch, "size": size, "train_loss": loss,
                          "train_seconds": round(time.perf_counter() - start, 1)})
            start = time.perf_counter()
        return done

    if cfg.epochs_frozen:
        freeze_body(net)
        losses += fit_one_cycle(net, x, y, cfg.epochs_frozen, [cfg.lr], [list(net._fc.parameters())], cfg.size_frozen,
                                cfg.batch_size, cfg.weight_decay, pos_weight, generator, True, pct_start=0.99,
                                augment=augment, on_epoch=report("frozen", cfg.size_frozen), max_steps=max_steps)
    if cfg.epochs:
        unfreeze(net)
        base = cfg.lr / 2
        groups = layer_groups(net)
        lrs = discriminative_lrs(base / cfg.lr_mult, base, len(groups))
        losses += fit_one_cycle(net, x, y, cfg.epochs, lrs, groups, cfg.size, cfg.batch_size, cfg.weight_decay,
                                pos_weight, generator, False, pct_start=0.3, div=5.0, augment=augment,
                                on_epoch=report("unfrozen", cfg.size), max_steps=max_steps)
    return losses


def prepare_data(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Labels, leak-checked split, and every image preprocessed once through ``triage.preprocess``."""
    examples = data.read_labels(cfg.data)
    train_idx, val_idx = data.split_patients(examples, cfg.val_fraction, cfg.seed)
    data.assert_no_leakage(examples, train_idx, val_idx)
    if cfg.limit and cfg.limit < len(train_idx):
        rng = np.random.default_rng(cfg.seed)
        train_idx = sorted(rng.choice(train_idx, cfg.limit, replace=False).tolist())
    spec = PreprocessSpec.from_dict(cfg.preprocessing)
    start = time.perf_counter()
    x_train = data.load_images(cfg.data, [examples[i] for i in train_idx], spec)
    x_val = data.load_images(cfg.data, [examples[i] for i in val_idx], spec)
    log(f"preprocessed {len(x_train) + len(x_val)} images in {time.perf_counter() - start:.0f} s")
    return {
        "examples": examples, "train_idx": train_idx, "val_idx": val_idx,
        "x_train": x_train, "y_train": data.labels_array([examples[i] for i in train_idx]),
        "x_val": x_val, "y_val": data.labels_array([examples[i] for i in val_idx]),
    }


def run(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train with ``cfg`` and write the run folder; returns the summary also saved in ``metrics.json``."""
    wall_start = time.perf_counter()
    tune_allocator()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    d = prepare_data(cfg, log)
    examples = d["examples"]
    n_pos = float(d["y_train"][:, 0].sum())
    pos_weight = (len(d["y_train"]) - n_pos) / max(n_pos, 1.0)
    split = {"method": f"patient-level, seeded ({cfg.seed}), {1 - cfg.val_fraction:.0%}/{cfg.val_fraction:.0%} of patient "
                       "groups; patients sharing a byte-identical image (md5) kept together; leakage checked: none",
             "train": data.split_summary(examples, d["train_idx"]), "validation": data.split_summary(examples, d["val_idx"])}
    config = {**asdict(cfg), "recipe": RECIPE, "findings": list(data.FINDINGS), "pos_weight": pos_weight, "split": split,
              "code_version": code_version(), "frameworks": framework_versions(), "device": "cpu",
              "torch_threads": torch.get_num_threads()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log(f"split: {split['train']} train, {split['validation']} validation; pos_weight {pos_weight:.3f}")

    net = build_model(len(data.FINDINGS), in_channels=PreprocessSpec.from_dict(cfg.preprocessing).channels,
                      image_size=cfg.size).to(memory_format=torch.channels_last)
    history: list[dict[str, Any]] = []
    best = {"val_auroc": -1.0}

    def on_epoch(entry: dict[str, Any]) -> None:
        start = time.perf_counter()
        entry.update(evaluate(net, d["x_val"], d["y_val"], pos_weight), eval_seconds=0.0)
        entry["eval_seconds"] = round(time.perf_counter() - start, 1)
        entry["elapsed_seconds"] = round(time.perf_counter() - wall_start, 1)
        history.append(entry)
        log(json.dumps(entry))
        if entry["val_auroc"] > best["val_auroc"]:
            best.update(entry)
            torch.save(net.state_dict(), out / "best.pt")
        (out / "metrics.json").write_text(json.dumps({"epochs": history, "best": best}, indent=2) + "\n")

    fine_tune(net, d["x_train"], d["y_train"], cfg, pos_weight, on_epoch, augment=default_augment())
    net.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True))
    logits = predict_logits(net, d["x_val"])
    np.savez(out / "val_predictions.npz", logits=logits, labels=d["y_val"], rows=np.array(d["val_idx"]))
    summary = {"epochs": history, "best": best, "wall_seconds": round(time.perf_counter() - wall_start, 1)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {summary['wall_seconds']:.0f} s; best validation AUROC {best['val_auroc']:.4f} -> {out}")
    return summary
