"""`ferflow watch`: every face of each video frame, tracked, classified; outputs and bad input.

Test videos are generated here (OpenCV VideoWriter): the astronaut's face (a real photo
shipped with scikit-image) composited at known, drifting positions on a scrolling background.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ferflow.cli import main
from ferflow.core.classes import FER_CLASSES
from ferflow.data.sources.synthetic import generate_face
from ferflow.serving.faces import Box
from ferflow.video.tracker import IouTracker, iou
from video_synth import synthetic_frames, write_video

REPO = Path(__file__).resolve().parents[2]
N_FRAMES = 20
SIZE = (480, 360)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Path, Path]) -> Path:
    from ferflow.serving.packaging import export_model

    work = tmp_path_factory.mktemp("video-model")
    model, labels = tiny_model
    face = generate_face(np.random.default_rng(0), "sad")
    return export_model(model, labels, {"detect_face": True, "tta": "none"}, face, work / "export")


@pytest.fixture(scope="module")
def four_faces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[Box]]]:
    frames, truth = synthetic_frames(N_FRAMES, size=SIZE, n_faces=4, patch_side=110)
    return write_video(tmp_path_factory.mktemp("videos") / "four.mp4", frames), truth


def count_frames(path: Path) -> tuple[int, tuple[int, int]]:
    cap = cv2.VideoCapture(str(path))
    n, size = 0, (0, 0)
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n, size = n + 1, (frame.shape[1], frame.shape[0])
    cap.release()
    return n, size


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def watch(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["watch", "--quiet", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_every_face_tracked_and_written(capsys, model_dir: Path, four_faces, tmp_path: Path) -> None:
    video, truth = four_faces
    out, table, summary, plot = (tmp_path / n for n in ("annotated.mp4", "frames.csv", "summary.json", "timeline.png"))
    argv = ["--model", str(model_dir), "--out", str(out), "--csv", str(table), "--summary", str(summary)]
    rc, stdout, err = watch(capsys, str(video), *argv, "--timeline", str(plot), "--smooth", "3")
    assert rc == 0, err
    assert "4 face id(s)" in stdout

    rows = read_csv(table)
    assert list(rows[0]) == ["frame", "time_s", "face_id", "x", "y", "w", "h", "label", "confidence", *FER_CLASSES]
    by_frame: dict[int, list[dict[str, str]]] = {}
    for r in rows:
        by_frame.setdefault(int(r["frame"]), []).append(r)
    assert sorted(by_frame) == list(range(N_FRAMES))
    assert all(len(faces) == 4 for faces in by_frame.values())
    # each true face is found in every frame, always under the same id
    ids_of_truth: dict[int, set[str]] = {i: set() for i in range(4)}
    for frame, faces in by_frame.items():
        assert float(faces[0]["time_s"]) == pytest.approx(frame / 30, abs=1e-3)
        for r in faces:
            box = Box(int(r["x"]), int(r["y"]), int(r["w"]), int(r["h"]))
            overlaps = [iou(box, t) for t in truth[frame]]
            assert max(overlaps) >= 0.5
            ids_of_truth[int(np.argmax(overlaps))].add(r["face_id"])
            probs = np.array([float(r[c]) for c in FER_CLASSES])
            assert probs.sum() == pytest.approx(1.0, abs=1e-3)
            assert r["label"] == FER_CLASSES[int(probs.argmax())]
            assert float(r["confidence"]) == pytest.approx(probs.max(), abs=1e-4)
    assert sorted(ids.pop() for ids in ids_of_truth.values() if len(ids) == 1) == ["0", "1", "2", "3"]

    assert count_frames(out) == (N_FRAMES, SIZE)
    s = json.loads(summary.read_text())
    assert (s["frames_read"], s["frames_processed"], s["faces"], s["face_detections"]) == (N_FRAMES, N_FRAMES, 4, 4 * N_FRAMES)
    assert s["interrupted"] is False and s["smooth"] == 3 and s["detector"] == "yunet"
    assert set(s["emotion_share"]) == set(FER_CLASSES) and sum(s["emotion_share"].values()) == pytest.approx(1.0, abs=1e-3)
    labels = [r["label"] for r in rows]
    assert s["dominant_emotion"] == max(FER_CLASSES, key=labels.count)
    assert [f["face_id"] for f in s["per_face"]] == [0, 1, 2, 3]
    assert all(f["detections"] == N_FRAMES and f["first_frame"] == 0 for f in s["per_face"])
    assert sum(b["face_detections"] for b in s["timeline"]) == 4 * N_FRAMES
    assert [b["face_detections"] for b in s["timeline"]] == [4] * N_FRAMES  # one frame per bin: no empty gaps
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_nth_frame(capsys, model_dir: Path, four_faces, tmp_path: Path) -> None:
    video, _ = four_faces
    out, table, summary = tmp_path / "a.avi", tmp_path / "f.csv", tmp_path / "s.json"
    argv = ["--model", str(model_dir), "--every", "3", "--out", str(out), "--csv", str(table), "--summary", str(summary)]
    rc, _, err = watch(capsys, str(video), *argv)
    assert rc == 0, err
    assert sorted({int(r["frame"]) for r in read_csv(table)}) == list(range(0, N_FRAMES, 3))
    timeline = json.loads(summary.read_text())["timeline"]
    assert [b["face_detections"] for b in timeline] == [4] * 7  # bins 3 frames wide: one processed frame each
    assert count_frames(out)[0] == N_FRAMES  # skipped frames are still in the video, with the latest boxes


def test_video_without_faces(capsys, model_dir: Path, tmp_path: Path) -> None:
    from video_synth import background

    wall = background((320, 240))
    video = write_video(tmp_path / "wall.mp4", [cv2.cvtColor(wall[:, i : i + 320], cv2.COLOR_RGB2BGR) for i in range(6)])
    table, summary, plot = tmp_path / "f.csv", tmp_path / "s.json", tmp_path / "t.png"
    argv = ["--model", str(model_dir), "--csv", str(table), "--summary", str(summary), "--timeline", str(plot)]
    rc, stdout, err = watch(capsys, str(video), *argv)
    assert rc == 0, err
    assert "0 face detections" in stdout and read_csv(table) == []
    s = json.loads(summary.read_text())
    assert (s["frames_processed"], s["faces"], s["dominant_emotion"], s["per_face"]) == (6, 0, None, [])
    assert set(s["emotion_share"].values()) == {0.0}
    assert plot.read_bytes()[:4] == b"\x89PNG"


class SteppedCamera:
    """A capture whose frames (numbered 1, 2, ...) come only when the test lets them: no
    sleeps decide what the reader sees."""

    def __init__(self) -> None:
        self.allowed = threading.Semaphore(0)
        self.state = threading.Condition()
        self.produced, self.waiting, self.finished, self.released = 0, False, False, False

    def read(self) -> tuple[bool, np.ndarray | None]:
        with self.state:
            self.waiting = True  # the reader has handled every frame so far and asks for the next
            self.state.notify_all()
        self.allowed.acquire()
        with self.state:
            self.waiting = False
            if self.finished:
                return False, None
            self.produced += 1
            return True, np.full((2, 2), self.produced, np.int32)

    def deliver(self, n: int) -> None:
        """Let the camera produce `n` frames, and wait until the reader has taken them all in."""
        target = self.produced + n
        for _ in range(n):
            self.allowed.release()
        with self.state:
            assert self.state.wait_for(lambda: self.produced == target and self.waiting, timeout=30), self.produced

    def finish(self) -> None:
        self.finished = True
        self.allowed.release()

    def release(self) -> None:
        self.released = True


@pytest.mark.parametrize("latest_only", [True, False], ids=["camera", "file"])
def test_a_camera_reader_keeps_only_the_newest_frame_a_file_reader_keeps_all(latest_only: bool) -> None:
    from ferflow.video.analyze import FrameReader

    camera = SteppedCamera()
    reader = FrameReader(camera, np.zeros((2, 2), np.int32), latest_only=latest_only)
    frames = iter(reader)
    assert int(next(frames)[0, 0]) == 0  # the first frame, read when the source was opened
    camera.deliver(5)  # the consumer is slower than the camera: 5 frames arrive before it asks again
    expected = [5] if latest_only else [1, 2, 3, 4, 5]  # a camera drops the stale ones; a file never does
    assert [int(next(frames)[0, 0]) for _ in expected] == expected
    camera.deliver(1)
    assert int(next(frames)[0, 0]) == 6
    camera.finish()
    assert list(frames) == []
    reader.close()
    assert camera.released


def test_tracker_keeps_ids_and_smooths() -> None:
    tracker = IouTracker(min_iou=0.3, max_missed=2, smooth=3)
    a, b = Box(0, 0, 50, 50), Box(200, 0, 50, 50)
    assert tracker.update([a, b]) == [0, 1]
    assert tracker.update([Box(205, 3, 50, 50), Box(4, 2, 50, 50)]) == [1, 0]  # order does not matter
    assert tracker.update([Box(8, 4, 50, 50)]) == [0]  # face 1 missed once...
    assert tracker.update([Box(8, 4, 50, 50), Box(207, 3, 50, 50)]) == [0, 1]  # ...and keeps its id
    for _ in range(3):
        tracker.update([Box(8, 4, 50, 50)])
    assert tracker.update([Box(207, 3, 50, 50)]) == [2]  # gone for > max_missed frames: a new face
    probs = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), np.array([[0.0, 1.0]]), np.array([[0.0, 1.0]])]
    out = [tracker.smoothed([2], p)[0] for p in probs]
    np.testing.assert_allclose(out[1], [0.5, 0.5])
    np.testing.assert_allclose(out[2], [1 / 3, 2 / 3])
    np.testing.assert_allclose(out[3], [0.0, 1.0])  # only the last 3 frames count
    with pytest.raises(ValueError, match="smooth"):
        IouTracker(smooth=0)


def _with_fourcc(src: Path, dst: Path, fourcc: bytes) -> Path:
    # an AVI whose stream header and bitmap header name a codec nobody implements
    data = src.read_bytes().replace(b"MJPG", fourcc)
    dst.write_bytes(data)
    return dst


def test_bad_inputs_are_one_line_errors(capsys, model_dir: Path, four_faces, tmp_path: Path) -> None:
    video, _ = four_faces
    garbage = tmp_path / "notes.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    empty = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 30, SIZE)
    writer.release()
    frames, _ = synthetic_frames(3, size=(160, 120), n_faces=1, patch_side=80)
    codec = _with_fourcc(write_video(tmp_path / "ok.avi", frames, fourcc="MJPG"), tmp_path / "codec.avi", b"ZZ9Q")
    (tmp_path / "ro").mkdir()
    cases = [
        ([str(tmp_path / "missing.mp4")], "missing.mp4: no such file"),
        ([str(tmp_path)], "not a file"),
        ([str(garbage)], "notes.mp4: not a video OpenCV can decode"),
        ([str(empty)], "empty.avi: the video has zero frames"),
        ([str(codec)], "codec.avi: not a video OpenCV can decode (not a video, damaged, or a container/codec"),
        (["--camera", "97"], "--camera 97: no camera with this index"),
        (["--camera", "-1"], "--camera -1: expected a camera index >= 0"),
        ([], "no SOURCE"),
        ([str(video), "--camera", "0"], "either SOURCE or --camera"),
        ([str(video), "--out", str(tmp_path / "nodir" / "a.mp4")], "--out"),
        ([str(video), "--out", str(tmp_path / "a.gif")], "expected a file ending in .mp4"),
        ([str(video), "--csv", str(tmp_path)], "--csv"),
        ([str(video), "--every", "0"], "--every 0: expected an integer >= 1"),
        ([str(video), "--detect-side", "50"], "--detect-side 50: expected >= 96 pixels"),
        ([str(video), "--model", str(tmp_path)], "not an exported model"),
        ([str(video), "--show"], "--show"),
    ]
    for argv, expected in cases:
        rc, out, err = watch(capsys, *argv, *(["--model", str(model_dir)] if "--model" not in argv else []))
        assert rc == 2, (argv, err)
        assert expected in err, (argv, err)
        assert "Traceback" not in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob(".*.tmp*")), "a failed run left a temp file behind"


def test_frames_over_the_maximum_are_refused_before_decoding_and_queues_are_sized_in_bytes(
    capsys, model_dir: Path, four_faces, tmp_path: Path, monkeypatch
) -> None:
    """#30 item 3 (from the wt-rel helper): a 16000x16000 MJPG reached 4.3 GB RSS."""
    from ferflow.video import analyze

    video, _ = four_faces
    monkeypatch.setattr(analyze, "MAX_SOURCE_PIXELS", 400 * 300)  # stands in for 8K: the 480x360 video is over it
    rc, _, err = watch(capsys, str(video), "--model", str(model_dir), "--csv", str(tmp_path / "f.csv"))
    assert rc == 2 and "frames are 480x360 = 172800 pixels, over the maximum of 120000" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "f.csv").exists()
    assert analyze.queue_frames(np.empty((360, 480, 3), np.uint8)) == analyze.QUEUE_FRAMES  # 0.5 MB frames: 8
    assert analyze.queue_frames(np.empty((4320, 7680, 3), np.uint8)) == 1  # 100 MB frames: one at a time
    assert analyze.queue_frames(np.empty((2160, 3840, 3), np.uint8)) == 2  # 4K: 25 MB each, 64 MB in all


