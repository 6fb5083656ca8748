"""Ingest: any source -> canonical tree `<out>/<split>/<class>/<id>.png` + manifest.

Every image is decoded with the shared preprocessing (grayscale, centre square crop,
48x48) and written as an 8-bit PNG. Images that cannot be used become rows of the
rejected CSV with a reason; none is dropped silently. Pixel hashes are computed here
(the only place every image is decoded) so the index stage can find duplicates.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ferflow import files
from ferflow.preprocessing import ImageError, decode_image, to_face_pixels
from ferflow.sources import SPLITS, Source, SourceItem

MANIFEST_NAME = "manifest.csv"
MANIFEST_FIELDS = ("id", "split", "label", "file", "origin", "orig_width", "orig_height", "orig_mode", "pixel_hash")
REJECTED_FIELDS = ("split", "label", "origin", "reason")


class IngestError(RuntimeError):
    """The ingested data set is unusable (an empty class, too many rejects)."""


@dataclass(frozen=True)
class Accepted:
    item: SourceItem
    pixels: np.ndarray
    orig_size: tuple[int, int]
    orig_mode: str


def pixel_hash(pixels: np.ndarray) -> str:
    """Content hash of the 48x48 grayscale pixels: equal images, equal hash."""
    return hashlib.blake2b(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), digest_size=16).hexdigest()


def _load(item: SourceItem, max_pixels: int) -> Accepted | str:
    """Decode one item; a string is the reason it was rejected."""
    try:
        raw = item.read()
        if isinstance(raw, np.ndarray):
            if raw.dtype != np.uint8 or raw.ndim != 2:
                return f"pixels must be a 2-D uint8 array, got {raw.dtype} {raw.shape}"
            img = Image.fromarray(raw, "L")
            return Accepted(item, to_face_pixels(img), (raw.shape[1], raw.shape[0]), "L")
        img = decode_image(raw, max_pixels=max_pixels)
        return Accepted(item, to_face_pixels(img), img.size, img.mode)
    except ImageError as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable: {exc}"


def _safe_id(origin: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(origin.split(":")[-1]).stem)[:40].strip("_") or "img"
    candidate = stem
    if candidate in used:
        candidate = f"{stem}_{hashlib.sha1(origin.encode()).hexdigest()[:8]}"
    n = 1
    while candidate in used:
        candidate = f"{stem}_{n}"
        n += 1
    used.add(candidate)
    return candidate


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def ingest(
    source: Source,
    out_dir: str | os.PathLike[str],
    rejected_csv: str | os.PathLike[str],
    metrics_json: str | os.PathLike[str],
    classes: Iterable[str],
    max_per_class: int | None = None,
    max_reject_fraction: float = 0.01,
    max_pixels: int = 25_000_000,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run the ingest stage; returns the metrics written to `metrics_json`.

    Outputs are atomic: the tree is built in a temp dir and renamed into place only
    when the data set passes its checks; the CSV and JSON are written via temp files.
    """
    classes = list(classes)
    wanted = set(classes)
    counts: Counter[tuple[str, str]] = Counter()
    skipped: Counter[str] = Counter()
    rejected: list[dict[str, str]] = []
    accepted: list[Accepted] = []

    def selected(items: Iterable[SourceItem]) -> Iterable[SourceItem]:
        for item in items:
            if item.class_name not in wanted:
                skipped["class_not_selected"] += 1
                continue
            if max_per_class is not None and counts[(item.split, item.class_name)] >= max_per_class:
                skipped["over_max_per_class"] += 1
                continue
            counts[(item.split, item.class_name)] += 1
            yield item

    # Decoding releases the GIL inside Pillow, so threads use both cores without pickling.
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        items = list(selected(source.items()))
        for item, result in zip(items, pool.map(lambda it: _load(it, max_pixels), items, chunksize=64)):
            if isinstance(result, str):
                rejected.append({"split": item.split, "label": item.class_name, "origin": item.origin, "reason": result})
            else:
                accepted.append(result)

    per_split_class = Counter((a.item.split, a.item.class_name) for a in accepted)
    splits_present = [s for s in SPLITS if any(a.item.split == s for a in accepted)]
    metrics = _metrics(source, accepted, rejected, skipped, per_split_class, splits_present, classes)

    # Write the rejects before failing, so the user can see why.
    _write_csv(rejected_csv, REJECTED_FIELDS, rejected)
    problems = []
    if "train" not in splits_present or "test" not in splits_present:
        problems.append(f"the source must provide a train and a test split, found: {', '.join(splits_present) or 'none'}")
    for split in splits_present:
        for class_name in classes:
            if per_split_class[(split, class_name)] == 0:
                problems.append(f"class {class_name!r} of split {split!r} has no usable image")
    total = len(accepted) + len(rejected)
    if total and len(rejected) / total > max_reject_fraction:
        problems.append(
            f"{len(rejected)} of {total} images rejected ({len(rejected) / total:.1%}), over "
            f"data.max_reject_fraction={max_reject_fraction} (reasons in {rejected_csv})"
        )
    if problems:
        files.write_json(metrics_json, metrics)
        raise IngestError("ingest failed: " + "; ".join(problems))

    with files.atomic_dir(out_dir) as tmp:
        used: set[str] = set()
        rows = []
        for split in splits_present:
            for class_name in classes:
                (tmp / split / class_name).mkdir(parents=True, exist_ok=True)
        for a in accepted:
            image_id = _safe_id(f"{a.item.split}/{a.item.class_name}/{a.item.origin}", used)
            rel = f"{a.item.split}/{a.item.class_name}/{image_id}.png"
            (tmp / rel).write_bytes(_png_bytes(a.pixels))
            rows.append(
                {
                    "id": image_id,
                    "split": a.item.split,
                    "label": a.item.class_name,
                    "file": rel,
                    "origin": a.item.origin,
                    "orig_width": a.orig_size[0],
                    "orig_height": a.orig_size[1],
                    "orig_mode": a.orig_mode,
                    "pixel_hash": pixel_hash(a.pixels),
                }
            )
        _write_csv(tmp / MANIFEST_NAME, MANIFEST_FIELDS, rows)
    files.write_json(metrics_json, metrics)
    return metrics


def _metrics(source, accepted, rejected, skipped, per_split_class, splits_present, classes) -> dict[str, Any]:
    hashes_by_split: dict[str, set[str]] = {s: set() for s in splits_present}
    within = 0
    for a in accepted:
        h = pixel_hash(a.pixels)
        if h in hashes_by_split[a.item.split]:
            within += 1
        hashes_by_split[a.item.split].add(h)
    cross = {}
    for i, s1 in enumerate(splits_present):
        for s2 in splits_present[i + 1 :]:
            cross[f"{s1}_{s2}"] = len(hashes_by_split[s1] & hashes_by_split[s2])
    reasons = Counter(r["reason"].split(":")[0] for r in rejected)
    return {
        "source": source.describe(),
        "total": len(accepted),
        "counts": {s: {c: per_split_class[(s, c)] for c in classes} for s in splits_present},
        "split_totals": {s: sum(per_split_class[(s, c)] for c in classes) for s in splits_present},
        "rejected": len(rejected),
        "rejected_by_reason": dict(reasons),
        "skipped": dict(skipped),
        "duplicates": {"within_split": within, "cross_split": cross},
    }


def _write_csv(path: str | os.PathLike[str], fields: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with files.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
