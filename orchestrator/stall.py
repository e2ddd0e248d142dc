"""What keeps a git command waiting for ever, found, let go of, and ended.

git opens the files of its git directory (loose objects, the commit graph, refs, reflogs, a
worktree's index and HEAD) as plain files. Without a sandbox an agent can write that
directory, and a FIFO put where git opens a file blocks git in ``open`` for ever; a link to
a device (``/dev/zero``) makes it read without end. git itself never makes either there, so
one found is an agent's.

Two defences, both ending in :func:`release`: every FIFO found is opened both ways and
closed (each git process blocked opening it, of any command, goes on and reads its end),
and what is in the git directory is removed, so that no later command blocks on it (a link
goes, never what it points at).

- After each agent attempt, the repository guard runs a :class:`Sweep` of the git directory
  (only the directories changed since the last sweep are listed) and blames the agent for
  what it finds (orchestrator/guard.py).
- Every git command of the engine is watched (:func:`wait`): they run without a time limit
  (a checkout of a large repository takes minutes), so once one has run ``STALL_CHECK_S``,
  and then at twice the interval each time, up to ``STALL_MAX_S``, the git directory is
  searched (:func:`blocking_files`) and the command's processes' open files are looked at
  (:func:`held_blocking`). What is found is released; a command that has not ended
  ``END_GRACE_S`` later, or that holds a FIFO or a device open at two looks in a row, is
  stopped: SIGTERM (on which git removes its lock files), its children too, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import anyio
import anyio.to_thread
import psutil
from anyio.abc import Process

__all__ = [
    "END_GRACE_S",
    "STALL_CHECK_S",
    "STALL_MAX_S",
    "Sweep",
    "blocking_files",
    "held_blocking",
    "release",
    "wait",
]

#: How long a git command may run before what it may be waiting on is looked for.
STALL_CHECK_S = 2.0
#: The longest interval between two looks, however long the command runs.
STALL_MAX_S = 30.0
#: How long a git process told to end (SIGTERM, or its input closed) has to end before it
#: is killed; git removes its lock files on SIGTERM, not on SIGKILL.
END_GRACE_S = 5.0


def blocking_files(common_dir: Path, also: Iterable[Path] = (), limit: int = 500_000) -> list[Path]:
    """What git may open in the git directory *common_dir* (all of it but the orchestrator's
    own ``orchestrator/``), or at the paths *also*, that would keep it waiting for ever or
    reading without end: a FIFO, a character or block device, or a link to one (a socket,
    such as git's own fsmonitor's, cannot be opened, and is left out). At most *limit*
    entries are looked at; links to directories are not followed."""
    found: list[Path] = []
    for path in also:
        with contextlib.suppress(OSError):  # absent, or a dangling link: opens nothing
            if _blocks(os.stat(path).st_mode):
                found.append(path)
    seen = 0
    stack = [common_dir]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if seen > limit:
                return found
            with contextlib.suppress(OSError):  # gone meanwhile, or a dangling link
                if entry.is_dir(follow_symlinks=False):
                    if directory != common_dir or entry.name != "orchestrator":
                        stack.append(Path(entry.path))
                elif not entry.is_file(follow_symlinks=False) and _blocks(
                    os.stat(entry.path).st_mode  # a link: what it leads to
                ):
                    found.append(Path(entry.path))
    return found


def _blocks(mode: int) -> bool:
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


class Sweep:
    """:func:`blocking_files` of one git directory, again and again, cheaply: a directory
    whose status is as it was at the last sweep (its entries unchanged: adding, removing or
    renaming one changes its ctime, which no process can set back) is not listed again.
    Each call returns what blocks git now in the directories listed."""

    def __init__(self, common_dir: Path, limit: int = 500_000) -> None:
        self.common_dir = common_dir
        self.limit = limit
        self._known: dict[str, tuple[tuple[int, int, int], list[str]]] = {}

    def __call__(self) -> list[Path]:
        found: list[Path] = []
        seen = 0
        known: dict[str, tuple[tuple[int, int, int], list[str]]] = {}
        stack = [str(self.common_dir)]
        while stack and seen <= self.limit:
            directory = stack.pop()
            try:
                info = os.lstat(directory)
            except OSError:
                continue
            key = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns)
            last = self._known.get(directory)
            if last is not None and last[0] == key:
                known[directory] = last
                stack += last[1]
                continue
            subdirectories: list[str] = []
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                seen += 1
                with contextlib.suppress(OSError):  # gone meanwhile, or a dangling link
                    if entry.is_dir(follow_symlinks=False):
                        if directory != str(self.common_dir) or entry.name != "orchestrator":
                            subdirectories.append(entry.path)
                    elif not entry.is_file(follow_symlinks=False) and _blocks(
                        os.stat(entry.path).st_mode
                    ):
                        found.append(Path(entry.path))
            known[directory] = (key, subdirectories)
            stack += subdirectories
        self._known = known
        return found


def held_blocking(pids: Iterable[int]) -> set[tuple[int, int, str]]:
    """The open files of processes *pids* that a git command never opens itself: a named
    FIFO, or a device other than ``/dev/null`` and the random ones (a filter process git
    runs may read those); as (pid, descriptor, path). Their own pipes (stdin, stdout,
    stderr) are anonymous and left out. Empty where ``/proc`` is not."""
    harmless = set()
    for device in (os.devnull, "/dev/urandom", "/dev/random"):
        with contextlib.suppress(OSError):
            harmless.add(os.stat(device).st_rdev)
    held: set[tuple[int, int, str]] = set()
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in descriptors:
            with contextlib.suppress(OSError, ValueError):
                where = f"/proc/{pid}/fd/{name}"
                target = os.readlink(where)
                if not target.startswith("/"):
                    continue  # pipe:[...], socket:[...], anon_inode:...
                info = os.stat(where)
                if stat.S_ISFIFO(info.st_mode) or (
                    (stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode))
                    and info.st_rdev not in harmless
                ):
                    held.add((pid, int(name), target))
    return held


def release(found: Iterable[Path], root: Path) -> dict[Path, float]:
    """Let go of every process blocked on a FIFO of *found* (opened both ways, closed: one
    blocked opening it goes on, and reads its end or has its write refused), and remove
    what of *found* is in the directory *root*: a FIFO holds nothing, and a link goes,
    never what it points at. What is outside *root* (the user's own files) stays. Returns
    what was removed, with when it was made (its ctime)."""
    top = os.path.realpath(root)
    removed: dict[Path, float] = {}
    for path in found:
        _open_and_close(path)
        parent = os.path.realpath(path.parent)
        if parent == top or parent.startswith(top + os.sep):
            with contextlib.suppress(OSError):
                made = os.lstat(path).st_ctime
                os.unlink(path)
                removed[path] = made
    return removed


def _open_and_close(path: Path) -> None:
    try:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            return
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # a reader is there: ours
    finally:
        os.close(reader)


async def wait(
    process: Process,
    found: list[Path],
    common_dir: Path,
    also: Iterable[Path] = (),
    removed: Callable[[dict[Path, float]], None] | None = None,
    *,
    until: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Wait for *process* to end, or for *until* to return (a kept git's answer: called
    again after each look, it must go on where it stopped), looking for what would keep it
    waiting for ever: once it has waited STALL_CHECK_S, and then at twice the interval each
    time, in the git directory *common_dir* (or at *also*: :func:`blocking_files`) and among
    the open files of *process* and of the processes it started (:func:`held_blocking`).

    What is found is let go of, and removed from the git directory (:func:`release`; what
    was removed is told to *removed*): git may then go on by itself (an empty commit graph
    is no error to it, an empty object is one it reports). If it has not END_GRACE_S later,
    or if it holds a blocking file open at two looks in a row, what was found is named in
    *found* and it is stopped. What ends within STALL_CHECK_S costs one deadline."""
    step = process.wait if until is None else until
    held: set[tuple[int, int, str]] = set()
    delay = STALL_CHECK_S
    while True:
        with anyio.move_on_after(delay) as waiting:
            await step()
        if not waiting.cancelled_caught:
            return
        family = _family(process.pid)
        paths = await anyio.to_thread.run_sync(blocking_files, common_dir, also)
        now = await anyio.to_thread.run_sync(held_blocking, [p.pid for p in family])
        if paths or now & held:
            blocking = paths + sorted({Path(t) for _, _, t in now & held})
            gone = await anyio.to_thread.run_sync(release, blocking, common_dir)
            if removed is not None and gone:
                removed(gone)
            if paths and not now & held:
                with anyio.move_on_after(END_GRACE_S) as grace:
                    await step()
                if not grace.cancelled_caught:
                    return  # it went on: its own outcome stands
            found += blocking
            with anyio.CancelScope(shield=True):
                await _stop(process, _family(process.pid))
            return
        held = now
        delay = min(2 * delay, STALL_MAX_S)


async def _stop(process: Process, family: list[psutil.Process]) -> None:
    for member in family:
        with contextlib.suppress(psutil.Error):
            member.terminate()
    with anyio.move_on_after(END_GRACE_S):
        await process.wait()
    for member in family:
        with contextlib.suppress(psutil.Error):
            member.kill()


def _family(pid: int) -> list[psutil.Process]:
    """The process *pid* and every process it started (git runs some commands as children)."""
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []
