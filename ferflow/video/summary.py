"""Per-video summary of `ferflow watch`: which emotion dominates, for whom, and when.

Shares count face-frames: each face in each processed frame adds one vote for its label
(the smoothed one under --smooth), so a face on screen twice as long weighs twice as much.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ferflow.video.analyze import WatchResult

TIMELINE_BINS = 60  # at most this many time bins in the JSON timeline and the PNG


def _shares(counts: Counter[str], classes: list[str]) -> dict[str, float]:
    total = sum(counts.values())
    return {c: round(counts[c] / total, 4) if total else 0.0 for c in classes}


def _dominant(counts: Counter[str], classes: list[str]) -> str | None:
    # ties go to the earlier class in the model's order, so the result is deterministic
    return max(classes, key=lambda c: (counts[c], -classes.index(c))) if counts else None


def summarize(result: WatchResult, classes: list[str], every: int, smooth: int, detector: str) -> dict[str, Any]:
    """The JSON summary: counts, dominant emotion overall and per face, shares, timeline."""
    overall: Counter[str] = Counter()
    per_face: dict[int, dict[str, Any]] = {}
    for frame in result.frames:
        for face_id, label_index in frame.faces:
            label = classes[label_index]
            overall[label] += 1
            entry = per_face.setdefault(face_id, {"counts": Counter(), "first_s": frame.time_s, "first_frame": frame.index})
            entry["counts"][label] += 1
            entry["last_s"], entry["last_frame"] = frame.time_s, frame.index
    duration = result.frames[-1].time_s if result.frames else 0.0
    return {
        "source": result.info.name,
        "width": result.size[0],
        "height": result.size[1],
        "fps": round(result.info.fps, 3),
        "frames_read": result.frames_read,
        "frames_processed": len(result.frames),
        "every": every,
        "smooth": smooth,
        "detector": detector,
        "interrupted": result.interrupted,
        "duration_s": round(duration, 3),
        "frames_with_faces": sum(1 for f in result.frames if f.faces),
        "face_detections": sum(overall.values()),
        "faces": len(per_face),
        "dominant_emotion": _dominant(overall, classes),
        "emotion_share": _shares(overall, classes),
        "per_face": [
            {
                "face_id": face_id,
                "detections": sum(e["counts"].values()),
                "first_frame": e["first_frame"],
                "last_frame": e["last_frame"],
                "first_s": round(e["first_s"], 3),
                "last_s": round(e["last_s"], 3),
                "dominant_emotion": _dominant(e["counts"], classes),
                "emotion_share": _shares(e["counts"], classes),
            }
            for face_id, e in sorted(per_face.items())
        ],
        "timeline": timeline(result, classes, duration, every),
    }


def timeline(result: WatchResult, classes: list[str], duration: float, every: int = 1) -> list[dict[str, Any]]:
    """Emotion shares in equal time bins: at most TIMELINE_BINS, and at least one processed
    frame period wide (`every` frames), so no bin falls between two processed frames."""
    if not result.frames:
        return []
    period = every / result.info.fps
    width = max(duration / TIMELINE_BINS, period) if duration > 0 else period
    n_bins = int(duration / width + 1e-6) + 1
    counts: list[Counter[str]] = [Counter() for _ in range(n_bins)]
    for frame in result.frames:
        # the epsilon: frame i at i/fps must land in bin i, not i-1, when width == 1/fps
        b = min(int(frame.time_s / width + 1e-6), n_bins - 1)
        for _, label_index in frame.faces:
            counts[b][classes[label_index]] += 1
    return [
        {
            "start_s": round(i * width, 3),
            "end_s": round((i + 1) * width, 3),
            "face_detections": sum(c.values()),
            "dominant_emotion": _dominant(c, classes),
            "emotion_share": _shares(c, classes),
        }
        for i, c in enumerate(counts)
    ]


def plot_timeline(summary: dict[str, Any], classes: list[str], out: str | Path) -> Path:
    """Stacked area of emotion shares over time (bins without faces left blank); PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from ferflow.core import files

    bins = summary["timeline"]
    # bin edges with step="post": each bin is drawn over its whole span, the last one included
    edges = np.array([b["start_s"] for b in bins] + [bins[-1]["end_s"]] if bins else [])
    shares = np.array([[b["emotion_share"][c] for c in classes] for b in bins]).reshape(len(bins), len(classes)).T
    shares = np.concatenate([shares, shares[:, -1:]], axis=1) if bins else shares
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=110)
    colours = sns.color_palette("tab10", len(classes))
    if len(bins):
        ax.stackplot(edges, shares, labels=classes, colors=colours, step="post", alpha=0.9)
        ax.set_xlim(bins[0]["start_s"], bins[-1]["end_s"])
    ax.set_ylim(0, 1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("share of faces")
    dominant = summary["dominant_emotion"] or "no faces"
    ax.set_title(f"{Path(summary['source']).name}: {summary['faces']} face(s), dominant: {dominant}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    out = Path(out)
    with files.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
