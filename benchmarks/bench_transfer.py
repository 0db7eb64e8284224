"""Leave-one-source-out: how well does a model rank the patients of a source it never saw?

    .venv/bin/python benchmarks/bench_transfer.py --run joint=runs/joint --run kermany-only=runs/loso-kermany \
        --run nih-only=runs/loso-nih ../shared/data/kermany-pneumonia-224 ../shared/data/nih-pneumonia-512

For every data folder, every run is scored on the same images: that source's validation
patients (each source is split by patient on its own with seed 0 and 20%, so they are the same
for every run, and no run trained on them). A run that did not train on the source at all is a
leave-one-source-out figure. Printed side by side: AUROC with its patient-bootstrap 95% CI, and
PPV / sensitivity when the riskiest 5% of that source's images are flagged (rank-based, so no
calibration is involved). Needs the train extra (the runs' checkpoints run in PyTorch on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.metrics import FLAG_RATE, auroc, bootstrap_ci, metrics_at_flag_rate  # noqa: E402
from training.runs import load_inputs, load_run, run_sources  # noqa: E402
from training.scoring import eval_set  # noqa: E402
from training.sources import DataSource, labelled_split  # noqa: E402
from training.train import predict_logits  # noqa: E402
from triage.preprocess import PreprocessSpec  # noqa: E402


def validation_images(folder: str, finding: str) -> tuple[list, np.ndarray, np.ndarray]:
    """(records, labels (N,), patient groups (N,)) of a source's validation patients (seed 0, 20%)."""
    split = labelled_split([DataSource(folder)], [finding], 0.2, 0, log=lambda _: None)
    images = eval_set([split.records[i] for i in split.val_idx], [finding])
    return images.records, images.column(finding), images.groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", help="site-format folders")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR")
    parser.add_argument("--finding", default="pneumonia")
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.run)
    sets = {DataSource(folder).name: validation_images(folder, args.finding) for folder in args.data}
    rows = []
    for run_name, run_dir in runs.items():
        config, _, net = load_run(run_dir)
        trained_on = {s.name for s in run_sources(config)}
        spec = PreprocessSpec.from_dict(config["preprocessing"])
        column = config["findings"].index(args.finding)
        for source, (records, y, groups) in sets.items():
            start = time.perf_counter()
            z = predict_logits(net, load_inputs(records, spec))[:, column].astype(np.float64)
            ci = bootstrap_ci(lambda i: auroc(z[i], y[i]), groups, args.bootstrap, 0)
            top = metrics_at_flag_rate(z, y, FLAG_RATE)
            rows.append({"run": run_name, "source": source, "trained_on_source": source in trained_on,
                         "n": len(y), "prevalence": float(y.mean()), "auroc": auroc(z, y),
                         "ci95": [ci["low"], ci["high"]], "ppv_top5": top["ppv"], "sensitivity_top5": top["sensitivity"],
                         "seconds": round(time.perf_counter() - start, 1)})
    print(f"{'run':<14}{'source (validation patients)':<30}{'seen':>6}{'n':>6}{'prev':>7}{'AUROC':>8}"
          f"{'95% CI':>16}{'PPV@5%':>9}{'sens@5%':>9}")
    for r in rows:
        print(f"{r['run']:<14}{r['source']:<30}{'yes' if r['trained_on_source'] else 'NO':>6}{r['n']:>6}"
              f"{r['prevalence']:>7.2f}{r['auroc']:>8.4f}{r['ci95'][0]:>9.3f}-{r['ci95'][1]:<6.3f}"
              f"{r['ppv_top5']:>9.3f}{r['sensitivity_top5']:>9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
