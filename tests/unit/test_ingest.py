"""Ingest on real-layout fixtures: every mode/format becomes 48x48 L, every bad file a rejected row."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ferflow.core.classes import FER_CLASSES
from ferflow.core.params import DataParams
from ferflow.data.ingest import (
    FACES_NAME,
    MANIFEST_NAME,
    IngestError,
    IngestPaths,
    duplicate_stats,
    ingest,
    load_faces,
    pixel_hash,
)
from ferflow.data.preprocessing import ImageError, decode_face, decode_image, to_face_pixels
from ferflow.data.sources.files import open_path_source


def noise(seed: int, size: tuple[int, int] = (48, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(seed: int) -> bytes:
    return encode(Image.fromarray(noise(seed), "L"), "PNG")


def base_tree(per_class: int = 1, seed: int = 0) -> dict[str, bytes]:
    """`per_class` distinct PNG faces for every class of train and test."""
    files = {}
    for s, split in enumerate(("train", "test")):
        for c, name in enumerate(FER_CLASSES):
            for i in range(per_class):
                files[f"{split}/{name}/{split}_{name}_{i}.png"] = png(seed + 10_000 * s + 100 * c + i)
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def run_ingest(tmp_path: Path, source_path: Path, **kw) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Ingest `source_path`; keyword arguments are `data` params, and ingest's own options."""
    options = {k: kw.pop(k) for k in ("workers", "max_pixels") if k in kw}
    data = DataParams(**kw)
    paths = IngestPaths(tmp_path / "ingested", tmp_path / "rejected.csv", tmp_path / "ingest.json")
    metrics = ingest(open_path_source(source_path, data.class_map), paths, data, **options)
    assert json.loads((tmp_path / "ingest.json").read_text()) == json.loads(json.dumps(metrics))
    manifest = pd.read_csv(tmp_path / "ingested" / MANIFEST_NAME, keep_default_na=False, dtype=str)
    rejected = pd.read_csv(tmp_path / "rejected.csv", keep_default_na=False, dtype=str)
    return metrics, manifest, rejected


def stored_pixels(tmp_path: Path, manifest: pd.DataFrame, origin: str) -> np.ndarray:
    (row,) = manifest.loc[manifest["origin"] == origin, "row"]
    faces = load_faces(tmp_path / "ingested", expected_rows=len(manifest))
    return np.asarray(faces[int(row)])


def test_every_mode_and_format_becomes_48x48_grayscale(tmp_path):
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., :3] = 20
    rgba[:, 24:, 3] = 255  # left half fully transparent
    wide = np.zeros((40, 64, 3), np.uint8)
    wide[:, 12:52] = 255  # the centre 40x40 square is white, the 12-px side bands black
    sixteen = np.tile(np.array([0, 32768, 65535, 1000], np.uint16), (48, 12))
    palette = Image.fromarray(np.dstack([noise(5), noise(6), noise(7)]), "RGB").quantize(16)
    extra = {
        "train/happy/rgba.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "train/happy/WIDE.JPG": encode(Image.fromarray(wide, "RGB"), "JPEG", quality=100),
        "train/happy/sixteen.PNG": encode(Image.fromarray(sixteen), "PNG"),
        "train/sad/palette.GIF": encode(palette, "GIF"),
        "train/sad/gray.Bmp": encode(Image.fromarray(noise(6), "L"), "BMP"),
        "train/sad/big.jpeg": encode(Image.fromarray(noise(7, (480, 480)), "L"), "JPEG"),
        "train/fear/lossless.WEBP": encode(Image.fromarray(np.dstack([noise(8)] * 3), "RGB"), "WEBP", lossless=True),
    }
    metrics, manifest, rejected = run_ingest(tmp_path, write_tree(tmp_path / "src", {**base_tree(), **extra}))
    assert rejected.empty and metrics["rejected"] == 0 and metrics["total"] == 14 + 7
    assert metrics["counts"]["train"] == {**dict.fromkeys(FER_CLASSES, 1), "happy": 4, "sad": 4, "fear": 2}

    out = stored_pixels(tmp_path, manifest, "train/happy/rgba.png")
    assert (out[:, :23] == 255).all() and (out[:, 25:] == 20).all()  # transparent -> white, not black
    out = stored_pixels(tmp_path, manifest, "train/happy/WIDE.JPG")
    assert out.min() >= 250  # centre square crop: the black side bands are gone, no squashing
    out = stored_pixels(tmp_path, manifest, "train/happy/sixteen.PNG")
    assert out[0, :4].tolist() == [0, 128, 255, 4]  # 16-bit scaled to 8-bit, not clipped
    assert (stored_pixels(tmp_path, manifest, "train/sad/gray.Bmp") == noise(6)).all()  # lossless stays exact
    assert (stored_pixels(tmp_path, manifest, "train/fear/lossless.WEBP") == noise(8)).all()
    for origin, data in extra.items():
        assert (stored_pixels(tmp_path, manifest, origin) == to_face_pixels(decode_image(data))).all()
    row = manifest.set_index("origin").loc["train/happy/WIDE.JPG"]
    assert (row["orig_width"], row["orig_height"], row["orig_mode"]) == ("64", "40", "RGB")
    assert manifest.set_index("origin").loc["train/happy/sixteen.PNG", "orig_mode"] == "I;16"
    assert manifest.set_index("origin").loc["train/sad/palette.GIF", "orig_mode"] == "P"


