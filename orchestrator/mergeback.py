"""Merge-back: a run's results into one branch, all or nothing, in one compare-and-swap move.

Conflicts are predicted first, for every pair of results and for each against the target,
with ``git merge-tree --write-tree`` (see merge.py): no checkout is touched and nothing moves.
The merge is then built the same way, one merge commit per result on top of the target's tip,
in the object database only. The target ref moves once, at the end, with
``git update-ref REF NEW OLD``: a concurrent change of the target makes the move fail instead
of being lost. A checkout of the target moves along, and is never touched when it has
uncommitted changes.

A checked merge (``check``, see orchestrator/mergecheck.py) runs the tasks' required checks on
the combined tree before the move, and moves nothing when one fails. A train merges the
results one at a time, in dependency order, keeps each only if the combined tree still passes
its checks, and leaves the others out (a result that conflicts with what was kept, or that
contains a result left out, too); the target still moves once, at the end.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from envelopes import (
    LeftOutTask,
    MergeCheck,
    MergeConflict,
    MergedTask,
    MergeFinished,
    MergePredicted,
    MergeRecord,
    MergeStatus,
    NotAReport,
    Report,
    TaskResult,
    digest_without,
    load_report_json,
    report_digest,
    seal_report,
    upstream_tasks,
)

from ._fs import atomic_write
from ._git import Git, check_ids
from .errors import GitError, MergeError, ReportUnreadable, RunDirError
from .locks import RepoLock
from .merge import Changes, chain_disjoint, merge_trees
from .mergecheck import MergeChecker, MergeCheckSettings, failed_steps
from .overlap import Touched, candidate_pairs, touched, touched_together
from .repo import NotARepository, Repository
from .report import report_bytes
from .worktree import checkout_of

if TYPE_CHECKING:
    from envelopes import Event

    from .context import EventHandler

__all__ = ["merge_results", "open_merge_repository", "predict_conflicts", "record_merge"]

#: Concurrent ``git merge-tree`` processes while predicting.
_PREDICT_LIMIT = 8


@dataclass(frozen=True)
class _Pick:
    """A result chosen for the merge."""

    task_id: str
    branch: str | None
    commit: str
    changed: bool


async def merge_results(
    report: Report,
    *,
    into: str,
    tasks: Sequence[str] | None = None,
    repo: Repository | Path | str | None = None,
    dry_run: bool = False,
    on_event: EventHandler | None = None,
    check: MergeCheckSettings | None = None,
) -> MergeRecord:
    """Merge the results of *report* into branch *into*: every one, or none.

    Selected: every succeeded task with a result commit, but of a ``first_success`` group only
    its selected member; *tasks* restricts that to the ids given (a group's name stands for
    its selected members). They are merged in dependency order (ties in report order), each
    with a merge commit on top of the previous one; a task that changed nothing, or whose
    result the target already contains, is listed with ``merge_commit`` None.

    The returned record's ``status``: ``merged`` (the target moved from ``old_commit`` to
    ``new_commit``, once; equal when it already held every result); ``conflict`` (predicted
    or met while building: ``conflicts`` says which pairs and paths); ``refused`` (the target
    is checked out with uncommitted changes, that checkout cannot move, or the target changed
    while merging). With *dry_run* nothing moves: conflicts are predicted and the merge is
    built (unreferenced objects only); the status is ``skipped`` when it would merge cleanly,
    else ``conflict`` or ``refused`` as above, and no merge commit is named.

    With *check* (see orchestrator/mergecheck.py) the merge is checked: the tasks' required
    checks run on the combined tree (a dry run's too), and the target moves only if they
    pass; else the status is ``check_failed``. With ``check.train`` the results are merged
    one at a time, each kept only if the combined tree still passes; the others are in the
    record's ``left_out`` with the reason (so is a selected task that did not succeed: a
    train leaves it out rather than refusing), and the status is ``check_failed`` (or
    ``conflict``) only when every changed result was left out.

    Raises MergeError on bad input (see its docstring; for *check*, tasks with no required
    check or an envelope that does not match the report), before anything moves. *on_event*
    (sync or async) gets ``MergePredicted`` and ``MergeFinished``; its exceptions propagate.
    Cancellation: git commands run to their end, a running check is stopped and its scratch
    worktree removed; the ref and checkout move together under the repository lock,
    shielded, so a cancellation leaves the target either unchanged or merged.
    """
    repository = await open_merge_repository(report, repo)
    try:
        return await _merge_results(report, repository, into, tasks, dry_run, on_event, check)
    finally:
        if not isinstance(repo, Repository):
            repository.lock.close()


async def _merge_results(
    report: Report,
    repository: Repository,
    into: str,
    tasks: Sequence[str] | None,
    dry_run: bool,
    on_event: EventHandler | None,
    check: MergeCheckSettings | None,
) -> MergeRecord:
    git = repository.git
    into = into.removeprefix("refs/heads/")
    ref = f"refs/heads/{into}"
    if into.startswith("-") or not await git.ok("check-ref-format", ref):
        raise MergeError(f"{into!r} is not a valid branch name")
    old = await _tip(git, ref)
    if old is None:
        raise MergeError(f"branch {into!r} does not exist in {repository.root}")
    train = check is not None and check.train
    chosen, left_out = _select(report, tasks, train=train)
    picks = _in_dependency_order(report, chosen)
    await _check_picks(git, picks, repository.root)
    checker = None
    if check is not None:
        checker = await MergeChecker.open(repository, report, [p.task_id for p in picks], check)
    changed = [p for p in picks if p.changed]
    logs = _Logs()
    if report.base_commit is not None:
        # Each result's changes since the base, read once: for the prediction, and for
        # knowing which results the target (and the merges built) already hold.
        logs = await _Logs.read(git, report.base_commit, [p.commit for p in changed], old)
    items = logs.items or None
    conflicts = await _predict(git, [(p.task_id, p.commit) for p in changed], (into, old), items)
    await _emit(
        on_event,
        MergePredicted(
            run_id=report.run_id, into=into, tasks=[p.task_id for p in picks], conflicts=conflicts
        ),
    )
    if checker is not None and train:
        state = _Train(repository, report.run_id, into, old, checker, dry_run, left_out)
        record = await state.run(picks)
    else:
        record = await _merge(
            repository, report.run_id, picks, into, old, conflicts, dry_run, checker, logs
        )
    await _emit(
        on_event,
        MergeFinished(
            run_id=report.run_id,
            into=into,
            status=record.status,
            new_commit=record.new_commit,
            message=record.message,
        ),
    )
    return record


async def predict_conflicts(
    git: Git,
    commits: Sequence[tuple[str, str]],
    *,
    target: tuple[str, str],
    base: str | None = None,
) -> list[MergeConflict]:
    """Conflicts between every pair of *commits* (``(name, commit)``), then of each with *target*.

    Computed with ``git merge-tree --write-tree``: nothing is checked out and no ref moves.
    Against the target, ``right`` is the target's name. With *base* (the commit the results
    started from), each commit's changes since it are read once and only the pairs whose
    changes touch are merged (see orchestrator/overlap.py): the same answer, in git
    processes linear in the number of commits rather than quadratic.
    """
    items = None
    if base is not None:
        items = await _touched_all(git, base, [*(c for _, c in commits), target[1]])
    return await _predict(git, commits, target, items)


async def _predict(
    git: Git,
    commits: Sequence[tuple[str, str]],
    target: tuple[str, str],
    items: Sequence[Touched | None] | None,
) -> list[MergeConflict]:
    """predict_conflicts, with each commit's changes (and the target's, last) already read
    (*items*), or None to merge every pair."""
    everything = [*commits, target]
    if items is None:
        wanted = [(i, j) for i in range(len(everything)) for j in range(i + 1, len(everything))]
    else:
        wanted = candidate_pairs(items)
    last = len(commits)
    # The pairs of results first, then each against the target, as before.
    pairs = sorted(wanted, key=lambda p: (p[1] == last, p[0], p[1]))
    found: list[list[str]] = [[] for _ in pairs]
    failures: list[GitError] = []
    limiter = anyio.CapacityLimiter(_PREDICT_LIMIT)

    async def predict(slot: int, ours: str, theirs: str) -> None:
        async with limiter:
            try:
                found[slot] = (await merge_trees(git, ours, theirs))[1]
            except GitError as exc:
                # Kept, not raised: out of the task group it would come wrapped in a group.
                failures.append(exc)

    async with anyio.create_task_group() as tg:
        for slot, (i, j) in enumerate(pairs):
            tg.start_soon(predict, slot, everything[i][1], everything[j][1])
    if failures:
        raise failures[0]
    return [
        MergeConflict(left=everything[i][0], right=everything[j][0], paths=paths)
        for (i, j), paths in zip(pairs, found, strict=True)
        if paths
    ]


@dataclass
class _Logs:
    """Each result's changes since the base as the prediction read them, by result commit,
    and the target's: what says, without asking git, whether the target and the results
    merged so far already hold a result. (A commit of ``base..X`` is an ancestor of X; a
    result that descends from the base is an ancestor of X only if it is one of them.)"""

    items: list[Touched | None] = field(default_factory=list)
    by_commit: dict[str, Touched | None] = field(default_factory=dict)
    target: Touched | None = None
    base: str = ""

    @classmethod
    async def read(cls, git: Git, base: str, commits: Sequence[str], target: str) -> _Logs:
        items = await _touched_all(git, base, [*commits, target])
        return cls(items, dict(zip(commits, items[:-1], strict=True)), items[-1], base)

    @property
    def disjoint(self) -> bool:
        """Every result's and the target's changes are known, and no two of them touch: the
        merge is each result's changes applied in turn (see merge.chain_disjoint)."""
        return (
            bool(self.items)
            and all(item is not None for item in self.items)
            and not candidate_pairs(self.items)
        )

    def holds(self, held: set[str] | None, commit: str) -> bool | None:
        """Whether *commit* is among *held* (the commits since the base that the target and
        the merges so far hold): None when the logs cannot say (a log missing)."""
        if held is None or self.by_commit.get(commit) is None:
            return None
        if commit == self.base:
            return True  # the target descends from the base (its log says so): it holds it
        return commit in held


