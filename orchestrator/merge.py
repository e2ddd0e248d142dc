"""Merging commits without a working tree: ``git merge-tree --write-tree`` and ``commit-tree``.

A merge computed this way touches no checkout and takes no lock (it only adds objects to the
object database, which git makes safe for concurrent writers), so a dependent task's start
commit and a merge-back's result are built beside running tasks without disturbing them. The
outcome is the same tree a ``git merge`` in a scratch worktree would produce (the same
merge machinery, ``ort``), without writing a single file.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ._git import Git, check_ids
from .errors import GitError

__all__ = [
    "Changes",
    "Combined",
    "chain_disjoint",
    "chain_safe",
    "changed_files",
    "combine_commits",
    "independent_commits",
    "merge_trees",
]


#: Most bytes of ``diff-tree`` read to tell a dependent task which paths its dependency
#: changed (of which it is told at most 100).
MAX_LISTING_BYTES = 16 << 20


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
        "-z",  # names as they are: without it, git quotes a name that is not plain ASCII
        "--end-of-options",
        ours,
        theirs,
        check=False,
    )
    lines = result.stdout.decode(errors="replace").split("\0")
    if result.returncode not in (0, 1) or not lines[0]:
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
    how many more there are. Compares trees only: no attribute, filter or driver runs.

    The listing is read up to :data:`MAX_LISTING_BYTES` (hundreds of thousands of paths): an
    agent's commit of millions of files is not held whole for a list of *limit*. Past that,
    the count of the rest is a lower bound (what was read, and one more)."""
    check_ids(old, new)
    if old == new:
        return [], 0
    out, cut = await git.read(
        "diff-tree",
        "-r",
        "-z",
        "--name-only",
        "--no-renames",
        "--no-commit-id",
        "--ignore-submodules=none",
        "--end-of-options",
        old,
        new,
        stdin=b"",
        limit=MAX_LISTING_BYTES,
        timeout=math.inf,  # trees only: nothing an agent left in a worktree can block it
    )
    names = out.split(b"\0")
    if cut:
        names.pop()  # cut short in the middle of a name
    paths = sorted({p.decode("utf-8", "replace") for p in names if p})
    return paths[:limit], max(0, len(paths) - limit) + (1 if cut else 0)


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


#: A commit's changes since a base: each path's new ``(mode, blob)``, or None if removed.
Changes = Mapping[bytes, "tuple[bytes, bytes] | None"]


