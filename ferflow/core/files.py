"""Atomic file and directory writes: a killed stage never leaves a half-written output."""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def _naming(exc: OSError, target: Path, tmp: Path | None = None) -> OSError:
    """The same OS error naming the output when it names no file (a failing write() with
    ENOSPC) or only the hidden temp file beside it: the user knows `metrics/x.json`, not
    `metrics/.x.json.1a2b3c4d.tmp.json`."""
    names_temp = tmp is not None and exc.filename is not None and Path(exc.filename).name == tmp.name
    if (exc.filename is not None and not names_temp) or exc.errno not in _WRITE_ERRNOS:  # e.g. a network error inside the body
        return exc
    named = OSError(exc.errno, exc.strerror or str(exc), str(target))
    named.__cause__ = exc
    return named


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


STALE_UNOWNED_TEMP_S = 3600  # temp dirs without a pid in their name (older versions)


def remove_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Remove `.<name>.<pid>.*.tmp` dirs of `target` left by writers that were killed
    (their pid is gone on this machine); ones without a pid once over an hour old."""
    target = Path(target)
    removed = []
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        owner = tmp.name[len(target.name) + 2 :].split(".", 1)[0]
        try:
            stale = not _alive(int(owner)) if owner.isdigit() else time.time() - tmp.lstat().st_mtime > STALE_UNOWNED_TEMP_S
        except OSError:
            continue
        if stale and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to `target`; on success rename it over `target`.

    The temp name ends with the target's extensions, so writers that dispatch on them
    (Keras `.keras` and `.weights.h5`, numpy `.npz`) behave. On any exception the temp file is removed
    and `target` keeps its previous content.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp{''.join(target.suffixes)}"
    try:
        yield tmp
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        raise _naming(exc, target, tmp) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike[str], data: Any) -> None:
    write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:  # json.loads would keep the last value silently
        raise ValueError(f"duplicate key {repeated[0]!r} (each key once)")
    return dict(pairs)


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file the project wrote (or a user edited): an error naming the file when it is
    missing, not JSON, or holds a key twice."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found (was the stage that writes it run?)") from None
    except ValueError as exc:  # JSONDecodeError, or a duplicated key
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temp directory; on success it replaces `target` whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    # the pid in the name: a later writer can tell a killed writer's leftovers from a live one's
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:  # a read-only folder: named as the output, not as the temp dir
        raise _naming(exc, target, Path(exc.filename or "")) from None
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    except OSError as exc:
        raise _naming(exc, target, tmp) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def npy_header(dtype: Any, shape: tuple[int, ...]) -> bytes:
    """The header `np.save` writes for a C-order array of `dtype` and `shape`. Its length
    does not depend on the number of rows (numpy pads room for up to 21 digits), so a
    header can be rewritten in place when the row count changes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def write_npy(fh: IO[bytes], dtype: Any, shape: tuple[int, ...], blocks: Iterable[np.ndarray]) -> None:
    """Write one .npy array to an open binary file from consecutive row blocks.

    The result is what `np.save` writes for the whole array, without ever holding it
    in memory: an array of faces is written as it is gathered or normalised.
    """
    dtype = np.dtype(dtype)
    fh.write(npy_header(dtype, shape))
    rows = 0
    for block in blocks:
        if block.dtype != dtype or block.shape[1:] != shape[1:]:
            raise ValueError(f"block of {block.dtype} {block.shape} does not fit an array of {dtype} {shape}")
        fh.write(np.ascontiguousarray(block).data)
        rows += len(block)
    if rows != shape[0]:
        raise ValueError(f"wrote {rows} rows, the header says {shape[0]}")
