"""The model bundle: a folder with ``model.onnx``, ``manifest.json`` and ``MODEL_CARD.md``.

The manifest is the single source of truth for serving: findings in output order,
input name/shape/dtype, graph outputs (``logits``; optionally ``cam``, the class
activation maps, and ``features``, the pooled features the out-of-distribution gate
reads), preprocessing, calibration, operating point, the optional ``ood`` gate,
provenance, metrics and the sha256 of every other file. The bundle's own identity
(``Bundle.sha256``) is the sha256 of ``manifest.json``, which pins every file, the ONNX
model's external-data files included; a site can pin that identity in turn
(``load_bundle(..., expected_sha256=...)``, ``--expect-bundle-sha256``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .decode import CODECS
from .errors import BundleError
from .preprocess import PreprocessSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
BUNDLE_ENV = "CXR_TRIAGE_BUNDLE"
DEMO_BUNDLE_NAME = "pneumonia-demo"
# Where pip puts the demo bundle (pyproject.toml's data-files), under the install's data folder (the venv, or ~/.local).
INSTALLED_MODELS = Path("share", "cxr-triage", "models")
REQUIRED_FILES = ("MODEL_CARD.md",)  # plus the served model file named by model.file (fp32 or int8)
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "name": str,
    "version": str,
    "findings": list,
    "model": dict,
    "preprocessing": dict,
    "calibration": dict,
    "operating_point": dict,
    "training": dict,
    "metrics": dict,
    "files": dict,
}


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle. Build with ``load_bundle``."""

    path: Path
    manifest: dict[str, Any]
    sha256: str
    preprocessing: PreprocessSpec

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def findings(self) -> list[str]:
        return list(self.manifest["findings"])

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest["model"]["file"]

    @property
    def input_name(self) -> str:
        return self.manifest["model"]["input"]["name"]

    @property
    def logits_output(self) -> str:
        return self.manifest["model"]["outputs"]["logits"]

    @property
    def cam_output(self) -> str | None:
        """Name of the graph output with the class activation maps (batch, F, h, w), or None (older bundles)."""
        return self.manifest["model"]["outputs"].get("cam")

    @property
    def features_output(self) -> str | None:
        """Name of the graph output with the pooled features (batch, D), or None."""
        return self.manifest["model"]["outputs"].get("features")

    @property
    def ood(self) -> dict[str, Any] | None:
        """The out-of-distribution gate's settings (file, threshold, ...), or None when the bundle has none."""
        return self.manifest.get("ood")

    @property
    def reduced_decode(self) -> frozenset[str]:
        """The codec families (``triage.decode.CODECS``) this model scores at reduced resolution:
        those whose reduced decode the export checked to move no risk by more than 0.01. Empty
        (always a full decode) for bundles without a ``decode`` section."""
        return frozenset((self.manifest.get("decode") or {}).get("reduced", ()))

    @property
    def triage_finding(self) -> str:
        return self.manifest["operating_point"]["finding"]

    @property
    def threshold(self) -> float:
        """Calibrated-risk threshold that flagged the target rate on validation (stream mode)."""
        return float(self.manifest["operating_point"]["threshold"])

    @property
    def flag_rate(self) -> float:
        return float(self.manifest["operating_point"]["flag_rate"])

    def temperature(self, finding: str) -> float:
        return float(self.manifest["calibration"]["temperature"][finding])

    def bias(self, finding: str) -> float:
        """The calibration's logit shift for ``finding`` (risk = sigmoid(logit / T + bias)); 0 when absent."""
        return float(self.manifest["calibration"].get("bias", {}).get(finding, 0.0))


