"""scripts/: the test command installs each system program the tests need on its own."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash") or "/bin/bash"


def missing(tmp_path: Path, programs: list[str], postgres: bool, dicomweb_plugin: bool = True) -> list[str]:
    """Run scripts/missing-packages.sh with only ``programs`` on PATH (as empty executables), initdb and Orthanc's
    DICOMweb plugin present or not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in programs:
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    initdb = tmp_path / "pg" / "17" / "bin" / "initdb"
    if postgres:
        initdb.parent.mkdir(parents=True)
        initdb.write_text("")
    plugin = tmp_path / "libOrthancDicomWeb.so"
    if dicomweb_plugin:
        plugin.write_text("")
    env = {"PATH": str(bin_dir), "POSTGRES_GLOB": str(tmp_path / "pg" / "*" / "bin" / "initdb"),
           "ORTHANC_DICOMWEB_PLUGIN": str(plugin)}
    out = subprocess.run([BASH, str(ROOT / "scripts" / "missing-packages.sh")], env=env, capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


PEERS = ["storescp", "chromium", "chromedriver", "Orthanc", "dciodvfy"]


@pytest.mark.parametrize("present, postgres, plugin, expected", [
    (["chromium", "Orthanc", "dciodvfy"], True, True, ["dcmtk", "chromium-driver"]),  # the browser test needs both
    (["chromedriver", "storescp", "Orthanc", "dciodvfy"], False, True, ["chromium", "postgresql"]),
    (PEERS, True, True, []),
    (PEERS, True, False, ["orthanc-dicomweb"]),  # Orthanc without its DICOMweb plugin: the STOW-RS test needs it
    (["storescp", "chromium", "chromedriver", "dciodvfy"], True, True, ["orthanc"]),
    (["storescp", "chromium", "chromedriver", "Orthanc"], True, True, ["dicom3tools"]),
    ([], False, False, ["dcmtk", "chromium", "chromium-driver", "postgresql", "orthanc", "orthanc-dicomweb",
                        "dicom3tools"]),
])
def test_each_program_is_checked_on_its_own(tmp_path, present, postgres, plugin, expected):
    assert missing(tmp_path, present, postgres, plugin) == expected


def test_the_test_command_installs_what_is_missing():
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert "scripts/missing-packages.sh" in script and 'apt-get install -y -qq "${need[@]}"' in script
    assert os.access(ROOT / "scripts" / "missing-packages.sh", os.R_OK)
