"""The run's side of the scheduler: dependency merges made once per set, what a dependent is
told, conflicts as results (tests/test_graph.py runs whole graphs; these look at the hooks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from envelopes import ErrorInfo, HandoffEnvelope, build_envelope
from orchestrator import Workspace, orchestrate_parallel
from orchestrator.hooks import RunHooks

from .conftest import MakeRepo, git


async def writer(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    assert workspace.path is not None
    for name, text in envelope.inputs.get("files", {}).items():
        (workspace.path / name).write_text(text)
    return {"wrote": sorted(envelope.inputs.get("files", {}))}


def test_dependents_of_the_same_tasks_share_one_merge(
    make_repo: MakeRepo, monkeypatch: Any
) -> None:
    repo = make_repo()
    combined: list[tuple[str, ...]] = []
    original = RunHooks._combined

    async def counting(self: RunHooks, results: list[Any]) -> Any:
        outcome = await original(self, results)
        combined.append(tuple(r.task_id for r in results))
        return outcome

    monkeypatch.setattr(RunHooks, "_combined", counting)
    envelopes = [
        build_envelope("w", "a", task_id="a", venv=False, inputs={"files": {"a.txt": "a"}}),
        build_envelope("w", "b", task_id="b", venv=False, inputs={"files": {"b.txt": "b"}}),
        build_envelope("w", "c", task_id="c", venv=False, depends_on=["a", "b"]),
        build_envelope("w", "d", task_id="d", venv=False, depends_on=["a", "b"]),
    ]
    report = anyio.run(lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": writer}))
    assert report.summary.successful == 4, report.errors
    starts = {r.task_id: r.provenance.base_commit for r in report.results}
    assert starts["c"] == starts["d"] != git(repo, "rev-parse", "HEAD")
    # Asked twice, made once: both dependents start from the same merge commit.
    assert len(combined) == 2
    tree = git(repo, "ls-tree", "--name-only", starts["c"] or "")
    assert {"a.txt", "b.txt"} <= set(tree.splitlines())


def test_a_dependent_is_told_each_dependencys_output_commit_and_branch(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo()
    told: dict[str, Any] = {}

    async def reader(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        told.update(envelope.upstream)
        return {}

    envelopes = [
        build_envelope("w", "a", task_id="a", venv=False, inputs={"files": {"a.txt": "a"}}),
        build_envelope("r", "read", task_id="r", venv=False, depends_on=["a"]),
    ]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": writer, "r": reader})
    )
    a = report.result("a")
    assert told["a"].output == {"wrote": ["a.txt"]}
    assert told["a"].result_commit == a.provenance.result_commit
    assert told["a"].branch == a.branch
    # One dependency: no merge, the dependent starts from its result commit.
    assert report.result("r").provenance.base_commit == a.provenance.result_commit


def test_a_dependent_is_told_what_files_each_dependency_changed(
    make_repo: MakeRepo, monkeypatch: Any
) -> None:
    """The paths each result changed from where it started, bounded: what ``upstream``
    gives a prompt (with the branch) besides the output."""
    monkeypatch.setattr("orchestrator.hooks.MAX_CHANGED_FILES", 3)
    repo = make_repo()
    told: dict[str, Any] = {}

    async def reader(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        told.update(envelope.upstream)
        return {}

    async def committer(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        """Commits one file itself and leaves another: its commit step cannot tell alone."""
        assert workspace.path is not None
        (workspace.path / "own.txt").write_text("mine")
        (workspace.path / "left.txt").write_text("left")
        identity = ["-c", "user.name=A", "-c", "user.email=a@example.com"]
        for args in (["add", "own.txt"], [*identity, "commit", "-qm", "own"]):
            await anyio.run_process(["git", *args], cwd=workspace.path)
        return {}

    many = {f"f{i}.txt": "x" for i in range(5)}
    envelopes = [
        build_envelope("w", "a", task_id="a", venv=False, inputs={"files": {"a.txt": "a"}}),
        build_envelope("w", "m", task_id="m", venv=False, inputs={"files": many}),
        build_envelope("w", "n", task_id="n", venv=False),
        build_envelope("c", "c", task_id="c", venv=False),
        build_envelope("r", "read", task_id="r", venv=False, depends_on=["a", "m", "n", "c"]),
    ]
    agents = {"w": writer, "r": reader, "c": committer}
    report = anyio.run(lambda: orchestrate_parallel(envelopes, repo=repo, agents=agents))
    assert report.summary.successful == 5, report.errors
    assert (told["a"].changed_files, told["a"].changed_files_omitted) == (["a.txt"], 0)
    assert told["m"].changed_files == ["f0.txt", "f1.txt", "f2.txt"]
    assert told["m"].changed_files_omitted == 2
    assert (told["n"].changed_files, told["n"].changed_files_omitted) == ([], 0)
    assert told["c"].changed_files == ["left.txt", "own.txt"]  # asked of git
    # Envelopes of dependencies that changed nothing hash as they did before the field.
    written = report.result("r").envelope
    assert written is not None
    data = (Path(report.run_dir) / written.path).read_text()
    assert '"changed_files":["a.txt"]' in data and '"n":{"branch"' in data


def test_conflicting_dependencies_are_an_error_naming_both_tasks_and_the_path(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo(extra={"shared.txt": "base\n"})
    envelopes = [
        build_envelope("w", "a", task_id="a", venv=False, inputs={"files": {"shared.txt": "a\n"}}),
        build_envelope("w", "b", task_id="b", venv=False, inputs={"files": {"shared.txt": "b\n"}}),
        build_envelope("w", "c", task_id="c", venv=False, depends_on=["a", "b"]),
    ]
    report = anyio.run(lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": writer}))
    c = report.result("c")
    assert c.status == "skipped" and isinstance(c.error, ErrorInfo)
    assert c.error.kind == "dependency_conflict"
    assert c.error.message == "dependency merge conflict: b and a both change shared.txt"
    assert c.error.paths == ["shared.txt"]