async def _touched_all(git: Git, base: str, commits: Sequence[str]) -> list[Touched | None]:
    """:func:`overlap.touched` of each of *commits*: from one log of them all, or where that
    cannot serve (too long to hold, an id that is none), from one log each, a few at a time."""
    try:
        together = await touched_together(git, base, commits)
    except GitError:
        together = None  # a name that is no object id: each is judged on its own below
    if together is not None:
        return together
    out: list[Touched | None] = [None] * len(commits)
    limiter = anyio.CapacityLimiter(_PREDICT_LIMIT)

    async def one(slot: int, commit: str) -> None:
        async with limiter:
            try:
                out[slot] = await touched(git, base, commit)
            except GitError:
                out[slot] = None  # checked against every other, whose merge-tree says why

    async with anyio.create_task_group() as tg:
        for slot, commit in enumerate(commits):
            tg.start_soon(one, slot, commit)
    return out


async def open_merge_repository(report: Report, repo: Repository | Path | str | None) -> Repository:
    """The repository to merge in: *repo* when given, else the current directory's.

    A report names its repository, but a report may come from anyone: merge never acts on a
    repository only because the report says so. Without *repo*, a report made in another
    repository than the current directory's is refused.
    """
    if isinstance(repo, Repository):
        return repo
    where = Path(repo) if repo is not None else Path.cwd()
    try:
        repository = await Repository.open(where)
    except NotARepository as exc:
        raise MergeError(f"{exc}; merge acts on the repository it runs in, or on --repo") from exc
    if repo is None and report.repo is not None and not _same_place(report.repo, repository):
        repository.lock.close()
        raise MergeError(
            f"the report of run {report.run_id} was made in {report.repo}, not in "
            f"{repository.root} where merge runs; merge there, or pass --repo "
            f"{repository.root} to merge into this repository anyway"
        )
    return repository


