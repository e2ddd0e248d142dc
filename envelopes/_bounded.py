"""Reading what someone else wrote: files opened safely, read up to a cap, JSON with bounds.

A report received from elsewhere, and every file an agent leaves behind, is hostile input. A
file it names is opened only inside one directory, component by component without following
a symbolic link (``O_NOFOLLOW``), without blocking on a FIFO or a device (``O_NONBLOCK``), must
be a regular file (``fstat``) and is read up to a cap. JSON is parsed with its nesting depth
and the size of its numbers bounded, so that neither a deep document nor a 5,000-digit integer
can exhaust the stack or the CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_NUMBER_CHARS",
    "MAX_VALUE_DEPTH",
    "UnsafeFile",
    "depth_problem",
    "hash_file",
    "hash_span",
    "loads_bounded",
    "open_regular",
    "read_bounded",
    "read_span",
    "relative_path_problem",
]

#: Deepest nesting of arrays and objects accepted in a document the orchestrator reads back (a
#: report, an envelope, a journal line): room for a value of MAX_VALUE_DEPTH inside one.
MAX_JSON_DEPTH = 200
#: Deepest nesting accepted in a value that goes into one: an agent's output, a plan's inputs.
MAX_VALUE_DEPTH = 100
#: Longest number literal accepted in JSON (digits, sign, point and exponent).
MAX_NUMBER_CHARS = 100

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class UnsafeFile(OSError):
    """A file that cannot be read safely: not a regular file, a link, outside its place, too big.

    ``str()`` names the file and says why; ``strerror`` says only why, as for the system's
    errors, so that ``f"cannot read {path}: {exc.strerror or exc}"`` names the file once.
    """

    def __init__(self, shown: object, why: str) -> None:
        super().__init__(f"{shown} is {why}" if shown is not None else why)
        self.strerror = why
        self._shown = shown

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError's would rebuild it from str() alone: copies and pickles (a Dask worker's
        # error sent back) need both parts.
        return (type(self), (self._shown, self.strerror), self.__dict__ or None)


def relative_path_problem(path: str) -> str | None:
    """Why *path* cannot name a file inside a directory, or None when it can.

    It must be relative, in POSIX form, with no empty, ``.`` or ``..`` component, and no NUL
    or backslash.
    """
    if not path or "\0" in path or "\\" in path:
        return f"path {path!r} is empty or holds a NUL or a backslash"
    if path.startswith("/"):
        return f"path {path!r} is absolute"
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return f"path {path!r} leaves its directory or is not in its plain form"
    return None


def open_regular(path: Path | str, *, within: Path | None = None) -> int:
    """Open a regular file for reading and return its descriptor; UnsafeFile when it is not one.

    With *within*, *path* is relative to that directory (see :func:`relative_path_problem`)
    and every component is opened without following a symbolic link, so the file opened is
    inside *within* whatever the components are. Without it, only the last component must
    not be a link. A FIFO or a device is refused without blocking.
    """
    if within is None:
        fd = _open_nofollow(str(path), None)
    else:
        relative = str(PurePosixPath(path)) if isinstance(path, PurePosixPath) else str(path)
        if why := relative_path_problem(relative):
            raise UnsafeFile(None, why)
        parts = relative.split("/")
        dir_fd = os.open(within, os.O_RDONLY | _DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                try:
                    inner = os.open(
                        part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
                    )
                except OSError as exc:
                    raise _explain(exc, relative) from exc
                os.close(dir_fd)
                dir_fd = inner
            fd = _open_nofollow(parts[-1], dir_fd, shown=relative)
        finally:
            os.close(dir_fd)
    try:
        info = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UnsafeFile(path, "not a regular file")
    return fd


def _open_nofollow(name: str, dir_fd: int | None, *, shown: str | None = None) -> int:
    try:
        return os.open(name, _OPEN_FLAGS | _NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        raise _explain(exc, shown or name) from exc


def _explain(exc: OSError, shown: str) -> OSError:
    import errno

    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return UnsafeFile(shown, "a symbolic link or passes through one, or is not a file")
    return exc


def read_bounded(path: Path | str, limit: int, *, within: Path | None = None) -> bytes:
    """The bytes of a regular file (see :func:`open_regular`), at most *limit* of them.

    A longer file raises UnsafeFile naming the limit: a size is never trusted from ``stat``
    alone (a file may grow while it is read).
    """
    fd = open_regular(path, within=within)
    try:
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise UnsafeFile(path, f"larger than {limit} bytes")
    return data


def read_span(path: Path | str, offset: int, size: int, *, within: Path | None = None) -> bytes:
    """At most *size* bytes of a regular file (see :func:`open_regular`) from *offset*: a
    record of a file that holds many. Fewer when the file ends sooner."""
    fd = open_regular(path, within=within)
    try:
        chunks: list[bytes] = []
        left = size
        while left > 0:
            chunk = os.pread(fd, min(left, 1 << 20), offset)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def hash_span(
    path: Path | str, offset: int, size: int, *, within: Path | None = None
) -> tuple[str, int]:
    """SHA-256 and length of at most *size* bytes of a regular file from *offset* (see
    :func:`read_span`), hashed as they are read: never more than a chunk in memory."""
    fd = open_regular(path, within=within)
    try:
        hasher, count = hashlib.sha256(), 0
        while count < size:
            chunk = os.pread(fd, min(size - count, 1 << 20), offset + count)
            if not chunk:
                break
            hasher.update(chunk)
            count += len(chunk)
    finally:
        os.close(fd)
    return hasher.hexdigest(), count


class _Capped(io.RawIOBase):
    """The file open on *fd*, read no further than *limit* bytes, counting what was read.

    It has no ``fileno``: :func:`hashlib.file_digest`, which may read a file's descriptor
    directly, goes through :meth:`readinto`, and so through the cap.
    """

    def __init__(self, fd: int, limit: int) -> None:
        super().__init__()
        self._fd = fd
        self._left = limit
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as view:
            room = view.cast("B")[: self._left]
            count = os.readv(self._fd, [room]) if len(room) else 0
        self._left -= count
        self.size += count
        return count


def hash_file(path: Path | str, limit: int, *, within: Path | None = None) -> tuple[str, int]:
    """SHA-256 and size of a regular file, reading at most *limit* + 1 bytes.

    The file is opened as :func:`open_regular` does. A file longer than *limit* gives the
    digest and size of its first *limit* + 1 bytes, which match no entry that claims at most
    *limit*. The size is what was read, never ``stat``'s word (a file may grow while it is
    read).
    """
    fd = open_regular(path, within=within)
    try:
        capped = _Capped(fd, limit + 1)
        return hashlib.file_digest(capped, "sha256").hexdigest(), capped.size
    finally:
        os.close(fd)


class _TooDeep(ValueError):
    pass


def _number(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_CHARS:
            raise ValueError(f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
        value = kind(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"number {text} is out of range")
        return value

    return parse


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def depth_problem(value: Any, limit: int) -> str | None:
    """Why *value* (parsed JSON) is nested too deeply, or None."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return f"nested more than {limit} deep"
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return None


def loads_bounded(
    data: bytes | str,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """Parse JSON with its depth and number sizes bounded; ValueError with a reason otherwise.

    NaN and infinities are refused, as are numbers of more than MAX_NUMBER_CHARS characters
    and values nested deeper than *max_depth*. Invalid UTF-8 is a ValueError too.
    """
    try:
        value = json.loads(
            data,
            parse_int=_number(int),
            parse_float=_number(float),
            parse_constant=_constant,
            object_pairs_hook=object_pairs_hook,
        )
    except RecursionError:
        raise _TooDeep(f"nested more than {max_depth} deep") from None
    if why := depth_problem(value, max_depth):
        raise _TooDeep(why)
    return value


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A ``json.loads`` ``object_pairs_hook`` that refuses an object with a key twice (two
    readers could take different values from it): ValueError naming the key."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:100]!r} in a JSON object")
        out[key] = value
    return out
