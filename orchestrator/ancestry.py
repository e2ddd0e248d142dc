"""Which commits contain which, for many pairs at once, from one ``git rev-list``.

``verify`` asks, for every result, whether its base commit is an ancestor of its result
commit, and whether its branch still contains it: one ``git merge-base --is-ancestor`` each
is one process per result (about 5 s for 1,000 results). Here one ``git rev-list --parents``
lists every commit above the run's base that the results and branches reach, with its parents,
and the questions are answered by walking that graph in memory.

Why the walk is exact: let *G* be the commits reachable from the tips but not from the root
(the run's base). For an *ancestor* that is the root or in *G*, every commit on a path from a
descendant down to it descends from it, so is not reachable from the root (it would make the
ancestor an ancestor of the root, outside *G*, or be the root itself), so is in *G*: the walk
within *G* finds the path if there is one (history is acyclic: grafts, which could make a
cycle, are not read). A pair the graph cannot decide (an ancestor below the root, a
descendant outside *G*) is asked of git, one process each (none for a report the orchestrator
wrote); so is every pair once the walks have visited a few times the graph's size, and every
pair when the graph is larger than MAX_GRAPH_BYTES of git's output: a forged report costs no
more than verify did before, one process per result.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._git import Git, check_ids
from .errors import GitError

__all__ = ["Ancestry", "load_ancestry"]


#: Most bytes of ``rev-list`` output read (about 400,000 commits): a report whose results sit
#: far above its base, or on another history, is checked pair by pair instead.
MAX_GRAPH_BYTES = 32 << 20
#: Longest the one ``rev-list`` may run.
GRAPH_TIMEOUT_S = 60.0


class Ancestry:
    """The parents of every commit above *root* reachable from the tips it was loaded with."""

    def __init__(self, git: Git, root: str | None, parents: dict[str, list[str]]) -> None:
        self._git = git
        self._root = root
        self._parents = parents
        #: How many pairs had to be asked of git (none in the common case).
        self.asked = 0
        self._known: dict[tuple[str, str], bool] = {}
        #: Commits the walks may still visit, in all: a walk per result is cheap when results
        #: sit just above their bases; a forged report whose every answer is a walk of the
        #: whole graph is, past this, asked of git pair by pair (as verify did before).
        self._budget = 4 * len(parents) + 100_000

    async def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """Whether *ancestor* is *descendant* or one of its ancestors (both checked ids)."""
        if ancestor == descendant:
            return True
        key = (ancestor, descendant)
        if key not in self._known:
            found = self._walk(ancestor, descendant)
            if found is None:
                self.asked += 1
                check_ids(ancestor, descendant)
                found = await self._git.ok(
                    "merge-base", "--is-ancestor", "--end-of-options", ancestor, descendant
                )
            self._known[key] = found
        return self._known[key]

    def _walk(self, ancestor: str, descendant: str) -> bool | None:
        """The answer from the graph, or None when it cannot say (or the budget is spent)."""
        parents = self._parents
        if descendant not in parents or (ancestor != self._root and ancestor not in parents):
            return None
        seen = {descendant}
        todo = [descendant]
        while todo:
            self._budget -= 1
            if self._budget < 0:
                return None
            for parent in parents[todo.pop()]:
                if parent == ancestor:
                    return True
                if parent in parents and parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
        return False


async def load_ancestry(git: Git, root: str | None, tips: Iterable[str]) -> Ancestry:
    """The graph above *root* (None: the whole history is not loaded, every pair is asked of
    git) reachable from *tips*, which must be existing commits' checked ids. One git process.
    """
    wanted = sorted(set(tips) - {root} if root else set())
    if root is None or not wanted:
        return Ancestry(git, root, {})
    check_ids(root, *wanted)
    stdin = "\n".join([*wanted, f"^{root}"]) + "\n"  # "--not" on stdin needs git 2.42
    try:
        listed, cut = await git.read(
            "rev-list",
            "--parents",
            "--stdin",
            stdin=stdin.encode(),
            limit=MAX_GRAPH_BYTES,
            timeout=GRAPH_TIMEOUT_S,
        )
    except GitError:
        return Ancestry(git, root, {})  # every pair asked of git instead
    if cut:
        return Ancestry(git, root, {})
    parents: dict[str, list[str]] = {}
    for line in listed.decode().splitlines():
        commit, *above = line.split()
        parents[commit] = above
    return Ancestry(git, root, parents)
