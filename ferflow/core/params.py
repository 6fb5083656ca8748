"""The one schema for params.yaml, validated once before any stage does work.

Every key has a type, a range or a set of allowed values and a default. An unknown
key, a wrong type or an out-of-range value raises `ParamsError` naming the dotted
key, the value and what is allowed (with a did-you-mean for typos).
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ferflow.core.classes import FER_CLASSES

ARCH_NAMES: tuple[str, ...] = ("seed000", "seed001", "seed003", "seed004", "ferflow_vgg", "ferflow_tiny")
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
LR_SCHEDULES: tuple[str, ...] = ("plateau", "cosine", "constant")
PRECISIONS: tuple[str, ...] = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
DEDUP_POLICIES: tuple[str, ...] = ("keep", "drop_cross_split")
TTA_MODES: tuple[str, ...] = ("none", "flip", "tencrop")
DISTRIBUTIONS: tuple[str, ...] = ("none", "data_parallel")


class ParamsError(ValueError):
    """A params.yaml problem, with the dotted key, the value and what is allowed."""


@dataclass(frozen=True)
class Field:
    """One leaf of the schema."""

    kind: str  # "int", "float", "bool", "str", "choice", "classes", "class_map", "caps"
    default: Any
    allowed: str = ""  # human description of the allowed values
    check: Callable[[Any], bool] | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False


@dataclass(frozen=True)
class Section:
    fields: Mapping[str, Field | Section] = field(default_factory=dict)


def _int(default: int, lo: int | None = None, hi: int | None = None, nullable: bool = False) -> Field:
    desc = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" and <= {hi}" if hi is not None else "")
    if nullable:
        desc += " or null"
    return Field(
        "int",
        default,
        desc,
        lambda v: (lo is None or v >= lo) and (hi is None or v <= hi),
        nullable=nullable,
    )


def _float(default: float, desc: str, check: Callable[[float], bool]) -> Field:
    return Field("float", default, desc, check)


def _choice(default: str, choices: tuple[str, ...]) -> Field:
    return Field("choice", default, "one of " + ", ".join(choices), choices=choices)


def _bool(default: bool) -> Field:
    return Field("bool", default, "true or false")


SCHEMA = Section(
    {
        "data": Section(
            {
                "source": Field("str", "synthetic", "'synthetic' or a path to a folder, .zip or .csv"),
                "synthetic": Section(
                    {
                        "train_per_class": _int(500, 1),
                        "test_per_class": _int(100, 1),
                    }
                ),
                "classes": Field(
                    "classes", list(FER_CLASSES), "a non-empty list of distinct names from " + ", ".join(FER_CLASSES)
                ),
                "class_map": Field("class_map", {}, "a mapping of folder name -> one of " + ", ".join(FER_CLASSES)),
                "max_per_class": Field(
                    "caps",
                    None,
                    "null, an integer >= 1, or a mapping of split (train/val/test) -> integer >= 1 or null",
                    nullable=True,
                ),
                "val_fraction": _float(0.1, "a number strictly between 0 and 1", lambda v: 0 < v < 1),
                "dedup": _choice("drop_cross_split", DEDUP_POLICIES),
                "max_reject_fraction": _float(0.01, "a number between 0 and 1", lambda v: 0 <= v <= 1),
                "seed": _int(42, 0),
            }
        ),
        "train": Section(
            {
                "arch": _choice("seed001", ARCH_NAMES),
                "width": _float(1.0, "a number > 0 (multiplies every conv/dense width)", lambda v: v > 0),
                "dropout_scale": _float(
                    1.0, "a number >= 0 (multiplies every dropout rate; result must stay < 1)", lambda v: 0 <= v
                ),
                # < 48: the net sees the centre crop (random crops with augment.shift; TTA tencrop)
                "crop_size": _int(48, 16, 48),
                "epochs": _int(15, 1),
                "batch_size": _int(64, 1),
                "optimizer": _choice("adam", OPTIMIZERS),
                "learning_rate": _float(0.001, "a number > 0", lambda v: v > 0),
                "momentum": _float(0.9, "a number in [0, 1)", lambda v: 0 <= v < 1),
                "weight_decay": _float(0.0, "a number >= 0", lambda v: v >= 0),
                "label_smoothing": _float(0.0, "a number in [0, 1)", lambda v: 0 <= v < 1),
                "class_weight": _bool(False),
                "lr_schedule": _choice("plateau", LR_SCHEDULES),
                "reduce_lr_factor": _float(0.5, "a number strictly between 0 and 1", lambda v: 0 < v < 1),
                "reduce_lr_patience": _int(3, 0),
                "min_learning_rate": _float(1e-6, "a number >= 0", lambda v: v >= 0),
                "early_stopping_patience": _int(6, 0),
                # val_loss of the first epochs is noisy while BatchNorm statistics settle
                "early_stopping_start_epoch": _int(5, 0),
                "mixed_precision": _choice("auto", PRECISIONS),
                # data_parallel: keras.distribution over all devices, JAX backend (docs/distributed.md)
                "distribution": _choice("none", DISTRIBUTIONS),
                "augment": Section(
                    {
                        "flip": _bool(False),
                        "shift": _float(0.0, "a fraction of the image size in [0, 0.5)", lambda v: 0 <= v < 0.5),
                        "rotation": _float(0.0, "a fraction of a full turn in [0, 0.5)", lambda v: 0 <= v < 0.5),
                        "zoom": _float(0.0, "a fraction in [0, 0.5)", lambda v: 0 <= v < 0.5),
                        "erasing": _float(0.0, "a probability in [0, 1]", lambda v: 0 <= v <= 1),
                    }
                ),
                "deterministic": _bool(True),
                "seed": _int(42, 0),
            }
        ),
        "evaluate": Section(
            {
                "tta": _choice("none", TTA_MODES),
                "batch_size": _int(256, 1),
            }
        ),
        "export": Section(
            {
                "registered_model_name": Field("str", "ferflow-emotion", "a non-empty string", lambda v: bool(v.strip())),
                "force_champion": _bool(False),
            }
        ),
        "serve": Section(
            {
                "detect_face": _bool(True),
                "tta": _choice("none", TTA_MODES),
                "max_image_bytes": _int(10_000_000, 1),
                "max_image_pixels": _int(25_000_000, 1),
                "min_image_side": _int(16, 1),
                "face_margin": _float(0.05, "a fraction of the face size in [0, 1]", lambda v: 0 <= v <= 1),
            }
        ),
    }
)


def _type_ok(spec: Field, value: Any) -> bool:
    if value is None:
        return spec.nullable
    if spec.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec.kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.kind == "bool":
        return isinstance(value, bool)
    if spec.kind in ("str", "choice"):
        return isinstance(value, str)
    if spec.kind == "classes":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if spec.kind == "class_map":
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if spec.kind == "caps":
        return _is_cap(value) or isinstance(value, dict)
    raise AssertionError(spec.kind)


def _is_cap(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _value_ok(spec: Field, value: Any) -> bool:
    if value is None:
        return True
    if spec.kind == "choice":
        return value in spec.choices
    if spec.kind == "classes":
        return bool(value) and len(set(value)) == len(value) and all(v in FER_CLASSES for v in value)
    if spec.kind == "class_map":
        return all(v in FER_CLASSES for v in value.values())
    if spec.kind == "caps" and isinstance(value, dict):
        return all(k in ("train", "val", "test") and (v is None or _is_cap(v)) for k, v in value.items())
    if spec.kind == "caps":
        return _is_cap(value)
    return spec.check is None or spec.check(value)


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _validate(section: Section, raw: Any, prefix: str, source: str) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: `{prefix.rstrip('.') or '<top level>'}` must be a mapping, got {raw!r}")
    known = list(section.fields)
    for key in raw:
        if key not in section.fields:
            raise ParamsError(
                f"{source}: unknown key `{prefix}{key}`.{_did_you_mean(str(key), known)} Known keys here: {', '.join(known)}"
            )
    out: dict[str, Any] = {}
    for key, spec in section.fields.items():
        dotted = prefix + key
        if isinstance(spec, Section):
            out[key] = _validate(spec, raw.get(key), dotted + ".", source)
            continue
        value = copy.deepcopy(raw.get(key, spec.default))
        if spec.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(spec, value) or not _value_ok(spec, value):
            hint = _did_you_mean(value, list(spec.choices)) if spec.kind == "choice" and isinstance(value, str) else ""
            raise ParamsError(f"{source}: `{dotted}` = {value!r} is not allowed: expected {spec.allowed}.{hint}")
        out[key] = value
    return out


def validate_params(raw: Any, source: str = "params.yaml") -> dict[str, Any]:
    """Validate a whole params mapping, filling defaults. Raises ParamsError."""
    params = _validate(SCHEMA, raw, "", source)
    drop = params["train"]["dropout_scale"]
    if drop * 0.5 >= 1:  # the largest seed dropout is 0.5
        raise ParamsError(
            f"{source}: `train.dropout_scale` = {drop!r} makes a dropout rate >= 1 (largest base rate is 0.5): "
            "expected a number < 2"
        )
    return params


def default_params() -> dict[str, Any]:
    return validate_params({})


def load_params(path: str | os.PathLike[str] = "params.yaml") -> dict[str, Any]:
    """Read and validate params.yaml (all sections, so a typo anywhere stops any stage)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return validate_params(raw, str(path))


def load_section(section: str, path: str | os.PathLike[str] = "params.yaml") -> dict[str, Any]:
    """The validated params of one section (what a stage is allowed to read)."""
    return load_params(path)[section]


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 3}} -> {'train.epochs': 3}; lists, class_map and max_per_class stay whole."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and key not in ("class_map", "max_per_class"):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