def bomb_png(width: int, height: int) -> bytes:
    """A tiny file whose header claims a huge grayscale image."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # refused either way; see decode_image
def test_every_bad_file_is_a_rejected_row_with_its_reason(tmp_path):
    good_jpeg = encode(Image.fromarray(noise(1), "L"), "JPEG")
    bad = {
        "train/angry/empty.jpg": b"",
        "train/angry/truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "train/happy/notes.jpg": b"these are my notes, not a face",
        "train/happy/readme.txt": b"hello",
        "test/sad/large.png": encode(Image.fromarray(noise(2, (300, 300)), "L"), "PNG"),
        "test/sad/bomb.png": bomb_png(20_000, 20_000),  # over 2x Image.MAX_IMAGE_PIXELS: Pillow raises
        "test/sad/warned.png": bomb_png(10_000, 10_000),  # over 1x: Pillow only warns; that warning is an error
        "test/loose.png": png(3),
    }
    src = write_tree(tmp_path / "src", {**base_tree(), **bad})
    metrics, manifest, rejected = run_ingest(tmp_path, src, max_pixels=50_000, max_reject_fraction=1.0)
    assert metrics["total"] == 14 and len(manifest) == 14 and metrics["rejected"] == 8 and metrics["seen"] == 22
    rows = {r.path: (r.split, r.label, r.reason) for r in rejected.itertuples()}
    assert set(rows) == set(bad)
    assert rows["train/angry/empty.jpg"] == ("train", "angry", "empty file (0 bytes)")
    assert rows["train/angry/truncated.jpg"][2].startswith("corrupt or truncated image: ")
    assert rows["train/happy/notes.jpg"] == ("train", "happy", "not an image (unrecognised format)")
    assert rows["train/happy/readme.txt"] == ("train", "happy", "not an image (unrecognised format)")
    assert rows["test/sad/large.png"] == ("test", "sad", "image is 300x300 = 90000 pixels, over the limit of 50000")
    assert rows["test/sad/bomb.png"][2].startswith("decompression bomb refused: ")  # Pillow's own limit is on
    assert (
        rows["test/sad/warned.png"][2].startswith("decompression bomb refused: ")
        and "100000000 pixels" in rows["test/sad/warned.png"][2]
    )
    assert rows["test/loose.png"] == ("test", "", "not inside a class folder")
    assert metrics["rejected_by_reason"] == {
        "corrupt or truncated image": 1,
        "decompression bomb refused": 2,
        "empty file": 1,
        "image is NxN = N pixels, over the limit of N": 1,
        "not an image": 2,
        "not inside a class folder": 1,
    }
    # with our own limit above Pillow's, Pillow's limit still refuses both headers
    metrics, _, rejected = run_ingest(tmp_path / "again", src, max_pixels=10**9, max_reject_fraction=1.0)
    reasons = dict(zip(rejected["path"], rejected["reason"]))
    assert (
        reasons["test/sad/warned.png"].startswith("decompression bomb refused: ")
        and "100000000 pixels" in reasons["test/sad/warned.png"]
    )
    assert reasons["test/sad/bomb.png"].startswith("decompression bomb refused: ")


def test_ingest_fails_clearly_on_an_empty_class_and_keeps_the_old_output(tmp_path):
    files = base_tree()
    files["test/disgust/test_disgust_0.png"] = b""  # the only test image of disgust
    (tmp_path / "ingested").mkdir()
    (tmp_path / "ingested" / "old.txt").write_text("previous run")
    with pytest.raises(IngestError, match=r"split 'test' has no usable image of class\(es\) disgust"):
        run_ingest(tmp_path, write_tree(tmp_path / "src", files), max_reject_fraction=1.0)
    assert (tmp_path / "ingested" / "old.txt").read_text() == "previous run"  # nothing half-written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left
    rejected = pd.read_csv(tmp_path / "rejected.csv")
    assert rejected[["path", "reason"]].values.tolist() == [["test/disgust/test_disgust_0.png", "empty file (0 bytes)"]]
    assert json.loads((tmp_path / "ingest.json").read_text())["rejected"] == 1


def test_ingest_fails_when_rejects_exceed_the_fraction(tmp_path):
    files = {**base_tree(per_class=2), "train/happy/bad.jpg": b"nope"}  # 1 of 29 = 3.4%
    with pytest.raises(IngestError, match=r"1 of 29 images rejected \(3\.45%\), over data\.max_reject_fraction=0\.01"):
        run_ingest(tmp_path, write_tree(tmp_path / "src", files))
    assert not (tmp_path / "ingested").exists()
    metrics, _, _ = run_ingest(tmp_path, tmp_path / "src", max_reject_fraction=0.05)
    assert metrics["rejected"] == 1 and metrics["total"] == 28


def test_class_subset_and_max_per_class_count_skips_and_replace_rejects(tmp_path):
    files = base_tree(per_class=5)
    bad = ["train/happy/bad1.png", "train/happy/bad2.png"]
    files.update(dict.fromkeys(bad, b"corrupt"))
    chosen = ["angry", "happy", "neutral", "sad"]
    metrics, manifest, rejected = run_ingest(
        tmp_path, write_tree(tmp_path / "src", files), classes=chosen, max_per_class=3, max_reject_fraction=1.0
    )
    assert metrics["classes"] == chosen
    assert metrics["counts"] == {"train": dict.fromkeys(chosen, 3), "test": dict.fromkeys(chosen, 3)}
    assert sorted(manifest["label"].unique()) == chosen
    assert len(load_faces(tmp_path / "ingested")) == len(manifest) == 4 * 3 * 2

    # The pick is a fixed pseudo-random order of origins; a reject is replaced by the next one.
    happy = sorted(
        (o for o in files if o.startswith("train/happy/")),
        key=lambda o: hashlib.blake2b(o.rsplit("/", 1)[1].encode(), digest_size=8).digest(),
    )
    tried, good = [], 0
    for origin in happy:
        if good == 3:
            break
        tried.append(origin)
        good += origin not in bad
    assert sorted(rejected["path"]) == sorted(o for o in tried if o in bad)
    assert sorted(manifest.loc[(manifest["split"] == "train") & (manifest["label"] == "happy"), "origin"]) == sorted(
        o for o in tried if o not in bad
    )
    n_offered_selected = 4 * 10 + 2
    assert metrics["skipped"] == {
        "class_not_selected": 3 * 10,
        "over_max_per_class": n_offered_selected - len(manifest) - len(rejected),
    }
    assert metrics["seen"] == len(files) == metrics["total"] + metrics["rejected"] + sum(metrics["skipped"].values())


def test_zip_and_folder_and_worker_processes_give_identical_outputs(tmp_path):
    files = {f"FER/{k}": v for k, v in base_tree(per_class=3).items()}
    files["FER/test/happy/odd one (copy).png"] = png(999)
    write_tree(tmp_path / "src", files)
    zpath = tmp_path / "fer.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data, compress_type=zipfile.ZIP_DEFLATED if "happy" in rel else zipfile.ZIP_STORED)
        zf.writestr("FER/test/sad/crc.png", png(1000))
    raw = bytearray(zpath.read_bytes())
    at = raw.rfind(png(1000)) + 60
    raw[at] ^= 0xFF  # corrupt the last member's data: its CRC no longer matches
    zpath.write_bytes(bytes(raw))

    runs = {}
    for name, source, workers in [("inline", tmp_path / "src", 1), ("pool", tmp_path / "src", 2), ("zip", zpath, 2)]:
        out = tmp_path / name
        metrics, manifest, rejected = run_ingest(out, source, workers=workers, max_reject_fraction=0.1)
        runs[name] = (metrics, manifest, rejected, (out / "ingested" / FACES_NAME).read_bytes())
    assert runs["inline"][1].equals(runs["pool"][1]) and runs["inline"][3] == runs["pool"][3]
    zip_manifest = runs["zip"][1].assign(origin=lambda d: d["origin"].str.removeprefix("fer.zip:"))
    assert zip_manifest.equals(runs["inline"][1]) and runs["zip"][3] == runs["inline"][3]
    assert runs["zip"][2][["path", "reason"]].values.tolist() == [
        ["fer.zip:FER/test/sad/crc.png", "corrupt zip entry (size or CRC mismatch)"]
    ]
    assert runs["inline"][1].set_index("origin").loc["FER/test/happy/odd one (copy).png", "id"] == "odd_one_copy"


def test_fer2013_csv_ingests_with_its_usage_splits(tmp_path):
    lines = ["emotion,pixels,Usage"]
    for code in range(7):
        for usage, seed in (("Training", 1), ("Training", 2), ("PublicTest", 3), ("PrivateTest", 4)):
            lines.append(f"{code},{' '.join(map(str, noise(100 * code + seed).ravel()))},{usage}")
    lines.append("3,1 2 3,Training")  # 3 pixels: not a square image
    (tmp_path / "fer2013.csv").write_text("\n".join(lines) + "\n")
    metrics, manifest, rejected = run_ingest(tmp_path, tmp_path / "fer2013.csv", max_reject_fraction=0.1)
    assert metrics["split_totals"] == {"train": 14, "val": 7, "test": 7}
    assert rejected[["split", "label", "path"]].values.tolist() == [["train", "happy", "fer2013.csv:line30"]]
    assert rejected["reason"][0] == "pixels: 3 values, expected a square image (48x48 = 2304)"
    # code 4 is sad and 6 neutral in fer2013.csv: check by pixel content
    sad = manifest[(manifest["label"] == "sad") & (manifest["split"] == "val")]
    assert sad["pixel_hash"].tolist() == [pixel_hash(noise(403))]
    assert manifest[(manifest["label"] == "neutral") & (manifest["split"] == "test")]["pixel_hash"].tolist() == [
        pixel_hash(noise(604))
    ]


def test_duplicates_are_counted_within_and_across_splits(tmp_path):
    files = base_tree()
    files["train/happy/copy_of_test.png"] = files["test/happy/test_happy_0.png"]
    files["train/sad/copy_of_test_as_sad.png"] = files["test/happy/test_happy_0.png"]  # also a label conflict
    files["train/angry/twin.png"] = files["train/angry/train_angry_0.png"]
    files["test/fear/twin.png"] = files["test/fear/test_fear_0.png"]
    metrics, _, _ = run_ingest(tmp_path, write_tree(tmp_path / "src", files))
    assert metrics["duplicates"] == {
        "within_split": {"train": 2, "test": 1},
        "within_split_total": 3,
        "cross_split": {"train_test": {"distinct_images": 1, "train_copies": 2, "test_copies": 1}},
        "conflicting_labels": 1,
    }
    assert duplicate_stats(["train", "val", "val", "test"], ["a", "a", "a", "a"], ["x", "x", "x", "x"]) == {
        "within_split": {"train": 0, "val": 1, "test": 0},
        "within_split_total": 1,
        "cross_split": {
            "train_val": {"distinct_images": 1, "train_copies": 1, "val_copies": 2},
            "train_test": {"distinct_images": 1, "train_copies": 1, "test_copies": 1},
            "val_test": {"distinct_images": 1, "val_copies": 2, "test_copies": 1},
        },
        "conflicting_labels": 0,
    }


def test_decode_face_takes_the_jpeg_shortcut_with_pillows_pixels(monkeypatch):
    gray = [encode(Image.fromarray(noise(i), "L"), "JPEG", quality=q) for i, q in enumerate((50, 75, 95, 100))]
    gray.append(encode(Image.fromarray(noise(9), "L"), "JPEG", progressive=True))
    others = {
        "color 48x48": encode(Image.fromarray(np.dstack([noise(1), noise(2), noise(3)]), "RGB"), "JPEG"),
        "gray 60x50": encode(Image.fromarray(noise(4, (60, 50)), "L"), "JPEG"),
        "png": png(5),
    }
    expected = [to_face_pixels(decode_image(data)) for data in gray]
    expected_others = {k: (to_face_pixels(img := decode_image(d)), img.size, img.mode) for k, d in others.items()}

    import ferflow.data.preprocessing

    calls = []
    monkeypatch.setattr(
        ferflow.data.preprocessing, "decode_image", lambda data, **kw: calls.append(data) or decode_image(data, **kw)
    )
    for data, want in zip(gray, expected):
        pixels, size, mode = decode_face(data)
        assert (pixels == want).all() and pixels.shape == (48, 48) and pixels.dtype == np.uint8
        assert (size, mode) == ((48, 48), "L")
    assert calls == []  # every 48x48 grayscale JPEG went through libjpeg-turbo
    for name, data in others.items():
        pixels, size, mode = decode_face(data)
        want, want_size, want_mode = expected_others[name]
        assert (pixels == want).all() and (size, mode) == (want_size, want_mode), name
    assert len(calls) == 3  # ... and nothing else did
    truncated = gray[0][: len(gray[0]) // 2]
    with pytest.raises(ImageError, match="corrupt or truncated image"):  # refused by strict libjpeg, named by Pillow
        decode_face(truncated)
    assert calls[-1] == truncated


def test_max_per_class_per_split_like_seed_004(tmp_path):
    chosen = ["angry", "happy", "neutral", "sad"]
    src = write_tree(tmp_path / "src", base_tree(per_class=4))
    metrics, _, _ = run_ingest(tmp_path, src, classes=chosen, max_per_class={"train": 3, "test": 1})
    assert metrics["counts"] == {"train": dict.fromkeys(chosen, 3), "test": dict.fromkeys(chosen, 1)}
    assert metrics["skipped"] == {"class_not_selected": 3 * 8, "over_max_per_class": 4 * 1 + 4 * 3}
    metrics, _, _ = run_ingest(tmp_path / "b", src, classes=chosen, max_per_class={"test": 2})
    assert metrics["counts"] == {"train": dict.fromkeys(chosen, 4), "test": dict.fromkeys(chosen, 2)}


@pytest.mark.parametrize(
    "order",
    [
        [0, 1, 2, 3, 4, 5],  # no rejects: nothing moves
        [0, 2, 3, 5],  # rejects: faces move forward in place
        [4, 1, 5, 0],  # a capped sample sorted by id: any order
        [],
    ],
)
def test_faces_file_ends_as_the_npy_of_the_kept_slots_in_order(tmp_path, order):
    from ferflow.core.files import npy_header
    from ferflow.data.ingest import _Runner

    items = [object()] * 6
    runner = _Runner(tmp_path / FACES_NAME, items, max_pixels=1, workers=1)  # type: ignore[arg-type]
    try:
        faces = np.random.default_rng(0).integers(0, 256, (6, 48, 48), dtype=np.uint8)
        runner.slots[:] = faces
        runner.finish(order)
    finally:
        runner.close()
    assert np.array_equal(load_faces(tmp_path), faces[order].reshape(-1, 48, 48))
    # finish() rewrites the header in place: its size must not depend on the row count
    assert {len(npy_header(np.uint8, (n, 48, 48))) for n in (0, 6, 32298, 10**12)} == {runner.header_size}
