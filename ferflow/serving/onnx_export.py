"""The trained Keras network as an ONNX file, checked against Keras before it ships.

Keras 3 writes ONNX itself (`Model.export(format="onnx")`, tf2onnx underneath on the
TensorFlow backend). The file carries the net's crop margin as metadata, so the served
model's tencrop TTA needs no Keras. `export_onnx` fails with one line when ONNX and Keras
probabilities differ by more than PARITY_TOLERANCE on the images given (the validation split).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ferflow.core import files
from ferflow.core.errors import UserError
from ferflow.serving.runtime import CROP_MARGIN_KEY, OnnxPredictor

PARITY_TOLERANCE = 1e-4  # max absolute difference of any class probability
PARITY_BATCH = 256


class OnnxExportError(UserError):
    """The ONNX file could not be written or disagrees with the Keras model."""


def parity_gap(keras_model: Any, onnx_path: str | os.PathLike[str], x: np.ndarray) -> float:
    """Max absolute difference between Keras and ONNX probabilities on `x`."""
    onnx = OnnxPredictor(onnx_path)
    gap = 0.0
    for i in range(0, len(x), PARITY_BATCH):
        part = x[i : i + PARITY_BATCH]
        expected = np.asarray(keras_model.predict_on_batch(part), dtype=np.float64)
        gap = max(gap, float(np.abs(onnx.predict(part).astype(np.float64) - expected).max()))
    return gap


def _write_onnx(keras_model: Any, target: Path) -> None:
    import onnx

    from ferflow.model.architectures import crop_margin

    keras_model(np.zeros((1, *keras_model.input_shape[1:]), np.float32))  # export needs a called model
    with warnings.catch_warnings():  # Keras' tf2onnx shim probes np.object (a FutureWarning on NumPy 2)
        warnings.simplefilter("ignore", FutureWarning)
        keras_model.export(str(target), format="onnx", verbose=False)
    graph = onnx.load(str(target))
    entry = graph.metadata_props.add()
    entry.key, entry.value = CROP_MARGIN_KEY, str(crop_margin(keras_model))
    onnx.save(graph, str(target))


def export_onnx(keras_model_path: str | os.PathLike[str], onnx_path: str | os.PathLike[str], x_check: np.ndarray) -> float:
    """Write `onnx_path` (atomically) from the `.keras` file; return the parity gap on `x_check`."""
    import keras

    if len(x_check) == 0:
        raise OnnxExportError(f"{onnx_path}: no images to check ONNX against Keras (the validation split is empty)")
    model = keras.models.load_model(keras_model_path, compile=False)
    onnx_path = Path(onnx_path)
    with files.atomic_path(onnx_path) as tmp:
        try:
            _write_onnx(model, Path(tmp))
        except Exception as exc:  # tf2onnx/onnx raise many types; the reason is what matters
            raise OnnxExportError(f"{onnx_path}: ONNX export failed: {' '.join(str(exc).split())[:300]}") from None
        gap = parity_gap(model, tmp, x_check)
        if not gap <= PARITY_TOLERANCE:
            raise OnnxExportError(
                f"{onnx_path}: ONNX and Keras probabilities differ by up to {gap:.3g} on {len(x_check)} "
                f"validation images, over the tolerance of {PARITY_TOLERANCE:g}"
            )
    return gap
