"""Distillation: a teacher's softened probabilities on the training images mixed into the targets.

The teacher is a soft-label file (`.npz`: `probs` (N_train, K) in the train split's order, and
`train_digest`, the content hash of the train split it was computed on), so a teacher run once
on a fast machine can teach students on slow ones (track the file with `dvc add`). The students
end in a softmax, so the temperature softens the teacher's targets only (softmax(log p / T));
training minimises the cross-entropy to (1 - weight) * one-hot + weight * softened teacher.
Only the train split is ever read: validation stays the student's own yardstick.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ferflow.core import files
from ferflow.model.calibration import apply_temperature


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The teacher's probabilities at `temperature` (> 1: flatter, the dark knowledge shows)."""
    return apply_temperature(probs, temperature)


def mixed_targets(y: np.ndarray, teacher_probs: np.ndarray, temperature: float, weight: float) -> np.ndarray:
    """(1 - weight) * one-hot(y) + weight * softened teacher, float32 rows summing to 1."""
    num_classes = teacher_probs.shape[1]
    one_hot = np.eye(num_classes, dtype=np.float64)[np.asarray(y)]
    return ((1.0 - weight) * one_hot + weight * soften(teacher_probs, temperature)).astype(np.float32)


def write_soft_labels(model: Any, arrays: str | os.PathLike[str], out: str | os.PathLike[str], batch_size: int = 256) -> Path:
    """The teacher `model`'s (a Keras model, e.g. an ensemble's) probabilities on the train split -> `out`."""
    from ferflow.data.arrays import load_split

    x_train, y_train = load_split(arrays, "train")
    probs = np.asarray(model.predict(x_train, batch_size=batch_size, verbose=0), dtype=np.float32)
    with files.atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, probs=probs, train_digest=np.array(train_digest(x_train, y_train)))
    return Path(out)


def train_digest(x_train: np.ndarray, y_train: np.ndarray) -> str:
    """The train split's content hash (the data's own split digest, without class names)."""
    from ferflow.data.arrays import split_digest

    return split_digest(x_train, y_train, [])


def load_soft_labels(path: str | os.PathLike[str], x_train: np.ndarray, y_train: np.ndarray, num_classes: int) -> np.ndarray:
    """The teacher's probabilities, checked against this train split (same images, same order)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"train.teacher: {path} not found (write it with `ferflow soft-labels`)")
    with np.load(path, allow_pickle=False) as data:
        if "probs" not in data or "train_digest" not in data:
            raise ValueError(f"train.teacher: {path}: expected arrays 'probs' and 'train_digest'")
        probs, digest = np.asarray(data["probs"], dtype=np.float64), str(data["train_digest"])
    if probs.shape != (len(x_train), num_classes):
        raise ValueError(f"train.teacher: {path}: probs shape {probs.shape}, expected ({len(x_train)}, {num_classes})")
    if digest != train_digest(x_train, y_train):
        raise ValueError(f"train.teacher: {path}: computed on another train split (digest {digest}); recompute it on this one")
    return probs
