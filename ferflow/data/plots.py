"""Data plots: class distribution per split and a grid of sample faces per class."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ferflow.core import files


def plot_class_distribution(index: pd.DataFrame, classes: list[str], out: str | os.PathLike[str]) -> None:
    """Bar plot: images per class, one bar colour per split, counts on the bars.

    pandas' own bar plot, not seaborn's: importing seaborn (scipy with it) would add ~1-3 s
    to the index stage, more than drawing the whole plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in ("train", "val", "test") if s in set(index["split"])]
    counts = index.groupby(["label", "split"]).size().unstack("split", fill_value=0)
    counts = counts.reindex(index=classes, columns=splits, fill_value=0)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    counts.plot.bar(ax=ax, rot=0, width=0.8)
    for container in ax.containers:
        ax.bar_label(container, fontsize=7)
    ax.legend(title="split", loc="upper right")  # a fixed corner: "best" tries every spot (a quarter of the plot's time)
    total = len(index)
    ax.set_title(f"Class distribution per split ({total} images)")
    ax.set_xlabel("")
    ax.set_ylabel("images")
    # fixed margins (room for 5-digit tick labels): tight_layout would draw the whole figure an extra time
    fig.subplots_adjust(left=0.085, right=0.99, top=0.92, bottom=0.07)
    with files.atomic_path(out) as tmp:
        # a chart of flat colours: zlib level 1 is several times faster than the default 6, ~10% larger
        fig.savefig(tmp, dpi=110, pil_kwargs={"compress_level": 1})
    plt.close(fig)


def sample_grid(
    index: pd.DataFrame, faces: np.ndarray, classes: list[str], out: str | os.PathLike[str], per_class: int = 10, seed: int = 0
) -> None:
    """A PNG with one row of `per_class` random train faces per class, class name on the left
    (`faces`: the ingested uint8 (N, 48, 48) array that the index's `row` column points into)."""
    from PIL import ImageDraw

    size, label_w = 48, 70
    grid = Image.new("L", (label_w + per_class * size, len(classes) * size), 255)
    draw = ImageDraw.Draw(grid)
    rng = np.random.default_rng(seed)
    pool = index[index["split"] == "train"] if (index["split"] == "train").any() else index
    for row, label in enumerate(classes):
        rows = pool.loc[pool["label"] == label, "row"].to_numpy()
        chosen = rng.choice(rows, size=min(per_class, len(rows)), replace=False) if len(rows) else []
        draw.text((4, row * size + 18), label, fill=0)
        for col, face_row in enumerate(chosen):
            grid.paste(Image.fromarray(np.asarray(faces[face_row]), "L"), (label_w + col * size, row * size))
    with files.atomic_path(out) as tmp:
        grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(tmp, format="PNG")


def write_data_plots(index: pd.DataFrame, faces: np.ndarray, classes: list[str], out_dir: str | os.PathLike[str]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_class_distribution(index, classes, out_dir / "class_distribution.png")
    sample_grid(index, faces, classes, out_dir / "samples.png")
