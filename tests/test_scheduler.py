"""The scheduler: priorities, per-agent limits and validated state transitions."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
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

    before = datetime.now(UTC)
    report = anyio.run(
        lambda: orchestrate_parallel(
            _spending_plan(20, max_cost_usd=5), agents={"a": agent}, state_dir=tmp_path / "s"
        )
    )
    after = datetime.now(UTC)
    assert 5 <= len(ran) <= 5 + 2
    skipped = [r for r in report.results if r.status == "skipped"]
    assert len(skipped) == 20 - len(ran)
    assert all(r.error is not None and r.error.kind == "budget" for r in skipped)
    assert skipped[0].error is not None
    assert "max_cost_usd 5 is spent" in skipped[0].error.message
    assert report.summary.usage is not None and report.summary.usage.cost_usd == len(ran)
    [warning] = [w for w in report.warnings if "max_cost_usd 5 is spent" in w]
    # When it was spent, as a time in UTC the reader can place in the run.
    spent_at = datetime.fromisoformat(warning.split(" at ")[1].split(": ")[0])
    assert spent_at.utcoffset() == timedelta(0) and before <= spent_at <= after
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


# -- the scheduler alone, with hooks that play the run ----------------------------------------


def _result(task_id: str, status: str, error: Any = None, usage: Any = None) -> Any:
    from envelopes import TaskResult

    # The scheduler reads a result's status and usage only.
    return TaskResult.model_construct(task_id=task_id, status=status, error=error, usage=usage)


class _Hooks:
    """SchedulerHooks that run each task at once to the status *outcomes* gives it
    (``succeeded`` by default), or until the test sets its gate; everything is logged."""

    def __init__(self, book: TaskBook, outcomes: dict[str, str] | None = None) -> None:
        self.book = book
        self.outcomes = outcomes or {}
        self.results: dict[str, Any] = {}
        self.log: list[tuple[Any, ...]] = []
        self.gates: dict[str, anyio.Event] = {}
        self.resolutions: dict[str, Any] = {}
        self.usage: dict[str, Any] = {}
        self.running = self.peak = 0

    async def queued(self, envelope: HandoffEnvelope) -> None:
        self.log.append(("queued", envelope.task_id))

    async def resolve(self, envelope: HandoffEnvelope, upstream: list[str]) -> Any:
        self.log.append(("resolve", envelope.task_id, upstream))
        return self.resolutions.get(envelope.task_id, envelope)

    async def run(self, envelope: HandoffEnvelope) -> None:
        task_id = envelope.task_id
        self.log.append(("run", task_id))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if task_id in self.gates:
                await self.gates[task_id].wait()
            else:
                await anyio.lowlevel.checkpoint()
        except anyio.get_cancelled_exc_class():
            self.book.move(task_id, "cancelled")
            self.results[task_id] = _result(task_id, "cancelled")
            raise
        finally:
            self.running -= 1
        status = self.outcomes.get(task_id, "succeeded")
        self.book.move(task_id, status)  # type: ignore[arg-type]
        self.results[task_id] = _result(task_id, status, usage=self.usage.get(task_id))

    async def never_started(self, envelope: HandoffEnvelope, status: str, error: Any) -> None:
        self.log.append((status, envelope.task_id, error.kind, error.message))
        self.results[envelope.task_id] = _result(envelope.task_id, status, error)

    def cancelling(self, task_id: str, error: Any) -> None:
        self.log.append(("cancelling", task_id, error.kind, error.message))

    async def group_decided(self, name: str, group: Any) -> None:
        self.log.append(("decided", name, list(group.selected)))


def _task(task_id: str, agent: str = "a", **fields: Any) -> HandoffEnvelope:
    return build_envelope(agent, "t", task_id=task_id, worktree=False, venv=False, **fields)


def _schedule(
    envelopes: list[HandoffEnvelope],
    *,
    outcomes: dict[str, str] | None = None,
    prepare: Any = None,
    limit: int = 10,
    agent_limits: dict[str, int] | None = None,
    **options: Any,
) -> _Hooks:
    """Run *envelopes* through a Scheduler with _Hooks (*prepare* sees the hooks first);
    the hooks, with their log and results."""
    from orchestrator.scheduler import Scheduler

    book = TaskBook([e.task_id for e in envelopes])
    hooks = _Hooks(book, outcomes)
    if prepare is not None:
        prepare(hooks)
    scheduler = Scheduler(
        envelopes,
        hooks,
        limit=limit,
        agent_limits=agent_limits or {},
        book=book,
        results=hooks.results,
        **options,
    )
    anyio.run(scheduler.run)
    assert all(book.states[t] == hooks.results[t].status for t in book.states)
    # Every task's envelope is let go when it ends, whatever ended it.
    assert scheduler.envelopes == {}
    return hooks


def _ran(hooks: _Hooks) -> list[str]:
    return [entry[1] for entry in hooks.log if entry[0] == "run"]


def test_a_task_that_did_not_succeed_skips_its_dependents_and_theirs() -> None:
    hooks = _schedule(
        [
            _task("a"),
            _task("b", depends_on=["a"]),
            _task("c", depends_on=["b"]),
            _task("slow"),
            _task("d", depends_on=["slow"]),
            _task("free"),
        ],
        outcomes={"a": "failed", "slow": "timed_out"},
    )
    skipped = [entry for entry in hooks.log if entry[0] == "skipped"]
    assert skipped == [
        ("skipped", "b", "dependency", "dependency a failed"),
        ("skipped", "c", "dependency", "dependency b was skipped"),
        ("skipped", "d", "dependency", "dependency slow timed out"),
    ]
    assert _ran(hooks) == ["a", "slow", "free"]


def test_a_dependent_starts_once_from_its_dependencies_in_the_order_it_names_them() -> None:
    hooks = _schedule(
        [
            _task("a"),
            _task("b"),
            _task("c", depends_on=["b", "a", "b"]),  # named twice: resolved once
            _task("d", depends_on=["c"]),
        ]
    )
    resolved = [entry for entry in hooks.log if entry[0] == "resolve"]
    assert resolved == [("resolve", "c", ["b", "a"]), ("resolve", "d", ["c"])]
    assert _ran(hooks) == ["a", "b", "c", "d"]


def test_a_start_that_cannot_be_prepared_skips_the_task_and_its_dependents() -> None:
    from envelopes import ErrorInfo

    conflict = ErrorInfo(kind="dependency_conflict", message="a and b both change f")

    def prepare(hooks: _Hooks) -> None:
        hooks.resolutions["c"] = conflict

    hooks = _schedule(
        [_task("a"), _task("c", depends_on=["a"]), _task("d", depends_on=["c"])],
        prepare=prepare,
    )
    assert [entry for entry in hooks.log if entry[0] == "skipped"] == [
        ("skipped", "c", "dependency_conflict", "a and b both change f"),
        ("skipped", "d", "dependency", "dependency c was skipped"),
    ]


def test_the_envelope_a_start_was_prepared_with_is_the_one_that_runs() -> None:
    ran: list[HandoffEnvelope] = []

    def prepare(hooks: _Hooks) -> None:
        hooks.resolutions["b"] = _task("b", depends_on=["a"]).model_copy(
            update={"task": "b, from a's result"}
        )
        real_run = hooks.run

        async def run(envelope: HandoffEnvelope) -> None:
            ran.append(envelope)
            await real_run(envelope)

        hooks.run = run  # type: ignore[method-assign]

    _schedule([_task("a"), _task("b", depends_on=["a"])], prepare=prepare)
    assert [e.task for e in ran] == ["t", "b, from a's result"]


def test_a_task_whose_dependency_is_being_prepared_keeps_its_place_in_the_queue() -> None:
    """While a high-priority dependent's start is prepared, a lower-priority task that is
    ready does not take the free slot; another agent's task at its limit does not block."""
    hooks = _schedule(
        [
            _task("dep", priority=5),
            _task("high", priority=9, depends_on=["dep"]),
            _task("low", priority=1),
        ],
        limit=1,
    )
    assert _ran(hooks) == ["dep", "high", "low"]


