"""fast.ai-style ``fine_tune`` with progressive resizing, on CPU or one GPU.

The default recipe (``TrainConfig()``, chosen on principle, not on the validation split):
EfficientNet-Lite0 from ImageNet weights; one head-only one-cycle epoch at 160 px with the
body frozen (BatchNorm eval); then unfreeze and one one-cycle schedule across the
stages (160 px for 2 epochs, then 224 px for 1, the annealing end of the cycle) with discriminative learning rates over 3 layer
groups; AdamW; plain masked BCE (no ``pos_weight``, so the logits stay calibratable by
one temperature); MONAI augmentation (small affine, contrast, intensity, noise; no
flip). Images come from the uint8 preprocessing cache (``training.cache``); validation
is always at the serving size. On CUDA: bf16 autocast, channels_last, optional
``torch.compile``; on CPU: float32, channels_last (faster there too), no compile.

A run folder holds ``config.json``, ``metrics.json`` (one entry per epoch, ``best``,
``wall_seconds``), ``best.pt`` (best validation AUROC; the EMA weights when EMA is on),
``val_predictions.npz`` (logits, labels, rows), ``curves.png`` and, with ``lr_find``,
``lr_find.json`` + ``lr_find.png``.
"""

from __future__ import annotations

import json
import platform
import queue
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from triage.preprocess import PreprocessSpec

from . import datasets
from .sources import DataSource, LabelledSplit, as_sources, labelled_split
from .augment import augment_batch, default_augment
from .cache import CachedImages, build_cache, resolution_spec
from .calibration import expected_calibration_error
from .losses import masked_bce_with_logits, positive_weights
from .model import ARCHITECTURES, build_network, freeze_body, head, layer_groups, unfreeze
from .recipes import (
    Batch, ModelEma, adamw, discriminative_lrs, lr_find, one_cycle, plot_history, plot_lr_find, write_json)

DEFAULT_STAGES = [[160, 2], [224, 1]]


