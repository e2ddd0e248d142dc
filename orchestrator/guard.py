"""The repository guard: git never runs with a config, attributes or hook that an agent changed.

Without a sandbox an agent can reach the shared git directory through its worktree's ``.git``
file and plant a ``core.fsmonitor`` program, a clean filter, a merge driver or a hook, which
the orchestrator's own git would then run, outside any timeout, and which would stay in the
user's repository. Command-line ``-c`` options switch off hooks and fsmonitor (see
``_git.HARDENING``); filters and drivers come from the config and cannot be switched off that
way. So the guard takes a snapshot of the files that decide what git runs when a run starts
and, before every git command and after every agent attempt, compares their status (a few
``stat`` calls). A change is put back from the snapshot at once, before git runs, and kept
as a :class:`Change`, so that the task whose agent was running when the file changed fails
with kind ``tamper`` naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from envelopes import TaskResult, read_bounded

from .errors import GitError
from .results import Brief
from .stall import Sweep, release

if TYPE_CHECKING:
    from ._git import Git

__all__ = [
    "GUARDED_FILES",
    "Change",
    "RepoGuard",
    "moved_refs",
    "ref_values",
    "user_git_files",
]

#: Files of the common git directory that decide what git runs or which objects it sees
#: (the user's global config, attributes and ignore files are watched too: see
#: user_git_files).
GUARDED_FILES = (
    "config",
    "config.worktree",
    "info/attributes",
    "info/exclude",
    "info/grafts",
    "objects/info/alternates",
    "shallow",
)
#: Largest guarded file kept for putting back (a config file is a few KiB).
_MAX_KEPT = 4 << 20
#: Files every git command reads, which change during a run for good reasons (the
#: orchestrator's own ref deletions rewrite packed-refs; the user may check out another
#: branch): what they hold is not put back, but each must stay a regular file. Made
#: anything else (a FIFO would block every git command for ever), it is put back as it last
#: was; a missing HEAD too (without it the directory is no repository).
SHARED_FILES = ("HEAD", "packed-refs")
#: Largest shared file kept for putting back (packed-refs holds a line per ref).
_MAX_SHARED = 64 << 20

_Key = tuple[int, int, int, int, int] | None

_BLOCKING = "made a FIFO or a device (git would wait on it for ever)"


def _key(path: Path) -> _Key:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return (info.st_mode, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@dataclass(frozen=True)
class Change:
    """A guarded file found changed (and put back): when it changed, as its ctime says."""

    path: Path
    what: str
    changed_at: float


@dataclass
class _Kept:
    key: _Key
    content: bytes | None
    mode: int = 0o644
    #: A symbolic link's target (a dotfiles manager links ~/.gitconfig): put back as a link.
    link: str | None = None


@dataclass
class RepoGuard:
    """A snapshot of one repository's guarded files, checked and restored on demand.

    Thread-safe: :meth:`check` runs in the event loop before each git command and in worker
    threads after attempts.
    """

    common_dir: Path
    kept: dict[Path, _Kept] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    blamed: set[int] = field(default_factory=set)
    #: The user's own git files watched too, as they were when the run started.
    user_files: list[Path] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Every hook ever seen (listed by a check, or recorded), by name: a check runs before
    #: every git command, and making these paths again each time cost most of it.
    _hooks: dict[str, Path] = field(default_factory=dict, repr=False)
    _files: list[Path] = field(default_factory=list, repr=False)
    #: Each shared file (SHARED_FILES) as it last was a regular file: its key and content.
    _shared: dict[Path, _Kept] = field(default_factory=dict, repr=False)
    #: What in the git directory git would wait on for ever, looked for after each attempt.
    _sweep: Sweep | None = field(default=None, repr=False)
    _sweeping: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def snapshot(cls, common_dir: Path) -> RepoGuard:
        """Record the guarded files (and every hook) of *common_dir* as they are now."""
        guard = cls(common_dir)
        for path in user_git_files():
            guard.user_files.append(path)
            if path.is_symlink():  # the file it leads to (now: never where a link points later)
                with contextlib.suppress(OSError, RuntimeError):
                    guard.user_files.append(path.resolve())
        guard.record()
        guard.sweep()  # the whole directory, once: later sweeps list only what changed
        return guard

    def record(self) -> None:
        """Keep every guarded file as it is now (what a later change is put back to)."""
        for path in self._paths():
            self.kept[path] = self._read(path)
        with self._lock:
            self._check_shared([])

    def _paths(self) -> list[Path]:
        """The guarded files, the user's, and every hook there is now or ever was (one
        deleted is put back), each once."""
        if not self._files:
            self._files = [self.common_dir / name for name in GUARDED_FILES]
        hooks = self.common_dir / "hooks"
        with contextlib.suppress(OSError):
            for name in os.listdir(hooks):
                if name not in self._hooks:
                    self._hooks[name] = hooks / name
        return self._files + self.user_files + [self._hooks[name] for name in sorted(self._hooks)]

    def _read(self, path: Path) -> _Kept:
        key = _key(path)
        if key is None:
            return _Kept(None, None)
        if stat.S_ISLNK(key[0]):
            return _Kept(key, None, link=os.readlink(path))
        try:
            content = read_bounded(path, _MAX_KEPT)
        except OSError:
            content = None  # a link, a FIFO, too big: cannot be put back, only removed
        return _Kept(key, content, stat.S_IMODE(key[0]))

    def check(self) -> list[Change]:
        """Compare the guarded files with the snapshot; put back and return what changed.

        A file that cannot be put back (its directory made unwritable, say) is still
        reported; the error is not raised: a guard that crashes the run helps nobody.
        """
        found: list[Change] = []
        with self._lock:
            self._check_shared(found)
            for path in self._paths():
                kept = self.kept.get(path) or _Kept(None, None)
                key = _key(path)
                if key == kept.key:
                    continue
                if key is not None and kept.key is not None and kept.content is not None:
                    with contextlib.suppress(OSError):
                        if read_bounded(path, _MAX_KEPT) == kept.content:
                            self.kept[path] = _Kept(key, kept.content, kept.mode)
                            continue  # touched, not changed
                when = _ctime(path)
                what = _describe(kept, key)
                try:
                    # The snapshot stays what it was: the key is that of the file written
                    # back, so a rewrite racing this one is found at the next check.
                    self.kept[path] = _Kept(
                        self._put_back(path, kept), kept.content, kept.mode, kept.link
                    )
                except OSError as exc:
                    what = f"{what} (and could not be put back: {exc.strerror or exc})"
                change = Change(path=path, what=what, changed_at=when)
                found.append(change)
                self.changes.append(change)
        return found

    def _check_shared(self, found: list[Change]) -> None:
        """Keep each shared file as it is while it is a regular file; put back one made
        anything else, or a HEAD gone (see SHARED_FILES). Under the lock."""
        for name in SHARED_FILES:
            path = self.common_dir / name
            last = self._shared.get(path)
            key = _key(path)
            if key is not None and stat.S_ISREG(key[0]):
                if last is None or last.key != key:
                    with contextlib.suppress(OSError):  # swapped meanwhile: the next check
                        content = read_bounded(path, _MAX_SHARED)
                        self._shared[path] = _Kept(key, content, stat.S_IMODE(key[0]))
                continue
            if key is None and (name != "HEAD" or last is None):
                # No packed-refs is a repository without packed refs: nothing to put back
                # later (what it last held may have been deleted since).
                self._shared.pop(path, None)
                continue
            if key is not None and stat.S_ISLNK(key[0]) and name == "HEAD":
                continue  # a symbolic-link HEAD (core.preferSymlinkRefs): git reads the link
            what = "deleted" if key is None else "made something other than a regular file"
            when = _ctime(path)
            try:
                if key is not None:
                    self._put_back(path, _Kept(None, None))  # what is there goes
                if last is not None and last.content is not None:
                    self._shared[path] = _Kept(self._put_back(path, last), last.content, last.mode)
            except OSError as exc:
                what = f"{what} (and could not be put back: {exc.strerror or exc})"
            change = Change(path=path, what=what, changed_at=when)
            found.append(change)
            self.changes.append(change)

    def _put_back(self, path: Path, kept: _Kept) -> _Key:
        """Make *path* what the snapshot holds (absent, its content, or its link); its key."""
        if kept.link is not None:
            link = path.with_name(f".{path.name}.{os.getpid()}.restore-link")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            os.symlink(kept.link, link)
            os.replace(link, path)
            return _key(path)
        if kept.key is None or kept.content is None:
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            return None
        # A fresh name (O_EXCL, so never through a link an agent planted), then a rename over.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".restore", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(fd, kept.mode)
                # Buffered: a write the disk takes only in part is finished or fails, never
                # put in place cut short (a config cut in two is a config git misreads).
                f.write(kept.content)
                f.flush()
                info = os.fstat(fd)
        except BaseException:
            os.unlink(tmp)
            raise
        try:
            os.replace(tmp, path)  # fails onto a directory: the copy must not stay behind
        except BaseException:
            os.unlink(tmp)
            raise
        return (info.st_mode, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def blame(self, started: float, finished: float) -> list[Change]:
        """The changes whose file changed between *started* and *finished* (``time.time()``):
        to the guarded files, and anything made in the git directory that git would wait on
        for ever (a FIFO, a device: removed, see orchestrator/stall.py)."""
        self.check()
        self.sweep()
        with self._lock:
            found = [c for c in self.changes if started - 1.0 <= c.changed_at <= finished + 1.0]
            self.blamed.update(id(c) for c in found)
            return found

    def sweep(self) -> None:
        """Remove what in the git directory git would wait on for ever (a FIFO, a device,
        a link to one: only an agent makes one there), and keep each as a change. Only the
        directories changed since the last sweep are listed again (a few ``stat`` calls)."""
        # Not under the guard's lock, which every git command's check takes: a sweep of a
        # large directory never holds those up.
        with self._sweeping:
            if self._sweep is None:
                self._sweep = Sweep(self.common_dir)
            found = self._sweep()
        if found:
            self.removed(release(found, self.common_dir))

    def removed(self, gone: Mapping[Path, float]) -> None:
        """Keep as changes the files *gone*, removed from the git directory because git
        would have waited on them for ever, with when each was made."""
        with self._lock:
            for path, made in gone.items():
                change = Change(path=path, what=_BLOCKING, changed_at=made)
                self.changes.append(change)

    def unblamed(self) -> list[str]:
        """One line per change no task was blamed for, for the report's ``warnings``."""
        self.check()
        with self._lock:
            return [
                f"{c.path} {c.what} during the run, when no agent of it was running, and was put back"
                for c in self.changes
                if id(c) not in self.blamed
            ]


