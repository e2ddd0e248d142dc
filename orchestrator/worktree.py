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

import math
from dataclasses import dataclass
from pathlib import Path

import anyio

from envelopes import is_object_id, read_bounded

from ._faults import crash_point
from ._fs import remove_entry, remove_tree, replace_file, sweep_worktree
from .errors import GitError
from .repo import Repository
from .sparse import git_config_args, remove_outside_cone, write_patterns

__all__ = [
    "MergeOutcome",
    "Worktree",
    "branch_tip",
    "changed_paths",
    "check_branch",
    "commit_worktree",
    "create_worktree",
    "merge_worktree",
    "remove_worktree",
    "reset_worktree",
    "restore_admin_files",
    "rewind_branch",
    "untracked_paths",
]


#: What decides whether a file changed, pinned for the orchestrator's git in a worktree
#: whatever the repository's config says: with ``core.ignoreStat`` git marks the entries it
#: checks out assume-unchanged and never looks at those files again, and with
#: ``trustctime`` off or ``checkStat=minimal`` a file written again with its old size and
#: modification time (``os.utime``) passes for unchanged. (``core.fileMode`` is left to the
#: repository: ``git init`` turns it off on a file system without exec bits, where every
#: file would otherwise look changed.)
#: Most bytes of ``git status`` read to list what a task changed: about a million paths. An
#: agent that leaves more fails its task (``too_large``), and nothing of it is committed.
MAX_STATUS_BYTES = 64 << 20
TOO_MANY_CHANGES = (
    f"the worktree has more changed paths than {MAX_STATUS_BYTES >> 20} MiB of "
    "`git status` lists; nothing was committed"
)

STAT_CHECKS = (
    "-c",
    "core.ignoreStat=false",
    "-c",
    "core.trustctime=true",
    "-c",
    "core.checkStat=default",
)


@dataclass(frozen=True)
class Worktree:
    """A checked-out worktree on its own branch; ``admin_dir`` is its entry under .git/worktrees."""

    path: Path
    branch: str
    base_commit: str
    admin_dir: Path
    #: The directories a sparse worktree holds (orchestrator/sparse.py); None: all of them.
    sparse: tuple[str, ...] | None = None

    def git_args(self) -> tuple[str, ...]:
        """Options that point git at this worktree and nothing else (with :meth:`git_env`),
        and say whether it is sparse."""
        return (
            *STAT_CHECKS,
            *git_config_args(self.sparse),
            f"--git-dir={self.admin_dir}",
            f"--work-tree={self.path}",
        )

    def git_env(self) -> dict[str, str]:
        """The common git directory, pinned: the admin dir's ``commondir`` file is the agent's."""
        return {"GIT_COMMON_DIR": str(self.admin_dir.parent.parent)}


