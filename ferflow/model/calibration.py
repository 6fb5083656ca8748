"""Calibrated confidence: one temperature fitted on the validation split, and its effect (ECE).

Temperature scaling (Guo et al. 2017) divides the logits by T before the softmax: T > 1 softens
an over-confident model, and the argmax (hence accuracy) never changes. The models end in a
softmax, so the logits are recovered as log-probabilities (equal up to a per-row constant,
which the softmax ignores). The served model imports this module: numpy only at import time.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)  # a fit at either end means the validation split is unusable
TINY = 1e-12


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities (N, K) rescaled as softmax(log(p) / T); T = 1 returns them unchanged."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return probs
    logits = np.log(np.maximum(probs, TINY)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the share-weighted gap between confidence and accuracy over `bins` equal-width bins."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    # bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of 0 joins the first bin
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(gap)


def nll(probs: np.ndarray, y_true: np.ndarray) -> float:
    picked = np.asarray(probs, dtype=np.float64)[np.arange(len(y_true)), np.asarray(y_true)]
    return float(-np.mean(np.log(np.maximum(picked, TINY))))


def fit_temperature(probs: np.ndarray, y_true: np.ndarray) -> float:
    """The T that minimises the negative log-likelihood of `y_true` (searched on log T)."""
    from scipy.optimize import minimize_scalar

    if len(y_true) == 0:
        raise ValueError("calibration: the validation split is empty; cannot fit a temperature")
    lo, hi = np.log(TEMPERATURE_RANGE)
    found = minimize_scalar(
        lambda log_t: nll(apply_temperature(probs, float(np.exp(log_t))), y_true), bounds=(lo, hi), method="bounded"
    )
    return float(np.exp(found.x))


def calibration_summary(val_probs: np.ndarray, y_val: np.ndarray) -> dict[str, Any]:
    """The fitted temperature and the validation ECE before/after (what calibration.json holds)."""
    temperature = fit_temperature(val_probs, y_val)
    return {
        "temperature": round(temperature, 6),
        "fitted_on": "val",
        "n_val": int(len(y_val)),
        "val_ece_before": round(expected_calibration_error(val_probs, y_val), 6),
        "val_ece_after": round(expected_calibration_error(apply_temperature(val_probs, temperature), y_val), 6),
    }


def read_temperature(path: str | os.PathLike[str] | None) -> float:
    """The temperature in a calibration JSON; 1.0 (no change) when the model has none."""
    import json

    if path is None:
        return 1.0
    with open(path, encoding="utf-8") as fh:
        value = json.load(fh).get("temperature")
    if not isinstance(value, (int, float)) or not TEMPERATURE_RANGE[0] <= value <= TEMPERATURE_RANGE[1]:
        raise ValueError(f"{path}: 'temperature' must be a number in {TEMPERATURE_RANGE}, got {value!r}")
    return float(value)


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: mean confidence, accuracy, share of samples (NaN where a bin is empty)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    conf, acc, share = np.full(bins, np.nan), np.full(bins, np.nan), np.zeros(bins)
    for b in range(bins):
        members = which == b
        if members.any():
            conf[b], acc[b], share[b] = confidence[members].mean(), correct[members].mean(), members.mean()
    return conf, acc, share
