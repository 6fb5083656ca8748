"""The default face detector (YuNet, vendored ONNX): finds what Haar misses, fails clearly, is thread-safe.

Real pixels only: scikit-image's astronaut photo, shrunk and blurred into the small faces a
wide webcam shot gives (the synthetic cartoon faces are not faces to a learned detector).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from ferflow.serving.faces import YUNET_FILE, YUNET_SHA256, Box, YunetDetector, make_detector
from ferflow.video.tracker import iou
from video_synth import ASTRONAUT_FACE


def small_blurred_astronaut(face_side: int, sigma: float) -> tuple[np.ndarray, Box]:
    """A 640x480 frame: the astronaut shrunk so her face is ~face_side px, blurred, on grey."""
    from skimage import data

    photo = data.astronaut()
    scale = face_side / ASTRONAUT_FACE.w
    small = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma)
    frame = np.full((480, 640, 3), 128, np.uint8)
    h, w = min(small.shape[0], 400), min(small.shape[1], 400)
    small, x0, y0 = small[:h, :w], 200, 60
    frame[y0 : y0 + h, x0 : x0 + w] = small
    f = ASTRONAUT_FACE
    return frame, Box(x0 + round(f.x * scale), y0 + round(f.y * scale), round(f.w * scale), round(f.h * scale))


def test_the_vendored_file_is_the_one_its_readme_names() -> None:
    assert hashlib.sha256(YUNET_FILE.read_bytes()).hexdigest() == YUNET_SHA256
    readme = (YUNET_FILE.parent / "README.md").read_text()
    assert YUNET_SHA256 in readme and "MIT" in (YUNET_FILE.parent / "LICENSE").read_text()


def test_yunet_finds_a_small_blurred_face_that_haar_misses() -> None:
    frame, truth = small_blurred_astronaut(face_side=42, sigma=1.5)
    yunet, haar = make_detector("yunet"), make_detector("haar")
    for side in (yunet.still_side, yunet.video_side):
        found = yunet.detect_all(frame, side)
        assert len(found) == 1 and iou(found[0], truth) >= 0.4, (side, found, truth)
    assert haar.detect_all(frame, haar.video_side, 1.2) == []  # watch's Haar: 42 px is 21 px at 320, under its window
    assert yunet.detect_all(np.full((480, 640, 3), 128, np.uint8)) == []  # nothing in a plain frame


def test_yunet_boxes_stay_inside_the_image_and_are_largest_first() -> None:
    from skimage import data

    cut = np.ascontiguousarray(data.astronaut()[90:, 190:])  # her face cut by the left edge: YuNet's raw box starts at x < 0
    found = make_detector("yunet").detect_all(cut, 800)
    assert len(found) == 1 and found[0].x == 0 and found[0].y >= 0
    small, _ = small_blurred_astronaut(face_side=50, sigma=0.5)
    frame = np.concatenate([cv2.resize(cut, (320, 480)), small[:, 160:480]], axis=1)
    found = make_detector("yunet").detect_all(frame)
    assert len(found) == 2 and found[0].area > found[1].area
    assert all(b.x >= 0 and b.y >= 0 and b.x + b.w <= 640 and b.y + b.h <= 480 for b in found)


def test_yunet_scales_small_images_up_and_the_request_budget_counts_it() -> None:
    yunet, haar = make_detector("yunet"), make_detector("haar")
    assert yunet.detect_pixels(640, 480) == 800 * 600  # x1.25
    assert yunet.detect_pixels(200, 150) == 400 * 300  # at most x2
    assert yunet.detect_pixels(4000, 3000) == 800 * 600 and haar.detect_pixels(4000, 3000) == 480 * 360
    assert yunet.detect_pixels(48, 48) == 0  # face crops are classified whole, never scanned


def test_one_detector_serves_many_threads_alike() -> None:
    frame, truth = small_blurred_astronaut(face_side=56, sigma=1.0)
    detector = make_detector("yunet")
    expected = detector.detect_all(frame)
    results: list[list[Box]] = []

    def work() -> None:
        for side in (320, 640, 800, 480):  # each thread keeps changing its input size
            results.append((side, detector.detect_all(frame, side)))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16
    assert all(found == detector.detect_all(frame, side) for side, found in results)
    assert iou(expected[0], truth) >= 0.4


def test_a_missing_or_damaged_model_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="YuNet model not found"):
        YunetDetector(path=tmp_path / "none.onnx")
    damaged = tmp_path / "yunet.onnx"
    damaged.write_bytes(YUNET_FILE.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="yunet.onnx: not a YuNet ONNX model"):
        YunetDetector(path=damaged)
