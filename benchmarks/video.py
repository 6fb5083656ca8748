"""Video benchmark: end-to-end frames/s of `ferflow watch` on 640x480, 30 fps video.

    .venv/bin/python benchmarks/video.py [--model models/export] [--frames 300] [--mtcnn-frames 60]
        [--detectors yunet,haar,mtcnn] [--detect-side PX] [--json out.json]

End to end = decode + detect every face + one model call per frame + draw + encode the
annotated MP4 + CSV rows: `video.watch` as the CLI runs it, model loading excluded.
Videos: the astronaut's face (a real photo) drifting over a scrolling background, with
1 face (patch 200 px) and with 4 faces (patch 140 px), generated here.
Baseline, measured in the same run on the same files: decode + encode alone (no faces
detected or classified): what reading and rewriting the video costs at best. Reported:
frames/s, x real time (frames/s / 30), the share of the baseline's speed kept, and frames
per CPU-second of this process (all threads): less sensitive to other load than wall time.
Without --model (or when models/export is missing) it exports an untrained seed001
model (the default architecture) to a temp dir: speed does not depend on the weights.
Not a test: on a shared 2-core machine timings vary; figures in docs/video.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # video_synth.py: test videos

FPS = 30.0
SIZE = (640, 480)


def prepare_model(model: str | None, arch: str, work: Path) -> str:
    if model and Path(model, "MLmodel").is_file():
        return model
    import numpy as np

    from ferflow.core import files
    from ferflow.core.classes import FER_CLASSES
    from ferflow.data.sources.synthetic import generate_face
    from ferflow.model.architectures import build_model
    from ferflow.serving.packaging import export_model

    build_model(arch, len(FER_CLASSES)).save(work / "model.keras")
    files.write_json(work / "label_map.json", {"classes": list(FER_CLASSES)})
    face = generate_face(np.random.default_rng(0), "happy")
    return str(export_model(work / "model.keras", work / "label_map.json", {}, face, work / "export"))


def passthrough(path: Path, out: Path) -> float:
    """Baseline: decode every frame and encode it again (frames/s)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), FPS, SIZE)
    start, n = time.perf_counter(), 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        writer.write(frame)
        n += 1
    writer.release()
    cap.release()
    return n / (time.perf_counter() - start)


def end_to_end(emotion: Any, detector: Any, path: Path, work: Path, detect_side: int | None) -> dict[str, Any]:
    from ferflow.video import analyze as video

    options = video.WatchOptions(progress=False, detect_max_side=detect_side)
    classes = list(emotion.classes)
    cap, info, first = video.open_video(str(path), None)
    classify = video.FrameClassifier(emotion.score, classes, detector, options)
    cpu = time.process_time()
    outputs = video.WatchOutputs(work / "annotated.mp4", work / "frames.csv")
    result = video.watch(video.OpenedVideo(cap, info, first), classify, classes, options, outputs)
    cpu = time.process_time() - cpu
    faces = sum(len(f.faces) for f in result.frames)
    return {
        "frames": result.frames_read,
        "fps": result.frames_read / result.seconds,
        "frames_per_cpu_s": result.frames_read / cpu,
        "faces_per_frame": faces / max(1, len(result.frames)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/export")
    p.add_argument("--arch", default="seed001", help="architecture of the untrained model used without --model")
    p.add_argument("--frames", type=int, default=300, help="frames per video for YuNet and Haar (default 300 = 10 s)")
    p.add_argument("--mtcnn-frames", type=int, default=60, help="frames per video for MTCNN")
    p.add_argument("--detectors", default="yunet,haar,mtcnn", help="comma-separated detector names")
    p.add_argument("--detect-side", type=int, help="watch's --detect-side (default: each detector's own)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    import cv2

    from ferflow.serving.faces import make_detector
    from ferflow.serving.model import load_model
    from video_synth import synthetic_frames, write_video

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_uri = prepare_model(args.model, args.arch, work)
        emotion = load_model(model_uri).unwrap_python_model()
        detectors = {
            name: (make_detector(name, emotion.config.face_margin), args.mtcnn_frames if name == "mtcnn" else args.frames)
            for name in args.detectors.split(",")
        }
        for n_faces, patch in ((1, 200), (4, 140)):
            frames, _ = synthetic_frames(max(args.frames, args.mtcnn_frames), size=SIZE, n_faces=n_faces, patch_side=patch)
            for name, (detector, n_frames) in detectors.items():
                clip = write_video(work / f"{n_faces}-{n_frames}.mp4", frames[:n_frames], FPS)
                base = passthrough(clip, work / "copy.mp4")
                run = end_to_end(emotion, detector, clip, work, args.detect_side)
                rows.append(
                    {
                        "faces": n_faces,
                        "detector": name,
                        "detect_side": args.detect_side or detector.video_side,
                        "frames": run["frames"],
                        "fps": round(run["fps"], 1),
                        "x_real_time": round(run["fps"] / FPS, 2),
                        "frames_per_cpu_second": round(run["frames_per_cpu_s"], 1),
                        "faces_found_per_frame": round(run["faces_per_frame"], 2),
                        "baseline_decode_encode_fps": round(base, 1),
                        "share_of_baseline": round(run["fps"] / base, 3),
                    }
                )
                print(
                    f"{n_faces} face(s) {name:<6}{args.detect_side or detector.video_side:>4} px {run['frames']:>4} frames: {run['fps']:6.1f} frames/s "
                    f"({run['fps'] / FPS:.2f}x real time; {run['frames_per_cpu_s']:.1f} frames per CPU-second; "
                    f"{run['faces_per_frame']:.2f} faces/frame found) | "
                    f"baseline decode+encode {base:6.1f} frames/s, ratio {run['fps'] / base:.3f}",
                    flush=True,
                )
    env = {
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
        "opencv": cv2.__version__,
        "model": args.model,
    }
    print(f"load average (1 min) at the end: {env['load_average_1min']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
