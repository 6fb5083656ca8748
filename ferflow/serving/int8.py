"""An int8 copy of the exported ONNX network (`export.int8: true`), shipped only when it
classifies the validation split almost as well as the float network.

onnxruntime's static quantization (QDQ format, weights int8 per channel, activations uint8)
is calibrated on training images only; the float and int8 networks are then both scored
on validation (no TTA, argmax). The int8 file replaces the float one when its accuracy
drops by at most INT8_MAX_DROP; otherwise the float file ships and the reason is recorded.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferflow.core import files
from ferflow.serving.runtime import OnnxPredictor

INT8_MAX_DROP = 0.005  # validation accuracy, absolute: 0.5 points
CALIBRATION_IMAGES = 512  # training images that set the activation ranges
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class Int8Outcome:
    """What quantization gave, for metrics/export.json and the MLflow run."""

    kept: bool
    val_accuracy_float: float
    val_accuracy_int8: float
    calibration_images: int
    reason: str

    def as_metrics(self) -> dict[str, Any]:
        return asdict(self)


def calibration_sample(x_train: np.ndarray, n: int = CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
    """`n` training images (all when fewer), picked with a fixed seed."""
    if len(x_train) <= n:
        return x_train
    return x_train[np.sort(np.random.default_rng(seed).choice(len(x_train), n, replace=False))]


def quantize(
    onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str], x_calibration: np.ndarray, input_name: str
) -> None:
    """Write the int8 network of `onnx_path` (whose input is `input_name`) to `out_path`
    (atomically), calibrated on `x_calibration`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(x_calibration), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.batches, None)
            return None if start is None else {input_name: x_calibration[start : start + CALIBRATION_BATCH]}

    with files.atomic_path(Path(out_path)) as tmp:
        quantize_static(
            str(onnx_path),
            str(tmp),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )


def accuracy(network: OnnxPredictor, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX network on (x, y), one view per image."""
    return float((network.predict(x).argmax(axis=1) == y).mean())


def int8_if_accurate(onnx_path: Path, x_train: np.ndarray, val: tuple[np.ndarray, np.ndarray]) -> Int8Outcome:
    """Quantize `onnx_path`; replace it by the int8 network when validation accuracy drops
    by at most INT8_MAX_DROP. Nothing here sees the test split."""
    x_val, y_val = val
    sample = calibration_sample(x_train)
    int8_path = onnx_path.with_name(onnx_path.stem + ".int8.onnx")
    float_network = OnnxPredictor(onnx_path)
    quantize(onnx_path, int8_path, sample, float_network.input_name)
    float_acc, int8_acc = accuracy(float_network, x_val, y_val), accuracy(OnnxPredictor(int8_path), x_val, y_val)
    kept = float_acc - int8_acc <= INT8_MAX_DROP
    if kept:
        os.replace(int8_path, onnx_path)
        reason = f"int8 kept: validation accuracy {int8_acc:.4f} vs {float_acc:.4f} float"
    else:
        int8_path.unlink()
        reason = (
            f"int8 not kept: validation accuracy {int8_acc:.4f} vs {float_acc:.4f} float, "
            f"a drop over {100 * INT8_MAX_DROP:g} points"
        )
    return Int8Outcome(kept, round(float_acc, 6), round(int8_acc, 6), len(sample), reason)
