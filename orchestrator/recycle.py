"""Bringing a used worktree to a commit by touching only what differs from it.

A pool slot (orchestrator/pool.py) is lent to one task after another. Each borrower must find
exactly the files a fresh checkout of its start commit would hold. ``git reset --hard`` and
``git clean -ffdx`` get there, but each walks the whole tree, and ``reset`` trusts the stat
data of the worktree's index, which the previous task's agent could write: an entry given the
stat data of a file the agent changed hides that change from ``reset``.

So each slot has a **private index** (``<slot>.index`` beside the slot, outside the worktree
and outside any sandbox's writable places), written only by the orchestrator's git: by the
checkout that made the slot, and by each catch-up since. It records the tree the files were
last made to be, with the stat data git saw then. Catching up is then:

1. ``git write-tree`` on the private index: the tree the files were last made to be;
2. one walk, ``git ls-files -t -m -d -o --directory``: the tracked files that differ from it
   (content, mode, type, gone) and everything untracked or ignored (files, empty directories,
   nested repositories, links);
3. the untracked entries removed (never through a link), the changed ones checked out again
   (``checkout-index -f -u``);
4. when the start commit is another tree, ``git read-tree -m -u`` from that tree to it, which
   writes only the files that differ between the two;
5. the private index copied over the worktree's own, whose stat data is then git's again.

A listing too large to hold (more than :data:`LISTING_LIMIT` bytes), a private index that is
missing or unreadable, or any step failing: :func:`catch_up` returns False and the caller
falls back to :func:`reset_whole`, which does not trust the worktree's index at all (it is
removed, so every file is written anew), then writes a new private index.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

import anyio

from envelopes import is_object_id, read_bounded

from ._fs import replace_file
from .errors import GitError
from .repo import Repository
from .worktree import Worktree

__all__ = [
    "LISTING_LIMIT",
    "catch_up",
    "forget_private_index",
    "private_index",
    "record",
    "remove_entries",
    "reset_whole",
]

#: The most bytes of ``ls-files`` output a catch-up reads; past it, :func:`reset_whole`.
LISTING_LIMIT = 16 << 20

#: How long one git command of a catch-up may take (it reads what an agent left: a tree of
#: millions of files, say) before it is killed and the slot removed.
_TIMEOUT = 600.0


def private_index(slot: Path) -> Path:
    """Where the private index of the pool slot *slot* lives (beside it, not in it)."""
    return slot.with_name(slot.name + ".index")


def forget_private_index(slot: Path) -> None:
    """Remove the private index of *slot* and its note (the slot is gone, or leaves the pool)."""
    index = private_index(slot)
    index.unlink(missing_ok=True)
    _tree_note(index).unlink(missing_ok=True)


def _index_env(worktree: Worktree, index: Path) -> dict[str, str]:
    return {**worktree.git_env(), "GIT_INDEX_FILE": str(index)}


async def catch_up(
    repo: Repository, worktree: Worktree, index: Path, tree: str | None = None
) -> bool:
    """Make *worktree*'s files and index exactly its start commit's (whose tree is *tree*,
    when the caller knows it), from the private *index*.

    Returns False when the private index cannot be used (see the module docstring): nothing
    is then known of the files, and the caller resets them whole. GitError or OSError when a
    file cannot be removed or written: the slot cannot be made pristine.
    """
    try:
        info = os.lstat(index)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode):
        return False
    git, args, slot = repo.git, worktree.git_args(), worktree.path
    env = _index_env(worktree, index)
    previous = _recorded_tree(index, info)
    # From here until the private index is final, no record says what tree it holds.
    _tree_note(index).unlink(missing_ok=True)
    listings: dict[str, bytes | None] = {}

    async def list_into(name: str, *command: str) -> None:
        try:
            out, cut = await git.read(
                *args, *command, stdin=b"", limit=LISTING_LIMIT, timeout=_TIMEOUT, env=env, cwd=slot
            )
        except GitError:
            cut = True
        listings[name] = None if cut else out  # None: too much to hold, or git failed

    if previous is None:
        try:
            previous = await git.out(*args, "write-tree", cwd=slot, env=env)
        except GitError:
            return False
    # The two halves of one walk, side by side: the tracked files that differ from the index
    # (any stat change counts: such a file is written again), and everything git does not
    # track, ignored or not (empty directories and nested repositories whole).
    async with anyio.create_task_group() as tg:
        tg.start_soon(list_into, "changed", "diff-files", "--name-only", "-z")
        tg.start_soon(list_into, "untracked", "ls-files", "-z", "-o", "--directory")
    if listings["changed"] is None or listings["untracked"] is None:
        return False
    untracked = [e for e in listings["untracked"].split(b"\0") if e]
    changed = [e for e in listings["changed"].split(b"\0") if e]
    if untracked:
        await anyio.to_thread.run_sync(remove_entries, slot, untracked)
    if changed:
        await git.run(
            *args,
            "checkout-index",
            "-f",
            "-u",
            "-z",
            "--stdin",
            cwd=slot,
            env=env,
            stdin=b"".join(p + b"\0" for p in changed),
            timeout=_TIMEOUT,
        )
    if tree is None:
        tree = await git.out(
            "rev-parse", "--verify", "--end-of-options", f"{worktree.base_commit}^{{tree}}"
        )
    if tree != previous:
        # Two-way read-tree: from the tree the files are now to the start's, writing only
        # the files that differ between the two.
        await git.run(
            *args,
            "read-tree",
            "-m",
            "-u",
            "--end-of-options",
            previous,
            tree,
            cwd=slot,
            env=env,
            timeout=_TIMEOUT,
        )
    await anyio.to_thread.run_sync(_finish, index, tree, worktree.admin_dir / "index")
    return True


def _tree_note(index: Path) -> Path:
    """Where the tree the private *index* holds is noted, with the index's stat data then."""
    return index.with_suffix(".tree")


