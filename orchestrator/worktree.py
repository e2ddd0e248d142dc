"""Worktrees: create, commit, reset, remove, merge.

Only the metadata steps run under the repository lock (``git worktree add --no-checkout``,
ref updates, ``git worktree prune``); writing and deleting the files, the slow part, runs in
parallel outside it. See docs/architecture.md for the measurements behind this split.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import anyio

from .errors import GitError
from .repo import Repository

__all__ = [
    "MergeOutcome",
    "Worktree",
    "commit_worktree",
    "create_worktree",
    "merge_worktree",
    "remove_worktree",
    "reset_worktree",
]


@dataclass(frozen=True)
class Worktree:
    """A checked-out worktree on its own branch."""

    path: Path
    branch: str
    base_commit: str


async def create_worktree(repo: Repository, branch: str, path: Path, base_commit: str) -> Worktree:
    """Create *path* as a worktree on a new branch *branch* at *base_commit*.

    The branch must not exist. On failure nothing is left behind: no directory, no worktree
    entry, no branch. Cancellation while populating the files removes the half-made worktree.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    ref = f"refs/heads/{branch}"
    async with repo.lock.hold():
        # Create the branch first, create-only (the old value must be "none"): a branch that
        # already exists is refused here and is never touched by the clean-up below.
        created = await repo.git.run("update-ref", ref, base_commit, "", check=False)
        if created.returncode != 0:
            raise GitError(
                ["update-ref", ref],
                created.returncode,
                f"fatal: a branch named '{branch}' already exists",
            )
        try:
            await repo.git.run("worktree", "add", "--no-checkout", str(path), branch)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _forget(repo, path, branch, base_commit)
            raise
    worktree = Worktree(path=path, branch=branch, base_commit=base_commit)
    try:
        await repo.git.run("reset", "--hard", "--quiet", cwd=path)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await remove_worktree(repo, worktree, delete_branch=True)
        raise
    return worktree


async def _forget(repo: Repository, path: Path, branch: str, expected: str) -> None:
    """Undo a partial ``worktree add``: its directory, its admin entry, the branch made for it."""
    await anyio.to_thread.run_sync(shutil.rmtree, path, True)
    await repo.git.run("worktree", "prune", check=False)
    await repo.git.run("update-ref", "-d", f"refs/heads/{branch}", expected, check=False)


async def reset_worktree(repo: Repository, worktree: Worktree) -> None:
    """Bring the worktree back to its base commit: no change, no untracked or ignored file."""
    async with repo.lock.hold():
        await repo.git.run("update-ref", f"refs/heads/{worktree.branch}", worktree.base_commit)
    await repo.git.run("reset", "--hard", "--quiet", cwd=worktree.path)
    await repo.git.run("clean", "-ffdxq", cwd=worktree.path)


async def commit_worktree(
    repo: Repository, worktree: Worktree, message: str, *, base_tree: str
) -> tuple[str, str, bool]:
    """Commit every change in the worktree as one commit on its branch.

    Returns ``(commit, tree, changed)``. With no change there is no commit: the result is the
    base commit. Plumbing commands are used, so the user's commit hooks do not run.
    """
    git = repo.git
    await git.run("add", "--all", cwd=worktree.path)
    tree = await git.out("write-tree", cwd=worktree.path)
    if tree == base_tree:
        return worktree.base_commit, tree, False
    identity = await git.identity_env()
    commit = await git.out(
        "commit-tree",
        tree,
        "-p",
        worktree.base_commit,
        "-m",
        message,
        cwd=worktree.path,
        env=identity,
    )
    async with repo.lock.hold():
        await git.run("update-ref", f"refs/heads/{worktree.branch}", commit, worktree.base_commit)
    return commit, tree, True


async def remove_worktree(
    repo: Repository, worktree: Worktree, *, delete_branch: bool = False
) -> None:
    """Remove the worktree's files and its entry; with *delete_branch*, its branch too.

    The branch is deleted only if it still points at the worktree's base commit, so a branch
    that holds a result is never lost by accident.
    """
    await anyio.to_thread.run_sync(shutil.rmtree, worktree.path, True)
    async with repo.lock.hold():
        await repo.git.run("worktree", "prune", check=False)
        if delete_branch:
            await repo.git.run(
                "update-ref",
                "-d",
                f"refs/heads/{worktree.branch}",
                worktree.base_commit,
                check=False,
            )


@dataclass(frozen=True)
class MergeOutcome:
    """The result of :func:`merge_worktree`."""

    merged: bool
    commit: str | None
    conflicts: list[str]
    message: str


async def merge_worktree(
    repo: Repository, branch: str, into: str, *, message: str | None = None
) -> MergeOutcome:
    """Merge *branch* into *into* with a merge commit (``--no-ff``), without touching any checkout.

    The merge is computed with ``git merge-tree --write-tree``; on conflict nothing changes and
    the conflicting paths are returned. The target ref moves with a compare-and-swap, so a
    concurrent update of *into* makes this fail rather than lose that update. A target branch
    checked out in a worktree is refused, since moving its ref would leave that checkout stale.
    """
    git = repo.git
    target_ref = f"refs/heads/{into}"
    checkout = await _checkout_of(repo, target_ref)
    if checkout is not None:
        dirty = await git.out("status", "--porcelain", "--untracked-files=no", cwd=checkout)
        if dirty:
            return MergeOutcome(
                False,
                None,
                [],
                f"branch {into!r} is checked out in {checkout} with uncommitted changes; commit or stash them first",
            )
    try:
        old = await git.out("rev-parse", "--verify", "--quiet", f"{target_ref}^{{commit}}")
    except GitError:
        return MergeOutcome(False, None, [], f"branch {into!r} does not exist")
    try:
        theirs = await git.out(
            "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}"
        )
    except GitError:
        return MergeOutcome(False, None, [], f"branch {branch!r} does not exist")
    result = await git.run(
        "merge-tree", "--write-tree", "--name-only", "--no-messages", old, theirs, check=False
    )
    lines = result.stdout.decode(errors="replace").splitlines()
    if result.returncode == 1:
        return MergeOutcome(
            False, None, sorted(set(lines[1:]) - {""}), f"merging {branch} into {into} conflicts"
        )
    if result.returncode != 0:
        raise GitError(
            ["merge-tree", old, theirs], result.returncode, result.stderr.decode(errors="replace")
        )
    identity = await git.identity_env()
    commit = await git.out(
        "commit-tree",
        lines[0],
        "-p",
        old,
        "-p",
        theirs,
        "-m",
        message or f"Merge branch '{branch}' into {into}",
        env=identity,
    )
    async with repo.lock.hold():
        if checkout is not None:
            # Bring the checkout's index and files along first, so that a failure here leaves
            # both the ref and the checkout where they were.
            await git.run("read-tree", "-m", "-u", old, commit, cwd=checkout)
        try:
            await git.run("update-ref", target_ref, commit, old)
        except GitError:
            if checkout is not None:
                await git.run("read-tree", "-m", "-u", commit, old, cwd=checkout, check=False)
            raise
    return MergeOutcome(True, commit, [], f"merged {branch} into {into}")


async def _checkout_of(repo: Repository, ref: str) -> Path | None:
    """The worktree in which *ref* is checked out, if any."""
    path: Path | None = None
    for line in (await repo.git.out("worktree", "list", "--porcelain")).splitlines():
        if line.startswith("worktree "):
            path = Path(line[len("worktree ") :])
        elif line == f"branch {ref}":
            return path
    return None
