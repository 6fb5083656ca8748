"""What the demo's page asks the model for: the served model's own code, no copy of it.

* photos: the pyfunc's `predict` with `faces: all` (`ferflow.serving.predict.predict_bytes`),
  exactly what `ferflow predict --all-faces` and `mlflow models serve` do;
* webcam frames: `ferflow watch`'s per-frame classifier (`video.analyze.FrameClassifier`:
  detection at video settings, face ids, smoothing), one tracker per camera stream;
* videos: `ferflow watch` itself (`video.analyze.watch`, `video.summary`), on a temporary copy.
"""

from __future__ import annotations

import base64
import collections
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferflow.core.errors import UserError
from ferflow.video import analyze

STREAMS_KEPT = 8  # camera streams (browser tabs) whose trackers are kept; the oldest goes first
MAX_VIDEO_SECONDS = 120.0  # a "short video"; `ferflow watch` takes longer ones
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".ogv", ".mpg", ".mpeg"})


class UploadError(UserError):
    """An upload the demo refuses; the message is shown on the page as it is."""


@dataclass(frozen=True)
class Limits:
    photo_bytes: int  # the served model's serve.max_image_bytes: it would refuse more anyway
    video_bytes: int
    video_seconds: float = MAX_VIDEO_SECONDS


class Demo:
    """The loaded model and the per-stream state behind the page's three panels."""

    def __init__(self, uri: str, max_video_bytes: int) -> None:
        from ferflow.serving.model import describe_model, load_model
        from ferflow.video.watch import DEFAULT_SMOOTH, load_emotion_model

        self.model = load_model(uri)
        self.emotion = load_emotion_model(uri, lambda _: self.model, UploadError)
        self.description = describe_model(uri, self.model)
        self.classes = list(self.emotion.classes)
        self.limits = Limits(self.emotion.config.max_image_bytes, max_video_bytes)
        self.smooth = DEFAULT_SMOOTH
        self._streams: collections.OrderedDict[str, tuple[threading.Lock, analyze.FrameClassifier]] = collections.OrderedDict()
        self._streams_lock = threading.Lock()
        # one video at a time: it uses every core already, and pyplot (the timeline) is not thread-safe
        self._video_lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {
            "model": self.description,
            "classes": self.classes,
            "detector": self.emotion.detector.name,
            "max_photo_bytes": self.limits.photo_bytes,
            "max_video_bytes": self.limits.video_bytes,
            "max_video_seconds": self.limits.video_seconds,
        }

    def photo(self, name: str, data: bytes) -> dict[str, Any]:
        """Every face of an image: label, confidence, top-3 and its box, largest first."""
        from ferflow.serving.predict import predict_bytes

        if not data:
            raise UploadError(f"{name}: empty file (0 bytes); expected an image")
        record = predict_bytes(self.model, name, data, {"faces": "all"})
        if "error" in record:  # the served model's 400 message, which names its request column
            reason = record["error"].replace("column 'image': ", "").replace("column 'image'", "the image")
            raise UploadError(f"{name}: {reason}")
        return {"file": name, "faces": record.get("faces") or [{k: v for k, v in record.items() if k != "file"}]}

    def _classifier(self, stream: str) -> tuple[threading.Lock, analyze.FrameClassifier]:
        with self._streams_lock:
            if stream not in self._streams:
                options = analyze.WatchOptions(smooth=self.smooth, tta="none", progress=False)
                self._streams[stream] = (threading.Lock(), self._frame_classifier(options))
                while len(self._streams) > STREAMS_KEPT:
                    self._streams.popitem(last=False)
            self._streams.move_to_end(stream)
            return self._streams[stream]

    def _frame_classifier(self, options: analyze.WatchOptions) -> analyze.FrameClassifier:
        return analyze.FrameClassifier(self.emotion.score, self.classes, self.emotion.detector, options)

    def frame(self, stream: str, data: bytes) -> dict[str, Any]:
        """Faces of one webcam frame (JPEG/PNG), tracked across the stream's earlier frames."""
        import cv2

        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if pixels is None:
            raise UploadError(f"camera frame: not a JPEG/PNG image ({len(data)} bytes)")
        lock, classify = self._classifier(stream)
        with lock:  # a tracker follows one frame after another
            faces = classify(pixels)
        return {"width": pixels.shape[1], "height": pixels.shape[0], "faces": [self._face(f) for f in faces]}

    def _face(self, face: analyze.FaceResult) -> dict[str, Any]:
        top = int(np.argmax(face.probs))
        return {"id": face.face_id, "label": self.classes[top], "confidence": float(face.probs[top]), "box": face.box.as_tuple()}

    def video(self, name: str, data: bytes) -> dict[str, Any]:
        """`ferflow watch` on an uploaded video: its JSON summary and the timeline PNG (data URL)."""
        if not data:
            raise UploadError(f"{name}: empty file (0 bytes); expected a video")
        suffix = Path(name).suffix.lower()
        with tempfile.TemporaryDirectory(prefix="ferflow-demo-") as tmp:
            path = Path(tmp) / f"upload{suffix if suffix in VIDEO_SUFFIXES else '.mp4'}"
            path.write_bytes(data)
            with self._video_lock:
                try:
                    return self._watch(name, path, Path(tmp) / "timeline.png")
                except analyze.VideoError as exc:
                    raise UploadError(str(exc).replace(str(path), name)) from None

    def _watch(self, name: str, path: Path, timeline: Path) -> dict[str, Any]:
        from ferflow.video.summary import plot_timeline, summarize

        opened = analyze.open_video(str(path), None)
        cap, info = opened.cap, opened.info
        seconds = (info.frame_count or 0) / info.fps
        if seconds > self.limits.video_seconds:
            cap.release()
            raise UploadError(
                f"{name}: {seconds:.0f} s long; the demo takes videos up to {self.limits.video_seconds:.0f} s "
                "(`ferflow watch` takes any length)"
            )
        options = analyze.WatchOptions(smooth=self.smooth, tta="none", progress=False)
        result = analyze.watch(opened, self._frame_classifier(options), self.classes, options)
        summary = summarize(result, self.classes, options.every, options.smooth, self.emotion.detector.name)
        summary["source"] = name
        plot_timeline(summary, self.classes, timeline)
        png = base64.b64encode(timeline.read_bytes()).decode("ascii")
        rate = len(result.frames) / max(result.seconds, 1e-9)
        return {"summary": summary, "timeline_png": f"data:image/png;base64,{png}", "frames_per_second": round(rate, 1)}