def test_no_output_may_be_the_input_or_another_output(capsys, model_dir: Path, four_faces, tmp_path: Path) -> None:
    """#30 item 2: `--out src.mp4` replaced the source; `--csv a --summary a` kept one of them."""
    video, _ = four_faces
    source = tmp_path / "src.mp4"
    source.write_bytes(video.read_bytes())
    (tmp_path / "link.csv").symlink_to(source)
    os.link(source, tmp_path / "hard.mp4")
    cases = [
        (["--out", str(source)], "--out", "SOURCE"),
        (["--csv", str(source)], "--csv", "SOURCE"),
        (["--csv", str(tmp_path / "link.csv")], "--csv", "SOURCE"),
        (["--out", str(tmp_path / "hard.mp4")], "--out", "SOURCE"),
        (["--csv", str(tmp_path / "a"), "--summary", str(tmp_path / "a")], "--summary", "--csv"),
        (["--csv", str(tmp_path / "b.csv"), "--summary", str(tmp_path / "sub" / ".." / "b.csv")], "--summary", "--csv"),
    ]
    (tmp_path / "sub").mkdir()
    before = source.read_bytes()
    for argv, option, other in cases:
        rc, out, err = watch(capsys, str(source), "--model", str(model_dir), *argv)
        assert rc == 2, (argv, err)
        assert f"{option} " in err and f"the same file as {other}" in err and err.count("\n") == 1, (argv, err)
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.mp4", "link.csv", "src.mp4", "sub"]


