"""The ONNX export (parity with Keras) and the served model on onnxruntime (serve.runtime)."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, write_tiny_model
from ferflow.core import files
from ferflow.core.classes import FER_CLASSES
from ferflow.core.params import ServeParams
from ferflow.data.preprocessing import prepare_batch
from ferflow.data.sources.synthetic import generate_face
from ferflow.serving import onnx_export
from ferflow.serving.packaging import encode_png, export_model
from ferflow.serving.pyfunc import EmotionModel
from ferflow.serving.runtime import KerasPredictor, OnnxPredictor, RuntimeUnavailable

FRESH_PROCESS = """
import sys, mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
print(model.predict(pd.DataFrame({"image": [sys.argv[2]]}), params={"tta": "tencrop"})["label"].iloc[0])
heavy = sorted(m for m in ("tensorflow", "keras", "sklearn", "seaborn") if m in sys.modules)
print("heavy:" + ",".join(heavy))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The untrained tiny model exported with its ONNX file (module-scoped: tests copy before damaging)."""
    work = tmp_path_factory.mktemp("onnx")
    write_tiny_model(work)
    face = generate_face(np.random.default_rng(3), "happy")
    export = export_model(work / "model.keras", work / "label_map.json", {}, face, work / "export")
    return {"dir": work, "export": export, "face": face}


def _artifact(export: Path, name: str) -> Path:
    flavor = yaml.safe_load((export / "MLmodel").read_text())["flavors"]["python_function"]
    return export / flavor["artifacts"][name]["path"]


def _served(export: Path, runtime: str) -> EmotionModel:
    model = EmotionModel()
    model.setup(
        str(_artifact(export, "keras_model")),
        str(_artifact(export, "label_map")),
        ServeParams(runtime=runtime),
        str(_artifact(export, "onnx_model")),
    )
    return model


def _fresh_process(export: Path, face: np.ndarray, cwd: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    image = base64.b64encode(encode_png(face)).decode()
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(export.resolve()), image],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


def test_onnx_file_carries_the_crop_margin_and_matches_keras(tiny: dict) -> None:
    import keras

    onnx = OnnxPredictor(_artifact(tiny["export"], "onnx_model"))
    keras_model = KerasPredictor(keras.models.load_model(tiny["dir"] / "model.keras", compile=False))
    assert onnx.crop_margin == keras_model.crop_margin and onnx.n_classes == len(FER_CLASSES)
    x = np.random.default_rng(0).random((300, 48, 48, 1), dtype=np.float32)  # > one batch of 256
    assert np.abs(onnx.predict(x, batch_size=256) - keras_model.predict(x)).max() <= onnx_export.PARITY_TOLERANCE


def test_onnx_runtime_serves_without_tensorflow_in_a_fresh_process(tiny: dict, tmp_path: Path) -> None:
    label, heavy = _fresh_process(tiny["export"], tiny["face"], tmp_path)
    assert label in FER_CLASSES
    assert heavy == "heavy:", heavy


def test_keras_runtime_still_selectable(tiny: dict, tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(tiny["export"], export)
    files.write_json(_artifact(export, "serve_config"), {"runtime": "keras"})
    label, heavy = _fresh_process(export, tiny["face"], tmp_path)
    assert label in FER_CLASSES and "tensorflow" in heavy


@pytest.mark.parametrize("tta", ["none", "flip", "tencrop"])
def test_both_runtimes_give_the_same_answers(tiny: dict, tta: str) -> None:
    faces = [generate_face(np.random.default_rng(i), c) for i, c in enumerate(FER_CLASSES)]
    request = pd.DataFrame({"image": [base64.b64encode(encode_png(f)).decode() for f in faces]})
    on_onnx = _served(tiny["export"], "onnx")
    on_keras = _served(tiny["export"], "keras")
    assert isinstance(on_onnx.predictor, OnnxPredictor) and isinstance(on_keras.predictor, KerasPredictor)
    got, expected = on_onnx.predict(None, request, {"tta": tta}), on_keras.predict(None, request, {"tta": tta})
    pd.testing.assert_frame_equal(
        got.drop(columns=list(FER_CLASSES) + ["confidence"]), expected.drop(columns=list(FER_CLASSES) + ["confidence"])
    )
    np.testing.assert_allclose(got[list(FER_CLASSES)], expected[list(FER_CLASSES)], atol=1e-4)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_bad_onnx_file_falls_back_to_keras_with_one_warning(tiny: dict, tmp_path: Path, damage: str, caplog) -> None:
    export = tmp_path / "export"
    shutil.copytree(tiny["export"], export)
    onnx_file = _artifact(export, "onnx_model")
    if damage == "missing":
        onnx_file.unlink()
    else:
        onnx_file.write_bytes(b"not an onnx graph" * 10)
    with caplog.at_level(logging.WARNING, logger="ferflow.serving.runtime"):
        model = _served(export, "onnx")
    assert isinstance(model.predictor, KerasPredictor)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(onnx_file) in warnings[0] and "Keras" in warnings[0], warnings
    assert "\n" not in warnings[0]


def test_a_bad_onnx_file_without_keras_fails_with_a_clear_message(tiny: dict, tmp_path: Path, monkeypatch) -> None:
    export = tmp_path / "export"
    shutil.copytree(tiny["export"], export)
    _artifact(export, "onnx_model").write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "keras", None)  # `import keras` raises ImportError
    with pytest.raises(RuntimeUnavailable, match=r"cannot load the Keras model .*install the pinned requirements"):
        _served(export, "onnx")


def test_export_without_onnx_serves_on_keras_quietly(tiny: dict, tmp_path: Path, caplog) -> None:
    """Exports made before ONNX have no onnx_model artifact: runtime onnx (the default)
    serves them on Keras without a warning, also through MLflow's loader."""
    import mlflow

    export = tmp_path / "export"
    shutil.copytree(tiny["export"], export)
    _artifact(export, "onnx_model").unlink()
    spec = yaml.safe_load((export / "MLmodel").read_text())
    del spec["flavors"]["python_function"]["artifacts"]["onnx_model"]
    (export / "MLmodel").write_text(yaml.safe_dump(spec))
    with caplog.at_level(logging.WARNING):
        served = mlflow.pyfunc.load_model(str(export)).unwrap_python_model()
    assert isinstance(served.predictor, KerasPredictor)
    assert not [r for r in caplog.records if r.name.startswith("ferflow")], caplog.records


