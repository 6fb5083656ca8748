"""Face localisation for the served model and video: YuNet (default, `cv2.FaceDetectorYN`),
OpenCV's bundled Haar cascade or MTCNN (`serve.face_detector`); the largest face or all of
them, square crops with a margin.

YuNet's ONNX file (230 KB, MIT) is vendored in `detectors/` (its README says where it came
from); the cascade file ships inside opencv-python-headless 4.x (`cv2.data.haarcascades`);
OpenCV 5 dropped both the files and `cv2.CascadeClassifier`, hence the 4.x pin.
Detection only picks the region; the crop then goes through `preprocessing.prepare_batch`
like every other image, so the model sees pixels prepared exactly as in training.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ferflow.core.noise import filtered_stderr
from ferflow.core.params import FACE_DETECTORS
from ferflow.data.preprocessing import to_grayscale

CASCADE_FILE = "haarcascade_frontalface_default.xml"
# Haar cost grows with the pixel count: detect on a copy whose longer side is at most
# this, then scale the box back (an 800x600 photo: ~30 ms instead of ~50 ms at 640, same
# hit rate on test photos). Faces under 24/480 = 5% of the longer side are not found.
DETECT_MAX_SIDE = 480
MIN_FACE = 24  # the cascade's own window size; smaller faces cannot be detected anyway
# Images whose shorter side is below this are taken as face crops already (FER-2013 is
# 48x48) and classified whole. In them the 24-px window can only "find" a face filling
# half the image: on real FER-2013 test crops it fires on 23%, boxes ~40 px wide, and
# cropping those would zoom in ~10% relative to the training framing (and cost 0.7 ms).
DETECT_MIN_SIDE = 96
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 5
# MTCNN's final-stage score; below it, on our composites, most boxes were not faces
MTCNN_MIN_CONFIDENCE = 0.9
YUNET_FILE = Path(__file__).parent / "detectors" / "face_detection_yunet_2023mar.onnx"
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
# Chosen on benchmarks/face_detectors.py --seed 1 (docs/video.md reports seed 0): YuNet
# misses small and upscaled faces at its own 0.9, while false boxes stay rare down to 0.5.
YUNET_MIN_SCORE = 0.5
YUNET_NMS_IOU = 0.3
# YuNet finds more faces when the image is enlarged (FER-sized faces look small to it):
# it detects on a copy whose longer side is 800 (a 640x480 frame: x1.25), stills and video
# alike (640 kept 0.76 of the faces 800 finds 0.86 of; 800 still runs ~50 frames/s in watch).
YUNET_SIDE = 800
YUNET_MAX_UPSCALE = 2.0

BOX_COLUMNS = ("face_x", "face_y", "face_w", "face_h")  # a Box as prediction columns, in `as_tuple` order


@dataclass(frozen=True)
class Box:
    """A rectangle in image pixel coordinates (x, y of the top-left corner)."""

    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.w, self.h)


def cascade_path() -> Path:
    import cv2

    path = Path(cv2.data.haarcascades) / CASCADE_FILE
    if not path.is_file():
        raise RuntimeError(
            f"{path}: Haar cascade not found; face detection needs opencv-python-headless 4.x "
            f"(installed: {cv2.__version__}), whose wheel ships cv2/data/{CASCADE_FILE}"
        )
    return path


def centre_square(width: int, height: int) -> Box:
    """The centred square `preprocessing.to_face_pixels` crops when no face is found."""
    side = min(width, height)
    return Box((width - side) // 2, (height - side) // 2, side, side)


def square_with_margin(face: Box, width: int, height: int, margin: float) -> Box:
    """A square around `face`, `margin` x its size added on every side, kept inside the image.

    Near an edge the square shifts inwards rather than being padded (no invented pixels);
    it shrinks only when it is larger than the image's shorter side.
    """
    side = round(max(face.w, face.h) * (1 + 2 * margin))
    side = max(1, min(side, width, height))
    cx, cy = face.x + face.w / 2, face.y + face.h / 2
    x = int(round(min(max(cx - side / 2, 0), width - side)))
    y = int(round(min(max(cy - side / 2, 0), height - side)))
    return Box(x, y, side, side)


class FaceDetector:
    """Finds frontal faces with OpenCV's Haar cascade; thread-safe (one cascade per thread)."""

    name = "haar"
    still_side = DETECT_MAX_SIDE  # the longer side of the copy detection runs on, for stills
    video_side = 320  # ... and for `watch` frames (~2.3x less work; faces >= 24/320 of the width)
    max_upscale = 1.0  # smaller images are scanned as they are

    def __init__(self, margin: float = 0.05, path: str | Path | None = None) -> None:
        if not 0 <= margin <= 1:
            raise ValueError(f"face margin must be in [0, 1], got {margin!r}")
        self.margin = margin
        self.path = str(path or cascade_path())
        self._local = threading.local()
        self._cascade()  # fail at load time, not on the first request
        import cv2

        # OpenCV's own thread pool costs more than it saves on small images (48x48: 1.0 ms
        # with 2 threads, 0.55 ms with 1); requests already run in parallel threads.
        cv2.setNumThreads(1)

    def _cascade(self):
        # cv2.CascadeClassifier is not safe to share between threads, and the scoring
        # server runs requests in a thread pool.
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            import cv2

            cascade = cv2.CascadeClassifier(self.path)
            if cascade.empty():
                raise RuntimeError(f"{self.path}: not a valid Haar cascade file")
            self._local.cascade = cascade
        return cascade

    def detect_all(self, pixels: np.ndarray, max_side: int | None = None, scale_factor: float = SCALE_FACTOR) -> list[Box]:
        """Every face in a uint8 gray (2-D) or RGB (HxWx3) array, largest first.

        Detection runs on a copy whose longer side is at most `max_side` (video passes a
        smaller one for speed); boxes are scaled back to `pixels` coordinates.
        """
        import cv2

        gray = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
        height, width = gray.shape
        scale = min(self.max_upscale, (max_side or self.still_side) / max(width, height))
        small = gray
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        if min(small.shape) < MIN_FACE:
            return []
        found = self._cascade().detectMultiScale(
            small, scaleFactor=scale_factor, minNeighbors=MIN_NEIGHBORS, minSize=(MIN_FACE, MIN_FACE)
        )
        boxes = [
            Box(round(x / scale), round(y / scale), round(w / scale), round(h / scale))
            for x, y, w, h in (tuple(int(v) for v in f) for f in found)
        ]
        return sorted(boxes, key=lambda b: -b.area)

    def detect_pixels(self, width: int, height: int) -> int:
        """Pixels `locate_all` scans for a width x height image (0 below DETECT_MIN_SIDE;
        else the copy scaled to `still_side`), known from the header alone."""
        if min(width, height) < DETECT_MIN_SIDE:
            return 0
        scale = min(self.max_upscale, self.still_side / max(width, height))
        return max(1, round(width * scale)) * max(1, round(height * scale))

    def detect(self, gray: np.ndarray) -> Box | None:
        """The largest face in a uint8 2-D array, or None."""
        faces = self.detect_all(gray)
        return faces[0] if faces else None

    def detector_input(self, img: Image.Image) -> np.ndarray:
        """The array `detect_all` wants for a PIL image (Haar: grayscale)."""
        return np.asarray(to_grayscale(img), dtype=np.uint8)

    def locate_all(self, img: Image.Image) -> list[tuple[Image.Image, Box]]:
        """(grayscale crop to classify, its square box in `img`) for every face, largest first; [] if none."""
        gray = to_grayscale(img)
        width, height = gray.size
        if min(width, height) < DETECT_MIN_SIDE:
            return []
        out = []
        for face in self.detect_all(self.detector_input(img)):
            box = square_with_margin(face, width, height, self.margin)
            out.append((gray.crop((box.x, box.y, box.x + box.w, box.y + box.h)), box))
        return out

    def locate(self, img: Image.Image) -> tuple[Image.Image, Box, bool]:
        """(grayscale crop to classify, its box in `img`, whether a face was found).

        Without a face (or below DETECT_MIN_SIDE) the whole image is returned:
        `prepare_batch` centre-crops it, and the box says which square that is.
        """
        found = self.locate_all(img)
        if not found:
            gray = to_grayscale(img)
            return gray, centre_square(*gray.size), False
        crop, box = found[0]
        return crop, box, True


