"""Extract: index CSV -> `<out>/<split>.npz` (x: float32 (N,48,48,1) in [0,1], y: int64) + label map.

Pixels go through `preprocessing.prepare_batch`, the same function the served model
uses. Arrays are saved without pickle and loaded with `allow_pickle=False`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ferflow import files
from ferflow.ingest import read_ingested_pixels
from ferflow.preprocessing import prepare_batch

SPLITS = ("train", "val", "test")


def extract_arrays(
    index_csv: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    label_map_json: str | os.PathLike[str],
    classes: list[str],
) -> dict[str, Any]:
    index = pd.read_csv(index_csv, keep_default_na=False)
    missing = {"path", "label_id", "split"} - set(index.columns)
    if missing:
        raise ValueError(f"{index_csv}: missing columns {sorted(missing)}")
    summary: dict[str, Any] = {}
    with files.atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            rows = index[index["split"] == split]
            # the ingested PNGs are already 48x48 grayscale; prepare_batch takes them as-is
            x = prepare_batch(read_ingested_pixels(rows["path"].tolist()))
            y = rows["label_id"].to_numpy(dtype=np.int64)
            np.savez(tmp / f"{split}.npz", x=x, y=y)
            summary[split] = int(len(y))
    files.write_json(label_map_json, {"classes": list(classes), "label_to_id": {c: i for i, c in enumerate(classes)}})
    return summary


def load_split(arrays_dir: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    path = Path(arrays_dir) / f"{split}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run the extract stage first)")
    with np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != (48, 48, 1) or len(x) != len(y):
        raise ValueError(f"{path}: expected x float32 (N,48,48,1) and y (N,), got x {x.dtype} {x.shape}, y {y.shape}")
    return x, y


def load_label_map(path: str | os.PathLike[str]) -> list[str]:
    data = files.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
        raise ValueError(f"{path}: expected {{'classes': [names...]}}")
    return [str(c) for c in data["classes"]]
