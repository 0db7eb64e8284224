"""The input gate: is this image a frontal chest radiograph like those the model was trained on?

The bundle's graph has a ``features`` output that the gate reads (bundles from 0.4: features of a
frozen ImageNet backbone, see ``training.onnx_graph.GateNet``; older bundles: the classifier's own
pooled features). The feature vector is cut into *parts* (column ranges); each part is compared
with the training images by a Mahalanobis distance under a probabilistic-PCA covariance
(Tipping & Bishop 1999: the top ``K`` principal directions keep their own variances, the remaining
``D - K`` share one residual variance, so the inverse is well conditioned and the statistics stay
small) and divided by its own validation cut, so 1 means "as far as the furthest frontal chests".

- ``score``: the mean of those ratios over ``score_parts`` (for 0.4: the spatial 2x2 layout parts);
  over ``threshold`` the image is refused.
- A refused image whose ``view_part`` (an orderless texture part) is within its own cut still looks
  like a chest radiograph, just not laid out as a frontal one: reason ``view_out_of_scope``
  (a lateral or other view); otherwise ``out_of_distribution`` (not a human chest radiograph).

numpy only: this runs in the scoring runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError

ARRAYS = ("mean", "components", "variances", "residual_variance")
VIEW_OUT, OUT_OF_DISTRIBUTION = "view_out_of_scope", "out_of_distribution"


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


def fit_gate(features: np.ndarray, n_components: int = 64, min_variance: float = 1e-8,
             weights: np.ndarray | None = None) -> OodGate:
    """Fit the statistics on (N, D) in-distribution features (N > n_components); threshold left at inf.
    ``weights`` (N,) > 0: each image's weight in the mean and covariance (e.g. 1 / its source's images, so that every
    population counts alike); None weighs every image alike."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) <= n_components or not np.isfinite(x).all():
        raise ValueError(f"fit_gate: need finite (N, D) features with N > n_components={n_components}, got {x.shape}")
    w = np.full(len(x), 1.0 / len(x)) if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    mean = w @ x
    _, singular, vt = np.linalg.svd((x - mean) * np.sqrt(w)[:, None], full_matrices=False)
    eigen = singular**2 * len(x) / (len(x) - 1)
    k = min(n_components, x.shape[1] - 1)
    rest = eigen[k:]
    residual = float(rest.sum() / max(x.shape[1] - k, 1)) if len(rest) else min_variance
    return OodGate(mean, vt[:k], np.maximum(eigen[:k], min_variance), max(residual, min_variance))


def source_weights(sources: np.ndarray) -> np.ndarray:
    """(N,) weight 1 / (images of its source) per image: every source counts alike."""
    _, index, counts = np.unique(sources, return_inverse=True, return_counts=True)
    return 1.0 / counts[index]


def threshold_at(gate: OodGate, features: np.ndarray, percentile: float = 99.5) -> tuple[OodGate, np.ndarray]:
    """(gate with its threshold at ``percentile`` of the distances of (N, D) validation features, those distances)."""
    d = gate.distances(features)
    return gate.with_threshold(float(np.percentile(d, percentile))), d


def gate_arrays(gate: OodGate, prefix: str = "") -> dict[str, np.ndarray]:
    """The statistics as float32 arrays named ``<prefix>mean``... (the threshold lives in the manifest)."""
    return {f"{prefix}mean": gate.mean.astype(np.float32), f"{prefix}components": gate.components.astype(np.float32),
            f"{prefix}variances": gate.variances.astype(np.float32),
            f"{prefix}residual_variance": np.array(gate.residual_variance, dtype=np.float32)}


def save_gate(gate: OodGate, path: str | Path) -> Path:
    """Write one part's statistics (float32, threshold excluded: it lives in the manifest) as ``.npz``."""
    path = Path(path)
    with open(path, "wb") as handle:
        np.savez(handle, **gate_arrays(gate))
    return path


def load_gate(path: str | Path, threshold: float, prefix: str = "") -> OodGate:
    """Read one part's statistics (``save_gate``, or ``prefix`` in ``save_input_gate``'s file); ``BundleError``
    naming the file when it is malformed."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: np.asarray(stored[prefix + name], dtype=np.float64) for name in ARRAYS}
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


@dataclass(frozen=True)
class GatePart:
    """Columns ``[start, stop)`` of the gate's features and their statistics; ``gate.threshold`` is the part's own
    cut (a validation percentile) that its distances are divided by."""

    name: str
    start: int
    stop: int
    gate: OodGate

    def ratios(self, features: np.ndarray) -> np.ndarray:
        """(N, D) gate features -> (N,) this part's distance / its cut (NaN stays NaN)."""
        return self.gate.distances(features[:, self.start:self.stop]) / self.gate.threshold


@dataclass(frozen=True)
class Verdict:
    """The gate on a batch: ``score`` (N,) (refused when over the gate's threshold; NaN counts as over), ``refused``
    (N,) bool and ``reasons`` per image (``""`` when accepted, else ``VIEW_OUT`` or ``OUT_OF_DISTRIBUTION``)."""

    score: np.ndarray
    refused: np.ndarray
    reasons: list[str]


