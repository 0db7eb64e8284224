"""The input gate on real images: refused / accepted per set, with reasons, and its cost in ms per image.

    .venv/bin/python benchmarks/bench_gate.py models/pneumonia-demo [--compare OLD_BUNDLE]

Sets: ``../shared/data/lateral-views`` (12 real laterals: for measurement only, never fitted on), the out-of-scope
DICOMs (hip, extremity, dental, dog thorax), the 5 chest DICOMs, the sample studies, and each training source's
validation frontals (the patients the bundle did not train on, split exactly as it was). The gate is measured with
the header checks skipped (``training.ood_fit.gate_input``): tags refuse most out-of-scope DICOMs first, and a
PNG/JPEG has no tags. ms/image: the whole graph (classifier + gate) per image in batches of 16 on CPU, side by side
with ``--compare``'s graph (e.g. the 0.3.0 bundle, whose gate read the classifier's own features).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.ood_fit import gate_input  # noqa: E402
from training.runs import run_split  # noqa: E402
from triage.bundle import load_bundle  # noqa: E402
from triage.inference import load_model  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def file_sets(bundle) -> dict[str, list[Path]]:
    """Set name -> files, each set only when present."""
    sets = {"lateral-views (want refused)": sorted((SHARED / "lateral-views" / "images").glob("*")),
            "out-of-scope DICOMs (want refused)": sorted((SHARED / "dicom" / "out-of-scope").glob("*.dcm")),
            "chest DICOMs (want accepted)": sorted((SHARED / "dicom" / "chest").glob("*.dcm")),
            "sample chest studies (want accepted)": sorted(p for p in (ROOT / "samples").rglob("*.dcm")
                                                           if "extremity" not in p.name and "not-an" not in p.name)}
    training = bundle.manifest["training"]
    split = run_split({**training, "data": training["sources"], "findings": bundle.findings}, log=lambda _: None)
    for source in split.sources:
        sets[f"validation {source.name} (want accepted)"] = [
            Path(split.records[i].path) for i in split.val_idx if split.records[i].dataset == source.name]
    return {name: files for name, files in sets.items() if files}


def verdicts(model, files: list[Path]) -> Counter:
    """Counter of the gate's reason ("" accepted) over ``files``; "undecodable" when there is no model input."""
    inputs = [gate_input(p, model.bundle.preprocessing) for p in files]
    counts = Counter("undecodable" for x in inputs if x is None)
    xs = [x for x in inputs if x is not None]
    for start in range(0, len(xs), 32):
        features = model.run(np.stack(xs[start:start + 32]), cams=False).features
        counts.update(model.ood.assess(features).reasons)
    return counts


def ms_per_image(model, x: np.ndarray, repeats: int = 5) -> float:
    """Median wall time of one forward pass (logits and gate features) over the batch ``x``, per image."""
    model.run(x, cams=False)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.run(x, cams=False)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000 / len(x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--compare", help="another bundle to time side by side")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    model = load_model(bundle, device="cpu")
    print(f"{bundle.name} {bundle.version}: gate {bundle.ood['method']}, threshold {bundle.ood['threshold']:.3f}")
    print(f"{'set':48s} {'n':>5s} {'refused':>8s} {'view':>5s} {'ood':>5s} {'accepted':>9s}")
    for name, files in file_sets(bundle).items():
        c = verdicts(model, files)
        refused = c["view_out_of_scope"] + c["out_of_distribution"]
        print(f"{name:48s} {len(files):5d} {refused:8d} {c['view_out_of_scope']:5d} {c['out_of_distribution']:5d} "
              f"{c['']:9d}" + (f"  ({c['undecodable']} undecodable)" if c["undecodable"] else ""))
    x = np.random.default_rng(0).normal(size=(16, *bundle.manifest["model"]["input"]["shape"][1:])).astype(np.float32)
    timed = {f"{bundle.name} {bundle.version}": ms_per_image(model, x)}
    if args.compare:
        other = load_bundle(args.compare)
        timed[f"{other.name} {other.version}"] = ms_per_image(load_model(other, device="cpu"), x)
    base = next(iter(timed.values()))
    for label, ms in timed.items():
        print(f"forward pass (logits + gate features), batch 16, CPU: {label}: {ms:.2f} ms/image ({ms / base:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
