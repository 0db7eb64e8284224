"""Export: the in-graph CAM equals MONAI's torch CAM, parity checks fail loudly, int8 QDQ quantization.

Tiny MONAI networks (seconds); real radiographs from samples/ through triage's decode and preprocessing.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the train extra is not installed: pip install -e '.[train]'")
pytest.importorskip("monai", reason="the train extra is not installed: pip install -e '.[train]'")
from monai.networks.nets import DenseNet, EfficientNet  # noqa: E402

from training.onnx_graph import GateNet, export_onnx, onnx_outputs, torch_cam, torch_logits  # noqa: E402
from training.parity import ParityError, check_cam_parity, pipeline_files, pipeline_parity  # noqa: E402
from training.quantize import quantize_int8  # noqa: E402
from triage.pipeline import prepare  # noqa: E402
from triage.preprocess import PreprocessSpec  # noqa: E402

SIZE = 64
SPEC = PreprocessSpec(size=(SIZE, SIZE))
REPO = Path(__file__).resolve().parents[1]


def with_running_stats(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics, so eval-mode BatchNorm is not the identity; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return net.eval()


def with_data_stats(net: torch.nn.Module, x: np.ndarray) -> torch.nn.Module:
    """BatchNorm statistics measured on ``x`` (activations of order 1, as in a trained network); eval mode."""
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    with torch.no_grad():
        net.train()(torch.from_numpy(x))
    return net.eval()


def tiny_efficientnet(findings: int = 2) -> EfficientNet:
    torch.manual_seed(0)
    net = EfficientNet(["r1_k3_s11_e1_i32_o16", "r1_k3_s22_e6_i16_o24"], in_channels=1, num_classes=findings,
                       width_coefficient=0.5, image_size=SIZE)
    return with_running_stats(net)


def tiny_densenet(findings: int = 2) -> DenseNet:
    torch.manual_seed(0)
    net = DenseNet(spatial_dims=2, in_channels=1, out_channels=findings, init_features=8, growth_rate=4,
                   block_config=(2, 2), bn_size=2)
    return with_running_stats(net)


@functools.lru_cache(maxsize=1)
def real_inputs() -> np.ndarray:
    """The scorable sample radiographs (pediatric Kermany and an adult Philips CR), preprocessed by triage at 64 px."""
    prepared = [prepare(str(p), SPEC) for p in pipeline_files()]
    return np.stack([p.model_input for p in prepared if p.model_input is not None])


@pytest.fixture(scope="module", params=["efficientnet", "densenet"])
def exported(request, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    net = tiny_efficientnet() if request.param == "efficientnet" else tiny_densenet()
    return net, export_onnx(net, tmp_path_factory.mktemp(request.param) / "model.onnx", 1, (SIZE, SIZE))


@pytest.mark.parametrize("inputs", ["random", "real"])
def test_onnx_cam_equals_monai_torch_cam(exported, inputs) -> None:
    net, path = exported
    x = np.random.default_rng(0).normal(size=(3, 1, SIZE, SIZE)).astype(np.float32) if inputs == "random" else real_inputs()
    out = onnx_outputs(path, x)
    reference = torch_cam(net, torch.from_numpy(x))
    assert out["cam"].shape == reference.shape and out["cam"].shape[:2] == (len(x), 2)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(out["cam"], reference, atol=1e-5 * max(scale, 1.0))
    np.testing.assert_allclose(out["logits"], torch_logits(net, x), atol=1e-5)
    np.testing.assert_allclose(out["cam"].mean(axis=(2, 3)), out["logits"], atol=1e-5)  # the map's mean is the logit
    with torch.no_grad():  # the input gate's features: the frozen ImageNet GateNet in the same graph, whatever the net
        gate = GateNet(1, SIZE).eval()(torch.from_numpy(x)).numpy()
    assert out["features"].shape == (len(x), 848) == gate.shape
    np.testing.assert_allclose(out["features"], gate, rtol=1e-4, atol=1e-4)
    assert check_cam_parity(net, x, out["cam"])["cam_max_abs_diff"] <= 1e-4


def test_a_wrong_cam_fails_the_parity_check(exported) -> None:
    net, path = exported
    x = real_inputs()[:2].copy()
    cams = onnx_outputs(path, x)["cam"].copy()
    cams[0, 0, 0, 0] += 0.01
    with pytest.raises(ParityError, match="CAM differs from MONAI's CAM"):
        check_cam_parity(net, x, cams)


def test_pipeline_parity_on_real_dicoms_records_the_files_and_fails_on_another_model(exported, tmp_path) -> None:
    net, path = exported
    temperatures = np.array([1.5, 1.0])
    parity = pipeline_parity(net, path, pipeline_files(), SPEC, temperatures)
    assert parity["pipeline_max_abs_risk_diff"] <= 1e-4
    assert "samples/dicom/philips-cr-chest-pa-j2k.dcm" in parity["pipeline_files"]
    assert sum(f.startswith("samples/kermany/") for f in parity["pipeline_files"]) == 12
    assert parity["pipeline_skipped"] == {"samples/dicom/fuji-cr-extremity-j2k.dcm": "body_part_out_of_scope",
                                          "samples/dicom/not-an-image.dcm": "not_dicom"}
    other = export_onnx(tiny_efficientnet() if isinstance(net, DenseNet) else tiny_densenet(), tmp_path / "other.onnx",
                        1, (SIZE, SIZE))
    with pytest.raises(ParityError, match="DICOM -> risk differs"):
        pipeline_parity(net, other, pipeline_files(), SPEC, temperatures)


def test_int8_is_static_qdq_per_channel_and_close_to_fp32(tmp_path) -> None:
    import onnx

    x = real_inputs()
    net = with_data_stats(tiny_efficientnet(findings=1), x)
    fp32 = export_onnx(net, tmp_path / "model.onnx", 1, (SIZE, SIZE))
    int8 = quantize_int8(fp32, tmp_path / "model-int8.onnx", x)
    graph = onnx.load(str(int8)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    initializers = {i.name: i for i in graph.initializer}
    weight_scales = [initializers[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear"
                     and n.input[0] in initializers and initializers[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert weight_scales and any(len(s.dims) == 1 and s.dims[0] > 1 for s in weight_scales), "per-channel scales"
    a, b = onnx_outputs(fp32, x), onnx_outputs(int8, x)
    assert b["cam"].shape == a["cam"].shape and b["features"].shape == a["features"].shape
    assert np.corrcoef(a["logits"][:, 0], b["logits"][:, 0])[0, 1] > 0.95
    assert not (tmp_path / "model-int8.prep.onnx").exists()


def test_out_of_scope_files_are_decoded_without_tag_checks_to_measure_the_gate(shared_data) -> None:
    """prepare() refuses the hip on its tags; the export still measures how far the gate puts it."""
    from training.decode_check import relative
    from training.ood_fit import unchecked_input

    hip = shared_data / "dicom" / "out-of-scope" / "fuji-cr-hip-mono2-jpegls-lossless.dcm"
    assert prepare(str(hip), SPEC).reason == "body_part_out_of_scope"
    x = unchecked_input(hip, SPEC)
    assert x is not None and x.shape == (1, SIZE, SIZE) and np.isfinite(x).all()
    assert unchecked_input(REPO / "samples" / "dicom" / "not-an-image.dcm", SPEC) is None
    assert relative(hip) == "../shared/data/dicom/out-of-scope/fuji-cr-hip-mono2-jpegls-lossless.dcm"
