"""Data sources: folder layouts, zips (incl. unsafe ones) and fer2013.csv, on tiny generated files."""

from __future__ import annotations

import io
import os
import stat
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferflow.core.classes import FER_CLASSES, canonical_class
from ferflow.core.params import DataParams
from ferflow.data.preprocessing import ImageError
from ferflow.data.sources import open_source
from ferflow.data.sources.files import (
    CsvSource,
    LayoutSource,
    _read_file,
    open_path_source,
    parse_pixels,
)


def png_bytes(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def zip_tree(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
    return path


def listing(source) -> list[tuple[str, str, str, bytes]]:
    return [(it.split, it.class_name, it.origin, it.read()) for it in source.items()]


def open_path(path: Path, class_map: dict | None = None):
    return open_path_source(path, class_map)


KAGGLE = {
    "fer2013/train/angry/a1.jpg": png_bytes(1),
    "fer2013/train/happy/h1.JPG": png_bytes(2),
    "fer2013/test/angry/a2.png": png_bytes(3),
    "fer2013/test/happy/h2.Png": png_bytes(4),
}


def test_kaggle_folder_under_a_wrapper_folder(tmp_path):
    src = open_path(write_tree(tmp_path / "dl", KAGGLE))
    assert isinstance(src, LayoutSource)
    assert src.describe() == {
        "kind": "folder",
        "path": str(tmp_path / "dl"),
        "root": "fer2013",
        "split_folders": {"test": "test", "train": "train"},
    }
    assert listing(src) == [
        ("test", "angry", "fer2013/test/angry/a2.png", KAGGLE["fer2013/test/angry/a2.png"]),
        ("test", "happy", "fer2013/test/happy/h2.Png", KAGGLE["fer2013/test/happy/h2.Png"]),
        ("train", "angry", "fer2013/train/angry/a1.jpg", KAGGLE["fer2013/train/angry/a1.jpg"]),
        ("train", "happy", "fer2013/train/happy/h1.JPG", KAGGLE["fer2013/train/happy/h1.JPG"]),
    ]
    assert src.rejected() == [] and src.skipped() == {}


def test_seed000_layout_maps_synonyms_any_case_and_validation_becomes_test(tmp_path):
    names = ["Angry", "disgusted", "FEARFUL", "happiness", "Neutral", "sadness", "surprised"]
    files = {
        f"images/{split}/{name}/{i}.png": png_bytes(10 * i + j)
        for i, name in enumerate(names)
        for j, split in enumerate(["train", "validation"])
    }
    src = open_path(write_tree(tmp_path / "seed000", files))
    assert src.describe()["split_folders"] == {"test": "validation", "train": "train"}
    got = {(split, cls) for split, cls, _, _ in listing(src)}
    assert got == {(s, c) for s in ("train", "test") for c in FER_CLASSES}


def test_val_and_validation_folders(tmp_path):
    files = {f"{s}/happy/x.png": png_bytes(i) for i, s in enumerate(["train", "Validation", "test"])}
    src = open_path(write_tree(tmp_path / "a", files))
    assert sorted((s, o) for s, _, o, _ in listing(src)) == [
        ("test", "test/happy/x.png"),
        ("train", "train/happy/x.png"),
        ("val", "Validation/happy/x.png"),
    ]
    write_tree(tmp_path / "a", {"val/happy/y.png": png_bytes(9)})
    with pytest.raises(ValueError, match=r"both 'Validation' and 'val' name the 'val' split"):
        open_path(tmp_path / "a")


def test_unknown_class_folder_is_an_error_naming_it_unless_mapped(tmp_path):
    root = write_tree(
        tmp_path / "d", {"train/joy/1.png": png_bytes(1), "train/sad/2.png": png_bytes(2), "test/joy/3.png": png_bytes(3)}
    )
    with pytest.raises(ValueError) as err:
        open_path(root)
    msg = str(err.value)
    assert "test/joy, train/joy" in msg and "'joy'" in msg and "fearful" in msg and "surprised" in msg and "data.class_map" in msg
    src = open_path(root, {"JOY": "happy"})
    assert [(s, c) for s, c, _, _ in listing(src)] == [("test", "happy"), ("train", "happy"), ("train", "sad")]
    with pytest.raises(ValueError, match="maps 'joy' to 'glee'"):
        canonical_class("joy", {"joy": "glee"})


def test_no_split_folder_and_ambiguous_roots_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no train/ or test/ folder found"):
        open_path(write_tree(tmp_path / "flat", {"happy/1.png": png_bytes(1)}))
    with pytest.raises(ValueError, match=r"several data sets found \(a, b\)"):
        open_path(write_tree(tmp_path / "two", {"a/train/happy/1.png": png_bytes(1), "b/train/happy/1.png": png_bytes(2)}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_path(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"not a folder, \.zip or \.csv"):
        open_path(tmp_path / "x.txt")


def test_junk_is_skipped_and_counted_stray_files_are_rejected_or_counted(tmp_path):
    files = {
        **KAGGLE,
        "fer2013/train/happy/.DS_Store": b"junk",
        "fer2013/train/happy/Thumbs.db": b"junk",
        "fer2013/.hidden/train/happy/x.png": png_bytes(5),
        "fer2013/.hidden/train/happy/y.png": png_bytes(6),
        "fer2013/README.txt": b"about",
        "fer2013/train/loose.png": png_bytes(6),
    }
    src = open_path(write_tree(tmp_path / "d", files))
    assert len(listing(src)) == 4
    assert src.skipped() == {"hidden_or_system": 4, "outside_split_folders": 1}  # files, not folders
    (rej,) = src.rejected()
    assert (rej.split, rej.class_name, rej.origin, rej.reason) == (
        "train",
        "",
        "fer2013/train/loose.png",
        "not inside a class folder",
    )


def test_zip_reads_the_same_items_as_the_folder(tmp_path):
    files = {
        **KAGGLE,
        "__MACOSX/fer2013/train/angry/._a1.jpg": b"\x00\x05\x16\x07",
        "__MACOSX/fer2013/._train": b"\x00",
        "fer2013/test/.DS_Store": b"x",
    }
    folder = open_path(write_tree(tmp_path / "d", files))
    zipped = open_path(zip_tree(tmp_path / "fer2013.zip", files))
    assert zipped.describe()["kind"] == "zip" and zipped.describe()["root"] == "fer2013"
    assert [(s, c, "fer2013.zip:" + o, b) for s, c, o, b in listing(folder)] == listing(zipped)
    assert zipped.skipped() == folder.skipped() == {"hidden_or_system": 3}


def test_zip_stored_and_deflated_members_are_crc_checked(tmp_path):
    path = tmp_path / "s.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train/happy/a.png", png_bytes(1), compress_type=zipfile.ZIP_STORED)
        zf.writestr("test/happy/b.png", png_bytes(2), compress_type=zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    at = raw.find(png_bytes(1)) + 100  # flip a byte inside the stored member's data
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    by_origin = {it.origin: it for it in open_path(path).items()}
    assert by_origin["s.zip:test/happy/b.png"].read() == png_bytes(2)
    with pytest.raises(ImageError, match="CRC"):
        by_origin["s.zip:train/happy/a.png"].read()


def test_zip_member_with_a_long_local_extra_field_is_read_whole(tmp_path):
    path = tmp_path / "extra.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("train/happy/a.png")
        info.extra = struct.pack("<HH", 0xCAFE, 2000) + bytes(2000)  # longer than the single read's slack
        zf.writestr(info, png_bytes(1))
        zf.writestr("test/happy/b.png", png_bytes(2))
    assert {it.origin: it.read() for it in open_path(path).items()} == {
        "extra.zip:train/happy/a.png": png_bytes(1),
        "extra.zip:test/happy/b.png": png_bytes(2),
    }


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../evil.png", "contains '..'"),
        ("train/../../evil.png", "contains '..'"),
        ("/etc/evil.png", "absolute path"),
        ("C:/evil.png", "absolute path"),
    ],
)
def test_zip_slip_entries_refuse_the_whole_zip(tmp_path, name, why):
    path = zip_tree(tmp_path / "evil.zip", {**KAGGLE, name: png_bytes(7)})
    with pytest.raises(ValueError) as err:
        open_path(path)
    assert f"entry {name!r}" in str(err.value) and why in str(err.value) and "refused" in str(err.value)


def test_zip_symlink_entry_is_refused(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in KAGGLE.items():
            zf.writestr(rel, data)
        info = zipfile.ZipInfo("fer2013/train/happy/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ValueError, match=r"entry 'fer2013/train/happy/link.png' is a symlink"):
        open_path(path)


def test_zips_that_are_not_plain_are_read_too(tmp_path, monkeypatch):
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("fer2013/", b"")
        zf.writestr("fer2013/train/happy/\u00e9t\u00e9.png", png_bytes(1), compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("fer2013/test/happy/b.png", png_bytes(2), compress_type=zipfile.ZIP_STORED)
        with zf.open("fer2013/test/happy/c.png", "w", force_zip64=True) as fh:  # Zip64 local header only
            fh.write(png_bytes(3))
        zf.comment = b"an archive comment"
    assert {it.origin: it.read() for it in open_path(plain).items()} == {
        "plain.zip:fer2013/train/happy/\u00e9t\u00e9.png": png_bytes(1),
        "plain.zip:fer2013/test/happy/b.png": png_bytes(2),
        "plain.zip:fer2013/test/happy/c.png": png_bytes(3),
    }

    # Data before the zip (a self-extracting archive) and a Zip64 end record.
    prefixed = tmp_path / "prefixed.zip"
    prefixed.write_bytes(b"#!/bin/sh\nexit 0\n" + plain.read_bytes())
    zip64 = tmp_path / "zip64.zip"
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)  # what over 65,535 entries would do
    zip_tree(zip64, KAGGLE)
    monkeypatch.undo()
    items = {it.origin: it.read() for it in open_path(prefixed).items()}
    assert items["prefixed.zip:fer2013/test/happy/b.png"] == png_bytes(2)
    assert len(listing(open_path(zip64))) == len(KAGGLE)

    # A zip cut short: the end record is gone, zipfile's error names the file.
    cut = tmp_path / "cut.zip"
    cut.write_bytes(plain.read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"cut\.zip is not a readable zip file"):
        open_path(cut)


def test_a_zip_bomb_member_is_never_inflated_past_its_declared_size(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("test/happy/b.png", png_bytes(2))
        zf.writestr("train/happy/bomb.png", bytes(200 * 2**20))  # 200 MB of zeros, ~200 KB compressed
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("train/happy/bomb.png")
    # lie in both headers: the member claims 1,000 bytes
    for at in (info.header_offset + 22, raw.rfind(b"PK\x01\x02") + 24):
        raw[at : at + 4] = (1000).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    by_origin = {it.origin: it for it in open_path(path).items()}
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="corrupt zip entry"):
            by_origin["bomb.zip:train/happy/bomb.png"].read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak} bytes allocated reading a member that declares 1,000"


def test_zip_entry_count_and_size_are_bounded(tmp_path):
    path = zip_tree(tmp_path / "big.zip", KAGGLE)
    with pytest.raises(ValueError, match=r"4 entries, over the limit of 3"):
        open_path_source(path, max_zip_entries=3)
    total = sum(len(v) for v in KAGGLE.values())
    with pytest.raises(ValueError, match=rf"{total} bytes uncompressed, over the limit of 100"):
        open_path_source(path, max_zip_bytes=100)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable zip file"):
        open_path(tmp_path / "bad.zip")


def fer_csv_text(rows: list[tuple[str, str, str]], header: str = "emotion,pixels,Usage") -> str:
    return header + "\n" + "".join(f"{e},{p},{u}\n" for e, p, u in rows)


def pix(value: int, n: int = 48 * 48) -> str:
    return " ".join([str(value)] * n)


def test_fer2013_csv_usage_and_emotion_codes(tmp_path):
    rows = [
        ("0", pix(10), "Training"),
        ("4", pix(20), "Training"),  # 4 is sad in fer2013.csv
        ("6", pix(30), "PublicTest"),  # 6 is neutral
        ("3", pix(40), "PrivateTest"),
        ("7", pix(50), "Training"),  # no such code
        ("1", pix(60), "Other"),
        ("2", pix(70, 100), "Training"),  # 10x10: a square, accepted
        ("2", pix(70, 99), "Training"),  # not a square: rejected at read time
    ]
    path = tmp_path / "fer2013.csv"
    path.write_text(fer_csv_text(rows) + "\n")
    src = open_path(path)
    assert isinstance(src, CsvSource) and src.describe()["usage_to_split"] == {
        "Training": "train",
        "PublicTest": "val",
        "PrivateTest": "test",
    }
    items = list(src.items())
    assert [(it.split, it.class_name, it.origin) for it in items] == [
        ("train", "angry", "fer2013.csv:line2"),
        ("train", "sad", "fer2013.csv:line3"),
        ("val", "neutral", "fer2013.csv:line4"),
        ("test", "happy", "fer2013.csv:line5"),
        ("train", "fear", "fer2013.csv:line8"),
        ("train", "fear", "fer2013.csv:line9"),
    ]
    first = items[0].read()
    assert first.dtype == np.uint8 and first.shape == (48, 48) and (first == 10).all()
    assert items[4].read().shape == (10, 10)
    with pytest.raises(ImageError, match="99 values, expected a square"):
        items[5].read()
    assert [(r.split, r.class_name, r.origin, r.reason) for r in src.rejected()] == [
        ("train", "", "fer2013.csv:line6", "emotion '7' is not a FER-2013 code 0..6"),
        ("", "disgust", "fer2013.csv:line7", "Usage 'Other' is not Training, PublicTest or PrivateTest"),
    ]


def test_csv_header_variants_errors_and_zipped_csv(tmp_path):
    spaced = tmp_path / "icml_face_data.csv"
    spaced.write_text(
        fer_csv_text([("3", pix(1), "Training")], header="emotion, Usage, pixels").replace(
            f"3,{pix(1)},Training", f"3,Training,{pix(1)}"
        )
    )
    assert [(it.split, it.class_name) for it in open_path(spaced).items()] == [("train", "happy")]
    bad = tmp_path / "labels.csv"
    bad.write_text("label,image\n1,x\n")
    with pytest.raises(ValueError, match=r"labels.csv: missing column\(s\) emotion, pixels, usage"):
        open_path(bad)
    zipped = zip_tree(
        tmp_path / "fer.zip", {"data/fer2013.csv": fer_csv_text([("5", pix(9), "PrivateTest")]).encode(), "data/README": b"x"}
    )
    src = open_path(zipped)
    assert isinstance(src, CsvSource)
    (item,) = src.items()
    assert (item.split, item.class_name, item.origin) == ("test", "surprise", "fer.zip:data/fer2013.csv:line2")
    assert (item.read() == 9).all()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2 x 4", "space-separated integers"),
        ("1 2 3 300", "values must be 0..255"),
        ("1 -2 3 4", "values must be 0..255"),
        ("", "0 values"),
    ],
)
def test_parse_pixels_rejects_bad_rows(text, message):
    with pytest.raises(ImageError, match=message):
        parse_pixels(text)


def test_open_source_resolves_relative_paths_against_the_root(tmp_path):
    write_tree(tmp_path / "data" / "fer", KAGGLE)
    src = open_source(DataParams(source="data/fer"), root=tmp_path)
    assert src.describe()["path"] == str(tmp_path / "data" / "fer")
    assert open_source(DataParams(source=str(tmp_path / "data" / "fer")), root="/nonexistent").describe() == src.describe()


def test_folder_files_are_read_whole_and_the_size_limit_holds(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(1))
    assert _read_file(str(path), limit=len(png_bytes(1))) == png_bytes(1)
    with pytest.raises(ImageError, match=rf"over the limit of {len(png_bytes(1)) - 1} bytes"):
        _read_file(str(path), limit=len(png_bytes(1)) - 1)
    proc = Path("/proc/self/status")  # reports size 0 but has content: read past the stat size
    if proc.exists():
        assert _read_file(str(proc), limit=1 << 20).startswith(b"Name:")
        with pytest.raises(ImageError, match="over the limit of 5 bytes"):
            _read_file(str(proc), limit=5)


# ---------------------------------------------------------------- issue #20 items 3-4: special files and links


@pytest.fixture
def alarm():
    """Fail a call that blocks (a FIFO opened for reading waits for a writer forever)."""
    import signal

    def on_alarm(*_):
        raise TimeoutError("blocked: the call did not return within 5 s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.usefixtures("alarm")
def test_fifo_in_a_class_folder_is_a_rejected_item_not_a_hang(tmp_path):
    import os

    root = write_tree(tmp_path / "d", {"train/happy/a.png": png_bytes(1), "test/happy/b.png": png_bytes(2)})
    os.mkfifo(root / "train/happy/x.jpg")
    items = {it.origin: it for it in open_path(root).items()}
    with pytest.raises(ImageError, match="not a regular file"):
        items["train/happy/x.jpg"].read()
    assert items["train/happy/a.png"].read() == png_bytes(1)


@pytest.mark.usefixtures("alarm")
@pytest.mark.parametrize("name", ["x.csv", "x.zip"])
def test_fifo_or_device_as_data_source_is_refused(tmp_path, name):
    import os

    fifo = tmp_path / name
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=rf"data.source: {fifo} is not a regular file \(a FIFO\)"):
        open_path(fifo)
    device = tmp_path / f"zero-{name}"
    device.symlink_to("/dev/zero")  # reads never end: MemoryError before
    with pytest.raises(ValueError, match=r"is not a regular file \(a character device\)"):
        open_path(device)


def test_device_linked_inside_the_tree_is_not_read_even_when_links_are_followed(tmp_path):
    root = write_tree(tmp_path / "d", {"train/happy/a.png": png_bytes(1), "test/happy/b.png": png_bytes(2)})
    (root / "train/happy/zero.jpg").symlink_to("/dev/zero")
    src = open_path_source(root, follow_symlinks=True)
    item = next(it for it in src.items() if "zero" in it.origin)
    assert item.origin == "train/happy/zero.jpg -> /dev/zero"
    with pytest.raises(ImageError, match=r"not a regular file \(a character device\)"):
        item.read()


def test_csv_source_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    from ferflow.data.sources import files

    path = tmp_path / "fer2013.csv"
    path.write_text("emotion,pixels,Usage\n" + "3," + " ".join(["0"] * 2304) + ",Training\n")
    monkeypatch.setattr(files, "MAX_CSV_BYTES", 100)
    with pytest.raises(ValueError, match=rf"data.source: {path}: \d+ bytes, over the limit of 100"):
        list(open_path(path).items())


def test_file_symlink_leaving_the_source_is_refused_unless_allowed(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"root:x:0:0")
    root = write_tree(tmp_path / "d", {"train/happy/a.png": png_bytes(1), "test/happy/b.png": png_bytes(2)})
    (root / "train/happy/x.jpg").symlink_to(outside)
    with pytest.raises(ValueError, match=rf"train/happy/x.jpg is a symlink to {outside}, outside data.source.*follow_symlinks"):
        open_path(root)
    src = open_path_source(root, follow_symlinks=True)
    origins = [it.origin for it in src.items()]
    assert f"train/happy/x.jpg -> {outside}" in origins


def test_class_folder_symlink_leaving_the_source_is_refused_and_in_tree_links_show_their_target(tmp_path):
    elsewhere = write_tree(tmp_path / "elsewhere", {"c.png": png_bytes(3)})
    root = write_tree(tmp_path / "d", {"train/happy/a.png": png_bytes(1), "test/happy/b.png": png_bytes(2)})
    (root / "train/sad").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match=rf"train/sad is a symlink to {elsewhere}, outside data.source"):
        open_path(root)
    src = open_path_source(root, follow_symlinks=True)
    assert ("train", "sad", f"train/sad/c.png -> {elsewhere / 'c.png'}") in [
        (it.split, it.class_name, it.origin) for it in src.items()
    ]
    (root / "train/sad").unlink()
    (root / "test/happy/copy.png").symlink_to(root / "train/happy/a.png")  # inside: allowed, target shown
    items = {it.origin: it for it in open_path(root).items()}
    assert items["test/happy/copy.png -> train/happy/a.png"].read() == png_bytes(1)


def test_a_folder_that_cannot_be_listed_is_an_error_naming_data_source(tmp_path, monkeypatch):
    """#30: `data.source: /proc` failed with `/proc/1/cwd: Permission denied`, naming no key."""
    import ferflow.data.sources.files as source_files

    root = write_tree(tmp_path / "fer", KAGGLE)
    real_stat = os.stat

    def no_entry(path, *args, **kwargs):
        if str(path).endswith("happy"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(source_files.os, "stat", no_entry)
    with pytest.raises(ValueError, match=rf"data.source: {root}: cannot read .*happy \(Permission denied\)"):
        open_path_source(root)