def user_git_files() -> list[Path]:
    """The user's own git config, attributes and ignore files, which every git command
    reads: an agent with the user's HOME can write them as well as the repository's."""
    environ = os.environ
    return list(
        _user_git_files(
            environ.get("HOME"), environ.get("XDG_CONFIG_HOME"), environ.get("GIT_CONFIG_GLOBAL")
        )
    )


@functools.lru_cache(maxsize=8)
def _user_git_files(home: str | None, xdg: str | None, config: str | None) -> tuple[Path, ...]:
    # Asked for at each git command (orchestrator/_git.py): made once per environment.
    where = Path(home) if home else Path.home()
    conf = Path(xdg or where / ".config") / "git"
    files = [where / ".gitconfig", conf / "config", conf / "attributes", conf / "ignore"]
    return (*files, Path(config)) if config else tuple(files)


def _ctime(path: Path) -> float:
    """When *path* last changed: its status-change time, which, unlike its modification
    time, no process can set back."""
    for where in (path, path.parent):  # a deleted file: when its directory changed
        with contextlib.suppress(OSError):
            return os.lstat(where).st_ctime
    return time.time()


def _describe(kept: _Kept, key: _Key) -> str:
    if kept.key is None:
        return "added"
    if key is None:
        return "deleted"
    return "changed"


