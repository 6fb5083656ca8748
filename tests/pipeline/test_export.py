"""Export: a pickle-free "models from code" pyfunc, its signature, and the champion alias."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import REPO
from ferflow.core import files
from ferflow.core.classes import FER_CLASSES
from ferflow.data.arrays import split_digest
from ferflow.data.sources.synthetic import generate_face
from ferflow.serving.packaging import ModelFiles, encode_png, export_model, model_kwargs
from ferflow.serving.registry import Evaluated, dataset_alias, promote, register_and_promote, should_promote

SERVE = {"detect_face": True, "tta": "flip", "max_image_bytes": 1_000_000, "max_image_pixels": 4_000_000}
TEST_SET = "0123456789abcdef"
UNUSED_SOURCE = "s3://ferflow-tests/unused-model"  # versions registered without a model: the alias logic reads tags only
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Path, Path]) -> dict:
    work = tmp_path_factory.mktemp("export-inputs")
    files.write_json(work / "serve.json", SERVE)
    face = generate_face(np.random.default_rng(0), "happy")
    return {
        "dir": work,
        "keras": tiny_model[0],
        "labels": tiny_model[1],
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
    assert set(flavor["artifacts"]) == {"keras_model", "onnx_model", "label_map", "serve_config"}
    assert json.loads((exported / flavor["artifacts"]["serve_config"]["path"]).read_text()) == SERVE
    for path in exported.rglob("*"):
        if path.is_file():
            assert path.suffix not in (".pkl", ".pickle"), path
            assert not path.read_bytes()[:2].startswith(PICKLE_MAGIC), f"{path} looks like a pickle"


# Written out, not computed with the function export uses: a new import of the served model
# (and what the exported model then carries) shows up here as a diff someone must accept.
SHIPPED = {
    "ferflow/__init__.py",
    "ferflow/core/__init__.py", "ferflow/core/classes.py", "ferflow/core/errors.py", "ferflow/core/files.py",
    "ferflow/core/noise.py",
    "ferflow/core/params.py",
    "ferflow/data/__init__.py", "ferflow/data/preprocessing.py",
    "ferflow/model/__init__.py", "ferflow/model/architectures.py", "ferflow/model/calibration.py", "ferflow/model/tta.py",
    "ferflow/serving/__init__.py", "ferflow/serving/faces.py", "ferflow/serving/mlflow_adapter.py",
    "ferflow/serving/runtime.py",
}  # fmt: skip


def test_export_ships_only_what_the_pyfunc_imports(exported: Path) -> None:
    code = exported / "code"
    shipped = {p.relative_to(code).as_posix() for p in code.rglob("*.py")}
    assert shipped == SHIPPED
    for training_only in ("ferflow/model/training.py", "ferflow/data/ingest.py", "ferflow/pipeline.py", "ferflow/tracking"):
        assert not (code / training_only).exists(), training_only
    assert "ferflow/serving/faces.py" in shipped and "ferflow/data/preprocessing.py" in shipped
    detectors = code / "ferflow" / "serving" / "detectors"  # the default detector's weights travel with the code
    assert sorted(p.name for p in detectors.iterdir()) == ["LICENSE", "README.md", "face_detection_yunet_2023mar.onnx"]


def test_exported_model_predicts_in_a_fresh_process_from_its_own_code(exported: Path, inputs: dict, tmp_path: Path) -> None:
    """No PYTHONPATH and another working directory: ferflow comes from the model's code/ only."""
    script = """
import sys, importlib.util, mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
import ferflow
assert ferflow.__file__.startswith(sys.argv[1]), ferflow.__file__
spec = importlib.util.find_spec("ferflow.model.training")  # an editable install may still find the repo's
assert spec is None or not spec.origin.startswith(sys.argv[1]), spec
frame = pd.DataFrame({"image": [sys.argv[2]]})
print(model.predict(frame)["label"].iloc[0])
# the request params beyond the defaults, each through the shipped code only
for params in ({"tta": "tencrop"}, {"faces": "all"}, {"face_detector": "haar"}, {"face_detector": "mtcnn"}, {"detect_face": False, "tta": "none"}):
    out = model.predict(frame, params=params)
    classes = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    assert len(out) == 1 and abs(out[classes].to_numpy().sum() - 1) < 1e-4, (params, out)
    print(params, out["label"].iloc[0])
print(model.predict(frame)["label"].iloc[0])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(exported.resolve()), base64.b64encode(encode_png(inputs["face"])).decode()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] in FER_CLASSES and len(lines) == 7, lines


def test_signature_and_input_example(exported: Path) -> None:
    from mlflow.models import Model

    meta = Model.load(str(exported / "MLmodel"))
    inputs = meta.signature.inputs.to_dict()
    assert inputs == [{"type": "any", "name": "image", "required": False}]
    outputs = [c["name"] for c in meta.signature.outputs.to_dict()]
    assert outputs == ["label", "confidence", *FER_CLASSES, "face_found", "face_x", "face_y", "face_w", "face_h"]
    params = {p.name: p.default for p in meta.signature.params.params}
    # defaults from the serve config
    expected = {"detect_face": True, "tta": "flip", "pixel_range": "auto", "faces": "largest", "face_detector": "yunet"}
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
        (1 / 7, float(f"{1 / 7:.6f}"), False, False),  # the same model again, against its stored (rounded) accuracy
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
        kwargs = model_kwargs(ModelFiles(inputs["keras"], inputs["labels"]), inputs["serve"], inputs["face"])
        kwargs.pop("input_example")  # skips MLflow's load-and-predict check: 4 logs stay fast

        def export(accuracy: float, force: bool = False) -> dict:
            with mlflow.start_run(experiment_id=exp, run_name=f"exp-{accuracy}"):
                mlflow.log_params({"train.arch": "ferflow_tiny", "data.source": "synthetic"})
                return register_and_promote(kwargs, "ferflow-test", Evaluated(accuracy, TEST_SET, list(FER_CLASSES)), force)

        first = export(0.50)
        assert (first["version"], first["champion"], first["previous_champion"]) == (1, True, None)
        # the registry page says what each version is and how the alias moves (#29 item 6)
        assert client.get_model_version("ferflow-test", "1").description == (
            "arch ferflow_tiny, data synthetic, test accuracy 0.5000, run exp-0.5"
        )
        assert "strictly better" in client.get_registered_model("ferflow-test").description
        worse = export(0.40)
        assert (worse["version"], worse["champion"], worse["champion_version"]) == (2, False, 1)
        assert worse["previous_champion"] == {"version": 1, "test_accuracy": 0.5, "test_set": TEST_SET}
        better = export(0.60)
        assert (better["version"], better["champion"], better["champion_version"]) == (3, True, 3)
        forced = export(0.10, force=True)
        assert (forced["champion"], forced["champion_version"]) == (True, 4)
        champion = client.get_model_version_by_alias("ferflow-test", "champion")
        assert int(champion.version) == 4 and champion.tags["test_accuracy"] == "0.100000"
        assert champion.tags["test_set"] == TEST_SET and champion.tags["classes"] == ",".join(FER_CLASSES)
        assert int(client.get_model_version_by_alias("ferflow-test", dataset_alias(TEST_SET)).version) == 4
        assert client.get_model_version("ferflow-test", "2").tags["test_accuracy"] == "0.400000"
        # the URI the README serves resolves to a loadable model
        served = mlflow.pyfunc.load_model("models:/ferflow-test@champion")
        assert served.metadata.get_params_schema().params[1].default == "flip"
        with pytest.raises(ValueError, match="finite"):
            register_and_promote(kwargs, "ferflow-test", Evaluated(float("nan"), TEST_SET, list(FER_CLASSES)), False)
    finally:
        mlflow.set_tracking_uri(previous_uri)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty SQLite registry with model `ferflow-test`; versions are registered without
    logging a model (cheap), as the alias logic only reads tags."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    client.create_registered_model("ferflow-test")
    yield client
    mlflow.set_tracking_uri(previous_uri)


def _register(client, accuracy: float, test_set: str, classes: tuple[str, ...] = FER_CLASSES, force: bool = False) -> dict:
    version = int(client.create_model_version("ferflow-test", source=UNUSED_SOURCE).version)
    return promote(client, "ferflow-test", version, Evaluated(accuracy, test_set, list(classes)), force)


def test_split_digest_covers_pixels_labels_and_classes() -> None:
    x, y = np.zeros((4, 48, 48, 1), np.float32), np.arange(4)
    base = split_digest(x, y, ["a", "b", "c", "d"])
    assert base == split_digest(x.copy(), y.copy(), ["a", "b", "c", "d"])
    x2 = x.copy()
    x2[0, 0, 0, 0] = 0.5
    assert len({base, split_digest(x2, y, ["a", "b", "c", "d"]), split_digest(x, y[::-1], ["a", "b", "c", "d"])}) == 3
    assert split_digest(x, y, ["a", "b", "c", "e"]) != base


def test_champion_is_compared_only_within_a_test_set(registry) -> None:
    """#19.1: a synthetic 0.954 must not keep `champion` from a FER-2013 model at 0.40."""
    synthetic, fer = "5" * 16, "f" * 16
    assert _register(registry, 0.954, synthetic)["champion_version"] == 1
    first_fer = _register(registry, 0.40, fer)
    assert (first_fer["champion"], first_fer["champion_version"], first_fer["previous_champion"]) == (True, 2, None)
    worse_fer = _register(registry, 0.30, fer)
    assert (worse_fer["champion"], worse_fer["champion_version"]) == (False, 2)  # the data set's best, not the newest
    assert int(registry.get_model_version_by_alias("ferflow-test", dataset_alias(synthetic)).version) == 1
    # same pixels, other class list: another test set
    assert _register(registry, 0.99, fer, classes=["happy", "sad"])["champion"] is True
    # back to the synthetic data: its own best serves again, a weaker synthetic model does not win
    again = _register(registry, 0.5, synthetic)
    assert (again["champion"], again["champion_version"]) == (False, 1)
    same = _register(registry, 0.954 + 1e-9, synthetic)  # same model re-exported, accuracy rounding differs
    assert same["champion"] is False and same["champion_version"] == 1


