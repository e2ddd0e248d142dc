"""Auditing a report: every digest recomputed, every commit checked in the repository.

Uses only ``envelopes`` and git, so what it trusts is small: the report file, the files of
its run directory, and the repository's object database.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from envelopes import (
    Finding,
    NotAReport,
    Report,
    TaskResult,
    audit_report,
    checks_trailer,
    is_object_id,
    load_report_file,
    upstream_tasks,
)

from ._git import LIST_REFS_TIMEOUT_S, Git
from .ancestry import Ancestry, load_ancestry
from .errors import GitError, ReportUnreadable
from .merge import combine_commits, independent_commits, merge_trees
from .repo import NotARepository, Repository

__all__ = ["VerifyOutcome", "verify_report"]


@dataclass
class VerifyOutcome:
    """What :func:`verify_report` found. ``ok`` when there is no finding."""

    report: Report
    findings: list[Finding] = field(default_factory=list)
    checked_commits: int = 0

    @property
    def ok(self) -> bool:
        """True when every check held."""
        return not self.findings


async def verify_report(
    path: Path | str,
    *,
    repo: Repository | Path | str | None = None,
    run_dir: Path | str | None = None,
    files: bool = True,
) -> VerifyOutcome:
    """Verify the report at *path*.

    Recomputes every digest (see ``envelopes.audit_report``), hashes the envelope and log
    files in the run directory (*run_dir*, else the report's ``run_dir``, else the report's own
    directory), and checks in the repository (*repo*, else the report's ``repo``) that each
    result commit exists, that its tree is ``result_tree``, that the base commit is its
    ancestor, and that the task branch still points at it.

    With *files* false, the run directory's files are not hashed (``merge`` checks a report
    whose logs may not have travelled with it).

    The report is hostile input: every field is validated before git sees any of it (object
    ids, branch names), files are read only inside the run directory, without following
    links, only if regular, and up to a cap (see ``envelopes._bounded``).

    Raises ReportUnreadable when the file cannot be read or is not a report.
    """
    path = Path(path)
    try:
        raw, report, source = await anyio.to_thread.run_sync(load_report_file, path)
    except NotAReport as exc:
        raise ReportUnreadable(str(exc)) from exc
    outcome = VerifyOutcome(report=report)
    directory = Path(run_dir) if run_dir else find_run_dir(report, path)
    # Hashing every log file can take a while: off the event loop.
    outcome.findings += await anyio.to_thread.run_sync(
        lambda: audit_report(raw, run_dir=directory if files else None, source=source)
    )
    needs_git = (
        any(r.provenance.result_commit for r in report.results)
        or report.base_commit
        or any(m.status == "merged" for m in report.merge)
    )
    if not needs_git:
        return outcome
    if isinstance(repo, Repository):
        outcome.findings += await _check_git(repo.git, report, outcome)
        return outcome
    where = repo or report.repo
    try:
        repository = await Repository.open(where) if where else None
    except NotARepository as exc:
        outcome.findings.append(Finding(task_id=None, field="repo", message=str(exc)))
        return outcome
    if repository is None:
        outcome.findings.append(
            Finding(
                task_id=None, field="repo", message="the report names no repository; pass --repo"
            )
        )
        return outcome
    # The user trusts the repository they name, or work in; one a report names, not so.
    trusted = bool(repo) or Path.cwd().resolve().is_relative_to(repository.root.resolve())
    programs = [] if trusted else await _configured_programs(repository.git)
    if programs:
        # Named by the report, not by the user: recomputing a merge there would run them.
        outcome.findings.append(
            Finding(
                task_id=None,
                field="repo",
                message=f"the repository the report names, {repository.root}, configures "
                f"programs git would run ({', '.join(programs)}); merges are not recomputed "
                f"there: pass --repo {repository.root} to trust it",
            )
        )
    outcome.findings += await _check_git(repository.git, report, outcome, merges=not programs)
    return outcome


#: Config keys that make git run a program while it merges (verify recomputes merges): merge
#: drivers, filters, diff programs, and a partial clone's promisor remote, from which git
#: fetches missing objects on demand (running its upload-pack or transport).
_PROGRAM_KEYS = (
    r"^(merge\..*\.driver|filter\..*\.(clean|smudge|process)|diff\..*\.(textconv|command)"
    r"|extensions\.partialclone|remote\..*\.(promisor|partialclonefilter|uploadpack))$"
)


async def _configured_programs(git: Git) -> list[str]:
    """The keys of the repository's own config (includes followed) that name programs."""
    found = await git.run(
        "config",
        "--local",
        "--includes",
        "--name-only",
        "--get-regexp",
        _PROGRAM_KEYS,
        check=False,
    )
    # Names only: a subsection may hold spaces (``merge."my driver".driver``).
    return sorted({line for line in found.stdout.decode().splitlines() if line})