async def ref_values(git: Git) -> dict[str, str]:
    """Every ref of the repository and the object it names (one git command); GitError when
    git fails or takes longer than ``LIST_REFS_TIMEOUT_S`` (orchestrator/_git.py), then
    naming what among the refs is not a regular file (a FIFO someone left there), if any."""
    from ._git import LIST_REFS_TIMEOUT_S  # (which imports this module)

    try:
        out = await git.out(
            "for-each-ref", "--format=%(refname) %(objectname)", timeout=LIST_REFS_TIMEOUT_S
        )
    except GitError as exc:
        if git.common_dir is None or exc.returncode != -9:
            raise
        blocking = await anyio.to_thread.run_sync(_not_regular, git.common_dir)
        if not blocking:
            raise
        named = ", ".join(str(p) for p in blocking[:5]) + (" ..." if len(blocking) > 5 else "")
        raise GitError(
            exc.command,
            exc.returncode,
            f"{exc.stderr}\nfatal: not regular files, which git blocks on: {named}; "
            "remove them (nothing is stored in a FIFO)",
        ) from None
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def _not_regular(common_dir: Path, limit: int = 100_000) -> list[Path]:
    """What in *common_dir*'s ``packed-refs``, ``refs/`` and ``logs/refs/`` git would open
    as something other than a regular file (a FIFO, or a link to one, blocks git for ever);
    at most *limit* entries are looked at."""
    found: list[Path] = []
    seen = 0
    packed = common_dir / "packed-refs"
    with contextlib.suppress(OSError):
        if not stat.S_ISREG(os.lstat(packed).st_mode):
            found.append(packed)
    for top in (common_dir / "refs", common_dir / "logs" / "refs"):
        for directory, _, files in os.walk(top):  # links to directories are not followed
            for name in files:
                seen += 1
                if seen > limit:
                    return found
                path = Path(directory, name)
                with contextlib.suppress(OSError):  # gone, or a dangling link: opens nothing
                    if not stat.S_ISREG(os.stat(path).st_mode):  # a link: what it leads to
                        found.append(path)
    return found


