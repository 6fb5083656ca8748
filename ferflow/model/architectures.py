"""Registry of named CNN builders (`train.arch`), in backend-neutral Keras 3.

Each seed builder follows the architecture of the project it is named after
(../shared/seeds in the development workspace): layer order, widths, kernel sizes,
padding and dropout rates as the seed states them, and Keras' (or, for the PyTorch seed
004, PyTorch's) defaults where the seed leaves something out. `width` multiplies every
conv/dense width and `dropout_scale` every dropout rate, so variants are a param away.
All models take (48, 48, 1) float32 in [0, 1] and end in a float32 softmax. With
`crop_size` below 48 the net's first layer keeps the central crop_size x crop_size square:
with random shifts in the augmentation that is random-crop training (less compute per
image), and test-time `tencrop` shifts the face so that this window sees each corner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
from keras import layers

from ferflow.core.params import ARCH_NAMES
from ferflow.data.preprocessing import INPUT_SHAPE


@dataclass(frozen=True)
class ArchConfig:
    num_classes: int
    width: float = 1.0
    dropout_scale: float = 1.0
    crop_size: int = INPUT_SHAPE[0]

    def units(self, n: int) -> int:
        return max(1, round(n * self.width))

    def rate(self, r: float) -> float:
        return min(r * self.dropout_scale, 0.95)


def _face_input(cfg: ArchConfig):
    """The (48, 48, 1) input and the tensor the body starts from: the input, or its centre crop."""
    inputs = keras.Input(INPUT_SHAPE, name="face")
    if cfg.crop_size >= INPUT_SHAPE[0]:
        return inputs, inputs
    return inputs, layers.CenterCrop(cfg.crop_size, cfg.crop_size, name="face_crop")(inputs)


def crop_margin(model: keras.Model) -> int:
    """Pixels between the input's edge and the model's centre crop (0 without a crop layer)."""
    for layer in model.layers:
        if layer.name == "face_crop":
            return (INPUT_SHAPE[0] - int(layer.height)) // 2
    return 0


def _head(x, cfg: ArchConfig):
    # float32 softmax even under mixed precision, for a numerically sound loss
    return layers.Dense(cfg.num_classes, activation="softmax", dtype="float32", name="emotion")(x)


def build_seed000(cfg: ArchConfig) -> keras.Model:
    """Seed 000: four valid 3x3 convs 128-256-512-512, each + MaxPool + Dropout 0.4."""
    inputs, x = _face_input(cfg)
    for filters in (128, 256, 512, 512):
        x = layers.Conv2D(cfg.units(filters), 3, activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(cfg.rate(0.4))(x)
    x = layers.Flatten()(x)
    x = layers.Dense(cfg.units(512), activation="relu")(x)
    x = layers.Dropout(cfg.rate(0.4))(x)
    x = layers.Dense(cfg.units(256), activation="relu")(x)
    x = layers.Dropout(cfg.rate(0.3))(x)
    return keras.Model(inputs, _head(x, cfg), name="seed000")


def _conv_bn_pool(x, filters: int, rate: float, padding: str = "valid"):
    """Conv 3x3 + ReLU, BN, MaxPool 2, Dropout: the block of seeds 001 and 003."""
    x = layers.Conv2D(filters, 3, padding=padding, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.MaxPooling2D(2)(x)
    return layers.Dropout(rate)(x)


def _dense_bn_dropout(x, units: int, rate: float):
    x = layers.Dense(units, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    return layers.Dropout(rate)(x)


def build_seed001(cfg: ArchConfig) -> keras.Model:
    """Seed 001: three blocks Conv 32/64/128 + BN + MaxPool + Dropout 0.25; Dense 256 + BN + Dropout 0.5."""
    inputs, x = _face_input(cfg)
    for filters in (32, 64, 128):
        # The seed names no padding: Keras' default (valid), 48 -> 46/23 -> 21/10 -> 8/4.
        x = _conv_bn_pool(x, cfg.units(filters), cfg.rate(0.25))
    x = layers.Flatten()(x)
    x = _dense_bn_dropout(x, cfg.units(256), cfg.rate(0.5))
    return keras.Model(inputs, _head(x, cfg), name="seed001")


def build_seed003(cfg: ArchConfig) -> keras.Model:
    """Seed 003: Conv 256, Conv 512, BN, pool, dropout 0.4; then 384, 192, 384 blocks; Dense 256."""
    inputs, x = _face_input(cfg)
    x = layers.Conv2D(cfg.units(256), 3, padding="same", activation="relu")(x)
    for filters in (512, 384, 192, 384):
        x = _conv_bn_pool(x, cfg.units(filters), cfg.rate(0.4), padding="same")
    x = layers.Flatten()(x)
    x = _dense_bn_dropout(x, cfg.units(256), cfg.rate(0.3))
    return keras.Model(inputs, _head(x, cfg), name="seed003")


# PyTorch's BatchNorm defaults (momentum 0.1 of the new batch, eps 1e-5), for the PyTorch seed.
TORCH_BN = {"momentum": 0.9, "epsilon": 1e-5}


def _conv_bn_relu(x, filters: int, use_bias: bool = False, bn: dict[str, float] | None = None):
    # A bias before BN is redundant (BN's beta replaces it); only the PyTorch seed keeps it.
    x = layers.Conv2D(filters, 3, padding="same", use_bias=use_bias)(x)
    x = layers.BatchNormalization(**(bn or {}))(x)
    return layers.Activation("relu")(x)


def _dense_bn_relu(x, units: int, use_bias: bool = False, bn: dict[str, float] | None = None):
    x = layers.Dense(units, use_bias=use_bias)(x)
    x = layers.BatchNormalization(**(bn or {}))(x)
    return layers.Activation("relu")(x)


def build_seed004(cfg: ArchConfig) -> keras.Model:
    """Seed 004: three VGG blocks of two Conv 64/128/256 + BN + ReLU, pool, Dropout 0.25; FC 512, 256."""
    # A PyTorch seed: padding=1 convs (48 -> 24 -> 12 -> 6, FC 9216 -> 512 as the seed
    # draws it), nn.Conv2d/nn.Linear biases and nn.BatchNorm2d defaults kept.
    inputs, x = _face_input(cfg)
    for filters in (64, 128, 256):
        x = _conv_bn_relu(x, cfg.units(filters), use_bias=True, bn=TORCH_BN)
        x = _conv_bn_relu(x, cfg.units(filters), use_bias=True, bn=TORCH_BN)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(cfg.rate(0.25))(x)
    x = layers.Flatten()(x)
    for units in (512, 256):
        x = _dense_bn_relu(x, cfg.units(units), use_bias=True, bn=TORCH_BN)
        x = layers.Dropout(cfg.rate(0.5))(x)
    return keras.Model(inputs, _head(x, cfg), name="seed004")


def build_ferflow_vgg(cfg: ArchConfig) -> keras.Model:
    """Project net: four VGG stages of two conv-BN-ReLU 64-128-256-512, pool each; GAP; Dense 256.

    Max-pool after each stage, global average pooling and one BN'd dense layer. GAP instead
    of a big Flatten->Dense keeps parameters low and works with random crops."""
    inputs, x = _face_input(cfg)
    for filters in (64, 128, 256, 512):
        x = _conv_bn_relu(x, cfg.units(filters))
        x = _conv_bn_relu(x, cfg.units(filters))
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(cfg.rate(0.1))(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = _dense_bn_relu(x, cfg.units(256))
    x = layers.Dropout(cfg.rate(0.4))(x)
    return keras.Model(inputs, _head(x, cfg), name="ferflow_vgg")


def build_ferflow_tiny(cfg: ArchConfig) -> keras.Model:
    """A tiny net (16-32-64 filters, GAP) for tests and fast smoke runs."""
    inputs, x = _face_input(cfg)
    for filters in (16, 32, 64):
        x = _conv_bn_relu(x, cfg.units(filters))
        x = layers.MaxPooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(cfg.rate(0.2))(x)
    return keras.Model(inputs, _head(x, cfg), name="ferflow_tiny")


REGISTRY: dict[str, Callable[[ArchConfig], keras.Model]] = {
    "seed000": build_seed000,
    "seed001": build_seed001,
    "seed003": build_seed003,
    "seed004": build_seed004,
    "ferflow_vgg": build_ferflow_vgg,
    "ferflow_tiny": build_ferflow_tiny,
}
assert tuple(REGISTRY) == ARCH_NAMES, "params.ARCH_NAMES must list the registry"


def build_model(
    arch: str, num_classes: int, width: float = 1.0, dropout_scale: float = 1.0, crop_size: int = INPUT_SHAPE[0]
) -> keras.Model:
    if arch not in REGISTRY:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(REGISTRY)}")
    try:
        return REGISTRY[arch](ArchConfig(num_classes, width, dropout_scale, crop_size))
    except ValueError as err:
        if crop_size >= INPUT_SHAPE[0]:
            raise
        # valid convs and pools shrink the map: a small crop can leave nothing for later layers
        raise ValueError(f"train.crop_size {crop_size} is too small for arch {arch!r}: {err}") from err


def flops_per_image(model: keras.Model) -> int:
    """Multiply-adds x2 of the conv and dense layers for one image (the usual FLOPs count)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            out_h, out_w, out_c = layer.output.shape[1:]
            k_h, k_w = layer.kernel_size
            in_c = layer.input.shape[-1]
            total += 2 * out_h * out_w * out_c * k_h * k_w * in_c
        elif isinstance(layer, layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)


def describe_models(num_classes: int = 7) -> list[dict[str, object]]:
    """Name, parameter count and FLOPs per image of every registered architecture."""
    rows = []
    for name, builder in REGISTRY.items():
        model = builder(ArchConfig(num_classes))
        rows.append(
            {
                "arch": name,
                "params": int(model.count_params()),
                "mflops_per_image": round(flops_per_image(model) / 1e6, 1),
                "description": (builder.__doc__ or "").strip().splitlines()[0],
            }
        )
    return rows
