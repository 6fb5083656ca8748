"""Index: the ingested tree's manifest -> `data/index.csv`, one row per image.

Columns: path, label, label_id, split (train/val/test), pixel_hash, orig_width,
orig_height, origin. A stratified, seeded `val` is carved out of train when the source
has none (never out of test). `data.dedup` decides what happens to train/val images
whose pixels also appear in test.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ferflow import files
from ferflow.ingest import MANIFEST_NAME
from ferflow.plots import write_data_plots

INDEX_COLUMNS = ("path", "label", "label_id", "split", "pixel_hash", "orig_width", "orig_height", "origin")


def read_manifest(ingested_dir: str | os.PathLike[str]) -> pd.DataFrame:
    path = Path(ingested_dir) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found (run the ingest stage first)")
    return pd.read_csv(path, dtype={"pixel_hash": str, "id": str, "origin": str}, keep_default_na=False)


def carve_validation(df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Move a stratified `fraction` of each train class to `val` (at least one image per class)."""
    df = df.copy()
    rng = np.random.default_rng(seed)
    for _, group in df[df["split"] == "train"].groupby("label", sort=True):
        n_val = int(round(len(group) * fraction))
        if len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        else:
            n_val = 0
        order = np.sort(group.index.to_numpy())
        chosen = rng.choice(order, size=n_val, replace=False) if n_val else []
        df.loc[chosen, "split"] = "val"
    return df


def apply_dedup(df: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """`drop_cross_split`: drop train/val rows whose pixel hash also occurs in test."""
    test_hashes = set(df.loc[df["split"] == "test", "pixel_hash"])
    leaked = df["split"].isin(["train", "val"]) & df["pixel_hash"].isin(test_hashes)
    stats = {"cross_split_copies_in_train_val": int(leaked.sum()), "dropped": 0}
    if policy == "drop_cross_split":
        stats["dropped"] = int(leaked.sum())
        df = df[~leaked]
    return df, stats


def build_index(
    ingested_dir: str | os.PathLike[str],
    index_csv: str | os.PathLike[str],
    metrics_json: str | os.PathLike[str],
    classes: list[str],
    val_fraction: float,
    dedup: str,
    seed: int,
    plots_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    ingested_dir = Path(ingested_dir)
    df = read_manifest(ingested_dir)
    unknown = sorted(set(df["label"]) - set(classes))
    if unknown:
        raise ValueError(f"{ingested_dir / MANIFEST_NAME}: labels {unknown} are not in data.classes {classes}")
    # the ingest stage decided the splits; dedup first so val is carved from clean train
    df, dedup_stats = apply_dedup(df, dedup)
    carved = "val" not in set(df["split"])
    if carved:
        df = carve_validation(df, val_fraction, seed)
    df = df.assign(
        path=[str(ingested_dir / f) for f in df["file"]],
        label_id=[classes.index(label) for label in df["label"]],
    )
    index = df[list(INDEX_COLUMNS)].sort_values(["split", "label_id", "path"], kind="stable").reset_index(drop=True)
    with files.atomic_path(index_csv) as tmp:
        index.to_csv(tmp, index=False)
    counts = {s: {c: int(((index["split"] == s) & (index["label"] == c)).sum()) for c in classes} for s in ("train", "val", "test")}
    metrics = {
        "val_carved_from_train": carved,
        "split_totals": {s: int(sum(v.values())) for s, v in counts.items()},
        "counts": counts,
        "dedup": {"policy": dedup, **dedup_stats},
        "data_hash": dataset_hash(index),
    }
    if plots_dir is not None:
        write_data_plots(index, classes, plots_dir)
    files.write_json(metrics_json, metrics)
    return metrics


def dataset_hash(index: pd.DataFrame) -> str:
    """A content hash of the data set: pixel hashes, labels and splits (not paths)."""
    h = hashlib.sha256()
    for row in index[["split", "label", "pixel_hash"]].sort_values(["split", "label", "pixel_hash"]).itertuples(index=False):
        h.update(f"{row.split},{row.label},{row.pixel_hash}\n".encode())
    return h.hexdigest()[:16]