def _same_place(named: str, repository: Repository) -> bool:
    """Whether *named* (a report's ``repo``) is *repository*'s top directory or git directory."""
    try:
        where = Path(named).resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return where in (repository.root.resolve(), repository.common_dir.resolve())


async def _tip(git: Git, ref: str) -> str | None:
    """Where *ref* points (None: nowhere); GitError, at once, when its file or reflog is a
    FIFO (see ``Git.unblock_ref``), which would block git for ever."""
    git.unblock_ref(ref)
    found = await git.run(
        "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}", check=False
    )
    if found.returncode != 0:
        return None
    return found.stdout.decode().strip() or None


def _select(
    report: Report, tasks: Sequence[str] | None, *, train: bool = False
) -> tuple[list[TaskResult], list[LeftOutTask]]:
    """The results to merge, in report order, and (for a *train*) the tasks left out because
    they did not succeed; MergeError for a name that cannot be merged."""
    if tasks is None:
        chosen = [
            r
            for r in report.results
            if r.succeeded
            and r.provenance.result_commit
            and (r.group not in report.groups or r.task_id in report.groups[r.group].selected)
        ]
        failed = [r for r in report.results if not r.succeeded and _unmerged(report, r)]
    else:
        chosen, failed = _named(report, tasks, train)
    if not chosen:
        raise MergeError(
            f"nothing to merge: no task of run {report.run_id} succeeded with a result commit"
        )
    left_out = [
        LeftOutTask(task_id=r.task_id, reason=f"it did not succeed (status {r.status})")
        for r in failed
        if train
    ]
    return chosen, left_out