class MtcnnDetector(FaceDetector):
    """MTCNN (the `mtcnn` package, MIT; its weights ship inside the wheel, nothing is
    downloaded): finds faces Haar misses (turned, small, uneven light) at ~10x its cost.

    Same interface as the Haar `FaceDetector`; it looks at colour, not grayscale.
    """

    name = "mtcnn"

    def __init__(self, margin: float = 0.05, min_confidence: float = MTCNN_MIN_CONFIDENCE) -> None:
        if not 0 <= margin <= 1:
            raise ValueError(f"face margin must be in [0, 1], got {margin!r}")
        with filtered_stderr():  # mtcnn loads TensorFlow: its oneDNN/absl start-up lines stay out of the log
            try:
                from mtcnn import MTCNN
            except ImportError as exc:
                raise RuntimeError(f"face detector 'mtcnn' needs the mtcnn package (pip install mtcnn): {exc}") from None
            self._mtcnn = MTCNN(device="CPU:0")
        self.margin = margin
        self.min_confidence = min_confidence
        self._lock = threading.Lock()  # one TF graph; requests arrive from a thread pool

    def detector_input(self, img: Image.Image) -> np.ndarray:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)

    def detect_all(self, pixels: np.ndarray, max_side: int | None = None, scale_factor: float = SCALE_FACTOR) -> list[Box]:
        import cv2

        rgb = pixels if pixels.ndim == 3 else cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
        height, width = rgb.shape[:2]
        scale = min(self.max_upscale, (max_side or self.still_side) / max(width, height))
        if scale < 1.0:
            rgb = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
        if min(rgb.shape[:2]) < MIN_FACE:
            return []
        with self._lock:
            found = self._mtcnn.detect_faces(rgb)  # its default min_face_size (20); 24 misses faces (mtcnn 1.0.0)
        boxes = [
            Box(round(x / scale), round(y / scale), round(w / scale), round(h / scale))
            for x, y, w, h in (f["box"] for f in found if f["confidence"] >= self.min_confidence)
            if w > 0 and h > 0
        ]
        return sorted(boxes, key=lambda b: -b.area)


