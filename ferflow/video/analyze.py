"""Emotions of every face in a video file or a webcam stream (`ferflow watch`).

Per processed frame: every face is detected (Haar or MTCNN), tracked (`tracker.IouTracker`,
stable face ids), cropped like still images (`faces.square_with_margin`), and all crops
go through the exported model in ONE call. Outputs, all optional: the annotated video
(every input frame, boxes and labels drawn), a CSV with one row per face per processed
frame, a JSON summary and a PNG timeline of emotion shares (`ferflow.video.summary`).

Decoding and encoding run in their own threads (OpenCV releases the GIL), so on two
cores they overlap with detection. Ctrl-C stops reading; what was processed is written
out completely (the video container is finalised, the CSV ends on a whole row).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ferflow.serving.faces import Box, FaceDetector, square_with_margin
from ferflow.video.tracker import IouTracker

# Frames whose longer side exceeds this are downscaled (keeping the aspect ratio) before
# anything else: detection and the annotated video then work at this size. 1920 keeps
# full HD as is; a 4K or 8K frame would cost 4-16x the time for faces big enough anyway.
MAX_FRAME_SIDE = 1920
VIDEO_SCALE_FACTOR = 1.2  # Haar pyramid step; stills use 1.1 (~1.7x the cost, same faces on webcam-size faces)
FALLBACK_FPS = 30.0  # when the container does not say
VIDEO_SUFFIXES = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}
QUEUE_FRAMES = 8  # decoded frames buffered ahead of detection (~7 MB at 640x480)
# ... but never more than this many bytes of them (issue #30: 8 frames of 16000x16000 were
# 6 GB); at least one frame is always buffered
QUEUE_BYTES = 64 * 2**20
# The largest source frame `watch` decodes: 8K UHD (7680x4320, ~100 MB as BGR). OpenCV's
# VideoCapture cannot downscale while decoding, so a larger frame is refused from the
# container's header before the first one is decoded (a 16000x16000 MJPG reached 4.3 GB).
MAX_SOURCE_PIXELS = 7680 * 4320


class VideoError(ValueError):
    """A bad source, option or output path; the message names it (one line, no traceback)."""


@dataclass(frozen=True)
class SourceInfo:
    name: str  # the file path, or "camera N"
    width: int
    height: int
    fps: float
    frame_count: int | None  # None for cameras and containers that do not say
    is_camera: bool


@dataclass
class FaceResult:
    face_id: int
    box: Box
    probs: np.ndarray


@dataclass
class FrameResult:
    index: int
    time_s: float
    faces: list[FaceResult] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """What the summary keeps of a processed frame: (face_id, label index) per face.

    ~250 bytes a frame with one face (no boxes or probability arrays): an hour of webcam
    at 30 fps (108 k frames) holds ~27 MB.
    """

    index: int
    time_s: float
    faces: tuple[tuple[int, int], ...]


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    # a missing camera or an odd file makes OpenCV/FFmpeg print WARN lines of its own;
    # the caller reports one clear error instead. FFmpeg's own log level is read from
    # the environment when OpenCV first opens a file: quiet (-8) unless the user set one.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2

    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(previous)


def _fourcc_text(code: float) -> str:
    value = int(code) if math.isfinite(code) else 0
    text = "".join(chr((value >> (8 * i)) & 0xFF) for i in range(4))
    return text if value and text.isprintable() else "unknown"


def open_video(source: str | None, camera: int | None) -> OpenedVideo:
    """Open a video file or camera; return (capture, info, first frame) or raise VideoError."""
    import cv2

    if camera is not None:
        if camera < 0:
            raise VideoError(f"--camera {camera}: expected a camera index >= 0")
        with _quiet_opencv():
            cap = cv2.VideoCapture(camera)
            ok, frame = cap.read() if cap.isOpened() else (False, None)
        if not ok:
            cap.release()
            raise VideoError(f"--camera {camera}: no camera with this index could be opened (or it gives no frames)")
        fps = cap.get(cv2.CAP_PROP_FPS)
        info = SourceInfo(f"camera {camera}", frame.shape[1], frame.shape[0], fps if fps > 0 else FALLBACK_FPS, None, True)
        return OpenedVideo(cap, info, frame)
    if source is None:
        raise VideoError("no SOURCE: give a video file or --camera N")
    path = Path(source)
    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if not path.is_file():
        raise VideoError(f"{path}: not a file")
    if not os.access(path, os.R_OK):
        raise VideoError(f"{path}: cannot read the file (permission denied)")
    with _quiet_opencv():
        cap = cv2.VideoCapture(str(path))
        opened = cap.isOpened()
        if opened:
            _refuse_huge_frames(cap, str(path))
        ok, frame = cap.read() if opened else (False, None)
    if not opened:
        cap.release()
        raise VideoError(
            f"{path}: not a video OpenCV can decode (not a video, damaged, or a container/codec this OpenCV build lacks)"
        )
    if not ok:
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        codec = _fourcc_text(cap.get(cv2.CAP_PROP_FOURCC))
        cap.release()
        if count <= 0:
            raise VideoError(f"{path}: the video has zero frames")
        raise VideoError(f"{path}: cannot decode its frames (codec {codec!r} unsupported by this OpenCV build)")
    fps = cap.get(cv2.CAP_PROP_FPS)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    info = SourceInfo(
        str(path), frame.shape[1], frame.shape[0], fps if fps and fps > 0 else FALLBACK_FPS, count if count > 0 else None, False
    )
    return OpenedVideo(cap, info, frame)


def output_size(width: int, height: int, max_side: int = MAX_FRAME_SIDE) -> tuple[int, int]:
    """The processing (and annotated video) size: the frame's, or downscaled to `max_side`."""
    scale = min(1.0, max_side / max(width, height))
    return (width, height) if scale == 1.0 else (max(2, round(width * scale)), max(2, round(height * scale)))


