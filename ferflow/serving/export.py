"""Export: the trained Keras model -> an MLflow pyfunc directory + a registered model version.

The model is saved as MLflow "models from code": `python_model` is the path of
ferflow/serving/pyfunc.py, which MLflow executes at load time (it calls `set_model`), so no
Python object is pickled. Artifacts are the `.keras` file (loaded with Keras' safe
mode), the label map and the serve config, all JSON or zip/HDF5.

Champions are kept per test set: each version is tagged with its test accuracy and a
content hash of the test split and classes; alias `champion-<hash8>` moves to it only when
it beats that alias's holder (or `export.force_champion` is true), and `champion` points at
the champion of the test set exported last, so `models:/<name>@champion` serves the best
model of the data set the user trained on last (docs/serving.md).
"""

from __future__ import annotations

import base64
import functools
import io
import logging
import math
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ferflow.core import files
from ferflow.core.imports import imported_modules, module_path
from ferflow.core.params import ExportParams, ServeParams, flatten

SERVING_PACKAGES = (
    "mlflow", "keras", "tensorflow-cpu", "numpy", "pandas", "pillow", "opencv-python-headless", "pydantic", "mtcnn",
)  # fmt: skip
PACKAGE_DIR = Path(__file__).resolve().parents[1]
SOURCE_ROOT = PACKAGE_DIR.parent
MODEL_CODE = PACKAGE_DIR / "serving" / "pyfunc.py"
CHAMPION = "champion"
ACCURACY_TAG = "test_accuracy"


def serving_modules() -> list[Path]:
    """The package files the pyfunc needs: what MODEL_CODE imports, transitively, with their `__init__.py`s."""
    return sorted(module_path(name, SOURCE_ROOT) for name in imported_modules(MODEL_CODE, SOURCE_ROOT))


_KEEP_UNTIL_EXIT: list[tempfile.TemporaryDirectory] = []


@functools.cache
def serving_package() -> Path:
    """A copy of the ferflow package holding only `serving_modules()`: the model ships no
    training code. Built once per process in a temp dir removed at exit, so it outlives
    both save_model and log_model of one export."""
    holder = tempfile.TemporaryDirectory(prefix="ferflow-serving-code-")
    _KEEP_UNTIL_EXIT.append(holder)
    for source in serving_modules():
        target = Path(holder.name) / source.relative_to(SOURCE_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
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
            ParamSpec("face_detector", "string", str(serve_config.get("face_detector", "haar"))),
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


def model_kwargs(
    keras_model_path: str | os.PathLike[str],
    label_map_json: str | os.PathLike[str],
    serve_config_json: str | os.PathLike[str],
    example_pixels: np.ndarray,
) -> dict[str, Any]:
    """Arguments for mlflow.pyfunc.save_model / log_model (the input files must outlive both calls)."""
    from ferflow.data.arrays import load_label_map

    classes = load_label_map(label_map_json)
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": {
            "keras_model": str(keras_model_path),
            "label_map": str(label_map_json),
            "serve_config": str(serve_config_json),
        },
        # the part of the ferflow package that pyfunc.py imports travels with the model
        "code_paths": [str(serving_package())],
        "signature": signature(classes, files.read_json(serve_config_json)),
        "input_example": input_example(example_pixels),
        "pip_requirements": pip_requirements(),
    }


def _quiet_mlflow_pyfunc() -> None:
    # MLflow logs "Validating input example against model signature" at INFO on every save:
    # routine, and the check's failures still raise. Set after `import mlflow`, whose logging
    # set-up resets its child loggers' levels.
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)


def save_pyfunc(out_dir: str | os.PathLike[str], kwargs: dict[str, Any]) -> None:
    """Write the pyfunc model directory atomically (MLflow refuses an existing path)."""
    import mlflow

    _quiet_mlflow_pyfunc()
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
    """Save a pyfunc directory from a `.keras` file without the pipeline (tests, benchmarks)."""
    with tempfile.TemporaryDirectory(prefix="ferflow-export-") as tmp:
        config_json = Path(tmp) / "serve_config.json"
        files.write_json(config_json, serve_config)
        kwargs = model_kwargs(keras_model_path, label_map_json, config_json, example_pixels)
        save_pyfunc(out_dir, kwargs | ({"metadata": metadata} if metadata else {}))
    return Path(out_dir)