def _unmerged(report: Report, result: TaskResult) -> bool:
    """Whether *result*, which did not succeed, is a result the merge goes without (not a
    group member that another member's success made unneeded)."""
    if result.error is not None and result.error.kind == "not_needed":
        return False
    group = report.groups.get(result.group) if result.group else None
    return group is None or not group.selected or group.select == "all"


def _named(
    report: Report, tasks: Sequence[str], train: bool
) -> tuple[list[TaskResult], list[TaskResult]]:
    """The results *tasks* name (a group's name: its selected members), and those of them
    that did not succeed (MergeError for those unless a *train* leaves them out)."""
    by_id = {r.task_id: r for r in report.results}
    if not tasks:
        raise MergeError("no task named to merge")
    names: list[str] = []
    for name in tasks:
        if name in report.groups:
            selected = report.groups[name].selected
            if not selected:
                raise MergeError(
                    f"group {name} has no selected member: none of its tasks succeeded"
                )
            names += selected
        elif name in by_id:
            names.append(name)
        else:
            raise MergeError(f"unknown task id {name!r}: run {report.run_id} has no such task")
    chosen, failed = [], []
    for name in dict.fromkeys(names):
        result = by_id[name]
        if not result.succeeded and train:
            failed.append(result)
            continue
        if not result.succeeded:
            raise MergeError(
                f"task {name} did not succeed (status {result.status}); only succeeded tasks are merged"
            )
        if not result.provenance.result_commit:
            raise MergeError(f"task {name} has no result commit (it ran without a worktree)")
        chosen.append(result)
    return chosen, failed


def _in_dependency_order(report: Report, chosen: Sequence[TaskResult]) -> list[_Pick]:
    """*chosen* with each task after everything its ``depends_on`` resolves to, ties in report
    order (a cycle, which no run produces, falls back to report order)."""
    groups = {name: {"selected": g.selected} for name, g in report.groups.items()}
    known = {r.task_id for r in report.results}
    needs = {
        r.task_id: set(upstream_tasks({"depends_on": r.depends_on}, groups)) & known
        for r in report.results
    }
    waiting = [r.task_id for r in report.results]
    placed: set[str] = set()
    order: list[str] = []
    while waiting:
        ready = next((t for t in waiting if needs[t] <= placed), waiting[0])
        waiting.remove(ready)
        placed.add(ready)
        order.append(ready)
    rank = {task_id: i for i, task_id in enumerate(order)}
    picks = []
    for result in sorted(chosen, key=lambda r: rank[r.task_id]):
        commit = result.provenance.result_commit
        assert commit is not None  # _select keeps only results with a commit
        picks.append(
            _Pick(result.task_id, result.branch, commit, commit != result.provenance.base_commit)
        )
    return picks


async def _check_picks(git: Git, picks: Sequence[_Pick], root: Path) -> None:
    """Each changed result's commit exists and its branch still holds it; else MergeError."""
    changed = [p for p in picks if p.changed]
    if not changed:
        return
    try:
        check_ids(*(p.commit for p in changed))
    except GitError as exc:
        raise MergeError(f"not merged: {exc.stderr.strip()}") from None
    # One batched lookup for every commit and branch: exact names, where for-each-ref would
    # take each branch as a pattern (a prefix, or a glob).
    wanted = [f"{p.commit}^{{commit}}" for p in changed]
    wanted += [f"refs/heads/{p.branch}" for p in changed if p.branch]
    found = await git.run(
        "cat-file", "--batch-check", stdin=("\n".join(wanted) + "\n").encode(), check=False
    )
    answers = dict(zip(wanted, found.stdout.decode(errors="replace").splitlines(), strict=False))

    def commit_of(name: str) -> str | None:
        parts = answers.get(name, "").split()
        return parts[0] if len(parts) >= 2 and parts[1] == "commit" else None

    for pick in changed:
        exists = commit_of(f"{pick.commit}^{{commit}}") is not None
        tip = commit_of(f"refs/heads/{pick.branch}") if pick.branch else None
        if pick.branch and tip is None:
            recovery = (
                f"its result commit {pick.commit} is still in the repository "
                f"(git branch {pick.branch} {pick.commit} restores it)"
                if exists
                else f"its result commit {pick.commit} is not in the repository either"
            )
            raise MergeError(f"task {pick.task_id}: branch {pick.branch} was deleted; {recovery}")
        if not exists:
            raise MergeError(
                f"task {pick.task_id}: result commit {pick.commit} is not in the repository {root}"
            )
        if (
            tip is not None
            and tip != pick.commit
            and not await git.ok(
                "merge-base", "--is-ancestor", "--end-of-options", pick.commit, tip
            )
        ):
            raise MergeError(
                f"task {pick.task_id}: branch {pick.branch} (at {tip}) no longer contains "
                f"its result commit {pick.commit}"
            )


