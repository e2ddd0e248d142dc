"""Ancestry of many commit pairs from one ``git rev-list``: the same answers as ``git
merge-base --is-ancestor`` for every pair of a real history, and ``verify`` running a fixed
number of git processes for its commit checks, however many results a report has."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import HandoffEnvelope, build_envelope, seal_report, seal_result
from orchestrator import Repository, Workspace, orchestrate_parallel, verify_report
from orchestrator.ancestry import load_ancestry
from orchestrator.errors import GitError
from orchestrator.report import report_bytes

from .conftest import MakeRepo, git


def _history(repo: Path) -> dict[str, str]:
    """root - a - b - m (merge of b and c) - d; root - c; x: unrelated to root."""
    commits: dict[str, str] = {"root": git(repo, "rev-parse", "HEAD").strip()}
    tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    for name, parents in [
        ("a", ["root"]),
        ("b", ["a"]),
        ("c", ["root"]),
        ("m", ["b", "c"]),
        ("d", ["m"]),
        ("x", []),
    ]:
        parent_args = [arg for p in parents for arg in ("-p", commits[p])]
        commits[name] = git(repo, "commit-tree", tree, *parent_args, "-m", name).strip()
    return commits


def test_every_pair_is_answered_as_git_answers_it(make_repo: MakeRepo) -> None:
    repo = make_repo()
    git(repo, "commit", "--allow-empty", "-q", "-m", "second")
    commits = _history(repo)
    commits["parent-of-root"] = git(repo, "rev-parse", "HEAD~1").strip()

    async def main() -> None:
        repository = await Repository.open(repo)
        tips = [commits[n] for n in ("d", "c", "x")]
        before = repository.git.calls
        ancestry = await load_ancestry(repository.git, commits["root"], tips)
        assert repository.git.calls == before + 1
        for (_, a), (_, d) in itertools.product(commits.items(), repeat=2):
            expected = a == d or await repository.git.ok("merge-base", "--is-ancestor", a, d)
            assert await ancestry.is_ancestor(a, d) == expected, (a, d)

    anyio.run(main)


def test_pairs_above_the_root_need_no_git(make_repo: MakeRepo) -> None:
    repo = make_repo()
    commits = _history(repo)

    async def main() -> None:
        repository = await Repository.open(repo)
        ancestry = await load_ancestry(repository.git, commits["root"], [commits["d"]])
        calls = repository.git.calls
        assert await ancestry.is_ancestor(commits["root"], commits["d"])
        assert await ancestry.is_ancestor(commits["c"], commits["d"])
        assert await ancestry.is_ancestor(commits["a"], commits["m"])
        assert not await ancestry.is_ancestor(commits["d"], commits["a"])
        assert repository.git.calls == calls and ancestry.asked == 0
        # An id that is not one never reaches git.
        with pytest.raises(Exception, match="not an object id"):
            await ancestry.is_ancestor("--output=/tmp/x", commits["x"])

    anyio.run(main)


async def _writer(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    assert workspace.path is not None
    (workspace.path / f"{envelope.task_id}.txt").write_text("x\n")
    return {}


def _report(repo: Path, n: int) -> Path:
    envelopes = [build_envelope("w", "write", task_id=f"t{i}", venv=False) for i in range(n)]
    envelopes.append(build_envelope("w", "write", task_id="after", venv=False, depends_on=["t0"]))
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": _writer}, concurrency=4)
    )
    return Path(report.run_dir) / "report.json"


@pytest.mark.parametrize("n", [4, 24])
def test_verify_runs_a_fixed_number_of_git_processes(make_repo: MakeRepo, n: int) -> None:
    repo = make_repo()
    path = _report(repo, n)

    async def count() -> int:
        repository = await Repository.open(repo)
        before = repository.git.calls
        outcome = await verify_report(path, repo=repository)
        assert outcome.ok, outcome.findings
        assert outcome.checked_commits == n + 1
        return repository.git.calls - before

    # cat-file, for-each-ref, rev-list, log (trailers): the same for 5 results and for 25.
    assert anyio.run(count) <= 5


def _moved_branches(repo: Path, path: Path, tmp_path: Path, how: str) -> tuple[Path, list[str]]:
    """The run's report after its task branches moved (*how*), and the fields of the
    findings expected."""
    from envelopes import Report

    report = Report.model_validate(json.loads(path.read_text()))
    if how == "a result unknown":
        # Forged: t1's result commit is no object of the repository.
        t1 = report.result("t1")
        provenance = t1.provenance.model_copy(update={"result_commit": "1" * 40})
        results = [
            seal_result(t1.model_copy(update={"provenance": provenance}))
            if r.task_id == "t1"
            else r
            for r in report.results
        ]
        forged = tmp_path / "report.json"
        forged.write_bytes(
            report_bytes(seal_report(report.model_copy(update={"results": results})))
        )
        return forged, ["provenance.result_commit"]
    tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    for r in report.results:
        commit = r.provenance.result_commit
        assert r.branch is not None and commit is not None
        # On top of the result (work added after the run), or elsewhere above the base (the
        # branch rebased): no longer containing it.
        parent = commit if how == "work on top" else str(report.base_commit)
        moved = git(repo, "commit-tree", tree, "-p", parent, "-m", how).strip()
        git(repo, "update-ref", f"refs/heads/{r.branch}", moved, commit)
    return path, [] if how == "work on top" else ["branch"] * len(report.results)


@pytest.mark.parametrize("how", ["work on top", "rebased", "a result unknown"])
def test_verify_runs_a_fixed_number_of_git_processes_after_the_branches_moved(
    make_repo: MakeRepo, tmp_path: Path, how: str
) -> None:
    """Work added on each task branch after the run, every branch rebased elsewhere, or one
    result commit the repository does not have: the findings say so, and the commit checks
    still cost a few git processes, not one or two per result."""
    repo = make_repo()
    path = _report(repo, 12)
    run_dir = path.parent
    path, expected = _moved_branches(repo, path, tmp_path, how)

    async def count() -> tuple[list[str], int]:
        repository = await Repository.open(repo)
        before = repository.git.calls
        outcome = await verify_report(path, repo=repository, run_dir=run_dir)
        return [f.field for f in outcome.findings], repository.git.calls - before

    findings, calls = anyio.run(count)
    assert findings == expected
    assert calls <= 5


def test_a_result_that_does_not_descend_from_its_base_is_named(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    path = _report(repo, 2)
    raw = json.loads(path.read_text())
    from envelopes import Report

    report = Report.model_validate(raw)
    sibling = report.result("t1").provenance.result_commit
    t0 = report.result("t0")
    moved = t0.model_copy(
        update={"provenance": t0.provenance.model_copy(update={"base_commit": sibling})}
    )
    results = [seal_result(moved) if r.task_id == "t0" else r for r in report.results]
    tampered = tmp_path / "report.json"
    tampered.write_bytes(report_bytes(seal_report(report.model_copy(update={"results": results}))))
    outcome = anyio.run(lambda: verify_report(tampered, repo=repo, run_dir=Path(report.run_dir)))
    said = [str(f) for f in outcome.findings]
    assert (
        f"task t0: provenance.base_commit: {sibling} is not an ancestor of "
        f"{t0.provenance.result_commit}" in said
    )


def test_a_forged_report_costs_no_more_than_a_question_per_pair(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the graph's size in output, or past a few walks of the whole graph, each pair is
    asked of git, as verify did before: a report cannot make the walks quadratic."""
    from orchestrator import ancestry as module

    repo = make_repo()
    commits = _history(repo)

    async def main() -> None:
        repository = await Repository.open(repo)
        monkeypatch.setattr(module, "MAX_GRAPH_BYTES", 10)
        cut = await load_ancestry(repository.git, commits["root"], [commits["d"]])
        assert await cut.is_ancestor(commits["a"], commits["d"]) and cut.asked == 1
        monkeypatch.undo()
        spent = await load_ancestry(repository.git, commits["root"], [commits["d"]])
        spent._budget = 0
        assert not await spent.is_ancestor(commits["d"], commits["a"]) and spent.asked == 1
        # The same pair again is not asked twice.
        assert not await spent.is_ancestor(commits["d"], commits["a"]) and spent.asked == 1

    anyio.run(main)