ACCURACY_DIGITS = 6  # the precision stored on a version, and the one accuracies are compared at
TEST_SET_TAG = "test_set"
CLASSES_TAG = "classes"
CONVERGE_ROUNDS = 20  # re-checks after moving an alias; each concurrent exporter needs at most one


def stored_accuracy(accuracy: float) -> float:
    """The accuracy as the version tag stores it: comparisons use this on both sides, so
    re-exporting the same model is a tie, not a win over itself."""
    return round(float(accuracy), ACCURACY_DIGITS)


def should_promote(test_accuracy: float, champion_accuracy: float | None, force: bool) -> bool:
    """Move `champion` when forced, when there is none, when its accuracy is unknown, or
    when the new model is strictly better at the stored precision (a tie keeps the serving model)."""
    if force or champion_accuracy is None or not math.isfinite(champion_accuracy):
        return True
    return stored_accuracy(test_accuracy) > stored_accuracy(champion_accuracy)


def dataset_alias(test_set: str) -> str:
    """The per-test-set champion alias, e.g. `champion-3f2a9c01`."""
    return f"{CHAMPION}-{test_set[:8]}"


def _accuracy(mv: Any) -> float:
    try:
        return float(mv.tags.get(ACCURACY_TAG, "nan"))
    except ValueError:
        return float("nan")


def _version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model or alias yet
        return None


def current_champion(client: Any, name: str, alias: str = CHAMPION) -> dict[str, Any] | None:
    """{'version', 'test_accuracy', 'test_set'} of the version holding `alias`, or None."""
    mv = _version_by_alias(client, name, alias)
    if mv is None:
        return None
    return {"version": int(mv.version), "test_accuracy": _accuracy(mv), "test_set": mv.tags.get(TEST_SET_TAG)}


def _best_since(client: Any, name: str, test_set: str, holder: Any | None) -> Any:
    """The version that should hold the test set's alias: the holder unless a version
    registered after it, on the same test set, is strictly better; among equally good
    newer ones the earliest. Versions before the holder were already compared (or a
    forced champion overrode them)."""
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name='{name}' and tags.{TEST_SET_TAG}='{test_set}'", page_token=token)
        versions += [mv for mv in page if math.isfinite(_accuracy(mv))]
        token = page.token
        if not token:
            break
    since = int(holder.version) if holder is not None else 0
    candidates = sorted((mv for mv in versions if int(mv.version) > since), key=lambda mv: int(mv.version))
    best = holder
    for mv in candidates:
        if best is None or should_promote(_accuracy(mv), _accuracy(best), False):
            best = mv
    return best


def _converge_dataset_alias(client: Any, name: str, test_set: str) -> int:
    """Move the test set's alias to the best version, then re-check after each move: another
    exporter may have moved it between our read and our write. Every exporter tags its
    version before it reads, so the last one to move the alias has seen every version;
    the loop ends when a read after our last write agrees with it. Safe on any store
    (SQLite or a server) without a lock."""
    alias = dataset_alias(test_set)
    for _ in range(CONVERGE_ROUNDS):
        holder = _version_by_alias(client, name, alias)
        best = _best_since(client, name, test_set, holder)
        if holder is not None and int(best.version) == int(holder.version):
            return int(holder.version)
        client.set_registered_model_alias(name, alias, str(best.version))
    raise RuntimeError(f"registered model {name!r}: alias {alias!r} kept moving for {CONVERGE_ROUNDS} rounds")


def _point_champion_at(client: Any, name: str, test_set: str) -> int:
    """`champion` follows the champion of the test set exported last: a user who trains on a
    new data set serves that data set's best model. Re-checked after the move, like above."""
    for _ in range(CONVERGE_ROUNDS):
        target = _version_by_alias(client, name, dataset_alias(test_set))
        holder = _version_by_alias(client, name, CHAMPION)
        if holder is not None and int(holder.version) == int(target.version):
            return int(target.version)
        client.set_registered_model_alias(name, CHAMPION, str(target.version))
    raise RuntimeError(f"registered model {name!r}: alias {CHAMPION!r} kept moving for {CONVERGE_ROUNDS} rounds")