#: Refs that the orchestrator moves itself, or that other runs move: not reported.
_OWN_REFS = ("refs/heads/orchestrator/", "refs/orchestrator/")


def moved_refs(
    before: Mapping[str, str],
    after: Mapping[str, str],
    results: Iterable[TaskResult | Brief],
) -> list[str]:
    """What moved while a run ran that no task of it moved: one line each, for the report.

    Refs outside the orchestrator's own that changed, appeared or went; and task branches of
    this run that no longer point at their task's result (*results*: the results, or what
    the run kept of them).
    """
    found: list[str] = []
    for ref in sorted(before.keys() | after.keys()):
        if ref.startswith(_OWN_REFS) or before.get(ref) == after.get(ref):
            continue
        was, now = before.get(ref), after.get(ref)
        if was is None:
            found.append(f"{ref} was created during the run (at {now}); no task of it made it")
        elif now is None:
            found.append(f"{ref} was deleted during the run (was {was})")
        else:
            found.append(f"{ref} moved during the run from {was} to {now}; no task of it moved it")
    for result in results:
        if isinstance(result, Brief):
            commit = result.result_commit
        else:
            commit = result.provenance.result_commit
        if result.branch is None or commit is None:
            continue
        now = after.get(f"refs/heads/{result.branch}")
        if now != commit:
            found.append(
                f"branch {result.branch} of task {result.task_id} points at {now}, "
                f"not at its result {commit}: moved by another process"
            )
    return found
