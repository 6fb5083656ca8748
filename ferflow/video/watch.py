"""Emotions of every face in a video file or webcam stream (annotated video, CSV, summary, timeline).

    ferflow watch clip.mp4 --out annotated.mp4 --csv frames.csv --summary summary.json --timeline timeline.png
    ferflow watch --camera 0 --show --smooth

Exit status: 0 done, 2 bad source/option/output, 130 interrupted (Ctrl-C; outputs so far are complete).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ferflow.core.params import FACE_DETECTORS, TTA_MODES
from ferflow.serving.model import DEFAULT_MODEL

# Only light imports here: `ferflow --help` imports this module to list the subcommand.

DEFAULT_SMOOTH = 5  # frames averaged by a bare --smooth: ~1/6 s at 30 fps, enough to stop flicker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", metavar="SOURCE", help="video file (anything OpenCV/FFmpeg decodes)")
    parser.add_argument("--camera", type=int, metavar="N", help="read OpenCV camera N instead of a file")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"exported model directory or MLflow model URI, e.g. models:/ferflow-emotion@champion (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--out", metavar="OUT.mp4", help="write the annotated video (.mp4/.m4v/.mov: mp4v; .avi/.mkv: MJPG)")
    parser.add_argument("--csv", metavar="FRAMES.csv", help="one row per face per processed frame")
    parser.add_argument("--summary", metavar="SUMMARY.json", help="per-video summary (dominant emotions, shares, timeline)")
    parser.add_argument("--timeline", metavar="TIMELINE.png", help="plot of emotion shares over time")
    parser.add_argument("--every", type=int, default=1, metavar="N", help="process every Nth frame (default 1)")
    parser.add_argument(
        "--smooth",
        type=int,
        nargs="?",
        const=DEFAULT_SMOOTH,
        default=1,
        metavar="K",
        help=f"average each face's probabilities over its last K processed frames (bare flag: {DEFAULT_SMOOTH})",
    )
    parser.add_argument("--detector", choices=FACE_DETECTORS, help="face detector (default: the model's serve.face_detector)")
    parser.add_argument("--tta", choices=TTA_MODES, default="none", help="test-time augmentation (default none: speed)")
    parser.add_argument(
        "--max-side", type=int, default=None, metavar="PX", help="downscale frames whose longer side exceeds PX (default 1920)"
    )
    parser.add_argument(
        "--detect-side",
        type=int,
        default=None,
        metavar="PX",
        help="run the detector on a copy PX on its longer side (default: yunet 800, haar/mtcnn 320; larger finds smaller faces, slower)",
    )
    parser.add_argument("--show", action="store_true", help="show the annotated frames in a window (q or Esc stops)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:  # before the first frame (loading the model): nothing written yet
        print("interrupted before processing began; nothing written", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from ferflow.serving.model import UsageError, load_model
    from ferflow.video import analyze as video

    try:
        options = _options(args, video)
        if args.source is not None and args.camera is not None:
            raise video.VideoError("give either SOURCE or --camera N, not both")
        out_video, out_csv, out_summary, out_timeline = _checked_outputs(args, video)
        if options.show:
            video.check_display()
        cap, info, first = video.open_video(args.source, args.camera)
        try:
            emotion = load_emotion_model(args.model, load_model, video.VideoError)
            detector_name = args.detector or emotion.config.face_detector
            detector = emotion.detector if detector_name == emotion.detector.name else _make_detector(detector_name, emotion)
        except BaseException:
            cap.release()
            raise
    except (video.VideoError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if options.max_side < max(info.width, info.height):
        size = video.output_size(info.width, info.height, options.max_side)
        print(f"note: {info.name} is {info.width}x{info.height}; processing at {size[0]}x{size[1]} (--max-side)", file=sys.stderr)
    classes = list(emotion.classes)
    classify = video.FrameClassifier(emotion.score, classes, detector, options)
    try:
        result = video.watch(
            video.OpenedVideo(cap, info, first), classify, classes, options, video.WatchOutputs(out_video, out_csv)
        )
    except video.VideoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up while writing
        print(f"error: writing the outputs failed: {exc}", file=sys.stderr)
        return 2
    from ferflow.core import files
    from ferflow.video.summary import plot_timeline, summarize

    summary = summarize(result, classes, options.every, options.smooth, detector.name)
    if out_summary is not None:
        files.write_json(out_summary, summary)
    if out_timeline is not None:
        plot_timeline(summary, classes, out_timeline)
    rate = len(result.frames) / max(result.seconds, 1e-9)
    print(
        f"{info.name}: {result.frames_read} frames read, {len(result.frames)} processed ({rate:.1f}/s), "
        f"{summary['face_detections']} face detections, {summary['faces']} face id(s), "
        f"dominant emotion: {summary['dominant_emotion'] or '-'}"
    )
    for path in (out_video, out_csv, out_summary, out_timeline):
        if path is not None:
            print(f"wrote {path}")
    if result.interrupted:
        print(f"interrupted after {result.frames_read} frames; the outputs above hold everything up to there", file=sys.stderr)
        return 130
    return 0


def _checked_outputs(args: argparse.Namespace, video) -> tuple[Path | None, ...]:
    """--out, --csv, --summary, --timeline, each checked, none the input or another output
    (after links: replacing it would destroy the input or lose an output)."""
    outputs = {
        "--out": video.check_output(args.out, "--out", tuple(video.VIDEO_SUFFIXES)),
        "--csv": video.check_output(args.csv, "--csv"),
        "--summary": video.check_output(args.summary, "--summary"),
        "--timeline": video.check_output(args.timeline, "--timeline", (".png",)),
    }
    seen = {_file_identity(Path(args.source)): "SOURCE"} if args.source is not None else {}
    for option, path in outputs.items():
        if path is None:
            continue
        other = seen.setdefault(_file_identity(path), option)
        if other != option:
            raise video.VideoError(
                f"{option} {path}: the same file as {other}; every output needs a file of its own, not the input"
            )
    return tuple(outputs.values())


def _file_identity(path: Path) -> tuple[int, int] | str:
    """One key per file: (device, inode) of an existing file (hard and symbolic links alike),
    else the path with links and `..` resolved."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def _options(args: argparse.Namespace, video):
    if args.every < 1:
        raise video.VideoError(f"--every {args.every}: expected an integer >= 1")
    if args.smooth < 1:
        raise video.VideoError(f"--smooth {args.smooth}: expected an integer >= 1 (frames)")
    max_side = video.MAX_FRAME_SIDE if args.max_side is None else args.max_side
    if max_side < 96:
        raise video.VideoError(f"--max-side {max_side}: expected >= 96 pixels")
    detect_side = args.detect_side  # None: the detector's own (yunet 800, haar and mtcnn 320)
    if detect_side is not None and detect_side < 96:
        raise video.VideoError(f"--detect-side {detect_side}: expected >= 96 pixels")
    return video.WatchOptions(
        every=args.every,
        smooth=args.smooth,
        tta=args.tta,
        max_side=max_side,
        detect_max_side=detect_side,
        show=args.show,
        progress=not args.quiet,
    )


def load_emotion_model(uri: str, load_model, error: type[Exception]):
    """The ferflow pyfunc behind an export directory or MLflow URI, or a one-line error."""
    from mlflow.exceptions import MlflowException

    try:
        model = load_model(uri)
    except (MlflowException, OSError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise error(
            f"--model {uri}: cannot load the model: {message.splitlines()[0] if message else type(exc).__name__}"
        ) from None
    emotion = model.unwrap_python_model() if hasattr(model, "unwrap_python_model") else None
    if not all(hasattr(emotion, a) for a in ("predictor", "classes", "config", "detector")):
        raise error(f"--model {uri}: not a ferflow emotion model (exported by the export stage)")
    return emotion


def _make_detector(name: str, emotion):
    from ferflow.serving.faces import make_detector

    return make_detector(name, emotion.config.face_margin)