async def _merge(
    repository: Repository,
    run_id: str,
    picks: Sequence[_Pick],
    into: str,
    old: str,
    conflicts: list[MergeConflict],
    dry_run: bool,
    checker: MergeChecker | None = None,
    logs: _Logs | None = None,
) -> MergeRecord:
    """Build the merge, check it (with *checker*) and, unless *dry_run*, move the target: the
    record of what happened."""
    checks: list[MergeCheck] = []

    def done(
        status: MergeStatus,
        message: str,
        *,
        new: str | None = None,
        merged: dict[str, str] | None = None,
        found: list[MergeConflict] = conflicts,
    ) -> MergeRecord:
        made = merged or {}
        return MergeRecord(
            into=into,
            status=status,
            old_commit=old,
            new_commit=new,
            tasks=[
                MergedTask(
                    task_id=p.task_id, result_commit=p.commit, merge_commit=made.get(p.task_id)
                )
                for p in picks
            ],
            conflicts=found,
            message=("dry run: " if dry_run else "") + message,
            at=datetime.now(UTC),
            mode="check" if checker is not None else None,
            checks=checks,
        )

    if conflicts:
        return done("conflict", f"{len(conflicts)} conflict(s) predicted; {into} not changed")
    built = await _build(repository.git, run_id, picks, into, old, logs or _Logs())
    if isinstance(built, MergeConflict):
        why = f"merging {built.left} conflicts with {built.right.replace('+', ' + ')}"
        return done("conflict", f"{why}; {into} not changed", found=[built])
    new, merged = built
    if new == old:
        if dry_run:  # nothing would move: and a dry run is never "merged" (never recorded)
            return done("skipped", f"nothing to merge: {into} already contains every result")
        return done("merged", f"{into} already contains every result", new=old)
    checkout = await checkout_of(repository, f"refs/heads/{into}")
    if checkout is not None and (refusal := await _dirty(repository.git, into, checkout)):
        return done("refused", refusal)
    if checker is not None:
        checks.append(await checker.check(new, [p.task_id for p in picks]))
        if not checks[-1].passed:
            why = f"{failed_steps(checks[-1])} failed on the combined tree {new[:12]}"
            return done("check_failed", f"{why}; {into} not changed")
    passed = ", its checks passed" if checker is not None else ""
    if dry_run:
        return done(
            "skipped", f"would merge {len(merged)} result(s) into {into}{passed}; nothing moved"
        )
    reflog = f"orchestrator merge: {len(merged)} result(s) of run {run_id}"
    if refusal := await _move(repository, into, old, new, checkout, reflog):
        return done("refused", refusal)
    message = f"merged {len(merged)} result(s) into {into}: {old[:12]} -> {new[:12]}{passed}"
    return done("merged", message, new=new, merged=merged)


