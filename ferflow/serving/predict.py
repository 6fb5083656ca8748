"""Classify facial expressions in image files with the exported model (table, JSON, annotated PNG).

    ferflow predict photo.jpg faces/ [--model models/export] [--annotate OUT.png] [--json] [--all-faces]

Runs the same MLflow pyfunc that `mlflow models serve` serves (face detection,
preprocessing, optional TTA), in-process. Directories are searched recursively.
Exit status: 0 all classified, 1 some files could not be classified, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferflow.core.params import FACE_DETECTORS, TTA_MODES
from ferflow.serving.model import DEFAULT_MODEL, UsageError, describe_model, load_model, model_classes, resolve_model_uri

if TYPE_CHECKING:
    from tqdm import tqdm

# Only light imports here: `ferflow --help` imports this module to list the subcommand.

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMG", help="image files, or directories searched recursively")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"exported model directory or MLflow model URI, e.g. models:/ferflow-emotion@champion (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--annotate",
        metavar="OUT.png",
        help="write the image with the face box and label drawn on it; with several images, a directory for <name>.annotated.png",
    )
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    parser.add_argument("--no-detect-face", action="store_true", help="classify whole images (skip the Haar face detector)")
    parser.add_argument("--detector", choices=FACE_DETECTORS, help="face detector (default: the model's serve.face_detector)")
    parser.add_argument(
        "--all-faces", action="store_true", help="classify every face of each image, each with its box (default: the largest)"
    )
    parser.add_argument("--tta", choices=TTA_MODES, default=None, help="test-time augmentation (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; directories expanded (recursively) to their image files, sorted."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    # hidden names only below the given path: the user may have typed /data/.cache/faces
                    if p.is_file()
                    and p.suffix.lower() in IMAGE_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{path}: no such file or directory")
    if not found:
        raise UsageError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, paths))}")
    return found


def _record(path: Path, row: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    from ferflow.serving.faces import BOX_COLUMNS

    probs = {c: float(row[c]) for c in classes}
    top = sorted(probs.items(), key=lambda kv: -kv[1])[:3]
    return {
        "file": str(path),
        "label": str(row["label"]),
        "confidence": float(row["confidence"]),
        "face_found": bool(row["face_found"]),
        "face_box": [int(row[k]) for k in BOX_COLUMNS],
        "top3": [[c, p] for c, p in top],
        "probabilities": probs,
    }


def _records(paths: Sequence[Path], out: Any, classes: Sequence[str]) -> dict[Path, dict[str, Any]]:
    """Prediction rows -> one record per file. With faces="all" (column image_index) the
    record is its largest face's, plus "faces": every face, largest first."""
    rows = out.to_dict("records")
    if "image_index" not in out.columns:
        return {p: _record(p, row, classes) for p, row in zip(paths, rows)}
    faces: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        faces.setdefault(int(row["image_index"]), []).append(row)
    records = {}
    for i, p in enumerate(paths):
        found = [_record(p, row, classes) for row in faces[i]]
        for face in found:
            del face["file"]
        records[p] = {**_record(p, faces[i][0], classes), "faces": found}
    return records


def face_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table record per face ("file#k" for the k-th face of a file with several); errors kept."""
    out = []
    for r in records:
        faces = r.get("faces")
        if not faces or len(faces) == 1:
            out.append(r)
            continue
        out.extend({**face, "file": f"{r['file']}#{k}"} for k, face in enumerate(faces))
    return out


def predict_files(
    model: Any, paths: Sequence[Path], params: dict[str, Any], batch_size: int = 32, progress: tqdm | None = None
) -> list[dict[str, Any]]:
    """One record per file: predictions, or {'file', 'error'} for a file that failed."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    classes = model_classes(model)
    records: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        payload: list[tuple[Path, bytes]] = []
        errors: dict[Path, str] = {}
        for p in chunk:
            try:
                payload.append((p, p.read_bytes()))
            except OSError as exc:
                errors[p] = f"cannot read: {exc.strerror or exc}"
        results: dict[Path, dict[str, Any]] = {}
        if payload:
            try:
                out = model.predict(pd.DataFrame({"image": [b for _, b in payload]}), params=params)
                results = _records([p for p, _ in payload], out, classes)
            except MlflowException:
                # one bad file fails the whole batch: redo it file by file to name the culprit
                for p, data in payload:
                    try:
                        results[p] = _records([p], model.predict(pd.DataFrame({"image": [data]}), params=params), classes)[p]
                    except MlflowException as exc:
                        errors[p] = exc.message.replace("row 0: ", "")
        for p in chunk:
            records.append(results[p] if p in results else {"file": str(p), "error": errors[p]})
        if progress is not None:
            progress.update(len(chunk))
    return records


