"""``train``, ``export`` and ``evaluate`` subcommands; torch is imported inside them, not here.

``deploy.cli`` calls ``add_parsers``; ``python -m training.cli train ...`` also works.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

DEFAULT_DATA = "../shared/data/kermany-pneumonia-224"
T = TypeVar("T")


def parse_stages(text: str) -> list[list[int]]:
    """``"160:1,224:2"`` -> ``[[160, 1], [224, 2]]`` (size:epochs of each unfrozen stage)."""
    try:
        return [[int(part.split(":")[0]), int(part.split(":")[1])] for part in text.split(",") if part.strip()]
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"--stages {text!r}: write SIZE:EPOCHS pairs, e.g. 160:1,224:2") from None


def train_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields set on the command line (None: not given, the config file or default stands)."""
    keys = ("data", "out", "dataset", "architecture", "weights", "epochs_frozen", "size_frozen", "stages", "batch_size",
            "lr", "lr_mult", "weight_decay", "pos_weight", "label_smoothing", "ema", "val_fraction", "seed", "limit",
            "device", "cache_dir")
    values = {key: getattr(args, key) for key in keys}
    values["findings"] = args.findings.split(",") if args.findings else None
    if args.size is not None:
        from triage.preprocess import PreprocessSpec

        values["size"] = args.size
        values["preprocessing"] = PreprocessSpec(size=(args.size, args.size)).to_dict()
    if args.epochs is not None and args.stages is None:
        values["stages"] = [[args.size or 224, args.epochs]]
    for flag, key, value in (("no_augment", "augment", False), ("flip", "flip", True), ("no_amp", "amp", False),
                             ("compile", "compile", True), ("lr_find", "lr_find", True),
                             ("lr_find_only", "lr_find_only", True), ("no_channels_last", "channels_last", False)):
        values[key] = value if getattr(args, flag) else None
    return values


def train_command(args: argparse.Namespace) -> int:
    """Run the fine-tune recipe (config file and/or flags) and write the run folder."""
    from .train import TrainConfig, load_config, run

    overrides = train_overrides(args)
    if not args.config and not args.out:
        print("error: train needs --out RUN_FOLDER (or a --config that sets out)", file=sys.stderr)
        return 2
    try:
        if args.config:
            cfg = load_config(args.config, **overrides)
        else:
            cfg = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
        summary = run(cfg, log=lambda line: print(line, flush=True))
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "lr_find" in summary:
        return 0
    return 0 if summary["best"]["val_auroc"] >= 0 else 1


