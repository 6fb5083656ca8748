"""Export: a pickle-free "models from code" pyfunc, its signature, and the champion alias."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import REPO, write_tiny_model
from ferflow.core import files
from ferflow.core.classes import FER_CLASSES
from ferflow.data.sources.synthetic import generate_face
from ferflow.serving.export import encode_png, export_model, model_kwargs, register_and_promote, should_promote

SERVE = {"detect_face": True, "tta": "flip", "max_image_bytes": 1_000_000, "max_image_pixels": 4_000_000}
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("export-inputs")
    write_tiny_model(work)
    files.write_json(work / "serve.json", SERVE)
    face = generate_face(np.random.default_rng(0), "happy")
    return {
        "dir": work,
        "keras": work / "model.keras",
        "labels": work / "label_map.json",
        "serve": work / "serve.json",
        "face": face,
    }


@pytest.fixture(scope="module")
def exported(inputs: dict) -> Path:
    return export_model(inputs["keras"], inputs["labels"], SERVE, inputs["face"], inputs["dir"] / "export")


def test_export_is_models_from_code_without_pickle(exported: Path) -> None:
    mlmodel = yaml.safe_load((exported / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavor["model_code_path"]).name == "pyfunc.py"
    assert (exported / "pyfunc.py").is_file() and (exported / "code" / "ferflow" / "serving" / "faces.py").is_file()
    assert set(flavor["artifacts"]) == {"keras_model", "label_map", "serve_config"}
    assert json.loads((exported / flavor["artifacts"]["serve_config"]["path"]).read_text()) == SERVE
    for path in exported.rglob("*"):
        if path.is_file():
            assert path.suffix not in (".pkl", ".pickle"), path
            assert not path.read_bytes()[:2].startswith(PICKLE_MAGIC), f"{path} looks like a pickle"


def test_export_ships_only_what_the_pyfunc_imports(exported: Path) -> None:
    from ferflow.core.imports import imported_modules

    code = exported / "code"
    shipped = {p.relative_to(code).as_posix() for p in code.rglob("*.py")}
    expected = {name.replace(".", "/") for name in imported_modules(REPO / "ferflow" / "serving" / "pyfunc.py", REPO)}
    assert {s.removesuffix("/__init__.py").removesuffix(".py") for s in shipped} == expected
    for training_only in ("ferflow/model/training.py", "ferflow/data/ingest.py", "ferflow/pipeline.py", "ferflow/tracking"):
        assert not (code / training_only).exists(), training_only
    assert "ferflow/serving/faces.py" in shipped and "ferflow/data/preprocessing.py" in shipped


def test_exported_model_predicts_in_a_fresh_process_from_its_own_code(exported: Path, inputs: dict, tmp_path: Path) -> None:
    """No PYTHONPATH and another working directory: ferflow comes from the model's code/ only."""
    script = """
import sys, importlib.util, mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
import ferflow
assert ferflow.__file__.startswith(sys.argv[1]), ferflow.__file__
assert importlib.util.find_spec("ferflow.model.training") is None
print(model.predict(pd.DataFrame({"image": [sys.argv[2]]}))["label"].iloc[0])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(exported.resolve()), base64.b64encode(encode_png(inputs["face"])).decode()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] in FER_CLASSES


def test_signature_and_input_example(exported: Path) -> None:
    from mlflow.models import Model

    meta = Model.load(str(exported / "MLmodel"))
    inputs = meta.signature.inputs.to_dict()
    assert inputs == [{"type": "any", "name": "image", "required": False}]
    outputs = [c["name"] for c in meta.signature.outputs.to_dict()]
    assert outputs == ["label", "confidence", *FER_CLASSES, "face_found", "face_x", "face_y", "face_w", "face_h"]
    params = {p.name: p.default for p in meta.signature.params.params}
    # defaults from the serve config
    expected = {"detect_face": True, "tta": "flip", "pixel_range": "auto", "faces": "largest", "face_detector": "haar"}
    assert params == expected
    serving_example = json.loads((exported / "serving_input_example.json").read_text())
    (value,) = serving_example["dataframe_split"]["data"][0]
    assert Image.open(io.BytesIO(base64.b64decode(value, validate=True))).size == (48, 48)


def test_loaded_pyfunc_predicts_bytes_and_rejects_garbage(exported: Path, inputs: dict) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(str(exported))
    out = model.predict(pd.DataFrame({"image": [encode_png(inputs["face"]), encode_png(np.fliplr(inputs["face"]))]}))
    assert list(out["label"].isin(FER_CLASSES)) == [True, True]
    np.testing.assert_allclose(out[list(FER_CLASSES)].sum(axis=1), 1.0, atol=1e-9)
    with pytest.raises(MlflowException, match="row 0: column 'image': not an image"):
        model.predict(pd.DataFrame({"image": [b"definitely not an image"]}))


@pytest.mark.parametrize(
    ("new", "champion", "force", "expected"),
    [
        (0.7, None, False, True),  # first model
        (0.7, 0.6, False, True),
        (0.6, 0.6, False, False),  # a tie keeps the current champion
        (0.5, 0.6, False, False),
        (0.5, 0.6, True, True),
        (0.5, float("nan"), False, True),  # champion without a recorded accuracy
    ],
)
def test_should_promote(new: float, champion: float | None, force: bool, expected: bool) -> None:
    assert should_promote(new, champion, force) is expected


@pytest.mark.filterwarnings("ignore:.*An input example was not provided:UserWarning")
def test_champion_alias_moves_only_to_better_models(tmp_path: Path, inputs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = mlflow.MlflowClient()
        exp = client.create_experiment("export-test", artifact_location=(tmp_path / "artifacts").as_uri())
        kwargs = model_kwargs(inputs["keras"], inputs["labels"], inputs["serve"], inputs["face"])
        kwargs.pop("input_example")  # skips MLflow's load-and-predict check: 4 logs stay fast

        def export(accuracy: float, force: bool = False) -> dict:
            with mlflow.start_run(experiment_id=exp):
                return register_and_promote(kwargs, "ferflow-test", accuracy, force)

        first = export(0.50)
        assert (first["version"], first["champion"], first["previous_champion"]) == (1, True, None)
        worse = export(0.40)
        assert (worse["version"], worse["champion"], worse["champion_version"]) == (2, False, 1)
        assert worse["previous_champion"] == {"version": 1, "test_accuracy": 0.5}
        better = export(0.60)
        assert (better["version"], better["champion"], better["champion_version"]) == (3, True, 3)
        forced = export(0.10, force=True)
        assert (forced["champion"], forced["champion_version"]) == (True, 4)
        champion = client.get_model_version_by_alias("ferflow-test", "champion")
        assert int(champion.version) == 4 and champion.tags["test_accuracy"] == "0.100000"
        assert client.get_model_version("ferflow-test", "2").tags["test_accuracy"] == "0.400000"
        # the URI the README serves resolves to a loadable model
        served = mlflow.pyfunc.load_model("models:/ferflow-test@champion")
        assert served.metadata.get_params_schema().params[1].default == "flip"
        with pytest.raises(ValueError, match="finite"):
            register_and_promote(kwargs, "ferflow-test", float("nan"), False)
    finally:
        mlflow.set_tracking_uri(previous_uri)