def find_run_dir(report: Report, path: Path) -> Path:
    named = Path(report.run_dir)
    if named.is_dir():
        return named
    return path.resolve().parent


async def _check_git(
    git: Git, report: Report, outcome: VerifyOutcome, *, merges: bool = True
) -> list[Finding]:
    findings: list[Finding] = []
    kind = await _object_kinds(git, report)
    if report.base_commit and kind(report.base_commit)[1] != "commit":
        findings.append(
            Finding(
                task_id=None,
                field="base_commit",
                message=f"commit {report.base_commit} not found in the repository",
            )
        )
    refs_out = await git.out(
        "for-each-ref",
        "--format=%(refname:lstrip=2) %(objectname)",
        f"refs/heads/orchestrator/{report.run_id}/",
        timeout=LIST_REFS_TIMEOUT_S,
    )
    branches = dict(line.split(" ", 1) for line in refs_out.splitlines() if " " in line)
    # Every ancestry question of the results (base below result, result below its branch's
    # tip) answered from one walk above the run's base (orchestrator/ancestry.py).
    tips = [
        c for r in report.results if (c := r.provenance.result_commit) and kind(c)[1] == "commit"
    ]
    tips += [c for c in branches.values() if is_object_id(c)]
    root = (
        report.base_commit
        if report.base_commit and kind(report.base_commit)[1] == "commit"
        else None
    )
    ancestry = await load_ancestry(git, root, tips)
    for r in report.results:
        if r.provenance.result_commit:
            outcome.checked_commits += 1
            findings += await _check_result_commit(git, r, kind, branches, ancestry)
    findings += await _check_trailers(git, report, kind)
    if merges:
        findings += await _check_dependency_starts(git, report)
        findings += await _check_merges(git, report, outcome)
    return findings


ObjectKind = Callable[[str], tuple[str | None, str | None]]


async def _check_trailers(git: Git, report: Report, kind: ObjectKind) -> list[Finding]:
    """Each result commit the run made for a task with checks says, in its ``Checks:``
    trailer, what the task's last turn's check records say: the records are the report's
    claims, the commit (its id in the report) is git's. One batched ``git log``, of the
    commits the repository has (one it lacks would fail the whole log: it is reported with
    its task)."""
    told = {
        commit: r
        for r in report.results
        if (commit := r.provenance.result_commit)
        and kind(commit)[1] == "commit"
        and any(c.phase == "check" for c in r.checks)
    }
    if not told:
        return []
    out = await git.run("log", "--no-walk=unsorted", "--format=%H%x01%B%x00", *told, check=False)
    findings = []
    for entry in out.stdout.decode("utf-8", "replace").split("\0"):
        commit, _, message = entry.strip("\n").partition("\x01")
        r = told.get(commit)
        if r is None or f"Orchestrator-Run: {report.run_id}\n" not in message:
            continue  # not a commit this run made (the agent's own, say): nothing to compare
        expected = checks_trailer([c.model_dump(mode="json") for c in r.checks])
        found = next(
            (
                line[len("Checks: ") :]
                for line in message.splitlines()
                if line.startswith("Checks: ")
            ),
            None,
        )
        if found != expected:
            findings.append(
                Finding(
                    task_id=r.task_id,
                    field="checks",
                    message=f"its commit's Checks trailer says {found!r}, its records {expected!r}",
                )
            )
    return findings


async def _object_kinds(git: Git, report: Report) -> ObjectKind:
    """One batched lookup of every object the report names: ``kind(obj) -> (id, type)``."""
    wanted: list[str] = []
    if report.base_commit:
        wanted.append(report.base_commit)
    for r in report.results:
        p = r.provenance
        if p.result_commit:
            wanted += [p.result_commit, f"{p.result_commit}^{{tree}}"]
    result = await git.run(
        "cat-file", "--batch-check", stdin=("\n".join(wanted) + "\n").encode(), check=False
    )
    answers = dict(zip(wanted, result.stdout.decode(errors="replace").splitlines(), strict=False))

    def kind(obj: str) -> tuple[str | None, str | None]:
        parts = answers.get(obj, "").split()
        if len(parts) >= 2 and parts[1] != "missing":
            return parts[0], parts[1]
        return None, None

    return kind


