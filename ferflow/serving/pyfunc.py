"""The exported MLflow pyfunc: encoded images or pixel tensors in, emotion probabilities out.

It wraps the network (ONNX on onnxruntime or Keras, `serve.runtime`; `serving.runtime`), the label map, the Haar face detector (`ferflow.serving.faces`) and
`preprocessing.prepare_batch` (the function the extract stage used), so callers send
ordinary images. Exported as MLflow "models from code": MLflow executes this file to
get the model object (see the end of the file), so nothing is pickled.

Input: one column `image` (signature type Any, because a value may be either kind):
  * encoded image bytes (PNG/JPEG/BMP/GIF/WebP, any size or mode); over REST as base64
    text, which this module decodes strictly so "not base64" is its own error;
  * or a pixel array per row: (48,48), (48,48,1) or (2304,); a bare tensor sent as
    `{"inputs": ...}` or `{"instances": ...}` lands in the same column as N rows.
  Pixel scale (request param `pixel_range`): "auto" (default) takes integers as 0..255
  and floats as 0..1; "0-255" or "0-1" say it explicitly (JSON writers that print 1.0
  as 1 make integers out of floats).
Request params (defaults from params.yaml `serve`): detect_face, tta, pixel_range, and
faces ("largest", the default: one row per image; "all": one row per detected face, with
column image_index naming the request row; an image without a face keeps its one row),
face_detector ("yunet", "haar" or "mtcnn"; one other than serve.face_detector loads on first use).
Output per row: label, confidence, one probability column per class, face_found and
face_x/face_y/face_w/face_h (the square that was classified, in input pixels). Encoded
images go through the Haar detector (`faces.FaceDetector`) unless detect_face is off or
they are smaller than faces.DETECT_MIN_SIDE (face crops already); pixel tensors are
taken as face crops. Without a detected face the centre square is classified and
face_found is false.
Bad input raises `RequestError` (an MlflowException, served as HTTP 400) naming the row,
the column and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import ctypes
import io
import json
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# `mlflow models serve` loads this module before TensorFlow: keep TensorFlow's C++ start-up
# notes (oneDNN, cpu_feature_guard) out of the server's log; warnings and errors still show
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED
from PIL import Image

from ferflow.core import files
from ferflow.core.errors import short_repr
from ferflow.core.params import FACE_DETECTORS, TTA_MODES, ServeParams
from ferflow.data.preprocessing import IMAGE_SIZE, ImageError, decode_image, normalize, prepare_batch
from ferflow.model.calibration import apply_temperature, read_temperature
from ferflow.model.tta import predict_proba, renormalize
from ferflow.serving.faces import BOX_COLUMNS, Box, FaceDetector, centre_square, make_detector
from ferflow.serving.mlflow_adapter import RequestError, check_params_first
from ferflow.serving.runtime import INFER_BATCH, load_predictor

INPUT_COLUMN = "image"
PIXEL_RANGES = ("auto", "0-255", "0-1")
FACES_MODES = ("largest", "all")  # request param `faces`: one row per image (default) or one per face
# After a request that decoded this many pixels or sent this many encoded bytes (or failed on
# the way), hand the freed memory back to the OS: glibc keeps it as high-water otherwise (RSS
# 0.8 -> 2.3 GB over a barrage of bad requests, never returned). FERFLOW_MALLOC_TRIM=0 turns it
# off (and leaves Arrow on its own allocator: `use_system_allocator_for_arrow`).
TRIM_MIN_PIXELS = 4_000_000
TRIM_MIN_BYTES = 4_000_000
TRIM_AGAIN_AFTER_S = 0.5
PARALLEL_MIN = 8  # decode + detect in a thread pool from this many images per request
_PIXEL_SHAPES = "(N,48,48), (N,48,48,1) or (N,2304)"


# params.yaml `serve`, as baked into the export: the one params model validates both


# ---------------------------------------------------------------- the request budget (issue #30)

# model inputs per classified row for each `tta` (evaluation.tta_views: the face; + mirror; 5 crops x 2)
TTA_VIEWS = {"none": 1, "flip": 2, "tencrop": 10}


class RequestTimeout(RequestError):
    """The request ran past serve.request_timeout_s and its work was stopped (HTTP 504)."""

    def __init__(self, message: str) -> None:
        MlflowException.__init__(self, message, error_code=DEADLINE_EXCEEDED)


class RequestBudget:
    """What one request may still cost: model inputs (rows x TTA views) and time.

    The images of a request are prepared by several threads: the first to go over the
    budget keeps its error here, and every other image raises the same one when it
    starts, so the pool stops working for a request that is already refused.
    """

    def __init__(self, cfg: ServeParams, tta: str, started: float | None = None) -> None:
        self.cfg, self.tta, self.views = cfg, tta, TTA_VIEWS[tta]
        self.deadline = (time.monotonic() if started is None else started) + cfg.request_timeout_s
        self.rows = 0
        self.error: RequestError | None = None
        self._lock = threading.Lock()

    def _fail(self, error: RequestError) -> None:
        with self._lock:
            self.error = self.error or error
        raise self.error

    def check(self) -> None:
        """Raise the request's error if it already failed, or the timeout once past the deadline."""
        if self.error is not None:
            raise self.error
        if time.monotonic() > self.deadline:
            self._fail(
                RequestTimeout(
                    f"request ran over {self.cfg.request_timeout_s:g} s (serve.request_timeout_s) and was stopped; "
                    "send fewer images or faces per request, or a lighter tta"
                )
            )

    def add_rows(self, n: int) -> None:
        """Count `n` more rows to classify; refuse the request once rows x views pass the limit."""
        with self._lock:
            self.rows += n
            rows = self.rows
        needed = rows * self.views
        if needed > self.cfg.max_request_model_inputs:
            self._fail(
                RequestError(
                    f"request needs at least {needed} model inputs ({rows} faces or rows x {self.views} views of "
                    f"tta={self.tta!r}), over the limit of {self.cfg.max_request_model_inputs} "
                    "(serve.max_request_model_inputs); send fewer images or faces per request, or a lighter tta"
                )
            )


