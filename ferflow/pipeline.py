"""Glue for the train, evaluate and export stages: params + files + MLflow run.

Each `run_*` takes the stage's parsed arguments (paths) and reads only its own params
section (the whole file is validated, and logged to MLflow by train).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ferflow.core import files
from ferflow.core.params import flatten, load_params
from ferflow.tracking.runs import (
    device_name,
    dvc_tags,
    git_info,
    log_params_flat,
    mark_training_complete,
    recorded_run_id,
    resume_run,
    run_name,
    start_training_run,
)
from ferflow.tracking.signals import interrupts_held, run_status_guard
from ferflow.tracking.store import configure, find_root

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


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    from ferflow.data.arrays import load_label_map, load_split
    from ferflow.data.index import dataset_hash
    from ferflow.model.training import can_resume, fit_model

    all_params = load_params(args.params)
    p = all_params["train"]
    layout = _distribution_setup(p)
    if not layout.is_writer:
        return _train_without_outputs(args, p)
    classes = load_label_map(args.label_map)
    x_train, y_train = load_split(args.arrays, "train")
    x_val, y_val = load_split(args.arrays, "val")
    data_hash = dataset_hash(pd.read_csv(args.index, keep_default_na=False, dtype={"pixel_hash": str}))

    use_mlflow = not args.no_mlflow
    if use_mlflow:
        configure()  # fails fast, before the first epoch, if the store is unreachable
        tags = {
            **git_info(find_root()),
            **dvc_tags(),
            **_versions(),
            "data.hash": data_hash,
            "arch": p["arch"],
            "device": device_name(),
            **layout.tags(),
        }
        run_id = start_training_run(
            run_name(p["arch"]),
            tags,
            args.run_file,
            Path(args.work_dir) / "mlflow_run.json",
            can_resume(args.work_dir, p),
        )
        guard = run_status_guard(run_id)
    else:
        run_id, guard = None, contextlib.nullcontext()
    with guard:
        if use_mlflow:
            log_params_flat(flatten({k: v for k, v in all_params.items() if k in ("data", "train")}))
        model, summary = fit_model(
            p, x_train, y_train, x_val, y_val, len(classes), args.model, args.history, args.work_dir, log_to_mlflow=use_mlflow
        )
        summary["data_hash"] = data_hash
        summary["n_train"], summary["n_val"] = int(len(y_train)), int(len(y_val))
        summary["mlflow_run_id"] = run_id
        if use_mlflow:
            try:
                with interrupts_held():
                    _log_training_run(args, model, summary)
            except Exception as exc:  # the model is on disk; a lost server must not undo that
                summary["tracking_error"] = summary["tracking_error"] or f"{type(exc).__name__}: {str(exc)[:200]}"
            if summary["tracking_error"]:
                log.warning(
                    "MLflow tracking failed (%s). The model is saved at %s; rerun `dvc repro` when the "
                    "tracking server is back, or unset MLFLOW_TRACKING_URI to use the local store.",
                    summary["tracking_error"],
                    args.model,
                )
        else:
            files.write_json(args.run_file, {"run_id": None, "complete": True})
        files.write_json(args.metrics, summary)
    return summary


# --- train.distribution (ferflow/model/distribution.py) -------------------------------


def _distribution_setup(p: dict[str, Any]) -> Layout:
    """Before anything asks for devices: join the other processes, if any, and lay out the
    devices; a backend that cannot distribute stops here, before training."""
    from ferflow.model import distribution

    return distribution.setup(p["distribution"], p["batch_size"])


def _train_without_outputs(args: argparse.Namespace, p: dict[str, Any]) -> dict[str, Any]:
    """Processes other than 0 of a multi-process run: train their share of each batch and
    write nothing (process 0 writes the outputs and logs to MLflow)."""
    import tempfile

    from ferflow.data.arrays import load_label_map, load_split
    from ferflow.model.training import fit_model

    classes = load_label_map(args.label_map)
    x_train, y_train = load_split(args.arrays, "train")
    x_val, y_val = load_split(args.arrays, "val")
    with tempfile.TemporaryDirectory(prefix="ferflow-worker-") as scratch:
        _, summary = fit_model(
            p, x_train, y_train, x_val, y_val, len(classes), f"{scratch}/model.keras", f"{scratch}/history.csv", f"{scratch}/work"
        )
    return summary


def _log_training_run(args: argparse.Namespace, model, summary: dict[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({"params.count": str(summary["params"]), "precision": summary["precision"]})
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
    mlflow.log_artifact(args.params)
    for png in sorted(Path(args.index).parent.glob("plots/*.png")):
        mlflow.log_artifact(str(png), "data")
    mark_training_complete(args.run_file)


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    import keras

    from ferflow.data.arrays import load_label_map, load_split
    from ferflow.model.evaluation import evaluate

    p = load_params(args.params)["evaluate"]
    classes = load_label_map(args.label_map)
    x_test, y_test = load_split(args.arrays, "test")
    model = keras.models.load_model(args.model, compile=False)

    def work(run_id: str | None) -> dict[str, Any]:
        return evaluate(
            model, x_test, y_test, classes, args.history, args.plots, args.metrics, args.predictions, p["tta"], p["batch_size"],
            extra={"mlflow_run_id": run_id},
        )  # fmt: skip

    train_run_id = recorded_run_id(args.run_file)
    if not train_run_id:
        return work(None)
    import mlflow

    with resume_run(train_run_id, flatten({"evaluate": p}), args.run_file) as run_id:
        metrics = work(run_id)
        with interrupts_held():
            mlflow.log_metrics({f"test_{k}": metrics[k] for k in ("accuracy", "loss", "macro_f1")})
            mlflow.log_metrics({f"test_f1_{c}": v["f1"] for c, v in metrics["per_class"].items()})
            for name in ("confusion_matrix.png", "training_curves.png", "classification_report.txt", "per_class.json"):
                mlflow.log_artifact(str(Path(args.plots) / name), "evaluation")
            mlflow.log_artifact(args.predictions, "evaluation")
            mlflow.log_artifact(args.metrics, "evaluation")
    return metrics


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    from ferflow.data.arrays import load_split
    from ferflow.serving.export import model_kwargs, register_and_promote, save_pyfunc

    all_params = load_params(args.params)
    p, serve = all_params["export"], all_params["serve"]
    eval_metrics = files.read_json(args.eval_metrics)
    x_test, _ = load_split(args.arrays, "test")
    example = np.rint(x_test[0, :, :, 0] * 255).astype(np.uint8)
    config_path = Path(args.out).parent / ".serve_config.json"
    files.write_json(config_path, serve)
    try:
        kwargs = model_kwargs(args.model, args.label_map, config_path, example)
        save_pyfunc(args.out, kwargs)
        result: dict[str, Any] = {"export_dir": str(args.out), "test_accuracy": eval_metrics["accuracy"]}
        # evaluate recorded the run it logged to (the training run, or a fork of it)
        eval_run_id = eval_metrics.get("mlflow_run_id")
        if eval_run_id:
            import mlflow

            with resume_run(eval_run_id, flatten({"export": p, "serve": serve}), args.eval_metrics) as run_id:
                result["mlflow_run_id"] = run_id
                with interrupts_held():
                    result |= register_and_promote(
                        kwargs, p["registered_model_name"], eval_metrics["accuracy"], p["force_champion"]
                    )
                    # the lock of this working copy (DVC writes export's own entry after the stage)
                    if Path("dvc.lock").exists():
                        mlflow.log_artifact("dvc.lock")
    finally:
        config_path.unlink(missing_ok=True)
    files.write_json(args.metrics, result)
    return result
