"""A real, tiny model bundle for fast end-to-end tests (built with onnx.helper, no torch).

The model's logit is ``scale * mean(image) + bias``: brighter images get higher risk,
so rankings are meaningful and predictable. Like an exported bundle it also returns a
class activation map ``cam`` (the image averaged over 8x8 blocks, times ``scale``, plus
``bias``: its spatial mean is the logit) and pooled ``features`` (the same 8x8 block
means, flattened: 64 values) that an out-of-distribution gate can measure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from triage.bundle import write_manifest
from triage.ood import fit_gate, fit_input_gate, save_gate, save_input_gate, threshold_at
from triage.preprocess import PreprocessSpec

SIZE = 64
BLOCK = 8
CAM_SIDE = SIZE // BLOCK


def tiny_onnx_model(scale: float = 4.0, bias: float = 0.0, with_cam: bool = True) -> onnx.ModelProto:
    """image (batch, 1, SIZE, SIZE) float32 -> logits (batch, 1) [, cam (batch, 1, 8, 8), features (batch, 64)]."""
    nodes = [
        helper.make_node("AveragePool", ["image"], ["blocks"], kernel_shape=[BLOCK, BLOCK], strides=[BLOCK, BLOCK]),
        helper.make_node("Mul", ["blocks", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["cam"]),
        helper.make_node("GlobalAveragePool", ["cam"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logits"], axis=1),
        helper.make_node("Flatten", ["blocks"], ["features"], axis=1),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])]
    if with_cam:
        outputs += [helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["batch", 1, CAM_SIDE, CAM_SIDE]),
                    helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", CAM_SIDE * CAM_SIDE])]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        outputs,
        [helper.make_tensor("scale", TensorProto.FLOAT, [1], [scale]),
         helper.make_tensor("bias", TensorProto.FLOAT, [1], [bias])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_features(model: onnx.ModelProto, inputs: np.ndarray) -> np.ndarray:
    """The model's ``features`` output for (N, 1, SIZE, SIZE) float32 inputs, from ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["features"], {"image": inputs.astype(np.float32)})[0]


def build_tiny_bundle(folder: Path, threshold: float = 0.5, temperature: float = 1.0, with_cam: bool = False,
                      ood_inputs: np.ndarray | None = None, ood_percentile: float = 99.5, gate_parts: bool = False) -> Path:
    """Write a complete, valid bundle into ``folder`` and return it.

    ``with_cam=True`` adds the ``cam`` and ``features`` outputs (the default is the older,
    logits-only format). ``ood_inputs`` (N, 1, SIZE, SIZE) in-distribution model inputs
    add an OOD gate (and the outputs): statistics from the first half, threshold at
    ``ood_percentile`` of the second half's distances. ``gate_parts=True`` writes the parts format of bundles from
    0.4 instead: score part ``layout`` (all 64 block means), view part ``texture`` (the top half's 32 blocks).
    """
    folder.mkdir(parents=True, exist_ok=True)
    with_cam = with_cam or ood_inputs is not None
    model = tiny_onnx_model(with_cam=with_cam)
    onnx.save(model, folder / "model.onnx")
    (folder / "MODEL_CARD.md").write_text("# tiny test model\nFor tests only.\n")
    spec = PreprocessSpec(size=(SIZE, SIZE))
    outputs = {"logits": "logits", **({"cam": "cam", "features": "features"} if with_cam else {})}
    manifest = {
        "name": "tiny-test",
        "version": "0.0.1",
        "findings": ["pneumonia"],
        "model": {"file": "model.onnx", "input": {"name": "image", "shape": ["batch", 1, SIZE, SIZE], "dtype": "float32"},
                  "outputs": outputs, "opset": 17,
                  **({"cam": {"shape": ["batch", 1, CAM_SIDE, CAM_SIDE]}} if with_cam else {})},
        "preprocessing": spec.to_dict(),
        "calibration": {"method": "temperature", "temperature": {"pneumonia": temperature}},
        "operating_point": {"finding": "pneumonia", "flag_rate": 0.05, "threshold": threshold},
        "training": {"dataset": "none (synthetic test model)"},
        "metrics": {"validation": {"risk_histogram": np.histogram([0.5], bins=4, range=(0, 1))[0].tolist()}},
    }
    if ood_inputs is not None:
        features = tiny_features(model, ood_inputs)
        half = len(features) // 2
        if gate_parts:
            parts = fit_input_gate(features[:half], np.zeros(half), features[half:], np.zeros(len(features) - half),
                                   {"layout": (0, 64), "texture": (0, 32)}, ("layout",), "texture", ood_percentile, 8)
            manifest["ood"] = {"method": "imagenet_ppca_parts", "file": "ood.npz",
                               **save_input_gate(parts, folder / "ood.npz")}
        else:
            gate, _ = threshold_at(fit_gate(features[:half], n_components=8), features[half:], ood_percentile)
            save_gate(gate, folder / "ood.npz")
            manifest["ood"] = {"method": "mahalanobis_ppca", "file": "ood.npz", "threshold": gate.threshold,
                               "percentile": ood_percentile}
    write_manifest(folder, manifest)
    return folder
