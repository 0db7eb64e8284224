"""Re-export a bundle with the current exporter (graph, input gate, calibration, card) from its own weights.

The network is the bundle's ``weights.npz`` (no training); the data are the sources its manifest records, split
exactly as they were (same seed and fraction). Used to move a bundle to a new graph or gate format, e.g. 0.3.0 ->
0.4.0 (the ImageNet input gate of issue 13)::

    python -m training.reexport models/pneumonia-demo --out /tmp/pneumonia-0.4 --version 0.4.0 \\
        --change "input gate on ImageNet layout features"
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from triage.bundle import load_bundle


def recorded_config(manifest: dict[str, Any], version: str, change: str) -> dict[str, Any]:
    """The run config ``export_bundle`` needs, rebuilt from a bundle manifest's ``training`` section."""
    training = manifest["training"]
    threads = re.search(r"\((\d+) threads\)", str(training.get("device", "")))
    return {**training.get("settings", {}), "data": training["sources"], "findings": manifest["findings"],
            "triage_finding": manifest["operating_point"]["finding"], "preprocessing": manifest["preprocessing"],
            "seed": training.get("seed", 0), "val_fraction": training.get("val_fraction", 0.2),
            "recipe": training.get("recipe"), "split": training.get("split", {}),
            "architecture": manifest["model"].get("weights", {}).get("architecture") or "efficientnet-lite0",
            "name": manifest["name"], "version": version, "code_version": training.get("code_version"),
            "device": str(training.get("device", "cpu")).split(" ")[0],
            "torch_threads": int(threads.group(1)) if threads else None,
            "frameworks": {k: v for k, v in training.get("frameworks", {}).items() if k == "torch"},
            "changelog": [*manifest.get("changelog", []), {"version": version, "change": change}],
            "metrics": {"best": training.get("best_epoch", {}), "wall_seconds": training.get("wall_clock_seconds")}}


def reexport_bundle(bundle_dir: str | Path, out: str | Path, version: str, change: str,
                    data: Sequence[str | Path] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``bundle_dir``'s network, re-exported, to ``out`` as ``version``; returns the new manifest."""
    from .export import export_bundle
    from .finetune import parent_network

    bundle = load_bundle(bundle_dir)
    config = recorded_config(bundle.manifest, version, change)
    return export_bundle(out, out, data, config_override=config, net=parent_network(bundle), log=log)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.reexport", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="the bundle folder (needs weights.npz)")
    parser.add_argument("--out", required=True, help="new bundle folder")
    parser.add_argument("--version", required=True, help="the new bundle's version")
    parser.add_argument("--change", required=True, help="one line for the changelog")
    parser.add_argument("--data", action="append", default=[], help="a folder replacing a recorded source's path")
    args = parser.parse_args(argv)
    manifest = reexport_bundle(args.bundle, args.out, args.version, args.change, args.data)
    print(f"{manifest['name']} {manifest['version']} written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
