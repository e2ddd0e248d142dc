"""Bringing a used worktree to a commit by touching only what differs from it.

A pool slot (orchestrator/pool.py) is lent to one task after another. Each borrower must find
exactly the files a fresh checkout of its start commit would hold. ``git reset --hard`` and
``git clean -ffdx`` get there, but each walks the whole tree, and ``reset`` trusts the stat
data of the worktree's index, which the previous task's agent could write: an entry given the
stat data of a file the agent changed hides that change from ``reset``.

So each slot has a **private index** (``<slot>.index`` beside the slot, outside the worktree
and outside a sandbox's writable places), written by the orchestrator's git: by the checkout
that made the slot, and by each catch-up since. It records the tree the files were last made
to be, with the stat data git saw then; a note beside it (``<slot>.tree``) names that tree,
the sparse set, and the index's own stat data. Catching up is then:

1. one walk of the tree in two halves run side by side on the private index: ``git
   diff-files`` (tracked files that differ from it: content, mode, type, stat data, gone)
   and ``git ls-files -o --directory`` (everything untracked or ignored: files, links, empty
   directories, nested repositories), both with the repository's stat settings pinned
   (``worktree.STAT_CHECKS``); beside them, :func:`~orchestrator._fs.sweep_worktree` for what
   git's walk never reports (a ``.git`` below the top, FIFOs, directory modes);
2. the untracked entries removed (never through a link, however deep), the changed ones
   checked out again (``checkout-index -f -u``);
3. when the start commit is another tree, ``git read-tree -m -u`` from that tree to it, which
   writes only the files that differ between the two;
4. the private index copied over the worktree's own, whose stat data is then git's again.

A private index that is missing, unreadable, made for another sparse set, or not the one this
process last left (WorktreePool remembers its digest: without a sandbox an agent runs as the
user and can reach it), a listing too large to hold (more than :data:`LISTING_LIMIT` bytes),
or a listing that failed or said anything on stderr (a directory git could not read):
:func:`catch_up` returns False and the caller falls back to :func:`reset_whole`, which does not
trust the worktree's index at all (it is removed, so every file is written anew), then writes
a new private index. A file that cannot be removed or written raises (GitError, OSError): the
caller removes the slot.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

import anyio

from envelopes import is_object_id, read_bounded

from ._fs import remove_tree, remove_tree_at, replace_file, sweep_worktree
from .errors import GitError
from .repo import Repository
from .sparse import remove_outside_cone, sparse_key
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
    """Remove the private index of *slot* and its note (the slot is gone, or leaves the pool),
    or whatever an agent put in their place (a directory, say): as much of it as can go."""
    index = private_index(slot)
    remove_tree(index, ignore_errors=True)
    remove_tree(_tree_note(index), ignore_errors=True)


def _index_env(worktree: Worktree, index: Path) -> dict[str, str]:
    return {**worktree.git_env(), "GIT_INDEX_FILE": str(index)}


async def catch_up(
    repo: Repository, worktree: Worktree, index: Path, tree: str | None = None
) -> bool:
    """Make *worktree*'s files and index exactly its start commit's (whose tree is *tree*,
    when the caller knows it), from the private *index*.

    Returns False when the private index cannot be used (see the module docstring), or was
    made for another sparse set: the caller then resets the files whole. GitError or OSError
    when a file cannot be removed or written: the slot cannot be made pristine.
    """
    try:
        info = os.lstat(index)
    except OSError:
        return False
    noted = _read_note(index, info)
    if not stat.S_ISREG(info.st_mode) or noted is None or noted[1] != sparse_key(worktree.sparse):
        return False
    git, args, slot = repo.git, worktree.git_args(), worktree.path
    env = _index_env(worktree, index)
    # From here until the private index is final, no note says what it holds.
    _tree_note(index).unlink(missing_ok=True)
    previous = noted[0]
    if previous is None:
        try:
            previous = await git.out(*args, "write-tree", cwd=slot, env=env)
        except GitError:
            return False
    await anyio.to_thread.run_sync(remove_outside_cone, slot, worktree.sparse)
    # A mode the agent changed is a change, whatever core.fileMode says (a fresh checkout
    # has the index's modes), where the file system keeps exec bits: found, and written.
    modes = ("-c", "core.fileMode=true") if exec_bits_kept(slot) else ()
    listed = await _list_differences(repo, worktree, env, modes)
    if listed is None:
        return False
    untracked, changed = listed
    if untracked:
        await anyio.to_thread.run_sync(remove_entries, slot, untracked)
    if changed:
        await git.run(
            *modes,
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
        # the files that differ between the two (in a sparse worktree, those in its cone).
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
    await anyio.to_thread.run_sync(_finish, index, tree, worktree)
    return True


async def _list_differences(
    repo: Repository, worktree: Worktree, env: dict[str, str], modes: tuple[str, ...] = ()
) -> tuple[list[bytes], list[bytes]] | None:
    """One walk of the worktree against the private index, in two halves run side by side:
    ``(untracked entries, changed tracked paths)``; None when either half failed or listed
    more than :data:`LISTING_LIMIT` bytes.

    The changed: tracked files that differ from the index (any stat change counts: such a
    file is written again). The untracked: everything git does not track, ignored or not
    (empty directories and nested repositories whole).
    """
    listings: dict[str, bytes | None] = {}

    async def list_into(name: str, command: tuple[str, ...]) -> None:
        try:
            out, cut = await repo.git.read(
                *worktree.git_args(),
                *command,
                stdin=b"",
                limit=LISTING_LIMIT,
                timeout=_TIMEOUT,
                env=env,
                cwd=worktree.path,
                quiet=True,  # a directory git could not read: its files were not looked at
            )
        except GitError:
            cut = True
        listings[name] = None if cut else out

    failed: list[OSError] = []

    async def sweep() -> None:
        # What git's walk never reports (_fs.sweep_worktree); nothing of it changes what the
        # two listings find, so it runs beside them.
        try:
            await anyio.to_thread.run_sync(sweep_worktree, worktree.path)
        except OSError as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(list_into, "changed", (*modes, "diff-files", "--name-only", "-z"))
        tg.start_soon(list_into, "untracked", ("ls-files", "-z", "-o", "--directory"))
        tg.start_soon(sweep)
    if failed:
        raise failed[0]
    changed, untracked = listings["changed"], listings["untracked"]
    if changed is None or untracked is None:
        return None
    return [e for e in untracked.split(b"\0") if e], [e for e in changed.split(b"\0") if e]


#: Whether each file system (by device) keeps exec bits, as found once.
_EXEC_BITS: dict[int, bool] = {}


def exec_bits_kept(directory: Path) -> bool:
    """Whether the file system of *directory* keeps a file's exec bits (a FAT or SMB mount
    may not: ``git init`` then sets ``core.fileMode`` off, and every tracked executable would
    look changed to a git told to trust them). Found once per file system, by trying in the
    directory above (the pool's, not the worktree: a file made there is the agent's)."""
    above = directory.parent
    try:
        device = os.stat(above).st_dev
    except OSError:
        return False
    known = _EXEC_BITS.get(device)
    if known is None:
        try:
            fd, name = tempfile.mkstemp(dir=above, prefix=".exec-bits-")
            try:
                os.fchmod(fd, 0o755)
                known = bool(os.fstat(fd).st_mode & stat.S_IXUSR)
                os.fchmod(fd, 0o644)
                known = known and not os.fstat(fd).st_mode & stat.S_IXUSR
            finally:
                os.close(fd)
                os.unlink(name)
        except OSError:
            known = False  # cannot tell: the repository's own setting, as before
        _EXEC_BITS[device] = known
    return known


def _tree_note(index: Path) -> Path:
    """Where the note on the private *index* is kept: the tree it holds (``-`` when not
    known), its sparse set's key (orchestrator/sparse.py), and the index's stat data then."""
    return index.with_suffix(".tree")


def _read_note(index: Path, info: os.stat_result) -> tuple[str | None, str] | None:
    """``(tree or None, sparse key)`` noted for *index*, if it is as it was then; else None."""
    try:
        words = read_bounded(_tree_note(index), 256).decode("ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(words) != 5 or words[2:] != _identity(info):
        return None
    tree, key = words[0], words[1]
    if tree != "-" and not is_object_id(tree):
        return None
    return (None if tree == "-" else tree), key


def _identity(info: os.stat_result) -> list[str]:
    return [str(info.st_size), str(info.st_mtime_ns), str(info.st_ino)]


def _write_note(index: Path, tree: str | None, sparse: tuple[str, ...] | None) -> None:
    words = [tree or "-", sparse_key(sparse), *_identity(os.lstat(index))]
    replace_file(_tree_note(index), (" ".join(words) + "\n").encode("ascii"))


def _finish(index: Path, tree: str, worktree: Worktree) -> None:
    """Note what the private *index* holds, and copy it over the worktree's."""
    _write_note(index, tree, worktree.sparse)
    _copy_index(index, worktree.admin_dir / "index")


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
                    remove_tree_at(fd, name)
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
    anew (a fresh checkout's cost), then ``reset --hard`` and ``clean -ffdx``, and in a sparse
    worktree every directory outside its cone is removed."""
    git, args, slot, env = repo.git, worktree.git_args(), worktree.path, worktree.git_env()
    _tree_note(index).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (worktree.admin_dir / "index").unlink()
    await git.run(*args, "reset", "--hard", "--quiet", cwd=slot, env=env, timeout=_TIMEOUT)
    await git.run(*args, "clean", "-ffdxq", cwd=slot, env=env, timeout=_TIMEOUT)
    await anyio.to_thread.run_sync(remove_outside_cone, slot, worktree.sparse)
    await anyio.to_thread.run_sync(sweep_worktree, slot)
    await record(worktree, index, tree)


async def record(worktree: Worktree, index: Path, tree: str | None = None) -> None:
    """Keep a copy of the worktree's index, just written by the orchestrator's own git from
    *tree* (when the caller knows it; else git is asked at the next catch-up), as the slot's
    private index."""
    await anyio.to_thread.run_sync(_record, worktree, index, tree)


def _record(worktree: Worktree, index: Path, tree: str | None) -> None:
    _tree_note(index).unlink(missing_ok=True)
    _copy_index(worktree.admin_dir / "index", index)
    _write_note(index, tree, worktree.sparse)
