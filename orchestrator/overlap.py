"""Which results may conflict: each result's changes listed once, compared in Python.

Predicting a merge's conflicts by running ``git merge-tree`` on every pair of N results is
N(N-1)/2 processes: 15 s for 128 results here, minutes for 500. Two results can only conflict
where both changed something, so each result's changes since the report's base are read
once (one ``git log`` of them all, :func:`touched_together`; one each where that is too long
to hold) and ``merge-tree`` runs only for the pairs whose changes touch
(:func:`may_conflict`); what it says of those is the prediction, as before.

Exact, not a heuristic: two results are left unchecked only when neither can reach the
other's changes. The argument, for commits A and B that both descend from the base R:

- if no commit is in both ``R..A`` and ``R..B``, every common ancestor of A and B is
  reachable from R, so R is their merge base: the merge ``git merge-tree A B`` makes is of
  A's and B's changes since R;
- every path whose content A changed since R was changed by some commit of ``R..A`` (a merge
  commit's own changes against each of its parents included), so the paths those commits
  name are a superset of A's changes;
- a merge of two sides that changed disjoint sets of paths, where no path of one is a
  directory of the other (a file against a directory), and where one side removed nothing
  from a directory the other added to (git's directory-rename detection would move the
  addition), is clean.

A result that does not descend from R, or whose changes cannot be read, is checked against
every other (the old way), and so is any pair that shares a commit.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from envelopes import is_object_id

from ._git import Git, check_ids
from .errors import GitError

__all__ = ["Touched", "candidate_pairs", "may_conflict", "touched", "touched_together"]

#: Most bytes of ``git log`` read for one result; a result that changed more is checked
#: against every other rather than held in memory.
MAX_LOG_BYTES = 64 << 20
#: Longest one such log may take (a bound on a git command, as every read of git's has).
LOG_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Touched:
    """What a commit changed since the base: its commits, and the paths they changed."""

    commits: frozenset[str]
    paths: frozenset[str]
    #: Every directory above a changed path (not the root).
    directories: frozenset[str]
    #: Every directory above a path some commit removed, and above one some commit added.
    removed_from: frozenset[str]
    added_to: frozenset[str]
    #: Each changed path's state at the commit, ``(mode, blob)`` or None where it was
    #: removed, as raw bytes; None when the history has a merge (what it holds is then
    #: asked of git: see merge.chain_disjoint).
    final: dict[bytes, tuple[bytes, bytes] | None] | None = field(default=None, compare=False)

    @classmethod
    def of(cls, commits: Iterable[str], changes: Iterable[tuple[str, str]]) -> Touched:
        """From *commits* and their *changes*, ``(status, path)`` as ``--name-status``
        gives them (A, D, M, T)."""
        paths: set[str] = set()
        removed: set[str] = set()
        added: set[str] = set()
        for status, path in changes:
            paths.add(path)
            if status == "D":
                removed.update(_above(path))
            elif status == "A":
                added.update(_above(path))
        directories = {d for p in paths for d in _above(p)}
        return cls(
            frozenset(commits),
            frozenset(paths),
            frozenset(directories),
            frozenset(removed),
            frozenset(added),
        )


def _above(path: str) -> list[str]:
    """The directories above *path*, nearest last: ``a/b/c`` gives ``a``, ``a/b``."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def may_conflict(a: Touched, b: Touched) -> bool:
    """Whether merging the two could conflict (see the module's docstring): False only
    when it cannot."""
    return bool(
        a.commits & b.commits
        or a.paths & b.paths
        or a.paths & b.directories
        or b.paths & a.directories
        or a.removed_from & b.added_to
        or b.removed_from & a.added_to
    )


async def _log(git: Git, base: str, tips: Sequence[str]) -> bytes | None:
    """``git log`` of what *tips* hold that *base* does not, in the format the parsers read;
    None when it is longer than MAX_LOG_BYTES (not held, whatever its length) or git fails."""
    try:
        log, cut = await git.read(
            "log",
            "--boundary",
            "--topo-order",  # a child before its parents: a path's first entry is its last change
            "--no-renames",
            "--ignore-submodules=none",  # whatever .gitmodules or the config say: merges see them
            "--raw",
            "--no-abbrev",
            "-z",
            "--diff-merges=separate",
            "--format=%x01%m%H %P",
            # The revisions on its input, not as arguments: one per result, tens of
            # thousands of them would pass the kernel's bound on arguments (E2BIG).
            "--stdin",
            stdin="".join(f"{rev}\n" for rev in (f"^{base}", *tips)).encode(),
            limit=MAX_LOG_BYTES,
            timeout=LOG_TIMEOUT_S,
        )
    except GitError:
        return None
    return None if cut else log


