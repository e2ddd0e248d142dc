"""The scheduler: priorities, per-agent limits and validated state transitions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import (
    Budget,
    HandoffEnvelope,
    Plan,
    Report,
    TaskFinished,
    TaskQueued,
    TaskResult,
    TaskStarted,
    build_envelope,
)
from orchestrator import (
    OrchestratorError,
    PlanError,
    Workspace,
    orchestrate_parallel,
    verify_report,
)
from orchestrator.scheduler import IllegalTransition, Scheduler, TaskBook

from .conftest import MakeRepo, cli


def test_the_lifecycle_allows_what_it_should_and_nothing_else() -> None:
    book = TaskBook(["a", "b", "c"])
    for state in ("ready", "running", "retrying", "running", "succeeded"):
        book.move("a", state)  # type: ignore[arg-type]
    book.move("b", "skipped")
    book.move("c", "ready")
    book.move("c", "cancelled")
    for task, state in [("a", "running"), ("b", "ready"), ("c", "running")]:
        with pytest.raises(IllegalTransition, match=f"task {task}: "):
            book.move(task, state)  # type: ignore[arg-type]
    fresh = TaskBook(["d"])
    for state in ("running", "succeeded", "retrying"):
        with pytest.raises(IllegalTransition):
            fresh.move("d", state)  # type: ignore[arg-type]


async def _noop(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    await anyio.sleep(0.01)
    return {}


def _run(
    envelopes: list[HandoffEnvelope], tmp_path: Path, **options: Any
) -> tuple[Report, list[Any]]:
    events: list[Any] = []

    async def main() -> Report:
        return await orchestrate_parallel(
            envelopes, state_dir=tmp_path / "state", on_event=events.append, **options
        )

    return anyio.run(main), events


def test_ready_tasks_start_in_priority_order_ties_in_plan_order(tmp_path: Path) -> None:
    priorities = {"p0": 0, "p5a": 5, "p1": 1, "p5b": 5, "p3": 3, "n2": -2}
    envelopes = [
        build_envelope("a", "t", task_id=tid, priority=p, worktree=False, venv=False)
        for tid, p in priorities.items()
    ]
    report, events = _run(envelopes, tmp_path, agents={"a": _noop}, concurrency=1)
    assert report.summary.successful == 6
    started = [e.task_id for e in events if isinstance(e, TaskStarted)]
    assert started == ["p5a", "p5b", "p3", "p1", "p0", "n2"]
    queued = [(e.task_id, e.priority) for e in events if isinstance(e, TaskQueued)]
    assert queued == list(priorities.items())  # every task is queued first, in plan order


def test_per_agent_limit_holds_while_other_agents_go_on(tmp_path: Path) -> None:
    envelopes = [
        build_envelope(agent, "t", task_id=f"{agent}{i}", worktree=False, venv=False)
        for i in range(6)
        for agent in ("slow", "fast")
    ]
    report, events = _run(
        envelopes,
        tmp_path,
        agents={"slow": _noop, "fast": _noop},
        concurrency=6,
        agent_limits={"slow": 2},
    )
    assert report.summary.successful == 12
    running: dict[str, int] = {"slow": 0, "fast": 0}
    peak = {"slow": 0, "fast": 0, "all": 0}
    for event in events:
        if isinstance(event, TaskStarted):
            running[event.agent] += 1
        elif isinstance(event, TaskFinished):
            running[event.agent] -= 1
        for name in ("slow", "fast"):
            peak[name] = max(peak[name], running[name])
        peak["all"] = max(peak["all"], running["slow"] + running["fast"])
    assert peak["slow"] == 2  # never more than its limit...
    assert peak["all"] == 6  # ...while the run's own limit is used to the full


def test_plan_max_concurrency_is_applied(
    make_repo: MakeRepo, write_agent: Any, tmp_path: Path
) -> None:
    marker_dir = tmp_path / "running"
    marker_dir.mkdir()
    agent = write_agent(
        "count",
        f"""
        import os, pathlib, time
        me = pathlib.Path({str(marker_dir)!r}, os.environ["ORCHESTRATOR_TASK_ID"])
        me.touch()
        peak = len(list(me.parent.iterdir()))
        time.sleep(0.1)
        me.unlink()
        pathlib.Path(os.environ["ORCHESTRATOR_OUTPUT"]).write_text('{{"seen": %d}}' % peak)
        """,
    )
    plan = Plan.model_validate(
        {
            "concurrency": 8,
            "agents": {"c": {"command": [sys.executable, str(agent)], "max_concurrency": 1}},
            "defaults": {"venv": False, "worktree": False},
            "tasks": [{"id": f"c{i}", "agent": "c", "task": "t"} for i in range(4)],
        }
    )
    report: Report = anyio.run(lambda: orchestrate_parallel(plan, repo=make_repo()))
    assert [r.output for r in report.results] == [{"seen": 1}] * 4


def test_retries_move_through_retrying_and_every_task_ends_final(tmp_path: Path) -> None:
    tries: dict[str, int] = {}

    async def flaky(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        tries[envelope.task_id] = tries.get(envelope.task_id, 0) + 1
        if tries[envelope.task_id] < 2:
            raise RuntimeError("first try fails")
        return {}

    envelopes = [
        build_envelope("f", "t", task_id=f"f{i}", retries=1, worktree=False, venv=False)
        for i in range(3)
    ]
    states: list[tuple[str, str]] = []

    async def main() -> Report:
        async def watch(event: Any) -> None:
            states.append((event.type, getattr(event, "task_id", "")))

        return await orchestrate_parallel(
            envelopes, agents={"f": flaky}, state_dir=tmp_path / "s", on_event=watch
        )

    report: Report = anyio.run(main)
    assert [r.attempts for r in report.results] == [2, 2, 2]
    assert [t for t, _ in states].count("task_retrying") == 3


def test_bad_limits_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(OrchestratorError, match=r"agent_limits\.a: must be >= 1, found 0"):
        _run(
            [build_envelope("a", "t", worktree=False, venv=False)],
            tmp_path,
            agents={"a": _noop},
            agent_limits={"a": 0},
        )
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "agents:\n  a: {command: [x], max_concurrency: 0}\ntasks:\n  - {agent: a, task: t, priority: high}\n"
    )
    outcome = cli(capsys, "validate", str(plan))
    assert outcome.code == 2
    assert outcome.err.splitlines() == [
        f"{plan}:2:21: agents.a.max_concurrency: must be >= 1, found 0",
        f"{plan}:4:25: tasks[0].priority: must be an integer, found 'high'",
    ]


def _spending_plan(n: int, **budget: object) -> Any:
    from envelopes import Plan

    return Plan.model_validate(
        {
            "concurrency": 2,
            "budget": budget,
            "defaults": {"worktree": False, "venv": False},
            "tasks": [{"id": f"t{i:02d}", "agent": "a", "task": "x"} for i in range(n)],
        }
    )


def test_a_spent_budget_starts_no_further_task(tmp_path: Path) -> None:
    """20 tasks of cost 1.0, max_cost_usd 5, concurrency 2: at most 5 + 2 ran."""

    ran: list[str] = []

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        ran.append(envelope.task_id)
        await anyio.sleep(0.01)
        return {"usage": {"cost_usd": 1.0, "input_tokens": 10}}

    report = anyio.run(
        lambda: orchestrate_parallel(
            _spending_plan(20, max_cost_usd=5), agents={"a": agent}, state_dir=tmp_path / "s"
        )
    )
    assert 5 <= len(ran) <= 5 + 2
    skipped = [r for r in report.results if r.status == "skipped"]
    assert len(skipped) == 20 - len(ran)
    assert all(r.error is not None and r.error.kind == "budget" for r in skipped)
    assert skipped[0].error is not None
    assert "max_cost_usd 5 is spent" in skipped[0].error.message
    assert report.summary.usage is not None and report.summary.usage.cost_usd == len(ran)
    assert any("max_cost_usd 5 is spent" in w for w in report.warnings)
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_on_exceed_cancel_cancels_the_running_tasks_too(tmp_path: Path) -> None:

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        if envelope.task_id == "t00":
            return {"usage": {"total_tokens": 1000}}
        await anyio.sleep(30)  # still running when t00's spend is known
        return {}

    report = anyio.run(
        lambda: orchestrate_parallel(
            _spending_plan(4, max_tokens=500, on_exceed="cancel"),
            agents={"a": agent},
            state_dir=tmp_path / "s",
        )
    )
    statuses = {r.task_id: (r.status, r.error.kind if r.error else None) for r in report.results}
    assert statuses["t00"] == ("succeeded", None)
    assert statuses["t01"] == ("cancelled", "budget")  # was running
    assert statuses["t02"] == ("skipped", "budget") and statuses["t03"] == ("skipped", "budget")


def test_a_budget_needs_a_limit() -> None:
    from orchestrator.plan import validate_plan_data

    with pytest.raises(PlanError, match="a budget needs max_cost_usd, max_tokens or both"):
        validate_plan_data(
            {"budget": {"on_exceed": "stop"}, "tasks": [{"agent": "a", "task": "x"}]},
            callable_agents=["a"],
        )


def test_a_spent_budget_with_fail_fast_and_a_group_ends_every_task_once(tmp_path: Path) -> None:
    """Skipping one task can decide a group, whose failure under fail_fast cancels others:
    each task still ends exactly once."""
    from envelopes import Plan

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        if envelope.group == "g" and envelope.priority == 10:
            raise RuntimeError("one member fails")  # runs first; its group waits for g[0]
        return {"usage": {"cost_usd": 10.0}}

    plan = Plan.model_validate(
        {
            "concurrency": 1,
            "fail_fast": True,
            "budget": {"max_cost_usd": 5},
            "defaults": {"worktree": False, "venv": False},
            "tasks": [
                {"id": "g", "agent": "a", "task": "x", "matrix": {"priority": [10, 0]}},
                {"id": "spend", "agent": "a", "task": "x", "priority": 9},
                {"id": "later", "agent": "a", "task": "x"},
            ],
        }
    )
    report = anyio.run(
        lambda: orchestrate_parallel(plan, agents={"a": agent}, state_dir=tmp_path / "s")
    )
    statuses = {r.task_id: (r.status, r.error.kind if r.error else None) for r in report.results}
    assert statuses["g[10]"][0] == "failed" and statuses["spend"] == ("succeeded", None)
    assert statuses["g[0]"] == ("skipped", "budget")
    assert statuses["later"][0] in ("skipped", "cancelled")


class _CountingResults(dict[str, TaskResult]):
    """The run's results, counting every result read, by key or by walking them."""

    reads = 0

    def __getitem__(self, key: str) -> TaskResult:
        self.reads += 1
        return super().__getitem__(key)

    def values(self) -> Any:
        for value in super().values():
            self.reads += 1
            yield value


