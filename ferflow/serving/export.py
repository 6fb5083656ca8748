"""The export stage: the pyfunc directory (serving.packaging), then - when evaluate logged
to an MLflow run - a registered version in that run, promoted by the champion protocol
(serving.registry)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferflow.core import files
from ferflow.core.params import ExportParams, ServeParams, flatten
from ferflow.serving.int8 import Int8Outcome, int8_if_accurate
from ferflow.serving.onnx_export import export_onnx
from ferflow.serving.packaging import ModelFiles, model_kwargs, save_pyfunc
from ferflow.serving.registry import ACCURACY_DIGITS, Evaluated, register_and_promote


@dataclass(frozen=True)
class ExportPaths:
    """What the export stage reads and writes (its deps and outs in dvc.yaml)."""

    arrays: Path  # test: its digest names the champion alias, one face is the input example; val: ONNX parity
    label_map: Path
    model: Path
    eval_metrics: Path  # the test accuracy and the run evaluate logged to
    out: Path  # the pyfunc directory
    metrics: Path  # export.json
    calibration: Path | None = None  # the evaluate stage's temperature: the served probabilities are calibrated


def run_export(export: ExportParams, serve: ServeParams, paths: ExportPaths) -> dict[str, Any]:
    """The export stage's work: the pyfunc directory, then (when evaluate logged to a run) a
    registered version in that run, promoted to `champion` if it is better."""
    from ferflow.data.arrays import load_label_map, load_split, split_digest

    eval_metrics = files.read_json(paths.eval_metrics)
    x_test, y_test = load_split(paths.arrays, "test")
    classes = load_label_map(paths.label_map)
    test_set = split_digest(x_test, y_test, classes)
    config_path = paths.out.parent / ".serve_config.json"
    files.write_json(config_path, serve.model_dump())
    onnx_dir = Path(tempfile.mkdtemp(prefix="ferflow-onnx-"))  # the artifact keeps the file's name
    try:
        val = load_split(paths.arrays, "val")
        onnx_gap = export_onnx(paths.model, onnx_dir / "model.onnx", val[0])
        # the parity check is on the float network; int8 is then judged on validation accuracy
        int8 = int8_if_accurate(onnx_dir / "model.onnx", load_split(paths.arrays, "train")[0], val) if export.int8 else None
        example = np.rint(x_test[0, :, :, 0] * 255).astype(np.uint8)
        model = ModelFiles(paths.model, paths.label_map, onnx_dir / "model.onnx", paths.calibration)
        kwargs = model_kwargs(model, config_path, example)
        # what `ferflow predict` prints about the model it uses (MLmodel's metadata)
        kwargs["metadata"] = {
            "ferflow": {
                "mlflow_run_id": eval_metrics.get("mlflow_run_id"),
                "test_accuracy": round(float(eval_metrics["accuracy"]), ACCURACY_DIGITS),
                "test_set": test_set,
                "n_test": int(len(y_test)),
                "classes": classes,
                "onnx_parity_max_abs_diff": onnx_gap,
                "onnx_precision": "int8" if int8 and int8.kept else "float32",
            }
        }
        save_pyfunc(paths.out, kwargs)
        result: dict[str, Any] = {"export_dir": str(paths.out), "test_accuracy": eval_metrics["accuracy"]}
        result["onnx_parity_max_abs_diff"] = onnx_gap
        if int8:
            result["int8"] = int8.as_metrics()
        # evaluate recorded the run it logged to (the training run, or a fork of it)
        if eval_metrics.get("mlflow_run_id"):
            result |= _register(export, serve, paths, kwargs, eval_metrics, int8)
    finally:
        config_path.unlink(missing_ok=True)
        shutil.rmtree(onnx_dir, ignore_errors=True)
    files.write_json(paths.metrics, result)
    return result


def _register(
    export: ExportParams,
    serve: ServeParams,
    paths: ExportPaths,
    kwargs: dict[str, Any],
    eval_metrics: dict[str, Any],
    int8: Int8Outcome | None,
) -> dict[str, Any]:
    """Log and register the model (`kwargs` of save_pyfunc, with its metadata) in the run
    evaluate logged to, and promote it."""
    import mlflow

    from ferflow.tracking.runs import StageRun, log_metrics, pipeline_run
    from ferflow.tracking.signals import interrupts_held

    params = flatten({"export": export, "serve": serve})
    opening = StageRun(eval_metrics["mlflow_run_id"], params, str(paths.eval_metrics))
    with pipeline_run(opening) as run_id, interrupts_held():
        about = kwargs["metadata"]["ferflow"]
        log_metrics({"onnx_parity_max_abs_diff": about["onnx_parity_max_abs_diff"]})  # 6 decimals: 0 means < 5e-7
        if int8:  # both networks' validation accuracy, whichever shipped
            log_metrics({"val_accuracy_onnx_float": int8.val_accuracy_float, "val_accuracy_onnx_int8": int8.val_accuracy_int8})
        evaluated = Evaluated(eval_metrics["accuracy"], about["test_set"], about["classes"])
        result = register_and_promote(kwargs, export.registered_model_name, evaluated, export.force_champion)
        # the lock of this working copy (DVC writes export's own entry after the stage)
        if Path("dvc.lock").exists():
            mlflow.log_artifact("dvc.lock")
    return result | {"mlflow_run_id": run_id}
