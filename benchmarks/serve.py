"""Serving benchmark: a real `mlflow models serve` on a free loopback port vs plain Keras.

    .venv/bin/python benchmarks/serve.py [--model models/export] [--requests 300] [--json out.json]

Measures, in one run:
  * warm single-image latency over HTTP (p50/p95/p99, >= 200 requests): one 48x48 face
    as base64 PNG (`dataframe_split`), and as a uint8 pixel tensor (`inputs`); plus a
    640x480 JPEG photo, which goes through the Haar face detector;
  * batched throughput over HTTP: batches of 64 PNGs (images/s);
  * the baseline in this process: `model.predict` on one image (the call people write
    first) and on batches of 64, plus `predict_on_batch`, which the pyfunc uses.
`--mode hostile` (issue #20 item 8): a good client's p50 alone, then while a hostile
client keeps sending the costliest requests the server still accepts (serve defaults:
images adding up to serve.max_request_pixels; serve.max_images_per_request faces with
tta tencrop) plus over-limit ones it refuses; prints the p50 ratio (target <= 2).
`--mode attack` (issue #30): 217 every-face ten-crop mosaics, refused how fast, RSS vs idle.
`--mode load --seconds 60` (issue #30): 8 clients of batches, every-face, ten-crop, tensors: errors, p99.
`--mode runtimes` (issue #31): the same export served on each serve.runtime (onnx, keras),
one server after the other: time from start to the first answer, p50 of one 48x48 PNG,
batched faces/s (batches of --batch PNGs), and the server's RSS after --rss-requests
(default 1,000) requests; printed side by side.
`--mode soak --seconds N` (item 10): N seconds of mixed good and bad requests from two
clients, the server's RSS (all its processes) sampled every second: start, peak, end.
Without --model (or when models/export is missing) it exports an untrained `--arch`
model to a temp dir: speed does not depend on the weights. Not a test: timings on a
shared 2-core machine vary; run it on a quiet machine for README figures.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {
        "n": int(len(ms)),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def png_b64(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def faces(n: int, seed: int = 0) -> np.ndarray:
    from ferflow.core.classes import FER_CLASSES
    from ferflow.data.sources.synthetic import generate_face

    rng = np.random.default_rng(seed)
    return np.stack([generate_face(rng, FER_CLASSES[i % len(FER_CLASSES)]) for i in range(n)])


def prepare_model(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """(pyfunc directory, .keras file) to benchmark."""
    if args.model and (Path(args.model) / "MLmodel").is_file():
        export = Path(args.model)
        return export, export / "artifacts" / "model.keras"
    if args.model:
        raise SystemExit(f"{args.model}: not an exported model (no MLmodel file)")
    from ferflow.core import files
    from ferflow.core.classes import FER_CLASSES
    from ferflow.model.architectures import build_model
    from ferflow.serving.packaging import export_model

    keras_path = work / "model.keras"
    build_model(args.arch, len(FER_CLASSES)).save(keras_path)
    files.write_json(work / "label_map.json", {"classes": list(FER_CLASSES)})
    serve = {"detect_face": True, "tta": "none", "max_image_bytes": 10_000_000, "max_image_pixels": 25_000_000}
    return export_model(keras_path, work / "label_map.json", serve, faces(1)[0], work / "export"), keras_path


def time_requests(session: Any, url: str, payloads: list[str], warmup: int) -> list[float]:
    headers = {"Content-Type": "application/json"}
    for body in payloads[:warmup]:
        session.post(url, data=body, headers=headers, timeout=60).raise_for_status()
    samples = []
    for body in payloads[warmup:]:
        start = time.perf_counter()
        resp = session.post(url, data=body, headers=headers, timeout=60)
        samples.append(time.perf_counter() - start)
        resp.raise_for_status()
    return samples


def baseline(keras_path: Path, x: np.ndarray, n: int, batch: int) -> dict[str, Any]:
    import keras

    from ferflow.data.preprocessing import normalize

    model = keras.models.load_model(keras_path, compile=False)
    xs = normalize(x)
    one = xs[:1]
    for _ in range(5):
        model.predict(one, verbose=0)
        model.predict_on_batch(one)
    predict_one, on_batch_one = [], []
    for i in range(n):
        xi = xs[i % len(xs) : i % len(xs) + 1]
        t = time.perf_counter()
        model.predict(xi, verbose=0)
        predict_one.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.predict_on_batch(xi)
        on_batch_one.append(time.perf_counter() - t)
    xb = xs[:batch]
    model.predict(xb, verbose=0)
    reps = max(3, 2000 // batch)
    t = time.perf_counter()
    for _ in range(reps):
        model.predict(xb, verbose=0)
    predict_batch = reps * len(xb) / (time.perf_counter() - t)
    return {
        "model.predict_single": percentiles(predict_one),
        "predict_on_batch_single": percentiles(on_batch_one),
        f"model.predict_batch{batch}_images_per_s": predict_batch,
    }


def rows(images: list[str], params: dict[str, Any] | None = None) -> str:
    """A request body: base64 images as the `image` column, optional params."""
    body: dict[str, Any] = {"dataframe_split": {"columns": ["image"], "data": [[img] for img in images]}}
    return json.dumps(body | ({"params": params} if params else {}))


def blank_png_b64(width: int, height: int) -> str:
    return png_b64(np.zeros((height, width), np.uint8))


def hostile_payloads(x: np.ndarray) -> dict[str, str]:
    """The costliest requests the default serve limits accept, and refused ones (issue #20)."""
    from ferflow.core.params import ServeParams

    limits = ServeParams()
    side = int((limits.max_request_pixels // 4) ** 0.5)  # 4 images adding up to the pixel limit
    n = limits.max_images_per_request
    return {
        f"accepted: 4 blank {side}x{side} PNGs": rows([blank_png_b64(side, side)] * 4),
        f"accepted: {n} face PNGs, tta tencrop": rows([png_b64(x[i % len(x)]) for i in range(n)], {"tta": "tencrop"}),
        "refused: 100 blank 5000x5000 PNGs": rows([blank_png_b64(5000, 5000)] * 100),
        f"refused: {n + 1} tensors": json.dumps({"inputs": np.zeros((n + 1, 48, 48), np.uint8).tolist()}),
    }


def server_rss_by_process() -> dict[str, float]:
    """RSS (MB) of each process started under this one: `mlflow models serve`'s CLI and
    the uvicorn worker(s), keyed by pid and the command's first words."""
    import psutil

    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            words = " ".join(Path(w).name if i == 0 else w for i, w in enumerate(proc.cmdline()[:3]))
            out[f"{proc.pid} {words}"] = proc.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


def server_rss_mb() -> float:
    """RSS of every process started under this one (mlflow -> uvicorn workers), MB."""
    return sum(server_rss_by_process().values())


def hostile(url: str, x: np.ndarray, n_good: int) -> dict[str, Any]:
    import threading

    import requests

    inv = f"{url}/invocations"
    good = [rows([png_b64(x[i % len(x)])]) for i in range(n_good + 10)]
    attacks = hostile_payloads(x)
    with requests.Session() as session:
        alone = percentiles(time_requests(session, inv, good, 10))
    costs: dict[str, list[float]] = {name: [] for name in attacks}
    statuses: dict[str, set[int]] = {name: set() for name in attacks}
    stop = threading.Event()

    def attacker() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                for name, body in attacks.items():
                    t = time.perf_counter()
                    resp = session.post(inv, data=body, headers={"Content-Type": "application/json"}, timeout=120)
                    costs[name].append(time.perf_counter() - t)
                    statuses[name].add(resp.status_code)

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    time.sleep(2)
    with requests.Session() as session:
        attacked = percentiles(time_requests(session, inv, good, 0))
    stop.set()
    thread.join()
    return {
        "good_alone": alone,
        "good_under_attack": attacked,
        "p50_ratio": attacked["p50_ms"] / alone["p50_ms"],
        "attacks": {name: {"status": sorted(statuses[name]), **percentiles(costs[name])} for name in attacks},
    }


def soak(url: str, x: np.ndarray, seconds: float) -> dict[str, Any]:
    import threading

    import requests

    inv = f"{url}/invocations"
    bodies = [
        rows([png_b64(x[0])]),
        rows(["not base64 *"]),
        rows([base64.b64encode(b"GIF89a truncated").decode()]),
        rows([blank_png_b64(4900, 4900)]),  # accepted: 24 MP decoded
        rows([blank_png_b64(3000, 3000)] * 12),  # refused: 108 MP in all
        json.dumps({"inputs": np.full((200, 48, 48), 300).tolist()}),  # refused: out of range
        rows([png_b64(x[i % len(x)]) for i in range(200)], {"tta": "tencrop"}),
        rows([png_b64(x[0])], {"foo": 1}),
    ]
    samples: list[tuple[float, float]] = []
    counts = {"ok": 0, "refused": 0}
    stop = threading.Event()

    def client(offset: int) -> None:
        with requests.Session() as session:
            i = offset
            while not stop.is_set():
                resp = session.post(inv, data=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}, timeout=120)
                counts["ok" if resp.ok else "refused"] += 1
                i += 1

    start = time.monotonic()
    samples.append((0.0, server_rss_mb()))
    threads = [threading.Thread(target=client, args=(k * 3,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    while time.monotonic() - start < seconds:
        time.sleep(1)
        samples.append((time.monotonic() - start, server_rss_mb()))
    stop.set()
    for t in threads:
        t.join()
    time.sleep(2)
    samples.append((time.monotonic() - start, server_rss_mb()))
    rss = [mb for _, mb in samples]
    last_quarter = rss[-max(2, len(rss) // 4) :]
    return {
        "seconds": seconds,
        "requests": counts,
        "rss_start_mb": rss[0],
        "rss_peak_mb": max(rss),
        "rss_last_quarter_mean_mb": sum(last_quarter) / len(last_quarter),
        "rss_end_idle_mb": rss[-1],
        "samples": samples,
    }


def mosaic_b64(seed: int) -> str:
    """A 400x400 PNG of 10x10 tiled 40-px synthetic faces: the issue #30 attack image."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support import tiled_faces

    return png_b64(tiled_faces(seed=seed))


def attack(url: str, x: np.ndarray) -> dict[str, Any]:
    """Issue #30 item 1: 217 mosaics with `faces: all` and `tta: tencrop` (inside the image and
    pixel limits; ~200,000 model inputs) got a 504 at 60 s while the server worked on. Now:
    how soon it is refused, and the server's RSS against its idle figure."""
    import requests

    inv = f"{url}/invocations"
    body = rows([mosaic_b64(i % 8) for i in range(217)], {"faces": "all", "tta": "tencrop"})
    with requests.Session() as session:
        for _ in range(5):  # warm: the idle figure of a server that has answered requests
            session.post(inv, data=rows([png_b64(x[0])]), headers={"Content-Type": "application/json"}, timeout=60)
        time.sleep(1)
        idle_by_process = server_rss_by_process()
        idle = sum(idle_by_process.values())
        replies = []
        for _ in range(5):
            t = time.perf_counter()
            resp = session.post(inv, data=body, headers={"Content-Type": "application/json"}, timeout=120)
            replies.append((time.perf_counter() - t, resp.status_code, resp.json().get("message", "")[:200]))
        time.sleep(1)
        after_by_process = server_rss_by_process()
        after = sum(after_by_process.values())
    return {"body_mb": len(body) / 1e6, "replies": replies, "rss_idle_mb": idle, "rss_after_mb": after,
            "rss_change": after / idle - 1, "rss_idle_by_process_mb": idle_by_process,
            "rss_after_by_process_mb": after_by_process}  # fmt: skip


def load(url: str, x: np.ndarray, seconds: float, clients: int = 8) -> dict[str, Any]:
    """Issue #30's figure: `clients` clients for `seconds`, each cycling through batches, every
    face of a group photo, ten-crop and tensors, each within the default request budget."""
    import threading

    import requests

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from video_synth import group_photo

    photo, _ = group_photo((150, 260, 200))
    group = png_b64(photo[:, :, ::-1].copy())
    inv = f"{url}/invocations"
    bodies = [
        rows([png_b64(x[i % len(x)]) for i in range(32)]),  # a batch of 32 faces
        rows([group], {"faces": "all"}),  # every face of a 960x480 photo
        rows([png_b64(x[i]) for i in range(8)], {"tta": "tencrop"}),  # ten-crop
        json.dumps({"inputs": x[:16].tolist()}),  # pixel tensors
    ]
    latencies: list[float] = []
    errors: list[int] = []
    stop = threading.Event()

    def client(offset: int) -> None:
        with requests.Session() as session:
            i = offset
            while not stop.is_set():
                t = time.perf_counter()
                resp = session.post(inv, data=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}, timeout=120)
                latencies.append(time.perf_counter() - t)
                if resp.status_code != 200:
                    errors.append(resp.status_code)
                i += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return {"clients": clients, "seconds": seconds, "requests": len(latencies), "errors": errors, **percentiles(latencies)}


def with_runtime(export: Path, runtime: str, work: Path) -> Path:
    """A copy of `export` whose baked-in serve config asks for `runtime`."""
    import shutil

    import yaml

    from ferflow.core import files

    copy = work / f"export-{runtime}"
    shutil.copytree(export, copy)
    flavor = yaml.safe_load((copy / "MLmodel").read_text())["flavors"]["python_function"]
    config_path = copy / flavor["artifacts"]["serve_config"]["path"]
    files.write_json(config_path, files.read_json(config_path) | {"runtime": runtime})
    return copy


def one_runtime(export: Path, x: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Start-to-first-answer, single-image p50, batched faces/s and RSS after N requests."""
    import requests

    from support import local_server

    single = [rows([png_b64(x[i % len(x)])]) for i in range(args.requests + args.warmup)]
    batch = rows([png_b64(f) for f in x[: args.batch]])
    t0 = time.perf_counter()
    with local_server(export, workers=1) as url, requests.Session() as session:
        inv = f"{url}/invocations"
        session.post(inv, data=single[0], headers={"Content-Type": "application/json"}, timeout=120).raise_for_status()
        first_answer_s = time.perf_counter() - t0
        latency = percentiles(time_requests(session, inv, single, args.warmup))
        samples = time_requests(session, inv, [batch] * (args.batches + 3), 3)
        done = 1 + len(single) + len(samples) + 3
        more = max(0, args.rss_requests - done)
        time_requests(session, inv, [single[i % len(single)] for i in range(more)], 0)
        by_process = server_rss_by_process()
    # the process that loaded the model and answers: the largest (the mlflow CLI parent only waits)
    rss, worker = sum(by_process.values()), max(by_process.values())
    return {
        "start_to_first_answer_s": first_answer_s,
        "single_png": latency,
        f"batch{args.batch}_png_faces_per_s": args.batch * len(samples) / sum(samples),
        "requests_before_rss": done + more,
        "rss_mb": rss,
        "rss_model_process_mb": worker,
        "rss_by_process_mb": by_process,
    }


def main_runtimes(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.py: test helpers
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_avg_before": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="ferflow-bench-") as tmp:
        export, _ = prepare_model(args, Path(tmp))
        x = faces(max(args.batch, 64))
        for runtime in ("onnx", "keras"):
            results[runtime] = one_runtime(with_runtime(export, runtime, Path(tmp)), x, args)
    results["machine"]["load_avg_after"] = os.getloadavg()
    key = f"batch{args.batch}_png_faces_per_s"
    print(f"{'measurement':<40}{'onnx':>10}{'keras':>10}")
    for name, get in (
        ("start to first answer, s", lambda r: f"{r['start_to_first_answer_s']:.2f}"),
        ("HTTP 1 image PNG p50, ms", lambda r: f"{r['single_png']['p50_ms']:.2f}"),
        ("HTTP 1 image PNG p95, ms", lambda r: f"{r['single_png']['p95_ms']:.2f}"),
        (f"HTTP batches of {args.batch} PNGs, faces/s", lambda r: f"{r[key]:.0f}"),
        (f"RSS after {results['onnx']['requests_before_rss']} requests, MB", lambda r: f"{r['rss_mb']:.0f}"),
        ("  of which the model's process, MB", lambda r: f"{r['rss_model_process_mb']:.0f}"),
    ):
        print(f"{name:<40}{get(results['onnx']):>10}{get(results['keras']):>10}")
    print(
        f"load average before/after: {results['machine']['load_avg_before'][0]:.1f} / {results['machine']['load_avg_after'][0]:.1f}"
    )
    if args.json:
        from ferflow.core import files

        files.write_json(args.json, results)
    return 0


def main_abuse(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.py: test helpers
    from support import local_server

    env = {"MALLOC_ARENA_MAX": str(args.malloc_arena_max)} if args.malloc_arena_max else {}
    with tempfile.TemporaryDirectory(prefix="ferflow-bench-") as tmp:
        export, _ = prepare_model(args, Path(tmp))
        x = faces(64)
        with local_server(export, workers=args.workers, env=env) as url:
            load_before = os.getloadavg()
            if args.mode == "hostile":
                results = hostile(url, x, args.requests)
            elif args.mode == "attack":
                results = attack(url, x)
            elif args.mode == "load":
                results = load(url, x, args.seconds)
            else:
                results = soak(url, x, args.seconds)
            results |= {"load_avg_before": load_before, "load_avg_after": os.getloadavg(), "env": env, "workers": args.workers}
    if args.mode == "hostile":
        print(
            f"good client alone:        p50 {results['good_alone']['p50_ms']:.1f} ms  p95 {results['good_alone']['p95_ms']:.1f} ms"
        )
        print(
            f"good client under attack: p50 {results['good_under_attack']['p50_ms']:.1f} ms  "
            f"p95 {results['good_under_attack']['p95_ms']:.1f} ms"
        )
        print(f"p50 ratio: {results['p50_ratio']:.2f} (target <= 2)")
        for name, r in results["attacks"].items():
            print(f"  {name:<48} HTTP {r['status']}  p50 {r['p50_ms']:.0f} ms  n={r['n']}")
    elif args.mode == "attack":
        for seconds, status, message in results["replies"]:
            print(f"217 mosaics, faces all, tencrop ({results['body_mb']:.1f} MB): HTTP {status} in {seconds:.2f} s: {message}")
        print(f"server RSS idle {results['rss_idle_mb']:.0f} MB, after {results['rss_after_mb']:.0f} MB "
              f"({100 * results['rss_change']:+.1f}%; target within 10%)")  # fmt: skip
        for name, mb in results["rss_after_by_process_mb"].items():
            print(f"  {name}: idle {results['rss_idle_by_process_mb'].get(name, 0):.0f} MB, after {mb:.0f} MB")
    elif args.mode == "load":
        print(
            f"{results['clients']} clients, {results['seconds']:.0f} s: {results['requests']} requests, "
            f"{len(results['errors'])} errors, p50 {results['p50_ms']:.0f} ms, p99 {results['p99_ms']:.0f} ms (target <= 2000)"
        )
    else:
        print(
            f"soak {args.seconds:.0f} s, {results['requests']}: RSS start {results['rss_start_mb']:.0f} MB, "
            f"peak {results['rss_peak_mb']:.0f} MB, last quarter {results['rss_last_quarter_mean_mb']:.0f} MB, "
            f"idle after {results['rss_end_idle_mb']:.0f} MB"
        )
    print(f"load average before/after: {results['load_avg_before'][0]:.1f} / {results['load_avg_after'][0]:.1f}")
    if args.json:
        from ferflow.core import files

        files.write_json(args.json, results)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/export" if Path("models/export/MLmodel").is_file() else None)
    p.add_argument("--arch", default="seed001", help="architecture of the untrained model used without --model")
    p.add_argument("--requests", type=int, default=300, help="timed single-image requests per payload kind (>= 200)")
    p.add_argument("--photo-requests", type=int, default=100, help="timed single-photo requests (640x480 JPEG with a face)")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=40, help="timed batched requests")
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers (one request at a time here: 1 is fastest)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--mode", choices=("speed", "hostile", "soak", "attack", "load", "runtimes"), default="speed")
    p.add_argument("--rss-requests", type=int, default=1000, help="--mode runtimes: requests before RSS is read")
    p.add_argument("--seconds", type=float, default=60, help="soak duration (default 60)")
    p.add_argument("--malloc-arena-max", type=int, default=0, help="MALLOC_ARENA_MAX for the server (0: unset)")
    args = p.parse_args()
    if args.mode == "runtimes":
        return main_runtimes(args)
    if args.mode != "speed":
        return main_abuse(args)
    if args.requests < 200:
        p.error("--requests must be >= 200 for a meaningful p99")

    import requests

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.py: test helpers
    from support import local_server, synthetic_photo

    with tempfile.TemporaryDirectory(prefix="ferflow-bench-") as tmp:
        export, keras_path = prepare_model(args, Path(tmp))
        x = faces(max(args.batch, 64))
        single_png = [
            json.dumps({"dataframe_split": {"columns": ["image"], "data": [[png_b64(x[i % len(x)])]]}})
            for i in range(args.requests + args.warmup)
        ]
        single_tensor = [json.dumps({"inputs": x[i % len(x)][None].tolist()}) for i in range(args.requests + args.warmup)]
        batch_png = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[png_b64(f)] for f in x[: args.batch]]}})
        batch_tensor = json.dumps({"inputs": x[: args.batch].tolist()})
        photo = synthetic_photo(x[3], size=(640, 480), face_side=200, at=(220, 140))
        buf = io.BytesIO()
        photo.save(buf, format="JPEG", quality=90)
        single_photo = [
            json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(buf.getvalue()).decode()]]}})
        ]
        results: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_before": os.getloadavg()},
            "model": str(export),
            "workers": args.workers,
        }
        t0 = time.perf_counter()
        with local_server(export, workers=args.workers) as url, requests.Session() as session:
            results["server_start_s"] = time.perf_counter() - t0
            inv = f"{url}/invocations"
            results["http_single_png"] = percentiles(time_requests(session, inv, single_png, args.warmup))
            results["http_single_tensor"] = percentiles(time_requests(session, inv, single_tensor, args.warmup))
            results["http_single_photo_640x480_jpeg"] = percentiles(
                time_requests(session, inv, single_photo * (args.photo_requests + 5), 5)
            )
            for name, body in (("png", batch_png), ("tensor", batch_tensor)):
                samples = time_requests(session, inv, [body] * (args.batches + 3), 3)
                results[f"http_batch{args.batch}_{name}_images_per_s"] = args.batch * len(samples) / sum(samples)
        results["baseline"] = baseline(keras_path, x, args.requests, args.batch)
        results["machine"]["load_avg_after"] = os.getloadavg()

    print(f"server start: {results['server_start_s']:.1f} s   workers: {args.workers}   model: {results['model']}")
    print(f"{'measurement':<44}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    for name, r in (
        ("HTTP, 1 image, base64 PNG", results["http_single_png"]),
        ("HTTP, 1 image, uint8 tensor", results["http_single_tensor"]),
        ("HTTP, 1 photo 640x480 JPEG (face detection)", results["http_single_photo_640x480_jpeg"]),
        ("in-process model.predict, 1 image", results["baseline"]["model.predict_single"]),
        ("in-process predict_on_batch, 1 image", results["baseline"]["predict_on_batch_single"]),
    ):
        print(f"{name:<44}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['p99_ms']:>9.2f}")
    for key in (f"http_batch{args.batch}_png_images_per_s", f"http_batch{args.batch}_tensor_images_per_s"):
        print(f"{key:<44}{results[key]:>9.0f}")
    key = f"model.predict_batch{args.batch}_images_per_s"
    print(f"{'in-process ' + key:<44}{results['baseline'][key]:>9.0f}")
    if args.json:
        from ferflow.core import files

        files.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
