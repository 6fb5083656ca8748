"""The evaluate stage's work: the test split through the model, logged to the pipeline's MLflow run.

Kept apart from `ferflow.model.evaluation` (metrics, TTA, plots), which the served model
imports: the exported model ships only what its pyfunc imports, not the tracking glue.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ferflow.core import files
from ferflow.core.params import EvaluateParams, flatten
from ferflow.model.evaluation import EvalPaths, EvalSplits, evaluate
from ferflow.model.history import read_history

log = logging.getLogger("ferflow")
ONE_CLASS_SHARE = 0.9  # above this share of one class in the predictions, the model is degenerate

# what people compare across experiments: `dvc exp show` shows these and nothing else
SUMMARY_KEYS = ("test_accuracy", "test_macro_f1", "test_loss", "train_time_s", "params_count", "epochs")
# what evaluate draws and writes beside the metrics, logged to the run's `evaluation/` folder
EVALUATION_FILES = (
    "confusion_matrix.png", "reliability_diagram.png", "training_curves.png", "classification_report.txt", "per_class.json",
)  # fmt: skip


def experiment_summary(metrics: dict[str, Any], model: Any, history_csv: Path) -> dict[str, float | int]:
    """The numbers `dvc exp show` compares: test metrics, and from the model and its history
    the size, epochs run and training time (data statistics stay in the stages' JSON files)."""
    rows = read_history(history_csv)
    return {
        "test_accuracy": round(float(metrics["accuracy"]), 4),
        "test_macro_f1": round(float(metrics["macro_f1"]), 4),
        "test_loss": round(float(metrics["loss"]), 4),
        "train_time_s": round(sum(r.get("epoch_time_s", 0.0) for r in rows), 1),
        "params_count": int(model.count_params()),
        "epochs": len(rows),
    }


def warn_if_one_class(metrics: dict[str, Any]) -> bool:
    """Warn (and return True) when one class takes more than ONE_CLASS_SHARE of the predictions:
    such a model is at chance level whatever its accuracy says."""
    if metrics["top_class_share"] <= ONE_CLASS_SHARE:
        return False
    log.warning(
        "WARNING: %.0f%% of the test predictions are '%s': this model predicts one class for almost every "
        "image (chance level). Train longer (train.epochs) or check the data before serving it.",
        100 * metrics["top_class_share"],
        metrics["top_class"],
    )
    return True


def run_evaluation(params: EvaluateParams, paths: EvalPaths) -> dict[str, Any]:
    """The evaluate stage's work: the test split through the model, logged to the training run
    (or to a linked fork when the evaluate params changed since)."""
    import keras

    from ferflow.data.arrays import load_label_map, load_split
    from ferflow.tracking.runs import StageRun, backfill_epochs, log_metrics, pipeline_run, recorded_run_id
    from ferflow.tracking.signals import interrupts_held

    classes = load_label_map(paths.label_map)
    splits = EvalSplits(test=load_split(paths.arrays, "test"), val=load_split(paths.arrays, "val"))
    model = keras.models.load_model(paths.model, compile=False)

    def work(run_id: str | None) -> dict[str, Any]:
        metrics = evaluate(model, splits, classes, paths, params, extra={"mlflow_run_id": run_id})
        if paths.summary is not None:
            # in SUMMARY_KEYS order, not sorted: DVC shows the columns in the file's order
            files.write_text(paths.summary, json.dumps(experiment_summary(metrics, model, paths.history), indent=2) + "\n")
        warn_if_one_class(metrics)
        return metrics

    train_run_id = recorded_run_id(paths.run_file)
    if not train_run_id:
        return work(None)
    import mlflow

    with pipeline_run(StageRun(train_run_id, flatten({"evaluate": params}), str(paths.run_file))) as run_id:
        metrics = work(run_id)
        with interrupts_held():
            added = backfill_epochs(train_run_id, read_history(paths.history))  # the server was lost mid-training
            if added:
                log.info("logged epochs %s to MLflow run %s (trained while the server was unreachable)", added, train_run_id)
            log_metrics({f"test_{k}": metrics[k] for k in ("accuracy", "loss", "macro_f1", "ece_before", "ece_after")})
            log_metrics({"temperature": metrics["temperature"]})
            log_metrics({f"test_f1_{c}": v["f1"] for c, v in metrics["per_class"].items()})
            for name in EVALUATION_FILES:
                mlflow.log_artifact(str(paths.plots / name), "evaluation")
            mlflow.log_artifact(str(paths.predictions), "evaluation")
            mlflow.log_artifact(str(paths.metrics), "evaluation")
    return metrics
