"""Worktrees: create, commit, reset, remove, merge.

Only the metadata steps run under the repository lock (creating the branch, ``git worktree
add --no-checkout``, removing a worktree's admin entry); writing and deleting the files, the
slow part, runs in parallel outside it. See docs/architecture.md for the measurements behind
this split.

Git commands inside a task's worktree name its admin directory and work tree explicitly
(``--git-dir``/``--work-tree``) rather than letting git discover them: an agent that deletes
or rewrites its worktree's ``.git`` file cannot make them act on another repository.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import anyio

from ._faults import crash_point
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
    """A checked-out worktree on its own branch; ``admin_dir`` is its entry under .git/worktrees."""

    path: Path
    branch: str
    base_commit: str
    admin_dir: Path

    def git_args(self) -> tuple[str, ...]:
        """Options that point git at this worktree and nothing else."""
        return (f"--git-dir={self.admin_dir}", f"--work-tree={self.path}")


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
        await repo.git.run("update-ref", ref, base_commit, "")
        try:
            # --force: the branch was just made, create-only, so the only worktree that can
            # have it checked out is a pool slot left by a dead run of the same task (its
            # HEAD still names the branch; the slot's next borrower rewrites it).
            await repo.git.run("worktree", "add", "--force", "--no-checkout", str(path), branch)
            admin_dir = _admin_dir_from_file(path)
            if admin_dir is None:
                raise GitError(
                    ["worktree", "add"], 0, f"fatal: {path}/.git names no admin directory"
                )
        except GitError:
            await _forget(repo, path, branch, base_commit)
            raise
    worktree = Worktree(path=path, branch=branch, base_commit=base_commit, admin_dir=admin_dir)
    crash_point("worktree")
    try:
        await repo.git.run(*worktree.git_args(), "reset", "--hard", "--quiet", cwd=path)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await remove_worktree(repo, worktree, delete_branch=True)
        raise
    return worktree


def _admin_dir_from_file(path: Path) -> Path | None:
    try:
        text = (path / ".git").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("gitdir: "):
        return None
    return Path(text.removeprefix("gitdir: "))


def _admin_dir_by_scan(repo: Repository, path: Path) -> Path | None:
    """The admin directory whose ``gitdir`` file points at *path* (when .git is gone)."""
    target = str(path / ".git")
    for gitdir in (repo.common_dir / "worktrees").glob("*/gitdir"):
        try:
            if gitdir.read_text(encoding="utf-8").strip() == target:
                return gitdir.parent
        except OSError:
            continue
    return None


async def _drop_admin_dir(repo: Repository, admin_dir: Path | None) -> None:
    """Delete one worktree's admin entry (what ``git worktree prune`` does, for that one only)."""
    worktrees = repo.common_dir / "worktrees"
    if admin_dir is not None and admin_dir.parent == worktrees:
        await anyio.to_thread.run_sync(shutil.rmtree, admin_dir, True)


async def _forget(repo: Repository, path: Path, branch: str, expected: str) -> None:
    """Undo a partial ``worktree add`` (lock held): its directory, admin entry and branch."""
    admin_dir = _admin_dir_from_file(path) or _admin_dir_by_scan(repo, path)
    await anyio.to_thread.run_sync(shutil.rmtree, path, True)
    await _drop_admin_dir(repo, admin_dir)
    await repo.git.run("update-ref", "-d", f"refs/heads/{branch}", expected, check=False)


async def _restore_dot_git(worktree: Worktree) -> None:
    """Put back the worktree's ``.git`` file if needed (see _put_back_dot_git); GitError if not possible."""
    try:
        await anyio.to_thread.run_sync(_put_back_dot_git, worktree)
    except OSError as exc:
        raise GitError(
            ["worktree"], 1, f"fatal: cannot restore {worktree.path / '.git'}: {exc}"
        ) from exc