def test_an_agent_at_its_limit_lets_the_next_task_start() -> None:
    def prepare(hooks: _Hooks) -> None:
        hooks.gates["x1"] = anyio.Event()
        real_run = hooks.run

        async def run(envelope: HandoffEnvelope) -> None:
            if envelope.task_id == "y1":
                hooks.gates["x1"].set()
            await real_run(envelope)

        hooks.run = run  # type: ignore[method-assign]

    hooks = _schedule(
        [_task("x1", "x", priority=3), _task("x2", "x", priority=2), _task("y1", "y")],
        limit=2,
        agent_limits={"x": 1},
    )
    assert _ran(hooks) == ["x1", "y1", "x2"]


def _gated(*task_ids: str) -> Any:
    """A *prepare* that holds *task_ids* running until they are cancelled."""

    def prepare(hooks: _Hooks) -> None:
        for task_id in task_ids:
            hooks.gates[task_id] = anyio.Event()

    return prepare


STOP = "cancelled: {}, and the run stops at the first failure"


@pytest.mark.parametrize("status", ["failed", "timed_out"])
def test_fail_fast_cancels_the_running_and_never_starts_the_rest(status: str) -> None:
    hooks = _schedule(
        [_task("a", priority=2), _task("b", priority=1), _task("c"), _task("d", depends_on=["c"])],
        outcomes={"a": status},
        prepare=_gated("b"),
        limit=2,
        fail_fast=True,
    )
    why = STOP.format("a failed" if status == "failed" else "a timed out")
    assert [entry for entry in hooks.log if entry[0] in ("cancelling", "cancelled")] == [
        ("cancelling", "b", "cancelled", why),
        ("cancelled", "c", "cancelled", why),
        ("cancelled", "d", "cancelled", why),
    ]
    assert _ran(hooks) == ["a", "b"]
    assert hooks.results["b"].status == "cancelled"