async def create_worktree(
    repo: Repository,
    branch: str,
    path: Path,
    base_commit: str,
    sparse: tuple[str, ...] | None = None,
) -> Worktree:
    """Create *path* as a worktree on a new branch *branch* at *base_commit*, holding only
    the directories *sparse* when given (orchestrator/sparse.py).

    The branch must not exist. On failure nothing is left behind: no directory, no worktree
    entry, no branch. Cancellation while populating the files removes the half-made worktree.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    ref = f"refs/heads/{branch}"
    async with repo.lock.hold():
        # Create the branch first, create-only (the old value must be "none"): a branch that
        # already exists is refused here and is never touched by the clean-up below.
        await repo.git.update_ref(ref, base_commit, "")
        try:
            # --force: the branch was just made, create-only, so the only worktree that can
            # have it checked out is a pool slot left by a dead run of the same task (its
            # HEAD still names the branch; the slot's next borrower rewrites it).
            await repo.git.run("worktree", "add", "--force", "--no-checkout", str(path), branch)
            admin_dir = admin_dir_from_file(path)
            if admin_dir is None:
                raise GitError(
                    ["worktree", "add"], 0, f"fatal: {path}/.git names no admin directory"
                )
        except GitError:
            await _forget(repo, path, branch, base_commit)
            raise
    worktree = Worktree(
        path=path, branch=branch, base_commit=base_commit, admin_dir=admin_dir, sparse=sparse
    )
    crash_point("worktree")
    try:
        await anyio.to_thread.run_sync(write_patterns, admin_dir, sparse)
        await repo.git.run(
            *worktree.git_args(), "reset", "--hard", "--quiet", cwd=path, env=worktree.git_env()
        )
    except BaseException:
        with anyio.CancelScope(shield=True):
            await remove_worktree(repo, worktree, delete_branch=True)
        raise
    return worktree


def admin_dir_from_file(path: Path) -> Path | None:
    try:
        text = (path / ".git").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("gitdir: "):
        return None
    return Path(text.removeprefix("gitdir: "))


def admin_dir_by_scan(repo: Repository, path: Path) -> Path | None:
    """The admin directory whose ``gitdir`` file points at *path* (when .git is gone)."""
    target = str(path / ".git")
    for gitdir in (repo.common_dir / "worktrees").glob("*/gitdir"):
        try:
            if gitdir.read_text(encoding="utf-8").strip() == target:
                return gitdir.parent
        except OSError:
            continue
    return None


async def drop_admin_dir(repo: Repository, admin_dir: Path | None) -> None:
    """Delete one worktree's admin entry (what ``git worktree prune`` does, for that one only)."""
    worktrees = repo.common_dir / "worktrees"
    if admin_dir is not None and admin_dir.parent == worktrees:
        await anyio.to_thread.run_sync(remove_tree, admin_dir, True)


async def _forget(repo: Repository, path: Path, branch: str, expected: str) -> None:
    """Undo a partial ``worktree add`` (lock held): its directory, admin entry and branch."""
    admin_dir = admin_dir_from_file(path) or admin_dir_by_scan(repo, path)
    await anyio.to_thread.run_sync(remove_tree, path, True)
    await drop_admin_dir(repo, admin_dir)
    await repo.git.update_ref(f"refs/heads/{branch}", None, expected, check=False)


async def restore_dot_git(worktree: Worktree) -> list[str]:
    """Put back the worktree's ``.git`` file and admin files if needed (see _put_back_dot_git).

    Returns the admin files that had been pointed elsewhere (``commondir``, ``gitdir``):
    the agent's tampering, put right. GitError if not possible.
    """
    try:
        return await anyio.to_thread.run_sync(_put_back_dot_git, worktree)
    except OSError as exc:
        raise GitError(
            ["worktree"], 1, f"fatal: cannot restore {worktree.path / '.git'}: {exc}"
        ) from exc


def _put_back_dot_git(worktree: Worktree) -> list[str]:
    """Put back the worktree's ``.git`` file if the agent removed or rewrote it.

    Without it, git run by a later attempt would find whatever repository encloses the
    worktree. A ``.git`` directory (the agent ran ``git init`` there) is refused.
    """
    dot_git = worktree.path / ".git"
    expected = f"gitdir: {worktree.admin_dir}\n"
    for directory in (worktree.admin_dir.parent, worktree.admin_dir):
        # Made a link (an agent without a sandbox can reach them): what is put back below
        # would be written, and removed, wherever it leads.
        if directory.is_symlink():
            raise GitError(["worktree"], 1, f"fatal: {directory} was made a link")
    if dot_git.is_dir() and not dot_git.is_symlink():
        raise GitError(
            ["worktree"], 1, f"fatal: the agent replaced {dot_git} with a repository of its own"
        )
    try:
        intact = read_bounded(dot_git, 4096) == expected.encode()
    except OSError:
        intact = False  # gone, a link, a FIFO, too long: replaced
    if not intact:
        replace_file(dot_git, expected.encode())
    # The admin dir's HEAD decides what ``reset --hard`` restores, ``gitdir`` where git
    # thinks the worktree is, ``commondir`` which repository's objects and refs it uses: an
    # agent that pointed them elsewhere gets them put back (HEAD may move in the agent's own
    # right: ``git checkout -b``; the other two never).
    tampered = []
    config = worktree.admin_dir / "config.worktree"
    if config.exists() or config.is_symlink():
        # Never made by the orchestrator: per-worktree config the agent wrote (`git
        # sparse-checkout` does, and so could a filter), which the orchestrator's git must
        # not read. Removed; a change to the shared config that enables it is the guard's.
        remove_entry(config)
    index = worktree.admin_dir / "index"
    if index.is_symlink() or (index.exists() and not index.is_file()):
        # A FIFO as the index would block every git command, a directory fail it: git
        # makes a new one.
        tampered.append(str(index))
        remove_entry(index)
    # The cone's patterns are the orchestrator's: an agent that widened its own (``git
    # sparse-checkout add``) changed what it sees, not what the orchestrator's git sees.
    write_patterns(worktree.admin_dir, worktree.sparse)
    for name, content in (
        ("HEAD", f"ref: refs/heads/{worktree.branch}\n"),
        ("gitdir", f"{dot_git}\n"),
        ("commondir", "../..\n"),
    ):
        path = worktree.admin_dir / name
        try:
            if read_bounded(path, 4096) == content.encode():
                continue
        except OSError:
            pass
        if name != "HEAD":
            tampered.append(str(path))
        if path.is_dir() and not path.is_symlink():
            remove_entry(path)  # a file cannot be renamed over a directory
        replace_file(path, content.encode())  # never through a link planted there
    return tampered


