"""Weight averaging (issue #32 item 3): `train.weight_average: ema` keeps a moving average of
the weights, scored on validation against the last epoch and the best checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ferflow.core.classes import FER_CLASSES
from ferflow.core.params import TrainParams
from ferflow.data.preprocessing import prepare_batch
from ferflow.data.sources.synthetic import generate_face
from ferflow.model import training
from support import fit

LOAD_AND_PREDICT = """
import sys, numpy as np, keras
model = keras.saving.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
"""


def _faces(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(FER_CLASSES)), per_class)
    return prepare_batch(np.stack([generate_face(rng, FER_CLASSES[label]) for label in y])), y


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_averaged_weights_differ_from_the_last_epoch_and_load_in_a_fresh_process(tmp_path: Path) -> None:
    x_train, y_train = _faces(12, seed=1)
    x_val, y_val = _faces(3, seed=2)
    train = TrainParams(
        arch="ferflow_tiny", epochs=2, batch_size=16, mixed_precision="float32", weight_average="ema", ema_decay=0.9
    )
    model, summary = fit(train, x_train, y_train, x_val, y_val, tmp_path, verbose=0)
    scores = summary["weight_candidates"]
    assert summary["weight_average"] == "ema" and {"ema", "last_epoch", "best_checkpoint"} <= set(scores)
    assert scores["ema"]["val_loss"] != pytest.approx(scores["last_epoch"]["val_loss"], abs=1e-6)  # other weights
    kept = scores[summary["weights_kept"]]
    assert kept["val_loss"] <= min(scores["ema"]["val_loss"], scores["best_checkpoint"]["val_loss"]) + 1e-9
    # the model saved is the one kept: a fresh process loads it and predicts as this one does
    np.save(tmp_path / "x.npy", x_val)
    saved = tmp_path / "model.keras"
    subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, str(saved), str(tmp_path / "x.npy"), str(tmp_path / "p.npy")],
        check=True, timeout=240,
    )  # fmt: skip
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), model.predict(x_val, verbose=0), atol=1e-5)
    assert training.val_scores(model, x_val, y_val)["val_loss"] == pytest.approx(kept["val_loss"], rel=1e-4)


def test_the_optimizer_averages_only_when_asked() -> None:
    plain = training.make_optimizer(TrainParams(), 100)
    averaged = training.make_optimizer(TrainParams(weight_average="ema", ema_decay=0.95), 100)
    assert plain.use_ema is False
    assert averaged.use_ema is True and averaged.ema_momentum == 0.95
