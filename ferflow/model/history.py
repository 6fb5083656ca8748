"""metrics/history.csv: one row per epoch (epoch, loss, accuracy, val_*, learning_rate,
epoch_time_s, images_per_s), written by training after every epoch and read by resume,
evaluate's summary and curves, and the MLflow backfill: one reader, one writer."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ferflow.core import files


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with files.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_history(path: Path) -> list[dict[str, Any]]:
    """The rows, `epoch` as int and the rest as floats (empty cells left out); [] if absent."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as fh:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]
