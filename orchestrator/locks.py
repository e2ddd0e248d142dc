"""The orchestrator's locks: ``flock`` on a file, taken in one of three ways.

Every lock here is an ``flock`` on a file kept open while the lock is held. The kernel drops it
when its holder dies, so a lock file that nobody holds is not stale whatever it says, and no
lock of a dead process ever has to be broken. The three uses:

- :class:`RepoLock`, a repository's metadata lock: waited for, by polling with a growing
  sleep rather than in a blocking thread, so that a cancelled waiter never ends up holding it;
  an anyio lock in front of it serialises the tasks of this process;
- :class:`RunLock`, a run directory's lock: taken without waiting, :class:`RunInUse` (naming
  the holder's pid) when a live process has it; the file names its holder;
- :func:`try_lock`, a pool slot's mutex: taken without waiting, or not at all.

A lock file is removed only by a process that holds its lock (gc, a pool slot given up), so a
lock taken on a file that is no longer at its path is no lock: :func:`try_lock` checks that the
file it locked is the one at the path. No lock file ends in ``.lock``, so none is ever mistaken
for one of git's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import psutil

from ._fs import read_json
from .errors import RunDirError, RunInUse

__all__ = ["LOCK", "LockFileGone", "RepoLock", "RunLock", "is_locked", "try_flock", "try_lock"]

#: The run lock's file name in a run directory.
LOCK = "lock"


class LockFileGone(FileNotFoundError):
    """The file locked was removed from its path meanwhile (by its holder): that is no lock."""


def try_flock(fd: int, *, shared: bool = False) -> bool:
    """Lock the open file *fd* without waiting; False when someone else holds the lock."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def try_lock(path: Path) -> int | None:
    """An exclusive lock on *path* (the file made if missing), taken without waiting.

    Returns the locked descriptor (closing it lets go), or None when someone else holds the
    lock. Raises :class:`LockFileGone` when the file locked is no longer the one at *path*,
    and another OSError when *path* cannot be opened.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not try_flock(fd):
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            raise LockFileGone(f"{path} was removed while it was being locked")
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd


def is_locked(path: Path) -> bool:
    """Whether anyone (this process included) holds the lock on *path*; False with no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return not try_flock(fd, shared=True)
    finally:
        os.close(fd)


class RepoLock:
    """Mutual exclusion for metadata steps on one repository, across tasks and processes.

    git's own locking is not enough for many concurrent ``git worktree add`` and ref deletions
    in one repository (see docs/architecture.md), so those short steps are serialised. The
    lock file stays in place.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = anyio.Lock()
        self._fd: int | None = None
        self.acquisitions = 0

    def ensure_open(self) -> int:
        """Open (creating if needed) the lock file; OSError when that is impossible."""
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return self._fd

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold the lock for the body, which is shielded from cancellation.

        Cancellation while waiting leaves the lock free; the body itself always completes.
        """
        async with self._lock:
            fd = self.ensure_open()
            delay = 0.001
            while not try_flock(fd):
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.05)
            self.acquisitions += 1
            try:
                # The body is a few milliseconds of git metadata work; killing it halfway
                # would leave lock files and half-made worktree entries, so it is shielded
                # and a cancellation takes effect right after it.
                with anyio.CancelScope(shield=True):
                    yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the lock file's descriptor (the file itself stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RunLock:
    """The lock of one run directory, held while an orchestrator works on the run.

    The file names its holder: pid, the process's start time (with the pid, it tells a reused
    pid apart) and when the lock was taken. A finished run removes it (:meth:`remove`); one
    left behind by a dead holder is stale, and is taken over or removed by gc.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; RunInUse naming the owner if a live process holds it.

        RunDirError when the lock file cannot be opened or written.
        """
        while True:
            try:
                fd = try_lock(self.path)
            except LockFileGone:
                continue  # gc removed a stale lock file meanwhile: lock the one there now
            except OSError as exc:
                raise RunDirError(f"cannot open {self.path}: {exc.strerror or exc}") from exc
            if fd is not None:
                break
            owner = self.owner()
            who = f"pid {owner['pid']}" if owner else "another process"
            since = f", running since {owner['started_at']}" if owner else ""
            raise RunInUse(
                f"run {self.path.parent.name} is in use by {who}{since}; "
                "wait for it to end, or stop it first"
            )
        me = psutil.Process()
        started: float | None = None
        with contextlib.suppress(psutil.Error):
            started = me.create_time()
        record = {
            "pid": me.pid,
            "process_start": started,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise RunDirError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self._fd = fd

    def owner(self) -> dict[str, Any] | None:
        """Who the lock file says holds it (maybe a dead process: see :meth:`is_held`)."""
        try:
            value = read_json(self.path, 1 << 16)
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) and "pid" in value else None

    def is_held(self) -> bool:
        """Whether a live process (this one included) holds the lock."""
        return self._fd is not None or is_locked(self.path)

    def remove(self) -> None:
        """Delete the lock file while holding it, then let go (a finished run; gc)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.release()

    def release(self) -> None:
        """Let go of the lock (the file stays; nobody holding it makes it stale)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
