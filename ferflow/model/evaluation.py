"""Evaluate: the trained model on the test split -> metrics, report, predictions, plots."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ferflow.core import files
from ferflow.core.params import TTA_MODES, EvaluateParams

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


def predict_proba(model, x: np.ndarray, tta: str = "none", batch_size: int = 256) -> np.ndarray:
    """Class probabilities averaged over the test-time views of `tta` (see `tta_views`)."""
    from ferflow.model.architectures import crop_margin

    margin = crop_margin(model) if tta == "tencrop" else 0
    views = tta_views(x, tta, margin)
    total = sum(np.asarray(model.predict(v, batch_size=batch_size, verbose=0), dtype=np.float64) for v in views)
    return total / len(views)


def renormalize(probs: np.ndarray) -> np.ndarray:
    """Rows rescaled to sum to 1 in float64: float32 softmax sums drift from 1."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_recall_fscore_support

    probs = renormalize(probs)
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # clipped then renormalised: clipping alone breaks the sum to 1 that log_loss warns about
        "loss": float(log_loss(y_true, renormalize(np.clip(probs, 1e-7, 1)), labels=labels)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "n_test": int(len(y_true)),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
    }


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], out: str | os.PathLike[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    row_sums = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, row_sums, out=np.zeros_like(cm, dtype=float), where=row_sums > 0)
    fig, ax = plt.subplots(figsize=(7, 6))
    annot = np.array([[f"{n}\n{p:.0%}" for n, p in zip(r1, r2)] for r1, r2 in zip(cm, norm)])
    sns.heatmap(norm, annot=annot, fmt="", cmap="Blues", vmin=0, vmax=1, xticklabels=classes, yticklabels=classes, ax=ax)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test; colour = recall per true class)")
    fig.tight_layout()
    _save_fig(fig, out)


def plot_curves(history_csv: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = pd.read_csv(history_csv)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(hist["epoch"], hist[key], label=f"train {key}")
        if f"val_{key}" in hist:
            ax.plot(hist["epoch"], hist[f"val_{key}"], label=f"val {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save_fig(fig, out)


def _save_fig(fig, out: str | os.PathLike[str]) -> None:
    import matplotlib.pyplot as plt

    with files.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class EvalPaths:
    """What the evaluate stage reads and writes (its deps and outs in dvc.yaml)."""

    arrays: Path
    label_map: Path
    model: Path
    history: Path  # read: the training curves and the summary's epochs and time
    run_file: Path  # the pipeline run to log to
    metrics: Path  # eval.json: headline numbers
    predictions: Path  # one row per test image
    plots: Path  # confusion matrix, curves, report, per-class JSON
    summary: Path | None = None  # what `dvc exp show` compares


def evaluate(
    model,
    test: tuple[np.ndarray, np.ndarray],
    classes: list[str],
    paths: EvalPaths,
    params: EvaluateParams,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write metrics JSON (headline numbers), per-class JSON, predictions CSV, report and
    plots for the `test` images and labels; return all metrics. `extra` goes into the
    metrics JSON as given."""
    from sklearn.metrics import classification_report

    x_test, y_test = test
    out_dir = paths.plots
    probs = predict_proba(model, x_test, params.tta, params.batch_size)
    metrics = compute_metrics(y_test, probs, classes)
    metrics["tta"] = params.tta
    y_pred = probs.argmax(axis=1)
    counts = np.bincount(y_pred, minlength=len(classes))
    metrics["top_class"] = classes[int(counts.argmax())]
    metrics["top_class_share"] = float(counts.max() / max(1, len(y_pred)))
    preds = pd.DataFrame({"actual": [classes[i] for i in y_test], "predicted": [classes[i] for i in y_pred]})
    for i, c in enumerate(classes):
        preds[f"p_{c}"] = probs[:, i].round(5)
    with files.atomic_path(paths.predictions) as tmp:
        preds.to_csv(tmp, index=False)
    report = classification_report(
        y_test, y_pred, labels=list(range(len(classes))), target_names=classes, digits=4, zero_division=0
    )
    files.write_text(out_dir / "classification_report.txt", report)
    plot_confusion(y_test, y_pred, classes, out_dir / "confusion_matrix.png")
    plot_curves(paths.history, out_dir / "training_curves.png")
    headline = {k: v for k, v in metrics.items() if k != "per_class"} | (extra or {})
    files.write_json(paths.metrics, headline)
    files.write_json(out_dir / "per_class.json", metrics["per_class"])
    return metrics
