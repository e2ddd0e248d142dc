"""Merging commits without a working tree: ``git merge-tree --write-tree`` and ``commit-tree``.

A merge computed this way touches no checkout and takes no lock (it only adds objects to the
object database, which git makes safe for concurrent writers), so a dependent task's start
commit and a merge-back's result are built beside running tasks without disturbing them. The
outcome is the same tree a ``git merge`` in a scratch worktree would produce (the same
merge machinery, ``ort``), without writing a single file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ._git import Git, check_ids
from .errors import GitError

__all__ = ["Combined", "changed_files", "combine_commits", "independent_commits", "merge_trees"]


async def merge_trees(git: Git, ours: str, theirs: str) -> tuple[str, list[str]]:
    """Merge commit *theirs* into *ours*: the merged tree, and the paths that conflict.

    With conflicts the tree holds conflict markers and must not be committed.
    """
    check_ids(ours, theirs)
    result = await git.run(
        "merge-tree",
        "--write-tree",
        "--name-only",
        "--no-messages",
        "--end-of-options",
        ours,
        theirs,
        check=False,
    )
    lines = result.stdout.decode(errors="replace").splitlines()
    if result.returncode not in (0, 1) or not lines:
        raise GitError(
            ["merge-tree", "--write-tree", ours, theirs],
            result.returncode,
            result.stderr.decode(errors="replace"),
        )
    conflicts = sorted({line for line in lines[1:] if line}) if result.returncode == 1 else []
    return lines[0], conflicts


async def changed_files(git: Git, old: str, new: str, *, limit: int) -> tuple[list[str], int]:
    """The paths whose content differs between commits *old* and *new* (added, changed,
    deleted; a rename is a deletion and an addition), sorted: the first *limit* of them, and
    how many more there are. Compares trees only: no attribute, filter or driver runs."""
    check_ids(old, new)
    if old == new:
        return [], 0
    out = await git.run(
        "diff-tree",
        "-r",
        "-z",
        "--name-only",
        "--no-renames",
        "--no-commit-id",
        "--end-of-options",
        old,
        new,
    )
    paths = sorted({p.decode("utf-8", "replace") for p in out.stdout.split(b"\0") if p})
    return paths[:limit], max(0, len(paths) - limit)


async def independent_commits(git: Git, commits: Sequence[str]) -> list[str]:
    """*commits* without those that another of them already contains, in the given order."""
    unique = list(dict.fromkeys(commits))
    check_ids(*unique)
    if len(unique) < 2:
        return unique
    kept = set((await git.out("merge-base", "--independent", "--end-of-options", *unique)).split())
    return [c for c in unique if c in kept]


@dataclass(frozen=True)
class Combined:
    """The result of :func:`combine_commits`.

    Either ``commit`` and ``tree`` (a clean merge), or ``conflicts`` with the paths, and
    ``conflicting`` the index (in the commits given) of the one whose merge into the ones
    before it conflicted.
    """

    commit: str | None
    tree: str | None
    conflicts: list[str] = field(default_factory=list)
    conflicting: int | None = None


async def combine_commits(
    git: Git, commits: Sequence[str], *, message: str, env: dict[str, str] | None = None
) -> Combined:
    """One commit holding all of *commits*: itself for one, else a merge commit of them all.

    Commits that another one already contains are dropped first; the rest are merged in the
    given order (each into the merge of the ones before it) and the result is committed once,
    with the remaining commits as its parents in that order, dated like the newest of them:
    with the same identity and *message*, the same commits always give the same merge commit.
    *env* carries the committer identity (see ``Git.identity_env``).
    """
    if not commits:
        raise ValueError("combine_commits needs at least one commit")
    heads = await independent_commits(git, commits)
    if len(heads) == 1:
        tree = await git.out("rev-parse", "--verify", "--end-of-options", f"{heads[0]}^{{tree}}")
        return Combined(heads[0], tree)
    identity = env if env is not None else await git.identity_env()
    current, tree = heads[0], ""
    for position, head in enumerate(heads[1:], start=1):
        tree, conflicts = await merge_trees(git, current, head)
        if conflicts:
            return Combined(None, None, conflicts, commits.index(head))
        if position < len(heads) - 1:
            # An intermediate commit, so that the next merge finds the right merge base; it
            # is not referenced by anything once the final commit exists.
            current = await git.out(
                "commit-tree",
                "-p",
                current,
                "-p",
                head,
                "-m",
                message,
                "--end-of-options",
                tree,
                env=identity,
            )
    # Dated like its newest parent, so that the same results merged again (in another run,
    # say) give the same commit: a dependent's start, and so its cache key, is reproducible.
    newest = max(
        int(t)
        for t in (await git.out("show", "-s", "--format=%ct", "--end-of-options", *heads)).split()
    )
    dated = {
        **identity,
        "GIT_AUTHOR_DATE": f"@{newest} +0000",
        "GIT_COMMITTER_DATE": f"@{newest} +0000",
    }
    parents = [arg for head in heads for arg in ("-p", head)]
    commit = await git.out(
        "commit-tree", *parents, "-m", message, "--end-of-options", tree, env=dated
    )
    return Combined(commit, tree)