def test_huge_frames_are_downscaled(capsys, model_dir: Path, four_faces, tmp_path: Path) -> None:
    video, _ = four_faces
    out = tmp_path / "small.mp4"
    rc, _, err = watch(capsys, str(video), "--model", str(model_dir), "--max-side", "240", "--out", str(out))
    assert rc == 0, err
    assert "processing at 240x180 (--max-side)" in err
    assert count_frames(out) == (N_FRAMES, (240, 180))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "sigterm", "sighup"])
def test_an_interrupt_keeps_valid_outputs(model_dir: Path, tmp_path: Path, signum: int) -> None:
    """Ctrl-C, and (#30 item 2) SIGTERM from timeout/docker stop/systemd and SIGHUP from a closed terminal."""
    frames, _ = synthetic_frames(30, size=(320, 240), n_faces=1, patch_side=100)
    long_video = write_video(tmp_path / "long.mp4", frames * 40)  # 1200 frames: far longer than the wait below
    out, table, summary = tmp_path / "a.mp4", tmp_path / "f.csv", tmp_path / "s.json"
    cmd = [sys.executable, "-m", "ferflow.cli", "watch", str(long_video), "--model", str(model_dir), "--quiet"]
    cmd += ["--out", str(out), "--csv", str(table), "--summary", str(summary)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any(p.stat().st_size > 2000 for p in tmp_path.glob(".f.csv.*")):  # processing has begun
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted after" in stderr and "Traceback" not in stderr
    s = json.loads(summary.read_text())
    assert s["interrupted"] is True and 0 < s["frames_read"] < 1200
    rows = read_csv(table)
    assert len(rows) == s["face_detections"] and all(r["surprise"] != "" for r in rows)  # whole rows only
    assert count_frames(out)[0] == s["frames_read"]
    assert not list(tmp_path.glob(".*.tmp*"))


# ---------------------------------------------------------------- every face of still images


@pytest.fixture(scope="module")
def group_photo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Box]]:
    """A 960x480 PNG with three faces of different sizes at known boxes, the largest in the
    middle (neither first nor last left to right), and a PNG with none."""
    from video_synth import background, group_photo

    d = tmp_path_factory.mktemp("photos")
    photo, truth = group_photo((150, 260, 200))
    cv2.imwrite(str(d / "group.png"), photo)
    cv2.imwrite(str(d / "wall.png"), background((320, 240))[:, :320])
    return d / "group.png", d / "wall.png", truth