def _put_back_dot_git(worktree: Worktree) -> None:
    """Put back the worktree's ``.git`` file if the agent removed or rewrote it.

    Without it, git run by a later attempt would find whatever repository encloses the
    worktree. A ``.git`` directory (the agent ran ``git init`` there) is refused.
    """
    dot_git = worktree.path / ".git"
    expected = f"gitdir: {worktree.admin_dir}\n"
    if dot_git.is_dir() and not dot_git.is_symlink():
        raise GitError(
            ["worktree"], 1, f"fatal: the agent replaced {dot_git} with a repository of its own"
        )
    try:
        if dot_git.read_text(encoding="utf-8") == expected:
            return
    except (OSError, UnicodeDecodeError):
        pass
    dot_git.unlink(missing_ok=True)
    dot_git.write_text(expected, encoding="utf-8")


async def reset_worktree(repo: Repository, worktree: Worktree) -> None:
    """Bring the worktree back to its base commit: no change, no untracked or ignored file."""
    await _restore_dot_git(worktree)
    git, args, cwd = repo.git, worktree.git_args(), worktree.path
    await git.run(
        *args, "update-ref", f"refs/heads/{worktree.branch}", worktree.base_commit, cwd=cwd
    )
    await git.run(*args, "reset", "--hard", "--quiet", cwd=cwd)
    await git.run(*args, "clean", "-ffdxq", cwd=cwd)


async def commit_worktree(
    repo: Repository, worktree: Worktree, message: str, *, base_tree: str
) -> tuple[str, str, bool]:
    """Commit every change in the worktree as one commit on its branch.

    Returns ``(commit, tree, changed)``. With no change there is no commit: the result is the
    base commit. Commits the agent made itself are kept: the new commit goes on top of the
    branch's tip. Plumbing commands are used, so the user's commit hooks do not run. The
    branch moves by compare-and-swap; it is the task's own loose ref, so no lock is needed.
    """
    await _restore_dot_git(worktree)
    git, args, cwd = repo.git, worktree.git_args(), worktree.path
    await git.run(*args, "add", "--all", cwd=cwd)
    tree = await git.out(*args, "write-tree", cwd=cwd)
    if tree == base_tree:
        return worktree.base_commit, tree, False
    identity = await git.identity_env()
    commit = await git.out(
        *args, "commit-tree", tree, "-p", "HEAD", "-m", message, cwd=cwd, env=identity
    )
    crash_point("commit")
    await git.run(*args, "update-ref", f"refs/heads/{worktree.branch}", commit, "HEAD", cwd=cwd)
    return commit, tree, True


async def remove_worktree(
    repo: Repository, worktree: Worktree, *, delete_branch: bool = False
) -> bool:
    """Remove the worktree's files and its admin entry; with *delete_branch*, its branch too.

    Other worktrees' entries are left alone (no repository-wide ``git worktree prune``). The
    branch is deleted only if it still points at the worktree's base commit, so a branch that
    holds a result (or the agent's own commits) is never lost. Returns whether it was deleted.
    """
    await anyio.to_thread.run_sync(shutil.rmtree, worktree.path, True)
    async with repo.lock.hold():
        await _drop_admin_dir(repo, worktree.admin_dir)
        if not delete_branch:
            return False
        return await _delete_unused_branch(repo, worktree)


async def delete_if_unused(repo: Repository, worktree: Worktree) -> bool:
    """Delete the worktree's branch if it still points at its base commit; whether it did."""
    async with repo.lock.hold():
        return await _delete_unused_branch(repo, worktree)


async def _delete_unused_branch(repo: Repository, worktree: Worktree) -> bool:
    ref = f"refs/heads/{worktree.branch}"
    deleted = await repo.git.run("update-ref", "-d", ref, worktree.base_commit, check=False)
    return deleted.returncode == 0


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
    checked out in a worktree moves that checkout along when it is clean, and is refused when
    it has uncommitted changes. For merging a whole run's results, see ``merge_results``.
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
            moved = await git.run("read-tree", "-m", "-u", old, commit, cwd=checkout, check=False)
            if moved.returncode != 0:
                why = moved.stderr.decode(errors="replace").strip().splitlines()
                detail = why[0] if why else "git read-tree failed"
                return MergeOutcome(
                    False, None, [], f"cannot update the checkout of {into} in {checkout}: {detail}"
                )
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