async def _build(
    git: Git, run_id: str, picks: Sequence[_Pick], into: str, old: str, logs: _Logs
) -> tuple[str, dict[str, str]] | MergeConflict:
    """The merge commits, in the object database only (nothing refers to them yet).

    Returns the last commit and each merged task's merge commit, or the first conflict, with
    ``right`` the target plus the tasks merged before it (``main+a+b``). Whether the target
    already holds a result comes from *logs* where they can say (asking git would walk the
    growing chain of merges once per result), else from git.
    """
    identity = await git.identity_env()
    if logs.disjoint:
        # Nothing touches: a result the target holds can only be the base itself.
        target = set(logs.target.commits) if logs.target is not None else set()
        todo = [p for p in picks if p.changed and not logs.holds(target, p.commit)]
        merges = [
            (p.commit, _message(run_id, into, p), _final(logs.by_commit.get(p.commit)))
            for p in todo
        ]
        try:
            chain = await chain_disjoint(git, old, merges, base=logs.base, env=identity)
        except (GitError, ValueError):
            # A path fast-import will not take as merge-tree does (a tree a result made by
            # hand): merged one at a time below, as merge-tree merges it.
            pass
        else:
            merged_at = {p.task_id: c for p, c in zip(todo, chain, strict=True)}
            return (chain[-1] if chain else old), merged_at
    new, before = old, [into]
    merged: dict[str, str] = {}
    # The commits since the base that the target and the merges so far hold (None: not known).
    held = set(logs.target.commits) if logs.target is not None else None
    for pick in picks:
        if not pick.changed:
            continue
        inside = logs.holds(held, pick.commit)
        if inside is None:
            inside = await git.ok(
                "merge-base", "--is-ancestor", "--end-of-options", pick.commit, new
            )
            held = None  # from here on the logs no longer know everything the merges hold
        if inside:
            continue
        made = await _merge_one(git, run_id, into, new, pick, identity)
        if isinstance(made, list):
            return MergeConflict(left=pick.task_id, right="+".join(before), paths=made)
        new = merged[pick.task_id] = made
        before.append(pick.task_id)
        if held is not None and (log := logs.by_commit.get(pick.commit)) is not None:
            held |= log.commits
        else:
            held = None
    return new, merged


def _final(log: Touched | None) -> Changes | None:
    return log.final if log is not None else None


def _message(run_id: str, into: str, pick: _Pick) -> str:
    return (
        f"Merge task {pick.task_id} of run {run_id} into {into}\n\n"
        f"Orchestrator-Run: {run_id}\nOrchestrator-Task: {pick.task_id}\n"
    )


async def _merge_one(
    git: Git, run_id: str, into: str, tip: str, pick: _Pick, identity: dict[str, str]
) -> str | list[str]:
    """The merge commit of *pick*'s result on *tip* (object database only), or the paths
    that conflict."""
    tree, paths = await merge_trees(git, tip, pick.commit)
    if paths:
        return paths
    message = _message(run_id, into, pick)
    return await git.out(
        "commit-tree",
        "-p",
        tip,
        "-p",
        pick.commit,
        "-m",
        message,
        "--end-of-options",
        tree,
        env=identity,
    )


