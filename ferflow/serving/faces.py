"""Face localisation for the served model: OpenCV's bundled Haar cascade, largest face,
square crop with a margin.

The cascade file ships inside opencv-python-headless 4.x (`cv2.data.haarcascades`);
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
    """Finds the largest frontal face in an image; thread-safe (one cascade per thread)."""

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

    def detect(self, gray: np.ndarray) -> Box | None:
        """The largest face in a uint8 2-D array, or None."""
        height, width = gray.shape
        scale = min(1.0, DETECT_MAX_SIDE / max(width, height))
        small = gray
        if scale < 1.0:
            import cv2

            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        if min(small.shape) < MIN_FACE:
            return None
        found = self._cascade().detectMultiScale(
            small, scaleFactor=SCALE_FACTOR, minNeighbors=MIN_NEIGHBORS, minSize=(MIN_FACE, MIN_FACE)
        )
        if len(found) == 0:
            return None
        x, y, w, h = max((tuple(int(v) for v in f) for f in found), key=lambda b: b[2] * b[3])
        return Box(round(x / scale), round(y / scale), round(w / scale), round(h / scale))

    def locate(self, img: Image.Image) -> tuple[Image.Image, Box, bool]:
        """(grayscale crop to classify, its box in `img`, whether a face was found).

        Without a face (or below DETECT_MIN_SIDE) the whole image is returned:
        `prepare_batch` centre-crops it, and the box says which square that is.
        """
        gray = to_grayscale(img)
        width, height = gray.size
        face = self.detect(np.asarray(gray, dtype=np.uint8)) if min(width, height) >= DETECT_MIN_SIDE else None
        if face is None:
            return gray, centre_square(width, height), False
        box = square_with_margin(face, width, height, self.margin)
        return gray.crop((box.x, box.y, box.x + box.w, box.y + box.h)), box, True
