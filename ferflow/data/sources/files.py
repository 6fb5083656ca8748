"""Real-data sources: image folders, zips of them, and the original fer2013.csv.

Folder layouts (found at the top of the folder/zip or up to 4 levels below it, e.g.
under the `fer2013/` or `images/` wrapper folder that downloads come with):

    <root>/train/<class>/*.jpg   <root>/test/<class>/*.jpg   [<root>/val|validation/<class>/...]

- Class folder names are mapped to the canonical FER-2013 names (synonyms such as
  fearful/disgusted/surprised/happiness/sadness/anger, any case; `data.class_map` adds
  more); an unknown class folder is an error naming it and listing the accepted names.
- Without a `test/` folder, `val/`/`validation/` is the held-out test split (seed 000's
  `images/train` + `images/validation` layout); val is then carved out of train.
- Hidden files and folders (`.*`), `__MACOSX/`, `Thumbs.db` and `desktop.ini` are skipped
  and counted; files outside the split folders are counted as skipped; a file directly
  inside a split folder (no class folder) is a rejected row.
- Every other file is handed to ingest whatever its extension: a non-image becomes a
  rejected row there, never a silent drop.
- Only regular files are read: a FIFO, device or socket (in a class folder: a rejected
  row; as data.source: an error) is never opened for a blocking or endless read. Every
  read is bounded: MAX_FILE_BYTES an image, MAX_CSV_BYTES a CSV, the zip limits below.
- Symlinks: a file or folder link that stays inside data.source is followed, and the
  manifest origin shows its target (`test/happy/x.png -> train/happy/a.png`); one that
  leads outside is refused, naming link and target, unless `data.follow_symlinks: true`
  (then the origin shows the absolute target).

Zips are read member by member without extracting. A zip holding an absolute path, a
`..` component or a symlink is refused whole (it was built to write outside its
folder); entry count and total uncompressed size are bounded.

`fer2013.csv` (columns emotion, pixels, Usage; also accepted as the only CSV of a
folder or zip): Usage Training -> train, PublicTest -> val, PrivateTest -> test.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
import re
import stat
import threading
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from ferflow.core.classes import FER2013_CSV_LABELS, canonical_class
from ferflow.data.preprocessing import ImageError
from ferflow.data.sources.base import Source, SourceItem, SourceReject

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
CSV_USAGE = {"training": "train", "publictest": "val", "privatetest": "test"}
JUNK_NAMES = {"__macosx", "thumbs.db", "desktop.ini"}

MAX_SEARCH_DEPTH = 4  # wrapper folders allowed above the split folders
MAX_FILE_BYTES = 64 * 2**20  # one image file; bigger ones are rejected rows, not read
MAX_ZIP_ENTRIES = 1_000_000
MAX_ZIP_BYTES = 16 * 2**30  # total uncompressed size of a zip
MAX_CSV_BYTES = 2 * 2**30  # a fer2013.csv file (the original is ~300 MB)


def split_of(name: str) -> str | None:
    return SPLIT_NAMES.get(name.lower())


def is_junk(name: str) -> bool:
    """Hidden files/folders and OS litter: skipped (and counted), never ingested."""
    return name.startswith(".") or name.lower() in JUNK_NAMES


class _File(NamedTuple):
    parts: tuple[str, ...]  # path components inside the container
    read: Callable[[], bytes]
    member: str = ""  # the zip member name, for zips
    target: str = ""  # for a file reached through a symlink: where it really is

    @property
    def rel(self) -> str:
        return "/".join(self.parts)


# --- readers --------------------------------------------------------------------------


_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def _kind(mode: int) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a plain file")


def _open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor on a regular file, else ImageError. O_NONBLOCK: opening a
    FIFO for reading would otherwise wait for a writer forever (it has no effect on files)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageError(f"not a regular file ({_kind(mode)})")  # /dev/zero would be read until MemoryError
    return fd


def _read_file(path: str, limit: int) -> bytes:
    with open(_open_regular(path), "rb") as fh:
        # Ask for the size the file has (+1 to notice one that grew), not for `limit`
        # bytes: a 64 MiB read buffer costs ~20 us to map and unmap, more than the read.
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise ImageError(f"file is over the limit of {limit} bytes")
        data = fh.read(size + 1)
        if len(data) > size:  # growing, or a special file that reports size 0 (/proc)
            data += fh.read(limit + 1 - len(data))
    if len(data) > limit:
        raise ImageError(f"file is over the limit of {limit} bytes")
    return data


class _OpenZip:
    """A zip opened by `zipfile`, shared by the readers of all its members.

    One `ZipFile` per process: a forked ingest worker must not share the parent's file
    offset (ZipFile seeks before each read), so a child opens its own on first use. The
    lock serialises the seek + read of threads within one process."""

    def __init__(self, path: str):
        self.path = path
        self._opened: dict[int, tuple[zipfile.ZipFile, threading.Lock]] = {}

    def read(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        """One member's bytes, CRC checked by `zipfile`. Read with a size: ZipExtFile then
        never inflates past it, where `read()` would inflate a zip bomb in one 2 GB call."""
        if info.flag_bits & 0x1:
            raise ImageError("encrypted zip entry")
        if info.file_size > limit:
            raise ImageError(f"zip entry is {info.file_size} bytes, over the limit of {limit}")
        pid = os.getpid()
        if pid not in self._opened:
            self._opened[pid] = (zipfile.ZipFile(self.path), threading.Lock())
        zf, lock = self._opened[pid]
        try:
            with lock, zf.open(info) as member:
                data = member.read(info.file_size + 1)
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError) as exc:
            # zipfile's CRC message repeats the member name, which the rejected row already shows
            raise ImageError(f"corrupt zip entry ({'size or CRC mismatch' if 'CRC' in str(exc) else exc})") from None
        if len(data) != info.file_size:
            raise ImageError("corrupt zip entry (size or CRC mismatch)")
        return data

    def __del__(self) -> None:
        for zf, _ in getattr(self, "_opened", {}).values():
            with contextlib.suppress(OSError):
                zf.close()


# --- listing containers ---------------------------------------------------------------


def _link_target(root: Path, real_root: str, path: str, follow_symlinks: bool) -> str:
    """Where a symlinked file or folder leads, as the manifest shows it: relative to the
    source when inside it; absolute when outside, which is refused unless follow_symlinks."""
    target = os.path.realpath(path)
    if target == real_root or target.startswith(real_root + os.sep):
        return os.path.relpath(target, real_root)
    if not follow_symlinks:
        raise ValueError(
            f"data.source: {root}: {os.path.relpath(path, root)} is a symlink to {target}, outside data.source; "
            "refused (set data.follow_symlinks: true to read links that leave the source folder)"
        )
    return target


def _list_folder(root: Path, skipped: Counter[str], follow_symlinks: bool = False) -> list[_File]:
    found: list[_File] = []
    seen_dirs: set[tuple[int, int]] = set()
    real_root = os.path.realpath(root)
    linked: set[str] = set()  # folders reached through a symlink: their files show their real path
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop: list each folder once
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        kept = [d for d in dirnames if not is_junk(d)]
        for junk_dir in set(dirnames) - set(kept):  # count the files skipped, like for a zip
            skipped["hidden_or_system"] += sum(len(names) for _, _, names in os.walk(os.path.join(dirpath, junk_dir)))
        dirnames[:] = sorted(kept)
        below_link = dirpath in linked
        for d in kept:
            sub = os.path.join(dirpath, d)
            if below_link or os.path.islink(sub):
                if not below_link:
                    _link_target(root, real_root, sub, follow_symlinks)
                linked.add(sub)
        rel = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            if is_junk(name):
                skipped["hidden_or_system"] += 1
                continue
            path = os.path.join(dirpath, name)
            # one lstat a file (~1 us): links are rare, but each must be seen
            target = _link_target(root, real_root, path, follow_symlinks) if below_link or os.path.islink(path) else ""
            found.append(_File((*rel, name), functools.partial(_read_file, path, MAX_FILE_BYTES), "", target))
    return found


def _zip_parts(zip_path: Path, name: str, filename: str) -> tuple[str, ...]:
    """The components of `name` (entry `filename` or its folder); raises ValueError for
    entries that escape the folder."""
    name = name.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"{zip_path}: refused: entry {filename!r} has an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ValueError(f"{zip_path}: refused: entry {filename!r} contains '..' (it would be written outside the folder)")
    return parts


def _list_zip(zip_path: Path, skipped: Counter[str], max_entries: int, max_bytes: int) -> list[_File]:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = zf.infolist()
    except zipfile.BadZipFile as exc:
        raise ValueError(f"data.source: {zip_path} is not a readable zip file ({exc})") from None
    if len(members) > max_entries:
        raise ValueError(f"{zip_path}: refused: {len(members)} entries, over the limit of {max_entries}")
    total = sum(m.file_size for m in members)
    if total > max_bytes:
        raise ValueError(f"{zip_path}: refused: {total} bytes uncompressed, over the limit of {max_bytes}")
    found: list[_File] = []
    # Every entry is checked, directories too, but the path checks run once per folder:
    # folder name -> its checked components, or None when it is (inside) a junk folder.
    folders: dict[str, tuple[str, ...] | None] = {}
    opened = _OpenZip(str(zip_path))
    for m in members:
        if stat.S_ISLNK(m.external_attr >> 16):
            raise ValueError(f"{zip_path}: refused: entry {m.filename!r} is a symlink")
        folder, _, base = m.filename.replace("\\", "/").rpartition("/")
        if not folder or base in ("", ".", ".."):  # top-level entries and directories: the full check
            parts = _zip_parts(zip_path, m.filename, m.filename)
            if not parts or m.filename.endswith("/"):
                continue  # a directory entry
            junk = any(is_junk(p) for p in parts)
        else:
            if folder not in folders:
                checked = _zip_parts(zip_path, folder, m.filename)
                folders[folder] = None if any(is_junk(p) for p in checked) else checked
            folder_parts = folders[folder]
            junk = folder_parts is None or is_junk(base)
            parts = () if junk else (*folder_parts, base)
        if junk:
            skipped["hidden_or_system"] += 1
            continue
        found.append(_File(parts, functools.partial(opened.read, m, MAX_FILE_BYTES), m.filename))
    found.sort(key=lambda f: f.parts)
    return found


# --- layout ---------------------------------------------------------------------------


class LayoutSource(Source):
    """Split folders of class folders, inside a folder or a zip (see the module docstring)."""

    def __init__(self, kind: str, path: Path, files: list[_File], skipped: Counter[str], class_map: Mapping[str, str] | None):
        self.kind = kind
        self.path = path
        self._prefix = f"{path.name}:" if kind == "zip" else ""
        self.class_map = dict(class_map or {})
        self._skipped = skipped
        self._rejected: list[SourceReject] = []
        folders = {f.parts[:-1] for f in files}  # the layout checks look at each folder once
        self.root = self._find_root(folders)
        self.split_dirs = self._split_dirs(folders)
        self._files = files
        self._check_class_folders(folders)

    def _label(self, f: _File) -> str:
        """How a file is named in the manifest and rejected.csv (a link with its target)."""
        return self._prefix + f.rel + (f" -> {f.target}" if f.target else "")

    def _find_root(self, folders: set[tuple[str, ...]]) -> tuple[str, ...]:
        """The shallowest folder that holds split folders (train/, test/, val/...)."""
        roots: set[tuple[str, ...]] = set()
        for folder in folders:
            for depth, part in enumerate(folder[: MAX_SEARCH_DEPTH + 1]):
                if split_of(part):
                    roots.add(folder[:depth])
                    break
        if not roots:
            raise ValueError(
                f"data.source: {self.path}: no train/ or test/ folder found (expected <root>/train/<class>/<image> and "
                f"<root>/test/<class>/<image>, optionally <root>/val/..., at most {MAX_SEARCH_DEPTH} folders deep)"
            )
        shallowest = min(len(r) for r in roots)
        top = sorted(r for r in roots if len(r) == shallowest)
        if len(top) > 1:
            shown = ", ".join("/".join(r) or "." for r in top)
            raise ValueError(f"data.source: {self.path}: several data sets found ({shown}); point data.source at one of them")
        return top[0]

    def _split_dirs(self, folders: set[tuple[str, ...]]) -> dict[str, str]:
        """split -> folder name; without test/, the val folder is the test split."""
        n = len(self.root)
        names = sorted({f[n] for f in folders if len(f) > n and f[:n] == self.root and split_of(f[n])})
        by_split: dict[str, str] = {}
        for name in names:
            split = split_of(name)
            assert split is not None
            if split in by_split:
                raise ValueError(f"data.source: {self.path}: both {by_split[split]!r} and {name!r} name the {split!r} split")
            by_split[split] = name
        if "test" not in by_split and "val" in by_split:
            by_split["test"] = by_split.pop("val")
        return by_split

    def _check_class_folders(self, folders: set[tuple[str, ...]]) -> None:
        """Fail before any decoding when a class folder has an unknown name (all of them listed)."""
        n = len(self.root)
        problems: dict[str, str] = {}
        for f in folders:
            if len(f) > n + 1 and f[:n] == self.root and f[n] in self.split_dirs.values():
                folder = "/".join(f[: n + 2])
                if folder not in problems:
                    try:
                        canonical_class(f[n + 1], self.class_map)
                        problems[folder] = ""
                    except ValueError as exc:
                        problems[folder] = str(exc)
        bad = {k: v for k, v in problems.items() if v}
        if bad:
            first = next(iter(bad.values()))
            raise ValueError(f"data.source: {self.path}: class folder(s) {', '.join(sorted(bad))}: {first}")

    def items(self) -> Iterator[SourceItem]:
        self._rejected = []
        n = len(self.root)
        folder_split = {name: split for split, name in self.split_dirs.items()}
        # folder -> (split, canonical class); class "" for files right inside a split folder,
        # split None outside the split folders. Worked out once per folder.
        where: dict[tuple[str, ...], tuple[str | None, str]] = {}
        outside = 0
        for f in self._files:
            folder = f.parts[:-1]
            if folder not in where:
                split = folder_split.get(folder[n]) if len(folder) > n and folder[:n] == self.root else None
                where[folder] = (split, canonical_class(folder[n + 1], self.class_map) if split and len(folder) > n + 1 else "")
            split, label = where[folder]
            if split is None:
                outside += 1  # README, LICENSE, a stray CSV...: not part of the data set
            elif not label:
                self._rejected.append(SourceReject(split, "", self._label(f), "not inside a class folder"))
            else:
                yield SourceItem(split, label, self._label(f), f.read)
        self._skipped["outside_split_folders"] = outside

    def rejected(self) -> list[SourceReject]:
        return list(self._rejected)

    def skipped(self) -> dict[str, int]:
        return {k: v for k, v in self._skipped.items() if v}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "root": "/".join(self.root),
            "split_folders": dict(sorted(self.split_dirs.items())),
        }


class CsvSource(Source):
    """The original fer2013.csv: one row per image, `pixels` = space-separated 0..255 values."""

    kind = "csv"

    def __init__(self, name: str, open_text: Callable[[], IO[str]], path: Path):
        self.name = name
        self.path = path
        self._open = open_text
        self._rejected: list[SourceReject] = []
        with self._open() as fh:
            self._columns = self._header(next(csv.reader(fh), []))

    def _header(self, header: list[str]) -> dict[str, int]:
        # Some re-exports write " Usage" / " pixels" with a leading space.
        cols = {h.strip().lower(): i for i, h in enumerate(header)}
        missing = [c for c in ("emotion", "pixels", "usage") if c not in cols]
        if missing:
            raise ValueError(
                f"data.source: {self.name}: missing column(s) {', '.join(missing)}: a FER-2013 CSV needs emotion, pixels "
                f"and Usage (got {', '.join(h.strip() for h in header) or 'no header'})"
            )
        return cols

    def items(self) -> Iterator[SourceItem]:
        self._rejected = []
        e, p, u = self._columns["emotion"], self._columns["pixels"], self._columns["usage"]
        width = max(e, p, u) + 1
        with self._open() as fh:
            reader = csv.reader(fh)
            next(reader, None)
            try:
                for row in reader:
                    origin = f"{self.name}:line{reader.line_num}"
                    if not any(cell.strip() for cell in row):
                        continue  # blank line (a trailing newline), not a data row
                    split = CSV_USAGE.get(row[u].strip().lower(), "") if len(row) >= width else ""
                    label = _csv_label(row[e]) if len(row) >= width else ""
                    reason = _csv_row_problem(row, width, e, u, split, label)
                    if reason:
                        self._rejected.append(SourceReject(split, label, origin, reason))
                        continue
                    yield SourceItem(split, label, origin, functools.partial(parse_pixels, row[p]))
            except csv.Error as exc:
                raise ValueError(f"data.source: {self.name}: line {reader.line_num}: not valid CSV ({exc})") from None

    def rejected(self) -> list[SourceReject]:
        return list(self._rejected)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "name": self.name,
            "usage_to_split": {"Training": "train", "PublicTest": "val", "PrivateTest": "test"},
        }


def _csv_label(cell: str) -> str:
    code = cell.strip()
    return FER2013_CSV_LABELS[int(code)] if code.isdigit() and int(code) < len(FER2013_CSV_LABELS) else ""


def _csv_row_problem(row: list[str], width: int, e: int, u: int, split: str, label: str) -> str:
    if len(row) < width:
        return f"expected at least {width} columns, got {len(row)}"
    if not label:
        return f"emotion {row[e].strip()!r} is not a FER-2013 code 0..6"
    if not split:
        return f"Usage {row[u].strip()!r} is not Training, PublicTest or PrivateTest"
    return ""


def parse_pixels(text: str) -> np.ndarray:
    """'0 12 255 ...' (a square number of values, each 0..255) -> uint8 (n, n); ImageError otherwise."""
    try:
        values = np.fromstring(text, dtype=np.int64, sep=" ")
    except ValueError:
        raise ImageError("pixels: not a list of space-separated integers") from None
    side = int(round(len(values) ** 0.5))
    if side == 0 or side * side != len(values):
        raise ImageError(f"pixels: {len(values)} values, expected a square image (48x48 = 2304)")
    if values.min() < 0 or values.max() > 255:
        raise ImageError(f"pixels: values must be 0..255, got {values.min()}..{values.max()}")
    return values.astype(np.uint8).reshape(side, side)


# --- dispatch -------------------------------------------------------------------------


def _lone_csv(files: list[_File]) -> _File | None:
    """The only CSV of a container without split folders (e.g. a zip of fer2013.csv)."""
    csvs = [f for f in files if f.parts[-1].lower().endswith(".csv")]
    has_splits = any(split_of(p) for folder in {f.parts[:-1] for f in files} for p in folder)
    return csvs[0] if len(csvs) == 1 and not has_splits else None


def open_path_source(
    path: Path,
    class_map: Mapping[str, str] | None = None,
    *,
    follow_symlinks: bool = False,
    max_zip_entries: int = MAX_ZIP_ENTRIES,
    max_zip_bytes: int = MAX_ZIP_BYTES,
) -> Source:
    """The source for a folder, a .zip or a .csv path (see the module docstring)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.source: {path} does not exist (expected 'synthetic' or a folder, .zip or .csv)")
    mode = os.stat(path).st_mode  # without opening: a FIFO would block the open
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise ValueError(f"data.source: {path} is not a regular file ({_kind(mode)}); expected a folder, .zip or .csv")
    skipped: Counter[str] = Counter()
    if path.is_dir():
        try:
            files = _list_folder(path, skipped, follow_symlinks)
        except OSError as exc:  # e.g. data.source: /proc, with folders no one may list
            raise ValueError(f"data.source: {path}: cannot read {exc.filename or 'it'} ({exc.strerror or exc})") from None
        lone = _lone_csv(files)
        if lone is not None:
            csv_path = path.joinpath(*lone.parts)
            return CsvSource(csv_path.name, functools.partial(_open_csv_file, csv_path), csv_path)
        return LayoutSource("folder", path, files, skipped, class_map)
    suffix = path.suffix.lower()
    if suffix == ".zip":
        files = _list_zip(path, skipped, max_zip_entries, max_zip_bytes)
        lone = _lone_csv(files)
        if lone is not None:
            return CsvSource(f"{path.name}:{lone.member}", functools.partial(_open_csv_member, path, lone.member), path)
        return LayoutSource("zip", path, files, skipped, class_map)
    if suffix == ".csv":
        return CsvSource(path.name, functools.partial(_open_csv_file, path), path)
    raise ValueError(f"data.source: {path} is not a folder, .zip or .csv (expected 'synthetic' or one of those)")


def _open_csv_file(path: Path) -> IO[str]:
    try:
        fd = _open_regular(path)
    except ImageError as exc:
        raise ValueError(f"data.source: {path}: {exc}; expected a fer2013.csv file") from None
    size = os.fstat(fd).st_size
    if size > MAX_CSV_BYTES:
        os.close(fd)
        raise ValueError(f"data.source: {path}: {size} bytes, over the limit of {MAX_CSV_BYTES} for a CSV source")
    return open(fd, newline="", encoding="utf-8-sig")


def _open_csv_member(zip_path: Path, member: str) -> IO[str]:
    zf = zipfile.ZipFile(zip_path)
    try:
        raw = zf.open(member)  # streamed: fer2013.csv is ~300 MB uncompressed
    except BaseException:
        zf.close()
        raise
    return _ZipText(zf, raw)


class _ZipText(io.TextIOWrapper):
    """A text stream over a zip member that closes the zip with it."""

    def __init__(self, zf: zipfile.ZipFile, raw: IO[bytes]):
        super().__init__(raw, encoding="utf-8-sig", newline="")
        self._zf = zf

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._zf.close()
