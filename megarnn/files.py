"""Atomic writes: a reader sees the old file (or directory) or the whole new one, never a part.

    atomic_write(path, b"bytes" or "text")     # one file
    with atomic_path(path) as tmp:             # anything written at tmp: a file, or a directory
        save_file(..., tmp)                    # of files; published as `path` when the block ends
    publish(tmp, path)                         # for writers that manage their own temporary

Everything goes to a temporary name beside the target (`.NAME.tmp`, in the same directory so
the rename is atomic), is fsynced (the file, or every file of a directory), renamed over the
target with os.replace, and the directory is fsynced so the rename itself survives a crash.
On an error the temporary is removed and the target is left as it was.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path(path: str | os.PathLike, unique: bool = False) -> Path:
    """The temporary name for `path`: `.NAME.tmp` beside it (cleanup code may rely on that form),
    or with unique=True `.NAME.<random>.tmp`, for targets that several processes may write at once."""
    p = Path(path)
    return p.with_name(f".{p.name}.{uuid.uuid4().hex[:12]}.tmp" if unique else f".{p.name}.tmp")


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and directory under a directory (and the directory itself)."""
    if path.is_dir():
        for child in path.iterdir():
            fsync_tree(child)
    _fsync(path)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync `tmp` (a file or a directory), rename it to `path` and fsync the parent directory.

    A directory replaces `path` only if `path` is absent or an empty directory (os.replace's rule)."""
    tmp, path = Path(tmp), Path(path)
    fsync_tree(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


@contextmanager
def atomic_path(path: str | os.PathLike, unique: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file or a directory at; published as `path`
    when the block ends without error, removed when it raises. A stale temporary of an earlier,
    crashed writer is removed first."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(p, unique)
    _remove(tmp)
    try:
        yield tmp
        publish(tmp, p)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str, unique: bool = False) -> None:
    """Write bytes (or UTF-8 text) to `path` atomically, creating its directory if needed.
    unique: a temporary name of its own (see temp_path), when other processes may write `path` too."""
    with atomic_path(path, unique) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or directory (not what is inside a directory); see fsync_tree for that."""
    _fsync(Path(path))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """fsync one file or directory; file systems that cannot fsync a directory are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. a directory on a file system without directory fsync
    finally:
        os.close(fd)