def test_grafts_are_not_read(make_repo: MakeRepo) -> None:
    """A graft file can rewrite parents, even into a cycle: none is read, by the walk or by
    git's own answers."""
    repo = make_repo()
    commits = _history(repo)
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "grafts").write_text(f"{commits['a']} {commits['d']}\n")

    async def main() -> None:
        repository = await Repository.open(repo)
        ancestry = await load_ancestry(repository.git, commits["root"], [commits["d"]])
        assert await ancestry.is_ancestor(commits["a"], commits["d"])
        assert not await ancestry.is_ancestor(commits["d"], commits["a"])
        assert not await repository.git.ok(
            "merge-base", "--is-ancestor", commits["d"], commits["a"]
        )

    anyio.run(main)


def answers(repo: Path, root: str | None, tips: list[str], pairs: list[tuple[str, str]]) -> Any:
    """The answers to *pairs*, the git processes loading took, and the pairs asked of git."""

    async def main() -> tuple[list[bool], int, int]:
        repository = await Repository.open(repo)
        before = repository.git.calls
        ancestry = await load_ancestry(repository.git, root, tips)
        loading = repository.git.calls - before
        found = [await ancestry.is_ancestor(a, d) for a, d in pairs]
        return found, loading, ancestry.asked

    return anyio.run(main)


