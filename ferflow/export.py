"""Export: the trained Keras model -> an MLflow pyfunc directory + a registered model version.

The registered version gets alias `champion` only when its test accuracy beats the
current champion's (or `export.force_champion` is true), so
`mlflow models serve -m models:/<name>@champion` always serves the best so far.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ferflow import files

SERVING_PACKAGES = ("mlflow", "keras", "tensorflow-cpu", "numpy", "pandas", "pillow", "opencv-python-headless")
PACKAGE_DIR = Path(__file__).resolve().parent


def pip_requirements() -> list[str]:
    """Exact versions of what the served model imports (skips packages not installed)."""
    reqs = []
    for name in SERVING_PACKAGES:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=None)


def input_example(example_pixels: np.ndarray) -> pd.DataFrame:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(example_pixels.astype(np.uint8), "L").save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()]})


def model_kwargs(
    keras_model_path: str | os.PathLike[str],
    label_map_json: str | os.PathLike[str],
    serve_config_json: str | os.PathLike[str],
    example_pixels: np.ndarray,
) -> dict[str, Any]:
    from ferflow.serving import EmotionModel

    return {
        "python_model": EmotionModel(),
        "artifacts": {
            "keras_model": str(keras_model_path),
            "label_map": str(label_map_json),
            "serve_config": str(serve_config_json),
        },
        "code_paths": [str(PACKAGE_DIR)],
        "signature": signature(),
        "input_example": input_example(example_pixels),
        "pip_requirements": pip_requirements(),
    }


def save_pyfunc(out_dir: str | os.PathLike[str], kwargs: dict[str, Any]) -> None:
    """Write the pyfunc model directory atomically (MLflow refuses an existing path)."""
    import mlflow

    out_dir = Path(out_dir)
    with files.atomic_dir(out_dir) as tmp:
        target = tmp / "model"
        mlflow.pyfunc.save_model(path=str(target), **kwargs)
        for entry in target.iterdir():
            shutil.move(str(entry), tmp / entry.name)
        target.rmdir()


def register_and_promote(
    run_kwargs: dict[str, Any], name: str, test_accuracy: float, force: bool
) -> dict[str, Any]:
    """Log the model to the active run, register a version, move `champion` if it is better."""
    import mlflow

    client = mlflow.MlflowClient()
    info = mlflow.pyfunc.log_model(name="model", registered_model_name=name, **run_kwargs)
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, "test_accuracy", f"{test_accuracy:.6f}")
    previous = None
    try:
        champion = client.get_model_version_by_alias(name, "champion")
        previous = {"version": champion.version, "test_accuracy": float(champion.tags.get("test_accuracy", "nan"))}
    except mlflow.exceptions.MlflowException:
        champion = None
    better = previous is None or not np.isfinite(previous["test_accuracy"]) or test_accuracy > previous["test_accuracy"]
    promoted = bool(force or better)
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
    mlflow.set_tag("ferflow.registered_version", f"{name}/{version}")
    return {
        "registered_model": name,
        "version": int(version),
        "champion": promoted,
        "champion_version": int(version) if promoted else int(previous["version"]),
        "previous_champion": previous,
        "model_uri": info.model_uri,
    }


def temp_config(config: dict[str, Any]) -> Path:
    fd, name = tempfile.mkstemp(prefix="serve_config.", suffix=".json")
    os.close(fd)
    files.write_json(name, config)
    return Path(name)