def test_without_fail_fast_a_failure_stops_nothing() -> None:
    hooks = _schedule(
        [_task("a", priority=2), _task("b", priority=1), _task("c")],
        outcomes={"a": "failed", "b": "cancelled"},
        limit=2,
    )
    assert _ran(hooks) == ["a", "b", "c"]
    assert not any(entry[0] == "cancelling" for entry in hooks.log)


def test_a_task_cancelled_before_it_recorded_anything_never_started() -> None:
    """Cancelled while its start was still being told (no result yet): ``cancelled``, with
    why the run cancelled it, or that it never started."""

    def prepare(hooks: _Hooks) -> None:
        async def run(envelope: HandoffEnvelope) -> None:
            hooks.log.append(("run", envelope.task_id))
            if envelope.task_id == "a":
                hooks.book.move("a", "failed")
                hooks.results["a"] = _result("a", "failed")
            else:
                await anyio.sleep_forever()  # cancelled; records nothing

        hooks.run = run  # type: ignore[method-assign]

    hooks = _schedule([_task("a"), _task("b")], prepare=prepare, fail_fast=True)
    assert hooks.log[-1] == ("cancelled", "b", "cancelled", STOP.format("a failed"))


def test_a_group_with_select_first_success_takes_the_first_and_cancels_the_others() -> None:
    members = [
        _task(f"g[{i}]", group="g", select="first_success", priority=3 - i) for i in range(4)
    ]
    hooks = _schedule(
        [*members, _task("after", depends_on=["g"])],
        outcomes={"g[0]": "failed"},
        prepare=_gated("g[2]"),
        limit=2,
        fail_fast=True,  # a member's failure is the group's business, not the run's
    )
    why = "not needed: g[1] succeeded first in group g"
    assert [entry for entry in hooks.log if entry[0] in ("decided", "cancelling", "cancelled")] == [
        ("decided", "g", ["g[1]"]),
        ("cancelling", "g[2]", "not_needed", why),
        ("cancelled", "g[3]", "not_needed", why),
    ]
    assert ("resolve", "after", ["g[1]"]) in hooks.log
    assert _ran(hooks) == ["g[0]", "g[1]", "g[2]", "after"]


@pytest.mark.parametrize(
    ("select", "outcomes", "skipped"),
    [
        ("all", {"g[1]": "failed"}, "dependency g: 1 of 2 members did not succeed"),
        (
            "all",
            {"g[0]": "failed", "g[1]": "failed"},
            "dependency g: 2 of 2 members did not succeed",
        ),
        (
            "first_success",
            {"g[0]": "failed", "g[1]": "timed_out"},
            "dependency g: no member succeeded",
        ),
    ],
)
def test_a_group_that_did_not_succeed_skips_its_dependents(
    select: str, outcomes: dict[str, str], skipped: str
) -> None:
    members = [_task(f"g[{i}]", group="g", select=select) for i in range(2)]
    hooks = _schedule([*members, _task("after", depends_on=["g"])], outcomes=outcomes)
    selected = (
        [] if select == "first_success" else [m for m in ("g[0]", "g[1]") if m not in outcomes]
    )
    assert ("decided", "g", selected) in hooks.log
    assert hooks.log[-1] == ("skipped", "after", "dependency", skipped)


