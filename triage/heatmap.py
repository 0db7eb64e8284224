"""Heatmaps: the triage finding's class activation map (the bundle's ``cam`` output) over the image.

numpy + PIL only (no torch, no streamlit), shared by the dashboard and the heatmap
Secondary Capture sent to PACS (``deploy.results.sc``).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .errors import BadInputError
from .ingest import read_radiograph
from .preprocess import PreprocessSpec, preprocess, unit_image

HEAT_ANCHORS = np.array([[0, 0, 0], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=np.float32) / 255
HEATMAP_ALPHA = 0.5
DISPLAY_MAX_SIDE_PX = 1024


def cam_unit(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (rows, cols) float32 in [0, 1], bilinear, min -> 0 and max -> 1 (all zeros when flat).

    The model sees the whole image squashed to its input size, so the map spans the whole image.
    """
    cam = np.asarray(cam, dtype=np.float32)
    span = float(cam.max() - cam.min())
    unit = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
    resized = Image.fromarray(unit, mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) float32 RGB on a dark-purple-orange-yellow scale (perceptually ordered)."""
    position = np.clip(heat, 0.0, 1.0) * (len(HEAT_ANCHORS) - 1)
    low = np.minimum(position.astype(int), len(HEAT_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return HEAT_ANCHORS[low] * (1 - frac) + HEAT_ANCHORS[low + 1] * frac


def overlay(grey: np.ndarray, cam: np.ndarray, alpha: float = HEATMAP_ALPHA) -> np.ndarray:
    """uint8 (H, W) display image + (h, w) map -> uint8 (H, W, 3): colour blended in where the map is high."""
    heat = cam_unit(cam, grey.shape)
    weight = (alpha * heat)[..., None]
    rgb = np.repeat(grey[..., None].astype(np.float32) / 255, 3, axis=2)
    return np.rint(np.clip(rgb * (1 - weight) + heat_colours(heat) * weight, 0, 1) * 255).astype(np.uint8)


def heatmap_input(path: str, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """One file -> (uint8 (H, W) display image, bone bright, at most DISPLAY_MAX_SIDE_PX a side; (C, H, W) float32
    model input). Meant to run in a decode process (``deploy.isolation.Decoder``); BadInputError as when scoring."""
    try:
        radiograph = read_radiograph(path)
        unit = unit_image(radiograph, spec)
    except BadInputError:
        raise
    except Exception as error:  # noqa: BLE001 - as triage.pipeline.prepare: a crafted file must not stop the service
        raise BadInputError(path, "malformed_file", f"reading it raised {type(error).__name__}",
                            "a person reads the study on the modality or PACS") from error
    step = max(1, math.ceil(max(unit.shape) / DISPLAY_MAX_SIDE_PX))
    return np.rint(unit[::step, ::step] * 255).astype(np.uint8), preprocess(radiograph, spec)
