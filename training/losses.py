"""Masked multi-label binary cross-entropy: NaN targets (unknown) contribute nothing.

``positive_weights`` gives the usual negatives/positives ratio per finding, counted
over known labels only, for ``pos_weight``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def positive_weights(labels: np.ndarray, max_weight: float = 100.0) -> np.ndarray:
    """(N, K) float labels with NaN = unknown -> (K,) float32 ``n_negative / n_positive``.

    Clipped to [1/max_weight, max_weight]; a finding without known positives or negatives gets 1.
    """
    known = ~np.isnan(labels)
    positive = np.where(known, labels, 0).sum(axis=0)
    negative = known.sum(axis=0) - positive
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((positive > 0) & (negative > 0), negative / positive, 1.0)
    return np.clip(ratio, 1.0 / max_weight, max_weight).astype(np.float32)


def masked_bce_with_logits(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean BCE over the known (non-NaN) entries of (N, K) ``targets``; 0 (with a gradient) when none is known.

    ``pos_weight``: (K,) weight of the positive term per finding. ``label_smoothing``
    moves known targets toward 0.5 by that fraction.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"masked_bce_with_logits: logits {tuple(logits.shape)} and targets "
                         f"{tuple(targets.shape)} differ in shape")
    known = ~torch.isnan(targets)
    clean = torch.where(known, targets, torch.zeros_like(targets)).to(logits.dtype)
    if label_smoothing:
        clean = clean * (1 - label_smoothing) + 0.5 * label_smoothing
    loss = F.binary_cross_entropy_with_logits(logits, clean, pos_weight=pos_weight, reduction="none")
    loss = torch.where(known, loss, torch.zeros_like(loss))
    return loss.sum() / known.sum().clamp(min=1)