def _recorded_tree(index: Path, info: os.stat_result) -> str | None:
    """The tree noted for *index*, if the note is there and *index* is as it was then."""
    try:
        words = read_bounded(_tree_note(index), 256).decode("ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(words) == 4 and words[1:] == _identity(info) and is_object_id(words[0]):
        return words[0]
    return None


def _identity(info: os.stat_result) -> list[str]:
    return [str(info.st_size), str(info.st_mtime_ns), str(info.st_ino)]


def _finish(index: Path, tree: str, admin_index: Path) -> None:
    """Note that the private *index* holds *tree*, and copy it over the worktree's."""
    note = " ".join([tree, *_identity(os.lstat(index))]) + "\n"
    replace_file(_tree_note(index), note.encode("ascii"))
    _copy_index(index, admin_index)


def remove_entries(root: Path, entries: list[bytes]) -> None:
    """Remove each of *entries* (paths relative to *root*, a directory's ending in ``/``).

    Each path is reached from *root* one directory at a time, never through a link: a link is
    removed, not followed. A path with an empty, ``.`` or ``..`` part is refused (OSError).
    """
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for entry in entries:
            parts = entry.rstrip(b"/").split(b"/")
            if any(part in (b"", b".", b"..") for part in parts):
                raise OSError(f"refusing to remove {entry!r}")
            fd = os.dup(top)
            try:
                for part in parts[:-1]:
                    below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                    os.close(fd)
                    fd = below
                name = parts[-1]
                try:
                    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    shutil.rmtree(os.fsdecode(name), dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
            finally:
                os.close(fd)
    finally:
        os.close(top)


def _copy_index(source: Path, target: Path) -> None:
    """Put a copy of *source* at *target*, replacing whatever is there (never through a link)."""
    temporary = target.with_name(f".{target.name}.orchestrator.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    shutil.copyfile(source, temporary, follow_symlinks=False)
    os.replace(temporary, target)


async def reset_whole(
    repo: Repository, worktree: Worktree, index: Path, tree: str | None = None
) -> None:
    """Make *worktree* its start commit's without trusting anything in it, then record that in
    the private *index*: the worktree's index is removed first, so that every file is written
    anew (a fresh checkout's cost), then ``reset --hard`` and ``clean -ffdx``."""
    git, args, slot, env = repo.git, worktree.git_args(), worktree.path, worktree.git_env()
    _tree_note(index).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (worktree.admin_dir / "index").unlink()
    await git.run(*args, "reset", "--hard", "--quiet", cwd=slot, env=env)
    await git.run(*args, "clean", "-ffdxq", cwd=slot, env=env)
    await record(worktree, index, tree)


async def record(worktree: Worktree, index: Path, tree: str | None = None) -> None:
    """Keep a copy of the worktree's index, just written by the orchestrator's own git from
    *tree* (when the caller knows it; else git is asked at the next catch-up), as the slot's
    private index."""
    await anyio.to_thread.run_sync(_record, worktree.admin_dir / "index", index, tree)


def _record(admin_index: Path, index: Path, tree: str | None) -> None:
    _tree_note(index).unlink(missing_ok=True)
    _copy_index(admin_index, index)
    if tree is not None:
        note = " ".join([tree, *_identity(os.lstat(index))]) + "\n"
        replace_file(_tree_note(index), note.encode("ascii"))
