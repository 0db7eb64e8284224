"""Out-of-distribution gate: is this image like the chest radiographs the model was trained on?

The model's pooled features (a graph output of the bundle) are compared with the
training distribution by a Mahalanobis distance under a probabilistic-PCA covariance
(Tipping & Bishop 1999): the top ``K`` principal directions keep their own variances,
the remaining ``D - K`` share one residual variance, so the inverse covariance is
well conditioned and the stored statistics stay small (``K x D`` instead of ``D x D``).
An image whose distance is above the threshold (a high percentile of the validation
distances, set at export) goes to human review with reason ``out_of_distribution``.
numpy only: this runs in the scoring runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError

ARRAYS = ("mean", "components", "variances", "residual_variance")


@dataclass(frozen=True)
class OodGate:
    """Feature statistics of the training images and the distance threshold.

    ``mean`` (D,), ``components`` (K, D) orthonormal rows, ``variances`` (K,) > 0,
    ``residual_variance`` > 0 (variance per remaining direction), ``threshold`` in
    distance units (``distances`` below). Build with ``fit_gate`` or ``load_gate``.
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float
    threshold: float = float("inf")

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N, D) pooled features -> (N,) float64 Mahalanobis distance per sqrt(D) (about 1 in distribution)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"OodGate.distances: features must be (N, {self.n_features}), got {x.shape}")
        centered = x - self.mean
        projected = centered @ self.components.T
        residual = np.maximum(np.einsum("nd,nd->n", centered, centered) - np.einsum("nk,nk->n", projected, projected), 0)
        squared = (projected**2 / self.variances).sum(axis=1) + residual / self.residual_variance
        return np.sqrt(squared / self.n_features)

    def is_out(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) bool: over the threshold (NaN/inf features count as out)."""
        d = self.distances(features)
        return ~(d <= self.threshold)

    def with_threshold(self, threshold: float) -> "OodGate":
        return OodGate(self.mean, self.components, self.variances, self.residual_variance, float(threshold))


def fit_gate(features: np.ndarray, n_components: int = 64, min_variance: float = 1e-8) -> OodGate:
    """Fit the statistics on (N, D) in-distribution features (N > n_components); threshold left at inf."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) <= n_components or not np.isfinite(x).all():
        raise ValueError(f"fit_gate: need finite (N, D) features with N > n_components={n_components}, got {x.shape}")
    mean = x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    eigen = singular**2 / (len(x) - 1)
    k = min(n_components, x.shape[1] - 1)
    rest = eigen[k:]
    residual = float(rest.sum() / max(x.shape[1] - k, 1)) if len(rest) else min_variance
    return OodGate(mean, vt[:k], np.maximum(eigen[:k], min_variance), max(residual, min_variance))


def threshold_at(gate: OodGate, features: np.ndarray, percentile: float = 99.5) -> tuple[OodGate, np.ndarray]:
    """(gate with its threshold at ``percentile`` of the distances of (N, D) validation features, those distances)."""
    d = gate.distances(features)
    return gate.with_threshold(float(np.percentile(d, percentile))), d


def save_gate(gate: OodGate, path: str | Path) -> Path:
    """Write the statistics (float32, threshold excluded: it lives in the manifest) as ``.npz``."""
    path = Path(path)
    with open(path, "wb") as handle:
        np.savez(handle, mean=gate.mean.astype(np.float32), components=gate.components.astype(np.float32),
                 variances=gate.variances.astype(np.float32),
                 residual_variance=np.array(gate.residual_variance, dtype=np.float32))
    return path


def load_gate(path: str | Path, threshold: float) -> OodGate:
    """Read ``save_gate``'s file; ``BundleError`` naming the file when it is malformed."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: np.asarray(stored[name], dtype=np.float64) for name in ARRAYS}
    except (OSError, KeyError, ValueError) as error:
        raise BundleError(f"{path}: not a readable OOD statistics file ({error}). Fix: re-export the bundle") from error
    mean, components, variances = arrays["mean"], arrays["components"], arrays["variances"]
    residual = float(arrays["residual_variance"])
    if (mean.ndim != 1 or components.ndim != 2 or components.shape[1] != mean.shape[0]
            or variances.shape != (components.shape[0],) or not (variances > 0).all() or not residual > 0):
        raise BundleError(f"{path}: inconsistent OOD statistics (mean {mean.shape}, components {components.shape}, "
                          f"variances {variances.shape}). Fix: re-export the bundle")
    if not threshold > 0:
        raise BundleError(f"{path}: OOD threshold must be positive, got {threshold!r}. Fix: re-export the bundle")
    return OodGate(mean, components, variances, residual, float(threshold))