RACER = """
import sys, mlflow
from ferflow.serving.registry import Evaluated, promote
uri, test_set, accuracies = sys.argv[1], sys.argv[2], [float(a) for a in sys.argv[3:]]
mlflow.set_tracking_uri(uri)
client = mlflow.MlflowClient()
for accuracy in accuracies:
    version = int(client.create_model_version("ferflow-test", source="s3://ferflow-tests/unused-model").version)
    promote(client, "ferflow-test", version, Evaluated(accuracy, test_set, ["a", "b"]), False)
"""


class _Interleaving:
    """A client whose first champion-alias write lets another exporter run first: the read
    of the current holder is then stale when this exporter writes (the bad interleaving the
    racing tests below only hit by chance)."""

    def __init__(self, client, before_first_write) -> None:
        self._client, self._before, self.writes = client, before_first_write, []

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        if not self.writes:
            self._before()
        self.writes.append((alias, version))
        self._client.set_registered_model_alias(name, alias, version)


def test_an_exporter_whose_read_went_stale_hands_the_alias_back_to_the_better_model(registry) -> None:
    """Exporter A reads the holder (v1, 0.50) and decides its v2 (0.70) should win; before A
    writes, exporter B registers v3 (0.90) and promotes it. A's write then takes the alias
    from a better model: the re-check after it must hand it back."""
    first = _register(registry, 0.50, TEST_SET)
    assert first["champion"]
    v2 = int(registry.create_model_version("ferflow-test", source=UNUSED_SOURCE).version)

    def exporter_b() -> None:
        assert _register(registry, 0.90, TEST_SET)["champion_alias_version"] == 3

    a = _Interleaving(registry, exporter_b)
    result = promote(a, "ferflow-test", v2, Evaluated(0.70, TEST_SET, list(FER_CLASSES)), False)
    assert a.writes[0] == (dataset_alias(TEST_SET), str(v2))  # A did write from its stale read
    assert a.writes[1] == (dataset_alias(TEST_SET), "3")  # and gave the alias back
    assert result["champion"] is False and result["champion_alias_version"] == 3
    for alias in (dataset_alias(TEST_SET), "champion"):
        assert int(registry.get_model_version_by_alias("ferflow-test", alias).version) == 3


def _race(uri: str, tmp_path: Path) -> None:
    """Two processes register and promote versions at the same time: the alias must end on the best."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    client.create_registered_model("ferflow-test")
    rng = np.random.default_rng(1)
    batches = [[f"{a:.4f}" for a in rng.uniform(0.1, 0.9, 6)] for _ in range(2)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, uri, TEST_SET, *batch], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
        )
        for batch in batches
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    best = max(float(a) for batch in batches for a in batch)
    for alias in ("champion", dataset_alias(TEST_SET)):
        assert float(client.get_model_version_by_alias("ferflow-test", alias).tags["test_accuracy"]) == best, alias


def test_two_exporters_racing_keep_the_best_sqlite(tmp_path: Path) -> None:
    _race(f"sqlite:///{tmp_path / 'race.db'}", tmp_path)


@pytest.mark.slow
def test_two_exporters_racing_keep_the_best_server(tmp_path: Path) -> None:
    import time
    import urllib.request

    from support import free_port

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--workers", "2"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        _race(f"http://127.0.0.1:{port}", tmp_path)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