def predict_bytes(model: Any, name: str, data: bytes, params: dict[str, Any]) -> dict[str, Any]:
    """The record `predict_files` gives a file, for an image held in memory (an upload);
    {'file', 'error'} when the model refuses it (the served model's 400 message)."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    try:
        out = model.predict(pd.DataFrame({"image": [data]}), params=params)
    except MlflowException as exc:
        return {"file": name, "error": exc.message.replace("row 0: ", "")}
    return _records([Path(name)], out, model_classes(model))[Path(name)]


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """Aligned text table: file, face found, label, confidence, top-3 (errors in place of labels)."""
    from tabulate import tabulate

    header = ("file", "face", "label", "conf", "top-3")
    rows = []
    for r in records:
        if "error" in r:
            rows.append((r["file"], "-", "ERROR", "-", r["error"]))
        else:
            top3 = ", ".join(f"{c} {p:.2f}" for c, p in r["top3"])
            rows.append((r["file"], "yes" if r["face_found"] else "no", r["label"], f"{r['confidence']:.3f}", top3))
    return tabulate(rows, headers=header, tablefmt="plain", disable_numparse=True)


def _to_rgb(img):
    from PIL import Image

    from ferflow.data.preprocessing import HIGH_DEPTH_MODES, to_grayscale

    if img.mode in HIGH_DEPTH_MODES:
        return Image.merge("RGB", [to_grayscale(img)] * 3)  # PIL's RGB conversion would clip these
    return img.convert("RGB")


MIN_LABEL_FONT_PX = 8  # smaller is unreadable; a smaller image is enlarged instead


def _label(face: dict[str, Any]) -> str:
    return f"{face['label']} {face['confidence']:.2f}" + ("" if face["face_found"] else " (no face found)")


def annotate(image_path: Path, record: dict[str, Any], out: str | Path) -> Path:
    """Draw the classified square and 'label confidence' onto the original image; write a PNG atomically.

    Every label fits inside the image: the font shrinks to fit, down to MIN_LABEL_FONT_PX;
    an image too narrow even for that (a 48 px face) is enlarged by a whole factor first.
    """
    from PIL import Image, ImageDraw, ImageFont

    from ferflow.core import files

    with Image.open(image_path) as src:
        img = _to_rgb(src)
    faces = record.get("faces") or [record]  # --all-faces: every face; else the one classified

    def widest(size: int) -> float:
        font = ImageFont.load_default(size=size)
        return max(font.getlength(_label(face)) for face in faces) + 4  # + the background's margin

    size = max(10, round(min(img.size) / 18))
    while size > MIN_LABEL_FONT_PX and widest(size) > img.width:
        size -= 1
    scale = max(1, math.ceil(widest(size) / img.width))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(img)
    thickness = max(1, round(min(img.size) / 150))
    for face in faces:
        x, y, w, h = (v * scale for v in face["face_box"])
        colour = (40, 220, 60) if face["face_found"] else (255, 190, 0)  # green: detected face; amber: whole image
        if face["face_found"]:
            draw.rectangle((x, y, x + w - 1, y + h - 1), outline=colour, width=thickness)
        text = _label(face)
        tx, ty = (x, max(0, y - font.size - 2 * thickness)) if face["face_found"] else (2, 2)
        tx = max(2, min(tx, img.width - 2 - math.ceil(font.getlength(text))))  # shift left rather than run off
        left, top, right, bottom = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text((tx, ty), text, fill=colour, font=font)
    out = Path(out)
    with files.atomic_path(out) as tmp:
        img.save(tmp, format="PNG")
    return out


def annotation_paths(paths: Sequence[Path], target: str | Path) -> list[Path]:
    """`target` itself for one image; else `target/<stem>.annotated.png`, numbered when stems repeat."""
    if len(paths) == 1:
        return [Path(target)]
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        out.append(Path(target) / (f"{p.stem}.annotated.png" if n == 0 else f"{p.stem}-{n}.annotated.png"))
    return out


def run(args: argparse.Namespace) -> int:
    try:
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
        paths = collect_images(args.images)
        if args.annotate and len(paths) > 1 and Path(args.annotate).suffix:
            raise UsageError(f"--annotate {args.annotate}: {len(paths)} images need a directory, not a file name")
        model = load_model(args.model)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe_model(resolve_model_uri(args.model), model), file=sys.stderr)
    params: dict[str, Any] = {}
    if args.no_detect_face:
        params["detect_face"] = False
    if args.tta:
        params["tta"] = args.tta
    if args.all_faces:
        params["faces"] = "all"
    if args.detector:
        params["face_detector"] = args.detector
    from tqdm import tqdm

    with tqdm(total=len(paths), unit="image", disable=not sys.stderr.isatty() or len(paths) < 2) as progress:
        records = predict_files(model, paths, params, args.batch_size, progress)
    if args.annotate:
        for path, record, out in zip(paths, records, annotation_paths(paths, args.annotate)):
            if "error" not in record:
                record["annotated"] = str(annotate(path, record, out))
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(format_table(face_records(records) if args.all_faces else records))
    failed = sum("error" in r for r in records)
    if failed:
        print(f"{failed} of {len(records)} file(s) could not be classified", file=sys.stderr)
    return 1 if failed else 0