@pytest.mark.parametrize("why", ["no root", "no tip above it", "too large", "unreadable"])
def test_a_graph_that_cannot_be_loaded_still_answers_every_pair(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """Without a graph (no root given, nothing above it to load, more than the bound, or
    git cannot list it), every pair is asked of git, one process each, with the same
    answers."""
    import orchestrator.ancestry as module

    repo = make_repo()
    c = _history(repo)
    root, tips = c["root"], [c["d"], c["x"]]
    if why == "no root":
        root = None
    elif why == "no tip above it":
        tips = [c["root"]]
    elif why == "too large":
        monkeypatch.setattr(module, "MAX_GRAPH_BYTES", 10)
    else:
        tips = [c["d"], "1" * 40]  # no such object: rev-list fails
    pairs = [(c["root"], c["d"]), (c["a"], c["d"]), (c["d"], c["a"]), (c["x"], c["d"])]
    found, loading, asked = answers(repo, root, tips, pairs)
    assert found == [True, True, False, False]
    assert asked == 4
    # Nothing to load is no process; a graph not read is one.
    assert loading == (0 if why in ("no root", "no tip above it") else 1)


def test_ids_are_checked_before_git_sees_them(make_repo: MakeRepo) -> None:
    repo = make_repo()
    c = _history(repo)
    for root, tips in [("--output=x", [c["d"]]), (c["root"], [c["d"], "-p"])]:
        with pytest.raises(GitError, match="not an object id"):
            answers(repo, root, tips, [])
    for pair in [("--output=x", c["d"]), (c["root"], "HEAD")]:
        with pytest.raises(GitError, match="not an object id"):
            answers(repo, None, [], [pair])
    assert not (repo / "x").exists()


def test_merges_in_a_row_are_walked_once_each(make_repo: MakeRepo) -> None:
    """Forty diamonds (a commit, two children, their merge) in a row: 2^40 paths through
    them, 161 commits; every answer comes from the graph, none asked of git."""
    repo = make_repo()
    tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    root = top = git(repo, "rev-parse", "HEAD").strip()
    for i in range(40):
        left = git(repo, "commit-tree", tree, "-p", top, "-m", f"l{i}").strip()
        right = git(repo, "commit-tree", tree, "-p", top, "-m", f"r{i}").strip()
        top = git(repo, "commit-tree", tree, "-p", left, "-p", right, "-m", f"m{i}").strip()
    outside = git(repo, "commit-tree", tree, "-m", "unrelated").strip()
    found, loading, asked = answers(
        repo, root, [top, outside], [(root, top), (outside, top), (top, root)]
    )
    assert found == [True, False, False] and loading == 1
    assert asked == 1  # only the pair whose descendant is below the graph: (top, root)