def test_serving_param_faces_all_returns_every_face(model_dir: Path, group_photo) -> None:
    import base64

    import mlflow
    import pandas as pd

    group, wall, truth = group_photo
    crop = generate_face(np.random.default_rng(1), "happy")
    _, png = cv2.imencode(".png", crop)
    images = [base64.b64encode(p.read_bytes()).decode() for p in (group, wall)] + [base64.b64encode(png.tobytes()).decode()]
    model = mlflow.pyfunc.load_model(str(model_dir))
    request = pd.DataFrame({"image": images})

    default = model.predict(request)
    assert len(default) == 3 and "image_index" not in default.columns  # unchanged: one row per image

    every = model.predict(request, params={"faces": "all"})
    assert every["image_index"].tolist() == [0, 0, 0, 1, 2]
    assert every["face_found"].tolist() == [True, True, True, False, False]
    boxes = [Box(*(int(v) for v in row)) for row in every[["face_x", "face_y", "face_w", "face_h"]].to_numpy()[:3]]
    assert sorted(max(range(3), key=lambda i: iou(b, truth[i])) for b in boxes) == [0, 1, 2]
    assert min(max(iou(b, t) for t in truth) for b in boxes) >= 0.5
    # the largest face (the middle one) comes first, and it is the default mode's answer for that image
    assert (
        iou(boxes[0], truth[1]) >= 0.5
        and iou(Box(*(int(v) for v in default.iloc[0][["face_x", "face_y", "face_w", "face_h"]])), truth[1]) >= 0.5
    )
    assert every.iloc[0][["face_x", "face_y", "label"]].tolist() == default.iloc[0][["face_x", "face_y", "label"]].tolist()
    assert every.iloc[3:].drop(columns="image_index").reset_index(drop=True).equals(default.iloc[1:].reset_index(drop=True))

    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="param 'faces' = 'every'"):
        model.predict(request, params={"faces": "every"})


