"""Real-data sources: image folders in the FER-2013 (Kaggle) layout.

    <root>/train/<class>/*.jpg   <root>/test/<class>/*.jpg   [<root>/val|validation/<class>/...]

Class folder names are mapped to the canonical FER-2013 names (synonyms, any case);
an unknown class folder is an error naming it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ferflow.classes import canonical_class
from ferflow.sources import Source, SourceItem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}


def split_of(name: str) -> str | None:
    return SPLIT_NAMES.get(name.lower())


class FolderSource(Source):
    kind = "folder"

    def __init__(self, root: Path, class_map: dict[str, str] | None = None):
        self.root = root
        self.class_map = class_map or {}
        self.split_dirs = self._find_split_dirs(root)

    @staticmethod
    def _find_split_dirs(root: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for entry in sorted(root.iterdir()):
            split = split_of(entry.name) if entry.is_dir() else None
            if split:
                if split in found:
                    raise ValueError(f"{root}: both {found[split].name!r} and {entry.name!r} name the {split!r} split")
                found[split] = entry
        if not found:
            raise ValueError(f"{root}: no train/ or test/ folder found (expected <root>/train/<class>/..., <root>/test/<class>/...)")
        return found

    def items(self) -> Iterator[SourceItem]:
        for split, split_dir in self.split_dirs.items():
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                class_name = canonical_class(class_dir.name, self.class_map)
                for path in sorted(class_dir.iterdir()):
                    if path.name.startswith(".") or not path.is_file():
                        continue
                    yield SourceItem(split, class_name, str(path.relative_to(self.root)), path.read_bytes)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.root), "splits": sorted(self.split_dirs)}


def open_path_source(path: Path, data_params: dict[str, Any]) -> Source:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.source: {path} does not exist (expected 'synthetic' or a folder, .zip or .csv)")
    if path.is_dir():
        return FolderSource(path, data_params.get("class_map"))
    raise ValueError(f"data.source: {path} is not a folder (zip and CSV sources: see the README)")
