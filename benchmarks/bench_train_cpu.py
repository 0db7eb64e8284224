"""CPU training throughput: full pipeline (uint8 cache + MONAI augmentation + step) vs the pure step, side by side.

For each phase of the default recipe (head-only at its size, unfrozen at each stage
size) the two are measured in alternating rounds in one process, so both see the same
(shared) CPU: the ratio is robust, the absolute images/s are not. Also measured:
validation inference images/s at the serving size and the cache build rate. From these it
projects the default recipe's wall time on the real data (4,125 training and 1,091
validation images by default), twice: at the wall rates seen now, and "uncontended" at
the rates implied by this process's CPU time divided by its torch threads (an estimate:
it assumes the threads would each get a whole core).

Usage: python benchmarks/bench_train_cpu.py [--data DIR] [--steps 6] [--json OUT]
(``--smoke`` for a seconds-long check at 64 px on synthetic images.)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.augment import augment_batch, default_augment
from training.cache import build_cache, resolution_spec
from training.losses import masked_bce_with_logits
from training.model import build_network, freeze_body, head, layer_groups, unfreeze
from training.recipes import adamw
from training.train import TrainConfig, as_batch, predict_logits, tune_allocator
from triage.preprocess import PreprocessSpec


class Clock:
    """Accumulated wall and process CPU seconds of timed blocks."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.images = 0

    def time(self, fn, images: int) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        self.images += images

    def rates(self, threads: int) -> dict[str, float]:
        """images/s at the wall clock seen, and uncontended-estimate images/s = images / (CPU s / threads)."""
        return {"images_per_s": self.images / self.wall, "images_per_s_uncontended_est": self.images / (self.cpu / threads)}


