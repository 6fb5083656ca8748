"""The architecture registry: each builder matches its seed, builds, trains one step; counts are right."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from keras import layers

from ferflow import cli
from ferflow.core.params import ARCH_NAMES
from ferflow.model.architectures import REGISTRY, build_model, crop_margin, describe_models, flops_per_image


def signature(model: keras.Model) -> list[str]:
    """The layer stack as short tokens, e.g. conv128/valid/relu, bn, pool, drop0.4, dense256/relu."""
    tokens = []
    for layer in model.layers:
        if isinstance(layer, layers.InputLayer):
            continue
        if isinstance(layer, layers.Conv2D):
            k = "x".join(map(str, layer.kernel_size))
            tokens.append(f"conv{layer.filters}/{k}/{layer.padding}/{layer.activation.__name__}")
        elif isinstance(layer, layers.Dense):
            tokens.append(f"dense{layer.units}/{layer.activation.__name__}")
        elif isinstance(layer, layers.BatchNormalization):
            tokens.append("bn")
        elif isinstance(layer, layers.MaxPooling2D):
            tokens.append(f"pool{layer.pool_size[0]}")
        elif isinstance(layer, layers.Dropout):
            tokens.append(f"drop{layer.rate:g}")
        elif isinstance(layer, layers.Activation):
            tokens.append(layer.activation.__name__)
        elif isinstance(layer, layers.Flatten):
            tokens.append("flatten")
        elif isinstance(layer, layers.GlobalAveragePooling2D):
            tokens.append("gap")
        else:
            tokens.append(type(layer).__name__)
    return tokens


def _vgg_block(filters: int) -> list[str]:
    return [f"conv{filters}/3x3/same/linear", "bn", "relu"] * 2 + ["pool2", "drop0.25"]


# Written from the seed notebooks/READMEs (/work/shared/seeds), not from models.py.
SEED_SIGNATURES = {
    # 000: Sequential, four Conv2D(n, (3,3), relu) without padding, each + MaxPool(2) + Dropout(0.4)
    "seed000": [t for n in (128, 256, 512, 512) for t in (f"conv{n}/3x3/valid/relu", "pool2", "drop0.4")]
    + ["flatten", "dense512/relu", "drop0.4", "dense256/relu", "drop0.3", "dense7/softmax"],
    # 001: three blocks Conv2D (32/64/128) + BN + MaxPool + Dropout(0.25); Dense 256 relu + BN + Dropout 0.5
    "seed001": [t for n in (32, 64, 128) for t in (f"conv{n}/3x3/valid/relu", "bn", "pool2", "drop0.25")]
    + ["flatten", "dense256/relu", "bn", "drop0.5", "dense7/softmax"],
    # 003: create_model(): Conv 256, Conv 512 (same, relu), BN, pool, 0.4; 384/192/384 blocks; Dense 256 + BN + 0.3
    "seed003": ["conv256/3x3/same/relu", "conv512/3x3/same/relu", "bn", "pool2", "drop0.4"]
    + [t for n in (384, 192, 384) for t in (f"conv{n}/3x3/same/relu", "bn", "pool2", "drop0.4")]
    + ["flatten", "dense256/relu", "bn", "drop0.3", "dense7/softmax"],
    # 004: three VGG blocks of two Conv + BN + ReLU, MaxPool, Dropout 0.25; FC 512, 256 with BN + ReLU + Dropout 0.5
    "seed004": _vgg_block(64)
    + _vgg_block(128)
    + _vgg_block(256)
    + ["flatten", "dense512/linear", "bn", "relu", "drop0.5", "dense256/linear", "bn", "relu", "drop0.5", "dense7/softmax"],
}


def test_registry_is_the_params_choice_list():
    assert tuple(REGISTRY) == ARCH_NAMES
    assert {"seed000", "seed001", "seed003", "seed004"} <= set(REGISTRY)
    assert set(REGISTRY) - {"seed000", "seed001", "seed003", "seed004"}, "at least one variant of the project's own"


@pytest.mark.parametrize("arch", sorted(SEED_SIGNATURES))
def test_seed_builders_follow_their_seed(arch):
    assert signature(build_model(arch, 7)) == SEED_SIGNATURES[arch]


@pytest.mark.parametrize(
    ("arch", "feature_map"),
    [
        ("seed000", (1, 1, 512)),  # valid convs + 4 pools: 48-46/23-21/10-8/4-2/1
        ("seed001", (4, 4, 128)),  # valid convs + 3 pools: 48-46/23-21/10-8/4
        ("seed003", (3, 3, 384)),  # same convs + 4 pools: 48/24/12/6/3
        ("seed004", (6, 6, 256)),  # same convs + 3 pools: FC 9216 -> 512 as in the seed's drawing
    ],
)
def test_seed_feature_map_before_flatten(arch, feature_map):
    model = build_model(arch, 7)
    flatten = next(layer for layer in model.layers if isinstance(layer, layers.Flatten))
    assert tuple(flatten.input.shape[1:]) == feature_map
    assert flatten.output.shape[-1] == int(np.prod(feature_map))


def test_seed004_keeps_pytorch_biases_and_batchnorm_defaults():
    model = build_model("seed004", 7)
    convs = [layer for layer in model.layers if isinstance(layer, layers.Conv2D)]
    assert all(c.use_bias for c in convs)
    bns = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    assert {(bn.momentum, bn.epsilon) for bn in bns} == {(0.9, 1e-5)}


@pytest.mark.parametrize("arch", list(REGISTRY))
def test_every_arch_builds_and_trains_one_step(arch):
    keras.utils.set_random_seed(0)
    model = build_model(arch, 7)
    assert model.input_shape == (None, 48, 48, 1) and model.output_shape == (None, 7)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    x = np.random.default_rng(0).random((2, 48, 48, 1), dtype=np.float32)
    y = keras.utils.to_categorical([0, 3], 7)
    before = [w.copy() for w in model.get_weights()]
    loss = float(model.train_on_batch(x, y))
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights())), "one step must move the weights"
    probs = keras.ops.convert_to_numpy(model(x, training=False))  # eager: no predict() tracing cost
    assert probs.shape == (2, 7) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_flops_match_a_hand_count_for_seed000():
    # 2 x multiply-adds: conv = 2*H_out*W_out*C_out*k*k*C_in, dense = 2*in*out
    conv1 = 2 * 46 * 46 * 128 * 3 * 3 * 1  # 48 -> 46 (valid 3x3), 1 input channel
    conv2 = 2 * 21 * 21 * 256 * 3 * 3 * 128  # pool 46 -> 23, conv -> 21
    conv3 = 2 * 8 * 8 * 512 * 3 * 3 * 256  # pool 21 -> 10, conv -> 8
    conv4 = 2 * 2 * 2 * 512 * 3 * 3 * 512  # pool 8 -> 4, conv -> 2 (then pool -> 1)
    dense = 2 * (512 * 512 + 512 * 256 + 256 * 7)
    assert conv1 == 4_875_264
    assert flops_per_image(build_model("seed000", 7)) == conv1 + conv2 + conv3 + conv4 + dense


def test_parameter_count_matches_a_hand_count_for_seed000():
    convs = (3 * 3 * 1 + 1) * 128 + (3 * 3 * 128 + 1) * 256 + (3 * 3 * 256 + 1) * 512 + (3 * 3 * 512 + 1) * 512
    dense = (512 + 1) * 512 + (512 + 1) * 256 + (256 + 1) * 7
    assert build_model("seed000", 7).count_params() == convs + dense == 4_232_199


def test_width_and_dropout_scale_are_applied():
    model = build_model("seed001", 7, width=0.5, dropout_scale=0.5)
    assert [layer.filters for layer in model.layers if isinstance(layer, layers.Conv2D)] == [16, 32, 64]
    assert [layer.rate for layer in model.layers if isinstance(layer, layers.Dropout)] == [0.125] * 3 + [0.25]
    assert model.output_shape == (None, 7)


def test_unknown_arch_names_the_choices():
    with pytest.raises(ValueError, match="seed000"):
        build_model("resnet", 7)


def test_describe_models_and_cli_list_every_arch(capsys):
    rows = describe_models(7)
    assert [r["arch"] for r in rows] == list(REGISTRY)
    seed000 = next(r for r in rows if r["arch"] == "seed000")
    assert seed000["params"] == 4_232_199
    assert seed000["mflops_per_image"] == round(flops_per_image(build_model("seed000", 7)) / 1e6, 1)
    assert all(r["params"] > 0 and r["mflops_per_image"] > 0 and r["description"] for r in rows)

    assert cli.main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert cli.main(["models"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in REGISTRY) and "4,232,199" in table


def test_crop_size_puts_a_centre_crop_in_front_of_the_body():
    model = build_model("ferflow_vgg", 7, width=0.25, crop_size=40)
    assert model.input_shape == (None, 48, 48, 1)  # callers still feed 48x48 faces
    crop = model.get_layer("face_crop")
    assert crop.output.shape == (None, 40, 40, 1) and crop_margin(model) == 4
    x = np.random.default_rng(0).random((2, 48, 48, 1), dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(crop(x)), x[:, 4:44, 4:44, :])
    uncropped = build_model("ferflow_vgg", 7, width=0.25)
    assert crop_margin(uncropped) == 0 and "face_crop" not in [layer.name for layer in uncropped.layers]
    # the crop the cpu-quick preset uses suits every arch but seed000 (four valid convs and pools)
    for arch in set(ARCH_NAMES) - {"seed000"}:
        assert build_model(arch, 7, width=0.25, crop_size=40).output_shape == (None, 7)


def test_a_crop_too_small_for_the_arch_names_param_and_arch():
    with pytest.raises(ValueError, match=r"train.crop_size 40 is too small for arch 'seed000'"):
        build_model("seed000", 7, crop_size=40)
