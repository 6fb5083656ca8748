"""Test-time augmentation: the views of a batch whose predictions are averaged (`tta`),
used alike by the evaluate stage and by the served model (which ships this module)."""

from __future__ import annotations

import numpy as np

from ferflow.core.params import TTA_MODES

# Views of `tencrop` for a model without a crop layer: shifts of this many pixels (reflect
# padding). Chosen on FER-2013 validation over the 4 cpu-quick seed models (trained with
# augment.shift 0.1, i.e. up to 4.8 px): 3 px 65.56% mean, 2 px 65.35, 4 px 64.95, 6 px 64.74.
TENCROP_DEFAULT_SHIFT = 3


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Faces (N, H, W, C) moved by (dy, dx) pixels, the uncovered border filled by reflection."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return x
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = x.shape[1:3]
    return padded[:, pad - dy : pad - dy + h, pad - dx : pad - dx + w, :]


def tta_views(x: np.ndarray, tta: str, margin: int = 0) -> list[np.ndarray]:
    """The batches whose predictions `tta` averages.

    none: the faces. flip: and their mirror images. tencrop: the centre and the four corner
    crops, each also mirrored: for a net with a centre-crop layer `margin` pixels in from
    the edge, moving the face by +-margin puts each corner crop under that window exactly
    (no padded pixel reaches it); without a crop layer the shift is TENCROP_DEFAULT_SHIFT."""
    if tta == "none":
        return [x]
    if tta == "flip":
        return [x, x[:, :, ::-1, :]]
    if tta != "tencrop":
        raise ValueError(f"tta {tta!r}: expected one of {', '.join(TTA_MODES)}")
    m = margin or TENCROP_DEFAULT_SHIFT
    crops = [x] + [shifted(x, dy, dx) for dy in (-m, m) for dx in (-m, m)]
    return crops + [c[:, :, ::-1, :] for c in crops]


def model_crop_margin(model) -> int:
    """The net's centre-crop margin: a served predictor knows it (ONNX has no Keras layers to
    read); a Keras model is read by `architectures.crop_margin`."""
    margin = getattr(model, "crop_margin", None)
    if isinstance(margin, int):
        return margin
    from ferflow.model.architectures import crop_margin

    return crop_margin(model)


def predict_proba(model, x: np.ndarray, tta: str = "none", batch_size: int = 256) -> np.ndarray:
    """Class probabilities averaged over the test-time views of `tta` (see `tta_views`)."""
    margin = model_crop_margin(model) if tta == "tencrop" else 0
    views = tta_views(x, tta, margin)
    total = sum(np.asarray(model.predict(v, batch_size=batch_size, verbose=0), dtype=np.float64) for v in views)
    return total / len(views)


def renormalize(probs: np.ndarray) -> np.ndarray:
    """Rows rescaled to sum to 1 in float64: float32 softmax sums drift from 1."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