async def _check_result_commit(
    git: Git, r: TaskResult, kind: ObjectKind, branches: Mapping[str, str], ancestry: Ancestry
) -> list[Finding]:
    """A result commit exists, holds its tree, descends from its base, and is on its branch."""
    p = r.provenance
    assert p.result_commit is not None
    if kind(p.result_commit)[1] != "commit":
        message = f"commit {p.result_commit} not found in the repository"
        return [Finding(task_id=r.task_id, field="provenance.result_commit", message=message)]
    findings: list[Finding] = []
    tree, _ = kind(f"{p.result_commit}^{{tree}}")
    if tree != p.result_tree:
        findings.append(
            Finding(
                task_id=r.task_id,
                field="provenance.result_tree",
                message=f"expected {p.result_tree!r}, found {tree!r} (the tree of {p.result_commit})",
            )
        )
    if p.base_commit and not await ancestry.is_ancestor(p.base_commit, p.result_commit):
        findings.append(
            Finding(
                task_id=r.task_id,
                field="provenance.base_commit",
                message=f"{p.base_commit} is not an ancestor of {p.result_commit}",
            )
        )
    if r.branch:
        findings += await _check_branch(git, r, branches.get(r.branch), ancestry)
    return findings


async def _check_branch(
    git: Git, r: TaskResult, found: str | None, ancestry: Ancestry
) -> list[Finding]:
    """The result's branch exists and still contains its result commit."""
    assert r.branch is not None and r.provenance.result_commit is not None
    commit = r.provenance.result_commit
    if found is None:
        found = (
            await git.run(
                "rev-parse",
                "--verify",
                "--quiet",
                "--end-of-options",
                f"refs/heads/{r.branch}",
                check=False,
            )
        ).stdout.decode().strip() or None
    if found is None:
        message = f"branch {r.branch} does not exist"
        return [Finding(task_id=r.task_id, field="branch", message=message)]
    if not is_object_id(found) or not await ancestry.is_ancestor(commit, found):
        # Work added on top of a result is fine; a result no longer on its branch is not.
        message = f"branch {r.branch} points at {found}, which does not contain {commit}"
        return [Finding(task_id=r.task_id, field="branch", message=message)]
    return []


async def _check_dependency_starts(git: Git, report: Report) -> list[Finding]:
    """A task that started from several dependencies' results started from a merge of them.

    When one of the results contains the others, the task started from that one. Otherwise
    its base commit's parents must be those results (less any that another one contains), in
    the order its ``depends_on`` lists them, and its tree the merge of them, recomputed. (One
    result: ``audit_report`` compares the commits directly.) Recomputing adds unreferenced
    objects to the repository, as ``git merge-tree`` does.
    """
    findings: list[Finding] = []
    by_id = {r.task_id: r for r in report.results}
    groups = {name: group.model_dump() for name, group in report.groups.items()}

    def wrong(task_id: str, message: str) -> None:
        findings.append(Finding(task_id=task_id, field="provenance.base_commit", message=message))

    for r in report.results:
        base = r.provenance.base_commit
        upstream = list(
            dict.fromkeys(
                commit
                for name in upstream_tasks(r.model_dump(), groups)
                if name in by_id and (commit := by_id[name].provenance.result_commit)
            )
        )
        if base is None or len(upstream) < 2:
            continue
        try:
            heads = await independent_commits(git, upstream)
        except GitError:
            continue  # a missing result commit: reported with its task
        if len(heads) == 1:
            if base != heads[0]:
                wrong(
                    r.task_id,
                    f"expected {heads[0]} (it contains the other dependencies' results), found {base}",
                )
            continue
        listed = await git.run(
            "rev-list", "--parents", "-n", "1", "--end-of-options", base, check=False
        )
        if listed.returncode != 0:
            wrong(r.task_id, f"commit {base} not found in the repository")
            continue
        parents = listed.stdout.decode().split()[1:]
        if parents != heads:
            wrong(
                r.task_id,
                f"{base} is not the merge of its dependencies' results {heads} (its parents: {parents})",
            )
            continue
        merged = await combine_commits(git, heads, message="verify", env=_VERIFY_IDENTITY)
        tree = await git.out("rev-parse", "--verify", "--end-of-options", f"{base}^{{tree}}")
        if merged.tree != tree:
            wrong(
                r.task_id,
                f"the tree of {base} is {tree}, not the merge of its parents ({merged.tree or 'they conflict'})",
            )
    return findings


