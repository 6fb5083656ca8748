"""Helpers shared by tests and benchmarks (benchmarks/serve.py imports this file too).

They are not part of the package, so the exported model does not ship them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ferflow.core.params import DataParams
from ferflow.data.arrays import ExtractPaths, extract_arrays
from ferflow.data.index import IndexPaths, build_index
from ferflow.data.ingest import IngestPaths, ingest
from ferflow.data.sources import Source
from ferflow.tracking.server import free_port


def synthetic_photo(
    face: np.ndarray | None,
    size: tuple[int, int] = (800, 600),
    face_side: int = 240,
    at: tuple[int, int] = (300, 150),
    seed: int = 0,
) -> Image.Image:
    """A photo-like RGB test image: a smooth colour gradient with mild noise, and
    optionally a grayscale face (e.g. `synthetic.generate_face`) pasted at `at`,
    upscaled to `face_side` pixels. For tests and benchmarks of the detector."""
    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([80 + 100 * xx, 120 + 60 * yy, 160 - 80 * xx], axis=-1) + rng.normal(0, 4, (height, width, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    if face is not None:
        patch = Image.fromarray(np.asarray(face, dtype=np.uint8)).resize((face_side, face_side), Image.Resampling.BICUBIC)
        img.paste(patch.convert("RGB"), at)
    return img


def tiled_faces(tile: int = 40, grid: int = 10, seed: int = 0) -> np.ndarray:
    """A grid x grid mosaic of synthetic faces, `tile` pixels each (uint8 gray): the Haar
    detector finds ~39 of the 100 at 40 px. Every-face requests on such images are the
    costliest the image and pixel limits alone let through (issue #30)."""
    from ferflow.data.sources.synthetic import generate_face

    rng = np.random.default_rng(seed)
    canvas = np.zeros((tile * grid, tile * grid), np.uint8)
    for i in range(grid):
        for j in range(grid):
            face = Image.fromarray(generate_face(rng, "happy")).resize((tile, tile), Image.Resampling.BICUBIC)
            canvas[i * tile : (i + 1) * tile, j * tile : (j + 1) * tile] = np.asarray(face)
    return canvas


def serve_command(model_uri: str | os.PathLike[str], port: int, workers: int = 1) -> list[str]:
    """The documented serve command, bound to loopback (never 0.0.0.0)."""
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        str(model_uri),
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


@contextlib.contextmanager
def local_server(
    model_uri: str | os.PathLike[str],
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    startup_timeout: float = 180.0,
) -> Iterator[str]:
    """Run `mlflow models serve` on a free loopback port; yield its base URL; stop it after.

    The server runs in its own process group (mlflow starts uvicorn under it), so
    stopping it ends exactly the processes started here.
    """
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    # mlflow launches `uvicorn` by name: the venv's bin must be on PATH
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    full_env.update(env or {})
    log_file = open(log_path, "wb") if log_path else tempfile.TemporaryFile()  # closed in the finally below
    proc = subprocess.Popen(
        serve_command(model_uri, port, workers), stdout=log_file, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {proc.returncode}:\n{_tail(log_file)}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not answer /ping within {startup_timeout:.0f}s:\n{_tail(log_file)}")
            time.sleep(0.25)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()


def _tail(log_file: Any, n: int = 6000) -> str:
    log_file.flush()
    log_file.seek(0)
    return log_file.read().decode("utf-8", "replace")[-n:]


def prepare_data(root: Path, source: Source, data: DataParams, plots: bool = False) -> tuple[dict, dict]:
    """ingest -> index -> extract into `root` under the names dvc.yaml uses (ingested/,
    index.csv, arrays/, label_map.json); returns the ingest and index metrics."""
    ingested = ingest(source, IngestPaths(root / "ingested", root / "rejected.csv", root / "ingest.json"), data)
    indexed = build_index(
        IndexPaths(root / "ingested", root / "index.csv", root / "index.json", root / "plots" if plots else None), data
    )
    extract_arrays(ExtractPaths(root / "index.csv", root / "ingested", root / "arrays", root / "label_map.json"), data.classes)
    return ingested, indexed


def fit(train: Any, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, out: Path | str, **kw: Any):
    """`fit_model` on 7 classes into `out` (model.keras, history.csv, work/), on the layout
    `train.distribution` sets up, as the train stage calls it; returns (model, summary)."""
    from ferflow.model import distribution
    from ferflow.model.training import FitOutputs, Splits, fit_model

    out = Path(out)
    layout = distribution.setup(train.distribution, train.batch_size)
    outputs = FitOutputs(out / "model.keras", out / "history.csv", out / "work")
    return fit_model(train, Splits(x, y, x_val, y_val, 7), outputs, layout, **kw)
