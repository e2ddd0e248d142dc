"""File helpers: atomic writes and file digests (blocking; call them through a thread)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from envelopes import loads_bounded, open_regular, read_bounded

from ._faults import crash_point
from .errors import RunDirError

__all__ = ["atomic_write", "last_line", "read_json", "write_file"]

# Read once at import, while nothing else runs: os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: Path, data: bytes) -> None:
    """Write *data* to *path* so that readers see the old file or the new one, never a part.

    Temp file in the same directory, fsync, rename over, fsync of the directory. Raises
    RunDirError naming the path when the disk is full or the directory is not writable.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                # mkstemp makes 0600; reports and envelopes are for others to audit.
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if path.name == "report.json":
                crash_point("report")  # written, not yet renamed into place
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise RunDirError(f"cannot write {path}: {exc.strerror or exc}") from exc


def replace_file(path: Path, data: bytes) -> None:
    """Write *data* under a new name beside *path*, then rename it over *path*: whatever was
    at *path* (a file, a link, a FIFO) is replaced, never followed or opened, and a reader
    sees the old file or the new one. No fsync: for files that can be made again (a page,
    attestations). Raises OSError."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_file(path: Path, data: bytes) -> None:
    """Write *data* to *path*, replacing it, without fsync: for files the journal can re-make.

    An envelope is such a file: its digest is in the journal, and a resume writes it again,
    so it need not survive a crash; what it must not cost is two fsyncs per task. Raises
    RunDirError naming the path when the disk is full or the directory is not writable.
    """
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise RunDirError(f"cannot write {path}: {exc.strerror or exc}") from exc


def last_line(path: Path, limit: int = 4096) -> str:
    """The last non-blank line of a log (at most 300 characters), read safely; "" if none."""
    try:
        fd = open_regular(path)
    except OSError:
        return ""
    try:
        size = os.fstat(fd).st_size
        tail = os.pread(fd, limit, max(0, size - limit)).decode(errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def read_json(path: Path, limit: int = 1 << 30) -> Any:
    """The JSON in a file of the state directory, read as something an agent may have touched.

    A regular file (a FIFO or a device raises UnsafeFile, an OSError, without blocking), of
    at most *limit* bytes, JSON of bounded depth and number sizes (ValueError otherwise).
    """
    return loads_bounded(read_bounded(path, limit))