def test_predict_all_faces_cli(capsys, model_dir: Path, group_photo, tmp_path: Path) -> None:
    group, wall, _ = group_photo
    rc = main(["predict", "--model", str(model_dir), "--all-faces", "--json", str(group), str(wall)])
    records = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [len(r["faces"]) for r in records] == [3, 1]
    assert all(f["face_found"] for f in records[0]["faces"]) and not records[1]["faces"][0]["face_found"]
    assert records[0]["face_box"] == records[0]["faces"][0]["face_box"]  # top-level fields: the largest face

    rc = main(["predict", "--model", str(model_dir), "--all-faces", str(group), "--annotate", str(tmp_path / "a.png")])
    table = capsys.readouterr().out
    assert rc == 0
    assert [f"group.png#{k}" in table for k in range(3)] == [True] * 3
    assert cv2.imread(str(tmp_path / "a.png")).shape == (480, 960, 3)


def test_detectors_find_the_astronaut() -> None:
    from skimage import data

    from ferflow.serving.faces import make_detector
    from video_synth import ASTRONAUT_FACE

    photo = data.astronaut()
    for name in ("yunet", "haar", "mtcnn"):
        detector = make_detector(name)
        found = detector.detect_all(photo)
        assert len(found) == 1 and iou(found[0], ASTRONAUT_FACE) >= 0.5, (name, found)
    with pytest.raises(ValueError, match="face detector 'dlib': expected one of yunet, haar, mtcnn"):
        make_detector("dlib")


