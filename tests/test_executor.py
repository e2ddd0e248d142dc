"""The executor seam: every task that runs goes through one executor's ``run``, prepared, and
comes back a finished result; the scheduler, journal, cache and report do not care which."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import anyio
import pytest

from envelopes import ExecutorSpec, HandoffEnvelope, TaskResult, build_envelope
from orchestrator import Workspace, orchestrate_parallel, verify_report
from orchestrator import executor as executor_module
from orchestrator.context import RunContext
from orchestrator.executor import EXECUTORS, LocalExecutor, PreparedTask, make_executor

from .conftest import MakeRepo, git


async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    if workspace.path is not None:
        (workspace.path / f"{envelope.task_id}.txt").write_text(envelope.task)
    return {"done": envelope.task_id}


class Recording:
    """An executor that records what it is given and hands the task to the local one."""

    name = "local"
    seen: list[PreparedTask] = []

    def __init__(self, ctx: RunContext) -> None:
        self.inner = LocalExecutor(ctx)

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def run(self, task: PreparedTask) -> TaskResult:
        Recording.seen.append(task)
        return await self.inner.run(task)


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> list[PreparedTask]:
    Recording.seen = []
    monkeypatch.setitem(EXECUTORS, "local", Recording)
    return Recording.seen


def test_the_setting_names_exactly_the_executors_there_are() -> None:
    assert set(get_args(ExecutorSpec.model_fields["kind"].annotation)) == set(EXECUTORS)
    assert executor_module.EXECUTORS["local"] is LocalExecutor


def test_every_task_runs_through_the_executor_prepared(
    make_repo: MakeRepo, recording: list[PreparedTask]
) -> None:
    repo = make_repo()
    base = git(repo, "rev-parse", "HEAD")
    envelopes = [
        build_envelope("a", "first", task_id="one", venv=False),
        build_envelope("a", "second", task_id="two", venv=False),
        build_envelope("a", "after both", task_id="three", venv=False, depends_on=["one", "two"]),
    ]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"a": agent}, concurrency=2)
    )
    assert report.summary.successful == 3, report.errors
    by_id = {task.envelope.task_id: task for task in recording}
    assert sorted(by_id) == ["one", "three", "two"] and len(recording) == 3
    assert by_id["one"].start_commit == base and by_id["two"].start_commit == base
    # The dependent starts from the merge of its dependencies' results, told what they made.
    three = by_id["three"]
    assert three.start_commit not in (None, base)
    assert set(three.envelope.upstream) == {"one", "two"}
    assert three.envelope.upstream["one"].output == {"done": "one"}
    assert report.result("three").provenance.base_commit == three.start_commit
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_a_cached_task_never_reaches_the_executor(
    make_repo: MakeRepo, recording: list[PreparedTask]
) -> None:
    repo = make_repo()
    envelopes = [build_envelope("a", "same work", task_id="t", venv=False, cache=True)]
    first = anyio.run(lambda: orchestrate_parallel(envelopes, repo=repo, agents={"a": agent}))
    assert first.summary.successful == 1 and len(recording) == 1
    second = anyio.run(lambda: orchestrate_parallel(envelopes, repo=repo, agents={"a": agent}))
    assert second.results[0].status == "cached" and len(recording) == 1


def test_make_executor_follows_the_settings(tmp_path: Path) -> None:
    ctx = RunContext(
        run_id="r",
        run_dir=tmp_path,
        repo=None,
        base_ref=None,
        base_commit=None,
        base_tree=None,
        plan_dir=tmp_path,
    )
    made = make_executor(ctx)
    assert isinstance(made, LocalExecutor) and made.name == "local"
