"""In-graph augmentation: one fused random affine map per image, geometry checked pixel by pixel."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from ferflow.core.params import AugmentParams
from ferflow.model.augmentation import RandomAffine, build_augmentation


def faces(n: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 48, 48, 1), dtype=np.float32)


def dot_at(row: int, col: int, n: int = 16) -> np.ndarray:
    x = np.zeros((n, 48, 48, 1), np.float32)
    x[:, row - 1 : row + 2, col - 1 : col + 2] = 1.0  # 3x3 so bilinear sampling keeps a clear peak
    return x


def peaks(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1).argmax(axis=1)
    return np.stack(np.unravel_index(flat, (48, 48)), axis=1)


def test_flip_mirrors_about_half_the_images_exactly():
    x = faces(1024)
    out = np.asarray(RandomAffine(flip=True, seed=3)(x, training=True))
    mirrored = np.all(np.abs(out - x[:, :, ::-1]) <= 1e-5, axis=(1, 2, 3))
    unchanged = np.all(np.abs(out - x) <= 1e-5, axis=(1, 2, 3))
    assert np.all(mirrored | unchanged)
    # p = 0.5: 512 +- 4.4 standard deviations (16); a probability of 0.4 or 0.6 falls outside
    assert 442 <= mirrored.sum() <= 582, mirrored.sum()


def test_inference_passes_images_through_untouched():
    x = faces()
    layer = RandomAffine(True, 0.05, 0.2, 0.2, seed=1)
    assert np.array_equal(np.asarray(layer(x, training=False)), x)


def test_rotation_and_zoom_keep_the_centre_fixed():
    x = dot_at(24, 24)  # the 3x3 dot covers the centre (23.5, 23.5) region
    out = np.asarray(RandomAffine(rotation=0.05, zoom=0.2, seed=2)(x, training=True))
    assert np.all(np.abs(peaks(out) - 24) <= 1)


def test_rotation_moves_off_centre_pixels_by_at_most_the_angle():
    x = dot_at(24, 40)  # 16 px right of centre
    out = np.asarray(RandomAffine(rotation=0.03, seed=4)(x, training=True))  # <= 10.8 degrees
    radius = np.hypot(*(peaks(out) - 23.5).T)
    assert np.all(np.abs(radius - 16.5) <= 1.5)
    assert len({tuple(p) for p in peaks(out)}) > 1  # it does rotate


def test_shift_moves_within_the_bound_both_ways():
    x = dot_at(24, 24, n=64)
    out = np.asarray(RandomAffine(shift=0.1, seed=5)(x, training=True))  # <= 4.8 px
    moved = peaks(out) - peaks(x)
    assert np.all(np.abs(moved) <= 5)
    assert moved[:, 0].min() < 0 < moved[:, 0].max() and moved[:, 1].min() < 0 < moved[:, 1].max()


def test_values_stay_in_range_and_dtype_is_kept():
    x = faces()
    out = np.asarray(RandomAffine(True, 0.05, 0.2, 0.2, seed=6)(x, training=True))
    assert out.shape == x.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6  # reflect fill: no out-of-range borders


def test_same_seed_same_augmentation():
    x = faces()
    a = np.asarray(RandomAffine(True, 0.05, 0.2, 0.1, seed=7)(x, training=True))
    b = np.asarray(RandomAffine(True, 0.05, 0.2, 0.1, seed=7)(x, training=True))
    assert np.array_equal(a, b)


def test_config_round_trip():
    layer = RandomAffine(True, 0.03, 0.1, 0.1, seed=9, name="aug")
    clone = RandomAffine.from_config(layer.get_config())
    assert (clone.flip, clone.rotation, clone.zoom, clone.shift, clone.seed) == (True, 0.03, 0.1, 0.1, 9)


@pytest.mark.parametrize(
    ("aug", "kinds"),
    [
        ({}, []),
        ({"flip": True}, [RandomAffine]),
        ({"zoom": 0.1, "shift": 0.1}, [RandomAffine]),
        ({"erasing": 0.3}, [keras.layers.RandomErasing]),
        ({"flip": True, "rotation": 0.03, "erasing": 0.3}, [RandomAffine, keras.layers.RandomErasing]),
    ],
)
def test_params_map_to_layers(aug, kinds):
    layers = build_augmentation(AugmentParams(**aug), seed=0)
    assert [type(layer) for layer in layers] == kinds