class _Train:
    """A train: the results merged one at a time, each kept only if the combined tree still
    passes the checks of the tasks in it; the target moves once, at the end."""

    def __init__(
        self,
        repository: Repository,
        run_id: str,
        into: str,
        old: str,
        checker: MergeChecker,
        dry_run: bool,
        left_out: Sequence[LeftOutTask],
    ) -> None:
        self.repository, self.run_id, self.into, self.old = repository, run_id, into, old
        self.checker, self.dry_run = checker, dry_run
        self.tip = old
        #: The tasks whose results the tip holds (those that changed nothing, from the start).
        self.in_tree: list[str] = []
        self.merged: dict[str, str] = {}
        #: The results left out, by task: their commits (a result holding one is left out too).
        self.dropped: dict[str, str] = {}
        self.left_out = list(left_out)
        self.checks: list[MergeCheck] = []
        self.conflicts: list[MergeConflict] = []

    async def run(self, picks: Sequence[_Pick]) -> MergeRecord:
        """Board every result in order, then move the target (unless a dry run)."""
        git, into, old = self.repository.git, self.into, self.old
        self.in_tree = [p.task_id for p in picks if not p.changed]
        checkout = await checkout_of(self.repository, f"refs/heads/{into}")
        if checkout is not None and (refusal := await _dirty(git, into, checkout)):
            return self.record(picks, "refused", refusal)
        identity = await git.identity_env()
        for pick in picks:
            if pick.changed:
                await self.board(pick, identity)
        kept, left = len(self.merged), self._left_note()
        if self.tip == old and self.dropped:
            status: MergeStatus = (
                "check_failed" if any(not c.passed for c in self.checks) else "conflict"
            )
            return self.record(picks, status, f"nothing merged{left}; {into} not changed")
        if self.tip == old:
            if self.dry_run:
                return self.record(
                    picks,
                    "skipped",
                    f"nothing to merge: {into} already contains every result{left}",
                )
            return self.record(picks, "merged", f"{into} already contains every result{left}")
        if self.dry_run:
            message = f"would merge {kept} result(s) into {into}{left}; nothing moved"
            return self.record(picks, "skipped", message)
        checkout = await checkout_of(self.repository, f"refs/heads/{into}")
        if checkout is not None and (refusal := await _dirty(git, into, checkout)):
            return self.record(picks, "refused", refusal)
        reflog = f"orchestrator merge --train: {kept} result(s) of run {self.run_id}"
        if refusal := await _move(self.repository, into, old, self.tip, checkout, reflog):
            return self.record(picks, "refused", refusal)
        message = f"merged {kept} result(s) into {into}: {old[:12]} -> {self.tip[:12]}{left}"
        return self.record(picks, "merged", message)

    async def board(self, pick: _Pick, identity: dict[str, str]) -> None:
        """Merge *pick*'s result onto the tip and check it: kept if it passes, else left out
        (as it is when it conflicts with the tip, or contains a result left out)."""
        git = self.repository.git
        for task_id, commit in self.dropped.items():
            if await git.ok("merge-base", "--is-ancestor", "--end-of-options", commit, pick.commit):
                self.leave(pick, f"it contains the result of {task_id}, which was left out")
                return
        if await git.ok("merge-base", "--is-ancestor", "--end-of-options", pick.commit, self.tip):
            self.in_tree.append(pick.task_id)  # a dependency of a result kept before it
            return
        on = " + ".join([self.into, *self.merged])
        made = await _merge_one(git, self.run_id, self.into, self.tip, pick, identity)
        if isinstance(made, list):
            right = "+".join([self.into, *self.merged])
            self.conflicts.append(MergeConflict(left=pick.task_id, right=right, paths=made))
            self.leave(pick, f"it conflicts with {on} in {', '.join(made)}")
            return
        checked = await self.checker.check(
            made, [*self.in_tree, *self.merged, pick.task_id], task_id=pick.task_id
        )
        self.checks.append(checked)
        if not checked.passed:
            self.leave(pick, f"{failed_steps(checked)} failed on {on} + {pick.task_id}")
            return
        self.tip = self.merged[pick.task_id] = made

    def leave(self, pick: _Pick, reason: str) -> None:
        """Leave *pick*'s result out, for *reason*."""
        self.dropped[pick.task_id] = pick.commit
        self.left_out.append(LeftOutTask(task_id=pick.task_id, reason=reason))

    def _left_note(self) -> str:
        names = [e.task_id for e in self.left_out]
        return f"; left out {len(names)}: {', '.join(names)}" if names else ""

    def record(self, picks: Sequence[_Pick], status: MergeStatus, message: str) -> MergeRecord:
        """The train's record: merge commits named only when the target moved to them."""
        moved = status == "merged"
        return MergeRecord(
            into=self.into,
            status=status,
            old_commit=self.old,
            new_commit=self.tip if moved else None,
            tasks=[
                MergedTask(
                    task_id=p.task_id,
                    result_commit=p.commit,
                    merge_commit=self.merged.get(p.task_id) if moved else None,
                )
                for p in picks
                if p.task_id not in self.dropped
            ],
            conflicts=self.conflicts,
            message=("dry run: " if self.dry_run else "") + message,
            at=datetime.now(UTC),
            mode="train",
            checks=self.checks,
            left_out=self.left_out,
        )


async def _move(
    repository: Repository, into: str, old: str, new: str, checkout: Path | None, reflog: str
) -> str | None:
    """Move the target (and its checkout) from *old* to *new*; why not, if it did not move."""
    git, ref = repository.git, f"refs/heads/{into}"
    async with repository.lock.hold():
        if checkout is not None:
            # The checkout's index and files first, and only from the commit it is at: a
            # failure here leaves both the ref and the checkout as they were.
            if (now := await _tip(git, ref)) != old:
                return _moved(into, old, now)
            moved = await git.run(
                "read-tree", "-m", "-u", "--end-of-options", old, new, cwd=checkout, check=False
            )
            if moved.returncode != 0:
                why = _first_line(moved.stderr) or "git read-tree failed"
                return (
                    f"cannot update the checkout of {into} in {checkout}: {why}; {into} not changed"
                )
        updated = await git.run(
            "update-ref", "-m", reflog, "--end-of-options", ref, new, old, check=False
        )
        if updated.returncode == 0:
            return None
        if checkout is not None:
            await git.run(
                "read-tree", "-m", "-u", "--end-of-options", new, old, cwd=checkout, check=False
            )
        if (now := await _tip(git, ref)) != old:
            return _moved(into, old, now)
        why = _first_line(updated.stderr) or "git update-ref failed"
        return f"cannot move {into}: {why}; {into} not changed"


