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
    Compose, RandAdjustContrast, RandAffine, RandFlip, RandGaussianNoise, RandGaussianSmooth, RandScaleIntensity,
    RandShiftIntensity)
from monai.utils import convert_to_tensor


PRESETS = ("light", "transfer")


def default_augment(size: int, seed: int = 0, *, flip: bool = False, preset: str = "transfer") -> Compose:
    """The training augmentation, seeded.

    ``light`` (the 0.2 recipe): small affine (rotation +-7 degrees, scale 1 +- 0.08, shift +- 5% of the side, borders
    repeated), gamma contrast 0.8-1.25, intensity scale/shift 0.1, faint Gaussian noise.
    ``transfer`` (chosen so a model meets other sites' images during training): wider affine (+-10 degrees,
    scale 0.85-1.15, shift 7%), gamma 0.6-1.6, intensity scale/shift 0.2, Gaussian blur (sigma 0.3-1.5 px:
    softer detectors and lower resolutions), stronger noise.
    """
    if preset not in PRESETS:
        raise ValueError(f"augmentation preset {preset!r}: choose one of {', '.join(PRESETS)}")
    strong = preset == "transfer"
    degrees, scale, translate = (10.0, 0.15, 0.07) if strong else (7.0, 0.08, 0.05)
    transforms = [
        RandAffine(prob=0.9 if strong else 0.8, rotate_range=math.radians(degrees), scale_range=(scale, scale),
                   translate_range=(translate * size, translate * size), padding_mode="border", mode="bilinear"),
        RandAdjustContrast(prob=0.5 if strong else 0.3, gamma=(0.6, 1.6) if strong else (0.8, 1.25)),
        RandScaleIntensity(factors=0.2 if strong else 0.1, prob=0.5),
        RandShiftIntensity(offsets=0.2 if strong else 0.1, prob=0.5),
    ]
    if strong:
        transforms.append(RandGaussianSmooth(sigma_x=(0.3, 1.5), sigma_y=(0.3, 1.5), prob=0.3))
    transforms.append(RandGaussianNoise(prob=0.3 if strong else 0.2, std=0.06 if strong else 0.03))
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
