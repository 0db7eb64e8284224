"""``train`` and ``export`` subcommands; torch is imported inside them, not here.

``deploy.cli`` calls ``add_parsers``; ``python -m training.cli train ...`` also works.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEFAULT_DATA = "../shared/data/kermany-pneumonia-224"


def train_command(args: argparse.Namespace) -> int:
    """Run the fine-tune recipe and write the run folder."""
    from .train import TrainConfig, run

    cfg = TrainConfig(data=args.data, out=args.out, epochs_frozen=args.epochs_frozen, epochs=args.epochs,
                      size_frozen=args.size_frozen, size=args.size, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, limit=args.limit)
    try:
        summary = run(cfg, log=lambda line: print(line, flush=True))
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if summary["best"]["val_auroc"] >= 0 else 1


def export_command(args: argparse.Namespace) -> int:
    """Export a run folder to a verified model bundle."""
    from .export import ParityError, export_bundle

    try:
        manifest = export_bundle(args.run_dir, args.out, data_dir=args.data)
    except (FileNotFoundError, ParityError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    metrics = manifest["metrics"]
    print(f"bundle {args.out}: validation AUROC {metrics['validation']['auroc']:.4f}, "
          f"threshold {manifest['operating_point']['threshold']:.4f}, "
          f"parity {metrics['parity']['max_abs_risk_diff']:.2e}")
    return 0


def add_parsers(subparsers) -> None:
    """Register ``train`` and ``export`` on an ``argparse`` subparsers object."""
    train = subparsers.add_parser("train", help="fine-tune the pneumonia model (needs the train extra: torch, monai)",
                                  description="Fine-tune EfficientNet-Lite0 from ImageNet weights on Kermany pneumonia.")
    train.add_argument("--data", default=DEFAULT_DATA, help=f"kermany-pneumonia-224 folder (default {DEFAULT_DATA})")
    train.add_argument("--out", required=True, help="run folder to write (config, metrics, checkpoint)")
    train.add_argument("--epochs-frozen", type=int, default=1, help="head-only epochs (default 1)")
    train.add_argument("--epochs", type=int, default=1, help="unfrozen epochs (default 1)")
    train.add_argument("--size-frozen", type=int, default=160, help="image size of the head-only epochs (default 160)")
    train.add_argument("--size", type=int, default=224, help="image size of the unfrozen epochs (default 224)")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=2e-3, help="head learning rate; the body gets lr/2 down to lr/200")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--limit", type=int, default=0, help="train on a seeded subset of N images (0: all)")
    train.set_defaults(func=train_command)

    export = subparsers.add_parser("export", help="export a training run to a model bundle (ONNX + manifest + card)",
                                   description="Export to ONNX, check parity, calibrate, write the bundle.")
    export.add_argument("run_dir", help="run folder written by 'train'")
    export.add_argument("--out", required=True, help="bundle folder to write, e.g. models/pneumonia-demo")
    export.add_argument("--data", default=None, help="data folder (default: the one in the run's config.json)")
    export.set_defaults(func=export_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m training.cli {train,export} ...``."""
    parser = argparse.ArgumentParser(prog="python -m training.cli")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