def check_output(path: str | None, option: str, suffixes: tuple[str, ...] | None = None) -> Path | None:
    """Fail before any work when an output could not be written."""
    if path is None:
        return None
    out = Path(path)
    if suffixes and out.suffix.lower() not in suffixes:
        raise VideoError(f"{option} {out}: expected a file ending in {', '.join(suffixes)}")
    if out.is_dir():
        raise VideoError(f"{option} {out}: is a directory, expected a file name")
    parent = out.parent
    if not parent.is_dir():
        raise VideoError(f"{option} {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise VideoError(f"{option} {out}: cannot write there (permission denied)")
    return out


def check_display() -> None:
    """--show needs a GUI-enabled OpenCV and a display; say which is missing."""
    import cv2

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise VideoError("--show: no display (DISPLAY is not set); use --out to write an annotated video instead")
    try:
        cv2.namedWindow("ferflow watch", cv2.WINDOW_NORMAL)
    except cv2.error:
        raise VideoError(
            "--show: this OpenCV build has no GUI support (opencv-python-headless); "
            "install opencv-python for a window, or use --out"
        ) from None


class FrameReader:
    """Decoded frames, read ahead in a thread so decoding overlaps detection.

    `latest_only` (cameras): keep just the newest frame, dropping older ones, so a live
    view slower than the camera stays current instead of falling further behind.
    """

    def __init__(self, cap: Any, first: np.ndarray, latest_only: bool = False) -> None:
        self.cap, self.first, self.latest_only = cap, first, latest_only
        self.stop = threading.Event()
        self.buffer: queue.Queue[np.ndarray | None] = queue.Queue(1 if latest_only else queue_frames(first))
        self.thread = threading.Thread(target=self._read, name="ferflow-decode", daemon=True)
        self.thread.start()

    def _put(self, item: np.ndarray | None) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(queue.Full):
                self.buffer.put(item, timeout=0.1)
                return

    def _read(self) -> None:
        try:
            while not self.stop.is_set():
                ok, frame = self.cap.read()
                if not ok:
                    break
                if self.latest_only:
                    with contextlib.suppress(queue.Empty):
                        self.buffer.get_nowait()  # the consumer has not taken it: it is stale now
                self._put(frame)
        finally:
            self._put(None)

    def __iter__(self) -> Iterator[np.ndarray]:
        yield self.first
        while (frame := self.buffer.get()) is not None:
            yield frame

    def close(self) -> None:
        """Stop reading and wait for the thread, so the capture can be released safely."""
        self.stop.set()
        self.thread.join()
        self.cap.release()


class _Sink:
    """Annotated-video writer and CSV rows, fed from a queue by one thread (encoding overlaps detection)."""

    def __init__(self, video: Any, csv_file: Any, classes: list[str], frames: int = QUEUE_FRAMES) -> None:
        self.video, self.csv_file = video, csv_file
        self.csv = csv.writer(csv_file) if csv_file is not None else None
        self.classes = classes
        self.items: queue.Queue[tuple[np.ndarray | None, list[list[Any]]] | None] = queue.Queue(frames)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ferflow-encode", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.items.get()) is not None:
            if self.error is not None:
                continue
            frame, rows = item
            try:
                if self.video is not None and frame is not None:
                    self.video.write(frame)
                if self.csv is not None and rows:
                    self.csv.writerows(rows)
            except BaseException as exc:  # reported by the main thread, which owns the run
                self.error = exc

    def put(self, frame: np.ndarray | None, rows: list[list[Any]]) -> None:
        if self.error is not None:
            raise self.error
        self.items.put((frame, rows))

    def close(self) -> None:
        self.items.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


PALETTE = [(60, 220, 40), (0, 190, 255), (255, 120, 40), (200, 60, 220), (40, 220, 220), (60, 60, 240), (200, 200, 40)]


def draw(frame: np.ndarray, faces: list[FaceResult], classes: list[str]) -> None:
    """Box, id, label and confidence of each face, in place (BGR)."""
    import cv2

    thickness = max(1, round(min(frame.shape[:2]) / 240))
    font_scale = max(0.4, min(frame.shape[:2]) / 900)
    for face in faces:
        colour = PALETTE[face.face_id % len(PALETTE)]
        b = face.box
        cv2.rectangle(frame, (b.x, b.y), (b.x + b.w - 1, b.y + b.h - 1), colour, thickness)
        top = int(np.argmax(face.probs))
        text = f"#{face.face_id} {classes[top]} {face.probs[top]:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = b.y - 4 if b.y - th - base - 4 >= 0 else b.y + b.h + th + 4
        cv2.rectangle(frame, (b.x, ty - th - 2), (b.x + tw + 2, ty + base), (0, 0, 0), -1)
        cv2.putText(frame, text, (b.x + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, 1, cv2.LINE_AA)


@dataclass
class WatchOptions:
    every: int = 1
    smooth: int = 1
    tta: str = "none"
    max_side: int = MAX_FRAME_SIDE
    detect_max_side: int | None = None  # None: the detector's own `video_side`
    show: bool = False
    progress: bool = True


# the served model's `EmotionModel.score`: faces (N, 48, 48, 1) and a TTA mode -> calibrated probabilities
Scorer = Callable[[np.ndarray, str], np.ndarray]


class FrameClassifier:
    """Detect, track and classify every face of a BGR frame: one model call per frame."""

    def __init__(self, score: Scorer, classes: list[str], detector: FaceDetector, options: WatchOptions) -> None:
        self.score, self.classes, self.detector, self.options = score, classes, detector, options
        self.tracker = IouTracker(smooth=options.smooth)

    def __call__(self, frame: np.ndarray) -> list[FaceResult]:
        import cv2

        from ferflow.data.preprocessing import prepare_batch

        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        height, width = gray.shape
        pixels = gray if self.detector.name == "haar" else cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        found = self.detector.detect_all(pixels, self.options.detect_max_side or self.detector.video_side, VIDEO_SCALE_FACTOR)
        boxes = [square_with_margin(f, width, height, self.detector.margin) for f in found]
        ids = self.tracker.update(boxes)
        if not boxes:
            return []
        batch = prepare_batch([gray[b.y : b.y + b.h, b.x : b.x + b.w] for b in boxes])
        probs = self.score(batch, self.options.tta)
        if self.options.smooth > 1:
            probs = self.tracker.smoothed(ids, probs)
        return [FaceResult(i, b, p) for i, b, p in zip(ids, boxes, probs)]


def csv_header(classes: list[str]) -> list[str]:
    return ["frame", "time_s", "face_id", "x", "y", "w", "h", "label", "confidence", *classes]


def csv_rows(result: FrameResult, classes: list[str]) -> list[list[Any]]:
    rows = []
    for f in result.faces:
        top = int(np.argmax(f.probs))
        rows.append(
            [
                result.index,
                f"{result.time_s:.3f}",
                f.face_id,
                *f.box.as_tuple(),
                classes[top],
                f"{f.probs[top]:.4f}",
                *(f"{p:.4f}" for p in f.probs),
            ]
        )
    return rows


@dataclass
class WatchResult:
    info: SourceInfo
    size: tuple[int, int]
    frames_read: int
    frames: list[FrameRecord]  # the processed ones
    interrupted: bool
    seconds: float


def _refuse_huge_frames(cap: Any, name: str) -> None:
    """Refuse a source whose frames (as its header states them) are over MAX_SOURCE_PIXELS."""
    import cv2

    width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    if width * height > MAX_SOURCE_PIXELS:
        cap.release()
        raise VideoError(
            f"{name}: frames are {width}x{height} = {width * height} pixels, over the maximum of {MAX_SOURCE_PIXELS} "
            "(8K, 7680x4320) that watch decodes; downscale it first, e.g. ffmpeg -i IN -vf scale=1920:-2 OUT.mp4"
        )


def queue_frames(frame: np.ndarray) -> int:
    """Frames of this size the read-ahead and encode queues hold: QUEUE_FRAMES within QUEUE_BYTES."""
    return max(1, min(QUEUE_FRAMES, QUEUE_BYTES // max(1, frame.nbytes)))


class OpenedVideo(NamedTuple):
    """A capture `open_video` opened, what it is, and its first frame (already read)."""

    cap: Any
    info: SourceInfo
    first: np.ndarray


class WatchOutputs(NamedTuple):
    """Files `watch` writes while it runs, each atomically: the annotated video and the per-face CSV."""

    video: Path | None = None
    csv: Path | None = None


# Signals that end `watch` between frames with every output valid: Ctrl-C, `kill`/`timeout`/
# `docker stop`/systemd (SIGTERM), a closed terminal (SIGHUP).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def watch(
    opened: OpenedVideo,
    classify: Callable[[np.ndarray], list[FaceResult]],
    classes: list[str],
    options: WatchOptions,
    outputs: WatchOutputs | None = None,
) -> WatchResult:
    """Run the loop; write the annotated video and CSV atomically (also after Ctrl-C,
    SIGTERM or SIGHUP, which stop it between frames)."""
    info, outputs = opened.info, outputs or WatchOutputs()
    size = output_size(info.width, info.height, options.max_side)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        video = _video_writer(stack, outputs.video, info.fps, size)
        csv_file = None
        if outputs.csv is not None:
            csv_file = stack.enter_context(open(stack.enter_context(_atomic(outputs.csv)), "w", newline="", encoding="utf-8"))
            csv.writer(csv_file).writerow(csv_header(classes))
        sink = _Sink(video, csv_file, classes, queue_frames(np.empty((size[1], size[0], 3), np.uint8)))
        reader = FrameReader(opened.cap, opened.first, latest_only=info.is_camera)
        stop_requested = stack.enter_context(_stop_on_signals())
        loop = _Loop(classify, classes, options, info, size, start)
        try:
            loop.run(reader, sink, stop_requested, show_video=video is not None)
        finally:
            reader.close()
            sink.close()
            if options.show:
                import cv2

                cv2.destroyAllWindows()
    return WatchResult(info, size, loop.frames_read, loop.frames, loop.interrupted, time.perf_counter() - start)


def _video_writer(stack: contextlib.ExitStack, target: Path | None, fps: float, size: tuple[int, int]) -> Any:
    """An OpenCV writer into a temp file that replaces `target` when the stack closes; None without a target."""
    if target is None:
        return None
    import cv2

    codec = VIDEO_SUFFIXES[target.suffix.lower()]
    video = cv2.VideoWriter(str(stack.enter_context(_atomic(target))), cv2.VideoWriter_fourcc(*codec), fps, size)
    if not video.isOpened():
        raise VideoError(f"--out {target}: OpenCV cannot write this format here (codec {codec})")
    stack.callback(video.release)
    return video


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """STOP_SIGNALS only set the returned flag, checked between frames: raising in the
    middle of a frame would leave the CSV, the video and the summary disagreeing."""
    stop_requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop_requested
        return
    previous = {signum: signal.signal(signum, lambda *_: stop_requested.set()) for signum in STOP_SIGNALS}
    try:
        yield stop_requested
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Loop:
    """The frame loop of `watch`: resize, classify every `options.every`-th frame, draw, hand
    to the sink; what it saw stays on it (frames read, per-frame records, interrupted)."""

    def __init__(self, classify: Callable[[np.ndarray], list[FaceResult]], classes: list[str], options: WatchOptions,
                 info: SourceInfo, size: tuple[int, int], start: float) -> None:  # fmt: skip
        self.classify, self.classes, self.options, self.info, self.size, self.start = (
            classify,
            classes,
            options,
            info,
            size,
            start,
        )
        self.frames: list[FrameRecord] = []
        self.frames_read = 0
        self.interrupted = False

    def run(self, reader: Iterable[np.ndarray], sink: Any, stop_requested: threading.Event, show_video: bool) -> None:
        import cv2
        from tqdm import tqdm

        options = self.options
        # disable=None: tqdm stays silent when stderr is not a terminal (logs, CI)
        with tqdm(
            total=self.info.frame_count, unit="frame", disable=None if options.progress else True, dynamic_ncols=True
        ) as bar:
            last: list[FaceResult] = []
            for frame in reader:
                if stop_requested.is_set():
                    self.interrupted = True
                    return
                if (frame.shape[1], frame.shape[0]) != self.size:
                    frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
                rows, last = self._classify(frame, last)
                if show_video or options.show:
                    draw(frame, last, self.classes)  # skipped frames keep the latest boxes: the video stays smooth
                sink.put(frame if show_video else None, rows)
                if options.show:
                    cv2.imshow("ferflow watch", frame)
                    if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                        return
                bar.update(1)

    def _classify(self, frame: np.ndarray, last: list[FaceResult]) -> tuple[list[list[Any]], list[FaceResult]]:
        """CSV rows and faces of this frame when it is one to classify; else none and the last faces."""
        index = self.frames_read
        self.frames_read += 1
        if index % self.options.every:
            return [], last
        t = (time.perf_counter() - self.start) if self.info.is_camera else index / self.info.fps
        result = FrameResult(index, t, self.classify(frame))
        self.frames.append(FrameRecord(index, t, tuple((f.face_id, int(np.argmax(f.probs))) for f in result.faces)))
        return csv_rows(result, self.classes), result.faces


@contextlib.contextmanager
def _atomic(target: Path) -> Iterator[Path]:
    from ferflow.core import files

    with files.atomic_path(target) as tmp:
        yield tmp