def test_a_group_with_select_all_starts_its_dependents_from_every_member() -> None:
    members = [_task(f"g[{i}]", group="g", select="all") for i in range(3)]
    hooks = _schedule([_task("a"), *members, _task("after", depends_on=["a", "g", "g[1]"])])
    assert ("decided", "g", ["g[0]", "g[1]", "g[2]"]) in hooks.log
    assert ("resolve", "after", ["a", "g[0]", "g[1]", "g[2]"]) in hooks.log


def test_a_failed_group_stops_a_fail_fast_run_but_a_cancelled_one_does_not() -> None:
    members = [_task(f"g[{i}]", group="g", select="all", priority=5) for i in range(2)]
    hooks = _schedule(
        [*members, _task("other", priority=1)],
        outcomes={"g[1]": "failed"},
        prepare=_gated("other"),
        limit=3,
        fail_fast=True,
    )
    why = STOP.format("group g: 1 of 2 members did not succeed")
    assert ("cancelling", "other", "cancelled", why) in hooks.log
    quiet = _schedule(
        [*members, _task("other", priority=1)],
        outcomes={"g[1]": "cancelled"},
        limit=3,
        fail_fast=True,
    )
    assert not any(entry[0] == "cancelling" for entry in quiet.log)
    assert _ran(quiet) == ["g[0]", "g[1]", "other"]


def test_tasks_restored_from_an_earlier_session_are_final_from_the_start() -> None:
    """A resumed run's kept results: never run again; their dependents go on from them,
    their failures still skip, and their groups count them."""

    def prepare(hooks: _Hooks) -> None:
        hooks.results["a"] = _result("a", "succeeded")
        hooks.results["bad"] = _result("bad", "failed")
        hooks.results["g[0]"] = _result("g[0]", "succeeded")

    members = [_task(f"g[{i}]", group="g", select="all") for i in range(2)]
    hooks = _schedule(
        [
            _task("a"),
            _task("bad"),
            *members,
            _task("b", depends_on=["a"]),
            _task("c", depends_on=["bad"]),
            _task("d", depends_on=["g"]),
        ],
        prepare=prepare,
        restored=["a", "bad", "g[0]"],
    )
    assert _ran(hooks) == ["g[1]", "b", "d"]
    assert ("skipped", "c", "dependency", "dependency bad failed") in hooks.log
    assert ("resolve", "d", ["g[0]", "g[1]"]) in hooks.log
    assert not any(entry[:2] == ("queued", "a") for entry in hooks.log)


def test_restore_puts_a_pending_task_in_a_final_state_only() -> None:
    moves: list[tuple[str, str]] = []
    book = TaskBook(["a", "b", "c"], on_move=lambda task, state: moves.append((task, state)))
    book.restore("a", "succeeded")
    book.move("b", "ready")
    with pytest.raises(IllegalTransition, match=r"^task b: cannot restore ready -> failed$"):
        book.restore("b", "failed")
    with pytest.raises(IllegalTransition, match=r"^task c: cannot restore pending -> running$"):
        book.restore("c", "running")
    with pytest.raises(IllegalTransition, match=r"^task a: succeeded -> ready is not a valid"):
        book.move("a", "ready")
    assert book.states == {"a": "succeeded", "b": "ready", "c": "pending"}
    assert moves == [("b", "ready")]  # a restore is no move: the journal has it already
    assert (book.count("pending"), book.count("ready"), book.count("failed")) == (1, 1, 0)


def test_a_task_left_running_by_its_hook_is_a_bug_that_raises() -> None:
    def prepare(hooks: _Hooks) -> None:
        async def run(envelope: HandoffEnvelope) -> None:
            hooks.results[envelope.task_id] = _result(envelope.task_id, "succeeded")

        hooks.run = run  # type: ignore[method-assign]

    with pytest.raises(IllegalTransition, match=r"^tasks never reached a final state: a, b, c$"):
        _schedule([_task("a"), _task("b"), _task("c", depends_on=["a"])], prepare=prepare)


