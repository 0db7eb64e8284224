"""``train``, ``export`` and ``evaluate`` subcommands; torch is imported inside them, not here.

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
        manifest = export_bundle(args.run_dir, args.out, data_dir=args.data, int8=args.int8)
    except (FileNotFoundError, ParityError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    metrics = manifest["metrics"]
    print(f"bundle {args.out}: validation AUROC {metrics['validation']['auroc']:.4f}, "
          f"threshold {manifest['operating_point']['threshold']:.4f}, "
          f"parity {metrics['parity']['max_abs_risk_diff']:.2e}, "
          f"pipeline parity {metrics['parity'].get('pipeline_max_abs_risk_diff', float('nan')):.2e}, "
          f"serves {manifest['model'].get('precision', 'fp32')} {manifest['model']['file']}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """Evaluate a bundle or run on a labelled data folder and write the report."""
    from triage.errors import TriageError

    from .evaluate import EvaluationError, evaluate

    try:
        metrics = evaluate(args.source, args.data, args.out, split=args.split, n_boot=args.bootstrap, seed=args.seed,
                           device=args.device, log=lambda line: print(line, flush=True))
    except (FileNotFoundError, EvaluationError, TriageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ci, rate = metrics["auroc"]["ci95"], metrics["flag_rate_5pct"]
    print(f"{metrics['split']['name']} n={metrics['n']}: AUROC {metrics['auroc']['value']:.4f} "
          f"(95% CI {ci['low']:.4f}-{ci['high']:.4f}), ECE {metrics['calibration']['ece_calibrated']:.4f}; top 5%: "
          f"PPV {rate['ppv']:.3f}, sensitivity {rate['sensitivity']:.3f}, NPV {rate['npv']:.3f}")
    return 0


def add_evaluate_parser(subparsers) -> None:
    """Register ``evaluate`` (numpy, ONNX Runtime, matplotlib; torch only to run a run's checkpoint)."""
    evaluate = subparsers.add_parser("evaluate", help="evaluate a bundle or training run: metrics, plots, HTML report",
                                     description="AUROC with bootstrap CI, operating points, calibration, top losses and "
                                                 "subgroups on the training's patient split; PNGs + index.html + metrics.json.")
    evaluate.add_argument("source", metavar="RUN_OR_BUNDLE", help="bundle folder (manifest.json) or run folder (config.json)")
    evaluate.add_argument("data", metavar="DATA", help="labelled data folder with labels.csv, e.g. " + DEFAULT_DATA)
    evaluate.add_argument("--out", required=True, help="report folder to write (index.html, metrics.json, PNGs)")
    evaluate.add_argument("--split", choices=("validation", "all"), default="validation",
                          help="validation: the held-out patients of the training split (default); all: every image")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the CIs (default 1000)")
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed (the split seed comes from the model)")
    evaluate.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="ONNX Runtime device")
    evaluate.set_defaults(func=evaluate_command)


def add_parsers(subparsers) -> None:
    """Register ``train``, ``export`` and ``evaluate`` on an ``argparse`` subparsers object."""
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
                                   description="Export to ONNX (logits, in-graph CAM, pooled features), check parity "
                                               "(validation images, CAM, DICOM -> risk), calibrate, fit the "
                                               "out-of-distribution gate, write the bundle.")
    export.add_argument("run_dir", help="run folder written by 'train'")
    export.add_argument("--out", required=True, help="bundle folder to write, e.g. models/pneumonia-demo")
    export.add_argument("--data", default=None, help="data folder (default: the one in the run's config.json)")
    export.add_argument("--int8", action="store_true",
                        help="also build a static QDQ int8 model (calibrated on training images) and serve it if its "
                             "validation AUROC drops by <= 0.005; ms/image of both go in the manifest")
    export.set_defaults(func=export_command)
    add_evaluate_parser(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m training.cli {train,export} ...``."""
    parser = argparse.ArgumentParser(prog="python -m training.cli")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