def check_detect_pixels(sizes: Sequence[tuple[int, int]], cfg: ServeParams, detector: FaceDetector) -> None:
    """Refuse, before decoding, a request whose face detection would scan too many pixels."""
    total = sum(detector.detect_pixels(width, height) for width, height in sizes)
    if total > cfg.max_request_detect_pixels:
        raise RequestError(
            f"face detection would scan {total} pixels for this request, over the limit of "
            f"{cfg.max_request_detect_pixels} (serve.max_request_detect_pixels); send fewer or smaller images, "
            'or params {"detect_face": false} for face crops'
        )


class BudgetedPredictor:
    """A predictor that checks the request's deadline before each model batch."""

    def __init__(self, predictor: Any, budget: RequestBudget) -> None:
        self.predictor, self.budget = predictor, budget

    def __getattr__(self, name: str) -> Any:  # layers (tencrop reads the crop layer), output_shape...
        return getattr(self.predictor, name)

    def predict(self, x: np.ndarray, batch_size: int = INFER_BATCH, verbose: int = 0) -> np.ndarray:
        parts = []
        for i in range(0, max(len(x), 1), batch_size):
            self.budget.check()
            parts.append(np.asarray(self.predictor.predict(x[i : i + batch_size], batch_size=batch_size, verbose=verbose)))
        return np.concatenate(parts)


# ---------------------------------------------------------------- request parsing


def _is_encoded(value: Any) -> bool:
    return isinstance(value, (str, bytes, bytearray, memoryview))