@dataclass
class TrainConfig:
    """Every setting of a training run; saved (with derived facts) as the run's ``config.json``."""

    # one source (a path, read with ``dataset``) or a list of [[data]] tables (training.sources.DataSource fields:
    # path, dataset, name, weight, options, license, description); normalized to a list of tables
    data: Any = "../shared/data/kermany-pneumonia-224"
    out: str = "runs/pneumonia"
    dataset: str = "site"  # the adapter (training.datasets.ADAPTERS) of sources that do not name one
    dataset_options: dict[str, Any] = field(default_factory=dict)  # adapter options of a plain-path source
    findings: list[str] = field(default_factory=lambda: ["pneumonia"])  # canonical names; ["auto"]: all with labels
    triage_finding: str = ""  # the finding that orders the worklist (default: the first)
    name: str = ""  # bundle name at export (default: cxr-<findings>)
    version: str = "0.1.0"  # bundle version at export
    architecture: str = "efficientnet-lite0"  # or densenet121
    weights: str = ""  # a state dict file to start from (DenseNet-121: else random init)
    epochs_frozen: int = 1
    size_frozen: int = 160
    stages: list[list[int]] = field(default_factory=lambda: [list(s) for s in DEFAULT_STAGES])  # unfrozen (size, epochs)
    size: int = 224  # serving size: validation, export
    epochs: int = 0  # derived: unfrozen epochs in all stages (kept for the export's config contract)
    batch_size: int = 32
    lr: float = 2e-3  # head learning rate; unfrozen: slice(lr / 2 / lr_mult, lr / 2)
    lr_mult: float = 100.0
    weight_decay: float = 0.01
    pct_start: float = 0.3
    pos_weight: str = "none"  # "none" or "balanced" (negatives/positives per finding)
    label_smoothing: float = 0.0
    ema: float = 0.0  # EMA decay per step (e.g. 0.99); 0: off
    batchnorm_eval: bool = False  # keep BatchNorm statistics fixed when unfrozen (finetune: a small site's batches)
    augment: bool = True
    augment_preset: str = "transfer"  # training.augment.PRESETS: "transfer" (wider, blur) or "light" (the 0.2 recipe)
    flip: bool = False
    val_fraction: float = 0.2
    seed: int = 0
    limit: int = 0  # 0: every training image; N: a seeded subset of N
    device: str = "auto"  # auto, cpu, cuda
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True
    compile: bool = False  # torch.compile, CUDA only
    cache_dir: str = ""  # default: <out>/../.cache
    lr_find: bool = False  # run the LR finder first (lr_find.png/json), then train
    lr_find_only: bool = False
    preprocessing: dict[str, Any] = field(default_factory=lambda: PreprocessSpec().to_dict())

    def __post_init__(self) -> None:
        self.stages = [[int(s), int(e)] for s, e in self.stages]
        self.epochs = sum(e for _, e in self.stages)
        problems = []
        try:
            data = ({"path": self.data, "dataset": self.dataset, "options": self.dataset_options}
                    if isinstance(self.data, (str, Path)) else self.data)
            self.data = [s.to_dict() for s in as_sources(data, self.dataset)]
        except ValueError as error:
            problems.append(str(error))
        if self.architecture not in ARCHITECTURES:
            problems.append(f"architecture={self.architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
        if self.dataset not in datasets.ADAPTERS:
            problems.append(f"dataset={self.dataset!r}: choose one of {', '.join(datasets.ADAPTERS)}")
        if self.pos_weight not in ("none", "balanced"):
            problems.append(f"pos_weight={self.pos_weight!r}: choose none or balanced")
        if any(s < 32 or e < 0 for s, e in self.stages) or self.size_frozen < 32:
            problems.append(f"stages={self.stages}, size_frozen={self.size_frozen}: sizes >= 32 and epochs >= 0")
        if not 0 <= self.ema < 1:
            problems.append(f"ema={self.ema}: a decay in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device={self.device!r}: choose auto, cpu or cuda")
        if problems:
            raise ValueError("training config: " + "; ".join(problems))

    @property
    def sources(self) -> list[DataSource]:
        """The run's data sources."""
        return as_sources(self.data, self.dataset)

    @property
    def recipe(self) -> str:
        """One sentence describing the recipe, for the run's config and the model card."""
        stages = ", ".join(f"{e} epoch(s) at {s} px" for s, e in self.stages)
        extras = [f"weight EMA {self.ema}" if self.ema else "", f"label smoothing {self.label_smoothing}"
                  if self.label_smoothing else "", "pos_weight negatives/positives" if self.pos_weight == "balanced" else ""]
        return (f"fine_tune {self.architecture}: {self.epochs_frozen} head-only one-cycle epoch(s) at {self.size_frozen} px "
                f"(body frozen, BatchNorm eval), then unfreeze and one one-cycle schedule over {stages} with "
                f"discriminative learning rates slice(lr/2/lr_mult, lr/2) over 3 layer groups; AdamW, masked BCE"
                + "".join(f", {e}" for e in extras if e)
                + (f", MONAI augmentation ({self.augment_preset}: affine, gamma contrast, intensity"
                   + (", blur" if self.augment_preset == "transfer" else "") + ", noise"
                   + (", flips)" if self.flip else "; no flips)") if self.augment else ", no augmentation")
                + f"; sources {', '.join(f'{s.name} (weight {s.weight:g})' for s in self.sources)}")


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """A ``TrainConfig`` from a TOML or JSON file (keys = field names), then ``overrides`` (not None) on top."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({error})") from None
    known = {f.name for f in fields(TrainConfig)}
    ignored = {"recipe", "split", "code_version", "frameworks", "torch_threads", "pos_weights", "n_train", "cache",
               "dataset_kind"}  # what a run adds to its config.json, so a run's config can be trained again
    unknown = set(values) - known - ignored
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}. Fix: use TrainConfig fields ({', '.join(sorted(known))})")
    values = {k: v for k, v in values.items() if k in known and k != "epochs"}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


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


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no GPU. Fix: --device cpu (or auto), or install CUDA torch")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's global generator."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def as_batch(x: np.ndarray | torch.Tensor, device: torch.device | str = "cpu", channels_last: bool = True) -> torch.Tensor:
    """(N, C, H, W) float32 -> tensor on ``device``, channels-last when asked."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    t = t.to(device, non_blocking=True)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


@torch.inference_mode()
def predict_logits(net: nn.Module, x: np.ndarray | CachedImages, batch_size: int = 64, rows: Sequence[int] | None = None,
                   device: torch.device | str = "cpu", amp: bool = False) -> np.ndarray:
    """Logits (N, F) float32 in eval mode of model inputs (N, C, H, W) float32, or of ``rows`` of a cache."""
    net.eval()
    n = len(rows) if rows is not None else len(x)
    out = []
    for i in range(0, n, batch_size):
        chunk = x.inputs(rows[i:i + batch_size]) if isinstance(x, CachedImages) else x[i:i + batch_size]
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            out.append(net(as_batch(chunk, device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def auroc_per_finding(logits: np.ndarray, y: np.ndarray) -> list[float]:
    """AUROC of each column over known labels; NaN where a column lacks both classes."""
    out = []
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        yj = y[known, j]
        out.append(float(roc_auc_score(yj, logits[known, j])) if 0 < yj.sum() < len(yj) else float("nan"))
    return out


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there is none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def validation_metrics(logits: np.ndarray, y: np.ndarray, by_source: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Masked BCE, AUROC per finding (first finding as ``val_auroc``) and raw ECE of the first finding.

    With several sources (``by_source``: name -> positions), ``val_auroc`` is the mean of the per-source
    AUROCs of the first finding (``val_auroc_by_source``), so a small source counts as much as a large one
    when the best epoch is chosen; ``val_auroc_pooled`` is the AUROC over all validation images.
    """
    loss = masked_bce_with_logits(torch.from_numpy(logits), torch.from_numpy(y)).item()
    aurocs = auroc_per_finding(logits, y)
    known = ~np.isnan(y[:, 0])
    risks = 1.0 / (1.0 + np.exp(-logits[known, 0].astype(np.float64)))
    out = {"val_loss": loss, "val_auroc": aurocs[0], "val_auroc_mean": nanmean(aurocs),
           "val_ece_raw": float(expected_calibration_error(risks, y[known, 0]))}
    if len(aurocs) > 1:
        out["val_auroc_per_finding"] = [round(a, 6) for a in aurocs]
    if by_source and len(by_source) > 1:
        per = {name: auroc_per_finding(logits[pos], y[pos])[0] for name, pos in by_source.items()}
        out.update(val_auroc_pooled=aurocs[0], val_auroc_by_source={k: round(v, 6) for k, v in per.items()},
                   val_auroc=nanmean(list(per.values())))
    return out


# --- data -------------------------------------------------------------------------------------


def prepare_split(cfg: TrainConfig, log: Callable[[str], None] = print) -> LabelledSplit:
    """The run's sources read, labelled over its findings and split by patient per source (``training.sources``)."""
    return labelled_split(cfg.sources, cfg.findings, cfg.val_fraction, cfg.seed, cfg.limit, log)


class Caches:
    """One ``CachedImages`` per size over the rows a run uses; ``get(size)`` builds lazily."""

    def __init__(self, records: Sequence[datasets.Record], rows: Sequence[int], spec: PreprocessSpec, cache_dir: Path,
                 log: Callable[[str], None] = print) -> None:
        self.rows = np.asarray(sorted(rows))
        self.paths = [records[i].path for i in self.rows]
        self.md5s = [records[i].md5 for i in self.rows]
        self.spec, self.cache_dir, self.log = spec, cache_dir, log
        self.built: dict[int, CachedImages] = {}

    def get(self, size: int) -> CachedImages:
        if size not in self.built:
            self.built[size] = build_cache(self.paths, self.md5s, resolution_spec(self.spec, size), self.cache_dir, self.log)
        return self.built[size]

    def positions(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions in the caches of record ``rows``."""
        return np.searchsorted(self.rows, np.asarray(rows))


def epoch_order(n: int, generator: torch.Generator, weights: np.ndarray | None = None) -> np.ndarray:
    """The training images of one epoch: a permutation of ``n``, or with unequal ``weights`` (n,) ``n`` draws
    with replacement, each image with probability proportional to its weight (source weights)."""
    if weights is None or np.allclose(weights, weights[0]):
        return torch.randperm(n, generator=generator).numpy()
    return torch.multinomial(torch.from_numpy(np.asarray(weights, np.float64)), n, replacement=True,
                             generator=generator).numpy()


def training_batches(cache: CachedImages, positions: np.ndarray, y: np.ndarray, batch_size: int,
                     generator: torch.Generator, augment: Callable | None, device: torch.device,
                     channels_last: bool, weights: np.ndarray | None = None) -> Iterator[Batch]:
    """One epoch of shuffled batches (last partial batch dropped): uint8 cache -> inputs -> augmentation -> device.

    ``y`` and ``weights`` (sampling weights, None: uniform) are aligned with ``positions``.
    """
    order = epoch_order(len(positions), generator, weights)
    for b in range(max(len(positions) // batch_size, 1)):
        pick = np.sort(order[b * batch_size:(b + 1) * batch_size])
        xb = torch.from_numpy(cache.inputs(positions[pick]))
        if augment is not None:
            xb = augment_batch(xb, augment)
        yield as_batch(xb, device, channels_last), torch.from_numpy(y[pick]).to(device, non_blocking=True)


def prefetched(batches: Iterator[Batch], depth: int = 3) -> Iterator[Batch]:
    """Produce ``batches`` in a background thread (for a GPU: the CPU prepares the next batches while it steps)."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for batch in batches:
                slots.put(batch)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consuming thread below
            slots.put(error)
        slots.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (item := slots.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class Trainer:
    """The mutable state of one run: network, loss, device, optional EMA and compiled forward."""

    net: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    amp: bool = False
    ema: ModelEma | None = None
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None

    def step(self, xb: torch.Tensor, yb: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler) -> torch.Tensor:
        """Forward (bf16 autocast on CUDA when ``amp``), masked loss in float32, backward, step, EMA update."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = (self.forward or self.net)(xb)
        loss = self.loss_fn(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if self.ema is not None:
            self.ema.update(self.net)
        return loss.detach()

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are evaluated and saved: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.net


def run_phase(trainer: Trainer, epochs: Sequence[tuple[int, CachedImages]], positions: np.ndarray, y: np.ndarray,
              groups: Sequence[Sequence[nn.Parameter]], lrs: Sequence[float], cfg: TrainConfig, frozen: bool,
              generator: torch.Generator, on_epoch: Callable[[dict[str, Any]], None], phase: str,
              max_steps: int = 0, weights: np.ndarray | None = None) -> list[float]:
    """One AdamW + one-cycle schedule over ``epochs`` (one (size, cache) per epoch); returns epoch mean losses.

    ``weights`` (aligned with ``positions``): per-image sampling weights (None: every image once per epoch)."""
    optimizer = adamw(groups, lrs, cfg.weight_decay)
    per_epoch = max(len(positions) // cfg.batch_size, 1)
    per_epoch = min(per_epoch, max_steps) if max_steps else per_epoch
    scheduler = one_cycle(optimizer, lrs, per_epoch * len(epochs), pct_start=0.99 if frozen else cfg.pct_start,
                          div=25.0 if frozen else 5.0)
    losses = []
    for epoch, (size, cache) in enumerate(epochs):
        start = time.perf_counter()
        trainer.net.train()
        if frozen:
            freeze_body(trainer.net)
        elif cfg.batchnorm_eval:
            batchnorm_eval(trainer.net)
        augment = default_augment(size, seed=cfg.seed * 1000 + len(losses) + (0 if frozen else 500), flip=cfg.flip,
                                  preset=cfg.augment_preset) if cfg.augment else None
        batches = training_batches(cache, positions, y, cfg.batch_size, generator, augment, trainer.device,
                                   cfg.channels_last, weights)
        if trainer.device.type == "cuda":
            batches = prefetched(batches)
        step_losses = [trainer.step(xb, yb, optimizer, scheduler) for _, (xb, yb) in zip(range(per_epoch), batches)]
        losses.append(float(torch.stack(step_losses).mean()))
        seconds = time.perf_counter() - start
        on_epoch({"phase": phase, "epoch": epoch, "size": size, "train_loss": losses[-1], "train_seconds": round(seconds, 1),
                  "images_per_second": round(per_epoch * cfg.batch_size / seconds, 1)})
    return losses


def batchnorm_eval(net: nn.Module) -> None:
    """Every BatchNorm layer in eval mode: normalize with the running statistics and leave them as they are."""
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def fine_tune(trainer: Trainer, caches: Caches, train_idx: Sequence[int], y: np.ndarray, cfg: TrainConfig,
              on_epoch: Callable[[dict[str, Any]], None], max_steps: int = 0,
              weights: np.ndarray | None = None) -> list[float]:
    """fastai's fine_tune with progressive resizing: frozen head epochs, then unfreeze and one cycle over the stages.

    ``weights`` (len(train_idx),): sampling weight of each training image (None: uniform)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    positions, y_train = caches.positions(train_idx), y[np.asarray(train_idx)]
    net, losses = trainer.net, []
    if cfg.epochs_frozen:
        freeze_body(net)
        epochs = [(cfg.size_frozen, caches.get(cfg.size_frozen))] * cfg.epochs_frozen
        losses += run_phase(trainer, epochs, positions, y_train, [list(head(net).parameters())], [cfg.lr], cfg, True,
                            generator, on_epoch, "frozen", max_steps, weights)
    if cfg.epochs:
        unfreeze(net)
        groups = layer_groups(net)
        lrs = discriminative_lrs(cfg.lr / 2 / cfg.lr_mult, cfg.lr / 2, len(groups))
        epochs = [(size, caches.get(size)) for size, n in cfg.stages for _ in range(n)]
        losses += run_phase(trainer, epochs, positions, y_train, groups, lrs, cfg, False, generator, on_epoch,
                            "unfrozen", max_steps, weights)
    return losses


def make_loss(cfg: TrainConfig, y_train: np.ndarray, device: torch.device) -> tuple[Callable, list[float] | None]:
    """Masked BCE with the configured ``pos_weight`` and label smoothing; also the weights used (or None)."""
    weights = positive_weights(y_train) if cfg.pos_weight == "balanced" else None
    pos = torch.from_numpy(weights).to(device) if weights is not None else None

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return masked_bce_with_logits(logits, targets, pos_weight=pos, label_smoothing=cfg.label_smoothing)

    return loss_fn, (weights.tolist() if weights is not None else None)


def build_trainer(cfg: TrainConfig, n_findings: int, loss_fn: Callable, device: torch.device,
                  log: Callable[[str], None] = print) -> Trainer:
    """Network on ``device`` (channels_last when asked), EMA when ``cfg.ema``, compiled forward on CUDA when asked."""
    spec = PreprocessSpec.from_dict(cfg.preprocessing)
    net = build_network(cfg.architecture, n_findings, spec.channels, cfg.size, pretrained=True,
                        weights=cfg.weights or None).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    forward = None
    if cfg.compile and device.type == "cuda":
        forward = torch.compile(net)
    elif cfg.compile:
        log("compile: ignored on CPU (eager float32 is the CPU path)")
    return Trainer(net, loss_fn, device, amp=cfg.amp and device.type == "cuda", ema=ModelEma(net, cfg.ema) if cfg.ema else None,
                   forward=forward)


def find_lr(trainer: Trainer, caches: Caches, train_idx: Sequence[int], y: np.ndarray, cfg: TrainConfig,
            out: Path, steps: int = 100) -> dict[str, Any]:
    """The LR range test for the unfrozen phase (layer-group ratios of ``slice(lr/lr_mult, lr)``), at the first
    stage size; writes ``lr_find.json`` and ``lr_find.png`` in ``out``."""
    net = trainer.net
    unfreeze(net)
    groups = layer_groups(net)
    ratios = [v / (cfg.lr / 2) for v in discriminative_lrs(cfg.lr / 2 / cfg.lr_mult, cfg.lr / 2, len(groups))]
    size = cfg.stages[0][0] if cfg.stages else cfg.size
    positions, y_train = caches.positions(train_idx), y[np.asarray(train_idx)]
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    augment = default_augment(size, seed=cfg.seed + 1, flip=cfg.flip, preset=cfg.augment_preset) if cfg.augment else None

    def endless() -> Iterator[Batch]:
        while True:
            yield from training_batches(caches.get(size), positions, y_train, cfg.batch_size, generator, augment,
                                        trainer.device, cfg.channels_last)

    result = lr_find(net, endless(), trainer.loss_fn, groups, ratios, steps=steps, weight_decay=cfg.weight_decay)
    result["note"] = ("lr is the head group's; earlier groups get lr x " + ", ".join(f"{r:.3g}" for r in ratios) +
                      f"; the unfrozen phase uses lr/2 = {cfg.lr / 2:.2e} for the head group (config lr {cfg.lr:.2e})")
    write_json(out / "lr_find.json", result)
    plot_lr_find(result, out / "lr_find.png")
    return result


def run(cfg: TrainConfig, log: Callable[[str], None] = print, max_steps: int = 0) -> dict[str, Any]:
    """Train with ``cfg`` and write the run folder; returns the summary also saved in ``metrics.json``.

    ``max_steps`` (tests) caps the batches per epoch.
    """
    wall_start = time.perf_counter()
    tune_allocator()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    d = prepare_split(cfg, log)
    records, y, train_idx, val_idx = d.records, d.y, d.train_idx, d.val_idx
    spec = PreprocessSpec.from_dict(cfg.preprocessing)
    if tuple(spec.size) != (cfg.size, cfg.size):
        raise ValueError(f"size={cfg.size} but preprocessing size={list(spec.size)}: the serving size is the "
                         "preprocessing's. Fix: make them agree")
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / ".cache"
    caches = Caches(records, sorted(set(train_idx) | set(val_idx)), spec, cache_dir, log)
    loss_fn, pos_weights = make_loss(cfg, y[train_idx], device)
    split = d.describe(cfg.val_fraction, cfg.seed)
    config = {**asdict(cfg), "recipe": cfg.recipe, "findings": d.findings, "pos_weights": pos_weights, "split": split,
              "code_version": code_version(), "frameworks": framework_versions(), "device": device.type,
              "torch_threads": torch.get_num_threads()}
    write_json(out / "config.json", config)
    log(f"split: {split['train']} train, {split['validation']} validation; findings {d.findings}; device {device}")

    trainer = build_trainer(cfg, len(d.findings), loss_fn, device, log)
    if cfg.lr_find or cfg.lr_find_only:
        result = find_lr(trainer, caches, train_idx, y, cfg, out)
        log(f"lr_find: suggested head lr {result['suggested']:.2e} (steepest), min/10 {result['min_div_10']:.2e} "
            f"-> {out / 'lr_find.png'}")
        if cfg.lr_find_only:
            return {"lr_find": {k: result[k] for k in ("suggested", "steep", "min_div_10")}}
        seed_everything(cfg.seed)  # training then draws the same random numbers with or without the LR finder

    val_cache, val_pos, y_val = caches.get(cfg.size), caches.positions(val_idx), y[val_idx]
    val_sources = d.source_rows(val_idx)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"val_auroc": -1.0}

    def on_epoch(entry: dict[str, Any]) -> None:
        start = time.perf_counter()
        logits = predict_logits(trainer.evaluated, val_cache, rows=val_pos, device=device, amp=trainer.amp)
        entry.update(validation_metrics(logits, y_val, val_sources), weights="ema" if trainer.ema is not None else "raw")
        entry["eval_seconds"] = round(time.perf_counter() - start, 1)
        entry["elapsed_seconds"] = round(time.perf_counter() - wall_start, 1)
        history.append(entry)
        log(json.dumps(entry))
        if entry["val_auroc"] > best["val_auroc"] or np.isnan(best["val_auroc"]):
            best.clear()
            best.update(entry)
            save_checkpoint(trainer, out / "best.pt")
        write_json(out / "metrics.json", {"epochs": history, "best": best})

    fine_tune(trainer, caches, train_idx, y, cfg, on_epoch, max_steps, d.sample_weights())
    if not (out / "best.pt").is_file():
        save_checkpoint(trainer, out / "best.pt")
    final = trainer.evaluated
    final.load_state_dict(torch.load(out / "best.pt", map_location=device, weights_only=True))
    logits = predict_logits(final, val_cache, rows=val_pos, device=device, amp=trainer.amp)
    np.savez(out / "val_predictions.npz", logits=logits, labels=y_val, rows=np.array(val_idx))
    summary = {"epochs": history, "best": best, "wall_seconds": round(time.perf_counter() - wall_start, 1)}
    write_json(out / "metrics.json", summary)
    if history:
        plot_history(history, out / "curves.png")
    log(f"done in {summary['wall_seconds']:.0f} s; best validation AUROC {best['val_auroc']:.4f} -> {out}")
    return summary


def save_checkpoint(trainer: Trainer, path: str | Path) -> Path:
    """Save the evaluated weights (EMA when on, else raw) as a CPU state dict (``best.pt``)."""
    torch.save(state_dict_cpu(trainer.evaluated), path)
    return Path(path)


def state_dict_cpu(net: nn.Module) -> dict[str, torch.Tensor]:
    """A network's state dict on the CPU, contiguous (loads anywhere, channels_last or not)."""
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
