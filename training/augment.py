"""Random augmentation for training batches only (MONAI transforms); serving never sees it.

Applied per image to standardized model inputs (C, H, W). Seeded through MONAI's
``set_random_state``, so a run is reproducible. No horizontal flip by default: a chest
radiograph's left and right are not interchangeable (heart, aortic knob, markers);
``flip=True`` adds one for datasets where that is wanted.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import (
    Compose, RandAdjustContrast, RandAffine, RandFlip, RandGaussianNoise, RandScaleIntensity, RandShiftIntensity)
from monai.utils import convert_to_tensor


def default_augment(size: int, seed: int = 0, *, degrees: float = 7.0, scale: float = 0.08, translate: float = 0.05,
                    flip: bool = False) -> Compose:
    """Small affine (rotation +-``degrees``, scale 1 +- ``scale``, shift +- ``translate`` of the side, borders
    repeated), gamma contrast, intensity scale and shift, faint Gaussian noise; seeded."""
    transforms = [
        RandAffine(prob=0.8, rotate_range=math.radians(degrees), scale_range=(scale, scale),
                   translate_range=(translate * size, translate * size), padding_mode="border", mode="bilinear"),
        RandAdjustContrast(prob=0.3, gamma=(0.8, 1.25)),
        RandScaleIntensity(factors=0.1, prob=0.5),
        RandShiftIntensity(offsets=0.1, prob=0.5),
        RandGaussianNoise(prob=0.2, std=0.03),
    ]
    if flip:
        transforms.append(RandFlip(prob=0.5, spatial_axis=1))
    augment = Compose(transforms)
    augment.set_random_state(seed=seed)
    return augment


def augment_batch(x: torch.Tensor, augment: Compose) -> torch.Tensor:
    """Apply ``augment`` to each (C, H, W) image of a (N, C, H, W) float batch; a plain tensor back."""
    out = [convert_to_tensor(augment(image), track_meta=False, dtype=torch.float32) for image in x]
    return torch.stack(out) if out else x


def batch_seed(seed: int, *parts: int) -> int:
    """A 32-bit seed derived from the run seed and e.g. (stage, epoch), for reseeding augmentation."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])