class _Spending:
    """The run's side of the scheduler (its ``SchedulerHooks``): each task ends at once
    with *template*'s result, and so its spend."""

    def __init__(self, results: dict[str, TaskResult], book: TaskBook, template: TaskResult):
        self.results, self.book, self.template = results, book, template

    async def queued(self, envelope: HandoffEnvelope) -> None:
        pass

    async def resolve(self, envelope: HandoffEnvelope, upstream: list[str]) -> HandoffEnvelope:
        return envelope

    async def run(self, envelope: HandoffEnvelope) -> None:
        task_id = envelope.task_id
        self.results[task_id] = self.template.model_copy(update={"task_id": task_id})
        self.book.move(task_id, "succeeded")

    async def never_started(self, envelope: HandoffEnvelope, status: Any, error: Any) -> None:
        update = {"task_id": envelope.task_id, "status": status, "error": error, "usage": None}
        self.results[envelope.task_id] = self.template.model_copy(update=update)

    def cancelling(self, task_id: str, error: Any) -> None:
        pass

    async def group_decided(self, name: str, group: Any) -> None:
        pass


def test_a_budget_costs_each_task_the_same_however_many_ended_before(tmp_path: Path) -> None:
    """The spend is added up as tasks end, not walked again at each end (which made a run
    with a budget quadratic: minutes for 100,000 tasks)."""

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        return {"usage": {"cost_usd": 1.0, "input_tokens": 10}}

    template = anyio.run(
        lambda: orchestrate_parallel(
            _spending_plan(1, max_cost_usd=5), agents={"a": agent}, state_dir=tmp_path / "s"
        )
    ).results[0]
    assert template.usage is not None and template.usage.cost_usd == 1.0

    def schedule(n: int, max_cost_usd: float) -> tuple[TaskBook, _CountingResults]:
        envelopes = [
            build_envelope("a", "t", task_id=f"t{i}", worktree=False, venv=False) for i in range(n)
        ]
        results = _CountingResults()
        book = TaskBook([e.task_id for e in envelopes])
        scheduler = Scheduler(
            envelopes,
            _Spending(results, book, template),
            limit=4,
            agent_limits={},
            book=book,
            results=results,
            budget=Budget(max_cost_usd=max_cost_usd),
        )
        anyio.run(scheduler.run)
        return book, results

    book, results = schedule(300, max_cost_usd=10**6)
    assert set(book.states.values()) == {"succeeded"}
    assert results.reads <= 3 * 300  # a few reads of its own result per task, not all before it
    # And the spend still stops the run: 1 USD a task, at most 4 running when 10 are spent.
    book, _ = schedule(50, max_cost_usd=10)
    succeeded = sum(state == "succeeded" for state in book.states.values())
    assert 10 <= succeeded <= 10 + 4
    assert set(book.states.values()) == {"succeeded", "skipped"}
