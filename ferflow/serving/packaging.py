"""Packaging: a trained Keras model -> an MLflow pyfunc directory ("models from code").

The model is saved as MLflow "models from code": `python_model` is the path of
ferflow/serving/pyfunc.py, which MLflow executes at load time (it calls `set_model`), so no
Python object is pickled. Artifacts are the `.keras` file (loaded with Keras' safe
mode), the label map and the serve config, all JSON or zip/HDF5. The part of the ferflow
package the pyfunc imports travels with it (`serving_package`), nothing else.
"""

from __future__ import annotations

import base64
import functools
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ferflow.core import files
from ferflow.core.imports import imported_modules, module_path

SERVING_PACKAGES = (
    "mlflow", "keras", "tensorflow-cpu", "numpy", "pandas", "pillow", "opencv-python-headless", "pydantic", "mtcnn",
    "onnxruntime",
)  # fmt: skip
PACKAGE_DIR = Path(__file__).resolve().parents[1]
SOURCE_ROOT = PACKAGE_DIR.parent
MODEL_CODE = PACKAGE_DIR / "serving" / "pyfunc.py"
SERVING_DATA = PACKAGE_DIR / "serving" / "detectors"  # YuNet's ONNX file, its licence and provenance


def serving_modules() -> list[Path]:
    """The package files the pyfunc needs: what MODEL_CODE imports, transitively, with their `__init__.py`s."""
    return sorted(module_path(name, SOURCE_ROOT) for name in imported_modules(MODEL_CODE, SOURCE_ROOT))


_KEEP_UNTIL_EXIT: list[tempfile.TemporaryDirectory] = []


@functools.cache
def serving_package() -> Path:
    """A copy of the ferflow package holding only `serving_modules()` and SERVING_DATA: the model ships no
    training code. Built once per process in a temp dir removed at exit, so it outlives
    both save_model and log_model of one export."""
    holder = tempfile.TemporaryDirectory(prefix="ferflow-serving-code-")
    _KEEP_UNTIL_EXIT.append(holder)
    for source in serving_modules():
        target = Path(holder.name) / source.relative_to(SOURCE_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    shutil.copytree(SERVING_DATA, Path(holder.name) / SERVING_DATA.relative_to(SOURCE_ROOT))
    return Path(holder.name) / PACKAGE_DIR.name


def pip_requirements() -> list[str]:
    """Exact versions of what the served model imports (skips packages not installed)."""
    reqs = []
    for name in SERVING_PACKAGES:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def signature(classes: list[str], serve_config: dict[str, Any]):
    """Input: one column `image` typed Any (required in practice); params detect_face, tta, pixel_range.

    Any, not binary: a value is either base64 text of an encoded image or a pixel array,
    and a bare tensor sent as `inputs`/`instances` is mapped onto this single column by
    the scoring server. A binary column would make MLflow base64-decode leniently (it
    skips invalid characters) and refuse tensors; pyfunc.py validates both kinds itself.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    from ferflow.serving.faces import BOX_COLUMNS

    outputs = Schema(
        [
            ColSpec("string", "label"),
            ColSpec("double", "confidence"),
            *[ColSpec("double", c) for c in classes],
            ColSpec("boolean", "face_found"),
            *[ColSpec("long", c) for c in BOX_COLUMNS],
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("detect_face", "boolean", bool(serve_config.get("detect_face", True))),
            ParamSpec("tta", "string", str(serve_config.get("tta", "none"))),
            ParamSpec("pixel_range", "string", "auto"),
            ParamSpec("faces", "string", "largest"),
            ParamSpec("face_detector", "string", str(serve_config.get("face_detector", "yunet"))),
        ]
    )
    # required=False only so that MLflow's own "missing inputs" check, whose message
    # repeats the whole request, gives way to pyfunc.py's short "missing column 'image'"
    return ModelSignature(inputs=Schema([ColSpec(AnyType(), "image", required=False)]), outputs=outputs, params=params)


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def input_example(example_pixels: np.ndarray) -> pd.DataFrame:
    """One test face as base64 PNG text: exactly what a REST client posts."""
    return pd.DataFrame({"image": [base64.b64encode(encode_png(example_pixels)).decode("ascii")]})


@dataclass(frozen=True)
class ModelFiles:
    """The files a pyfunc directory packs as artifacts (they must outlive save and log)."""

    keras: Path
    label_map: Path
    onnx: Path | None = None  # the same network for onnxruntime (serve.runtime: onnx)
    calibration: Path | None = None  # the temperature fitted on validation (evaluate stage)


def model_kwargs(model: ModelFiles, serve_config_json: Path, example_pixels: np.ndarray) -> dict[str, Any]:
    """Arguments for mlflow.pyfunc.save_model / log_model."""
    from ferflow.data.arrays import load_label_map

    classes = load_label_map(model.label_map)
    artifacts = {"keras_model": str(model.keras), "label_map": str(model.label_map), "serve_config": str(serve_config_json)}
    optional = {"onnx_model": model.onnx, "calibration": model.calibration}
    artifacts |= {name: str(path) for name, path in optional.items() if path is not None}
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": artifacts,
        # the part of the ferflow package that pyfunc.py imports travels with the model
        "code_paths": [str(serving_package())],
        "signature": signature(classes, files.read_json(serve_config_json)),
        "input_example": input_example(example_pixels),
        "pip_requirements": pip_requirements(),
    }


def quiet_mlflow_pyfunc() -> None:
    # MLflow logs "Validating input example against model signature" at INFO on every save:
    # routine, and the check's failures still raise. Set after `import mlflow`, whose logging
    # set-up resets its child loggers' levels.
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)


def save_pyfunc(out_dir: str | os.PathLike[str], kwargs: dict[str, Any]) -> None:
    """Write the pyfunc model directory atomically (MLflow refuses an existing path)."""
    import mlflow

    quiet_mlflow_pyfunc()
    out_dir = Path(out_dir)
    with files.atomic_dir(out_dir) as tmp:
        target = tmp / "model"
        mlflow.pyfunc.save_model(path=str(target), **kwargs)
        for entry in target.iterdir():
            shutil.move(str(entry), tmp / entry.name)
        target.rmdir()


def export_model(
    keras_model_path: str | os.PathLike[str],
    label_map_json: str | os.PathLike[str],
    serve_config: dict[str, Any],
    example_pixels: np.ndarray,
    out_dir: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save a pyfunc directory from a `.keras` file without the pipeline (tests, benchmarks).
    The ONNX file's parity is checked on the example face and its mirror image."""
    from ferflow.data.preprocessing import prepare_batch
    from ferflow.serving.onnx_export import export_onnx

    with tempfile.TemporaryDirectory(prefix="ferflow-export-") as tmp:
        config_json = Path(tmp) / "serve_config.json"
        files.write_json(config_json, serve_config)
        onnx_path = Path(tmp) / "model.onnx"
        pixels = np.asarray(example_pixels)
        export_onnx(keras_model_path, onnx_path, prepare_batch([pixels, np.ascontiguousarray(pixels[:, ::-1])]))
        kwargs = model_kwargs(ModelFiles(Path(keras_model_path), Path(label_map_json), onnx_path), config_json, example_pixels)
        save_pyfunc(out_dir, kwargs | ({"metadata": metadata} if metadata else {}))
    return Path(out_dir)