async def _dirty(git: Git, into: str, checkout: Path) -> str | None:
    """Why the checkout of the target must not be touched, if it must not."""
    status = await git.run(
        "status", "--porcelain", "--untracked-files=no", cwd=checkout, check=False
    )
    if status.returncode != 0:
        why = _first_line(status.stderr) or "git status failed"
        return f"cannot read the checkout of {into} in {checkout}: {why}; {into} not changed"
    if status.stdout.strip():
        return (
            f"branch {into} is checked out in {checkout} with uncommitted changes; "
            f"commit or stash them and merge again ({into} not changed)"
        )
    return None


def _moved(into: str, old: str, now: str | None) -> str:
    where = f"it is at {now}" if now else "it was deleted"
    return (
        f"branch {into} changed during the merge ({where}, was {old}); nothing changed, merge again"
    )


def _first_line(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[0] if lines else ""


async def _emit(on_event: EventHandler | None, event: Event) -> None:
    if on_event is not None:
        outcome = on_event(event)
        if inspect.isawaitable(outcome):
            await outcome


async def record_merge(
    path: Path | str, record: MergeRecord, *, repo: Repository | None = None
) -> Report:
    """Append *record* to the ``merge`` list of the report file at *path*; return the new report.

    The report is re-sealed and written atomically. With *repo* (the repository merged in),
    when *path* is a copy of a report whose run directory in that repository's state
    directory still holds ``report.json`` (the same run, the same results), that file gets the
    record too; the ``run_dir`` the report names is never trusted for this. Concurrent calls
    are serialised with a lock file (``report.mutex`` in the run directory, else beside
    *path*), so no record is lost. A report whose ``report_sha256`` does not match is refused
    (MergeError) rather than re-sealed; ReportUnreadable for a file that is not a report,
    RunDirError when it cannot be written. Cancellation: once the lock is held, both files are
    written to the end.
    """
    path = Path(path)
    first = await _read_sealed(path)
    run_dir = repo.state_dir / "runs" / first.run_id if repo is not None else None
    run_copy = run_dir / "report.json" if run_dir is not None else None
    lock_dir = run_dir if run_dir is not None and run_dir.is_dir() else path.absolute().parent
    lock = RepoLock(lock_dir / "report.mutex")
    try:
        lock.ensure_open()
    except OSError as exc:
        raise RunDirError(
            f"cannot create the lock file {lock.path}: {exc.strerror or exc}"
        ) from exc
    try:
        async with lock.hold():
            # Read again under the lock: another merge may have recorded itself meanwhile.
            report = _appended(await _read_sealed(path), record)
            writes = [(path, report)]
            if run_copy is not None and run_copy.is_file() and not _same_file(run_copy, path):
                other = await _read_sealed(run_copy)
                if _same_run(other, report):
                    writes.append((run_copy, _appended(other, record)))
            for target, content in writes:
                await anyio.to_thread.run_sync(atomic_write, target, report_bytes(content))
    finally:
        lock.close()
    return report


async def _read_sealed(path: Path) -> Report:
    try:
        raw, report = await anyio.to_thread.run_sync(load_report_json, path)
    except NotAReport as exc:
        raise ReportUnreadable(str(exc)) from exc
    if report_digest(raw) != raw["report_sha256"] or any(
        digest_without(r, "provenance", "result_sha256") != r["provenance"]["result_sha256"]
        for r in raw["results"]
    ):
        raise MergeError(
            f"{path} does not match its report_sha256 or a result its result_sha256 "
            "(edited?); not re-sealing it, "
            f"see orchestrator verify {path}"
        )
    return report


def _appended(report: Report, record: MergeRecord) -> Report:
    return seal_report(report.model_copy(update={"merge": [*report.merge, record]}))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _same_run(a: Report, b: Report) -> bool:
    """The same report apart from its merge records (and so its seal)."""
    blank = {"merge": [], "report_sha256": ""}
    return a.model_copy(update=blank) == b.model_copy(update=blank)