def test_face_detector_setting_is_checked(tmp_path: Path) -> None:
    from conftest import write_params
    from ferflow.core.params import ParamsError, ServeParams, load_params

    write_params(tmp_path / "params.yaml", {"serve": {"face_detector": "yolo"}})
    with pytest.raises(ParamsError, match="serve.face_detector"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(ValueError, match="serve.face_detector = 'yolo'"):
        ServeParams.from_mapping({"face_detector": "yolo"})
    assert ServeParams.from_mapping({"face_detector": "mtcnn"}).face_detector == "mtcnn"


def test_mtcnn_serving_and_watch(capsys, model_dir: Path, tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    from skimage import data

    from ferflow.core.params import ServeParams
    from ferflow.serving.pyfunc import EmotionModel
    from video_synth import ASTRONAUT_FACE, CAMERAMAN_FACE

    emotion = EmotionModel()
    emotion.setup(str(tiny_model[0]), str(tiny_model[1]), ServeParams(face_detector="mtcnn"))
    _, png = cv2.imencode(".png", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    out = emotion.predict(None, {"image": [png.tobytes()]}, params={"faces": "all"})
    assert out["face_found"].tolist() == [True]
    assert iou(Box(*(int(v) for v in out.iloc[0][["face_x", "face_y", "face_w", "face_h"]])), ASTRONAUT_FACE) >= 0.5

    # the cameraman (three-quarter profile): Haar misses him; YuNet (the export's detector) and MTCNN find him
    cv2.imwrite(str(tmp_path / "camera.png"), data.camera())
    for extra, found in ((["--detector", "haar"], False), ([], True), (["--detector", "mtcnn"], True)):
        assert main(["predict", "--model", str(model_dir), "--json", str(tmp_path / "camera.png"), *extra]) == 0
        record = json.loads(capsys.readouterr().out)[0]
        assert record["face_found"] is found
        assert not found or iou(Box(*record["face_box"]), CAMERAMAN_FACE) >= 0.5

    frames, _ = synthetic_frames(4, size=(320, 240), n_faces=1, patch_side=120)
    video = write_video(tmp_path / "one.mp4", frames)
    rc, _, err = watch(capsys, str(video), "--model", str(model_dir), "--detector", "mtcnn", "--csv", str(tmp_path / "f.csv"))
    assert rc == 0, err
    rows = read_csv(tmp_path / "f.csv")
    assert [r["frame"] for r in rows] == ["0", "1", "2", "3"] and {r["face_id"] for r in rows} == {"0"}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*An input example was not provided:UserWarning")
def test_watch_with_a_registered_model_uri(
    capsys, tiny_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from ferflow.serving.packaging import ModelFiles, model_kwargs
    from ferflow.serving.registry import Evaluated, register_and_promote

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.MlflowClient().create_experiment("video-test", artifact_location=(tmp_path / "artifacts").as_uri())
        face = generate_face(np.random.default_rng(0), "sad")
        from ferflow.core import files

        files.write_json(tmp_path / "serve.json", {"face_detector": "haar"})
        kwargs = model_kwargs(ModelFiles(tiny_model[0], tiny_model[1]), tmp_path / "serve.json", face)
        kwargs.pop("input_example")
        with mlflow.start_run(experiment_id=exp):
            register_and_promote(kwargs, "ferflow-video", Evaluated(0.5, "test-set-of-this-test", list(FER_CLASSES)), False)
        frames, _ = synthetic_frames(3, size=(320, 240), n_faces=1, patch_side=120)
        video = write_video(tmp_path / "one.mp4", frames)
        rc, out, err = watch(capsys, str(video), "--model", "models:/ferflow-video@champion", "--csv", str(tmp_path / "f.csv"))
        assert rc == 0, err
        assert len(read_csv(tmp_path / "f.csv")) == 3
        rc, _, err = watch(capsys, str(video), "--model", "models:/ferflow-video@nobody")
        assert rc == 2 and "--model models:/ferflow-video@nobody: cannot load the model" in err and err.count("\n") == 1, err
    finally:
        mlflow.set_tracking_uri(previous_uri)
