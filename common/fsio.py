"""Crash-safe file writes: a file (or folder) is replaced whole or not at all, and the replacement is durable.

Every write goes to a uniquely named temporary in the target's directory (no collision between processes or
threads), is ``fsync``'d, ``os.replace``'d over the target, and the directory is ``fsync``'d so the rename
itself survives a power cut. Appended JSON lines are ``fsync``'d one by one; a reader skips a line torn by a
crash mid-append.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["append_jsonl", "atomic_dir", "atomic_path", "atomic_write", "fsync_dir", "read_jsonl"]


def fsync_dir(path: str | Path) -> None:
    """``fsync`` a directory, so that a rename or creation in it is durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # platforms that cannot open a directory (Windows) cannot fsync one either
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkstemp(path: Path, mode: int) -> Path:
    """A new empty temporary next to ``path``, with ``path``'s suffix (``np.savez`` appends ``.npz`` otherwise)
    and permissions ``mode`` before any byte is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    try:
        # mkstemp creates 0600; fchmod (not the umask) sets the mode, so public files stay readable by all
        os.fchmod(fd, mode)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return Path(tmp)


def atomic_write(path: str | Path, data: bytes | str, *, mode: int = 0o644) -> None:
    """Write ``data`` (str as UTF-8) to ``path``: a crash leaves the old file or the new one, never a torn one.

    The file has permissions ``mode`` from its creation (a private key written with ``0o600`` is never readable
    by others, not even briefly).
    """
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path next to ``path`` for a writer that opens files itself (``safetensors.save_file``,
    ``np.savez``, ``torch.save``); on leaving the block it is fsync'd and replaces ``path``, on an error it is
    removed and ``path`` is left as it was.

    The temporary exists (empty, permissions ``mode``) when the block starts and ends in ``path``'s suffix.
    """
    path = Path(path)
    tmp = _mkstemp(path, mode)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, mode: int = 0o755) -> Iterator[Path]:
    """A new empty folder (permissions ``mode``) next to ``path`` to fill; on leaving the block it replaces
    ``path`` (a folder already there is removed first), on an error it is removed and ``path`` is left as it was.

    Readers should check a marker file written last: the old folder is removed before the new one is renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp.chmod(mode)  # mkdtemp makes 0700
        yield tmp
        for p in sorted(tmp.rglob("*"), reverse=True):  # files before their folders
            if p.is_file() and not p.is_symlink():
                _fsync_file(p)
            elif p.is_dir() and not p.is_symlink():
                fsync_dir(p)
        fsync_dir(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def append_jsonl(path: str | Path, record: Mapping[str, Any], *, sort_keys: bool = False) -> None:
    """Append ``record`` as one JSON line and ``fsync`` it.

    The line goes out in one ``write`` on an ``O_APPEND`` descriptor, so concurrent appenders do not interleave
    within a line. A torn last line (a crash mid-append) is ended first, so the new record stays whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(dict(record), sort_keys=sort_keys) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, in order; empty when it does not exist.

    Blank lines and lines torn by a crash mid-append (the last line, or one that a later append ended) are
    skipped: an append is acknowledged only once its whole line is on disk.
    """
    p = Path(path)
    if not p.is_file():
        return []
    out: list[dict[str, Any]] = []
    for line in p.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
