"""The train stage's work: arrays in, a fitted model out, tracked as the pipeline's MLflow run.

Opens the run (recorded in the run file for evaluate/export), logs the data and train
params, per-epoch metrics (by `fit_model`), a summary, the model summary and the params
file. A tracking failure after the model is saved is recorded, never undoes the model.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ferflow.core import files
from ferflow.core.params import DataParams, TrainParams, flatten
from ferflow.core.repo import find_root
from ferflow.data.arrays import load_label_map, load_split, split_digest
from ferflow.data.index import dataset_hash
from ferflow.tracking.runs import (
    TrainingRun,
    device_name,
    dvc_tags,
    git_info,
    log_datasets,
    log_metrics,
    log_params_flat,
    mark_training_complete,
    pipeline_run,
    run_name,
)
from ferflow.tracking.signals import interrupts_held
from ferflow.tracking.store import configure

if TYPE_CHECKING:  # keras (and TensorFlow) load only when training starts: after the stage's stderr filter is on
    from ferflow.model.distribution import Layout
    from ferflow.model.training import FitOutputs, Splits

log = logging.getLogger("ferflow")


def _versions() -> dict[str, str]:
    import keras

    tags = {"keras.version": keras.__version__, "keras.backend": keras.backend.backend()}
    with contextlib.suppress(ImportError):
        import tensorflow as tf

        tags["tensorflow.version"] = tf.__version__
    return tags


def _model_summary(model) -> str:
    buf = io.StringIO()
    model.summary(print_fn=lambda line, **_: buf.write(line + "\n"))
    return buf.getvalue()


@dataclass(frozen=True)
class TrainPaths:
    """What the train stage reads and writes (its deps and outs in dvc.yaml)."""

    params_file: Path  # logged with the run
    arrays: Path
    label_map: Path
    index: Path  # for the data hash
    data_plots: Path  # logged with the run
    model: Path
    metrics: Path
    history: Path
    run_file: Path  # the pipeline run's id, for evaluate and export
    work_dir: Path  # the per-epoch backup for resuming (not a DVC output)

    def fit_outputs(self) -> FitOutputs:
        from ferflow.model.training import FitOutputs

        return FitOutputs(self.model, self.history, self.work_dir)


def run_training(train: TrainParams, data: DataParams, paths: TrainPaths, use_mlflow: bool = True) -> dict[str, Any]:
    """Fit `train` on the arrays' train/val splits; `data` params and the data plots are logged
    with it (the run's lineage)."""
    from ferflow.model import distribution
    from ferflow.model.training import can_resume, fit_model

    # before anything asks for devices: join the other processes, if any, and lay out the
    # devices; a backend that cannot distribute stops here, before training
    layout = distribution.setup(train.distribution, train.batch_size)
    classes = load_label_map(paths.label_map)
    splits = _load_splits(paths.arrays, len(classes))
    if not layout.is_writer:
        return _train_without_outputs(train, splits, layout)
    index_rows = pd.read_csv(paths.index, keep_default_na=False, dtype={"pixel_hash": str})
    data_hash = dataset_hash(index_rows)
    resuming = can_resume(paths.work_dir, train)
    if use_mlflow:
        configure()  # fails fast, before the first epoch, if the store is unreachable
        tags = {**git_info(find_root()), **dvc_tags(), **_versions(), "data.hash": data_hash, "arch": train.arch}
        tags |= {"device": device_name(), **layout.tags()}
        opening = TrainingRun(run_name(train.arch), tags, paths.run_file, paths.work_dir / "mlflow_run.json", resuming)
        run: contextlib.AbstractContextManager[str | None] = pipeline_run(opening)
    else:
        run = contextlib.nullcontext()
    with run as run_id:
        if use_mlflow:
            log_params_flat(flatten({"data": data, "train": train}))
            if not resuming:  # a resumed run has its inputs already
                _log_data_inputs(data.source, paths.arrays, splits, classes)
        model, summary = fit_model(train, splits, paths.fit_outputs(), layout, log_to_mlflow=use_mlflow)
        summary |= {"data_hash": data_hash, "n_train": len(splits.y_train), "n_val": len(splits.y_val), "mlflow_run_id": run_id}
        if use_mlflow:
            _record_run(model, summary, paths)
        else:
            files.write_json(paths.run_file, {"run_id": None, "complete": True})
        files.write_json(paths.metrics, summary)
    return summary


def _load_splits(arrays: Path, num_classes: int) -> Splits:
    from ferflow.model.training import Splits

    x_train, y_train = load_split(arrays, "train")
    x_val, y_val = load_split(arrays, "val")
    return Splits(x_train, y_train, x_val, y_val, num_classes)


def _record_run(model: Any, summary: dict[str, Any], paths: TrainPaths) -> None:
    """The run's summary, model summary, params file and data plots to MLflow; a failure
    (a lost server) is recorded in the summary and warned about, never undoes the model."""
    try:
        with interrupts_held():
            _log_training_run(model, summary, paths)
    except Exception as exc:  # the model is on disk; a lost server must not undo that
        summary["tracking_error"] = summary["tracking_error"] or f"{type(exc).__name__}: {str(exc)[:200]}"
    if summary["tracking_error"]:
        log.warning(
            "MLflow tracking failed (%s). The model is saved at %s; rerun `dvc repro` when the "
            "tracking server is back, or unset MLFLOW_TRACKING_URI to use the local store.",
            summary["tracking_error"],
            paths.model,
        )


def _log_training_run(model, summary: dict[str, Any], paths: TrainPaths) -> None:
    import mlflow

    mlflow.set_tags({"precision": summary["precision"]})
    log_metrics(
        {
            "epochs_run": summary["epochs_run"],
            "params_count": summary["params"],
            "train_time_s": summary["train_time_s"],
            "train_images_per_s": summary["images_per_s"],
            "best_val_accuracy": summary["best_val_accuracy"],
            "final_val_accuracy": summary["final_val_accuracy"],
            "best_val_loss": summary["best_val_loss"],
        }
    )
    for name, scores in summary.get("weight_candidates", {}).items():  # train.weight_average: ema
        log_metrics({f"{name}_{key}": value for key, value in scores.items()})
    if "weights_kept" in summary:
        mlflow.set_tags({"weights_kept": summary["weights_kept"]})
    mlflow.log_text(_model_summary(model), "model_summary.txt")
    mlflow.log_artifact(str(paths.params_file))
    for png in sorted(paths.data_plots.glob("*.png")):
        mlflow.log_artifact(str(png), "data")
    mark_training_complete(paths.run_file)


def _log_data_inputs(source: str, arrays: Path, splits: Splits, classes: list[str]) -> None:
    """train/val/test as the run's MLflow dataset inputs, each with its split's content hash
    (the test split's is the test-set id export's champion aliases and the leaderboard use)."""
    contexts = {
        "training": (splits.x_train, splits.y_train),
        "validation": (splits.x_val, splits.y_val),
        "test": load_split(arrays, "test"),
    }
    log_datasets(source, {context: (x, y, split_digest(x, y, classes)) for context, (x, y) in contexts.items()})


def _train_without_outputs(train: TrainParams, splits: Splits, layout: Layout) -> dict[str, Any]:
    """Processes other than 0 of a multi-process run: train their share of each batch and
    write nothing (process 0 writes the outputs and logs to MLflow)."""
    import tempfile

    from ferflow.model.training import FitOutputs, fit_model

    with tempfile.TemporaryDirectory(prefix="ferflow-worker-") as scratch:
        outputs = FitOutputs(Path(scratch, "model.keras"), Path(scratch, "history.csv"), Path(scratch, "work"))
        _, summary = fit_model(train, splits, outputs, layout)
    return summary
