"""ONNX Runtime vs eager PyTorch, ms per image, same architecture, same inputs, one run.

The eager model is the bundle's architecture built by ``training.model`` (speed does not
depend on the weights' values). Usage: python benchmarks/bench_inference.py [--bundle DIR]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from deploy.paths import default_bundle_dir
from training.model import build_model
from triage.bundle import load_bundle
from triage.inference import load_model


def ms_per_image(run, batch: np.ndarray, repeats: int) -> float:
    run(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        run(batch)
    return (time.perf_counter() - start) * 1000 / (repeats * len(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", default=str(default_bundle_dir()))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    model = load_model(bundle, "cpu")
    spec = bundle.preprocessing
    net = build_model(len(bundle.findings), spec.channels, spec.size[0], pretrained=False).eval()

    def eager(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(batch)).numpy()

    print(f"bundle {bundle.name} {bundle.version}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"ONNX Runtime {model.provider}")
    print(f"{'batch':>5} {'torch ms/img':>12} {'ORT ms/img':>10} {'speed-up':>8}")
    rng = np.random.default_rng(0)
    for size in (1, 16):
        batch = rng.standard_normal((size, spec.channels, *spec.size)).astype(np.float32)
        repeats = max(2, args.repeats // size * 2)
        torch_ms = ms_per_image(eager, batch, repeats)
        ort_ms = ms_per_image(model.logits, batch, repeats)
        print(f"{size:5d} {torch_ms:12.2f} {ort_ms:10.2f} {torch_ms / ort_ms:7.1f}x")


if __name__ == "__main__":
    main()
