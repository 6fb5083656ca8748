"""Ingest: any source -> `<out>/faces.npy` (uint8 (N, 48, 48)) + `<out>/manifest.csv`.

Every image is decoded once, with the shared preprocessing (8-bit grayscale, centre
square crop, 48x48), hashed, and stored as row `row` of faces.npy; the manifest row
says where it came from. Images that cannot be used become rows of the rejected CSV
with a reason; none is dropped silently. Pixel hashes are computed here (the only
place every image is decoded) so duplicates are counted here and handled by the
index stage.

Why one array and not a file per face: FER-2013 is 32k faces of 2.3 KB. Creating 32k
files costs more than decoding them (and many times more right after a previous run's
tree was deleted, which is what DVC does before it reruns a stage), DVC hashes and
caches one file instead of 32k, and the later stages read the array with one call.

Speed: decoding is Python-heavy, so on several cores the work runs in forked worker
processes that write each face straight into its slot of faces.npy, memory-mapped and
shared; only small tuples travel back.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import mmap
import multiprocessing
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ferflow.core import files
from ferflow.core.errors import UserError
from ferflow.core.params import DataParams
from ferflow.data.preprocessing import DEFAULT_MAX_PIXELS, IMAGE_SIZE, ImageError, decode_face, to_face_pixels
from ferflow.data.sources.base import SPLITS, Source, SourceItem

MANIFEST_NAME = "manifest.csv"
FACES_NAME = "faces.npy"
MANIFEST_FIELDS = ("id", "split", "label", "row", "origin", "orig_width", "orig_height", "orig_mode", "pixel_hash")
REJECTED_FIELDS = ("split", "label", "path", "reason")
POOL_MIN_ITEMS = 512  # below this, forking workers costs more than it saves
CHUNK = 256  # items per worker task
READ_BUDGET = 32 * 2**20  # encoded bytes a worker holds before decoding them
FACE_BYTES = IMAGE_SIZE * IMAGE_SIZE


class IngestError(UserError):
    """The ingested data set is unusable (an empty class, too many rejects)."""


def pixel_hash(pixels: np.ndarray) -> str:
    """Content hash of the 48x48 grayscale pixels: equal images, equal hash."""
    return hashlib.blake2b(np.ascontiguousarray(pixels, dtype=np.uint8).data, digest_size=16).hexdigest()


def load_faces(ingested_dir: str | os.PathLike[str], expected_rows: int | None = None) -> np.ndarray:
    """The ingested faces, memory-mapped read-only: uint8 (N, 48, 48), row i = manifest row i."""
    path = Path(ingested_dir) / FACES_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run the ingest stage first)")
    faces = np.load(path, mmap_mode="r", allow_pickle=False)
    if faces.dtype != np.uint8 or faces.ndim != 3 or faces.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{path}: expected uint8 (N, 48, 48), got {faces.dtype} {faces.shape}")
    if expected_rows is not None and len(faces) != expected_rows:
        raise ValueError(f"{path}: {len(faces)} faces but {MANIFEST_NAME} has {expected_rows} rows (rerun the ingest stage)")
    return faces


# --- decoding, in workers -------------------------------------------------------------


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _decode(raw: bytes | np.ndarray, max_pixels: int) -> tuple[np.ndarray, tuple[int, int], str]:
    if isinstance(raw, np.ndarray):
        if raw.dtype != np.uint8 or raw.ndim != 2:
            raise ImageError(f"pixels must be a 2-D uint8 array, got {raw.dtype} {raw.shape}")
        return to_face_pixels(Image.fromarray(raw, "L")), (raw.shape[1], raw.shape[0]), "L"
    return decode_face(raw, max_pixels=max_pixels)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ImageError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"unreadable: {exc.strerror or exc}"
    return f"unusable image: {type(exc).__name__}: {exc}"


# Set by the parent before it forks the workers; children inherit it (nothing pickled).
_JOB: dict[str, Any] = {}


def _work(task: list[int]) -> list[tuple]:
    """Read, decode and hash a batch of items, each face into its slot of the shared
    buffer; returns (index, hash, (w, h), mode) or (index, reason) per item.

    Phase by phase (all reads, then all decodes) rather than image by image: interleaving
    them costs more CPU per image, as the system calls evict the decoder's working set
    from the CPU caches. Reads are flushed to decoding every READ_BUDGET bytes, so a
    folder of big photos cannot fill the memory.
    """
    items: list[SourceItem] = _JOB["items"]
    slots: np.ndarray = _JOB["slots"]
    results: list[tuple] = []
    pending: list[tuple[int, bytes | np.ndarray]] = []
    held = 0
    for n, index in enumerate(task, 1):
        try:
            raw = items[index].read()
            pending.append((index, raw))
            held += raw.nbytes if isinstance(raw, np.ndarray) else len(raw)
        except Exception as exc:  # one bad file must never stop the stage: it becomes a rejected row
            results.append((index, _reason(exc)))
        if held > READ_BUDGET or n == len(task):
            for index, raw in pending:
                try:
                    pixels, size, mode = _decode(raw, _JOB["max_pixels"])
                except Exception as exc:  # as above
                    results.append((index, _reason(exc)))
                    continue
                slots[index] = pixels
                results.append((index, pixel_hash(pixels), size, mode))
            pending, held = [], 0
    return results


class _Runner:
    """Runs `_work` inline or on forked processes (one pool for all rounds).

    Each item has a 48x48 slot in `path` (the future faces.npy), memory-mapped and shared
    with the workers: a face goes straight from the decoder into the output file's page
    cache, with no copy to gather afterwards (only the pages of decoded items are touched).
    """

    def __init__(self, path: Path, items: list[SourceItem], max_pixels: int, workers: int):
        self.path = path
        self.header_size = len(files.npy_header(np.uint8, (len(items), IMAGE_SIZE, IMAGE_SIZE)))
        with open(path, "w+b") as fh:  # read+write: mmap needs both
            fh.truncate(self.header_size + max(len(items), 1) * FACE_BYTES)  # sparse until written
            self.buffer = mmap.mmap(fh.fileno(), 0)
        self.slots = np.frombuffer(self.buffer, np.uint8, offset=self.header_size).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        _JOB.update(items=items, slots=self.slots, max_pixels=max_pixels)
        self.pool = None
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            # Freeze the inherited heap out of the children's GC: otherwise every collection
            # there walks (and copy-on-write copies) all parent objects, the items included.
            gc.freeze()
            try:
                self.pool = multiprocessing.get_context("fork").Pool(workers)
            finally:
                gc.unfreeze()

    def run(self, chunks: Iterator[list[int]]) -> Iterator[tuple]:
        """Results as they come; `chunks` is consumed lazily (by the pool's feeder thread)."""
        mapped = self.pool.imap(_work, chunks) if self.pool else map(_work, chunks)
        for chunk in mapped:
            yield from chunk

    def finish(self, order: list[int], block: int = 4096) -> None:
        """Make the file a .npy of slots[order]: the kept faces moved to the front in
        `order`, the rest cut off. Without rejects or caps nothing moves."""
        rows = np.asarray(order, np.int64)
        if len(rows) > 1 and np.all(rows[1:] > rows[:-1]):
            # increasing, so rows[i] >= i: moving forward block by block never overwrites
            # a face that is still to be moved (fancy indexing copies the block first)
            for start in range(0, len(rows), block):
                src = rows[start : start + block]
                if src[0] != start or src[-1] != start + len(src) - 1:
                    self.slots[start : start + len(src)] = self.slots[src]
        elif len(rows):
            self.slots[: len(rows)] = self.slots[rows]
        header = files.npy_header(np.uint8, (len(rows), IMAGE_SIZE, IMAGE_SIZE))
        if len(header) != self.header_size:  # numpy keeps it constant; this guards a future change
            raise RuntimeError(f"npy header changed size ({len(header)} != {self.header_size} bytes)")
        self.buffer[: self.header_size] = header
        self.close()
        os.truncate(self.path, self.header_size + len(rows) * FACE_BYTES)

    def close(self) -> None:
        if self.pool:
            self.pool.close()
            self.pool.join()
            self.pool = None
        _JOB.clear()
        self.slots = None
        if not self.buffer.closed:
            self.buffer.close()


# --- the stage ------------------------------------------------------------------------


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _safe_id(origin: str, used: set[str]) -> str:
    """A file-name-safe id from the origin's file stem, unique within `used`."""
    name = origin.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    stem = _UNSAFE.sub("_", name.rsplit(".", 1)[0] if "." in name[1:] else name)[:40].strip("_") or "img"
    candidate = stem
    if candidate in used:
        candidate = f"{stem}_{hashlib.sha1(origin.encode()).hexdigest()[:8]}"
    n = 1
    while candidate in used:
        candidate = f"{stem}_{n}"
        n += 1
    used.add(candidate)
    return candidate


def _sample_key(origin: str) -> tuple[bytes, str]:
    # The max_per_class sample: a fixed pseudo-random order of file names, so the pick is
    # spread over the whole class, stable across runs, the same from a folder or its zip,
    # and adding files barely moves it.
    name = origin.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    return hashlib.blake2b(name.encode(), digest_size=8).digest(), origin


def _reason_kind(reason: str) -> str:
    return re.sub(r"\d+", "N", reason.split(":")[0].split(" (")[0]).strip()


@dataclass(frozen=True)
class IngestPaths:
    """Where the ingest stage writes (dvc.yaml's outs and metrics of the stage)."""

    out: Path  # the ingested folder: faces.npy + manifest.csv
    rejected: Path  # rejected.csv: one row per file not ingested, with its reason
    metrics: Path  # ingest.json


def ingest(
    source: Source, paths: IngestPaths, data: DataParams, *, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None
) -> dict[str, Any]:
    """Run the ingest stage; returns the metrics written to `paths.metrics`.

    `data.classes` selects classes (others are counted as skipped); `data.max_per_class`
    caps the accepted images per class and split - one number for every split, or per
    split as {train: 1000, test: 250} - a rejected image is replaced by the next one, the
    rest are counted as skipped. Outputs are atomic: faces.npy and the manifest are
    written in a temp dir that replaces `paths.out` only when the data set passes its checks.
    """
    classes = list(data.classes)
    groups, rejected, skipped = _sort_out(source, classes)
    caps = data.split_caps()
    for key in groups:
        if caps[key[0]] is not None:
            groups[key].sort(key=lambda it: _sample_key(it.origin))
    items = [it for key in sorted(groups, key=_group_order(classes)) for it in groups[key]]
    n_workers = workers if workers is not None else (min(4, cpu_count()) if len(items) >= POOL_MIN_ITEMS else 1)

    with files.atomic_dir(paths.out) as tmp:
        runner = _Runner(tmp / FACES_NAME, items, max_pixels, n_workers)
        try:
            accepted, more_rejected = _run_rounds(runner, items, caps)
            accepted.sort(key=lambda a: (SPLITS.index(a["split"]), classes.index(a["label"]), a["id"]))
            for row, a in enumerate(accepted):
                a["row"] = row
            runner.finish([a["item"] for a in accepted])
        finally:
            runner.close()
        rejected += more_rejected
        skipped["over_max_per_class"] += len(items) - len(accepted) - len(more_rejected)
        metrics = _metrics(source, classes, accepted, rejected, skipped)
        # Written before any failure, so the user can see why.
        rejected.sort(key=lambda r: (r["split"], r["label"], r["path"]))
        _write_csv(paths.rejected, REJECTED_FIELDS, rejected)
        files.write_json(paths.metrics, metrics)
        problems = _problems(metrics, classes, data.max_reject_fraction, paths.rejected)
        if problems:
            raise IngestError("ingest failed: " + "; ".join(problems))
        _write_csv(tmp / MANIFEST_NAME, MANIFEST_FIELDS, accepted)
    return metrics


def _sort_out(
    source: Source, classes: list[str]
) -> tuple[dict[tuple[str, str], list[SourceItem]], list[dict[str, str]], Counter[str]]:
    """The source's items grouped by (split, class) of the selected classes; its rejected
    files as rows; the count of everything skipped, by reason."""
    wanted = set(classes)
    skipped: Counter[str] = Counter()
    groups: dict[tuple[str, str], list[SourceItem]] = defaultdict(list)
    for item in source.items():
        if item.class_name in wanted:
            groups[(item.split, item.class_name)].append(item)
        else:
            skipped["class_not_selected"] += 1
    skipped.update(source.skipped())
    rejected: list[dict[str, str]] = []
    for r in source.rejected():
        if r.class_name and r.class_name not in wanted:
            skipped["class_not_selected"] += 1
        else:
            rejected.append({"split": r.split, "label": r.class_name, "path": r.origin, "reason": r.reason})
    return groups, rejected, skipped


def _metrics(
    source: Source, classes: list[str], accepted: list[dict[str, Any]], rejected: list[dict[str, str]], skipped: Counter[str]
) -> dict[str, Any]:
    per_split_class = Counter((a["split"], a["label"]) for a in accepted)
    splits_present = [s for s in SPLITS if any(per_split_class[(s, c)] for c in classes)]
    return {
        "source": source.describe(),
        "classes": classes,
        # every file the source saw is in exactly one bucket: seen = total + rejected + skipped
        "seen": len(accepted) + len(rejected) + sum(skipped.values()),
        "total": len(accepted),
        "counts": {s: {c: per_split_class[(s, c)] for c in classes} for s in splits_present},
        "split_totals": {s: sum(per_split_class[(s, c)] for c in classes) for s in splits_present},
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(_reason_kind(r["reason"]) for r in rejected).items())),
        "skipped": {k: v for k, v in sorted(skipped.items()) if v},
        "duplicates": duplicate_stats(
            [a["split"] for a in accepted], [a["label"] for a in accepted], [a["pixel_hash"] for a in accepted]
        ),
    }


