"""`pip install .[cpu]` pulls no GPL package: the installed runtime closure's licence metadata, read.

The roots are pyproject.toml's base dependencies and the ``cpu`` extra (the source of truth; an
editable install's own metadata goes stale until it is reinstalled); each installed distribution's
``Requires-Dist`` is walked from there, with the extras asked for and the markers of this Python.
A distribution's licence is its License-Expression (SPDX, PEP 639), else its License field and
its ``License ::`` classifiers.
"""

from __future__ import annotations

import re
import tomllib
from email.message import Message
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
COPYLEFT = re.compile(r"\b(?:A|L)?GPL|General Public License", re.IGNORECASE)  # GPL, LGPL, AGPL in SPDX or classifier words
PERMISSIVE = re.compile(r"\b(?:MIT|BSD|Apache|ISC|PSF|Python Software Foundation|Zlib|HPND|MPL|Mozilla|Unlicense|CC0|0BSD)",
                        re.IGNORECASE)


def runtime_roots(extra: str = "cpu") -> list[str]:
    """pyproject.toml's base dependencies and those of ``extra``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"][extra]


def runtime_closure(roots: list[str]) -> tuple[dict[str, Message], list[str]]:
    """(metadata by canonical name of every installed distribution the roots need, names not installed)."""
    found: dict[str, Message] = {}
    missing, walked = [], set()
    pending = [(Requirement(text), "") for text in roots]
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({**default_environment(), "extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        for wanted in sorted(requirement.extras) or [""]:
            if (name, wanted) in walked:
                continue
            walked.add((name, wanted))
            try:
                dist = distribution(name)
            except PackageNotFoundError:
                missing.append(name)
                continue
            found[name] = dist.metadata
            pending += [(Requirement(text), wanted) for text in dist.requires or []]
    return found, sorted(set(missing))


def licence_of(metadata: Message) -> str:
    """License-Expression when declared, else the License field's first line and the licence classifiers."""
    if metadata.get("License-Expression"):
        return metadata["License-Expression"]
    classifiers = [c.split(" :: ", 2)[-1] for c in metadata.get_all("Classifier") or [] if c.startswith("License ::")]
    field = (metadata.get("License") or "").strip().splitlines()
    return "; ".join(([field[0]] if field and field[0] != "UNKNOWN" else []) + classifiers)


def is_gpl_only(licence: str) -> bool:
    """A GPL-family licence (GPL, LGPL, AGPL) with no permissive alternative offered beside it."""
    if not COPYLEFT.search(licence):
        return False
    alternatives = re.split(r"\s+OR\s+|;", licence)
    return not any(PERMISSIVE.search(term) and not COPYLEFT.search(term) for term in alternatives)


def test_the_cpu_install_pulls_no_gpl_package():
    closure, missing = runtime_closure(runtime_roots("cpu"))
    assert not missing, f"not installed, so its licence cannot be read: {missing}; run pip install -e '.[cpu]'"
    assert {"pydicom", "pillow", "pyjpegls", "imagecodecs", "pylibjpeg-openjpeg", "onnxruntime"} <= closure.keys()
    gpl = {name: licence_of(metadata) for name, metadata in closure.items() if is_gpl_only(licence_of(metadata))}
    assert not gpl, f"GPL-licensed runtime dependencies in an Apache-2.0 product: {gpl}"
    unknown = sorted(name for name, metadata in closure.items() if not licence_of(metadata))
    assert not unknown, f"no licence metadata, check each by hand and list it in README.md: {unknown}"


def test_every_runtime_dependency_is_in_the_readme_licence_table():
    closure, _ = runtime_closure(runtime_roots("cpu"))
    readme = (ROOT / "README.md").read_text()
    table = {canonicalize_name(m.group(1)) for m in re.finditer(r"^\| `([A-Za-z0-9_.-]+)` \|", readme, re.MULTILINE)}
    assert closure.keys() <= table, f"missing from README.md's licence table: {sorted(closure.keys() - table)}"


def test_gpl_is_recognised_in_each_metadata_form():
    libjpeg = Message()  # pylibjpeg-libjpeg 2.5.0's own metadata (GPL, or a commercial licence from its author)
    libjpeg["License"] = "GPL V3.0"
    libjpeg["Classifier"] = "License :: OSI Approved :: GNU General Public License v3 (GPLv3)"
    libjpeg["Classifier"] = "License :: Other/Proprietary License"
    assert is_gpl_only(licence_of(libjpeg))
    assert is_gpl_only("LGPL-2.1-only") and is_gpl_only("AGPL-3.0-or-later")
    assert not is_gpl_only("GPL-2.0-or-later OR MIT") and not is_gpl_only("MIT-CMU")
    assert not is_gpl_only("BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0") and not is_gpl_only("MPL-2.0 AND MIT")