async def touched(git: Git, base: str, commit: str) -> Touched | None:
    """What *commit* changed since *base* (one ``git log``); None when it does not descend
    from *base*, or its log is too long to hold or cannot be read. The base itself changed
    nothing."""
    check_ids(base, commit)
    if commit == base:
        return Touched.of((), ())
    log = await _log(git, base, [commit])
    if log is None:
        return None
    parsed = _parse_log(log, base)
    if parsed is None:
        return None
    commits, changes, final = parsed
    return dataclasses.replace(Touched.of(commits, changes), final=final)


class _NotALog(ValueError):
    """A log's output is not what was asked for."""


class _Header(NamedTuple):
    """A commit's header in a log: ``>`` for a commit the range lists, ``-`` for a boundary
    one (the base's side), and the commit's id followed by its parents'."""

    mark: bytes
    ids: list[str]


class _Change(NamedTuple):
    """A change in a log: its raw fields (``:<old mode> <new mode> <old blob> <new blob>
    <status>``, the colon left out) and its path."""

    fields: list[bytes]
    path: bytes


def _log_entries(data: bytes) -> Iterator[_Header | _Change]:
    """The headers and changes of a log in *data* (see :func:`touched`'s format), in order;
    _NotALog on anything else.

    Read token by token (``-z``: every field ends with a NUL): a path is only ever the
    token after a change's header, so no byte a path holds (a ``\\x01``, a ``-``) can
    pass for a commit's header."""
    tokens = iter(data.split(b"\0"))
    for token in tokens:
        token = token.lstrip(b"\n")
        if not token:
            continue
        if token.startswith(b"\x01"):
            mark, ids = token[1:2], token[2:].decode("ascii", "replace").split()
            if mark not in (b">", b"-") or not ids or not all(map(is_object_id, ids)):
                raise _NotALog
            yield _Header(mark, ids)
        elif token.startswith(b":"):
            path = next(tokens, b"")
            fields = token[1:].split(b" ")
            if len(fields) != 5 or not path:
                raise _NotALog
            yield _Change(fields, path)
        else:
            raise _NotALog


def _parse_log(
    data: bytes, base: str
) -> tuple[list[str], list[tuple[str, str]], dict[bytes, tuple[bytes, bytes] | None] | None] | None:
    """The commits, changes and final states in *data* (see :func:`touched`'s format), or
    None when the range does not join *base* or the output is not what was asked for."""
    commits: list[str] = []
    changes: list[tuple[str, str]] = []
    final: dict[bytes, tuple[bytes, bytes] | None] | None = {}
    descends = boundary = False
    try:
        for entry in _log_entries(data):
            if isinstance(entry, _Header):
                boundary = entry.mark == b"-"
                if boundary:
                    # The base, when the range joins it (a parent of one of its commits);
                    # a boundary commit's own changes are not the result's.
                    descends = descends or entry.ids[0] == base
                    continue
                commits.append(entry.ids[0])
                if len(entry.ids) > 2:
                    final = None  # a merge: a path's first entry is not simply its last change
                continue
            if boundary:
                continue
            status = entry.fields[4][:1]
            changes.append(
                (status.decode("ascii", "replace"), entry.path.decode("utf-8", "surrogateescape"))
            )
            if final is not None and entry.path not in final:
                final[entry.path] = None if status == b"D" else (entry.fields[1], entry.fields[3])
    except _NotALog:
        return None
    return (commits, changes, final) if descends else None


async def touched_together(
    git: Git, base: str, commits: Sequence[str]
) -> list[Touched | None] | None:
    """:func:`touched` of each of *commits*, from one ``git log`` of them all: each commit
    git lists once, and each of *commits* gets the commits its parents lead to (the same
    answer as a log of each, in one git process instead of one each). None when that log
    cannot serve (too long to hold, unreadable, not what was asked for): the caller then
    reads each on its own, where only the ones too long go unknown."""
    check_ids(base, *commits)
    tips = sorted(set(commits) - {base})
    if not tips:
        return [Touched.of((), ()) for _ in commits]
    log = await _log(git, base, tips)
    graph = None if log is None else _parse_union(log)
    if graph is None:
        return None
    found = {commit: _walk(graph, base, commit) for commit in tips if commit in graph}
    for commit in tips:
        if commit not in graph:
            # Listed by no log of them all: an ancestor of the base (None), or an id git
            # peels to a commit the log lists under the commit's own id (an annotated tag):
            # its own log says which.
            found[commit] = await touched(git, base, commit)
    return [Touched.of((), ()) if commit == base else found[commit] for commit in commits]


