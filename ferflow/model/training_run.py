"""The train stage's work: arrays in, a fitted model out, tracked as the pipeline's MLflow run.

Opens the run (recorded in the run file for evaluate/export), logs the data and train
params, per-epoch metrics (by `fit_model`), a summary, the model summary and the params
file. A tracking failure after the model is saved is recorded, never undoes the model.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ferflow.core import files
from ferflow.core.params import DataParams, TrainParams, flatten
from ferflow.core.repo import find_root
from ferflow.tracking.runs import (
    device_name,
    dvc_tags,
    git_info,
    log_datasets,
    log_params_flat,
    mark_training_complete,
    run_name,
    start_training_run,
)
from ferflow.tracking.signals import interrupts_held, run_status_guard
from ferflow.tracking.store import configure

if TYPE_CHECKING:
    from ferflow.model.distribution import Layout

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


def run_training(
    train: TrainParams,
    data: DataParams,
    params_file: Path,
    arrays: Path,
    label_map: Path,
    index: Path,
    data_plots: Path,
    model_path: Path,
    metrics_json: Path,
    history_csv: Path,
    run_file: Path,
    work_dir: Path,
    use_mlflow: bool = True,
) -> dict[str, Any]:
    """Fit `train` on the arrays' train/val splits; `data` params and the data plots are logged
    with it (the run's lineage)."""
    from ferflow.data.arrays import load_label_map, load_split
    from ferflow.data.index import dataset_hash
    from ferflow.model.training import can_resume, fit_model

    p = train.model_dump()
    layout = _distribution_setup(train)
    if not layout.is_writer:
        return _train_without_outputs(p, arrays, label_map)
    classes = load_label_map(label_map)
    x_train, y_train = load_split(arrays, "train")
    x_val, y_val = load_split(arrays, "val")
    index_rows = pd.read_csv(index, keep_default_na=False, dtype={"pixel_hash": str})
    data_hash = dataset_hash(index_rows)

    if use_mlflow:
        configure()  # fails fast, before the first epoch, if the store is unreachable
        tags = {
            **git_info(find_root()),
            **dvc_tags(),
            **_versions(),
            "data.hash": data_hash,
            "arch": train.arch,
            "device": device_name(),
            **layout.tags(),
        }
        run_id = start_training_run(run_name(train.arch), tags, run_file, work_dir / "mlflow_run.json", can_resume(work_dir, p))
        guard = run_status_guard(run_id)
    else:
        run_id, guard = None, contextlib.nullcontext()
    with guard:
        if use_mlflow:
            log_params_flat(flatten({"data": data, "train": train}))
            if not can_resume(work_dir, p):  # a resumed run has its inputs already
                _log_data_inputs(data.source, arrays, classes, (x_train, y_train), (x_val, y_val))
        model, summary = fit_model(
            p, x_train, y_train, x_val, y_val, len(classes), model_path, history_csv, work_dir, log_to_mlflow=use_mlflow
        )
        summary["data_hash"] = data_hash
        summary["n_train"], summary["n_val"] = int(len(y_train)), int(len(y_val))
        summary["mlflow_run_id"] = run_id
        if use_mlflow:
            try:
                with interrupts_held():
                    _log_training_run(model, summary, params_file, data_plots, run_file)
            except Exception as exc:  # the model is on disk; a lost server must not undo that
                summary["tracking_error"] = summary["tracking_error"] or f"{type(exc).__name__}: {str(exc)[:200]}"
            if summary["tracking_error"]:
                log.warning(
                    "MLflow tracking failed (%s). The model is saved at %s; rerun `dvc repro` when the "
                    "tracking server is back, or unset MLFLOW_TRACKING_URI to use the local store.",
                    summary["tracking_error"],
                    model_path,
                )
        else:
            files.write_json(run_file, {"run_id": None, "complete": True})
        files.write_json(metrics_json, summary)
    return summary


def _log_training_run(model, summary: dict[str, Any], params_file: Path, data_plots: Path, run_file: Path) -> None:
    import mlflow

    mlflow.set_tags({"precision": summary["precision"]})
    mlflow.log_metrics(
        {
            "epochs_run": summary["epochs_run"],
            "params_count": summary["params"],
            "train_time_s": summary["train_time_s"],
            "train_images_per_s": summary["images_per_s"],
            "best_val_accuracy": summary["best_val_accuracy"],
            "best_val_loss": summary["best_val_loss"],
        }
    )
    mlflow.log_text(_model_summary(model), "model_summary.txt")
    mlflow.log_artifact(str(params_file))
    for png in sorted(data_plots.glob("*.png")):
        mlflow.log_artifact(str(png), "data")
    mark_training_complete(run_file)


def _log_data_inputs(source: str, arrays: Path, classes: list[str], train_split, val_split) -> None:
    """train/val/test as the run's MLflow dataset inputs, each with its split's content hash
    (the test split's is the test-set id export's champion aliases and the leaderboard use)."""
    from ferflow.data.arrays import load_split, split_digest

    splits = {"training": train_split, "validation": val_split, "test": load_split(arrays, "test")}
    log_datasets(source, {context: (x, y, split_digest(x, y, classes)) for context, (x, y) in splits.items()})


# --- train.distribution (ferflow/model/distribution.py) -------------------------------


def _distribution_setup(train: TrainParams) -> Layout:
    """Before anything asks for devices: join the other processes, if any, and lay out the
    devices; a backend that cannot distribute stops here, before training."""
    from ferflow.model import distribution

    return distribution.setup(train.distribution, train.batch_size)


def _train_without_outputs(p: dict[str, Any], arrays: Path, label_map: Path) -> dict[str, Any]:
    """Processes other than 0 of a multi-process run: train their share of each batch and
    write nothing (process 0 writes the outputs and logs to MLflow)."""
    import tempfile

    from ferflow.data.arrays import load_label_map, load_split
    from ferflow.model.training import fit_model

    classes = load_label_map(label_map)
    x_train, y_train = load_split(arrays, "train")
    x_val, y_val = load_split(arrays, "val")
    with tempfile.TemporaryDirectory(prefix="ferflow-worker-") as scratch:
        _, summary = fit_model(
            p, x_train, y_train, x_val, y_val, len(classes), f"{scratch}/model.keras", f"{scratch}/history.csv", f"{scratch}/work"
        )
    return summary