def _usage(**fields: Any) -> Any:
    from envelopes import Usage

    return Usage(**fields)


def test_over_budget_adds_up_what_the_results_say_they_spent() -> None:
    from envelopes import Budget
    from orchestrator.scheduler import budget_reached, spend

    def over_budget(budget: Budget, results: list[Any]) -> str | None:
        """What the scheduler adds up as tasks end, here all at once."""
        spent = [spend(r.usage) for r in results]
        return budget_reached(budget, sum(c for c, _ in spent), sum(t for _, t in spent))

    results = [
        _result("a", "succeeded", usage=_usage(cost_usd=1.5, total_tokens=100)),
        _result("b", "failed", usage=_usage(input_tokens=30, output_tokens=20)),
        _result("c", "succeeded", usage=_usage(input_tokens=7)),
        _result("d", "succeeded", usage=_usage(output_tokens=3)),
        _result("e", "succeeded"),  # spent what nobody knows
    ]
    # 1.5 USD and 160 tokens in all.
    assert over_budget(Budget(max_cost_usd=1.6, max_tokens=161), results) is None
    assert over_budget(Budget(max_cost_usd=1.5), results) == (
        "the run's budget max_cost_usd 1.5 is spent (1.5 USD)"
    )
    assert over_budget(Budget(max_cost_usd=1.25), results) == (
        "the run's budget max_cost_usd 1.25 is spent (1.5 USD)"
    )
    assert over_budget(Budget(max_tokens=160), results) == (
        "the run's budget max_tokens 160 is spent (160 tokens)"
    )
    assert over_budget(Budget(max_cost_usd=100, max_tokens=150), results) == (
        "the run's budget max_tokens 150 is spent (160 tokens)"
    )
    assert over_budget(Budget(max_cost_usd=1 / 3), [results[0]]) == (
        "the run's budget max_cost_usd 0.333333 is spent (1.5 USD)"
    )
    assert over_budget(
        Budget(max_cost_usd=1.0), [_result("x", "succeeded", usage=_usage(cost_usd=1.23456))]
    ) == ("the run's budget max_cost_usd 1 is spent (1.235 USD)")


def test_a_spent_budget_skips_what_waits_and_cancels_what_runs_only_if_asked() -> None:
    from envelopes import Budget

    def prepare(hooks: _Hooks) -> None:
        hooks.usage["spender"] = _usage(cost_usd=2.0)
        hooks.gates["busy"] = anyio.Event()

    envelopes = [
        _task("spender", priority=3),
        _task("busy", priority=2),
        _task("waiting", priority=1),
        _task("after", depends_on=["waiting"]),
    ]
    stop = Budget(max_cost_usd=1)
    spent = "the run's budget max_cost_usd 1 is spent (2 USD)"

    def release_busy(hooks: _Hooks) -> None:
        prepare(hooks)
        real_run = hooks.run

        async def run(envelope: HandoffEnvelope) -> None:
            await real_run(envelope)
            if envelope.task_id == "spender":
                hooks.gates["busy"].set()  # lets busy end, once the spend is known

        hooks.run = run  # type: ignore[method-assign]

    hooks = _schedule(envelopes, prepare=release_busy, limit=2, budget=stop)
    assert hooks.results["busy"].status == "succeeded"
    assert [entry for entry in hooks.log if entry[0] == "skipped"] == [
        ("skipped", "waiting", "budget", f"not started: {spent}"),
        ("skipped", "after", "budget", f"not started: {spent}"),
    ]
    cancel = Budget(max_cost_usd=1, on_exceed="cancel")
    hooks = _schedule(envelopes, prepare=prepare, limit=2, budget=cancel)
    assert [entry for entry in hooks.log if entry[0] in ("cancelling", "skipped")] == [
        ("cancelling", "busy", "budget", f"cancelled: {spent}"),
        ("skipped", "waiting", "budget", f"not started: {spent}"),
        ("skipped", "after", "budget", f"not started: {spent}"),
    ]