def test_parity_over_tolerance_fails_export_with_one_line(tiny: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_export, "parity_gap", lambda *_: 0.02)
    target = tmp_path / "model.onnx"
    x = prepare_batch([tiny["face"]])
    with pytest.raises(onnx_export.OnnxExportError) as info:
        onnx_export.export_onnx(tiny["dir"] / "model.keras", target, x)
    message = str(info.value)
    assert "\n" not in message and "differ by up to 0.02" in message and "tolerance of 0.0001" in message
    assert not target.exists() and not list(tmp_path.iterdir())  # nothing half-written left behind


def test_parity_is_measured_not_assumed(tiny: dict, tmp_path: Path) -> None:
    """A different network's ONNX file is far from this Keras model: the check sees it."""
    import keras

    from ferflow.model.architectures import build_model

    keras.utils.set_random_seed(7)
    build_model("ferflow_tiny", len(FER_CLASSES)).save(tmp_path / "other.keras")
    onnx_export.export_onnx(tmp_path / "other.keras", tmp_path / "other.onnx", prepare_batch([tiny["face"]]))
    model = keras.models.load_model(tiny["dir"] / "model.keras", compile=False)
    x = np.random.default_rng(1).random((8, 48, 48, 1), dtype=np.float32)
    assert onnx_export.parity_gap(model, tmp_path / "other.onnx", x) > onnx_export.PARITY_TOLERANCE


CLI_PROCESS = """
import sys
from ferflow.cli import main
assert main(["predict", sys.argv[2], "--model", sys.argv[1], "--json"]) == 0
assert main(["watch", sys.argv[3], "--model", sys.argv[1], "--quiet", "--summary", sys.argv[4]]) == 0
heavy = sorted(m for m in ("tensorflow", "keras", "sklearn", "seaborn") if m in sys.modules)
print("heavy:" + ",".join(heavy))
"""


def test_predict_and_watch_on_onnx_import_no_tensorflow(tiny: dict, tmp_path: Path) -> None:
    from PIL import Image

    from video_synth import synthetic_frames, write_video

    image = tmp_path / "face.png"
    Image.fromarray(tiny["face"]).save(image)
    frames, _ = synthetic_frames(6, size=(320, 240), n_faces=1, patch_side=100)
    video = write_video(tmp_path / "clip.mp4", frames)
    summary = tmp_path / "summary.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [str(tiny["export"]), str(image), str(video), str(summary)]
    proc = subprocess.run(
        [sys.executable, "-c", CLI_PROCESS, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "heavy:", proc.stdout[-2000:]
    assert summary.is_file()


def test_serve_runtime_is_checked_like_every_param() -> None:
    from ferflow.core.params import ParamsError

    assert ServeParams().runtime == "onnx"
    with pytest.raises(ParamsError, match=r"serve\.runtime = 'tflite' is not allowed: expected one of onnx, keras"):
        ServeParams.from_mapping({"runtime": "tflite"})
