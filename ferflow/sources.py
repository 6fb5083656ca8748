"""Data sources for the ingest stage.

A source is anything that yields `SourceItem`s: one image with its split, canonical
class name and where it came from. `open_source(params)` picks the implementation
from `data.source`:

- `synthetic`: generated faces (ferflow.synthetic), counts from `data.synthetic`.
- a path (relative to the repo root or absolute) to a folder, `.zip` or `.csv`.

Items hand over either encoded bytes (decoded by ingest, so corrupt files become
rejected rows) or ready uint8 pixels. Files a source finds but cannot place (an image
outside any class folder, a CSV row with an unknown emotion code) come back from
`rejected()`; files it passes over on purpose (hidden files, `__MACOSX/`) are counted
by `skipped()`. Both are read by ingest after `items()` is exhausted, so nothing is
dropped silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ferflow import synthetic

SPLITS: tuple[str, ...] = ("train", "val", "test")


class SourceItem(NamedTuple):  # a tuple, not a dataclass: made once per image, 3x cheaper
    split: str  # train / val / test
    class_name: str  # canonical FER-2013 name
    origin: str  # where it came from, for the manifest and rejected.csv
    read: Callable[[], bytes | np.ndarray]  # encoded bytes, or uint8 pixels (H, W)


@dataclass(frozen=True)
class SourceReject:
    split: str  # "" when not known
    class_name: str  # "" when not known
    origin: str
    reason: str


class Source:
    """Base class: `items()` yields SourceItems; `describe()` says what it is."""

    kind = "abstract"

    def items(self) -> Iterator[SourceItem]:
        raise NotImplementedError

    def rejected(self) -> list[SourceReject]:
        """Files found while listing that cannot become items (valid after `items()`)."""
        return []

    def skipped(self) -> dict[str, int]:
        """Entries passed over on purpose, by reason (valid after `items()`)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


class SyntheticSource(Source):
    kind = "synthetic"

    def __init__(self, train_per_class: int, test_per_class: int, seed: int, classes: list[str]):
        self.counts = {"train": train_per_class, "test": test_per_class}
        self.seed = seed
        self.classes = list(classes)

    def items(self) -> Iterator[SourceItem]:
        for split, per_class in self.counts.items():
            for class_name, index, pixels in synthetic.generate_split(split, per_class, self.seed, self.classes):
                yield SourceItem(split, class_name, f"synthetic:{split}/{class_name}/{index}", lambda p=pixels: p)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed, **{f"{k}_per_class": v for k, v in self.counts.items()}}


def resolve_path(source: str, root: str | os.PathLike[str]) -> Path:
    path = Path(source).expanduser()
    return path if path.is_absolute() else Path(root) / path


def open_source(data_params: dict[str, Any], root: str | os.PathLike[str] = ".") -> Source:
    """The Source named by `data.source` (validated params of the `data` section)."""
    spec = data_params["source"]
    if spec == "synthetic":
        syn = data_params["synthetic"]
        return SyntheticSource(syn["train_per_class"], syn["test_per_class"], data_params["seed"], data_params["classes"])
    from ferflow import file_sources  # real-data readers: folders, zips, fer2013.csv

    return file_sources.open_path_source(resolve_path(spec, root), data_params)