def test_graph_problems_name_unknown_tasks_own_groups_and_cycles_through_groups() -> None:
    from orchestrator.scheduler import graph_problems

    members = [_task(f"g[{i}]", group="g", select="all", depends_on=["x"]) for i in range(2)]
    assert graph_problems([*members, _task("x"), _task("y", depends_on=["g", "g[1]"])]) == []
    assert graph_problems(
        [
            _task("g[0]", group="g", select="all", depends_on=["g"]),
            _task("a", depends_on=["b"]),
            _task("b", depends_on=["a", "nope"]),
            _task("h[0]", group="h", select="all", depends_on=["c"]),
            _task("h[1]", group="h", select="all"),
            _task("c", depends_on=["h"]),
        ]
    ) == [
        "task g[0]: depends on its own group 'g'",
        "task b: depends on unknown task 'nope'",
        "cycle a -> b -> a",
        "cycle h[0] -> c -> h[0]",  # c needs all of group h, and h[0] needs c
    ]


def test_a_task_being_cancelled_is_told_why_once() -> None:
    """A member cancelled as not needed, and caught by fail-fast while it still ends (an
    agent takes a while to stop): the first reason stands, and the run is told of it once."""

    def prepare(hooks: _Hooks) -> None:
        real_run = hooks.run

        async def run(envelope: HandoffEnvelope) -> None:
            if envelope.task_id != "g[1]":
                return await real_run(envelope)
            hooks.log.append(("run", "g[1]"))
            try:
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    for _ in range(20):  # stopping takes a while: x's failure comes meanwhile
                        await anyio.lowlevel.checkpoint()
                    hooks.book.move("g[1]", "cancelled")
                    hooks.results["g[1]"] = _result("g[1]", "cancelled")

        hooks.run = run  # type: ignore[method-assign]

    members = [
        _task(f"g[{i}]", group="g", select="first_success", priority=3 - i) for i in range(2)
    ]
    hooks = _schedule(
        [*members, _task("x")], outcomes={"x": "failed"}, prepare=prepare, limit=3, fail_fast=True
    )
    assert [entry for entry in hooks.log if entry[0] == "cancelling"] == [
        ("cancelling", "g[1]", "not_needed", "not needed: g[0] succeeded first in group g")
    ]


def test_a_spent_budget_cancels_a_task_between_two_tries_if_asked() -> None:
    """``on_exceed: cancel`` cancels a task waiting to try again as it does a running one."""
    from envelopes import Budget

    def prepare(hooks: _Hooks) -> None:
        hooks.usage["spender"] = _usage(cost_usd=2.0)
        hooks.gates["busy"] = anyio.Event()
        real_run, real_never_started = hooks.run, hooks.never_started

        async def run(envelope: HandoffEnvelope) -> None:
            if envelope.task_id == "busy":
                hooks.book.move("busy", "retrying")  # its first try failed
            await real_run(envelope)

        async def never_started(envelope: HandoffEnvelope, status: str, error: Any) -> None:
            await real_never_started(envelope, status, error)
            hooks.gates["busy"].set()  # the budget is spent: busy would try again now

        hooks.run = run  # type: ignore[method-assign]
        hooks.never_started = never_started  # type: ignore[method-assign]

    hooks = _schedule(
        [_task("spender", priority=3), _task("busy", priority=2), _task("waiting")],
        outcomes={"busy": "failed"},  # were it let go on to its end
        prepare=prepare,
        limit=2,
        budget=Budget(max_cost_usd=1, on_exceed="cancel"),
    )
    spent = "the run's budget max_cost_usd 1 is spent (2 USD)"
    assert [entry for entry in hooks.log if entry[0] in ("cancelling", "skipped")] == [
        ("cancelling", "busy", "budget", f"cancelled: {spent}"),
        ("skipped", "waiting", "budget", f"not started: {spent}"),
    ]
    assert hooks.results["busy"].status == "cancelled"


