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
  searched (:func:`blocking_files`) and what is found released; git, let go of, goes on. A
  command is stopped only when one of its processes is stuck at two looks in a row:
  blocked opening a FIFO (:func:`waiting_on_fifo`: one the search did not find) or holding
  a FIFO or a device open (:func:`held_blocking`). SIGTERM (on which git removes its lock
  files), its children too, then SIGKILL after ``END_GRACE_S``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
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
    "signal_child",
    "wait",
    "waiting_on_fifo",
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
    renaming one changes its ctime, which no process can set back) is not listed again;
    only its links are looked at again (what one leads to may have changed). A directory
    changed within the last second is listed again at the next sweep whatever its status
    says (a change in the same tick of the file system's clock leaves it as it was: see
    *racy_s*). Each
    call returns what blocks git now in the directories listed, at most *limit* entries."""

    def __init__(self, common_dir: Path, limit: int = 500_000, racy_s: float = 1.0) -> None:
        self.common_dir = common_dir
        self.limit = limit
        #: A directory changed less than this long before a sweep is listed at the next.
        self.racy_s = racy_s
        self._known: dict[str, _Listed] = {}

    def __call__(self) -> list[Path]:
        found: list[Path] = []
        seen = 0
        known: dict[str, _Listed] = {}
        stack = [str(self.common_dir)]
        now = time.time()
        while stack and seen <= self.limit:
            directory = stack.pop()
            try:
                info = os.lstat(directory)
            except OSError:
                continue
            key = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns)
            last = self._known.get(directory)
            if last is not None and last.key == key:
                known[directory] = last
                stack += last.directories
                found += [Path(link) for link in last.links if _leads_to_blocking(link)]
                continue
            listed = _Listed(key if now - info.st_ctime >= self.racy_s else None)
            try:
                entries = os.scandir(directory)
            except OSError:
                continue
            with entries:
                for entry in entries:
                    seen += 1
                    if seen > self.limit:
                        break
                    _sort(entry, listed, found, top=directory == str(self.common_dir))
            known[directory] = listed
            stack += listed.directories
        self._known = known
        return found


@dataclass
class _Listed:
    """A directory as a sweep listed it: its status then (None: list it again), its
    directories and its links."""

    key: tuple[int, int, int] | None
    directories: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)


def _sort(entry: os.DirEntry[str], listed: _Listed, found: list[Path], *, top: bool) -> None:
    with contextlib.suppress(OSError):  # gone meanwhile
        if entry.is_dir(follow_symlinks=False):
            if not top or entry.name != "orchestrator":
                listed.directories.append(entry.path)
        elif entry.is_symlink():
            listed.links.append(entry.path)
            if _leads_to_blocking(entry.path):
                found.append(Path(entry.path))
        elif not entry.is_file(follow_symlinks=False) and _blocks(entry.stat().st_mode):
            found.append(Path(entry.path))


def _leads_to_blocking(link: str) -> bool:
    try:
        return _blocks(os.stat(link).st_mode)
    except OSError:  # dangling: opens nothing
        return False


def held_blocking(pids: Iterable[int]) -> set[tuple[int, int, str]]:
    """The open files of processes *pids* that a git command never opens itself: a named
    FIFO, or a device other than ``/dev/null`` and the random ones (a filter process git
    runs may read those); as (pid, descriptor, path). Their own pipes (stdin, stdout,
    stderr) are anonymous and left out. Empty where ``/proc`` is not."""
    harmless = set()
    for device in (os.devnull, "/dev/urandom", "/dev/random"):
        with contextlib.suppress(OSError):  # not on this machine: none of it is harmless
            harmless.add(os.stat(device).st_rdev)
    held: set[tuple[int, int, str]] = set()
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in descriptors:
            with contextlib.suppress(OSError):  # closed meanwhile
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


def waiting_on_fifo(pids: Iterable[int]) -> set[int]:
    """Those of processes *pids* blocked opening a FIFO that nobody has open at its other
    end (the kernel's ``wait_for_partner``, as ``/proc/<pid>/wchan`` names it): where that
    FIFO is needs no finding. Empty where ``/proc`` does not say."""
    waiting: set[int] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            fd = os.open(f"/proc/{pid}/wchan", os.O_RDONLY)
            try:
                if os.read(fd, 64) == b"wait_for_partner":
                    waiting.add(pid)
            finally:
                os.close(fd)
    return waiting


def release(found: Iterable[Path], root: Path) -> dict[Path, float]:
    """Remove what of *found* is in the directory *root* and still a FIFO, a device or a
    link to one (a file git wrote there since stays): a FIFO holds nothing, and a link
    goes, never what it points at; what is outside *root* (the user's own files) stays.
    Then let go of every process blocked on a FIFO of *found* (opened both ways, closed:
    one blocked opening it goes on, and reads its end or has its write refused). Removed
    first, so that no git opens it again between the two (a FIFO at an object it reads
    once per line of its input, say). Returns what was removed, with its ctime."""
    top = os.path.realpath(root)
    removed: dict[Path, float] = {}
    for path in found:
        handle = _fifo(path)
        try:
            parent = os.path.realpath(path.parent)
            if parent == top or parent.startswith(top + os.sep):
                with contextlib.suppress(OSError):
                    info = os.lstat(path)
                    if _blocks(info.st_mode) or (
                        stat.S_ISLNK(info.st_mode) and _leads_to_blocking(str(path))
                    ):
                        os.unlink(path)
                        removed[path] = info.st_ctime
            if handle is not None:
                _open_and_close(handle)
        finally:
            if handle is not None:
                os.close(handle)
    return removed


def _fifo(path: Path) -> int | None:
    """An ``O_PATH`` descriptor of the FIFO at *path* (or where a link there leads), which
    names it before it is opened and after it is removed; None if it is no FIFO."""
    try:
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if stat.S_ISFIFO(os.fstat(handle).st_mode):
            return handle
    except OSError:
        pass
    os.close(handle)
    return None


def _open_and_close(handle: int) -> None:
    """Open the FIFO *handle* names for reading and for writing, and close both: through
    the descriptor, a device put at its path meanwhile is never opened."""
    same = f"/proc/self/fd/{handle}"
    try:
        reader = os.open(same, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # never blocks
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # a reader is there (ours): it opens
            os.close(os.open(same, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    finally:
        os.close(reader)


async def wait(
    process: Process,
    common_dir: Path,
    also: Iterable[Path] = (),
    removed: Callable[[dict[Path, float]], None] | None = None,
    *,
    until: Callable[[], Awaitable[object]] | None = None,
) -> list[Path] | None:
    """Wait for *process* to end, or for *until* to return (a kept git's answer: called
    again after each look, it must go on where it stopped), looking for what would keep it
    waiting for ever once it has waited STALL_CHECK_S, and then at twice the interval each
    time. What costs a command that ends within STALL_CHECK_S: one deadline.

    Each look releases (:func:`release`) what blocks git in the git directory *common_dir*
    or at *also* (:func:`blocking_files`; what was removed is told to *removed*): git,
    let go of, goes on by itself (an empty commit graph is no error to it; an empty object
    is one it reports). The command is stopped only when one of its processes is stuck at
    two looks in a row: blocked opening a FIFO (:func:`waiting_on_fifo`: one not found, say
    behind a link to a directory) or holding a FIFO or a device open (:func:`held_blocking`).
    Returns None, or, when it was stopped, what it was stuck on (empty when not known)."""
    step = process.wait if until is None else until
    stuck: set[tuple[int, int, str]] = set()
    delay = STALL_CHECK_S
    while True:
        with anyio.move_on_after(delay) as waiting:
            await step()
        if not waiting.cancelled_caught or process.returncode is not None:
            return None  # (ended as the deadline came: its pid may be another's by now)
        paths = await anyio.to_thread.run_sync(blocking_files, common_dir, also)
        if paths:
            gone = await anyio.to_thread.run_sync(release, paths, common_dir)
            if removed is not None and gone:
                removed(gone)
        now = await anyio.to_thread.run_sync(_stuck, _family(process.pid))
        if now & stuck:
            held = sorted({Path(target) for _, _, target in now & stuck if target})
            await anyio.to_thread.run_sync(release, held, common_dir)
            with anyio.CancelScope(shield=True):
                await _stop(process, _family(process.pid))
            return held or paths
        stuck = now
        delay = min(2 * delay, STALL_MAX_S)


def _stuck(family: list[psutil.Process]) -> set[tuple[int, int, str]]:
    """What of *family* is stuck now: (pid, descriptor, path) of a blocking file held open,
    (pid, -1, "") for one blocked opening a FIFO."""
    pids = [member.pid for member in family]
    return held_blocking(pids) | {(pid, -1, "") for pid in waiting_on_fifo(pids)}


async def _stop(process: Process, family: list[psutil.Process]) -> None:
    """SIGTERM to *family* (*process* first: then it starts no more), SIGKILL after the
    grace; returns once *process* is reaped and the rest of *family* is gone (a SIGKILL is
    delivered, not waited for: a process dying is still there for a moment)."""
    for member in family:
        with contextlib.suppress(psutil.Error):
            member.terminate()
    with anyio.move_on_after(END_GRACE_S):
        await process.wait()
    for member in family:
        with contextlib.suppress(psutil.Error):
            member.kill()
    signal_child(process, signal.SIGKILL)  # (not in *family* if psutil could not see it)
    await process.wait()
    others = [member for member in family if member.pid != process.pid]
    await anyio.to_thread.run_sync(_until_gone, others, END_GRACE_S)


def signal_child(process: Process, signum: int) -> None:
    """Send *signum* to *process* (a child of this process, run by anyio) unless it was
    reaped. Not ``process.kill()``: Popen's ``send_signal`` reaps a child that has exited
    first, behind asyncio's back, which then gives its exit status as 255 and logs a
    warning. A child not reaped keeps its pid, and only the event loop's thread (this one)
    reaps it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


def _until_gone(members: list[psutil.Process], timeout: float) -> None:
    """Wait up to *timeout* for each of *members* to be gone or a zombie (one whose parent
    died is reaped by init, not by us)."""
    for _ in range(max(1, int(timeout / 0.005))):
        if not any(_alive(member) for member in members):
            return
        time.sleep(0.005)


def _alive(member: psutil.Process) -> bool:
    try:
        return member.is_running() and member.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _family(pid: int) -> list[psutil.Process]:
    """The process *pid* and every process it started (git runs some commands as children)."""
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []
