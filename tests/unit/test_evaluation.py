"""Test-time augmentation views: ten-crop hits the corner crops exactly; probabilities average the views."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from ferflow.model.tta import TENCROP_DEFAULT_SHIFT, predict_proba, shifted, tta_views
from ferflow.serving.runtime import KerasPredictor


def faces(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 48, 48, 1), dtype=np.float32)


def test_shifted_moves_content_and_reflects_the_border():
    x = faces(1)
    down_right = shifted(x, 3, 2)
    np.testing.assert_array_equal(down_right[:, 3:, 2:], x[:, :-3, :-2])
    np.testing.assert_array_equal(down_right[:, 0, 2:], x[:, 3, :-2])  # reflection, not zeros
    np.testing.assert_array_equal(shifted(x, 0, 0), x)


def test_tencrop_views_put_each_corner_crop_under_the_centre_window():
    x = faces(2)
    views = tta_views(x, "tencrop", margin=4)
    assert len(views) == 10
    window = [v[:, 4:44, 4:44, :] for v in views]  # what a net with a 40x40 centre crop sees
    corners = [x[:, 4:44, 4:44]] + [x[:, r : r + 40, c : c + 40] for r in (8, 0) for c in (8, 0)]
    for seen, corner in zip(window[:5], corners, strict=True):
        np.testing.assert_array_equal(seen, corner)
    for seen, corner in zip(window[5:], corners, strict=True):
        np.testing.assert_array_equal(seen, corner[:, :, ::-1])


def test_tta_modes_and_an_unknown_one():
    x = faces(1)
    assert len(tta_views(x, "none")) == 1 and len(tta_views(x, "flip")) == 2
    default = tta_views(x, "tencrop")  # no crop layer: shifts of the default size
    m = TENCROP_DEFAULT_SHIFT
    np.testing.assert_array_equal(default[4][:, m:, m:], x[:, :-m, :-m])
    with pytest.raises(ValueError, match="tta 'tenrcop': expected one of none, flip, tencrop"):
        tta_views(x, "tenrcop")


def _cropping_model() -> tuple[keras.Model, keras.Model]:
    """A 48x48 model with a 40x40 centre crop, and the same weights applied to 40x40 inputs."""
    keras.utils.set_random_seed(0)
    head = keras.Sequential([keras.Input((40, 40, 1)), layers.Flatten(), layers.Dense(7, activation="softmax")])
    inputs = keras.Input((48, 48, 1))
    model = keras.Model(inputs, head(layers.CenterCrop(40, 40, name="face_crop")(inputs)))
    return model, head


@pytest.mark.parametrize("wrap", [False, True], ids=["keras-model", "serving-predictor"])
def test_tencrop_probabilities_average_the_ten_crops(wrap):
    model, head = _cropping_model()
    x = faces(3)
    crops = [x[:, r : r + 40, c : c + 40] for r, c in ((4, 4), (8, 8), (8, 0), (0, 8), (0, 0))]
    views = crops + [c[:, :, ::-1] for c in crops]
    expected = np.mean([head.predict(v, verbose=0) for v in views], axis=0)
    got = predict_proba(KerasPredictor(model) if wrap else model, x, "tencrop")
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, predict_proba(model, x, "none"), atol=1e-4)  # the views matter


def test_evaluate_warns_when_one_class_takes_the_predictions(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """#19.4: a model answering one class for every face is flagged loudly, not just scored."""
    import logging

    from ferflow.core.classes import FER_CLASSES
    from ferflow.core.params import EvaluateParams
    from ferflow.model.evaluation import EvalPaths, EvalSplits, evaluate
    from ferflow.model.evaluation_run import warn_if_one_class

    bias = np.zeros(len(FER_CLASSES), np.float32)
    bias[3] = 5.0  # 'happy' whatever the input
    model = keras.Sequential([keras.Input((48, 48, 1)), layers.Flatten(), layers.Dense(len(FER_CLASSES), activation="softmax")])
    model.layers[-1].set_weights([np.zeros((48 * 48, len(FER_CLASSES)), np.float32), bias])
    y = np.arange(14) % len(FER_CLASSES)
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss,val_loss,accuracy,val_accuracy\n1,2.0,2.0,0.1,0.1\n")
    paths = EvalPaths(
        tmp_path, tmp_path, tmp_path, history, tmp_path, tmp_path / "eval.json", tmp_path / "pred.csv", tmp_path / "plots"
    )
    metrics = evaluate(model, EvalSplits(test=(faces(14), y)), list(FER_CLASSES), paths, EvaluateParams())
    assert (metrics["top_class"], metrics["top_class_share"]) == ("happy", 1.0)
    with caplog.at_level(logging.WARNING, logger="ferflow"):
        assert warn_if_one_class(metrics) is True
    assert "100% of the test predictions are 'happy'" in caplog.text
    assert warn_if_one_class(metrics | {"top_class_share": 0.5}) is False
