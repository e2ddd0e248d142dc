"""The per-repository metadata lock.

git's own locking is not enough for many concurrent ``git worktree add`` and ref deletions in
one repository (see docs/architecture.md), so the orchestrator serialises those short metadata
steps: an anyio lock for the tasks of this process, plus ``flock`` on a file in the git
directory for other processes. The flock is polled with a growing sleep rather than taken in a
blocking thread, so a cancelled waiter never ends up holding it.

The lock file stays in place (an unheld flock is not stale: the kernel drops it when its holder
dies), and its name does not end in ``.lock`` so that it is never mistaken for a git lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

__all__ = ["RepoLock"]


class RepoLock:
    """Mutual exclusion for metadata steps on one repository, across tasks and processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = anyio.Lock()
        self._fd: int | None = None
        self.acquisitions = 0

    def ensure_open(self) -> int:
        """Open (creating if needed) the lock file; OSError when that is impossible."""
        return self._open()

    def _open(self) -> int:
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
            fd = self._open()
            delay = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
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
