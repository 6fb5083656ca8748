"""Face detector quality: YuNet (default) vs Haar vs MTCNN, recall and precision of face boxes.

    .venv/bin/python benchmarks/face_detectors.py [--set standard|hard] [--fer-zip ../shared/data/fer2013.zip]
        [--images 80] [--detectors yunet,haar,mtcnn] [--json out.json]

Labelled set, the same for every detector:
  * composites: FER-2013 faces (48x48 gray crops from the zip's train/ folder; synthetic
    faces when the zip is missing, said in the output) pasted, 1-4 per image, at known
    positions, onto 640x480 backgrounds without faces. `standard`: sides of 40-200 px
    (log-uniform) on scikit-image's coffee, rocket and chelsea-the-cat photos and a
    gradient. `hard`: sides of 40-80 px, each face blurred (Gaussian, sigma 0.5-2 px after
    the upscaling from 48 px), on textures (scikit-image's brick, grass and gravel, and
    the scrolling background of the video tests);
  * real photos: `skimage.data.astronaut()` and `skimage.data.camera()`, one face each,
    labelled by eye (`video_synth.ASTRONAUT_FACE`, `CAMERAMAN_FACE`).
A detection is a hit when its IoU with a not yet matched true box is >= --iou (greedy,
best overlap first). FER crops are tight (forehead to chin), detector boxes are looser
or tighter by convention, hence 0.4 by default rather than 0.5.
Each detector runs twice: with the still-image settings (detect on its `still_side`: YuNet
800, Haar and MTCNN <= 480; Haar pyramid step 1.1) and with the video settings `ferflow
watch` uses (`video_side`: YuNet 800 as for stills, the others 320; step 1.2). ms/image is the detector
alone, one thread. Nothing here is a test; the tables go to docs/video.md.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # video_synth.py: composited test images

import numpy as np  # noqa: E402

SIZE = (640, 480)
SIZE_BUCKETS = ((0, 64), (64, 128), (128, 10_000))
FACE_SIDES = {"standard": (40, 200), "hard": (40, 80)}
HARD_BLUR_SIGMA = (0.5, 2.0)


def fer_faces(zip_path: Path, n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], str]:
    """`n` random FER-2013 train faces, or synthetic ones when the zip is absent."""
    if zip_path.is_file():
        from PIL import Image

        with zipfile.ZipFile(zip_path) as z:
            names = [m for m in z.namelist() if "/train/" in m and m.lower().endswith((".png", ".jpg", ".jpeg"))]
            picked = rng.choice(len(names), size=n, replace=False)
            faces = [np.asarray(Image.open(io.BytesIO(z.read(names[i]))).convert("L")) for i in picked]
        return faces, f"FER-2013 train faces from {zip_path}"
    from ferflow.core.classes import FER_CLASSES
    from ferflow.data.sources.synthetic import generate_face

    return [generate_face(rng, FER_CLASSES[i % len(FER_CLASSES)]) for i in range(n)], "synthetic faces (no FER-2013 zip)"


def backgrounds(which: str) -> list[np.ndarray]:
    import cv2
    from skimage import data

    from video_synth import background

    photos = (
        (data.coffee(), data.rocket(), data.chelsea()) if which == "standard" else (data.brick(), data.grass(), data.gravel())
    )
    out = []
    for img in photos:
        rgb = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)
        out.append(cv2.resize(rgb, SIZE, interpolation=cv2.INTER_AREA))
    out.append(background(SIZE, seed=3)[:, : SIZE[0]])
    return out


def composites(
    faces: list[np.ndarray], n_images: int, rng: np.random.Generator, which: str
) -> list[tuple[np.ndarray, list[Any]]]:
    import cv2

    from ferflow.serving.faces import Box
    from ferflow.video.tracker import iou

    bgs = backgrounds(which)
    lo, hi = FACE_SIDES[which]
    out, face_i = [], 0
    for i in range(n_images):
        img = bgs[i % len(bgs)].copy()
        boxes: list[Box] = []
        for _ in range(int(rng.integers(1, 5))):
            for _attempt in range(50):
                side = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
                x, y = int(rng.integers(0, SIZE[0] - side)), int(rng.integers(0, SIZE[1] - side))
                box = Box(x, y, side, side)
                if all(iou(box, b) == 0 and not _near(box, b) for b in boxes):
                    break
            else:
                continue
            face = cv2.resize(faces[face_i % len(faces)], (side, side), interpolation=cv2.INTER_CUBIC)
            if which == "hard":
                face = cv2.GaussianBlur(face, (0, 0), float(rng.uniform(*HARD_BLUR_SIGMA)))
            face_i += 1
            img[y : y + side, x : x + side] = face[..., None]
            boxes.append(box)
        out.append((img, boxes))
    return out


def _near(a: Any, b: Any, gap: int = 8) -> bool:
    return not (a.x + a.w + gap <= b.x or b.x + b.w + gap <= a.x or a.y + a.h + gap <= b.y or b.y + b.h + gap <= a.y)


def match(found: list[Any], truth: list[Any], min_iou: float) -> list[bool]:
    """Which true boxes were hit (greedy by overlap, one detection per true box)."""
    from ferflow.video.tracker import iou

    pairs = sorted(((iou(f, t), fi, ti) for fi, f in enumerate(found) for ti, t in enumerate(truth)), reverse=True)
    used_f, hit = set(), [False] * len(truth)
    for overlap, fi, ti in pairs:
        if overlap < min_iou:
            break
        if fi in used_f or hit[ti]:
            continue
        used_f.add(fi)
        hit[ti] = True
    return hit


def evaluate(
    detector: Any, images: list[tuple[np.ndarray, list[Any]]], max_side: int, scale: float, min_iou: float
) -> dict[str, Any]:
    tp = n_found = n_true = 0
    bucket_hits = {b: [0, 0] for b in SIZE_BUCKETS}
    start = time.perf_counter()
    for img, truth in images:
        found = detector.detect_all(img, max_side, scale)
        hit = match(found, truth, min_iou)
        tp += sum(hit)
        n_found += len(found)
        n_true += len(truth)
        for t, h in zip(truth, hit):
            bucket = next(b for b in SIZE_BUCKETS if b[0] <= t.w < b[1])
            bucket_hits[bucket][0] += h
            bucket_hits[bucket][1] += 1
    seconds = time.perf_counter() - start
    return {
        "true_faces": n_true,
        "detections": n_found,
        "hits": tp,
        "recall": round(tp / max(1, n_true), 3),
        "precision": round(tp / max(1, n_found), 3),
        "recall_by_side": {
            f"{lo}-{hi if hi < 10_000 else ''}px": round(h / max(1, n), 3) for (lo, hi), (h, n) in bucket_hits.items()
        },
        "ms_per_image": round(1000 * seconds / len(images), 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", choices=sorted(FACE_SIDES), default="standard", help="which composites (see above)")
    p.add_argument("--detectors", default="yunet,haar,mtcnn", help="comma-separated detector names")
    p.add_argument("--fer-zip", type=Path, default=REPO.parent / "shared" / "data" / "fer2013.zip")
    p.add_argument("--images", type=int, default=80)
    p.add_argument("--iou", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()

    from skimage import data

    from ferflow.serving.faces import SCALE_FACTOR, make_detector
    from ferflow.video.analyze import VIDEO_SCALE_FACTOR
    from video_synth import ASTRONAUT_FACE, CAMERAMAN_FACE

    rng = np.random.default_rng(args.seed)
    faces, origin = fer_faces(args.fer_zip, 4 * args.images, rng)
    images = composites(faces, args.images, rng, args.set)
    camera = np.repeat(data.camera()[..., None], 3, axis=-1)
    photos = [(data.astronaut(), [ASTRONAUT_FACE]), (camera, [CAMERAMAN_FACE])]
    n_faces = sum(len(t) for _, t in images)
    print(f"{args.set}: {len(images)} composites, {n_faces} faces ({origin}); IoU >= {args.iou}")
    rows = []
    for name in args.detectors.split(","):
        detector = make_detector(name)
        for mode, side, scale in (
            ("stills", detector.still_side, SCALE_FACTOR),
            ("video", detector.video_side, VIDEO_SCALE_FACTOR),
        ):
            comp = evaluate(detector, images, side, scale, args.iou)
            real = evaluate(detector, photos, side, scale, args.iou)
            rows.append({"detector": name, "settings": mode, "composites": comp, "real_photos": real})
            print(
                f"{name:<6}{mode:<7}{side:>4} px composites: recall {comp['recall']:.3f} precision {comp['precision']:.3f} "
                f"by side {comp['recall_by_side']} {comp['ms_per_image']:.0f} ms/image | "
                f"real photos: {real['hits']}/{real['true_faces']} found, {real['detections'] - real['hits']} false",
                flush=True,
            )
    if args.json:
        report = {"set": args.set, "seed": args.seed, "faces": origin, "iou": args.iou, "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
