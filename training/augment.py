"""Random augmentation for training batches only; serving never sees it.

Batched, plain torch, seeded through a ``torch.Generator``. No horizontal flip:
a chest radiograph's left and right are not interchangeable (heart, markers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RandomAffine:
    """Small rotation, isotropic scale and translation of a (N, C, H, W) batch; borders repeat."""

    def __init__(self, degrees: float = 7.0, scale: tuple[float, float] = (0.92, 1.08), translate: float = 0.05) -> None:
        self.degrees, self.scale, self.translate = degrees, scale, translate

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n = x.shape[0]
        u = torch.rand(n, 4, generator=generator)
        angle = (2 * u[:, 0] - 1) * math.radians(self.degrees)
        zoom = self.scale[0] + u[:, 1] * (self.scale[1] - self.scale[0])
        shift = (2 * u[:, 2:] - 1) * self.translate * 2  # affine_grid coordinates span [-1, 1]
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class RandomIntensity:
    """Per-image contrast ``c`` and brightness ``b`` on standardized inputs: ``x * c + b``."""

    def __init__(self, contrast: float = 0.1, brightness: float = 0.1) -> None:
        self.contrast, self.brightness = contrast, brightness

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(x.shape[0], 2, generator=generator).to(x.dtype)
        c = 1 + (2 * u[:, 0] - 1) * self.contrast
        b = (2 * u[:, 1] - 1) * self.brightness
        return x * c[:, None, None, None] + b[:, None, None, None]


class Compose:
    """Apply transforms in order, passing the same generator."""

    def __init__(self, *transforms) -> None:
        self.transforms = transforms

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x, generator)
        return x


def default_augment() -> Compose:
    """The training recipe's augmentation: small affine, then intensity."""
    return Compose(RandomAffine(), RandomIntensity())