@dataclass(frozen=True)
class InputGate:
    """Parts, which of them make the refusal score, its threshold, and the part that tells a view from a non-chest."""

    parts: tuple[GatePart, ...]
    score_parts: tuple[str, ...]
    threshold: float
    view_part: str | None = None

    def part(self, name: str) -> GatePart:
        return next(p for p in self.parts if p.name == name)

    @property
    def n_features(self) -> int:
        return max(p.stop for p in self.parts)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, D) gate features -> (N,) mean of the score parts' ratios (about 0.6-0.8 for training-like images)."""
        x = self._check(features)
        return np.mean([self.part(name).ratios(x) for name in self.score_parts], axis=0)

    def assess(self, features: np.ndarray) -> Verdict:
        """(N, D) gate features -> ``Verdict``: refused when the score is over the threshold (or not finite)."""
        x = self._check(features)
        score = self.scores(x)
        refused = ~(score <= self.threshold)
        chest_like = (self.part(self.view_part).ratios(x) <= 1.0) if self.view_part else np.zeros(len(x), bool)
        reasons = ["" if not out else VIEW_OUT if chest else OUT_OF_DISTRIBUTION
                   for out, chest in zip(refused, chest_like)]
        return Verdict(score, refused, reasons)

    def _check(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"InputGate: features must be (N, {self.n_features}), got {x.shape}")
        return x


def per_source_cut(values: np.ndarray, sources: np.ndarray, percentile: float) -> float:
    """The largest per-source ``percentile`` of ``values`` (N,); ``sources`` (N,) names each value's source."""
    return float(max(np.percentile(values[sources == s], percentile) for s in np.unique(sources)))


def fit_input_gate(train: np.ndarray, train_sources: np.ndarray, val: np.ndarray, val_sources: np.ndarray,
                   parts: dict[str, tuple[int, int]], score_parts: tuple[str, ...], view_part: str | None = None,
                   percentile: float = 99.5, components: int = 64) -> InputGate:
    """Statistics of each part on (N, D) training features, every source weighted alike (a large source would
    otherwise make the others look unusual); its cut, then the score threshold, at the largest per-source
    ``percentile`` of the (M, D) validation features (so each population gets the same refusal rate)."""
    fitted = []
    weights = source_weights(np.asarray(train_sources))
    for name, (start, stop) in parts.items():
        gate = fit_gate(train[:, start:stop], min(components, len(train) - 1), weights=weights)
        cut = per_source_cut(gate.distances(val[:, start:stop]), val_sources, percentile)
        fitted.append(GatePart(name, start, stop, gate.with_threshold(cut)))
    scores = InputGate(tuple(fitted), score_parts, np.inf, view_part).scores(val)
    return InputGate(tuple(fitted), score_parts, per_source_cut(scores, val_sources, percentile), view_part)


def save_input_gate(gate: InputGate, path: str | Path) -> dict[str, object]:
    """Write every part's statistics to one ``.npz`` (arrays ``<part>/mean``...); returns the manifest's ``parts``,
    ``score_parts``, ``view_part`` and ``threshold`` entries that ``load_input_gate`` reads back."""
    arrays: dict[str, np.ndarray] = {}
    for part in gate.parts:
        arrays.update(gate_arrays(part.gate, f"{part.name}/"))
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return {"threshold": gate.threshold, "score_parts": list(gate.score_parts), "view_part": gate.view_part,
            "parts": {p.name: {"columns": [p.start, p.stop], "threshold": p.gate.threshold} for p in gate.parts}}


def load_input_gate(path: str | Path, section: dict) -> InputGate:
    """The gate of a bundle's ``ood`` manifest section and its statistics file. A section without ``parts`` (bundles
    before 0.4) is one part over every feature column with its ``threshold`` as the cut (score threshold 1, no view
    judgement). ``BundleError`` naming the file and the fix when they disagree."""
    if "parts" not in section:
        gate = load_gate(path, float(section["threshold"]))
        return InputGate((GatePart("features", 0, gate.n_features, gate),), ("features",), 1.0)
    try:
        parts = tuple(GatePart(name, int(spec["columns"][0]), int(spec["columns"][1]),
                               load_gate(path, float(spec["threshold"]), f"{name}/"))
                      for name, spec in section["parts"].items())
        gate = InputGate(parts, tuple(section["score_parts"]), float(section["threshold"]), section.get("view_part"))
        names = {p.name for p in parts}
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise BundleError(f"{path}: the manifest's ood section is malformed ({error!r}). Fix: re-export the bundle") from error
    bad = [p.name for p in parts if p.stop - p.start != p.gate.n_features]
    unknown = [n for n in (*gate.score_parts, gate.view_part) if n is not None and n not in names]
    if bad or unknown or not gate.score_parts or not gate.threshold > 0:
        raise BundleError(f"{path}: ood parts {bad or ''} do not match their columns, or unknown parts {unknown}, or no "
                          "score parts / a non-positive threshold. Fix: re-export the bundle")
    return gate
