"""The exported ONNX graph: one forward pass -> logits, class activation maps and pooled features.

``export_onnx`` writes ``CamNet`` (opset 17, dynamic batch); ``onnx_outputs`` runs it with ONNX
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

from .model import head

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


class CamNet(nn.Module):
    """``net`` -> (logits (N, F), cam (N, F, h, w), features (N, C)) from one forward pass (eval mode).

    ``cam[:, k] = sum_c W[k, c] * fmap[:, c] + b[k]`` (a 1x1 convolution with the classifier's
    weights), so ``cam.mean((2, 3)) == logits``; dropout before the classifier is identity in eval.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.fc = head(net)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = feature_map(self.net, x)
        features = fmap.mean(dim=(2, 3))
        cam = F.conv2d(fmap, self.fc.weight[:, :, None, None], self.fc.bias)
        return self.fc(features), cam, features


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
    """Write ``net`` as ONNX: input "image" [batch, C, H, W] float32 -> "logits", "cam", "features"."""
    import onnx

    graph = CamNet(net.eval().to(memory_format=torch.contiguous_format)).eval()
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

