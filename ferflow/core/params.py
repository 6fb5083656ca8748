"""The one params model (pydantic), validated once before any stage does work.

`Params` has one section model per params.yaml section (data, train, evaluate, export,
serve); every key has a type, a range or a set of allowed values and a default, and
unknown keys are refused. A bad value raises `ParamsError`, one line naming the dotted
key, the value and what is allowed (with a did-you-mean for typos). The exported
model's serve_config.json is validated by the same `ServeParams`.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ferflow.core.classes import FER_CLASSES
from ferflow.core.errors import short_repr

ArchName = Literal["seed000", "seed001", "seed003", "seed004", "ferflow_vgg", "ferflow_tiny"]
Optimizer = Literal["adam", "adamw", "sgd"]
LrSchedule = Literal["plateau", "cosine", "constant"]
Precision = Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
DedupPolicy = Literal["keep", "drop_cross_split"]
TtaMode = Literal["none", "flip", "tencrop"]
FaceDetector = Literal["yunet", "haar", "mtcnn"]
ServeRuntime = Literal["onnx", "keras"]
Distribution = Literal["none", "data_parallel"]
WeightAverage = Literal["none", "ema"]

ARCH_NAMES: tuple[str, ...] = typing.get_args(ArchName)
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)
LR_SCHEDULES: tuple[str, ...] = typing.get_args(LrSchedule)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
DEDUP_POLICIES: tuple[str, ...] = typing.get_args(DedupPolicy)
TTA_MODES: tuple[str, ...] = typing.get_args(TtaMode)
FACE_DETECTORS: tuple[str, ...] = typing.get_args(FaceDetector)
DISTRIBUTIONS: tuple[str, ...] = typing.get_args(Distribution)
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


class ParamsError(ValueError):
    """A params problem, with the dotted key, the value and what is allowed."""


# Upper bounds: a value past them is a typo or an attack (`epochs: 1000000000`,
# `batch_size: 1e11`, `width: 1e6`) that would only fail later, out of memory or time.
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_COUNT = 10_000_000


def _int(default: int, ge: int | None = None, le: int | None = None) -> Any:
    allowed = "an integer" + (f" >= {ge}" if ge is not None else "") + (f" and <= {le}" if le is not None else "")
    return Field(default, ge=ge, le=le, description=allowed)


def _float(default: float, allowed: str, **bounds: float) -> Any:
    # finite only: `.inf` passes `gt=0` and then overflows or never converges
    return Field(default, description=allowed + " (finite)", allow_inf_nan=False, **bounds)


def _bool(default: bool) -> Any:
    return Field(default, description="true or false")


class _Section(BaseModel):
    # strict: 2.5 or True is not an epoch count, "yes" is not a bool (an int still counts as a float)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_take_defaults(cls, raw: Any) -> Any:
        # an empty YAML section (`augment:`) is null: it means "all defaults", not "not a mapping"
        if not isinstance(raw, Mapping):
            return raw
        return {k: {} if v is None and _is_section(cls.model_fields.get(k)) else v for k, v in raw.items()}


def _is_section(field: Any) -> bool:
    return field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


class SyntheticParams(_Section):
    train_per_class: int = _int(500, 1, 1_000_000)
    test_per_class: int = _int(100, 1, 1_000_000)


class DataParams(_Section):
    # an empty path would be the repo root
    # no leading/trailing space: 'synthetic ' was taken for a path and failed much later
    source: Annotated[str, Field(pattern=r"^\S(.*\S)?$")] = Field(
        "synthetic", description="'synthetic' or a non-empty path to a folder, .zip or .csv, without leading or trailing spaces"
    )
    follow_symlinks: bool = Field(
        False, description="true or false (true: folder sources may follow links that leave data.source)"
    )
    synthetic: SyntheticParams = SyntheticParams()
    classes: list[str] = Field(list(FER_CLASSES), description="a non-empty list of distinct names from " + ", ".join(FER_CLASSES))
    class_map: dict[str, str] = Field({}, description="a mapping of folder name -> one of " + ", ".join(FER_CLASSES))
    # checked by `_caps`: a union type would report one error per member instead of one line
    max_per_class: Any = Field(
        None,
        description="null, an integer >= 1 and <= 10000000, or a mapping of split (train/val/test) -> such an integer or null",
    )
    val_fraction: float = _float(0.1, "a number strictly between 0 and 1", gt=0, lt=1)
    dedup: DedupPolicy = "drop_cross_split"
    max_reject_fraction: float = _float(0.01, "a number between 0 and 1", ge=0, le=1)
    seed: int = _int(42, 0, MAX_SEED)

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value) or not set(value) <= set(FER_CLASSES):
            raise ValueError("not a non-empty list of distinct FER class names")
        return value

    @field_validator("class_map")
    @classmethod
    def _class_map(cls, value: dict[str, str]) -> dict[str, str]:
        if not set(value.values()) <= set(FER_CLASSES):
            raise ValueError("maps to an unknown class")
        return value

    @field_validator("max_per_class")
    @classmethod
    def _caps(cls, value: Any) -> Any:
        def is_cap(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_COUNT

        if value is None or is_cap(value):
            return value
        if isinstance(value, dict) and all(k in SPLIT_NAMES and (v is None or is_cap(v)) for k, v in value.items()):
            return value
        raise ValueError("not a cap")

    def split_caps(self) -> dict[str, int | None]:
        """`max_per_class` per split: one number for every split, or {split: cap} (others uncapped)."""
        if isinstance(self.max_per_class, dict):
            return {split: self.max_per_class.get(split) for split in SPLIT_NAMES}
        return dict.fromkeys(SPLIT_NAMES, self.max_per_class)


class AugmentParams(_Section):
    flip: bool = _bool(False)
    shift: float = _float(0.0, "a fraction of the image size in [0, 0.5)", ge=0, lt=0.5)
    rotation: float = _float(0.0, "a fraction of a full turn in [0, 0.5)", ge=0, lt=0.5)
    zoom: float = _float(0.0, "a fraction in [0, 0.5)", ge=0, lt=0.5)
    erasing: float = _float(0.0, "a probability in [0, 1]", ge=0, le=1)


class TrainParams(_Section):
    arch: ArchName = "seed001"
    width: float = _float(1.0, "a number > 0 and <= 16 (multiplies every conv/dense width)", gt=0, le=16)
    # the largest base dropout rate of the seeds is 0.5: a scale of 2 makes a rate of 1
    dropout_scale: float = _float(
        1.0, "a number >= 0 and < 2 (multiplies every dropout rate; 2 or more makes a dropout rate >= 1)", ge=0, lt=2
    )
    # < 48: the net sees the centre crop (random crops with augment.shift; TTA tencrop)
    crop_size: int = _int(48, 16, 48)
    epochs: int = _int(15, 1, MAX_EPOCHS)
    batch_size: int = _int(64, 1, MAX_BATCH)
    optimizer: Optimizer = "adam"
    learning_rate: float = _float(0.001, "a number > 0 and <= 10", gt=0, le=10)
    momentum: float = _float(0.9, "a number in [0, 1)", ge=0, lt=1)
    weight_decay: float = _float(0.0, "a number >= 0 and <= 1", ge=0, le=1)
    label_smoothing: float = _float(0.0, "a number in [0, 1)", ge=0, lt=1)
    class_weight: bool = _bool(False)
    lr_schedule: LrSchedule = "plateau"
    reduce_lr_factor: float = _float(0.5, "a number strictly between 0 and 1", gt=0, lt=1)
    reduce_lr_patience: int = _int(3, 0, MAX_EPOCHS)
    min_learning_rate: float = _float(1e-6, "a number >= 0 and <= 10", ge=0, le=10)
    early_stopping_patience: int = _int(6, 0, MAX_EPOCHS)
    # val_loss of the first epochs is noisy while BatchNorm statistics settle
    early_stopping_start_epoch: int = _int(5, 0, MAX_EPOCHS)
    mixed_precision: Precision = "auto"
    distribution: Distribution = "none"
    # ema: the optimizer keeps an exponential moving average of the weights (Keras `use_ema`);
    # training then keeps whichever of it and the best checkpoint has the lower val_loss
    weight_average: WeightAverage = "none"
    ema_decay: float = _float(0.999, "a number strictly between 0 and 1 (the EMA momentum per step)", gt=0, lt=1)
    # distillation: a soft-label file (.npz of a teacher's train-split probabilities, `ferflow soft-labels`)
    teacher: str | None = None
    distill_temperature: float = _float(4.0, "a number >= 1 and <= 20", ge=1, le=20)
    distill_weight: float = _float(0.5, "a number in [0, 1] (share of the teacher in the targets)", ge=0, le=1)
    augment: AugmentParams = AugmentParams()
    deterministic: bool = _bool(True)
    seed: int = _int(42, 0, MAX_SEED)


class EvaluateParams(_Section):
    tta: TtaMode = "none"
    batch_size: int = _int(256, 1, MAX_BATCH)


class ExportParams(_Section):
    registered_model_name: Annotated[str, Field(pattern=r"\S")] = Field("ferflow-emotion", description="a non-empty string")
    force_champion: bool = _bool(False)
    # also quantize the ONNX network (int8, calibrated on training images); shipped only when its
    # validation accuracy is within 0.5 points of the float network's (ferflow/serving/int8.py)
    int8: bool = _bool(False)


class ServeParams(_Section):
    detect_face: bool = _bool(True)
    tta: TtaMode = "none"
    max_image_bytes: int = _int(10_000_000, 1, 1_000_000_000)
    max_image_pixels: int = _int(25_000_000, 2304, 1_000_000_000)
    min_image_side: int = _int(16, 1, 4096)
    # what one request may cost: images (rows) and decoded pixels summed over them
    max_images_per_request: int = _int(256, 1, 1_000_000)
    # at least one 48x48 face crop: a smaller limit refuses every request (issue #30)
    max_request_pixels: int = _int(50_000_000, 2304, 10_000_000_000)
    # the model work of a request: rows it classifies (faces with faces=all) x TTA views
    # (1, 2 for flip, 10 for tencrop); 2560 = 256 images x tencrop
    max_request_model_inputs: int = _int(2560, 1, 10_000_000)
    # pixels the face detector scans, summed over the request (each image scaled to <= 480 px)
    max_request_detect_pixels: int = _int(30_000_000, 2304, 10_000_000_000)
    # server-side deadline: work past it stops with HTTP 504 (below MLflow's 60 s scoring timeout)
    request_timeout_s: float = _float(30.0, "seconds in [0.1, 3600]", ge=0.1, le=3600)
    face_margin: float = _float(0.05, "a fraction of the face size in [0, 1]", ge=0, le=1)
    face_detector: FaceDetector = "yunet"
    # onnx: onnxruntime, no TensorFlow in the served process (Keras when the export has no
    # usable ONNX file); keras: the .keras file on TensorFlow
    runtime: ServeRuntime = "onnx"

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> ServeParams:
        """An exported serve_config.json: keys this version does not know (a newer export's) are
        skipped; the known ones are checked like params.yaml's `serve` section."""
        if not isinstance(raw, Mapping):
            raise ParamsError(f"invalid serve config: expected a mapping of serve keys, got {raw!r}")
        known = {k: v for k, v in raw.items() if k in cls.model_fields}
        try:
            return cls.model_validate(known)
        except ValidationError as exc:
            dotted, value, allowed, hint = _explain(exc, {"serve": known}, prefix=("serve",))
            raise ParamsError(
                f"invalid serve config: {dotted} = {short_repr(value)} is not allowed: expected {allowed}.{hint}"
            ) from None


class Params(_Section):
    data: DataParams = DataParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    serve: ServeParams = ServeParams()


# ---------------------------------------------------------------- one-line messages


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _allowed(field: Any) -> tuple[str, tuple[str, ...]]:
    choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is Literal else ()
    return (field.description or ("one of " + ", ".join(choices))), choices


def _explain(exc: ValidationError, raw: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> tuple[str, Any, str, str]:
    """(dotted key, its value, what is allowed, did-you-mean) of the error to report."""
    errors = exc.errors()
    # a misspelt key first: its misplaced value may also make a later key look wrong
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = prefix + tuple(str(part) for part in error["loc"])
    # from the top (Params) or, for an export's serve config, from its section model
    model: type[BaseModel] = ServeParams if prefix else Params
    value: Any = raw[prefix[0]] if prefix else raw
    path = list(prefix)
    for part in loc[len(prefix) :]:
        if part not in model.model_fields:  # an unknown key (extra_forbidden)
            known = list(model.model_fields)
            dotted = ".".join([*path, part])
            raise ParamsError(f"unknown key `{dotted}`.{_did_you_mean(part, known)} Known keys here: {', '.join(known)}")
        field = model.model_fields[part]
        path.append(part)
        value = value.get(part) if isinstance(value, Mapping) else None
        if _is_section(field):
            if not isinstance(value, Mapping):
                raise ParamsError(f"`{'.'.join(path)}` must be a mapping, got {short_repr(value)}")
            model = field.annotation
            continue
        if field.annotation is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # the value as the model holds it
        allowed, choices = _allowed(field)
        hint = _did_you_mean(value, list(choices)) if choices and isinstance(value, str) else ""
        return ".".join(path), value, allowed, hint
    raise ParamsError(f"`{'.'.join(path) or '<top level>'}` must be a mapping, got {short_repr(value)}")


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """The typed params of a raw mapping, defaults filled in. Raises ParamsError (one line)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{source}: `<top level>` must be a mapping, got {short_repr(raw)}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        try:
            dotted, value, allowed, hint = _explain(exc, raw)
        except ParamsError as structural:
            raise ParamsError(f"{source}: {structural}") from None
        raise ParamsError(f"{source}: `{dotted}` = {short_repr(value)} is not allowed: expected {allowed}.{hint}") from None


def read_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Read and validate a params file (all sections, so a typo anywhere stops any stage)."""
    path = Path(path)
    try:
        data = path.read_bytes() if path.is_file() or not path.exists() else None
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    if data is None:  # a FIFO or a device would block or never end
        raise ParamsError(f"{path}: not a regular file (expected a params YAML file)")
    if len(data) > MAX_PARAMS_BYTES:
        raise ParamsError(f"{path}: {len(data)} bytes, over the limit of {MAX_PARAMS_BYTES} for a params file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    return parse_params(parse_yaml(text, str(path)), str(path))


MAX_PARAMS_BYTES = 1_000_000


class _ParamsLoader(yaml.SafeLoader):
    """SafeLoader without aliases (a 1 KB alias bomb expands to gigabytes) and without
    duplicate keys (DVC refuses them; YAML would silently keep the last)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not allowed in params files", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short_repr(key)} (each key once)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str = "params.yaml") -> Any:
    """YAML text -> data, aliases and duplicate keys refused; ParamsError (one line) naming `source`."""
    try:
        return yaml.load(text, Loader=_ParamsLoader)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{source}: not valid YAML: {' '.join(str(exc).split())[:500]}") from None


# Plain-dict views, for what serializes params (MLflow params, preset overrides, JSON).


def validate_params(raw: Any, source: str = "params.yaml") -> dict[str, Any]:
    """Validate a whole params mapping, filling defaults; the result as plain data."""
    return parse_params(raw, source).model_dump()


def load_params(path: str | os.PathLike[str] = "params.yaml") -> dict[str, Any]:
    return read_params(path).model_dump()


def flatten(params: Mapping[str, Any] | BaseModel, prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 3}} -> {'train.epochs': 3} (models or plain mappings, at any level);
    lists, class_map and max_per_class stay whole."""
    if isinstance(params, BaseModel):
        params = params.model_dump()
    flat: dict[str, Any] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, Mapping) and key not in ("class_map", "max_per_class"):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
