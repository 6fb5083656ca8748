"""`ferflow demo`: the page in a real browser (Debian's headless Chromium with a fake webcam
playing a clip of a real face), and the server's answers to bad uploads over plain HTTP.

The browser tests skip, saying why, where Chromium or its driver is missing (`make
system-deps` installs both as root, like PostgreSQL). FERFLOW_DEMO_SCREENSHOTS=docs/img
also writes the README's screenshots there; the webcam test prints the measured frames/s.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests

from conftest import BIN
from ferflow.cli import build_parser
from ferflow.core.classes import FER_CLASSES
from ferflow.data.sources.synthetic import generate_face
from ferflow.serving.faces import Box
from ferflow.tracking.server import free_port
from video_synth import synthetic_frames, write_video

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MAX_PHOTO_BYTES = 2_000_000  # the test model's serve.max_image_bytes: the demo's photo limit
MAX_VIDEO_MB = 5
# Live, not one frame: the issue's >= 10 labelled frames/s is a speed figure, measured with this
# test run alone (docs/results.md); a shared CI machine got 9.6 beside a training, so the
# assertion keeps a 5x margin below it rather than timing the machine.
MIN_LIVE_FPS = 2.0
SCREENSHOTS = os.environ.get("FERFLOW_DEMO_SCREENSHOTS")
needs_chromium = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="Chromium is not installed (sudo apt-get install chromium chromium-driver, or `make system-deps` as root)",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Path, Path]) -> Path:
    from ferflow.serving.packaging import export_model

    work = tmp_path_factory.mktemp("demo-model")
    model, labels = tiny_model
    face = generate_face(np.random.default_rng(0), "sad")
    serve = {"detect_face": True, "tta": "none", "max_image_bytes": MAX_PHOTO_BYTES}
    return export_model(model, labels, serve, face, work / "export")


@pytest.fixture(scope="module")
def demo_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`ferflow demo` on a free loopback port, in its own process group; stopped after the module."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo-server") / "server.log"
    cmd = [str(BIN / "ferflow"), "demo", "--model", str(model_dir), "--port", str(port), "--max-video-mb", str(MAX_VIDEO_MB)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/api/info", timeout=5).ok:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ferflow demo did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A photo of three real faces at known boxes, a short video, the fake camera's clip, bad files."""
    d = tmp_path_factory.mktemp("demo-media")
    frames, truth = synthetic_frames(1, size=(960, 480), n_faces=3, patch_side=150)
    cv2.imwrite(str(d / "group.png"), frames[0])
    clip, _ = synthetic_frames(90, size=(640, 480), n_faces=1, patch_side=220)
    write_y4m(d / "camera.y4m", clip)
    write_video(d / "clip.mp4", clip[:45])
    (d / "notes.png").write_text("a text file with an image's name")
    (d / "empty.mp4").write_bytes(b"")
    return {"dir": d, "group": d / "group.png", "truth": truth[0], "camera": d / "camera.y4m", "video": d / "clip.mp4"}


def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 30) -> Path:
    """BGR frames as the uncompressed YUV4MPEG2 (4:2:0) file Chromium's fake camera plays in a loop."""
    height, width = frames[0].shape[:2]
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            out.write(b"FRAME\n")
            out.write(cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())  # Y, then U, then V planes
    return path


def test_demo_is_a_cli_subcommand() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.model, args.host, args.port, args.open) == ("models/export", "127.0.0.1", 8765, False)


def test_demo_refuses_a_model_that_is_not_there(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "ferflow"), "demo", "--model", str(tmp_path / "missing"), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not an exported model" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_refuses_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [str(BIN / "ferflow"), "demo", "--model", "anything", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: --host 127.0.0.1 --port {port}: cannot listen there" in proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- bad uploads over HTTP


