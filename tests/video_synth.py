"""Test videos with faces at known positions, for the video tests and `benchmarks/video.py`.

The face is a real photo's: the astronaut of `skimage.data.astronaut()` (Eileen Collins,
a NASA public-domain image that ships inside scikit-image, a dev requirement), so any
real detector finds it. Each face drifts on its own sine path over a scrolling
textured background, so trackers and detectors see motion, not a still image.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ferflow.serving.faces import Box

# The astronaut's face in the 512x512 photo, labelled by eye (hairline to chin, ear to
# ear), and the crop pasted into videos: the face plus 0.35 of its width on every side.
ASTRONAUT_FACE = Box(180, 65, 90, 105)
# The cameraman of `skimage.data.camera()` (a real photo, face in three-quarter profile), by eye.
CAMERAMAN_FACE = Box(190, 107, 70, 85)
CROP_MARGIN = 0.35


def astronaut_patch() -> tuple[np.ndarray, Box]:
    """(RGB crop around the astronaut's face, the face's box inside that crop)."""
    from skimage import data

    photo = data.astronaut()
    f = ASTRONAUT_FACE
    pad = round(f.w * CROP_MARGIN)
    x0, y0 = max(0, f.x - pad), max(0, f.y - pad)
    crop = photo[y0 : f.y + f.h + pad, x0 : f.x + f.w + pad]
    return np.ascontiguousarray(crop), Box(f.x - x0, f.y - y0, f.w, f.h)


def background(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A textured RGB background twice the frame width (it scrolls), no faces in it."""
    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0 : 2 * width] / max(width, height)
    base = np.stack([90 + 80 * np.sin(6 * xx), 120 + 60 * yy, 150 - 70 * np.cos(4 * xx + yy)], axis=-1)
    base += rng.normal(0, 6, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def face_layout(n_faces: int, size: tuple[int, int], patch_side: int) -> list[tuple[int, int]]:
    """Top-left corners of `n_faces` patches spread over the frame (a grid of up to 2 rows)."""
    width, height = size
    cols = math.ceil(n_faces / (1 if n_faces == 1 else 2))
    rows = 1 if n_faces == 1 else 2
    cell_w, cell_h = width / cols, height / rows
    spots = []
    for i in range(n_faces):
        r, c = divmod(i, cols)
        spots.append((round(c * cell_w + (cell_w - patch_side) / 2), round(r * cell_h + (cell_h - patch_side) / 2)))
    return spots


def synthetic_frames(
    n_frames: int, size: tuple[int, int] = (640, 480), n_faces: int = 1, patch_side: int = 160, seed: int = 0
) -> tuple[list[np.ndarray], list[list[Box]]]:
    """(BGR frames, the true face boxes of each frame). Faces drift up to 12 px per axis."""
    import cv2

    patch, face = astronaut_patch()
    scale = patch_side / patch.shape[1]
    patch = cv2.resize(patch, (patch_side, round(patch.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    fx, fy, fw, fh = (round(v * scale) for v in face.as_tuple())
    ph, pw = patch.shape[:2]
    width, height = size
    bg = background(size, seed)
    spots = face_layout(n_faces, size, patch_side)
    frames, truth = [], []
    for t in range(n_frames):
        shift = (4 * t) % width
        frame = bg[:, shift : shift + width].copy()
        boxes = []
        for i, (x0, y0) in enumerate(spots):
            x = int(np.clip(x0 + 12 * math.sin(0.15 * t + i), 0, width - pw))
            y = int(np.clip(y0 + 12 * math.cos(0.11 * t + 2 * i), 0, height - ph))
            frame[y : y + ph, x : x + pw] = patch
            boxes.append(Box(x + fx, y + fy, fw, fh))
        frames.append(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        truth.append(boxes)
    return frames, truth


def group_photo(sides: tuple[int, ...], size: tuple[int, int] = (960, 480), seed: int = 0) -> tuple[np.ndarray, list[Box]]:
    """(a BGR photo with one face patch per entry of `sides`, left to right, each patch that
    many pixels wide; the true face boxes in the same order). Different sides tell the
    largest face from the first one found."""
    import cv2

    patch, face = astronaut_patch()
    width, height = size
    photo = background(size, seed)[:, :width].copy()
    boxes, x = [], 10
    for side in sides:
        scale = side / patch.shape[1]
        resized = cv2.resize(patch, (side, round(patch.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        y = (height - resized.shape[0]) // 2
        photo[y : y + resized.shape[0], x : x + side] = resized
        fx, fy, fw, fh = (round(v * scale) for v in face.as_tuple())
        boxes.append(Box(x + fx, y + fy, fw, fh))
        x += side + 20
    assert x <= width, "the faces do not fit side by side"
    return cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), boxes


def write_video(path: str | Path, frames: list[np.ndarray], fps: float = 30.0, fourcc: str = "mp4v") -> Path:
    """Encode BGR frames with OpenCV's VideoWriter."""
    import cv2

    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write {fourcc} video here")
    for frame in frames:
        writer.write(frame)
    writer.release()
    return Path(path)
