"""A real, tiny model bundle for fast end-to-end tests (built with onnx.helper, no torch).

The model's logit is ``scale * mean(image) + bias``: brighter images get higher risk,
so rankings are meaningful and predictable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from triage.bundle import write_manifest
from triage.preprocess import PreprocessSpec

SIZE = 64


def tiny_onnx_model(scale: float = 4.0, bias: float = 0.0) -> onnx.ModelProto:
    """image (batch, 1, SIZE, SIZE) float32 -> logits (batch, 1)."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Mul", ["flat", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor("scale", TensorProto.FLOAT, [1], [scale]),
         helper.make_tensor("bias", TensorProto.FLOAT, [1], [bias])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_tiny_bundle(folder: Path, threshold: float = 0.5, temperature: float = 1.0) -> Path:
    """Write a complete, valid bundle into ``folder`` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_onnx_model(), folder / "model.onnx")
    (folder / "MODEL_CARD.md").write_text("# tiny test model\nFor tests only.\n")
    spec = PreprocessSpec(size=(SIZE, SIZE))
    write_manifest(folder, {
        "name": "tiny-test",
        "version": "0.0.1",
        "findings": ["pneumonia"],
        "model": {"file": "model.onnx", "input": {"name": "image", "shape": ["batch", 1, SIZE, SIZE], "dtype": "float32"},
                  "outputs": {"logits": "logits"}, "opset": 17},
        "preprocessing": spec.to_dict(),
        "calibration": {"method": "temperature", "temperature": {"pneumonia": temperature}},
        "operating_point": {"finding": "pneumonia", "flag_rate": 0.05, "threshold": threshold},
        "training": {"dataset": "none (synthetic test model)"},
        "metrics": {"validation": {"risk_histogram": np.histogram([0.5], bins=4, range=(0, 1))[0].tolist()}},
    })
    return folder
