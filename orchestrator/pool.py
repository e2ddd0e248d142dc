"""The worktree pool: checked-out worktrees that tasks borrow and give back.

A fresh worktree costs a checkout: writing every file of the repository (about 350 ms for
2,000 files). A worktree that another task used is brought to any commit by writing only
what differs from it (orchestrator/recycle.py: one walk of the tree against the slot's
private index, which no sandboxed agent can write). The pool keeps such worktrees between tasks and
between runs, in ``<state>/pool/worktrees/<slot>``, each with a lock file ``<slot>.mutex``
(not ``.lock``: that is what git's own lock files are called) and its private index
``<slot>.index``:

- **borrow**: take a slot whose lock nobody holds (``flock``, so two orchestrators on one
  repository never share a slot, and a dead one's slots come free), create the task's branch
  at its start commit (create-only), point the slot's HEAD at it, strip the slot's admin
  directory of everything a fresh ``worktree add`` would not have (a merge or rebase in
  progress, ``config.worktree``, sparse-checkout settings), and make the files exactly that
  commit's (:func:`~orchestrator.recycle.catch_up`: untracked and ignored files, nested
  repositories and empty directories removed, changed files written again; or, without a
  usable private index, every file written anew). A slot that cannot be made pristine is
  removed and the task gets a fresh worktree instead. The task's result is the same as with
  a fresh worktree: the same files, the same branch, the same commits.
- **give back**: detach the slot's HEAD (so the task's branch is checked out nowhere) and let
  go of the lock. A worktree kept for inspection (``keep_worktrees``) is not given back: it is
  moved out of the pool to where a fresh one would have been.
- **bounded**: at most ``size`` slots; a task that finds none free and the pool full gets a
  fresh worktree outside the pool, removed after it as without a pool.
- **collected**: ``orchestrator gc`` removes slots idle for longer than its age limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import psutil

from envelopes import digest, hash_file, is_object_id, read_bounded

from ._faults import crash_point
from ._fs import remove_tree
from .errors import GitError, VenvError
from .locks import try_lock
from .process import kill_processes
from .recycle import catch_up, forget_private_index, private_index, record, reset_whole
from .repo import Repository
from .venv import UvBackend, Venv, VenvBackend, base_python, describe_environment, setup_virtualenv
from .worktree import (
    Worktree,
    admin_dir_by_scan,
    admin_dir_from_file,
    create_worktree,
    drop_admin_dir,
    restore_dot_git,
    rewind_branch,
)

__all__ = [
    "Slots",
    "VenvPool",
    "WorktreePool",
    "collect_pool",
    "detach_dead_slots",
    "pool_dir",
    "venv_pool_dir",
]

#: What a fresh ``git worktree add --no-checkout`` leaves in a worktree's admin directory
#: that a borrower keeps: anything else there (the reflog, through which ``@{-1}`` would reach
#: earlier tasks' commits, a merge in progress, ``config.worktree``) is a task's leftover.
_FRESH_ADMIN = frozenset({"HEAD", "commondir", "gitdir", "index"})


def pool_dir(state_dir: Path) -> Path:
    """Where the pool's worktree slots live."""
    return state_dir / "pool" / "worktrees"


def venv_pool_dir(state_dir: Path) -> Path:
    """Where the pool's venv slots live, one directory per requirement set."""
    return state_dir / "pool" / "venvs"


def _try_lock(lock_path: Path) -> int | None:
    """Take the slot lock without waiting; its fd, or None when another holds it or it is gone."""
    try:
        return try_lock(lock_path)
    except OSError:  # cannot be opened, or removed with its slot meanwhile (LockFileGone)
        return None


def _lock_of(slot: Path) -> Path:
    return slot.with_name(slot.name + ".mutex")


def _kept_mark(slot: Path) -> Path:
    return slot.with_name(slot.name + ".kept")