#: Who the commits made while recomputing a merge say made them (they are never referenced).
_VERIFY_IDENTITY = {
    "GIT_AUTHOR_NAME": "orchestrator verify",
    "GIT_AUTHOR_EMAIL": "verify@localhost",
    "GIT_COMMITTER_NAME": "orchestrator verify",
    "GIT_COMMITTER_EMAIL": "verify@localhost",
}


async def _check_merges(git: Git, report: Report, outcome: VerifyOutcome) -> list[Finding]:
    """Each ``merged`` record's commits: the chain from ``old_commit`` to ``new_commit``.

    Every merge commit exists, its parents are the commit before it and the task's result, and
    its tree is the merge of those two (recomputed with ``git merge-tree``); the last one is
    ``new_commit``; and the target branch still contains ``new_commit``.
    """
    findings: list[Finding] = []
    for number, record in enumerate(report.merge):
        if record.status != "merged" or record.old_commit is None or record.new_commit is None:
            continue  # audit_report reports a merged record without its commits
        field = f"merge[{number}]"
        previous: str | None = record.old_commit
        if not await git.ok("cat-file", "-e", "--end-of-options", f"{previous}^{{commit}}"):
            findings.append(
                Finding(
                    task_id=None,
                    field=f"{field}.old_commit",
                    message=f"commit {previous} not found in the repository",
                )
            )
            previous = None
        for entry in record.tasks:
            if entry.merge_commit is None or previous is None:
                continue
            outcome.checked_commits += 1
            problem = await _merge_commit_problem(
                git, entry.merge_commit, [previous, entry.result_commit]
            )
            if problem:
                findings.append(
                    Finding(task_id=entry.task_id, field=f"{field}.merge_commit", message=problem)
                )
                previous = None
                continue  # the rest of the chain is not checked: it has lost its start
            previous = entry.merge_commit
        if previous is not None and previous != record.new_commit:
            findings.append(
                Finding(
                    task_id=None,
                    field=f"{field}.new_commit",
                    message=f"expected {previous} (the end of the chain of merge commits), found {record.new_commit}",
                )
            )
        tip = (
            (
                await git.run(
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    "--end-of-options",
                    f"refs/heads/{record.into}^{{commit}}",
                    check=False,
                )
            )
            .stdout.decode()
            .strip()
        )
        if not tip:
            findings.append(
                Finding(
                    task_id=None,
                    field=f"{field}.into",
                    message=f"branch {record.into} does not exist",
                )
            )
        elif tip != record.new_commit and not await git.ok(
            "merge-base", "--is-ancestor", "--end-of-options", record.new_commit, tip
        ):
            findings.append(
                Finding(
                    task_id=None,
                    field=f"{field}.into",
                    message=f"branch {record.into} points at {tip}, which does not contain {record.new_commit}",
                )
            )
    return findings


async def _merge_commit_problem(git: Git, commit: str, parents: list[str]) -> str | None:
    """What is wrong with *commit* as the merge of *parents*, if anything."""
    listed = await git.run(
        "rev-list", "--parents", "-n", "1", "--end-of-options", f"{commit}^{{commit}}", check=False
    )
    if listed.returncode != 0:
        return f"commit {commit} not found in the repository"
    found = listed.stdout.decode().split()[1:]
    if found != parents:
        return f"the parents of {commit} are {found}, expected {parents}"
    try:
        tree, conflicts = await merge_trees(git, *parents)
    except GitError:
        return f"cannot merge {parents[0]} and {parents[1]} again to check {commit}"
    actual = await git.out("rev-parse", "--verify", "--end-of-options", f"{commit}^{{tree}}")
    if conflicts or tree != actual:
        return f"the tree of {commit} ({actual}) is not the merge of its parents ({tree})"
    return None
