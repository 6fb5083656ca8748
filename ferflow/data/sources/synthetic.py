"""Synthetic FER-style faces: a real (if easy) learning task that needs no download.

Each class has its own facial geometry (mouth curvature and opening, brow angle and
height, eye opening, nose wrinkle, asymmetry); every image then gets nuisance
variation (position, scale, rotation, lighting gradient, contrast, noise, blur,
occluders). The nuisance moves the features by several pixels, so a linear model on
raw pixels cannot line them up, while a small CNN learns them easily.
Everything is drawn from `numpy.random.default_rng(seed)`: same seed, same images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ferflow.core.classes import FER_CLASSES
from ferflow.data.preprocessing import IMAGE_SIZE
from ferflow.data.sources.base import Source, SourceItem

CANVAS = 96  # drawn at 2x then downsampled, for anti-aliased strokes


@dataclass(frozen=True)
class Expression:
    """Class-specific geometry, each a (mean, spread) drawn per image."""

    mouth_curve: tuple[float, float]  # + smile, - frown (pixels of sag at canvas scale)
    mouth_open: tuple[float, float]  # vertical opening
    mouth_width: tuple[float, float]
    brow_tilt: tuple[float, float]  # + inner ends down (angry), - inner ends up (sad/fear)
    brow_raise: tuple[float, float]  # distance above the eyes
    eye_open: tuple[float, float]  # eye height
    nose_wrinkle: tuple[float, float]  # probability-like strength of wrinkle lines
    asymmetry: tuple[float, float]  # one mouth corner raised (disgust)


EXPRESSIONS: dict[str, Expression] = {
    "angry": Expression((-2, 1.5), (0.5, 0.5), (16, 2), (7, 1.5), (5, 1), (3.5, 0.8), (0.3, 0.2), (0, 0.5)),
    "disgust": Expression((-1, 1.5), (1.5, 0.8), (14, 2), (3, 1.5), (6, 1), (3, 0.8), (1.0, 0.2), (6, 1.5)),
    "fear": Expression((-1, 1.5), (5, 1.2), (20, 2), (-5, 1.5), (12, 1.5), (7, 1), (0, 0.1), (0, 0.5)),
    "happy": Expression((8, 2), (2, 1.5), (22, 2.5), (0, 1.2), (8, 1), (4.5, 0.8), (0, 0.1), (0, 0.5)),
    "neutral": Expression((0, 0.8), (0.5, 0.5), (16, 2), (0, 1), (8, 1), (5, 0.8), (0, 0.1), (0, 0.5)),
    "sad": Expression((-7, 1.8), (0.5, 0.5), (16, 2), (-6, 1.5), (7, 1), (4, 0.8), (0, 0.1), (0, 0.5)),
    "surprise": Expression((0, 1.5), (12, 2), (12, 2), (0, 1.2), (14, 1.5), (8, 1), (0, 0.1), (0, 0.5)),
}


def _draw(rng: np.random.Generator, expr: Expression) -> Image.Image:
    """Draw one face on a CANVAS x CANVAS grayscale image."""

    def g(pair: tuple[float, float]) -> float:
        return float(rng.normal(pair[0], pair[1]))

    bg = int(rng.integers(30, 200))
    img = Image.new("L", (CANVAS, CANVAS), bg)
    d = ImageDraw.Draw(img)
    cx, cy = CANVAS / 2, CANVAS / 2
    skin = int(np.clip(bg + rng.choice([-1, 1]) * rng.integers(40, 90), 20, 235))
    feature = (
        int(np.clip(skin - rng.integers(70, 130), 0, 255)) if skin > 110 else int(np.clip(skin + rng.integers(70, 120), 0, 255))
    )
    face_w, face_h = rng.uniform(30, 38), rng.uniform(38, 46)
    d.ellipse([cx - face_w, cy - face_h, cx + face_w, cy + face_h], fill=skin)

    eye_y, eye_dx = cy - rng.uniform(8, 12), rng.uniform(12, 16)
    eye_w, eye_h = rng.uniform(5, 7), max(1.0, g(expr.eye_open))
    for side in (-1, 1):
        ex = cx + side * eye_dx
        d.ellipse([ex - eye_w, eye_y - eye_h, ex + eye_w, eye_y + eye_h], fill=feature)
        # brows: the inner end (towards the nose) moves by brow_tilt
        tilt, raise_ = g(expr.brow_tilt), g(expr.brow_raise)
        outer = (ex + side * 9, eye_y - raise_ - eye_h)
        inner = (ex - side * 8, eye_y - raise_ - eye_h + tilt)
        d.line([outer, inner], fill=feature, width=3)

    nose_y = cy + rng.uniform(2, 6)
    d.line([(cx, eye_y + 4), (cx - 2, nose_y), (cx + 2, nose_y)], fill=feature, width=2)
    wrinkle = g(expr.nose_wrinkle)
    if wrinkle > 0.5:
        for k in (-1, 1):
            d.line([(cx + k * 4, eye_y + 6), (cx + k * 7, eye_y + 2)], fill=feature, width=2)

    mouth_y = cy + rng.uniform(16, 21)
    half_w = max(4.0, g(expr.mouth_width) / 2)
    curve, opening, asym = g(expr.mouth_curve), max(0.0, g(expr.mouth_open)), g(expr.asymmetry)
    # a quadratic arc: corners at +-half_w rise by `curve` relative to the centre
    xs = np.linspace(-half_w, half_w, 24)
    tilt_line = asym * xs / half_w / 2
    upper = [(cx + x, mouth_y - curve * (x / half_w) ** 2 + curve / 2 - t) for x, t in zip(xs, tilt_line)]
    if opening > 1.5:
        lower = [(x, y + opening * (1 - (dx / half_w) ** 2)) for (x, y), dx in zip(upper, xs)]
        d.polygon(upper + lower[::-1], fill=feature)
    else:
        d.line(upper, fill=feature, width=3)
    return img


def _nuisance(rng: np.random.Generator, img: Image.Image) -> np.ndarray:
    """Pose, lighting, occlusion and sensor noise, ending at IMAGE_SIZE uint8."""
    angle = rng.uniform(-12, 12)
    scale = rng.uniform(0.85, 1.12)
    shift = rng.uniform(-7, 7, size=2)
    # affine maps output->input coordinates: rotate+scale about the centre, then shift
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    c = CANVAS / 2
    coeffs = (cos, sin, c - cos * c - sin * c - shift[0], -sin, cos, c + sin * c - cos * c - shift[1])
    fill = int(np.asarray(img)[0, 0])
    img = img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.6)))
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32)
    # lighting: a random linear gradient plus contrast/brightness change
    gy, gx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE - 0.5
    direction = rng.uniform(0, 2 * math.pi)
    x = x + rng.uniform(0, 60) * (gx * math.cos(direction) + gy * math.sin(direction))
    x = (x - x.mean()) * rng.uniform(0.6, 1.3) + x.mean() + rng.uniform(-25, 25)
    if rng.random() < 0.35:  # occluder: a hand, hair or glasses-like block
        w, h = rng.integers(6, 18, size=2)
        x0, y0 = rng.integers(0, IMAGE_SIZE - w), rng.integers(0, IMAGE_SIZE - h)
        x[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255)
    x = x + rng.normal(0, rng.uniform(2, 10), size=x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def generate_face(rng: np.random.Generator, class_name: str) -> np.ndarray:
    """One 48x48 uint8 grayscale face of `class_name`."""
    return _nuisance(rng, _draw(rng, EXPRESSIONS[class_name]))


def generate_split(
    split: str, per_class: int, seed: int, classes: tuple[str, ...] | list[str] = FER_CLASSES
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield (class_name, index, pixels) for `per_class` faces of each class.

    Each (split, class) pair has its own stream derived from `seed`, so changing one
    count or class subset never changes the other images.
    """
    split_key = {"train": 0, "val": 1, "test": 2}[split]
    for class_name in classes:
        class_key = FER_CLASSES.index(class_name)
        rng = np.random.default_rng([seed, split_key, class_key])
        for i in range(per_class):
            yield class_name, i, generate_face(rng, class_name)


class SyntheticSource(Source):
    kind = "synthetic"

    def __init__(self, train_per_class: int, test_per_class: int, seed: int, classes: list[str]):
        self.counts = {"train": train_per_class, "test": test_per_class}
        self.seed = seed
        self.classes = list(classes)

    def items(self) -> Iterator[SourceItem]:
        for split, per_class in self.counts.items():
            for class_name, index, pixels in generate_split(split, per_class, self.seed, self.classes):
                yield SourceItem(split, class_name, f"synthetic:{split}/{class_name}/{index}", lambda p=pixels: p)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed, **{f"{k}_per_class": v for k, v in self.counts.items()}}
