"""Face ids across video frames: greedy IoU matching, plus optional probability smoothing.

A face keeps its id while its box overlaps (IoU >= `min_iou`) the box the same track had
in the last frame it was seen, for up to `max_missed` processed frames without a match
(a blink of the detector must not start a new person). With `smooth` > 1 each track
reports the mean of its last `smooth` probability vectors, so labels do not flicker.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ferflow.serving.faces import Box


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when they do not overlap)."""
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    face_id: int
    box: Box
    missed: int = 0
    history: deque[np.ndarray] = field(default_factory=deque)


class IouTracker:
    """Assigns a stable `face_id` to each detection, frame after frame."""

    def __init__(self, min_iou: float = 0.3, max_missed: int = 10, smooth: int = 1) -> None:
        if smooth < 1:
            raise ValueError(f"smooth must be >= 1 frame, got {smooth}")
        self.min_iou, self.max_missed, self.smooth = min_iou, max_missed, smooth
        self.tracks: list[Track] = []
        self.next_id = 0

    def update(self, boxes: list[Box]) -> list[int]:
        """The face id of each box in `boxes` (same order); unmatched boxes start new tracks."""
        pairs = sorted(
            ((iou(t.box, b), ti, bi) for ti, t in enumerate(self.tracks) for bi, b in enumerate(boxes)),
            reverse=True,
        )
        assigned: dict[int, Track] = {}
        used: set[int] = set()
        for overlap, ti, bi in pairs:
            if overlap < self.min_iou:
                break
            if ti in used or bi in assigned:
                continue
            used.add(ti)
            assigned[bi] = self.tracks[ti]
        for ti, track in enumerate(self.tracks):
            track.missed = 0 if ti in used else track.missed + 1
        self.tracks = [t for t in self.tracks if t.missed <= self.max_missed]
        ids = []
        for bi, box in enumerate(boxes):
            track = assigned.get(bi)
            if track is None:
                track = Track(self.next_id, box, history=deque(maxlen=self.smooth))
                self.next_id += 1
                self.tracks.append(track)
            track.box = box
            ids.append(track.face_id)
        return ids

    def smoothed(self, face_ids: list[int], probs: np.ndarray) -> np.ndarray:
        """Record this frame's probabilities per face; return the mean of each face's last `smooth`."""
        by_id = {t.face_id: t for t in self.tracks}
        out = np.empty_like(probs)
        for row, face_id in enumerate(face_ids):
            history = by_id[face_id].history
            history.append(probs[row])
            out[row] = np.mean(history, axis=0)
        return out