@dataclass
class _Listed:
    """A commit of a log of several results: its parents, and its changes in log order."""

    order: int
    parents: list[str]
    changes: list[tuple[bytes, bytes, bytes, bytes]] = field(default_factory=list)


def _parse_union(data: bytes) -> dict[str, _Listed] | None:
    """The commits a log of several tips lists (boundary commits left out), or None when the
    output is not what was asked for (:func:`_log_entries`)."""
    listed: dict[str, _Listed] = {}
    current: _Listed | None = None
    boundary = False  # a boundary commit seen
    try:
        for entry in _log_entries(data):
            if isinstance(entry, _Change):
                if not (listed or boundary):
                    return None  # a change before any commit
                if current is not None:
                    fields = entry.fields
                    current.changes.append((fields[4][:1], entry.path, fields[1], fields[3]))
            elif entry.mark == b"-":
                current, boundary = None, True  # the base's side: its changes not listed
            else:
                # A merge's header comes once for each parent (--diff-merges=separate).
                current = listed.setdefault(entry.ids[0], _Listed(len(listed), entry.ids[1:]))
    except _NotALog:
        return None
    return listed


def _walk(graph: dict[str, _Listed], base: str, tip: str) -> Touched | None:
    """What *tip* changed since *base*, from the commits of *graph* its parents lead to:
    None when it does not descend from *base* (no listed commit of it has *base* as a
    parent), as :func:`touched` says."""
    if tip not in graph:
        return None  # listed by no log: the base holds it, yet it is not the base
    mine: list[str] = []
    descends = False
    seen = {tip}
    stack = [tip]
    while stack:
        commit = stack.pop()
        mine.append(commit)
        for parent in graph[commit].parents:
            if parent in graph:
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
            elif parent == base:
                descends = True  # a parent the log left out is the base's side
    if not descends:
        return None
    mine.sort(key=lambda c: graph[c].order)  # the log's order: a child before its parents
    final: dict[bytes, tuple[bytes, bytes] | None] | None = {}
    changes: list[tuple[str, str]] = []
    for commit in mine:
        if len(graph[commit].parents) > 1:
            final = None
        for status, path, mode, blob in graph[commit].changes:
            changes.append(
                (status.decode("ascii", "replace"), path.decode("utf-8", "surrogateescape"))
            )
            if final is not None and path not in final:
                final[path] = None if status == b"D" else (mode, blob)
    return dataclasses.replace(Touched.of(mine, changes), final=final)


def candidate_pairs(items: Sequence[Touched | None]) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, i < j, of *items* that :func:`may_conflict` (every pair with an
    item that is None), found through an index of what each touched: in time linear in what
    they touched, plus the pairs found."""
    found: set[tuple[int, int]] = set()
    unknown = [i for i, item in enumerate(items) if item is None]
    for i in unknown:
        found.update((min(i, j), max(i, j)) for j in range(len(items)) if j != i)
    by_commit: defaultdict[str, list[int]] = defaultdict(list)
    by_path: defaultdict[str, list[int]] = defaultdict(list)
    by_directory: defaultdict[str, list[int]] = defaultdict(list)
    by_added_to: defaultdict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        if item is None:
            continue
        for commit in item.commits:
            by_commit[commit].append(i)
        for path in item.paths:
            by_path[path].append(i)
        for directory in item.directories:
            by_directory[directory].append(i)
        for directory in item.added_to:
            by_added_to[directory].append(i)
    for group in (*by_commit.values(), *by_path.values()):
        found.update((a, b) for n, a in enumerate(group) for b in group[n + 1 :])
    for i, item in enumerate(items):
        if item is None:
            continue
        for path in item.paths:  # a file here, a directory there
            found.update((min(i, j), max(i, j)) for j in by_directory.get(path, ()) if j != i)
        for directory in item.removed_from:  # a removal here, an addition there
            found.update((min(i, j), max(i, j)) for j in by_added_to.get(directory, ()) if j != i)
    return sorted(found)
