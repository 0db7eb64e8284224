"""The exported ONNX graph: one forward pass -> logits, class activation maps and the input gate's features.

``export_onnx`` writes ``CamNet`` (opset 17, dynamic batch) with ``GateNet`` beside the classifier; ``onnx_outputs`` runs it with ONNX
Runtime on CPU; ``torch_logits`` and ``torch_cam`` (MONAI's ``CAM``) are the PyTorch references the
parity checks compare against.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import build_model, head

OPSET = 17
INPUT_NAME, OUTPUT_NAME, CAM_NAME, FEATURES_NAME = "image", "logits", "cam", "features"


def cam_layers(net: nn.Module) -> tuple[str, str]:
    """(layer whose output is the last feature map, classifier layer) names for ``monai.visualize.CAM``."""
    from monai.networks.nets import DenseNet

    return ("class_layers.relu", "class_layers.out") if isinstance(net, DenseNet) else ("_swish", "_fc")


def feature_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map (N, C, h, w) after its activation: what the network pools before the classifier."""
    from monai.networks.nets import DenseNet

    if isinstance(net, DenseNet):
        return net.class_layers.relu(net.features(x))
    x = net._swish(net._bn0(net._conv_stem(net._conv_stem_padding(x))))
    x = net._conv_head(net._conv_head_padding(net._blocks(x)))
    return net._swish(net._bn1(x))


GATE_STAGES = 5
"""The input gate reads the first five stages of ImageNet EfficientNet-Lite0 (to 112 channels at 1/16 resolution)."""
GATE_PARTS = {"texture": (0, 80), "layout_s3": (80, 400), "layout_s4": (400, 848)}
"""Columns of the ``features`` output: the stage-3 map averaged over the image (orderless texture), and the stage-3
and stage-4 maps averaged over each quarter of the image (2x2 layout: where the lungs, heart and spine are)."""
GATE_SCORE_PARTS, GATE_VIEW_PART = ("layout_s3", "layout_s4"), "texture"
GATE_WHAT = ("input-gate features of a frozen ImageNet EfficientNet-Lite0 (stem summed to one channel), not the "
             "classifier's: stage-3 (80 ch) map averaged over the image, then stage-3 and stage-4 (112 ch) maps "
             "averaged over each image quarter (2x2), concatenated (848)")


def quadrants(fmap: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w), h and w even -> (N, 4C): the mean of each quarter of the map, channel-major."""
    n, c, h, w = fmap.shape
    return fmap.reshape(n, c, 2, h // 2, 2, w // 2).mean(dim=(3, 5)).flatten(1)


class GateNet(nn.Module):
    """The input gate's features (N, 848) from a frozen ImageNet EfficientNet-Lite0 truncated after ``GATE_STAGES``.

    ImageNet features, not the fine-tuned ones: features trained for pneumonia say little about layout or view
    (measured: a gate on them passed 8-12 of 12 lateral views), while ImageNet's spatial features see where things are.
    Needs the model input's side divisible by 32 (224: 14 x 14 maps).
    """

    def __init__(self, channels: int = 1, image_size: int = 224) -> None:
        super().__init__()
        net = build_model(1, channels, image_size, pretrained=True).eval()
        self.stem = nn.Sequential(net._conv_stem_padding, net._conv_stem, net._bn0, net._swish)
        self.stages = nn.ModuleList(list(net._blocks.children())[:GATE_STAGES])
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for stage in self.stages[:4]:
            h = stage(h)
        s3 = h
        s4 = self.stages[4](s3)
        return torch.cat([s3.mean(dim=(2, 3)), quadrants(s3), quadrants(s4)], dim=1)


class CamNet(nn.Module):
    """``net`` -> (logits (N, F), cam (N, F, h, w), gate features (N, 848)) from one forward pass (eval mode).

    ``cam[:, k] = sum_c W[k, c] * fmap[:, c] + b[k]`` (a 1x1 convolution with the classifier's
    weights), so ``cam.mean((2, 3)) == logits``; dropout before the classifier is identity in eval.
    The gate features come from ``GateNet`` on the same input.
    """

    def __init__(self, net: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.fc = head(net)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = feature_map(self.net, x)
        cam = F.conv2d(fmap, self.fc.weight[:, :, None, None], self.fc.bias)
        return self.fc(fmap.mean(dim=(2, 3))), cam, self.gate(x)


def torch_cam(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Class activation maps (N, F, h, w) by MONAI's ``CAM`` (hooks, torch) at feature-map resolution: the reference."""
    from monai.visualize import CAM

    target, fc = cam_layers(net)
    cam = CAM(nn_module=net.eval(), target_layers=target, fc_layers=fc)
    with torch.no_grad():
        maps = [cam.compute_map(x, class_idx=torch.full((len(x),), k)) for k in range(head(net).out_features)]
    return torch.cat(maps, dim=1).float().numpy()


def export_onnx(net: nn.Module, path: str | Path, channels: int = 1, size: tuple[int, int] = (224, 224),
                opset: int = OPSET) -> Path:
    """Write ``net`` as ONNX: input "image" [batch, C, H, W] float32 -> "logits", "cam", "features" (``GateNet``)."""
    import onnx

    if size[0] % 32 or size[1] % 32:
        raise ValueError(f"export_onnx: the input gate needs a model input side divisible by 32, got {size}. "
                         "Fix: train at 224 (or another multiple of 32) px")
    graph = CamNet(net.eval().to(memory_format=torch.contiguous_format), GateNet(channels, size[0])).eval()
    dummy = torch.zeros(2, channels, *size, dtype=torch.float32)
    path = Path(path)
    outputs = [OUTPUT_NAME, CAM_NAME, FEATURES_NAME]
    with warnings.catch_warnings():  # MONAI's same-padding slices cannot be folded; harmless
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(graph, (dummy,), str(path), input_names=[INPUT_NAME], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]}, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def onnx_outputs(path: str | Path, x: np.ndarray, batch_size: int = 64, threads: int = 0) -> dict[str, np.ndarray]:
    """Every output of the ONNX model on (N, C, H, W) float32 with ONNX Runtime (CPU), concatenated over batches."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    parts = [session.run(names, {INPUT_NAME: x[i:i + batch_size]}) for i in range(0, len(x), batch_size)]
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}


def onnx_logits(path: str | Path, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run the ONNX model on (N, C, H, W) float32 with ONNX Runtime (CPU) -> (N, F) float32."""
    return onnx_outputs(path, x, batch_size)[OUTPUT_NAME]


@torch.inference_mode()
def torch_logits(net: nn.Module, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Model inputs (N, C, H, W) float32 -> logits (N, F) float32 of ``net`` in eval mode, on CPU."""
    net = net.eval()
    out = [net(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).float().numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)

