"""Where the sample studies and the demo bundle live in a checkout (for scripts, tests and benchmarks).

Programs take their default bundle from ``triage.bundle.default_bundle_dir``, which also finds the demo bundle of
a non-editable install; it is re-exported here for the scripts that import it from this module.
"""

from __future__ import annotations

from pathlib import Path

from triage.bundle import DEMO_BUNDLE_NAME, default_bundle_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = REPO_ROOT / "models" / DEMO_BUNDLE_NAME
SAMPLES = REPO_ROOT / "samples"

__all__ = ["DEMO_BUNDLE", "REPO_ROOT", "SAMPLES", "default_bundle_dir"]