def _hold_a_start(hooks: _Hooks, ends: str) -> anyio.Event:
    """Let task *ends* end while a dependent's start is being prepared, and hold that start
    until some task is told it never started; the event returned is set then."""
    hooks.gates[ends] = anyio.Event()
    stopped = anyio.Event()
    real_resolve, real_never_started = hooks.resolve, hooks.never_started

    async def resolve(envelope: HandoffEnvelope, upstream: list[str]) -> Any:
        hooks.gates[ends].set()
        await stopped.wait()
        return await real_resolve(envelope, upstream)

    async def never_started(envelope: HandoffEnvelope, status: str, error: Any) -> None:
        await real_never_started(envelope, status, error)
        stopped.set()

    hooks.resolve = resolve  # type: ignore[method-assign]
    hooks.never_started = never_started  # type: ignore[method-assign]
    return stopped


def test_a_task_whose_start_is_being_prepared_when_the_budget_is_spent_is_skipped() -> None:
    """Like every task not started when the budget is spent: ``skipped``, kind ``budget``."""
    from envelopes import Budget

    def prepare(hooks: _Hooks) -> None:
        hooks.usage["spender"] = _usage(cost_usd=2.0)
        spent = _hold_a_start(hooks, "spender")
        real_run = hooks.run

        async def run(envelope: HandoffEnvelope) -> None:
            if envelope.task_id == "waiting":
                spent.set()  # started after all: the budget stopped nothing
            await real_run(envelope)

        hooks.run = run  # type: ignore[method-assign]

    hooks = _schedule(
        [
            _task("first", priority=3),
            _task("spender", priority=2),
            _task("after", depends_on=["first"]),
            _task("waiting"),  # held in the queue behind after, then skipped
        ],
        prepare=prepare,
        limit=2,
        budget=Budget(max_cost_usd=1),
    )
    not_started = "not started: the run's budget max_cost_usd 1 is spent (2 USD)"
    assert [entry for entry in hooks.log if entry[0] in ("cancelled", "skipped")] == [
        ("skipped", "waiting", "budget", not_started),
        ("skipped", "after", "budget", not_started),  # once its start is prepared
    ]
    assert _ran(hooks) == ["first", "spender"]


def test_a_group_whose_members_all_timed_out_stops_a_fail_fast_run() -> None:
    def prepare(hooks: _Hooks) -> None:
        hooks.gates["other"] = anyio.Event()
        real_group_decided = hooks.group_decided

        async def group_decided(name: str, group: Any) -> None:
            await real_group_decided(name, group)
            hooks.gates["other"].set()  # other may end now: the run is to stop it all the same

        hooks.group_decided = group_decided  # type: ignore[method-assign]

    members = [_task(f"g[{i}]", group="g", select="first_success", priority=5) for i in range(2)]
    hooks = _schedule(
        [*members, _task("other", priority=1)],
        outcomes={"g[0]": "timed_out", "g[1]": "timed_out"},
        prepare=prepare,
        limit=3,
        fail_fast=True,
    )
    why = STOP.format("group g: no member succeeded")
    assert [entry for entry in hooks.log if entry[0] == "cancelling"] == [
        ("cancelling", "other", "cancelled", why)
    ]


def test_fail_fast_never_starts_a_task_whose_start_is_being_prepared() -> None:
    def prepare(hooks: _Hooks) -> None:
        _hold_a_start(hooks, "bad")

    hooks = _schedule(
        [
            _task("first", priority=3),
            _task("bad", priority=2),
            _task("after", depends_on=["first"]),
            _task("waiting"),  # held in the queue behind after, then cancelled
        ],
        outcomes={"bad": "failed"},
        prepare=prepare,
        limit=2,
        fail_fast=True,
    )
    why = STOP.format("bad failed")
    assert [entry for entry in hooks.log if entry[0] in ("cancelled", "skipped")] == [
        ("cancelled", "waiting", "cancelled", why),
        ("cancelled", "after", "cancelled", why),  # once its start is prepared
    ]
    assert _ran(hooks) == ["first", "bad"]


def test_a_budget_counts_tokens_from_none_spent() -> None:
    """99 tokens of max_tokens 100 leave room for one more task; the 100th token ends it."""
    from envelopes import Budget

    def prepare(hooks: _Hooks) -> None:
        hooks.usage["a"] = _usage(total_tokens=99)
        hooks.usage["b"] = _usage(total_tokens=1)

    hooks = _schedule(
        [_task("a", priority=2), _task("b", priority=1), _task("c")],
        prepare=prepare,
        limit=1,
        budget=Budget(max_tokens=100),
    )
    assert _ran(hooks) == ["a", "b"]
    assert hooks.log[-1] == (
        "skipped",
        "c",
        "budget",
        "not started: the run's budget max_tokens 100 is spent (100 tokens)",
    )