def export_command(args: argparse.Namespace) -> int:
    """Export a run folder to a verified model bundle."""
    from .export import ParityError, export_bundle

    try:
        manifest = export_bundle(args.run_dir, args.out, data=args.data or (), int8=args.int8, name=args.name,
                                 version=args.version, triage_finding=args.triage_finding)
    except (FileNotFoundError, ValueError, ParityError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    metrics = manifest["metrics"]
    print(f"bundle {args.out}: validation AUROC {metrics['validation']['auroc']:.4f}, "
          f"threshold {manifest['operating_point']['threshold']:.4f}, "
          f"parity {metrics['parity']['max_abs_risk_diff']:.2e}, "
          f"pipeline parity {metrics['parity'].get('pipeline_max_abs_risk_diff', float('nan')):.2e}, "
          f"serves {manifest['model'].get('precision', 'fp32')} {manifest['model']['file']}")
    return 0


def reported(call: Callable[[], T]) -> T | None:
    """``call()``, or None after printing a bad-input error (missing file, bad data or bundle) with its fix."""
    from triage.errors import TriageError

    try:
        return call()
    except (FileNotFoundError, ValueError, TriageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def log_line(line: str) -> None:
    print(line, flush=True)


def evaluate_command(args: argparse.Namespace) -> int:
    """Evaluate a bundle or run on a labelled data folder and write the report."""
    from .evaluate import evaluate

    metrics = reported(lambda: evaluate(args.source, args.data, args.out, split=args.split, n_boot=args.bootstrap,
                                        seed=args.seed, device=args.device, log=log_line))
    if metrics is None:
        return 2
    rows = [("all", metrics)] + (list(metrics["by_source"].items()) if len(metrics["by_source"]) > 1 else [])
    for name, part in rows:
        ci, rate = part["auroc"]["ci95"], part["flag_rate_5pct"]
        print(f"{metrics['finding']} {metrics['split']['name']} {name} n={part['n']}: AUROC {part['auroc']['value']:.4f} "
              f"(95% CI {ci['low']:.4f}-{ci['high']:.4f}), ECE {part['calibration']['ece_calibrated']:.4f}; top 5%: "
              f"PPV {rate['ppv']:.3f}, sensitivity {rate['sensitivity']:.3f}, NPV {rate['npv']:.3f}")
    for finding, part in metrics["per_finding"].items() if len(metrics["per_finding"]) > 1 else ():
        print(f"  {finding}: n={part['n']}, AUROC {part['auroc']['value']:.4f}")
    return 0


def add_labelled_data(parser: argparse.ArgumentParser, split_help: str, several: bool = False) -> None:
    """The ``DATA`` folder(s) and ``--split`` arguments shared by ``evaluate`` and ``calibrate``."""
    parser.add_argument("data", metavar="DATA", nargs="+" if several else None,
                        help="labelled data folder (site format: labels.csv + images), e.g. " + DEFAULT_DATA
                             + ("; several give a table per source" if several else ""))
    parser.add_argument("--split", choices=("validation", "all"), default="validation", help=split_help)


def add_evaluate_parser(subparsers) -> None:
    """Register ``evaluate`` (numpy, ONNX Runtime, matplotlib; torch only to run a run's checkpoint)."""
    evaluate = subparsers.add_parser("evaluate", help="evaluate a bundle or training run: metrics, plots, HTML report",
                                     description="AUROC with bootstrap CI, operating points, calibration, top losses and "
                                                 "subgroups on the training's patient split; PNGs + index.html + metrics.json.")
    evaluate.add_argument("source", metavar="RUN_OR_BUNDLE", help="bundle folder (manifest.json) or run folder (config.json)")
    add_labelled_data(evaluate, "validation (default): for a training source, its held-out patients; for any other "
                                "folder (an external site), every image; all: every image", several=True)
    evaluate.add_argument("--out", required=True, help="report folder to write (index.html, metrics.json, PNGs)")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the CIs (default 1000)")
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed (the split seed comes from the model)")
    evaluate.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="ONNX Runtime device")
    evaluate.set_defaults(func=evaluate_command)


def calibrate_command(args: argparse.Namespace) -> int:
    """Write a recalibrated copy of a bundle."""
    from .recalibrate import recalibrate_bundle

    manifest = reported(lambda: recalibrate_bundle(args.bundle, args.data, args.out, split=args.split,
                                                   version=args.version, log=log_line))
    return 2 if manifest is None else 0


def add_calibrate_parser(subparsers) -> None:
    """Register ``calibrate`` (numpy, ONNX Runtime, scipy; no torch)."""
    calibrate = subparsers.add_parser(
        "calibrate", help="refit a bundle's calibration and 5%% threshold on labelled images (new bundle folder)",
        description="Score labelled images with the bundle as served, fit risk = sigmoid(logit / T + b) and the "
                    "flag-rate threshold, and write a copy of the bundle with them (same model, new version).")
    calibrate.add_argument("bundle", metavar="BUNDLE", help="bundle folder to recalibrate")
    add_labelled_data(calibrate, "validation: the bundle's own validation split of its training data (default); "
                                 "all: every image of DATA (a site's own labelled studies)")
    calibrate.add_argument("--out", required=True, help="new bundle folder to write")
    calibrate.add_argument("--version", default=None, help="version of the new bundle (default: the patch version + 1)")
    calibrate.set_defaults(func=calibrate_command)


def add_train_parser(subparsers) -> None:
    """Register ``train``: a config file (TOML/JSON, keys = ``TrainConfig`` fields) and/or flags (flags win)."""
    train = subparsers.add_parser(
        "train", help="fine-tune a model: fast.ai recipe, run folder (needs the train extra: torch, monai)",
        description="Fine-tune EfficientNet-Lite0 (ImageNet weights) or DenseNet-121 with the fast.ai recipe: frozen "
                    "head epochs, then one-cycle with discriminative LRs over progressive-resizing stages. Flags "
                    "override --config; unset flags keep the config's or the default recipe's values.")
    add = train.add_argument
    add("--config", default=None, help="run config, TOML or JSON (keys: training.train.TrainConfig fields)")
    add("--data", default=None, action="append", metavar="PATH",
        help=f"a data source: a folder with labels.csv (site format) or what --dataset reads; repeat for several sources "
             f"(default {DEFAULT_DATA}; a config's [[data]] tables also set name and weight)")
    add("--dataset", default=None, choices=("site", "kermany", "nih", "chexpert", "rsna_pneumonia", "mimic_cxr", "csv"),
        help="adapter of the --data sources (default site: a folder with labels.csv); csv: --data is the CSV file")
    add("--findings", default=None, help="comma-separated canonical findings (default pneumonia), or 'auto'")
    add("--out", default=None, help="run folder to write (config, metrics, plots, checkpoint); required without --config")
    add("--arch", dest="architecture", default=None, choices=("efficientnet-lite0", "densenet121"),
        help="backbone (default efficientnet-lite0 from ImageNet weights)")
    add("--weights", default=None, help="state dict to start from (DenseNet-121: else random init)")
    add("--epochs-frozen", type=int, default=None, help="head-only epochs (default 1)")
    add("--size-frozen", type=int, default=None, help="image size of the head-only epochs (default 160)")
    add("--stages", type=parse_stages, default=None, help="unfrozen progressive-resizing stages SIZE:EPOCHS,... "
        "(default 160:2,224:1)")
    add("--epochs", type=int, default=None, help="shortcut: one unfrozen stage of N epochs at --size (ignored with --stages)")
    add("--size", type=int, default=None, help="serving size: validation and export (default 224)")
    add("--batch-size", type=int, default=None, help="default 32")
    add("--lr", type=float, default=None, help="head learning rate (default 2e-3); unfrozen: lr/2 down to lr/2/lr-mult")
    add("--lr-mult", type=float, default=None, help="ratio of the last to the first layer group's LR (default 100)")
    add("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0.01)")
    add("--pos-weight", choices=("none", "balanced"), default=None, help="positive-class weight (default none)")
    add("--label-smoothing", type=float, default=None, help="default 0")
    add("--ema", type=float, default=None, help="weight EMA decay per step, e.g. 0.99 (default 0: off)")
    add("--no-augment", action="store_true", help="no MONAI augmentation")
    add("--flip", action="store_true", help="also random horizontal flips (off by default: anatomy is not symmetric)")
    add("--val-fraction", type=float, default=None, help="fraction of patient groups for validation (default 0.2)")
    add("--seed", type=int, default=None, help="default 0")
    add("--limit", type=int, default=None, help="train on a seeded subset of N images (0: all)")
    add("--device", choices=("auto", "cpu", "cuda"), default=None, help="default auto")
    add("--no-amp", action="store_true", help="CUDA: no bf16 autocast")
    add("--no-channels-last", action="store_true", help="NCHW instead of channels_last")
    add("--compile", action="store_true", help="CUDA: torch.compile the model")
    add("--cache-dir", default=None, help="preprocessing cache folder (default <out>/../.cache)")
    add("--lr-find", action="store_true", help="run the LR finder first (lr_find.png, lr_find.json), then train")
    add("--lr-find-only", action="store_true", help="run the LR finder and stop")
    train.set_defaults(func=train_command)


def finetune_command(args: argparse.Namespace) -> int:
    """Fine-tune a bundle on a site's labelled studies into a new bundle."""
    from .finetune import finetune_bundle

    overrides = {"stages": args.stages, "lr": args.lr, "epochs_frozen": args.epochs_frozen, "batch_size": args.batch_size}
    manifest = reported(lambda: finetune_bundle(args.bundle, args.data, args.out, dataset=args.dataset,
                                                version=args.version, force=args.force, device=args.device,
                                                overrides=overrides, log=log_line))
    return 2 if manifest is None else 0


def add_finetune_parser(subparsers) -> None:
    """Register ``finetune`` (needs the train extra)."""
    tune = subparsers.add_parser(
        "finetune", help="adapt a bundle to a site's own labelled studies (new bundle; needs the train extra)",
        description="Start from the bundle's own network (its weights.npz), split DATA by patient, fine-tune (head-only "
                    "one-cycle epoch, then unfreeze and one cycle), refit calibration, threshold and gate on the site's "
                    "split, and write a new bundle naming its parent. Before/after on the site's held-out patients is "
                    "printed and recorded; a result worse than the parent is refused unless --force.")
    tune.add_argument("bundle", metavar="BUNDLE", help="bundle folder to start from (with weights.npz)")
    tune.add_argument("data", metavar="DATA", help="the site's labelled studies: a folder with labels.csv (site format)")
    tune.add_argument("--out", required=True, help="new bundle folder to write")
    tune.add_argument("--dataset", default="site", help="adapter of DATA (default site; see train --dataset)")
    tune.add_argument("--version", default=None, help="version of the new bundle (default: the parent's patch + 1)")
    tune.add_argument("--stages", type=parse_stages, default=None, help="unfrozen stages SIZE:EPOCHS (default: 2 epochs "
                      "at the bundle's input size)")
    tune.add_argument("--epochs-frozen", type=int, default=None, help="head-only epochs (default 1)")
    tune.add_argument("--lr", type=float, default=None, help="head learning rate (default 1e-3)")
    tune.add_argument("--batch-size", type=int, default=None, help="default 32")
    tune.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device (default auto)")
    tune.add_argument("--force", action="store_true", help="write the bundle even if it is worse than its parent")
    tune.set_defaults(func=finetune_command)


def add_parsers(subparsers) -> None:
    """Register ``train``, ``export``, ``evaluate``, ``calibrate`` and ``finetune`` on an ``argparse`` subparsers object."""
    add_train_parser(subparsers)
    add_finetune_parser(subparsers)

    export = subparsers.add_parser("export", help="export a training run to a model bundle (ONNX + manifest + card)",
                                   description="Export to ONNX (logits, in-graph CAM, pooled features), check parity "
                                               "(validation images, CAM, DICOM -> risk), calibrate, fit the "
                                               "out-of-distribution gate, write the bundle.")
    export.add_argument("run_dir", help="run folder written by 'train'")
    export.add_argument("--out", required=True, help="bundle folder to write, e.g. models/pneumonia-demo")
    export.add_argument("--data", default=None, action="append", metavar="PATH",
                        help="a data folder replacing the recorded path of the run's source of the same name "
                             "(repeatable; default: the paths in the run's config.json)")
    export.add_argument("--name", default=None, help="bundle name (default: the run config's name, else cxr-<findings>)")
    export.add_argument("--version", default=None, help="bundle version (default: the run config's version, else 0.1.0)")
    export.add_argument("--triage-finding", default=None,
                        help="the finding whose risk orders the worklist (default: the run's, else its first finding)")
    export.add_argument("--int8", action="store_true",
                        help="also build a static QDQ int8 model (calibrated on training images) and serve it if its "
                             "validation AUROC drops by <= 0.005; ms/image of both go in the manifest")
    export.set_defaults(func=export_command)
    add_evaluate_parser(subparsers)
    add_calibrate_parser(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m training.cli {train,export} ...``."""
    parser = argparse.ArgumentParser(prog="python -m training.cli")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
