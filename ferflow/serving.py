"""The exported MLflow pyfunc: image bytes or pixel tensors in, emotion probabilities out.

It wraps the Keras model, the label map and `preprocessing.prepare_batch` (the same
function the extract stage used), so callers send ordinary images.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import pandas as pd

from ferflow.preprocessing import IMAGE_SIZE, ImageError, decode_image, normalize, prepare_batch

try:  # mlflow is only needed to export/serve, not to import this module's helpers
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[assignment,misc]


class RequestError(ValueError):
    """A bad request: the message names the problem (served as HTTP 400)."""


def _as_bytes(value: Any, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"row {row}: column 'image' is not valid base64") from None
    raise RequestError(f"row {row}: column 'image' must be encoded image bytes, got {type(value).__name__}")


def pixels_to_batch(array: np.ndarray) -> np.ndarray:
    """Pixel tensors (N,48,48), (N,48,48,1) or (N,2304) -> model input.

    uint8 (or any integer dtype) means 0-255; floating point means already in [0, 1].
    """
    array = np.asarray(array)
    if array.ndim == 2 and array.shape[1] == IMAGE_SIZE * IMAGE_SIZE:
        array = array.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise RequestError(f"pixel tensor must have shape (N,48,48), (N,48,48,1) or (N,2304); got {tuple(array.shape)}")
    if np.issubdtype(array.dtype, np.integer):
        if array.min(initial=0) < 0 or array.max(initial=0) > 255:
            raise RequestError("integer pixels must be in 0..255")
        return normalize(array.astype(np.uint8))
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min(initial=0) < 0 or array.max(initial=0) > 1:
            raise RequestError("float pixels must be finite and in [0, 1] (send uint8 for 0..255)")
        return array.astype(np.float32)[..., np.newaxis]
    raise RequestError(f"pixel tensor dtype {array.dtype} not supported: send uint8 0..255 or float 0..1")


class EmotionModel(PythonModel):
    """pyfunc: DataFrame with column `image` (bytes/base64) or a pixel tensor -> predictions."""

    def load_context(self, context) -> None:
        import json

        import keras

        self.model = keras.models.load_model(context.artifacts["keras_model"], compile=False)
        with open(context.artifacts["label_map"], encoding="utf-8") as fh:
            self.classes = json.load(fh)["classes"]
        with open(context.artifacts["serve_config"], encoding="utf-8") as fh:
            self.config = json.load(fh)

    def _batch(self, model_input: Any) -> tuple[np.ndarray, list[bool]]:
        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise RequestError(f"missing column 'image' (got columns {list(model_input.columns)})")
            images = []
            for i, value in enumerate(model_input["image"]):
                try:
                    images.append(decode_image(_as_bytes(value, i), max_pixels=self.config["max_image_pixels"]))
                except ImageError as exc:
                    raise RequestError(f"row {i}: {exc}") from None
            return prepare_batch(images), [False] * len(images)
        if isinstance(model_input, dict):
            if len(model_input) != 1:
                raise RequestError(f"expected one tensor input, got {sorted(model_input)}")
            model_input = next(iter(model_input.values()))
        batch = pixels_to_batch(np.asarray(model_input))
        return batch, [False] * len(batch)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:  # noqa: ARG002
        batch, face_found = self._batch(model_input)
        probs = np.asarray(self.model.predict(batch, verbose=0), dtype=np.float64)
        if self.config.get("tta") == "flip":
            probs = (probs + np.asarray(self.model.predict(batch[:, :, ::-1, :], verbose=0), dtype=np.float64)) / 2
        out = pd.DataFrame(
            {
                "label": [self.classes[i] for i in probs.argmax(axis=1)],
                "confidence": probs.max(axis=1),
            }
        )
        for i, c in enumerate(self.classes):
            out[c] = probs[:, i]
        out["face_found"] = face_found
        return out
