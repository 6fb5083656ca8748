"""The optional int8 ONNX network (`export.int8`): shipped only when validation accuracy holds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from ferflow.core import files
from ferflow.core.params import ExportParams, ServeParams
from ferflow.data.arrays import load_split
from ferflow.serving import int8 as int8_module
from ferflow.serving.export import ExportPaths, run_export
from ferflow.serving.onnx_export import export_onnx
from ferflow.serving.runtime import OnnxPredictor


@pytest.fixture(scope="module")
def float_onnx(tiny_model, data_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "model.onnx"
    export_onnx(tiny_model[0], path, load_split(data_dir / "arrays", "val")[0])
    return path


def test_int8_replaces_the_float_network_only_within_the_allowed_drop(float_onnx, data_dir, tmp_path, monkeypatch) -> None:
    x_train, _ = load_split(data_dir / "arrays", "train")
    x_val, y_val = load_split(data_dir / "arrays", "val")
    float_probs = OnnxPredictor(float_onnx).predict(x_val)
    float_acc = float((float_probs.argmax(1) == y_val).mean())

    refused = shutil.copy(float_onnx, tmp_path / "refused.onnx")
    monkeypatch.setattr(int8_module, "INT8_MAX_DROP", -1.0)  # no int8 network is good enough
    outcome = int8_module.int8_if_accurate(Path(refused), x_train, (x_val, y_val))
    assert not outcome.kept and "int8 not kept" in outcome.reason
    assert Path(refused).read_bytes() == float_onnx.read_bytes()  # the float file ships, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refused.onnx"]  # no int8 file left beside it

    kept = shutil.copy(float_onnx, tmp_path / "kept.onnx")
    monkeypatch.setattr(int8_module, "INT8_MAX_DROP", 1.0)
    outcome = int8_module.int8_if_accurate(Path(kept), x_train, (x_val, y_val))
    assert outcome.kept and outcome.val_accuracy_float == pytest.approx(float_acc, abs=1e-6)
    assert outcome.calibration_images == min(len(x_train), int8_module.CALIBRATION_IMAGES)
    assert Path(kept).stat().st_size < float_onnx.stat().st_size  # int8 weights
    int8_probs = OnnxPredictor(kept).predict(x_val)
    assert outcome.val_accuracy_int8 == pytest.approx(float((int8_probs.argmax(1) == y_val).mean()), abs=1e-6)
    assert np.abs(int8_probs - float_probs).max() < 0.1  # the same network, rounded
    assert OnnxPredictor(kept).crop_margin == OnnxPredictor(float_onnx).crop_margin  # tencrop's metadata kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.onnx", "refused.onnx"]


def test_the_export_stage_calibrates_on_training_images_and_records_both_accuracies(
    tiny_model, data_dir, tmp_path, monkeypatch
) -> None:
    seen: list[np.ndarray] = []
    sample = int8_module.calibration_sample
    monkeypatch.setattr(int8_module, "calibration_sample", lambda x, *a: seen.append(x) or sample(x, *a))
    files.write_json(tmp_path / "eval.json", {"accuracy": 0.5})  # no MLflow run: not registered
    paths = ExportPaths(
        data_dir / "arrays", data_dir / "label_map.json", tiny_model[0], tmp_path / "eval.json",
        tmp_path / "export", tmp_path / "export.json", None,
    )  # fmt: skip
    result = run_export(ExportParams(int8=True), ServeParams(), paths)
    assert len(seen) == 1 and np.array_equal(seen[0], load_split(data_dir / "arrays", "train")[0])  # never val or test
    recorded = files.read_json(tmp_path / "export.json")["int8"]
    assert recorded == result["int8"] and set(recorded) >= {"kept", "val_accuracy_float", "val_accuracy_int8", "reason"}
    metadata = yaml.safe_load((tmp_path / "export" / "MLmodel").read_text())["metadata"]["ferflow"]
    assert metadata["onnx_precision"] == ("int8" if recorded["kept"] else "float32")

    default = run_export(ExportParams(), ServeParams(), paths)  # int8 is opt-in
    assert "int8" not in default
    metadata = yaml.safe_load((tmp_path / "export" / "MLmodel").read_text())["metadata"]["ferflow"]
    assert metadata["onnx_precision"] == "float32"
