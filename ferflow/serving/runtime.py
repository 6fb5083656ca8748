"""The network behind the served model: ONNX on onnxruntime, or Keras on TensorFlow.

Both predictors have `predict(x, batch_size, verbose)` like keras.Model.predict, plus
`n_classes`, `crop_margin` and `warm_up()`, so `tta.predict_proba` (the evaluate stage's
TTA) runs on either unchanged. Nothing here imports TensorFlow or Keras at module level:
with `serve.runtime: onnx` the served process never loads them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ferflow.core.noise import filtered_stderr
from ferflow.data.preprocessing import IMAGE_SIZE

INFER_BATCH = 256  # images per model call; bounds activation memory for large requests
CROP_MARGIN_KEY = "ferflow.crop_margin"  # ONNX metadata: pixels between the input edge and the net's centre crop
LOG = logging.getLogger(__name__)


class RuntimeUnavailable(RuntimeError):
    """Neither runtime can load the exported network (the message says why)."""


class KerasPredictor:
    """`predict(x, batch_size, verbose)` like keras.Model.predict, minus its per-call setup.

    `Model.predict` builds a data pipeline on every call (~50 ms); `predict_on_batch`
    reuses one traced function (~1 ms for a 48x48 image), which is what a server needs.
    """

    runtime = "keras"

    def __init__(self, model: Any) -> None:
        from ferflow.model.architectures import crop_margin

        self.model = model
        self.n_classes = int(model.output_shape[-1])
        self.crop_margin = crop_margin(model)

    def predict(self, x: np.ndarray, batch_size: int = INFER_BATCH, verbose: int = 0) -> np.ndarray:
        parts = [np.asarray(self.model.predict_on_batch(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.n_classes), np.float32)

    def warm_up(self) -> None:
        # trace now for batch sizes 1, 2 and 3: by the third, tf.function (reduce_retracing)
        # has relaxed the batch dimension, so the first real requests are not slowed by tracing
        for n in (1, 2, 3):
            self.predict(np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32))


class OnnxPredictor:
    """The exported ONNX network on onnxruntime's CPU provider."""

    runtime = "onnx"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: graph-optimizer notes are not the user's concern
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.n_classes = int(self.session.get_outputs()[0].shape[-1])
        self.crop_margin = int(self.session.get_modelmeta().custom_metadata_map.get(CROP_MARGIN_KEY, 0))

    def predict(self, x: np.ndarray, batch_size: int = INFER_BATCH, verbose: int = 0) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = [self.session.run(None, {self.input_name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.n_classes), np.float32)

    def warm_up(self) -> None:
        self.predict(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32))


def load_keras(keras_path: str | os.PathLike[str]) -> KerasPredictor:
    with filtered_stderr():  # TensorFlow's oneDNN/absl start-up lines stay out of the server's log
        try:
            import keras
        except ImportError as exc:
            raise RuntimeUnavailable(
                f"{keras_path}: cannot load the Keras model ({exc}); install the pinned requirements "
                "(keras, tensorflow-cpu) or export again to get a usable ONNX file"
            ) from None
        return KerasPredictor(keras.models.load_model(keras_path, compile=False))


def load_predictor(
    keras_path: str | os.PathLike[str], onnx_path: str | os.PathLike[str] | None, runtime: str
) -> KerasPredictor | OnnxPredictor:
    """The predictor `runtime` asks for. onnx with an export that has no ONNX file (exported
    before it existed) uses Keras quietly; a missing or unreadable ONNX file falls back to
    Keras with one warning line, and to RuntimeUnavailable when Keras cannot be imported."""
    if runtime == "onnx" and onnx_path is not None:
        try:
            return OnnxPredictor(onnx_path)
        except ImportError as exc:
            reason = f"onnxruntime is not installed ({exc})"
        except Exception as exc:  # onnxruntime raises its own types for a missing or corrupt file
            reason = " ".join(str(exc).split())[:300]
        LOG.warning("serve.runtime onnx: cannot load %s (%s); serving the Keras model instead", onnx_path, reason)
    return load_keras(keras_path)