restore_admin_files = restore_dot_git


async def rewind_branch(repo: Repository, worktree: Worktree) -> None:
    """Put back the worktree's ``.git`` file and admin files, and its branch at its base."""
    await restore_dot_git(worktree)
    await repo.git.update_ref(f"refs/heads/{worktree.branch}", worktree.base_commit)


async def reset_worktree(repo: Repository, worktree: Worktree) -> None:
    """Bring the worktree back to its base commit: no change, no untracked or ignored file.

    The worktree's index is removed first: the agent could write it, and an entry given the
    stat data of a file it changed would hide that change from ``reset --hard``. So every
    file is written anew, as in a new worktree. (A pool slot is reset from its private index
    instead, writing only what differs: ``WorktreePool.reset``.)
    """
    await rewind_branch(repo, worktree)
    git, args, cwd, env = repo.git, worktree.git_args(), worktree.path, worktree.git_env()
    await anyio.to_thread.run_sync(_remove_index, worktree)
    await git.run(*args, "reset", "--hard", "--quiet", cwd=cwd, env=env)
    await git.run(*args, "clean", "-ffdxq", cwd=cwd, env=env)
    try:
        await anyio.to_thread.run_sync(remove_outside_cone, worktree.path, worktree.sparse)
        # What git's walk never reports: a planted .git below the top, FIFOs, modes.
        await anyio.to_thread.run_sync(sweep_worktree, worktree.path)
    except OSError as exc:
        raise GitError(["worktree"], 1, f"fatal: cannot reset {worktree.path}: {exc}") from exc


def _remove_index(worktree: Worktree) -> None:
    (worktree.admin_dir / "index").unlink(missing_ok=True)


async def branch_tip(repo: Repository, worktree: Worktree) -> str:
    """Where the worktree's branch points now: its loose ref file read, else asked of git."""
    loose = repo.common_dir / "refs" / "heads" / worktree.branch
    try:
        value = read_bounded(loose, 128).decode("ascii", errors="replace").strip()
    except OSError:
        value = ""
    if is_object_id(value):
        return value
    repo.git.unblock_ref(f"refs/heads/{worktree.branch}")  # git would open a FIFO there
    return await repo.git.out(
        "rev-parse", "--verify", "--end-of-options", f"refs/heads/{worktree.branch}^{{commit}}"
    )