def _is_pixels(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def decode_base64(text: str, row: int, max_bytes: int) -> bytes:
    """Strict base64 (standard alphabet, padded); whitespace and a data-URL prefix are allowed."""
    if text.startswith("data:") and ";base64," in text[:100]:
        text = text.split(",", 1)[1]
    # refuse by length before decoding: base64 text is 4/3 the size of its bytes
    if len(text) > 4 * math.ceil(max_bytes / 3) + len(text) // 76 * 2 + 4:
        raise RequestError(
            f"row {row}: column 'image' is about {len(text) * 3 // 4} bytes, over the limit of {max_bytes} (serve.max_image_bytes)"
        )
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(
            f"row {row}: column 'image' is not valid base64 ({exc}); expected the encoded image file "
            "(PNG/JPEG/BMP/WebP) as standard base64 text"
        ) from None


def image_bytes(value: Any, row: int, max_bytes: int) -> bytes:
    """Encoded image bytes from raw bytes or base64 text, size-checked."""
    data = decode_base64(value, row, max_bytes) if isinstance(value, str) else bytes(value)
    if len(data) > max_bytes:
        raise RequestError(
            f"row {row}: column 'image' is {len(data)} bytes, over the limit of {max_bytes} (serve.max_image_bytes)"
        )
    return data


def decode_request_image(value: Any, row: int, cfg: ServeParams) -> Image.Image:
    """One `image` value -> decoded PIL image within the configured limits, or RequestError."""
    data = image_bytes(value, row, cfg.max_image_bytes)
    try:
        img = decode_image(data, max_pixels=cfg.max_image_pixels)
    except ImageError as exc:
        raise RequestError(f"row {row}: column 'image': {exc}") from None
    width, height = img.size
    if min(width, height) < cfg.min_image_side:
        raise RequestError(
            f"row {row}: column 'image' is {width}x{height} pixels, below the minimum side of "
            f"{cfg.min_image_side} (serve.min_image_side); expected a photo or face crop"
        )
    return img


def pixels_to_batch(array: Any, pixel_range: str = "auto") -> np.ndarray:
    """Pixel tensor (N,48,48), (N,48,48,1) or (N,2304) -> model input float32 (N,48,48,1).

    `pixel_range` "auto": integer dtypes are 0..255, floating dtypes 0..1.
    """
    if pixel_range not in PIXEL_RANGES:
        raise RequestError(f"param 'pixel_range' = {pixel_range!r}: expected one of {', '.join(PIXEL_RANGES)}")
    try:
        array = np.asarray(array)
    except ValueError:  # ragged nested lists
        raise RequestError(f"pixel tensor is ragged (rows of different lengths); expected shape {_PIXEL_SHAPES}") from None
    if array.dtype == object:
        # Python ints past int64 (10**30) make an object array: out of range, not "mixed types"
        flat = array.ravel()
        if len(flat) and all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            raise RequestError(
                f"pixel values span {min(flat):g}..{max(flat):g}, outside 0-255 for integers; send integers 0..255 or floats 0..1"
            )
        raise RequestError(f"pixel tensor is ragged or mixes types; expected numbers in shape {_PIXEL_SHAPES}")
    if array.dtype.kind not in "iuf":
        raise RequestError(f"pixel tensor has dtype {array.dtype}: expected integers 0..255 or floats 0..1")
    shape = tuple(array.shape)
    if array.ndim == 2 and shape[1] == IMAGE_SIZE * IMAGE_SIZE:
        array = array.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    elif array.ndim == 4 and shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(array) == 0:
        hint = " (one image? wrap it in a list to make a batch of 1)" if shape == (IMAGE_SIZE, IMAGE_SIZE) else ""
        raise RequestError(f"pixel tensor has shape {shape}: expected {_PIXEL_SHAPES} with N >= 1{hint}")
    scale = pixel_range if pixel_range != "auto" else ("0-1" if array.dtype.kind == "f" else "0-255")
    lo, hi = (0.0, 1.0) if scale == "0-1" else (0.0, 255.0)
    if not np.isfinite(array).all():
        raise RequestError("pixel tensor contains NaN or infinity")
    amin, amax = float(array.min()), float(array.max())
    if amin < lo or amax > hi:
        kind = "floats" if array.dtype.kind == "f" else "integers"
        raise RequestError(
            f"pixel values span {amin:g}..{amax:g}, outside {scale} for {kind} (pixel_range={pixel_range!r}); "
            'send integers 0..255 or floats 0..1, or set params {"pixel_range": "0-255"} or "0-1"'
        )
    if scale == "0-255":
        return normalize(np.rint(array).astype(np.uint8))
    return array.astype(np.float32)[..., np.newaxis]


def _column_values(model_input: Any) -> list[Any] | np.ndarray:
    """The `image` values of a request: DataFrame column, dict entry, or a bare tensor."""
    if isinstance(model_input, pd.DataFrame):
        if len(model_input) == 0:
            # `{"dataframe_records": []}`, or rows whose columns MLflow's schema step dropped:
            # both reach the model as a frame with no rows and no columns
            raise RequestError(
                "no rows with column 'image' in the request: "
                'expected rows like {"image": "<base64 PNG/JPEG>"} or a pixel tensor as "inputs"/"instances"'
            )
        if INPUT_COLUMN not in model_input.columns:
            # MLflow's schema step drops unknown columns, so often there are none left to name
            got = f" (got columns {[str(c) for c in model_input.columns]})" if len(model_input.columns) else ""
            raise RequestError(
                f'missing column \'image\'{got}: expected rows like {{"image": "<base64 PNG/JPEG>"}} '
                'or a pixel tensor as "inputs"/"instances"'
            )
        return model_input[INPUT_COLUMN].tolist()
    if isinstance(model_input, Mapping):
        if INPUT_COLUMN not in model_input:
            raise RequestError(f"missing input 'image' (got {sorted(map(str, model_input))})")
        values = model_input[INPUT_COLUMN]
        return [values] if _is_encoded(values) else values
    if isinstance(model_input, (np.ndarray, list, tuple)):
        return model_input
    raise RequestError(f"unsupported input type {type(model_input).__name__}: expected a DataFrame with column 'image'")


# request param -> its allowed values (a bool param takes JSON true/false only)
REQUEST_PARAMS: dict[str, tuple[Any, ...]] = {
    "detect_face": (True, False),
    "tta": TTA_MODES,
    "pixel_range": PIXEL_RANGES,
    "faces": FACES_MODES,
    "face_detector": FACE_DETECTORS,
}


def _allowed_text(allowed: Sequence[Any]) -> str:
    return ", ".join(json.dumps(a) if isinstance(a, bool) else repr(a) for a in allowed)


def check_request_params(params: Any) -> None:
    """Every request param known and of an allowed value, else RequestError naming it.

    Also run ahead of MLflow's own params check when served (`check_params_first`),
    which drops unknown params with only a log warning and reports a bad type with a
    repr of the whole request."""
    if params is None:
        return
    if not isinstance(params, Mapping):
        raise RequestError(f"params is {short_repr(params)}: expected a JSON object of {', '.join(REQUEST_PARAMS)}")
    for name, value in params.items():
        if name not in REQUEST_PARAMS:
            raise RequestError(f"unknown param {short_repr(name)}: expected only {', '.join(REQUEST_PARAMS)}")
        allowed = REQUEST_PARAMS[name]
        # type as well as value: 1 == True and 0 == False in Python
        if value is not None and not any(type(value) is type(a) and value == a for a in allowed):
            raise RequestError(f"param {name!r} = {short_repr(value)}: expected one of {_allowed_text(allowed)}")


def _param(params: Mapping[str, Any] | None, name: str, default: Any, allowed: Sequence[Any]) -> Any:
    value = default if not params or params.get(name) is None else params[name]
    if value not in allowed or type(value) is not type(default):
        raise RequestError(f"param {name!r} = {short_repr(value)}: expected one of {_allowed_text(allowed)}")
    return value


# ---------------------------------------------------------------- the model


@dataclass
class Prepared:
    """Model input plus where each row's pixels came from."""

    batch: np.ndarray
    boxes: list[Box]
    face_found: list[bool]
    image_index: list[int] | None = None  # with faces="all": the request row each face came from


def _load_malloc_trim() -> Any:
    if os.environ.get("FERFLOW_MALLOC_TRIM", "1") == "0":
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def use_system_allocator_for_arrow() -> None:
    """pandas 3 keeps string columns (the request's base64 images) in Arrow buffers, whose
    default allocator (mimalloc) keeps freed pages per thread: +60-100 MB after one 30 MB body.
    On glibc's malloc they go back to the OS like the rest (see `release_freed_memory`)."""
    if _MALLOC_TRIM is None:
        return
    try:
        import pyarrow
    except ImportError:  # pandas then keeps strings as Python objects, on glibc's malloc already
        return
    pyarrow.set_memory_pool(pyarrow.system_memory_pool())


def release_freed_memory() -> None:
    """Return the heap pages freed by a large request to the OS (glibc only)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class EmotionModel(mlflow.pyfunc.PythonModel):
    """pyfunc: column `image` (encoded bytes/base64, or pixel arrays) -> emotion predictions."""

    def load_context(self, context: Any) -> None:
        check_params_first(check_request_params, set(REQUEST_PARAMS))
        use_system_allocator_for_arrow()  # the process serves requests: keep its memory returnable
        self.setup(
            context.artifacts["keras_model"],
            context.artifacts["label_map"],
            ServeParams.from_mapping(files.read_json(context.artifacts["serve_config"])),
            context.artifacts.get("onnx_model"),  # exports made before ONNX have none: Keras then
        )
        # fitted on validation by the evaluate stage; 1.0 (unchanged) for an export without one
        self.temperature = read_temperature(context.artifacts.get("calibration"))

    def setup(self, keras_model_path: str, label_map_json: str, config: ServeParams, onnx_model_path: str | None = None) -> None:
        """Load everything once (also usable without MLflow, e.g. in benchmarks)."""
        self.config, self.temperature = config, 1.0
        self.predictor = load_predictor(keras_model_path, onnx_model_path, config.runtime)
        with open(label_map_json, encoding="utf-8") as fh:
            self.classes = [str(c) for c in json.load(fh)["classes"]]
        n_out = self.predictor.n_classes
        if n_out != len(self.classes):
            raise ValueError(f"{label_map_json}: {len(self.classes)} classes but the model has {n_out} outputs")
        self.detector = make_detector(config.face_detector, config.face_margin)
        self._detectors = {self.detector.name: self.detector}
        self._detectors_lock = threading.Lock()
        workers = min(os.cpu_count() or 1, 4)
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ferflow-prep") if workers > 1 else None
        self._request = threading.local()  # pixels the current request decodes, per server thread
        self.predictor.warm_up()

    def prepare(self, model_input: Any, params: Mapping[str, Any] | None = None, budget: RequestBudget | None = None) -> Prepared:
        """Validate and preprocess a request (no model call) within `budget` (default: a new one)."""
        cfg = self.config
        check_request_params(params)
        if budget is None:
            budget = RequestBudget(cfg, _param(params, "tta", cfg.tta, TTA_MODES))
        every_face = _param(params, "faces", "largest", FACES_MODES) == "all"
        detector = self.detector_for(_param(params, "face_detector", cfg.face_detector, FACE_DETECTORS))
        detect = _param(params, "detect_face", cfg.detect_face, (True, False))
        pixel_range = _param(params, "pixel_range", "auto", PIXEL_RANGES)
        values, kind = _request_values(model_input, cfg)
        budget.add_rows(len(values))  # every image gives at least one row: refused here, before decoding
        if kind == "pixels":
            batch = pixels_to_batch(values, pixel_range)
            n = len(batch)
            return Prepared(batch, [Box(0, 0, IMAGE_SIZE, IMAGE_SIZE)] * n, [False] * n, list(range(n)) if every_face else None)
        values = self._within_pixel_limits(values, detector if detect else None)

        def one(item: tuple[int, Any]) -> tuple[np.ndarray, Box, bool]:
            budget.check()
            img = decode_request_image(item[1], item[0], cfg)
            crop, box, found = detector.locate(img) if detect else (img, centre_square(*img.size), False)
            # THE preprocessing, per image: only 48x48 pixels outlive this call, not a 25 MP photo
            return prepare_batch([crop])[0], box, found

        def every(item: tuple[int, Any]) -> list[tuple[np.ndarray, Box, bool]]:
            budget.check()
            located = detector.locate_all(decode_request_image(item[1], item[0], cfg)) if detect else []
            if not located:  # no face: the image still gets its one (whole-image) row, face_found false
                return [one(item)]
            budget.add_rows(len(located) - 1)  # its faces beyond the one row counted up front
            return [(pixels, box, True) for pixels, (_, box) in zip(prepare_batch([c for c, _ in located]), located)]

        items = list(enumerate(values))
        # PIL decoding and the cascade release the GIL: spread a batch over the cores.
        # map() yields in order, so the first bad row (by index) is the one reported.
        work = every if every_face else one
        mapped = list(self.pool.map(work, items)) if len(items) >= PARALLEL_MIN and self.pool else list(map(work, items))
        index = [i for i, faces in enumerate(mapped) for _ in faces] if every_face else None
        results = [r for faces in mapped for r in faces] if every_face else mapped
        batch = np.stack([r[0] for r in results]) if results else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
        return Prepared(batch, [r[1] for r in results], [r[2] for r in results], index)

    def _within_pixel_limits(self, values: list[Any], detector: FaceDetector | None) -> list[bytes]:
        """The images' bytes (base64 decoded once, here), after their decoded pixels are summed
        from the headers alone (100 blank 5000x5000 PNGs are a 3 MB body but 2.5 G pixels of
        work) and checked against the request's pixel and detector limits."""
        cfg = self.config
        data = [image_bytes(v, i, cfg.max_image_bytes) for i, v in enumerate(values)]
        sizes = [_header_size(d) for d in data]
        total = sum(width * height for width, height in sizes)
        self._request.pixels = total
        if total > cfg.max_request_pixels:
            raise RequestError(
                f"request images have {total} pixels in all, over the limit of {cfg.max_request_pixels} "
                "(serve.max_request_pixels); send smaller images or fewer per request"
            )
        if detector is not None:
            check_detect_pixels(sizes, cfg, detector)
        return data

    def detector_for(self, name: str) -> FaceDetector:
        """The configured detector, or another one loaded on first use (request param face_detector)."""
        with self._detectors_lock:
            if name not in self._detectors:
                self._detectors[name] = make_detector(name, self.config.face_margin)
            return self._detectors[name]

    def score(self, faces: np.ndarray, tta: str, predictor: Any = None) -> np.ndarray:
        """Calibrated class probabilities of prepared faces (N, 48, 48, 1), averaged over `tta`'s
        views, from `predictor` (default: the model's own)."""
        probs = predict_proba(predictor or self.predictor, faces, tta, INFER_BATCH)
        return apply_temperature(renormalize(probs), self.temperature)

    # model_input: MLflow hands over a DataFrame (column signature); a DataFrame hint is
    # also the one MLflow neither validates nor warns about. Dicts/arrays work when called directly.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        self._request.pixels, encoded_bytes = 0, 0
        try:
            encoded_bytes = _encoded_bytes(model_input)  # before any check can refuse the request
            tta = _param(params, "tta", self.config.tta, TTA_MODES)  # before any decoding work
            budget = RequestBudget(self.config, tta)
            prepared = self.prepare(model_input, params, budget)
            probs = self.score(prepared.batch, tta, BudgetedPredictor(self.predictor, budget))
            frame = result_frame(probs, self.classes, prepared.boxes, prepared.face_found)
            if prepared.image_index is not None:
                frame.insert(0, "image_index", np.array(prepared.image_index, dtype=np.int64))
            return frame
        finally:
            if self._request.pixels >= TRIM_MIN_PIXELS or encoded_bytes >= TRIM_MIN_BYTES:
                release_freed_memory()
                # and once more after the scoring server has dropped its own copy of the request
                # (a 30 MB JSON body parsed into a DataFrame), which it frees after predict returns
                later = threading.Timer(TRIM_AGAIN_AFTER_S, release_freed_memory)
                later.daemon = True
                later.start()


def _request_values(model_input: Any, cfg: ServeParams) -> tuple[list[Any] | np.ndarray, str]:
    """The `image` column's values and their one kind, "encoded" or "pixels", or RequestError
    (too many images, a value of neither kind, or both kinds mixed)."""
    values = _column_values(model_input)
    if isinstance(values, np.ndarray) and values.dtype.kind not in "OUS":
        kinds = {"pixels"}  # a numeric array passed in-process
    else:
        values = values.tolist() if isinstance(values, np.ndarray) else list(values)
        kinds = {"encoded" if _is_encoded(v) else "pixels" if _is_pixels(v) else "other" for v in values}
    if len(values) > cfg.max_images_per_request:  # before any decoding: a request's cost is bounded
        raise RequestError(
            f"request has {len(values)} images, over the limit of {cfg.max_images_per_request} "
            "(serve.max_images_per_request); send smaller batches"
        )
    if "other" in kinds:
        row = next(i for i, v in enumerate(values) if not (_is_encoded(v) or _is_pixels(v)))
        raise RequestError(
            f"row {row}: column 'image' is {_describe(values[row])}: expected base64 text of an encoded image, "
            "or a 48x48 pixel array"
        )
    if kinds == {"encoded", "pixels"}:
        raise RequestError("column 'image' mixes encoded images and pixel arrays: send one kind per request")
    return values, next(iter(kinds), "encoded")


def _encoded_bytes(model_input: Any) -> int:
    """How many bytes of encoded (base64/bytes) images the request holds."""
    values = _column_values(model_input)
    if isinstance(values, np.ndarray) and values.dtype.kind not in "OUS":
        return 0
    return sum(len(v) for v in values if isinstance(v, (str, bytes)))


def _header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from an image's header (no decoding); (0, 0) when unreadable, which
    decoding then reports with its reason."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # any unreadable header is decode_image's to explain
        return (0, 0)


def _describe(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "empty (null)"
    return f"a {type(value).__name__} ({str(value)[:40]})"


def result_frame(probs: np.ndarray, classes: Sequence[str], boxes: Sequence[Box], face_found: Sequence[bool]) -> pd.DataFrame:
    """Predictions DataFrame: label, confidence, per-class probabilities, face_found, box."""
    probs = renormalize(np.asarray(probs).reshape(-1, len(classes)))
    box_array = np.array([b.as_tuple() for b in boxes], dtype=np.int64).reshape(-1, len(BOX_COLUMNS))
    columns: dict[str, Any] = {
        "label": [classes[i] for i in probs.argmax(axis=1)],
        "confidence": probs.max(axis=1, initial=0.0),
        **{c: probs[:, i] for i, c in enumerate(classes)},
        "face_found": np.array(face_found, dtype=bool),
        **{col: box_array[:, j] for j, col in enumerate(BOX_COLUMNS)},
    }
    return pd.DataFrame(columns)  # built in one go: per-column inserts cost ~0.5 ms each


# Models from code: MLflow runs this file under a generated module name to get the model
# object, instead of unpickling one. Importing it as ferflow.serving.pyfunc does not register.
if __name__ != "ferflow.serving.pyfunc":
    mlflow.models.set_model(EmotionModel())
