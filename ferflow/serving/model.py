"""The served model as `ferflow predict` and `ferflow watch` load it: from an exported
directory or any MLflow model URI, with what its metadata says about it.

Light at import (no MLflow, no TensorFlow until a model is loaded): the CLI imports it to
build its commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_MODEL = "models/export"
CHAMPION_URI = "models:/ferflow-emotion@champion"


class UsageError(ValueError):
    """Bad arguments: missing files, no images, an unusable model path."""


def resolve_model_uri(uri: str) -> str:
    """The default model wherever the command runs: `models/export` under the project root
    (from a subfolder too), else the project store's `@champion`; any other value as given."""
    from ferflow.core.repo import find_root

    if uri != DEFAULT_MODEL or (Path(uri) / "MLmodel").is_file():
        return uri
    exported = find_root() / DEFAULT_MODEL
    return str(exported) if (exported / "MLmodel").is_file() else CHAMPION_URI


def load_model(uri: str):
    """An exported model directory or any MLflow model URI (models:/, runs:/, ...); the
    default path is resolved by `resolve_model_uri`."""
    import mlflow

    uri = resolve_model_uri(uri)
    if "://" in uri or uri.startswith(("models:/", "runs:/")):
        from ferflow.tracking.store import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())  # the project store, for models:/ URIs
        return mlflow.pyfunc.load_model(uri)
    path = Path(uri)
    if not (path / "MLmodel").is_file():
        raise UsageError(f"{path}: not an exported model (no MLmodel file); run the export stage (`dvc repro`) or pass --model")
    return mlflow.pyfunc.load_model(str(path))


def describe_model(uri: str, model: Any) -> str:
    """One line naming the model used: URI, training run, test accuracy and test data (from
    the metadata the export stage writes into MLmodel)."""
    info = (model.metadata.metadata or {}).get("ferflow")
    if not info:
        return f"model: {uri} (no ferflow metadata: exported before it was recorded; its run and accuracy are unknown)"
    return (
        f"model: {uri}  run {info.get('mlflow_run_id') or '-'}  test accuracy {info['test_accuracy']:.4f} "
        f"on test set {info['test_set'][:8]} ({info['n_test']} images, {len(info['classes'])} classes)"
    )


def model_classes(model: Any) -> list[str]:
    """Class names in output order, from the model's output signature."""
    from ferflow.serving.faces import BOX_COLUMNS

    outputs = model.metadata.get_output_schema()
    names = outputs.input_names() if outputs is not None else []
    skip = {"label", "confidence", "face_found", "image_index", *BOX_COLUMNS}
    return [n for n in names if n not in skip]
