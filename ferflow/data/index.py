"""Index: the ingest manifest -> `data/index.csv`, one row per image.

Columns: id, row (the face's row in data/ingested/faces.npy), label, label_id, split
(train/val/test), pixel_hash, orig_width, orig_height, origin (where the source had it). `data.dedup` decides what happens to train/val images whose
pixels also appear in test; then, when the source has no val split, a stratified,
seeded `val` is carved out of the remaining train (never out of test).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ferflow.core import files
from ferflow.core.params import DataParams
from ferflow.data.ingest import MANIFEST_FIELDS, MANIFEST_NAME, duplicate_stats, load_faces
from ferflow.data.plots import write_data_plots

INDEX_COLUMNS = ("id", "row", "label", "label_id", "split", "pixel_hash", "orig_width", "orig_height", "origin")


def read_manifest(ingested_dir: str | os.PathLike[str]) -> pd.DataFrame:
    path = Path(ingested_dir) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found (run the ingest stage first)")
    df = pd.read_csv(path, dtype={"pixel_hash": str, "id": str, "origin": str}, keep_default_na=False)
    missing = sorted(set(MANIFEST_FIELDS) - set(df.columns))
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (written by an older ferflow? rerun the ingest stage)")
    if not df["row"].equals(pd.Series(range(len(df)), dtype=df["row"].dtype)):
        raise ValueError(f"{path}: column row must be 0..{len(df) - 1} in order")
    return df


def carve_validation(df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Move a stratified, seeded `fraction` of each train class to `val` (at least one image
    per class with 2+ images, never all of it).

    Images are moved by pixel hash: identical copies go to val together, so a duplicate
    inside train never ends up on both sides of the train/val boundary.
    """
    df = df.copy()
    rng = np.random.default_rng(seed)
    train = df[df["split"] == "train"]
    chosen: set[str] = set()
    hashes_by_label: dict[str, list[str]] = defaultdict(list)
    for label, h in zip(train["label"].tolist(), train["pixel_hash"].tolist()):  # plain lists: fast to loop over
        hashes_by_label[label].append(h)
    for label in sorted(hashes_by_label):
        group = hashes_by_label[label]
        target = int(round(len(group) * fraction))
        target = min(max(target, 1), len(group) - 1) if len(group) >= 2 else 0
        sizes = Counter(group)
        hashes = sorted(sizes)
        moved = sum(sizes[h] for h in hashes if h in chosen)
        for i in rng.permutation(len(hashes)):
            if moved >= target:
                break
            h = hashes[i]
            if h not in chosen and moved + sizes[h] < len(group):
                chosen.add(h)
                moved += sizes[h]
    df.loc[(df["split"] == "train") & df["pixel_hash"].isin(chosen), "split"] = "val"
    return df


def apply_dedup(df: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """`drop_cross_split`: drop train/val rows whose pixel hash also occurs in test
    (`keep`: only count them). Duplicates inside one split are kept."""
    if policy not in ("keep", "drop_cross_split"):
        raise ValueError(f"data.dedup = {policy!r}: expected keep or drop_cross_split")
    test_hashes = set(df.loc[df["split"] == "test", "pixel_hash"].tolist())
    leaked = df["split"].isin(["train", "val"]) & df["pixel_hash"].isin(test_hashes)
    by_split = {s: int((leaked & (df["split"] == s)).sum()) for s in ("train", "val")}
    stats: dict[str, Any] = {
        "cross_split_copies_in_train_val": int(leaked.sum()),
        "dropped": 0,
        "dropped_by_split": dict.fromkeys(by_split, 0),
    }
    if policy == "drop_cross_split":
        stats["dropped"] = int(leaked.sum())
        stats["dropped_by_split"] = by_split
        df = df[~leaked]
    return df, stats


@dataclass(frozen=True)
class IndexPaths:
    """What the index stage reads and writes."""

    ingested: Path  # the ingest stage's folder
    out: Path  # index.csv
    metrics: Path  # index.json
    plots: Path | None = None  # class-distribution plots; None: none drawn


def build_index(paths: IndexPaths, data: DataParams) -> dict[str, Any]:
    """Split assignment (dedup, then the val carve), label ids and the data hash -> `paths.out`."""
    ingested_dir, classes, dedup = paths.ingested, list(data.classes), data.dedup
    df = read_manifest(ingested_dir)
    faces = load_faces(ingested_dir, expected_rows=len(df))
    # .tolist()/.unique() first: iterating a pandas string column goes element by element
    unknown = sorted(set(df["label"].unique().tolist()) - set(classes))
    if unknown:
        raise ValueError(f"{ingested_dir / MANIFEST_NAME}: labels {unknown} are not in data.classes {classes}")
    carved = "val" not in set(df["split"].unique().tolist())
    # Dedup before the carve: val is then exactly val_fraction of the train images that
    # survive dedup, instead of a carve that dedup thins out afterwards.
    df, dedup_stats = apply_dedup(df, dedup)
    if carved:
        df = carve_validation(df, data.val_fraction, data.seed)
    splits, labels, hashes = df["split"].tolist(), df["label"].tolist(), df["pixel_hash"].tolist()
    per_split_class = Counter(zip(splits, labels))
    empty = [f"{s}/{c}" for s in ("train", "test") for c in classes if not per_split_class[(s, c)]]
    if empty:
        raise ValueError(
            f"index: no image left in {', '.join(empty)} after data.dedup={dedup!r} (see metrics/ingest.json duplicates)"
        )
    df = df.assign(label_id=df["label"].map({c: i for i, c in enumerate(classes)}))
    index = df[list(INDEX_COLUMNS)].sort_values(["split", "label_id", "row"], kind="stable").reset_index(drop=True)
    with files.atomic_path(paths.out) as tmp:
        # Arrow-backed string columns format slowly; as Python objects: the same bytes, ~1.5x faster
        as_objects = {c: index[c].to_numpy(dtype=object) if index[c].dtype == "str" else index[c] for c in index.columns}
        pd.DataFrame(as_objects).to_csv(tmp, index=False)
    counts = {s: {c: per_split_class[(s, c)] for c in classes} for s in ("train", "val", "test")}
    metrics = {
        "val_carved_from_train": carved,
        "split_totals": {s: int(sum(v.values())) for s, v in counts.items()},
        "counts": counts,
        "dedup": {"policy": dedup, **dedup_stats},
        "duplicates_after_dedup": duplicate_stats(splits, labels, hashes),
        "data_hash": dataset_hash(index),
    }
    if paths.plots is not None:
        write_data_plots(index, faces, classes, paths.plots)
    files.write_json(paths.metrics, metrics)
    return metrics


def dataset_hash(index: pd.DataFrame) -> str:
    """A content hash of the data set: pixel hashes, labels and splits (not paths)."""
    rows = index[["split", "label", "pixel_hash"]].astype(str).sort_values(["split", "label", "pixel_hash"])
    lines = rows["split"] + "," + rows["label"] + "," + rows["pixel_hash"] + "\n"
    return hashlib.sha256("".join(lines.tolist()).encode()).hexdigest()[:16]