async def chain_disjoint(
    git: Git,
    start: str,
    merges: Sequence[tuple[str, str, Changes | None]],
    *,
    base: str,
    env: dict[str, str],
) -> list[str]:
    """Merge commits of *merges* (``(commit, message, changes)``), each on the one before,
    the first on *start*: their commits, in order. In one ``git fast-import``, with each
    commit's changes since *base* as given, or read with one ``diff-tree`` where None: in
    time linear in the number of merges.

    Only for commits known to merge cleanly by taking each one's changes as they are: each
    descends from *base*, no two of them (nor any with *start*) changed the same path, a
    path against a directory, or a directory one removed from and the other added to, and
    none shares a commit with another since *base* (see orchestrator/overlap.py). Then the
    merge ``git merge-tree`` would make is *start*'s tree with each commit's changes since
    *base* applied, which is what is written. *env* carries the identity (see
    ``Git.identity_env``). ValueError when a commit holds a path fast-import would not
    write as merge-tree does (see :func:`chain_safe`), GitError when fast-import fails (its
    crash report, which holds the stream, is removed): the caller merges the other way.
    """
    check_ids(start, base, *(c for c, _, _ in merges))
    if not merges:
        return []
    author, committer = await git.ident_lines(env)
    ref = f"refs/orchestrator/building/{uuid.uuid4().hex}".encode()
    stream = [b"feature done\n"]
    for number, (commit, message, known) in enumerate(merges, start=1):
        data = message.encode()
        stream += [
            b"commit " + ref + b"\n",
            b"mark :%d\n" % number,
            b"author " + author + b"\n",
            b"committer " + committer + b"\n",
            b"data %d\n" % len(data) + data + b"\n",
            (b"from " + start.encode() if number == 1 else b"from :%d" % (number - 1)) + b"\n",
            b"merge " + commit.encode() + b"\n",
        ]
        changes = known if known is not None else await _changes(git, base, commit)
        if not chain_safe(changes):
            raise ValueError(f"{commit} holds a path fast-import does not take as it is")
        # Removals first: a file that became a directory (or the other way round) must be
        # gone before what replaces it is written, or the removal would take that too.
        for path, state in changes.items():
            if state is None:
                stream.append(b"D " + _quoted(path) + b"\n")
        for path, state in changes.items():
            if state is not None:
                stream.append(b"M " + state[0] + b" " + state[1] + b" " + _quoted(path) + b"\n")
        stream.append(b"\n")
    # The commits' names, on standard output; then a reset without "from", which leaves no
    # ref behind: the commits are objects only.
    stream += [b"get-mark :%d\n" % number for number in range(1, len(merges) + 1)]
    stream += [b"reset " + ref + b"\n\n", b"done\n"]
    started = time.time()
    # ignorecase off: fast-import would otherwise match paths as a Windows or macOS
    # checkout does, which merge-tree and the prediction do not. Its pack kept however
    # small: loosening it is a git process more (unpack-objects); the user's gc packs it.
    out = await git.run(
        "-c",
        "core.ignorecase=false",
        "-c",
        "fastimport.unpackLimit=0",
        "fast-import",
        "--quiet",
        "--done",
        stdin=b"".join(stream),
        check=False,
    )
    if out.returncode != 0:
        _forget_crash_reports(git, started)
        stderr = out.stderr.decode(errors="replace")
        cause = next((line for line in stderr.splitlines() if line.startswith("fatal:")), stderr)
        raise GitError(["fast-import"], out.returncode, cause)
    made = out.stdout.decode("ascii", "replace").split()
    if len(made) != len(merges):
        raise GitError(["fast-import"], 0, f"named {len(made)} commits, not {len(merges)}")
    return made


def _forget_crash_reports(git: Git, since: float) -> None:
    """Remove the crash report a failed fast-import leaves in the repository
    (``fast_import_crash_<pid>``: the whole stream, paths, identity and messages)."""
    for directory in {git.repo / ".git", git.repo}:
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                if entry.name.startswith("fast_import_crash_") and entry.is_file(
                    follow_symlinks=False
                ):
                    with contextlib.suppress(OSError):
                        if entry.stat(follow_symlinks=False).st_mtime >= since - 1:
                            os.unlink(entry.path)


def chain_safe(changes: Changes) -> bool:
    """Whether every path of *changes* is one fast-import writes as merge-tree would: no
    empty, ``.`` or ``..`` component, no leading or trailing slash (a tree a result made
    by hand can hold such names; merge-tree carries them over, fast-import refuses them)."""
    return all(
        path and all(part not in (b"", b".", b"..") for part in path.split(b"/"))
        for path in changes
    )


async def _changes(git: Git, base: str, commit: str) -> Changes:
    """What *commit* changed since *base*."""
    out = await git.run(
        "diff-tree",
        "-r",
        "-z",
        "--raw",
        "--no-renames",
        "--no-abbrev",
        "--no-commit-id",
        "--ignore-submodules=none",
        "--end-of-options",
        base,
        commit,
    )
    fields = out.stdout.split(b"\0")
    changes: dict[bytes, tuple[bytes, bytes] | None] = {}
    for header, path in zip(fields[0::2], fields[1::2], strict=False):
        parts = header[1:].split(b" ") if header.startswith(b":") else []
        if len(parts) == 5:
            changes[path] = None if parts[4].startswith(b"D") else (parts[1], parts[3])
    return changes


def _quoted(path: bytes) -> bytes:
    """*path* as fast-import reads a quoted path: C-style, every byte outside printable
    ASCII, the quote and the backslash escaped."""
    out = bytearray(b'"')
    for byte in path:
        if byte in (0x22, 0x5C):
            out += b"\\" + bytes([byte])
        elif 0x20 <= byte < 0x7F:
            out.append(byte)
        else:
            out += b"\\%03o" % byte
    return bytes(out + b'"')