def declared_huge_photo(url: str) -> tuple[int, dict[str, Any]]:
    """A request that announces a 3 GB photo and sends a few bytes: refused from its header."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/api/photo?name=huge.jpg")
        conn.putheader("Content-Length", str(3_000_000_000))
        conn.endheaders()
        conn.send(b"\xff\xd8\xff\xe0" * 16)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def chunked(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    """A body without Content-Length: the server only learns its size while reading it."""
    yield from (data[i : i + size] for i in range(0, len(data), size))


BAD_UPLOADS = [
    ("photo", "notes.txt", lambda _: b"plain text, not an image", 400, "not an image"),
    ("photo", "empty.jpg", lambda _: b"", 400, "empty file"),
    ("photo", "cut.png", lambda m: m["group"].read_bytes()[:3000], 400, "corrupt or truncated"),
    ("photo", "big.png", lambda _: chunked(b"\0" * (MAX_PHOTO_BYTES + 1)), 413, "over the demo's limit"),
    ("video", "empty.mp4", lambda _: b"", 400, "empty file (0 bytes)"),
    ("video", "notes.mp4", lambda _: b"plain text, not a video" * 100, 400, "not a video OpenCV can decode"),
    ("video", "big.mp4", lambda _: chunked(b"\0" * (MAX_VIDEO_MB * 1_000_000 + 1)), 413, "over the demo's limit"),
    ("frame", "frame", lambda _: b"\x89PNG but not really", 400, "not a JPEG/PNG image"),
]


def test_bad_uploads_get_one_line_each_and_the_server_keeps_answering(demo_url: str, media: dict[str, Any]) -> None:
    for i in range(50):
        kind, name, body, status, reason = BAD_UPLOADS[i % len(BAD_UPLOADS)]
        query = "stream=bad" if kind == "frame" else f"name={name}"
        response = requests.post(f"{demo_url}/api/{kind}?{query}", data=body(media), timeout=60)
        assert response.status_code == status, (name, response.text)
        message = response.json()["error"]
        assert reason in message and "\n" not in message and "Traceback" not in message, message
    status, answer = declared_huge_photo(demo_url)
    assert status == 413 and "3,000,000,000 bytes, over the demo's limit of 2,000,000" in answer["error"]
    # still answering, and still right: three faces in the group photo
    good = requests.post(f"{demo_url}/api/photo?name=group.png", data=media["group"].read_bytes(), timeout=60)
    assert good.status_code == 200 and sum(f["face_found"] for f in good.json()["faces"]) == 3


def test_a_long_video_is_refused_with_its_length(demo_url: str, tmp_path: Path) -> None:
    frames = [np.full((96, 96, 3), 80 + i % 50, np.uint8) for i in range(125)]
    long_clip = write_video(tmp_path / "long.mp4", frames, fps=1.0)  # 125 s, a few KB
    response = requests.post(f"{demo_url}/api/video?name=long.mp4", data=long_clip.read_bytes(), timeout=60)
    assert response.status_code == 400
    assert (
        response.json()["error"] == "long.mp4: 125 s long; the demo takes videos up to 120 s (`ferflow watch` takes any length)"
    )


def test_photo_answer_is_the_served_models(demo_url: str, media: dict[str, Any], model_dir: Path) -> None:
    """The page gets exactly what `ferflow predict --all-faces` prints: the same code, not a copy."""
    from ferflow.serving.predict import load_model, predict_files

    (expected,) = predict_files(load_model(str(model_dir)), [media["group"]], {"faces": "all"})
    answer = requests.post(f"{demo_url}/api/photo?name=group.png", data=media["group"].read_bytes(), timeout=60).json()
    assert [f["face_box"] for f in answer["faces"]] == [f["face_box"] for f in expected["faces"]]
    assert [f["label"] for f in answer["faces"]] == [f["label"] for f in expected["faces"]]
    assert [f["confidence"] for f in answer["faces"]] == pytest.approx([f["confidence"] for f in expected["faces"]], abs=1e-5)


# ---------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def browser(media: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1200,2400",  # tall: element screenshots are clipped to the window
        # a fake webcam that plays the clip, and no permission prompt for it
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={media['camera']}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser: Any, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "model").text.startswith("model: "))


def wait_for(browser: Any, condition: str, timeout: float = 60) -> Any:
    """Poll a JavaScript expression until it is truthy; return its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda d: d.execute_script(f"return {condition};"))


def drop_file(browser: Any, path: Path, target_id: str) -> None:
    """Drop a file onto an element, as a person dragging it from their files would: the file is
    read through a file input (the only way a page gets one), then dropped with a DataTransfer."""
    browser.execute_script(
        "const i = document.createElement('input'); i.type = 'file'; i.id = 'test-file'; document.body.append(i);"
    )
    browser.find_element("id", "test-file").send_keys(str(path))
    browser.execute_script(
        """const file = document.getElementById('test-file').files[0];
        const data = new DataTransfer(); data.items.add(file);
        document.getElementById(arguments[0]).dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
        document.getElementById('test-file').remove();""",
        target_id,
    )


def screenshot(element: Any, name: str) -> None:
    """The element as a JPEG in FERFLOW_DEMO_SCREENSHOTS (PNG of the noisy test pictures: ~1 MB)."""
    if SCREENSHOTS:
        from PIL import Image

        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        with Image.open(io.BytesIO(element.screenshot_as_png)) as img:
            img.convert("RGB").save(Path(SCREENSHOTS) / name, format="JPEG", quality=85, optimize=True)


def box_from_style(style: dict[str, str], width: int, height: int) -> Box:
    x, y, w, h = (float(style[k].rstrip("%")) / 100 for k in ("left", "top", "width", "height"))
    return Box(round(x * width), round(y * height), round(w * width), round(h * height))


def covers(box: Box, face: Box) -> bool:
    """The square drawn on the page holds the face's centre and is about its size."""
    cx, cy = face.x + face.w / 2, face.y + face.h / 2
    return box.x <= cx <= box.x + box.w and box.y <= cy <= box.y + box.h and 0.5 < box.w / face.w < 2.5