def _schema_problems(manifest: dict[str, Any]) -> list[str]:
    """Every way in which a manifest breaks schema version 1, as readable strings."""
    problems = [f"missing key {key!r}" for key in REQUIRED_KEYS if key not in manifest]
    problems += [
        f"{key!r} must be {kind.__name__ if isinstance(kind, type) else kind}, got {type(manifest[key]).__name__}"
        for key, kind in REQUIRED_KEYS.items()
        if key in manifest and not isinstance(manifest[key], kind)
    ]
    if problems:
        return problems
    if manifest["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {manifest['schema_version']} is not {SCHEMA_VERSION}")
    findings = manifest["findings"]
    if not findings or not all(isinstance(f, str) for f in findings):
        problems.append("findings must be a non-empty list of names in output order")
    model = manifest["model"]
    for key in ("file", "input", "outputs"):
        if key not in model:
            problems.append(f"model.{key} is missing")
    if "input" in model and not {"name", "shape", "dtype"} <= set(model["input"]):
        problems.append("model.input needs name, shape and dtype")
    if "outputs" in model and "logits" not in model["outputs"]:
        problems.append("model.outputs needs a 'logits' entry")
    ood = manifest.get("ood")
    if ood is not None:
        if not isinstance(ood, dict) or not {"file", "threshold"} <= set(ood):
            problems.append("ood must be an object with 'file' and 'threshold'")
        elif "features" not in model.get("outputs", {}):
            problems.append("ood needs model.outputs.features (the pooled features it measures)")
    decode = manifest.get("decode")
    if decode is not None:
        reduced = decode.get("reduced") if isinstance(decode, dict) else None
        if not isinstance(reduced, list) or not set(reduced) <= set(CODECS):
            problems.append(f"decode.reduced must be a list of codec families among {sorted(CODECS)}")
    temperatures = manifest["calibration"].get("temperature", {})
    for finding in findings:
        t = temperatures.get(finding)
        if not isinstance(t, (int, float)) or not t > 0 or not math.isfinite(t):
            problems.append(f"calibration.temperature[{finding!r}] must be a positive number, got {t!r}")
        b = manifest["calibration"].get("bias", {}).get(finding, 0.0)
        if not isinstance(b, (int, float)) or not math.isfinite(b):
            problems.append(f"calibration.bias[{finding!r}] must be a finite number, got {b!r}")
    op = manifest["operating_point"]
    if op.get("finding") not in findings:
        problems.append(f"operating_point.finding {op.get('finding')!r} is not one of the findings")
    if not 0 < float(op.get("flag_rate", -1)) < 1:
        problems.append("operating_point.flag_rate must be in (0, 1)")
    if not 0 <= float(op.get("threshold", -1)) <= 1:
        problems.append("operating_point.threshold must be a probability in [0, 1]")
    return problems


def load_bundle(path: str | Path, expected_sha256: str | None = None) -> Bundle:
    """Read and verify a bundle folder: its identity when ``expected_sha256`` pins one, the schema, the sha256 of
    every listed file, and that every external-data file the ONNX model reads is among them.

    Raises ``BundleError`` naming the folder, the problem and the fix.
    """
    folder = Path(path)
    if expected_sha256 is not None:
        check_identity(folder, expected_sha256)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST}. Fix: pass --bundle a bundle folder (see README, 'Model bundle')")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{manifest_path}: not valid JSON ({error}). Fix: restore the bundle from its release") from error
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: the manifest must be a JSON object")
    problems = _schema_problems(manifest)
    if problems:
        raise BundleError(f"{manifest_path}: schema check failed: " + "; ".join(problems))
    for name in referenced_files(manifest):
        if name not in manifest["files"]:
            raise BundleError(f"{manifest_path}: files has no sha256 for {name!r}. Fix: rebuild the bundle")
    for name, expected in sorted(manifest["files"].items()):
        if not is_plain_name(name):
            raise BundleError(f"{manifest_path}: files lists {name!r}, which is not a file inside the bundle folder. "
                              "Fix: restore the bundle from its release")
        file_path = folder / name
        if not file_path.is_file():
            raise BundleError(f"{folder}: {name} is missing. Fix: restore the bundle from its release")
        actual = sha256_file(file_path)
        if actual != expected:
            raise BundleError(
                f"{file_path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...; "
                "the file was changed or corrupted. Fix: restore the bundle from its release"
            )
    check_external_data(folder / manifest["model"]["file"], manifest["files"])
    return Bundle(folder, manifest, sha256_file(manifest_path), PreprocessSpec.from_dict(manifest["preprocessing"]))


def check_identity(folder: Path, expected_sha256: str) -> None:
    """Refuse a bundle whose identity (sha256 of its ``manifest.json``) is not the one a site pinned."""
    expected = expected_sha256.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise BundleError(f"expected bundle sha256 {expected_sha256!r} is not 64 hex digits. Fix: copy the full "
                          "sha256 that 'cxr-triage score' prints for the bundle (or sha256sum manifest.json)")
    try:
        actual = sha256_file(folder / MANIFEST)
    except OSError as error:
        raise BundleError(f"{folder}: cannot read {MANIFEST} ({error.strerror}). Fix: pass --bundle a bundle "
                          "folder") from error
    if actual != expected:
        raise BundleError(f"{folder}: bundle sha256 {actual} is not the pinned {expected}: this is not the bundle the "
                          "site approved (changed, replaced or another version). Fix: restore the approved bundle, "
                          "or pin the new one after it was approved")


