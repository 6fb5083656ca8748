"""Ensembles as a model (issue #32 item 1): exported members -> one model averaging their
softmax outputs, evaluated, registered and ranked like a trained run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ferflow.core import files
from ferflow.core.classes import FER_CLASSES
from ferflow.data.arrays import load_label_map, load_split, split_digest
from ferflow.serving.ensemble import EnsembleError, EnsemblePaths, make_ensemble

SERVE = {"detect_face": False, "tta": "none"}


def _export(work: Path, seed: int, classes: list[str], test_set: str) -> Path:
    import keras

    from ferflow.model.architectures import build_model
    from ferflow.serving.packaging import export_model

    work.mkdir(parents=True)
    keras.utils.set_random_seed(seed)
    build_model("ferflow_tiny", len(classes)).save(work / "model.keras")
    files.write_json(work / "label_map.json", {"classes": classes})
    face = np.full((48, 48), 120, np.uint8)
    meta = {"ferflow": {"classes": classes, "test_set": test_set}}
    return export_model(work / "model.keras", work / "label_map.json", SERVE, face, work / "export", meta)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return tmp_path


def _test_set(data_dir: Path) -> str:
    return split_digest(*load_split(data_dir / "arrays", "test"), load_label_map(data_dir / "label_map.json"))


def test_an_ensemble_is_the_mean_of_its_members_and_is_evaluated_registered_and_ranked(
    data_dir: Path, tiny_params: Path, store: Path
) -> None:
    import keras
    import mlflow

    from ferflow.model.calibration import apply_temperature
    from ferflow.tracking.leaderboard import collect

    test_set = _test_set(data_dir)
    a, b = (_export(store / n, seed, list(FER_CLASSES), test_set) for n, seed in (("a", 1), ("b", 2)))
    paths = EnsemblePaths(data_dir / "arrays", data_dir / "label_map.json", store / "ens")
    result = make_ensemble([a, b], paths, tiny_params)

    x = np.random.default_rng(0).random((6, 48, 48, 1), dtype=np.float32)
    outputs = [keras.models.load_model(store / n / "model.keras", compile=False).predict(x, verbose=0) for n in "ab"]
    assert not np.allclose(outputs[0], outputs[1], atol=1e-3)  # two different members
    ensemble = keras.models.load_model(store / "ens" / "model.keras", compile=False)
    mean = (outputs[0] + outputs[1]) / 2
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), mean, atol=1e-6)

    # evaluated on the test split, calibrated on validation, registered: the served model
    # answers the mean of its members, rescaled by the temperature
    evaluation = files.read_json(store / "ens" / "eval.json")
    assert evaluation["n_test"] == len(load_split(data_dir / "arrays", "test")[1])
    assert result["version"] == 1 and result["test_accuracy"] == evaluation["accuracy"]
    served = mlflow.pyfunc.load_model(str(store / "ens" / "export"))
    frame = served.predict({"image": list(x[:, :, :, 0])}, params={"detect_face": False})
    expected = apply_temperature(mean / mean.sum(axis=1, keepdims=True), evaluation["temperature"])
    np.testing.assert_allclose(frame[list(FER_CLASSES)].to_numpy(), expected, atol=1e-4)

    rows = collect(f"sqlite:///{store / 'mlflow.db'}", "ferflow")
    assert [(r.arch, r.run_name, r.champion) for r in rows] == [("ensemble", "ensemble-of-2", True)]
    assert rows[0].test_accuracy == pytest.approx(evaluation["accuracy"])


def test_members_with_other_classes_or_test_sets_are_refused(data_dir: Path, tiny_params: Path, store: Path) -> None:
    test_set = _test_set(data_dir)
    a = _export(store / "a", 1, list(FER_CLASSES), test_set)
    fewer = _export(store / "b", 2, list(FER_CLASSES[:6]), test_set)
    other_test = _export(store / "c", 3, list(FER_CLASSES), "fff99999")
    paths = EnsemblePaths(data_dir / "arrays", data_dir / "label_map.json", store / "ens")
    with pytest.raises(EnsembleError, match=r"classes .* differ from") as refused:
        make_ensemble([a, fewer], paths, tiny_params)
    assert "\n" not in str(refused.value)
    with pytest.raises(EnsembleError, match=r"evaluated on test set fff99999, not on the one in the arrays folder"):
        make_ensemble([a, other_test], paths, tiny_params)
    with pytest.raises(EnsembleError, match="at least 2 members"):
        make_ensemble([a], paths, tiny_params)
    with pytest.raises(EnsembleError, match="not an exported ferflow model"):
        make_ensemble([a, store], paths, tiny_params)
    assert not (store / "ens").exists() and not (store / "mlflow.db").exists()  # refused before any work