def image_paths(data: str | None, n: int, size: int, folder: Path) -> list[str]:
    """``n`` real image paths from ``data``/labels.csv, or synthetic grey PNGs written to ``folder``."""
    if data and (Path(data) / "labels.csv").is_file():
        import csv

        with open(Path(data) / "labels.csv", newline="") as handle:
            return [str(Path(data) / row["path"]) for _, row in zip(range(n), csv.DictReader(handle))]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def measure_phase(net: torch.nn.Module, frozen: bool, size: int, cache, batch_size: int, steps: int, threads: int,
                  lr: float) -> dict[str, float]:
    """Alternate ``steps`` rounds of (pure step on a synthetic batch, full pipeline step); images/s of each."""
    if frozen:
        freeze_body(net)
        groups, lrs = [list(head(net).parameters())], [lr]
    else:
        unfreeze(net)
        groups, lrs = layer_groups(net), [lr / 100, lr / 10, lr]
    optimizer = adamw(groups, lrs, 0.01)
    augment = default_augment(size, seed=0)
    synthetic = as_batch(torch.randn(batch_size, 1, size, size))
    y = torch.from_numpy((np.arange(batch_size) % 2).astype(np.float32)[:, None])
    rng = np.random.default_rng(0)

    def step(xb: torch.Tensor) -> None:
        net.train()
        if frozen:
            freeze_body(net)
        loss = masked_bce_with_logits(net(xb), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def full() -> None:
        rows = np.sort(rng.choice(len(cache), batch_size, replace=False))
        xb = augment_batch(torch.from_numpy(cache.inputs(rows)), augment)
        step(as_batch(xb))

    def pure() -> None:
        step(synthetic)

    pure()  # warm-up both paths
    full()
    clocks = {"pure_step": Clock(), "full_pipeline": Clock()}
    for _ in range(steps):
        clocks["pure_step"].time(pure, batch_size)
        clocks["full_pipeline"].time(full, batch_size)
    out = {name: clock.rates(threads) for name, clock in clocks.items()}
    return {"pure_step": out["pure_step"], "full_pipeline": out["full_pipeline"],
            "ratio_full_over_pure": out["full_pipeline"]["images_per_s"] / out["pure_step"]["images_per_s"]}


def project(cfg: TrainConfig, phases: dict[str, dict], eval_rate: dict[str, float], cache_rate: dict[str, float],
            n_train: int, n_val: int, key: str) -> float:
    """Seconds of the recipe: caches at each size, every epoch at the full-pipeline rate, one evaluation per epoch."""
    sizes = {cfg.size} | ({cfg.size_frozen} if cfg.epochs_frozen else set()) | {s for s, _ in cfg.stages}
    seconds = len(sizes) * (n_train + n_val) / cache_rate[key]
    seconds += cfg.epochs_frozen * n_train / phases[f"frozen@{cfg.size_frozen}"]["full_pipeline"][key]
    seconds += sum(e * n_train / phases[f"unfrozen@{s}"]["full_pipeline"][key] for s, e in cfg.stages)
    return seconds + (cfg.epochs_frozen + cfg.epochs) * n_val / eval_rate[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/kermany-pneumonia-224")
    parser.add_argument("--steps", type=int, default=6, help="timed rounds per phase (each: one pure + one full step)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-train", type=int, default=4125)
    parser.add_argument("--n-val", type=int, default=1091)
    parser.add_argument("--smoke", action="store_true", help="tiny: 64 px, 2 steps, batch 4, synthetic images")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()
    tune_allocator()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    cfg = TrainConfig()
    if args.smoke:
        cfg = TrainConfig(size_frozen=48, stages=[[48, 1], [64, 1]], size=64,
                          preprocessing=PreprocessSpec(size=(64, 64)).to_dict())
        args.steps, args.batch_size, args.data = 2, 4, ""
    spec = PreprocessSpec.from_dict(cfg.preprocessing)
    n_images = max(4 * args.batch_size, 64)
    with tempfile.TemporaryDirectory() as tmp:
        paths = image_paths(args.data, n_images, cfg.size, Path(tmp))
        caches, cache_clock = {}, Clock()
        for size in sorted({cfg.size_frozen, cfg.size, *(s for s, _ in cfg.stages)}):
            cache_clock.time(lambda s=size: caches.__setitem__(s, build_cache(paths, [None] * len(paths),
                             resolution_spec(spec, s), Path(tmp) / "cache", log=lambda _: None)), len(paths))
        net = build_network(cfg.architecture, 1, spec.channels, cfg.size, pretrained=not args.smoke)
        net = net.to(memory_format=torch.channels_last)
        phases = {f"frozen@{cfg.size_frozen}": measure_phase(net, True, cfg.size_frozen, caches[cfg.size_frozen],
                                                             args.batch_size, args.steps, threads, cfg.lr)}
        for size in sorted({s for s, _ in cfg.stages}):
            phases[f"unfrozen@{size}"] = measure_phase(net, False, size, caches[size], args.batch_size, args.steps,
                                                       threads, cfg.lr / 2)
        eval_clock = Clock()
        rows = np.arange(min(len(paths), 64))
        for _ in range(max(args.steps // 2, 1)):
            eval_clock.time(lambda: predict_logits(net, caches[cfg.size], rows=rows), len(rows))
    eval_rate, cache_rate = eval_clock.rates(threads), cache_clock.rates(threads)
    result = {
        "note": "CPU shared with other jobs while measured: ratios are side by side in one process; absolute "
                "images/s are what this process got; *_uncontended_est = images / (process CPU s / torch threads)",
        "torch_threads": threads, "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
        "batch_size": args.batch_size, "recipe": cfg.recipe, "phases": phases, "eval": eval_rate, "cache_build": cache_rate,
        "projected_recipe_seconds": {
            "at_rates_seen": project(cfg, phases, eval_rate, cache_rate, args.n_train, args.n_val, "images_per_s"),
            "uncontended_est": project(cfg, phases, eval_rate, cache_rate, args.n_train, args.n_val,
                                       "images_per_s_uncontended_est")},
        "n_train": args.n_train, "n_val": args.n_val, "smoke": args.smoke,
    }
    print(f"torch {torch.__version__}, {threads} threads, load average {result['load_average_1min']:.1f} "
          f"(CPU shared: absolute figures are what this process got)")
    print(f"{'phase':<14} {'pure step img/s':>15} {'full pipeline img/s':>19} {'full/pure':>9} {'full img/s uncont. est':>22}")
    for name, p in phases.items():
        print(f"{name:<14} {p['pure_step']['images_per_s']:15.1f} {p['full_pipeline']['images_per_s']:19.1f} "
              f"{p['ratio_full_over_pure']:9.2f} {p['full_pipeline']['images_per_s_uncontended_est']:22.1f}")
    print(f"eval@{cfg.size}: {eval_rate['images_per_s']:.1f} img/s (uncontended est "
          f"{eval_rate['images_per_s_uncontended_est']:.1f}); cache build {cache_rate['images_per_s']:.0f} img/s")
    projected = result["projected_recipe_seconds"]
    print(f"projected default recipe ({args.n_train} train / {args.n_val} val images): "
          f"{projected['at_rates_seen'] / 60:.1f} min at the rates seen, {projected['uncontended_est'] / 60:.1f} min "
          "uncontended (estimate)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