@needs_chromium
def test_a_dropped_photo_gets_one_box_per_face(browser: Any, demo_url: str, media: dict[str, Any]) -> None:
    open_page(browser, demo_url)
    drop_file(browser, media["group"], "drop")
    wait_for(browser, "document.querySelector('.photo-result[data-done]')")
    boxes = browser.execute_script(
        """return [...document.querySelectorAll('.photo-result .face-box')].map(b => ({
            found: !b.classList.contains('whole'), label: b.dataset.label, text: b.textContent,
            style: {left: b.style.left, top: b.style.top, width: b.style.width, height: b.style.height}}));"""
    )
    assert len(boxes) == 3 and all(b["found"] for b in boxes), boxes
    drawn = [box_from_style(b["style"], 960, 480) for b in boxes]
    assert all(any(covers(box, face) for box in drawn) for face in media["truth"]), (drawn, media["truth"])
    for b in boxes:  # "label 0.xx" on each box
        label, confidence = b["text"].split()
        assert label == b["label"] and label in FER_CLASSES and 0 < float(confidence) <= 1
    screenshot(browser.find_element("css selector", ".photo-result"), "demo-photo.jpg")


@needs_chromium
def test_bad_files_show_a_message_on_the_page(browser: Any, demo_url: str, media: dict[str, Any]) -> None:
    open_page(browser, demo_url)
    browser.find_element("id", "photo-input").send_keys(str(media["dir"] / "notes.png"))
    message = wait_for(browser, "document.querySelector('.photo-result .message:not(.info)')?.textContent")
    assert message == "notes.png: not an image (unrecognised format)"
    browser.find_element("id", "video-input").send_keys(str(media["dir"] / "empty.mp4"))
    message = wait_for(
        browser, "document.getElementById('video-message').hidden ? '' : document.getElementById('video-message').textContent"
    )
    assert message == "empty.mp4: empty file (0 bytes); expected a video"
    # a photo over the limit is refused by the page itself, before any upload
    big = media["dir"] / "big.png"
    big.write_bytes(b"\0" * (MAX_PHOTO_BYTES + 1))
    browser.find_element("id", "photo-input").send_keys(str(big))
    message = wait_for(
        browser,
        "document.querySelector('.photo-result .message:not(.info)')?.textContent.startsWith('big.png') && document.querySelector('.photo-result .message').textContent",
    )
    assert message == "big.png: 2.0 MB, over the limit of 2.0 MB a photo"


@needs_chromium
def test_an_uploaded_video_gets_the_watch_summary_and_timeline(browser: Any, demo_url: str, media: dict[str, Any]) -> None:
    open_page(browser, demo_url)
    browser.find_element("id", "video-input").send_keys(str(media["video"]))
    wait_for(browser, "!document.getElementById('video-result').hidden", timeout=180)
    rows = dict(
        browser.execute_script(
            "return [...document.querySelectorAll('#video-summary tr')].map(r => [r.cells[0].textContent, r.cells[1].textContent]);"
        )
    )
    assert rows["video"] == "clip.mp4" and rows["size"].startswith("640x480")
    assert rows["frames processed"].startswith("45 ") and rows["dominant emotion"] in FER_CLASSES
    assert int(rows["frames with faces"]) >= 40 and int(rows["face ids"]) >= 1
    assert wait_for(browser, "document.getElementById('video-timeline').naturalWidth") > 500  # the timeline PNG shows
    screenshot(browser.find_element("id", "video-panel"), "demo-video.jpg")


@needs_chromium
def test_the_webcam_is_labelled_live(browser: Any, demo_url: str) -> None:
    open_page(browser, demo_url)
    browser.find_element("id", "camera-toggle").click()
    label = wait_for(browser, "document.querySelector('#camera-stage .face-box .label')?.textContent")
    assert label.split()[1] in FER_CLASSES  # "#id label confidence" over the live video
    time.sleep(2)  # past start-up: the model's first calls, the camera's first frames

    def counted() -> tuple[int, int, float]:
        c = browser.execute_script("const c = window.ferflowDemo.camera; return [c.frames, c.labelled, performance.now()];")
        return c[0], c[1], c[2] / 1000

    frames0, labelled0, t0 = counted()
    time.sleep(6)
    frames1, labelled1, t1 = counted()
    fps = (labelled1 - labelled0) / (t1 - t0)
    print(f"\nwebcam in the browser: {fps:.1f} labelled frames/s ({frames1 - frames0} frames answered in {t1 - t0:.1f} s)")
    assert labelled1 - labelled0 >= 0.9 * (frames1 - frames0)  # the face is found in (nearly) every frame
    shown = browser.find_element("id", "fps").text
    assert shown.endswith("labelled frames/s") and float(shown.split()[0]) > 0
    screenshot(browser.find_element("id", "camera-panel"), "demo-webcam.jpg")
    browser.find_element("id", "camera-toggle").click()
    assert fps >= MIN_LIVE_FPS, f"{fps:.1f} labelled frames/s: the video is not labelled live"


def test_pages_and_scripts_ship_with_the_package() -> None:
    """Offline: every script and style the page loads is a file of ferflow/demo/static."""
    import re

    from ferflow.demo.app import STATIC

    page = (STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(r.startswith("/static/") and (STATIC / r.removeprefix("/static/")).is_file() for r in refs), refs
    for name in ("index.html", "demo.js", "demo.css"):
        assert not re.search(r"https?://(?!127\.0\.0\.1)", (STATIC / name).read_text()), name
