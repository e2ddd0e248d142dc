"""File helpers: atomic writes and file digests (blocking; call them through a thread)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from envelopes import loads_bounded, open_regular, read_bounded

from ._faults import crash_point
from .errors import RunDirError

__all__ = [
    "UMASK",
    "atomic_write",
    "last_line",
    "read_json",
    "remove_entry",
    "remove_tree",
    "remove_tree_at",
    "reread_umask",
    "write_file",
]

# Read once at import, while nothing else runs: os.umask can only be read by setting it.
UMASK = os.umask(0o022)
os.umask(UMASK)


def reread_umask() -> None:
    """Read the umask into UMASK again: a resident process's worker, forked from a process
    that read its own, has taken its client's (orchestrator/server.py)."""
    global UMASK
    UMASK = os.umask(0o022)
    os.umask(UMASK)


def atomic_write(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write *data* (bytes, or pieces of them written one after the other) to *path* so that
    readers see the old file or the new one, never a part.

    Temp file in the same directory, fsync, rename over, fsync of the directory. Raises
    RunDirError naming the path when the disk is full or the directory is not writable.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                # mkstemp makes 0600; reports and envelopes are for others to audit.
                os.fchmod(f.fileno(), 0o666 & ~UMASK)
                if isinstance(data, bytes):
                    f.write(data)
                else:
                    f.writelines(data)
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


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _clear_files(fd: int) -> list[str]:
    """Unlink everything in the directory *fd* but its directories; their names."""
    directories = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                directories.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    return directories


def remove_tree(path: Path | str, ignore_errors: bool = False) -> None:
    """Remove *path* and everything below it, as :func:`remove_tree_at` does; nothing when
    it is not there. Raises OSError, unless *ignore_errors* (then what could not be removed
    stays: never a fall-back to ``shutil.rmtree``, which recurses)."""
    path = Path(path)
    try:
        os.lstat(path)
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    except OSError:
        if ignore_errors:
            return
        raise
    try:
        remove_tree_at(parent, path.name)
    except OSError:
        if not ignore_errors:
            raise
    finally:
        os.close(parent)


def remove_entry(path: Path) -> None:
    """Remove whatever is at *path*: a file, a link (not what it leads to), a FIFO, or a
    directory and everything below it (:func:`remove_tree_at`); nothing when it is not there.
    For the files an agent may replace by something else (a directory where git keeps its
    worktree's index). The directory *path* is in is opened without following a link: one
    planted there (the admin directory's ``info`` made a link) is refused, OSError, so that
    nothing is removed outside. OSError too when it cannot be removed."""
    try:
        parent = os.open(path.parent, _DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        try:
            info = os.lstat(path.name, dir_fd=parent)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            remove_tree_at(parent, path.name)
        else:
            os.unlink(path.name, dir_fd=parent)
    finally:
        os.close(parent)


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _up(fd: int, expected: tuple[int, int]) -> int:
    """The directory above *fd*, which must be the one it was entered from (*expected*): a
    directory moved while it is walked must not take the walk elsewhere."""
    above = os.open("..", _DIRECTORY, dir_fd=fd)
    if _identity(above) != expected:
        os.close(above)
        raise OSError(errno.ESTALE, "a directory was moved while it was walked")
    return above


def remove_tree_at(parent_fd: int, name: str | bytes) -> None:
    """Remove *name* in the directory *parent_fd* and everything below it.

    A link is removed, never followed (each directory is opened with ``O_NOFOLLOW`` from the
    one above it, and climbing back checks that ``..`` is the directory it came from).
    Iterative, with two descriptors open at a time: a tree an agent made a thousand levels
    deep is removed like any other (``shutil.rmtree`` recurses and raises RecursionError
    there). A name that is not a directory is unlinked. Raises OSError.
    """
    try:
        fd = os.open(name, _DIRECTORY, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            os.unlink(name, dir_fd=parent_fd)
            return
        raise
    # Each level: its name, the directories left in it, the identity of the one above it.
    stack: list[tuple[str | bytes, list[str], tuple[int, int]]] = []
    try:
        stack.append((name, _clear_files(fd), _identity(parent_fd)))
        while stack:
            pending = stack[-1][1]
            if pending:
                child = pending.pop()
                above = _identity(fd)
                below = os.open(child, _DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = below
                stack.append((child, _clear_files(fd), above))
                continue
            done, _, above_identity = stack.pop()
            if not stack:
                os.close(fd)
                fd = -1
                os.rmdir(done, dir_fd=parent_fd)
                return
            above_fd = _up(fd, above_identity)
            os.close(fd)
            fd = above_fd
            os.rmdir(done, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


def sweep_worktree(root: Path) -> list[str]:
    """Put right in the worktree *root* what git's own walk never reports: a ``.git`` below
    the top (a repository planted in a tracked directory, whose config the next agent's git
    would obey: ``core.fsmonitor`` runs a program), FIFOs, sockets and devices (a FIFO where
    a file was blocks its reader), and directories whose mode is not the one a checkout
    gives them (the top's included). The first two are removed, the modes set back; what was
    done, as relative paths. Every directory is looked at, one at a time, never through a
    link, with two descriptors open at a time. Blocking; OSError when something cannot be
    put right."""
    done: list[str] = []
    _sweep_below(root, "", done)
    return done


def _open_below(root: Path, rel: str) -> int:
    """A descriptor of *rel* in *root*, each component opened without following a link."""
    fd = os.open(root, _DIRECTORY)
    try:
        for part in rel.split("/") if rel else []:
            below = os.open(part, _DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fix_mode(fd: int, rel: str, done: list[str]) -> None:
    """Set the directory *fd* back to the mode git gives the directories it makes."""
    mode = 0o777 & ~UMASK
    if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
        os.fchmod(fd, mode)
        done.append(rel + "/")


def _sweep_entries(fd: int, rel: str, done: list[str]) -> list[str]:
    """Remove a ``.git`` (below the top) and special files from the directory *fd*; the
    names of its directories."""
    below: list[str] = []
    with os.scandir(fd) as entries:
        found = [(e.name, e.is_dir(follow_symlinks=False), e) for e in entries]
    for name, is_dir, entry in found:
        path = f"{rel}/{name}" if rel else name
        if name == ".git":
            if rel:
                remove_tree_at(fd, name)
                done.append(path)
        elif is_dir:
            below.append(name)
        elif not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
            os.unlink(name, dir_fd=fd)
            done.append(path)
    return below


def _sweep_below(root: Path, top: str, done: list[str]) -> None:
    """Sweep the directory *top* of *root* and everything below it."""
    fd = _open_below(root, top)
    path = top.split("/") if top else []
    depth = len(path)
    stack: list[list[str]] = []
    above: list[tuple[int, int]] = []  # the identity of each directory entered from
    try:
        _fix_mode(fd, top, done)
        while True:
            stack.append(_sweep_entries(fd, "/".join(path), done))
            while stack and not stack[-1]:
                stack.pop()
                if len(path) == depth:
                    return
                up = _up(fd, above.pop())
                os.close(fd)
                fd = up
                path.pop()
            if not stack:
                return
            child = stack[-1].pop()
            above.append(_identity(fd))
            below_fd = os.open(child, _DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below_fd
            path.append(child)
            _fix_mode(fd, "/".join(path), done)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Write *data* under a new name beside *path*, then rename it over *path*: whatever was
    at *path* (a file, a link, a FIFO) is replaced, never followed or opened, and a reader
    sees the old file or the new one. No fsync: for files that can be made again (a page,
    attestations). Raises OSError."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~UMASK)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_file(path: Path, data: bytes) -> None:
    """Write *data* to *path*, replacing it, without fsync: for files the journal can re-make.

    An envelope is such a file: a crash of the process loses nothing written (it is in the
    page cache); what it must not cost is two fsyncs per task. A power cut can lose it (its
    result, journaled, then names a file that is gone: ``verify`` says so), as it can the
    records of envelopes.jsonl. Raises
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
