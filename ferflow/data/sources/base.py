"""What every data source yields: `SourceItem`s, `SourceReject`s, and the `Source` base class."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

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
