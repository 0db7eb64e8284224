"""Where the bundled defaults live in a checkout."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = REPO_ROOT / "models" / "pneumonia-demo"
SAMPLES = REPO_ROOT / "samples"


def default_bundle_dir() -> Path:
    """$CXR_TRIAGE_BUNDLE, else the demo bundle committed under models/."""
    return Path(os.environ.get("CXR_TRIAGE_BUNDLE", DEMO_BUNDLE))
