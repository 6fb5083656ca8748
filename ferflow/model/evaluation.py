"""Evaluate: the trained model on the test split -> metrics, report, predictions, plots.

Not shipped with the served model (sklearn, matplotlib): what serving shares with it, the
test-time augmentation, is `ferflow.model.tta`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ferflow.core import files
from ferflow.core.params import EvaluateParams
from ferflow.model.tta import predict_proba, renormalize


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

    from ferflow.model.history import read_history

    rows = read_history(Path(history_csv))
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        # markers: a run of one epoch is one point, which a line alone does not draw
        ax.plot(epochs, [r.get(key) for r in rows], marker="o", label=f"train {key}")
        if any(f"val_{key}" in r for r in rows):
            ax.plot(epochs, [r.get(f"val_{key}") for r in rows], marker="o", label=f"val {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save_fig(fig, out)


def plot_reliability(y_true: np.ndarray, before: np.ndarray, after: np.ndarray, temperature: float, out: Path) -> None:
    """Reliability diagram (15 bins): accuracy against confidence, before and after the temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ferflow.model.calibration import ECE_BINS, expected_calibration_error, reliability_bins

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for probs, name in ((before, "raw"), (after, f"T = {temperature:.3f}")):
        conf, acc, _ = reliability_bins(probs, y_true, ECE_BINS)
        ax.plot(conf, acc, marker="o", label=f"{name} (ECE {expected_calibration_error(probs, y_true, ECE_BINS):.4f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", ylabel="accuracy")
    ax.set_title(f"Reliability diagram (test, {ECE_BINS} bins; T fitted on validation)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
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
    plots: Path  # confusion matrix, curves, reliability diagram, report, per-class JSON
    summary: Path | None = None  # what `dvc exp show` compares
    calibration: Path | None = None  # the temperature fitted on validation (export ships it)


@dataclass(frozen=True)
class EvalSplits:
    """The labelled images evaluate reads: the test split it scores, and the validation split
    the temperature is fitted on (None: no calibration, T = 1)."""

    test: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray] | None = None


def calibrate(model, val: tuple[np.ndarray, np.ndarray] | None, paths: EvalPaths, params: EvaluateParams) -> float:
    """The temperature fitted on the validation split's probabilities (same TTA as the test),
    written to `paths.calibration`; 1.0 without a validation split. Never sees the test split."""
    from ferflow.model.calibration import calibration_summary

    if val is None:
        return 1.0
    summary = calibration_summary(renormalize(predict_proba(model, val[0], params.tta, params.batch_size)), val[1])
    if paths.calibration is not None:
        files.write_json(paths.calibration, summary)
    return float(summary["temperature"])


def evaluate(
    model,
    splits: EvalSplits,
    classes: list[str],
    paths: EvalPaths,
    params: EvaluateParams,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write metrics JSON (headline numbers), per-class JSON, predictions CSV, report and
    plots for the test images and labels, with probabilities calibrated by a temperature
    fitted on the validation split; return all metrics. `extra` goes into the metrics JSON."""
    from sklearn.metrics import classification_report

    from ferflow.model.calibration import apply_temperature, expected_calibration_error

    x_test, y_test = splits.test
    out_dir = paths.plots
    temperature = calibrate(model, splits.val, paths, params)
    raw = renormalize(predict_proba(model, x_test, params.tta, params.batch_size))
    probs = apply_temperature(raw, temperature)
    metrics = compute_metrics(y_test, probs, classes)
    metrics |= {"tta": params.tta, "temperature": temperature}
    metrics |= {"ece_before": expected_calibration_error(raw, y_test), "ece_after": expected_calibration_error(probs, y_test)}
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
    plot_reliability(y_test, raw, probs, temperature, out_dir / "reliability_diagram.png")
    headline = {k: v for k, v in metrics.items() if k != "per_class"} | (extra or {})
    files.write_json(paths.metrics, headline)
    files.write_json(out_dir / "per_class.json", metrics["per_class"])
    return metrics