def test_a_group_without_select_waits_for_all_its_members() -> None:
    members = [_task(f"g[{i}]", group="g") for i in range(2)]
    hooks = _schedule([*members, _task("after", depends_on=["g"])])
    assert ("decided", "g", ["g[0]", "g[1]"]) in hooks.log
    assert ("resolve", "after", ["g[0]", "g[1]"]) in hooks.log
    assert _ran(hooks) == ["g[0]", "g[1]", "after"]


def test_a_task_whose_dependency_is_being_prepared_keeps_its_place_below_zero_too() -> None:
    hooks = _schedule(
        [
            _task("dep"),
            _task("high", priority=-5, depends_on=["dep"]),
            _task("low", priority=-10),
        ],
        limit=1,
    )
    assert _ran(hooks) == ["dep", "high", "low"]


def test_a_task_cancelled_while_it_waited_for_a_slot_lets_the_next_one_start() -> None:
    members = [
        _task(f"g[{i}]", group="g", select="first_success", priority=2 - i) for i in range(2)
    ]
    hooks = _schedule([*members, _task("other")], limit=1)
    assert ("cancelled", "g[1]", "not_needed", "not needed: g[0] succeeded first in group g") in (
        hooks.log
    )
    assert _ran(hooks) == ["g[0]", "other"]


def test_a_task_whose_run_ended_without_a_result_never_started() -> None:
    """Its run stopped before it recorded anything, and the run did not cancel it."""

    def prepare(hooks: _Hooks) -> None:
        async def run(envelope: HandoffEnvelope) -> None:
            hooks.log.append(("run", envelope.task_id))
            with anyio.CancelScope() as scope:  # stopped from inside, not by the run
                scope.cancel()
                await anyio.sleep_forever()

        hooks.run = run  # type: ignore[method-assign]

    hooks = _schedule([_task("a")], prepare=prepare)
    assert hooks.log[-1] == ("cancelled", "a", "cancelled", "cancelled before this task started")


def test_a_task_skipped_or_ended_before_its_last_dependency_leaves_the_others_to_go_on() -> None:
    hooks = _schedule(
        [
            _task("a", priority=2),
            _task("b", priority=1),
            _task("x", depends_on=["a", "b"]),
            _task("y", depends_on=["a"]),
            _task("z", depends_on=["b"]),
        ],
        outcomes={"a": "failed"},
        limit=1,
    )
    assert [entry for entry in hooks.log if entry[0] == "skipped"] == [
        ("skipped", "x", "dependency", "dependency a failed"),
        ("skipped", "y", "dependency", "dependency a failed"),
    ]
    assert _ran(hooks) == ["a", "b", "z"]


def test_a_task_runs_as_an_async_task_named_after_it() -> None:
    """What a debugger or a dump of the run's async tasks shows."""
    names: list[str] = []

    def prepare(hooks: _Hooks) -> None:
        real_run = hooks.run

        async def run(envelope: HandoffEnvelope) -> None:
            names.append(anyio.get_current_task().name)
            await real_run(envelope)

        hooks.run = run  # type: ignore[method-assign]

    _schedule([_task("a"), _task("b", depends_on=["a"])], prepare=prepare)
    assert names == ["task a", "task b"]


def test_tasks_that_end_together_are_taken_in_one_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler takes the ends already queued without waiting on its stream for each:
    waiting yields to every running task first, and each successor would start a full turn
    of the event loop later (the latency from a slot freed to the next start)."""
    from anyio.streams.memory import MemoryObjectReceiveStream

    waits = 0
    receive = MemoryObjectReceiveStream.receive

    async def counted(self: MemoryObjectReceiveStream[Any]) -> Any:
        nonlocal waits
        waits += 1
        return await receive(self)

    monkeypatch.setattr(MemoryObjectReceiveStream, "receive", counted)
    # Four slots: the four tasks running end in the same turn (one checkpoint each).
    hooks = _schedule([_task(f"t{i:02d}") for i in range(40)], limit=4)
    assert len(_ran(hooks)) == 40
    assert waits <= 40 // 4 + 2
