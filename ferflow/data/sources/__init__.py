"""Data sources for the ingest stage.

A source is anything that yields `SourceItem`s: one image with its split, canonical
class name and where it came from. `open_source(params)` picks the implementation
from `data.source`:

- `synthetic`: generated faces (ferflow.data.sources.synthetic), counts from `data.synthetic`.
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
from pathlib import Path

from ferflow.core.params import DataParams
from ferflow.data.sources.base import SPLITS, Source, SourceItem, SourceReject


def resolve_path(source: str, root: str | os.PathLike[str]) -> Path:
    path = Path(source).expanduser()
    return path if path.is_absolute() else Path(root) / path


def open_source(data: DataParams, root: str | os.PathLike[str] = ".") -> Source:
    """The Source named by `data.source`."""
    if data.source == "synthetic":
        from ferflow.data.sources.synthetic import SyntheticSource

        return SyntheticSource(data.synthetic.train_per_class, data.synthetic.test_per_class, data.seed, data.classes)
    from ferflow.data.sources.files import open_path_source  # real-data readers: folders, zips, fer2013.csv

    return open_path_source(resolve_path(data.source, root), data.class_map, follow_symlinks=data.follow_symlinks)


__all__ = ["SPLITS", "Source", "SourceItem", "SourceReject", "open_source", "resolve_path"]