def _group_order(classes: list[str]):
    return lambda key: (SPLITS.index(key[0]), classes.index(key[1]))


def _run_rounds(
    runner: _Runner, items: list[SourceItem], caps: dict[str, int | None]
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Decode items, group by group, until each (split, class) has its cap of accepted
    images or runs out; uncapped groups go whole in the first round."""
    by_group: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_group[(it.split, it.class_name)].append(i)
    cursor = dict.fromkeys(by_group, 0)
    got = Counter[tuple[str, str]]()
    used: set[str] = set()
    accepted: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    id_of: dict[int, str] = {}

    def tasks(picks: list[int]) -> Iterator[list[int]]:
        # ids are made here, chunk by chunk, while the workers already decode earlier chunks
        for start in range(0, len(picks), CHUNK):
            batch = picks[start : start + CHUNK]
            for i in batch:
                it = items[i]
                id_of[i] = _safe_id(f"{it.split}/{it.class_name}/{it.origin}", used)
            yield batch

    while True:
        picks = []
        for key, indices in by_group.items():
            cap = caps[key[0]]
            want = len(indices) - cursor[key] if cap is None else cap - got[key]
            take = indices[cursor[key] : cursor[key] + max(want, 0)]
            cursor[key] += len(take)
            picks += take
        if not picks:
            return accepted, rejected
        for result in runner.run(tasks(picks)):
            it = items[result[0]]
            if len(result) == 2:
                rejected.append({"split": it.split, "label": it.class_name, "path": it.origin, "reason": result[1]})
                continue
            index, digest, (w, h), mode = result
            got[(it.split, it.class_name)] += 1
            accepted.append(
                {"id": id_of[index], "split": it.split, "label": it.class_name, "item": index, "origin": it.origin,
                 "orig_width": w, "orig_height": h, "orig_mode": mode, "pixel_hash": digest}
            )  # fmt: skip
        if all(caps[key[0]] is None for key in by_group):
            return accepted, rejected


def _problems(metrics: dict[str, Any], classes: list[str], max_fraction: float, rejected_csv: Path) -> list[str]:
    """Why the data set must not be used (missing splits or classes, too many rejects), from its metrics."""
    problems = []
    splits_present = list(metrics["counts"])
    if "train" not in splits_present or "test" not in splits_present:
        problems.append(
            f"the source must provide a train and a test split with usable images, found: {', '.join(splits_present) or 'none'}"
        )
    for split in splits_present:
        empty = [c for c in classes if metrics["counts"][split][c] == 0]
        if empty:
            problems.append(f"split {split!r} has no usable image of class(es) {', '.join(empty)}")
    n_rejected = metrics["rejected"]
    total = metrics["total"] + n_rejected
    if total and n_rejected / total > max_fraction:
        problems.append(
            f"{n_rejected} of {total} images rejected ({n_rejected / total:.2%}), over "
            f"data.max_reject_fraction={max_fraction} (paths and reasons in {rejected_csv})"
        )
    return problems


def duplicate_stats(splits: Sequence[str], labels: Sequence[str], hashes: Sequence[str]) -> dict[str, Any]:
    """Exact duplicates by pixel hash.

    within_split[s]: images of split s that repeat an earlier image of s (copies beyond the first).
    cross_split["a_b"]: distinct images found in both a and b, and how many copies each holds.
    conflicting_labels: distinct images that carry more than one label.
    """
    per_split: dict[str, Counter[str]] = defaultdict(Counter)
    labels_of: dict[str, set[str]] = defaultdict(set)
    for s, lab, h in zip(splits, labels, hashes):
        per_split[s][h] += 1
        labels_of[h].add(lab)
    present = [s for s in SPLITS if s in per_split]
    within = {s: sum(per_split[s].values()) - len(per_split[s]) for s in present}
    cross = {}
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            shared = per_split[a].keys() & per_split[b].keys()
            cross[f"{a}_{b}"] = {
                "distinct_images": len(shared),
                f"{a}_copies": sum(per_split[a][h] for h in shared),
                f"{b}_copies": sum(per_split[b][h] for h in shared),
            }
    return {
        "within_split": within,
        "within_split_total": sum(within.values()),
        "cross_split": cross,
        "conflicting_labels": sum(1 for v in labels_of.values() if len(v) > 1),
    }


def _write_csv(path: str | os.PathLike[str], fields: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with files.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        writer.writerows(map(itemgetter(*fields), rows))  # 3x faster than csv.DictWriter
