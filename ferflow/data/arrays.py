"""Extract: index CSV + ingested faces -> `<out>/<split>.npz` (x: float32 (N,48,48,1) in [0,1],
y: int64) + label map.

Pixels go through `preprocessing.prepare_batch`, the same function the served model
uses, a block of faces at a time, and each block goes straight into the npz's `x.npy`
entry: the float32 arrays (295 MB for FER-2013) are never held whole in memory, and
memory that is touched for the first time costs more here than the normalisation.
Arrays are saved without pickle and loaded with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ferflow.core import files
from ferflow.data.ingest import load_faces
from ferflow.data.preprocessing import INPUT_SHAPE, prepare_batch
from ferflow.data.sources.base import SPLITS

BLOCK = 2048  # faces normalised at a time: 19 MB of float32, reused by the allocator


@dataclass(frozen=True)
class ExtractPaths:
    """What the extract stage reads and writes."""

    index: Path  # index.csv
    ingested: Path  # the ingest stage's folder (faces.npy)
    out: Path  # the arrays folder: <split>.npz
    label_map: Path  # label_map.json


def extract_arrays(paths: ExtractPaths, classes: list[str]) -> dict[str, Any]:
    """The index's rows of the ingested faces, normalised, as one npz per split + the label map."""
    index_csv, ingested_dir = paths.index, paths.ingested
    index = pd.read_csv(index_csv, keep_default_na=False)
    missing = {"row", "label_id", "split"} - set(index.columns)
    if missing:
        raise ValueError(f"{index_csv}: missing columns {sorted(missing)}")
    faces = load_faces(ingested_dir)
    rows_ok = pd.to_numeric(index["row"], errors="coerce").between(0, len(faces) - 1)
    if not rows_ok.all():
        bad = index.loc[~rows_ok, "row"].iloc[0]
        raise ValueError(f"{index_csv}: row {bad} is not a row of {Path(ingested_dir) / 'faces.npy'} (0..{len(faces) - 1})")
    summary: dict[str, Any] = {}
    with files.atomic_dir(paths.out) as tmp:
        for split in SPLITS:
            rows = index[index["split"] == split]
            _write_split(tmp / f"{split}.npz", faces, rows["row"].to_numpy(np.int64), rows["label_id"].to_numpy(np.int64))
            summary[split] = int(len(rows))
    files.write_json(paths.label_map, {"classes": list(classes), "label_to_id": {c: i for i, c in enumerate(classes)}})
    return summary


def _write_split(path: Path, faces: np.ndarray, rows: np.ndarray, y: np.ndarray) -> None:
    """The npz `np.savez(path, x=prepare_batch(faces[rows]), y=y)` would write, block by block."""
    x_shape = (len(rows), *INPUT_SHAPE)
    blocks = (prepare_batch(np.asarray(faces[rows[i : i + BLOCK]])) for i in range(0, len(rows), BLOCK))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as fh:
            files.write_npy(fh, np.float32, x_shape, blocks)
        with zf.open("y.npy", "w") as fh:
            np.lib.format.write_array(fh, y, allow_pickle=False)


def load_split(arrays_dir: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    path = Path(arrays_dir) / f"{split}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run the extract stage first)")
    with np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != INPUT_SHAPE or len(x) != len(y):
        raise ValueError(f"{path}: expected x float32 (N,48,48,1) and y (N,), got x {x.dtype} {x.shape}, y {y.shape}")
    return x, y


def split_digest(images: np.ndarray, labels: np.ndarray, classes: list[str]) -> str:
    """A content hash of one split (pixels, labels) and the class list. The test split's is
    the test-set id everywhere: MLflow dataset digest, `champion-<id8>`, leaderboard groups;
    accuracies are comparable only between models evaluated on the same id."""
    digest = hashlib.sha256()
    digest.update(json.dumps(list(classes)).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def load_label_map(path: str | os.PathLike[str]) -> list[str]:
    data = files.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
        raise ValueError(f"{path}: expected {{'classes': [names...]}}")
    return [str(c) for c in data["classes"]]