class YunetDetector(FaceDetector):
    """YuNet (`cv2.FaceDetectorYN`, the vendored ONNX file): finds small, blurred and turned
    faces at a few ms per 640x480 frame. Same interface as the Haar `FaceDetector`.

    Unlike the others it also enlarges images smaller than its side (up to x2): faces of
    40-60 px are found far more often at x1.25 (benchmarks/face_detectors.py).
    """

    name = "yunet"
    still_side = YUNET_SIDE
    video_side = YUNET_SIDE
    max_upscale = YUNET_MAX_UPSCALE

    def __init__(self, margin: float = 0.05, min_score: float = YUNET_MIN_SCORE, path: str | Path = YUNET_FILE) -> None:
        if not 0 <= margin <= 1:
            raise ValueError(f"face margin must be in [0, 1], got {margin!r}")
        self.margin, self.min_score, self.path = margin, min_score, str(path)
        self._local = threading.local()
        check_yunet_file(Path(path))
        self._yunet((320, 240))  # fail at load time, not on the first request
        import cv2

        cv2.setNumThreads(1)  # as for Haar: requests and frames already run in parallel threads

    def _yunet(self, size: tuple[int, int]):
        # a FaceDetectorYN holds its input size: one per thread (requests come from a pool)
        yunet = getattr(self._local, "yunet", None)
        if yunet is None:
            import cv2

            try:
                yunet = cv2.FaceDetectorYN.create(self.path, "", size, self.min_score, YUNET_NMS_IOU, 5000)
            except cv2.error as exc:
                raise RuntimeError(f"{self.path}: not a YuNet ONNX model ({str(exc).strip().splitlines()[-1]})") from None
            self._local.yunet = yunet
        yunet.setInputSize(size)
        return yunet

    def detector_input(self, img: Image.Image) -> np.ndarray:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)

    def detect_all(self, pixels: np.ndarray, max_side: int | None = None, scale_factor: float = SCALE_FACTOR) -> list[Box]:
        """Every face, largest first; `scale_factor` (Haar's pyramid step) does not apply."""
        import cv2

        height, width = pixels.shape[:2]
        scale = min(self.max_upscale, (max_side or self.still_side) / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if min(size) < MIN_FACE:
            return []
        code = cv2.COLOR_GRAY2BGR if pixels.ndim == 2 else cv2.COLOR_RGB2BGR
        bgr = cv2.cvtColor(pixels, code)
        if size != (width, height):
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        _, found = self._yunet(size).detect(bgr)
        boxes = [] if found is None else [_unscaled_box(row[:4], scale, width, height) for row in found]
        return sorted((b for b in boxes if b.w > 0 and b.h > 0), key=lambda b: -b.area)


def _unscaled_box(xywh: np.ndarray, scale: float, width: int, height: int) -> Box:
    """A detector box (floats, may reach past the edges) in the original image, clipped to it."""
    x0, y0 = max(0.0, xywh[0] / scale), max(0.0, xywh[1] / scale)
    x1, y1 = min(float(width), (xywh[0] + xywh[2]) / scale), min(float(height), (xywh[1] + xywh[3]) / scale)
    return Box(round(x0), round(y0), round(x1 - x0), round(y1 - y0))


def check_yunet_file(path: Path) -> None:
    """The vendored YuNet file, or a clear error (missing, or not the file its README names)."""
    import hashlib

    if not path.is_file():
        raise RuntimeError(f"{path}: YuNet model not found (it ships in ferflow/serving/detectors/)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if path == YUNET_FILE and digest != YUNET_SHA256:
        raise RuntimeError(f"{path}: SHA-256 {digest}, expected {YUNET_SHA256} (a damaged copy; reinstall ferflow)")


def make_detector(name: str, margin: float = 0.05) -> FaceDetector:
    """The detector `serve.face_detector` / `--detector` names."""
    if name == "yunet":
        return YunetDetector(margin)
    if name == "haar":
        return FaceDetector(margin)
    if name == "mtcnn":
        return MtcnnDetector(margin)
    raise ValueError(f"face detector {name!r}: expected one of {', '.join(FACE_DETECTORS)}")
