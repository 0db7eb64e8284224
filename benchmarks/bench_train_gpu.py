"""GPU training throughput and time to AUROC, one prepared script (not yet run on a GPU).

1. Side by side, in alternating rounds in one process: the full pipeline (uint8 cache ->
   MONAI augmentation on the CPU in a prefetch thread -> device, bf16 autocast,
   channels_last) vs the pure training step on synthetic tensors already on the device,
   same model, same batch size. Goal: full / pure >= 0.85.
2. Wall time of the default recipe on the real data, with the validation AUROC after
   each epoch, and the first elapsed time at which validation AUROC >= 0.98.

Usage: python benchmarks/bench_train_gpu.py [--data DIR] [--json benchmarks/results/train_gpu.json]
``--smoke``: a seconds-long CPU run (64 px, synthetic images, 2 steps) so the script is tested.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from training.augment import augment_batch, default_augment
from training.cache import build_cache, resolution_spec
from training.losses import masked_bce_with_logits
from training.model import build_network, layer_groups
from training.recipes import adamw
from training.train import TrainConfig, as_batch, prefetched, run
from triage.preprocess import PreprocessSpec


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(device: torch.device, size: int, batch_size: int, steps: int, paths: list[str], cache_dir: Path,
               amp: bool, compile_model: bool, repeats: int = 5) -> dict[str, float]:
    """images/s of the pure step (synthetic on-device tensors) and of the full pipeline, alternating rounds."""
    spec = resolution_spec(PreprocessSpec(), size)
    cache = build_cache(paths, [None] * len(paths), spec, cache_dir, log=lambda _: None)
    net = build_network("efficientnet-lite0", 1, 1, size, pretrained=device.type == "cuda").to(device)
    net = net.to(memory_format=torch.channels_last)
    forward = torch.compile(net) if compile_model else net
    groups = layer_groups(net)
    optimizer = adamw(groups, [1e-5, 1e-4, 1e-3], 0.01)
    synthetic = as_batch(torch.randn(batch_size, 1, size, size), device)
    y = torch.from_numpy((np.arange(batch_size) % 2).astype(np.float32)[:, None]).to(device)
    rng = np.random.default_rng(0)
    augment = default_augment(size, seed=0)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = forward(xb)
        loss = masked_bce_with_logits(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def full_batches():
        while True:
            rows = np.sort(rng.choice(len(cache), batch_size, replace=len(cache) < batch_size))
            xb = augment_batch(torch.from_numpy(cache.inputs(rows)), augment)
            yield as_batch(xb.pin_memory() if device.type == "cuda" else xb, device), y

    net.train()
    stream = prefetched(full_batches()) if device.type == "cuda" else full_batches()
    for _ in range(3 if repeats > 1 else 1):  # warm-up (and compilation)
        step(synthetic, y)
        step(*next(stream))
    synchronize(device)
    seconds = {"pure": 0.0, "full": 0.0}
    for _ in range(steps):
        for name in ("pure", "full"):
            start = time.perf_counter()
            for _ in range(repeats):
                step(*(next(stream) if name == "full" else (synthetic, y)))
            synchronize(device)
            seconds[name] += time.perf_counter() - start
    pure, full = steps * repeats * batch_size / seconds["pure"], steps * repeats * batch_size / seconds["full"]
    return {"size": size, "pure_step_images_per_s": pure, "full_pipeline_images_per_s": full, "ratio_full_over_pure": full / pure}


def time_to_auroc(cfg: TrainConfig, target: float = 0.98) -> dict:
    """Train ``cfg``; the elapsed seconds at the first epoch whose validation AUROC >= ``target``."""
    summary = run(cfg, log=lambda line: print(line, flush=True))
    hit = next((e for e in summary["epochs"] if e["val_auroc"] >= target), None)
    return {"target_auroc": target, "seconds_to_target": hit["elapsed_seconds"] if hit else None,
            "best_val_auroc": summary["best"]["val_auroc"], "wall_seconds": summary["wall_seconds"],
            "epochs": [{k: e[k] for k in ("phase", "size", "val_auroc", "elapsed_seconds", "images_per_second")}
                       for e in summary["epochs"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/kermany-pneumonia-224")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="alternating rounds of 5 steps each")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--out", default="", help="run folder for the timed training (default: a temporary folder)")
    parser.add_argument("--json", default="", help="also write the figures here")
    parser.add_argument("--smoke", action="store_true", help="CPU, 64 px, synthetic images, 2 rounds, tiny training run")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.smoke:
            from PIL import Image

            (tmp / "images").mkdir()
            rng = np.random.default_rng(0)
            rows = ["path,patient_id,pneumonia"]
            for i in range(24):
                Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp / "images" / f"{i}.png")
                rows.append(f"images/{i}.png,P{i},{i % 2}")
            (tmp / "labels.csv").write_text("\n".join(rows) + "\n")
            paths = [str(tmp / "images" / f"{i}.png") for i in range(24)]
            sizes, batch_size, steps = [64], 4, 2
            cfg = TrainConfig(data=str(tmp / "labels.csv"), dataset="csv", out=str(tmp / "run"), size=64, size_frozen=48,
                              stages=[[48, 1], [64, 1]], batch_size=4, cache_dir=str(tmp / "cache"), device="cpu",
                              preprocessing=PreprocessSpec(size=(64, 64)).to_dict(), val_fraction=0.25)
        else:
            import csv

            with open(Path(args.data) / "labels.csv", newline="") as handle:
                paths = [str(Path(args.data) / r["path"]) for _, r in zip(range(512), csv.DictReader(handle))]
            sizes, batch_size, steps = [160, 224], args.batch_size, args.steps
            cfg = TrainConfig(data=args.data, out=args.out or str(tmp / "run"), batch_size=batch_size, device="cuda",
                              compile=args.compile, cache_dir=str(tmp / "cache"))
        rates = [throughput(device, s, batch_size, steps, paths, tmp / "cache", amp=device.type == "cuda",
                            compile_model=args.compile and device.type == "cuda", repeats=1 if args.smoke else 5)
                 for s in sizes]
        for r in rates:
            print(f"{device.type} {r['size']} px batch {batch_size}: pure step {r['pure_step_images_per_s']:.1f} img/s, "
                  f"full pipeline {r['full_pipeline_images_per_s']:.1f} img/s, full/pure {r['ratio_full_over_pure']:.2f}")
        timing = time_to_auroc(cfg)
    print(f"recipe wall {timing['wall_seconds']:.0f} s, best validation AUROC {timing['best_val_auroc']:.4f}, "
          f"seconds to AUROC >= 0.98: {timing['seconds_to_target']}")
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)", "torch": torch.__version__,
              "batch_size": batch_size, "throughput": rates, "time_to_auroc": timing, "smoke": args.smoke}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