def is_plain_name(name: str) -> bool:
    """True for a relative path that stays inside the bundle folder (no absolute path, no ``..``)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and "\\" not in name


# An ONNX StringStringEntryProto {key: "location", value: ...} as protobuf writes it: field 1 (0x0a) of 8 bytes,
# then field 2 (0x12) whose length follows. TensorProto.external_data (field 13) holds one per external tensor.
_LOCATION_ENTRY = b"\x0a\x08location\x12"


def external_data_locations(model: bytes) -> Iterator[str]:
    """The ``location`` of every external-data entry in a serialized ONNX model (initializers, constants and
    subgraphs alike: the whole message is scanned). A model whose bytes are pinned by the manifest cannot hide
    one, and a byte run that merely looks like one only makes the check stricter."""
    start = model.find(_LOCATION_ENTRY)
    while start >= 0:
        length, shift, at = 0, 0, start + len(_LOCATION_ENTRY)
        while at < len(model) and shift < 35:  # a varint: 7 bits a byte, high bit set when more follow
            length |= (model[at] & 0x7F) << shift
            shift, at = shift + 7, at + 1
            if not model[at - 1] & 0x80:
                break
        yield model[at:at + length].decode("utf-8", "replace")
        start = model.find(_LOCATION_ENTRY, at)


def check_external_data(model_path: Path, files: dict[str, str]) -> None:
    """Refuse an ONNX model that reads an external-data file the manifest does not pin with its sha256 (ONNX
    Runtime would load whatever file of that name lies beside it), or one outside the bundle folder."""
    for location in sorted(set(external_data_locations(model_path.read_bytes()))):
        if not is_plain_name(location):
            raise BundleError(f"{model_path}: the model reads external data from {location!r}, outside the bundle "
                              "folder. Fix: re-export the model with its external data beside model.onnx")
        if location not in files:
            raise BundleError(f"{model_path}: the model reads external data {location!r}, which the manifest does "
                              "not pin with a sha256, so it could be swapped unnoticed. Fix: rebuild the bundle "
                              "(write_manifest lists every external-data file)")


def referenced_files(manifest: dict[str, Any]) -> list[str]:
    """Every file the manifest needs besides itself: the card, the served model, the OOD statistics and, when the
    bundle ships them for ``finetune``, the network's weights (``model.weights.file``)."""
    names = set(REQUIRED_FILES) | {manifest["model"]["file"]}
    weights = manifest["model"].get("weights")
    if isinstance(weights, dict) and weights.get("file"):
        names.add(weights["file"])
    if isinstance(manifest.get("ood"), dict) and manifest["ood"].get("file"):
        names.add(manifest["ood"]["file"])
    return sorted(names)


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Fill in schema version and file hashes, check the schema, write ``manifest.json``.

    ``manifest`` holds every key of ``REQUIRED_KEYS`` except ``files`` and
    ``schema_version``; every file of ``referenced_files`` must already be in ``folder``.
    """
    folder = Path(folder)
    model = (folder / manifest["model"]["file"]).read_bytes()
    names = sorted(set(referenced_files(manifest)) | set(external_data_locations(model)))
    full = {"schema_version": SCHEMA_VERSION, **manifest, "files": {n: sha256_file(folder / n) for n in names}}
    problems = _schema_problems(full)
    if problems:
        raise BundleError(f"write_manifest({folder}): " + "; ".join(problems))
    path = folder / MANIFEST
    path.write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
    return path


def demo_bundle_dir() -> Path:
    """The demo bundle shipped with cxr-triage: ``models/pneumonia-demo`` of a checkout (an editable install), else
    the copy ``pip install .`` put under ``<data>/share/cxr-triage/models/`` (``sysconfig``'s data path: the venv,
    or ``~/.local`` for a ``--user`` install)."""
    checkout = Path(__file__).resolve().parents[1] / "models" / DEMO_BUNDLE_NAME
    if checkout.is_dir():
        return checkout
    schemes = [sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")]
    installed = [Path(sysconfig.get_path("data", scheme)) / INSTALLED_MODELS / DEMO_BUNDLE_NAME for scheme in schemes]
    return next((p for p in installed if p.is_dir()), installed[0])


def default_bundle_dir() -> Path:
    """The bundle programs load when given none: $CXR_TRIAGE_BUNDLE, else the demo bundle (``demo_bundle_dir``)."""
    return Path(os.environ.get(BUNDLE_ENV) or demo_bundle_dir())