def _mark_in_use(fd: int, slot: Path) -> None:
    """Note in the slot's lock file that it is lent; a proper give-back empties it.

    Found non-empty by the next borrower, it means the holder died with the slot: agent
    processes of its task may still be running in it, and are killed before anyone else
    works there (a dead orchestrator's flock goes with it, its agents do not).
    """
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_size:
            _kill_processes_in(slot)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _kill_processes_in(path: Path) -> None:
    """SIGKILL every process whose working directory is *path* or below it."""
    inside = str(path)

    def works_there(process: psutil.Process) -> bool:
        cwd = process.cwd()
        # Not mutated by tools/mutation.py: `cwd != inside` would SIGKILL every other process
        # this user may signal, the mutation run's and everyone else's on the machine.
        return cwd == inside or cwd.startswith(inside + "/")  # pragma: no mutate

    kill_processes(works_there)


class Slots:
    """Directories in *root*, each lent to one holder at a time (``flock`` on ``<slot>.mutex``).

    At most *size* slots (new ones are refused beyond that; across processes the bound is
    approximate). A slot marked ``<slot>.kept`` is never lent again.
    """

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        self._held: dict[Path, int] = {}  # slot path -> its lock fd
        self._making: set[Path] = set()  # slots this process is making, maybe not on disk yet

    def all(self) -> list[Path]:
        """Every slot directory on disk, held or not."""
        try:
            return sorted(p for p in self.root.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def take_free(self) -> Path | None:
        """A slot nobody holds, now held by this process; None when there is none."""
        for slot in self.all():
            if slot in self._held or _kept_mark(slot).exists():
                continue
            fd = _try_lock(_lock_of(slot))
            if fd is not None:
                # Marked kept by another process between the look and the lock: not ours.
                if slot.is_dir() and not _kept_mark(slot).exists():
                    self._held[slot] = fd
                    _mark_in_use(fd, slot)
                    return slot
                os.close(fd)
        return None

    def reserve(self) -> Path | None:
        """A new slot path with its lock held, when there is room; :meth:`made` once it exists."""
        if self.size <= 0 or len(self._making.union(self.all())) >= self.size:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        slot = self.root / secrets.token_hex(4)
        fd = _try_lock(_lock_of(slot))
        if fd is None:
            return None
        self._held[slot] = fd
        self._making.add(slot)
        _mark_in_use(fd, slot)
        return slot

    def made(self, slot: Path) -> None:
        """The reserved *slot* exists on disk now (or never will: it was released)."""
        self._making.discard(slot)

    def holds(self, slot: Path) -> bool:
        return slot in self._held

    def held(self) -> list[Path]:
        """The slots this process holds."""
        return list(self._held)

    def adopt(self, slot: Path, fd: int) -> None:
        """Hold *slot* through *fd*, a lock on it taken by the caller (gc's collection)."""
        self._held[slot] = fd

    def release(self, slot: Path, *, forget: bool = False) -> None:
        """Let go of *slot*; with *forget*, its lock file goes too (the slot is gone)."""
        fd = self._held.pop(slot, None)
        lock = _lock_of(slot)
        if forget:
            forget_private_index(slot)
            lock.unlink(missing_ok=True)
        elif fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # given back properly (see _mark_in_use)
                os.utime(lock)  # when the slot was last used: gc's measure of idleness
        if fd is not None:
            os.close(fd)

    def mark_kept(self, slot: Path) -> None:
        """Never lend *slot* again (it holds a kept task's files), and let go of it."""
        with contextlib.suppress(OSError):
            _kept_mark(slot).touch()
        self.release(slot)

    def close(self) -> None:
        """Let go of every slot still held (a run that ends abruptly)."""
        for slot in list(self._held):
            self.release(slot)


async def _collect_slots(
    root: Path,
    idle_for: float,
    remove: Callable[[Path], Awaitable[None]],
    *,
    what: str,
    dry_run: bool,
) -> list[str]:
    """Remove the idle slots of *root* (each while holding its lock) with *remove*."""
    done: list[str] = []
    now = time.time()
    slots = Slots(root, size=0)
    for slot in slots.all():
        lock = _lock_of(slot)
        try:
            idle = now - lock.stat().st_mtime
        except FileNotFoundError:
            idle = float("inf")
        if idle < idle_for:
            continue
        fd = _try_lock(lock)
        if fd is None:
            continue  # in use
        if dry_run:
            if idle == float("inf"):
                # The lock was made by this look: left behind, it would make the slot look
                # just used, and the gc that follows would not remove it.
                lock.unlink(missing_ok=True)
            os.close(fd)
            done.append(f"would remove pool {what} {slot}")
            continue
        slots.adopt(slot, fd)
        await remove(slot)
        if slot.exists():  # a file that cannot be deleted: never lent (the next gc tries again)
            with contextlib.suppress(OSError):
                _kept_mark(slot).touch()
        else:
            _kept_mark(slot).unlink(missing_ok=True)
        slots.release(slot, forget=True)
        done.append(f"removed pool {what} {slot}")
    with contextlib.suppress(FileNotFoundError):
        for lock in root.glob("*.mutex"):
            if not lock.with_suffix("").is_dir() and not dry_run:
                fd = _try_lock(lock)
                if fd is not None:
                    forget_private_index(lock.with_suffix(""))
                    lock.unlink(missing_ok=True)
                    os.close(fd)
    return done


class WorktreePool:
    """The worktree pool of one repository, as one run uses it (see the module docstring)."""

    def __init__(self, repo: Repository, size: int) -> None:
        self.repo = repo
        self.size = size
        self.slots = Slots(pool_dir(repo.state_dir), size)
        #: How many worktrees were recycled from the pool, and how many made in it.
        self.recycled = 0
        self.created = 0
        #: The digest of each slot's private index as this process last left it.
        self._indexes: dict[Path, str | None] = {}

    def owns(self, worktree: Worktree) -> bool:
        """Whether *worktree* is a slot this pool lent."""
        return self.slots.holds(worktree.path)

    async def borrow(
        self,
        branch: str,
        base_commit: str,
        base_tree: str | None = None,
        sparse: tuple[str, ...] | None = None,
    ) -> Worktree | None:
        """A pristine worktree on a new branch *branch* at *base_commit* (whose tree is
        *base_tree*, when known), holding the directories *sparse* (None: all), or None (none
        free). A slot last used for another sparse set is written whole for this one.

        GitError when the branch cannot be created (it exists): the slot is given back.
        """
        if self.size <= 0:
            return None
        slot = await anyio.to_thread.run_sync(self.slots.take_free)
        if slot is None:
            return None
        admin = admin_dir_from_file(slot)
        if admin is None or not (admin / "gitdir").is_file():
            with anyio.CancelScope(shield=True):
                await self.discard(slot)
            return None
        if admin.parent != self.repo.common_dir / "worktrees" or _gitdir_of(admin) != slot:
            # Another repository's slot (a state directory shared between repositories),
            # or a .git file pointing at another slot's entry: left alone.
            self.slots.release(slot)
            return None
        ref = f"refs/heads/{branch}"
        made = False
        worktree = Worktree(
            path=slot, branch=branch, base_commit=base_commit, admin_dir=admin, sparse=sparse
        )
        try:
            await self.repo.git.update_ref(ref, base_commit, "")
            made = True
            await anyio.to_thread.run_sync(_strip_admin_dir, admin, branch)
            crash_point("worktree")  # the branch made, the files not yet the base's
            await restore_dot_git(worktree)
            await self._make_pristine(worktree, base_tree)
        except BaseException as exc:
            # Not made pristine (a file the agent made undeletable, say), or cancelled: the
            # slot goes, and so does the branch, so that the task can start in a fresh
            # worktree instead.
            with anyio.CancelScope(shield=True):
                if made:
                    await self.repo.git.update_ref(ref, None, base_commit, check=False)
                if isinstance(exc, GitError) and not made:
                    self.slots.release(slot)  # the branch exists: the caller's error
                    raise
                await self.discard(slot)
            if isinstance(exc, Exception):
                return None  # not made pristine: a fresh worktree instead
            raise
        self.recycled += 1
        return worktree

    async def _make_pristine(self, worktree: Worktree, base_tree: str | None) -> None:
        """Catch the slot up from its private index, or write it whole; remember the index.

        Without a sandbox an agent runs as the user and could rewrite the private index
        beside its slot too: one that is not what this process last left there is not
        trusted (across processes, only its note's stat data vouch for it)."""
        slot, index = worktree.path, private_index(worktree.path)
        remembered = self._indexes.pop(slot, None)
        intact = remembered is None or remembered == await _digest_of(index)
        if not intact or not await catch_up(self.repo, worktree, index, base_tree):
            await reset_whole(self.repo, worktree, index, base_tree)
        self._indexes[slot] = await _digest_of(index)

    async def reset(self, worktree: Worktree, base_tree: str | None = None) -> None:
        """Bring a lent slot back to its start commit (whose tree is *base_tree*, when known)
        for a retry: its branch rewound, its files caught up from its private index (see
        orchestrator/recycle.py). GitError when it cannot be made pristine."""
        await rewind_branch(self.repo, worktree)
        try:
            await self._make_pristine(worktree, base_tree)
        except OSError as exc:
            raise GitError(["worktree"], 1, f"fatal: cannot reset {worktree.path}: {exc}") from exc

    async def create(
        self,
        branch: str,
        base_commit: str,
        base_tree: str | None = None,
        sparse: tuple[str, ...] | None = None,
    ) -> Worktree | None:
        """A fresh worktree made in a new slot (at *base_commit*, whose tree is *base_tree*
        when known, holding *sparse*), or None when the pool is full."""
        slot = self.slots.reserve()
        if slot is None:
            return None
        try:
            worktree = await create_worktree(self.repo, branch, slot, base_commit, sparse)
        except BaseException:
            self.slots.release(slot, forget=True)
            raise
        finally:
            self.slots.made(slot)
        # The worktree is made and the task's: a cancellation now must not leave it behind
        # half-recorded (two file copies, milliseconds).
        with anyio.CancelScope(shield=True):
            index = private_index(slot)
            try:
                await record(worktree, index, base_tree)
                self._indexes[slot] = await _digest_of(index)
            except OSError:
                forget_private_index(slot)  # its next borrower writes it whole
        self.created += 1
        return worktree

    async def give_back(self, worktree: Worktree) -> None:
        """Detach the slot's HEAD and let go of it; the next borrower resets its files."""
        slot = worktree.path
        try:
            await anyio.to_thread.run_sync(_detach, worktree)
        except OSError:
            await self.discard(slot)
            return
        self.slots.release(slot)

    async def keep(self, worktree: Worktree, target: Path) -> Worktree:
        """Move a lent worktree out of the pool to *target* (kept for inspection)."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            async with self.repo.lock.hold():
                await self.repo.git.run("worktree", "move", str(worktree.path), str(target))
        except (GitError, OSError):
            # Kept where it is, marked so that no one borrows it; gc removes it when idle.
            self.slots.mark_kept(worktree.path)
            return worktree
        self.slots.release(worktree.path, forget=True)
        admin = admin_dir_from_file(target) or worktree.admin_dir
        return dataclasses.replace(worktree, path=target, admin_dir=admin)

    async def discard(self, slot: Path) -> None:
        """Remove a held slot: its files, its admin entry, its lock."""
        self._indexes.pop(slot, None)
        await _remove_worktree_slot(self.repo, slot)
        self.slots.release(slot, forget=True)

    def close(self) -> None:
        """Let go of every slot still held, detached (a run whose clean-up ran out of time)."""
        for slot in self.slots.held():
            admin = admin_dir_from_file(slot)
            if admin is not None and admin.parent == self.repo.common_dir / "worktrees":
                with contextlib.suppress(OSError, ValueError):
                    if (head := _head_commit(admin)) is not None:
                        (admin / "HEAD").write_text(head, encoding="utf-8")
        self.slots.close()


async def _digest_of(path: Path) -> str | None:
    """The SHA-256 of the file at *path* (never through a link), or None when unreadable."""

    def read() -> str | None:
        try:
            return hash_file(path, 1 << 40)[0]
        except OSError:
            return None

    return await anyio.to_thread.run_sync(read)


#: Longest HEAD or loose ref, and longest ``packed-refs``, a slot's detaching reads: files an
#: agent working in the slot could have replaced (a FIFO, a huge file, bytes not UTF-8).
_MAX_REF_BYTES = 4096
_MAX_PACKED_REFS_BYTES = 64 << 20

#: A branch name a slot's HEAD may name: ``refs/heads/`` and components of git's usual
#: characters, none of them ``.`` or ``..`` (so that it names no file outside the refs).
_BRANCH_REF = re.compile(r"refs/heads(/(?!\.\.?(/|$))[A-Za-z0-9._@+-]+)+")


def _ref_text(path: Path, limit: int = _MAX_REF_BYTES) -> str:
    """A ref file's text: a regular file (never followed, never a FIFO) of at most *limit*
    bytes, UTF-8. Raises OSError (UnsafeFile included) or ValueError (not UTF-8)."""
    return read_bounded(path, limit).decode("utf-8")


def _head_commit(admin: Path) -> str | None:
    """HEAD detached where it is now (resolved from the loose or packed ref), unchanged when
    already detached, or None (nowhere to detach it to) when HEAD names no branch a slot's
    could be (see _BRANCH_REF), its branch is gone, or what it names is not a commit id."""
    head = _ref_text(admin / "HEAD")
    if not head.startswith("ref: "):
        return head
    name = head.removeprefix("ref: ").strip()
    if _BRANCH_REF.fullmatch(name) is None:
        return None
    common = Path(_ref_text(admin / "commondir").strip())
    common = common if common.is_absolute() else (admin / common).resolve()
    with contextlib.suppress(FileNotFoundError):
        commit = _ref_text(common / name).strip()
        return f"{commit}\n" if is_object_id(commit) else None
    # Packed since (a gc): "<id> <name>" lines, among a header and "^<id>" lines.
    with contextlib.suppress(OSError, ValueError):
        for line in _ref_text(common / "packed-refs", _MAX_PACKED_REFS_BYTES).splitlines():
            commit, _, packed = line.partition(" ")
            if packed == name:
                return f"{commit}\n" if is_object_id(commit) else None
    return None


async def _remove_worktree_slot(repo: Repository, slot: Path) -> None:
    # By the .git file, or, when the agent replaced it, by the entry that points here.
    admin = admin_dir_from_file(slot) or admin_dir_by_scan(repo, slot)
    await anyio.to_thread.run_sync(remove_tree, slot, True)
    async with repo.lock.hold():
        await drop_admin_dir(repo, admin)


def _gitdir_of(admin: Path) -> Path | None:
    """The worktree an admin entry belongs to (its ``gitdir`` file names ``<worktree>/.git``)."""
    try:
        return Path((admin / "gitdir").read_text(encoding="utf-8").strip()).parent
    except OSError:
        return None


def _strip_admin_dir(admin: Path, branch: str) -> None:
    """Leave in *admin* only what a fresh ``worktree add`` makes, with HEAD on *branch*."""
    for entry in admin.iterdir():
        if entry.name in _FRESH_ADMIN:
            continue
        if entry.is_dir() and not entry.is_symlink():
            remove_tree(entry)
        else:
            entry.unlink()
    (admin / "HEAD").write_text(f"ref: refs/heads/{branch}\n", encoding="utf-8")


def _detach(worktree: Worktree) -> None:
    """Point the slot's HEAD at its start commit, detached: its branch is checked out nowhere."""
    (worktree.admin_dir / "HEAD").write_text(f"{worktree.base_commit}\n", encoding="utf-8")


def detach_dead_slots(state_dir: Path, run_id: str) -> list[Path]:
    """Detach the HEAD of every slot nobody holds that still names a branch of run *run_id*.

    A run killed while a task held a slot leaves the slot's HEAD on the task's branch, and
    the crash may have come before the journal recorded where the task worked. A resume
    calls this (after the dead run's agents are killed) so that the branch is checked out
    nowhere before it is cleared, and no slot names it afterwards. Returns the slots it
    detached. Blocking.
    """
    prefix = f"ref: refs/heads/orchestrator/{run_id}/"
    detached: list[Path] = []
    for slot in Slots(pool_dir(state_dir), 0).all():
        admin = admin_dir_from_file(slot)
        try:
            if admin is None or not _ref_text(admin / "HEAD").startswith(prefix):
                continue
        except (OSError, ValueError):  # gone, or made unreadable by the agent: not touched
            continue
        fd = _try_lock(_lock_of(slot))
        if fd is None:
            continue  # held by a live process: not the dead run's
        try:
            with contextlib.suppress(OSError, ValueError):
                head = _head_commit(admin)
                if head is not None:
                    (admin / "HEAD").write_text(head, encoding="utf-8")
                    detached.append(slot)
        finally:
            os.close(fd)  # the mark stays: the next borrower still kills what works there
    return detached


async def collect_pool(repo: Repository, *, idle_for: float, dry_run: bool = False) -> list[str]:
    """Remove the pool's worktrees and venvs that nobody holds, idle for over *idle_for* seconds."""

    async def remove_worktree_slot(slot: Path) -> None:
        await _remove_worktree_slot(repo, slot)

    async def remove_venv_slot(slot: Path) -> None:
        await anyio.to_thread.run_sync(remove_tree, slot, True)

    done = await _collect_slots(
        pool_dir(repo.state_dir), idle_for, remove_worktree_slot, what="worktree", dry_run=dry_run
    )
    for key_dir in Slots(venv_pool_dir(repo.state_dir), 0).all():
        done += await _collect_slots(
            key_dir, idle_for, remove_venv_slot, what="venv", dry_run=dry_run
        )
        with contextlib.suppress(OSError):
            if not dry_run and not any(key_dir.iterdir()):
                key_dir.rmdir()
    return done


@dataclass
class _Resolution:
    """One requirement set, as this run installed it: the exact distributions it came to."""

    done: anyio.Event = field(default_factory=anyio.Event)
    packages: frozenset[str] | None = None
    error: VenvError | None = None


def _poolable(requirements: Sequence[str]) -> bool:
    """Requirements whose installed form is named by their distributions' names and versions.

    A local path, a URL or an option could change content under the same version, so venvs
    made from them are never pooled.
    """
    return not any(
        r.startswith(("-", ".", "/", "~")) or "/" in r or "@" in r or "\\" in r
        for r in requirements
    )


def _packages(path: Path, backend: str) -> frozenset[str]:
    return frozenset(describe_environment(Venv(path, backend)).packages)


async def _remove_venv_slot(slots: Slots, slot: Path) -> None:
    """Delete the held *slot* and let go of it. One that cannot be deleted whole (a file an
    agent made undeletable) is marked never to be lent again: lent, it would be an agent's
    venv trusted by the next borrower, or (no longer a venv) taken and removed again and
    again by a borrower that never gets past it. gc removes it when it can."""
    await anyio.to_thread.run_sync(remove_tree, slot, True)
    if slot.exists():
        slots.mark_kept(slot)
    else:
        slots.release(slot, forget=True)


class VenvPool:
    """Venvs kept between tasks and runs, one set of slots per requirement set (and per
    ``seed``: a venv with pip is never lent to a task that asked for none, nor the reverse).

    Within a run, the first task needing a requirement set installs it (the one installer
    run for that set); the exact distributions it came to are then the set's definition.
    Every other task of that set borrows a slot whose distributions are exactly those (read
    from disk: no subprocess), or one brought back to them with ``uv pip sync`` (offline: the
    wheels are in uv's cache), or a new venv synced the same way. A slot that cannot be
    brought back is removed.
    """

    def __init__(self, state_dir: Path, backend: VenvBackend, size: int) -> None:
        self.root = venv_pool_dir(state_dir)
        self.backend = backend
        self.size = size
        self._slots: dict[str, Slots] = {}
        self._sets: dict[str, _Resolution] = {}
        #: Venvs lent from the pool as they were, lent after a sync, and newly made.
        self.recycled = 0
        self.synced = 0
        self.created = 0

    def _key(self, requirements: Sequence[str], seed: bool) -> str:
        identity: dict[str, object] = {
            "python": base_python(),
            "backend": self.backend.name,
            "requirements": sorted(requirements),
        }
        if seed:  # only when set: the slots of unseeded sets keep the key they had
            identity["seed"] = True
        return digest(identity)[:16]

    def owns(self, venv: Venv) -> bool:
        """Whether *venv* is a slot this pool lent."""
        slots = self._slots.get(venv.path.parent.name)
        return slots is not None and slots.holds(venv.path)

    async def acquire(
        self, requirements: Sequence[str], *, cwd: Path, fallback: Path, seed: bool = False
    ) -> Venv:
        """A venv with exactly *requirements* installed (and pip, with *seed*): from the pool,
        or made at *fallback*.

        Raises VenvError as :func:`setup_virtualenv` does.
        """
        if self.size <= 0 or not _poolable(requirements):
            return await setup_virtualenv(
                fallback, requirements, backend=self.backend, cwd=cwd, seed=seed
            )
        key = self._key(requirements, seed)
        slots = self._slots.setdefault(key, Slots(self.root / key, self.size))
        packages: frozenset[str] = frozenset()
        # A seeded venv's distributions (pip's version...) are known once one is made: its
        # set is resolved as a requirement set is, even when empty.
        if requirements or seed:
            while True:
                state = self._sets.get(key)
                if state is None:
                    return await self._resolve(key, slots, requirements, cwd, fallback, seed)
                await state.done.wait()
                if state.error is not None:
                    raise VenvError(str(state.error), commands=list(state.error.commands))
                if state.packages is not None:
                    packages = state.packages
                    break
                # The task that was installing was cancelled: another one installs.
        return await self._lend(slots, packages, requirements, cwd, fallback, seed)

    async def _resolve(
        self,
        key: str,
        slots: Slots,
        requirements: Sequence[str],
        cwd: Path,
        fallback: Path,
        seed: bool,
    ) -> Venv:
        """Install *requirements* once for this run, in a new slot (or at *fallback*)."""
        state = self._sets[key] = _Resolution()
        slot = slots.reserve()
        try:
            venv = await setup_virtualenv(
                slot or fallback, requirements, backend=self.backend, cwd=cwd, seed=seed
            )
            state.packages = await anyio.to_thread.run_sync(_packages, venv.path, self.backend.name)
        except BaseException as exc:
            if slot is not None:
                slots.release(slot, forget=True)
            if isinstance(exc, VenvError):
                state.error = exc
            else:
                del self._sets[key]  # cancelled (or a bug): let a waiting task try
            raise
        finally:
            if slot is not None:
                slots.made(slot)
            state.done.set()
        self.created += slot is not None
        return venv

    async def _lend(
        self,
        slots: Slots,
        packages: frozenset[str],
        requirements: Sequence[str],
        cwd: Path,
        fallback: Path,
        seed: bool,
    ) -> Venv:
        name = self.backend.name
        while (slot := await anyio.to_thread.run_sync(slots.take_free)) is not None:
            try:
                found = await anyio.to_thread.run_sync(_packages, slot, name)
                if found == packages:
                    self.recycled += 1
                    return Venv(slot, name)
                if isinstance(self.backend, UvBackend):
                    command = await self.backend.sync(slot, sorted(packages))
                    if await anyio.to_thread.run_sync(_packages, slot, name) == packages:
                        self.synced += 1
                        return Venv(slot, name, commands=[command])
            except (VenvError, OSError):
                pass
            await _remove_venv_slot(slots, slot)
        slot = slots.reserve()
        path = slot or fallback
        try:
            if isinstance(self.backend, UvBackend):
                venv = await setup_virtualenv(path, (), backend=self.backend, seed=seed)
                if packages:
                    command = await self.backend.sync(path, sorted(packages))
                    venv = Venv(path, name, commands=[*venv.commands, command])
            else:
                venv = await setup_virtualenv(
                    path, requirements, backend=self.backend, cwd=cwd, seed=seed
                )
        except BaseException:
            if slot is not None:
                await _remove_venv_slot(slots, slot)
            raise
        finally:
            if slot is not None:
                slots.made(slot)
        self.created += slot is not None
        return venv

    def give_back(self, venv: Venv) -> None:
        """Let go of a lent venv; the next borrower checks (and syncs) its distributions."""
        self._slots[venv.path.parent.name].release(venv.path)

    def keep(self, venv: Venv) -> None:
        """Never lend *venv* again: it stays beside the worktree kept for inspection."""
        self._slots[venv.path.parent.name].mark_kept(venv.path)

    async def discard(self, venv: Venv) -> None:
        """Delete a lent venv and its slot: what used it is not trusted with the next borrower.

        A sandboxed agent may write its venv (``bin/python`` included); lent again, that venv
        would run the agent's code outside the sandbox, at the next ``uv pip sync``.
        """
        await _remove_venv_slot(self._slots[venv.path.parent.name], venv.path)

    def close(self) -> None:
        """Let go of every slot still held."""
        for slots in self._slots.values():
            slots.close()
