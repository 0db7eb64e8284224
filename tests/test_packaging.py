"""A non-editable install (``pip install .``) runs ``cxr-triage score`` with the demo bundle it ships."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "triage", "deploy", "dashboards", "training", "models/pneumonia-demo")


def build_wheel(tmp_path: Path) -> Path:
    """The project's wheel, built from a copy of the sources (setuptools writes build/ beside them)."""
    source = tmp_path / "src"
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree
                                             else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheels"), str(source)], check=True, capture_output=True)
    return next((tmp_path / "wheels").glob("cxr_triage-*.whl"))


@pytest.mark.slow
def test_a_non_editable_install_scores_the_samples_with_its_shipped_bundle(tmp_path):
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                               capture_output=True, text=True).stdout.strip())
    # The dependencies: this environment's, read through a .pth (its editable cxr-triage hook is not run from there).
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import triage, triage.bundle as b; print(triage.__file__); "
                            "print(b.default_bundle_dir())"], cwd=elsewhere, check=True, capture_output=True, text=True)
    module, bundle = where.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(bundle) == venv / "share/cxr-triage/models/pneumonia-demo"
    run = subprocess.run([venv / "bin" / "cxr-triage", "score", str(REPO / "samples"), "--out", "worklist.csv",
                          "--audit-db", "audit.sqlite", "--workers", "1"], cwd=elsewhere, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader((elsewhere / "worklist.csv").open()))
    assert rows and {r["status"] for r in rows} <= {"scored", "human_review"} and any(r["status"] == "scored" for r in rows)