async def check_branch(repo: Repository, worktree: Worktree, tip: str) -> str | None:
    """Why the branch's tip *tip* is not the task's own doing, or None when it is.

    The branch starts at the base commit; the agent may commit on it in its own worktree,
    which git records in the worktree's own HEAD reflog. A tip that does not descend from the
    base, or that the worktree's HEAD reflog did not record last (another process ran
    ``git update-ref`` on it), was moved by someone else.
    """
    if tip == worktree.base_commit:
        return None
    try:
        log = read_bounded(worktree.admin_dir / "logs" / "HEAD", 16 << 20)
        last = log.rstrip(b"\n").rsplit(b"\n", 1)[-1].split(b" ", 2)
        recorded = last[1].decode("ascii", errors="replace") if len(last) > 1 else ""
    except OSError:
        recorded = ""
    if recorded != tip:
        return f"branch {worktree.branch} was moved to {tip} by another process"
    if not await repo.git.ok(
        "merge-base", "--is-ancestor", "--end-of-options", worktree.base_commit, tip
    ):
        return f"branch {worktree.branch} was moved to {tip}, which does not contain its base"
    return None


async def changed_paths(
    repo: Repository,
    worktree: Worktree,
    *,
    timeout: float | None = None,  # noqa: ASYNC109 (passed to git)
) -> list[str] | None:
    """Every path a commit of the worktree would take: changed, deleted, new (not ignored);
    None when they are too many to list (more than :data:`MAX_STATUS_BYTES` of them).

    What ``git add --all`` would stage, listed without staging anything, so that what an
    agent wrote can be checked (its size, secrets in it) before any of it enters the object
    database. The listing is bounded: an agent that leaves millions of files does not make
    the orchestrator hold millions of paths. ``git status`` takes no lock
    (``--no-optional-locks``: it does not write the index back), so that stopping it there,
    or at *timeout*, leaves nothing behind.
    """
    out, cut = await repo.git.read(
        *worktree.git_args(),
        "--no-optional-locks",
        "status",
        "--porcelain=v1",
        "-z",
        "--no-renames",
        "--untracked-files=all",
        "--ignore-submodules=all",
        stdin=b"",
        limit=MAX_STATUS_BYTES,
        timeout=math.inf if timeout is None else timeout,
        cwd=worktree.path,
        env=worktree.git_env(),
    )
    if cut:
        return None
    entries = out.split(b"\0")
    # A path deleted in the index ("D "; a `git rm`, or the old side of a `git mv`) is staged
    # already: `git add` of a path in neither the index nor the worktree would fail.
    return [
        e[3:].decode("utf-8", "surrogateescape")
        for e in entries
        if len(e) > 3 and not e.startswith(b"D ")
    ]


async def untracked_paths(repo: Repository, worktree: Worktree) -> set[str]:
    """The worktree's untracked files that a commit would take (not ignored)."""
    out = await repo.git.run(
        *worktree.git_args(),
        "ls-files",
        "--others",
        "--exclude-standard",
        "-z",
        cwd=worktree.path,
        env=worktree.git_env(),
    )
    return {e.decode("utf-8", "surrogateescape") for e in out.stdout.split(b"\0") if e}


