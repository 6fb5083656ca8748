"""Calibrated confidence (issue #32 item 4): one temperature fitted on validation, ECE before/after."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import write_tiny_model
from ferflow.core import files
from ferflow.core.classes import FER_CLASSES
from ferflow.model.calibration import (
    apply_temperature,
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    read_temperature,
)


def overconfident(n: int, seed: int, classes: int = 7, sharpen: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) while the model says softmax(sharpen * z): right as often
    as a calibrated model, but far surer of itself."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, classes))
    true_probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(classes, p=row) for row in true_probs])
    probs = np.exp(sharpen * z)
    return probs / probs.sum(axis=1, keepdims=True), y


def test_temperature_lowers_ece_of_an_overconfident_model_and_keeps_the_argmax() -> None:
    val_probs, y_val = overconfident(3000, seed=1)
    test_probs, y_test = overconfident(3000, seed=2)
    temperature = fit_temperature(val_probs, y_val)
    calibrated = apply_temperature(test_probs, temperature)
    assert 3.0 < temperature < 5.0  # the sharpening undone
    before, after = expected_calibration_error(test_probs, y_test), expected_calibration_error(calibrated, y_test)
    assert before > 0.15
    assert after < 0.05 and after < before / 4
    np.testing.assert_array_equal(calibrated.argmax(axis=1), test_probs.argmax(axis=1))
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0)


def test_ece_of_a_perfectly_calibrated_model_is_small_and_of_a_sure_wrong_one_is_one() -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 20000)
    probs = np.stack([conf, 1 - conf], axis=1)
    y = np.where(rng.random(20000) < conf, 0, 1)  # right exactly as often as it claims
    assert expected_calibration_error(probs, y) < 0.02
    assert expected_calibration_error(np.array([[1.0, 0.0]] * 4), np.array([1, 1, 1, 1])) == pytest.approx(1.0)


def test_calibration_summary_and_temperature_file(tmp_path: Path) -> None:
    probs, y = overconfident(1000, seed=3)
    summary = calibration_summary(probs, y)
    assert summary["fitted_on"] == "val" and summary["val_ece_after"] < summary["val_ece_before"]
    files.write_json(tmp_path / "calibration.json", summary)
    assert read_temperature(tmp_path / "calibration.json") == pytest.approx(summary["temperature"])
    assert read_temperature(None) == 1.0
    files.write_json(tmp_path / "bad.json", {"temperature": "hot"})
    with pytest.raises(ValueError, match=r"bad\.json: 'temperature' must be a number"):
        read_temperature(tmp_path / "bad.json")


def test_the_temperature_depends_on_the_validation_split_only(tmp_path: Path) -> None:
    """Protocol: two evaluations that differ only in their test split (other images, other
    labels) fit the same temperature; one on another validation split does not."""
    import keras

    from ferflow.core.params import EvaluateParams
    from ferflow.model.evaluation import EvalPaths, EvalSplits, evaluate

    model = keras.models.load_model(write_tiny_model(tmp_path)[0], compile=False)
    rng = np.random.default_rng(0)
    val = (rng.random((40, 48, 48, 1), dtype=np.float32), rng.integers(0, 7, 40))
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss,val_loss,accuracy,val_accuracy\n1,2.0,2.0,0.1,0.1\n")

    def temperature(name: str, seed: int, val_split: tuple[np.ndarray, np.ndarray]) -> float:
        other = np.random.default_rng(seed)
        test = (other.random((30, 48, 48, 1), dtype=np.float32), other.integers(0, 7, 30))
        out = tmp_path / name
        paths = EvalPaths(
            tmp_path, tmp_path, tmp_path, history, tmp_path, out / "eval.json", out / "p.csv", out, None, out / "cal.json"
        )
        evaluate(model, EvalSplits(test, val_split), list(FER_CLASSES), paths, EvaluateParams())
        return files.read_json(out / "cal.json")["temperature"]

    first = temperature("a", 1, val)
    assert temperature("b", 2, val) == first
    assert temperature("c", 1, (val[0][::-1].copy(), val[1])) != first


def _export(model_path: Path, labels: Path, face: np.ndarray, out: Path, calibration: Path | None) -> Path:
    from ferflow.serving.packaging import ModelFiles, model_kwargs, save_pyfunc

    files.write_json(out.parent / f"{out.name}-serve.json", {"detect_face": False, "tta": "none"})
    save_pyfunc(out, model_kwargs(ModelFiles(model_path, labels, None, calibration), out.parent / f"{out.name}-serve.json", face))
    return out


def test_served_model_returns_calibrated_probabilities(tmp_path: Path) -> None:
    """The exported pyfunc reads the temperature and applies it: its probabilities equal the
    uncalibrated export's rescaled by that temperature, with the same top class."""
    import mlflow

    from ferflow.data.sources.synthetic import generate_face
    from ferflow.serving.packaging import input_example

    model_path, labels = write_tiny_model(tmp_path)
    faces = [generate_face(np.random.default_rng(i), "happy") for i in range(3)]
    files.write_json(tmp_path / "calibration.json", {"temperature": 0.25})
    plain = mlflow.pyfunc.load_model(str(_export(model_path, labels, faces[0], tmp_path / "plain", None)))
    calibrated = mlflow.pyfunc.load_model(
        str(_export(model_path, labels, faces[0], tmp_path / "cal", tmp_path / "calibration.json"))
    )
    batch = pd.concat([input_example(f) for f in faces], ignore_index=True)
    raw = plain.predict(batch)
    served = calibrated.predict(batch)
    prob_cols = list(FER_CLASSES)
    expected = apply_temperature(raw[prob_cols].to_numpy(), 0.25)
    np.testing.assert_allclose(served[prob_cols].to_numpy(), expected, atol=2e-5)
    assert not np.allclose(served[prob_cols].to_numpy(), raw[prob_cols].to_numpy(), atol=1e-3)
    np.testing.assert_allclose(served["confidence"], served[prob_cols].max(axis=1))
    assert list(served["label"]) == list(raw["label"])