def promote(
    client: Any, name: str, version: int, test_accuracy: float, force: bool, test_set: str, classes: list[str]
) -> dict[str, Any]:
    """Tag registered `version` with its test accuracy, test set and classes; move the alias
    `champion-<test set>` to it if it beats that alias's holder (only models evaluated on the
    same test set compete), then point `champion` at that test set's champion."""
    if not math.isfinite(test_accuracy):
        raise ValueError(f"test accuracy must be a finite number, got {test_accuracy!r}")
    previous = current_champion(client, name, dataset_alias(test_set))
    # tags first: a concurrent exporter must see this version before it compares
    for key, value in {
        ACCURACY_TAG: f"{stored_accuracy(test_accuracy):.{ACCURACY_DIGITS}f}",
        TEST_SET_TAG: test_set,
        CLASSES_TAG: ",".join(classes),
    }.items():
        client.set_model_version_tag(name, str(version), key, value)
    if force:
        client.set_registered_model_alias(name, dataset_alias(test_set), str(version))
    dataset_champion = _converge_dataset_alias(client, name, test_set)
    return {
        "registered_model": name,
        "version": version,
        "test_set": test_set,
        "champion": dataset_champion == version,
        "champion_alias": dataset_alias(test_set),
        "champion_alias_version": dataset_champion,
        "champion_version": _point_champion_at(client, name, test_set),
        "previous_champion": previous,
    }


def register_and_promote(
    run_kwargs: dict[str, Any], name: str, test_accuracy: float, force: bool, test_set: str, classes: list[str]
) -> dict[str, Any]:
    """Log the model to the active run, register a version and `promote` it."""
    import mlflow

    if not math.isfinite(test_accuracy):
        raise ValueError(f"test accuracy must be a finite number, got {test_accuracy!r}")
    _quiet_mlflow_pyfunc()
    info = mlflow.pyfunc.log_model(name="model", registered_model_name=name, **run_kwargs)
    version = int(info.registered_model_version)
    result = promote(mlflow.MlflowClient(), name, version, test_accuracy, force, test_set, classes)
    mlflow.set_tag("ferflow.registered_version", f"{name}/{version}")
    return result | {"model_uri": info.model_uri}


def run_export(
    export: ExportParams,
    serve: ServeParams,
    arrays: Path,
    label_map: Path,
    model_path: Path,
    eval_metrics_json: Path,
    out_dir: Path,
    metrics_json: Path,
) -> dict[str, Any]:
    """The export stage's work: the pyfunc directory, then (when evaluate logged to a run) a
    registered version in that run, promoted to `champion` if it is better."""
    from ferflow.data.arrays import load_label_map, load_split, split_digest
    from ferflow.tracking.runs import resume_run
    from ferflow.tracking.signals import interrupts_held

    eval_metrics = files.read_json(eval_metrics_json)
    x_test, y_test = load_split(arrays, "test")
    classes = load_label_map(label_map)
    example = np.rint(x_test[0, :, :, 0] * 255).astype(np.uint8)
    config_path = out_dir.parent / ".serve_config.json"
    files.write_json(config_path, serve.model_dump())
    test_set = split_digest(x_test, y_test, classes)
    try:
        kwargs = model_kwargs(model_path, label_map, config_path, example)
        # what `ferflow predict` prints about the model it uses (MLmodel's metadata)
        kwargs["metadata"] = {
            "ferflow": {
                "mlflow_run_id": eval_metrics.get("mlflow_run_id"),
                "test_accuracy": round(float(eval_metrics["accuracy"]), ACCURACY_DIGITS),
                "test_set": test_set,
                "n_test": int(len(y_test)),
                "classes": classes,
            }
        }
        save_pyfunc(out_dir, kwargs)
        result: dict[str, Any] = {"export_dir": str(out_dir), "test_accuracy": eval_metrics["accuracy"]}
        # evaluate recorded the run it logged to (the training run, or a fork of it)
        eval_run_id = eval_metrics.get("mlflow_run_id")
        if eval_run_id:
            import mlflow

            with resume_run(eval_run_id, flatten({"export": export, "serve": serve}), str(eval_metrics_json)) as run_id:
                result["mlflow_run_id"] = run_id
                with interrupts_held():
                    result |= register_and_promote(
                        kwargs,
                        export.registered_model_name,
                        eval_metrics["accuracy"],
                        export.force_champion,
                        test_set,
                        classes,
                    )
                    # the lock of this working copy (DVC writes export's own entry after the stage)
                    if Path("dvc.lock").exists():
                        mlflow.log_artifact("dvc.lock")
    finally:
        config_path.unlink(missing_ok=True)
    files.write_json(metrics_json, result)
    return result