async def commit_worktree(
    repo: Repository,
    worktree: Worktree,
    message: str,
    *,
    base_tree: str,
    parent: str | None = None,
    paths: list[str] | None = None,
    timeout: float | None = None,  # noqa: ASYNC109 (passed to git)
) -> tuple[str, str, bool]:
    """Commit every change in the worktree as one commit on its branch, on top of *parent*.

    Returns ``(commit, tree, changed)``. With no change there is no commit: the result is
    *parent* (the base commit, or the agent's own last commit). *parent* is the branch's tip
    as the caller read and checked it (see :func:`check_branch`), by default its tip now: the
    branch moves by compare-and-swap from that value, so a branch moved meanwhile by anyone
    else fails the commit instead of being overwritten. *paths* are the paths to commit, by
    default :func:`changed_paths`. With *timeout*, a git command that reads the worktree and
    takes longer (a FIFO the agent left) is killed: GitError. Plumbing commands are used, so
    no hook runs.
    """
    await restore_dot_git(worktree)
    if parent is None:
        parent = await branch_tip(repo, worktree)
    if paths is None:
        paths = await changed_paths(repo, worktree, timeout=timeout)
        if paths is None:
            raise GitError(["status"], 1, f"fatal: {TOO_MANY_CHANGES}")
    git, args, cwd, env = repo.git, worktree.git_args(), worktree.path, worktree.git_env()
    if not paths:
        if parent == worktree.base_commit:
            return worktree.base_commit, base_tree, False
        return parent, await _tree_of(repo, parent), True  # the agent committed it all
    # Only the changed paths, literally (a file named ":(glob)*" is that file): git does
    # not walk the whole tree a second time.
    await git.run(
        "--literal-pathspecs",
        *args,
        "add",
        "--all",
        # Paths outside a sparse worktree's cone (a directory the agent made) are taken too.
        *(["--sparse"] if worktree.sparse is not None else []),
        "--pathspec-from-file=-",
        "--pathspec-file-nul",
        cwd=cwd,
        env=env,
        stdin=b"\0".join(p.encode("utf-8", "surrogateescape") for p in paths) + b"\0",
        timeout=timeout,
    )
    tree = await git.out(*args, "write-tree", cwd=cwd, env=env)
    if tree == base_tree and parent == worktree.base_commit:
        return worktree.base_commit, tree, False
    # A parent other than the base is the agent's: checked by commit-tree (a tag of its
    # own that the branch was pointed at is no commit), not written as it is.
    known = parent == worktree.base_commit
    commit = await git.commit_tree(tree, [parent], message, known=known)
    crash_point("commit")
    await git.update_ref(f"refs/heads/{worktree.branch}", commit, parent)
    return commit, tree, True


async def _tree_of(repo: Repository, commit: str) -> str:
    return await repo.git.out("rev-parse", "--verify", "--end-of-options", f"{commit}^{{tree}}")


async def remove_worktree(
    repo: Repository, worktree: Worktree, *, delete_branch: bool = False
) -> bool:
    """Remove the worktree's files and its admin entry; with *delete_branch*, its branch too.

    Other worktrees' entries are left alone (no repository-wide ``git worktree prune``). The
    branch is deleted only if it still points at the worktree's base commit, so a branch that
    holds a result (or the agent's own commits) is never lost. Returns whether it was deleted.
    """
    await anyio.to_thread.run_sync(remove_tree, worktree.path, True)
    async with repo.lock.hold():
        await drop_admin_dir(repo, worktree.admin_dir)
        if not delete_branch:
            return False
        return await _delete_unused_branch(repo, worktree)


async def delete_if_unused(repo: Repository, worktree: Worktree) -> bool:
    """Delete the worktree's branch if it still points at its base commit; whether it did."""
    async with repo.lock.hold():
        return await _delete_unused_branch(repo, worktree)


async def _delete_unused_branch(repo: Repository, worktree: Worktree) -> bool:
    ref = f"refs/heads/{worktree.branch}"
    return await repo.git.update_ref(ref, None, worktree.base_commit, check=False)


@dataclass(frozen=True)
class MergeOutcome:
    """The result of :func:`merge_worktree`."""

    merged: bool
    commit: str | None
    conflicts: list[str]
    message: str


def _reason(stderr: bytes, default: str) -> str:
    """git's reason, after any advice it gives first (``hint:`` lines: the deprecation of
    the graft file that _git.py points at /dev/null, say)."""
    lines = stderr.decode(errors="replace").splitlines()
    why = [line for line in lines if line.strip() and not line.startswith("hint:")]
    return why[0] if why else default


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
    checkout = await checkout_of(repo, target_ref)
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
    # -z: names as they are (without it, git quotes a name that is not plain ASCII).
    merge_tree = ("merge-tree", "--write-tree", "--name-only", "--no-messages", "-z")
    result = await git.run(*merge_tree, old, theirs, check=False)
    lines = result.stdout.decode(errors="replace").split("\0")
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
                detail = _reason(moved.stderr, "git read-tree failed")
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


async def checkout_of(repo: Repository, ref: str) -> Path | None:
    """The worktree in which *ref* is checked out, if any."""
    path: Path | None = None
    for line in (await repo.git.out("worktree", "list", "--porcelain")).splitlines():
        if line.startswith("worktree "):
            path = Path(line[len("worktree ") :])
        elif line == f"branch {ref}":
            return path
    return None
