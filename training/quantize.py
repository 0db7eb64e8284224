"""Static int8 quantization of the exported graph, accepted only when validation AUROC holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_graph import INPUT_NAME, OUTPUT_NAME, onnx_outputs

INT8_MAX_AUROC_DROP, INT8_CALIBRATION_IMAGES = 0.005, 300


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
             fp32_logits: np.ndarray, log: Callable[[str], None], column: int = 0) -> tuple[dict[str, Any], np.ndarray | None]:
    """Quantize, compare validation AUROC and speed; (manifest section, int8 validation outputs or None if refused)."""
    from sklearn.metrics import roc_auc_score

    int8_path = quantize_int8(fp32_path, out / "model-int8.onnx", x_cal)
    int8 = onnx_outputs(int8_path, x_val)
    known = ~np.isnan(y_val[:, column])
    auroc_fp32 = float(roc_auc_score(y_val[known, column], fp32_logits[known, column]))
    auroc_int8 = float(roc_auc_score(y_val[known, column], int8[OUTPUT_NAME][known, column]))
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

