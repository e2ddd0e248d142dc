"""The event stream: as an async iterator, as a callback, and as events.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import TypeAdapter

from envelopes import (
    Event,
    HandoffEnvelope,
    Report,
    RunFinished,
    RunStarted,
    TaskFinished,
    TaskSkipped,
    build_envelope,
)
from orchestrator import PlanError, RunEvents, Workspace, run_events


async def work(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    await anyio.sleep(0.01)
    if envelope.inputs.get("fail"):
        raise RuntimeError("failing as told")
    return {"id": envelope.task_id}


def envelopes() -> list[HandoffEnvelope]:
    def env(task_id: str, *deps: str, **inputs: Any) -> HandoffEnvelope:
        return build_envelope(
            "w",
            "t",
            task_id=task_id,
            depends_on=list(deps),
            inputs=inputs,
            worktree=False,
            venv=False,
        )

    return [env("a"), env("b", "a", fail=True), env("c", "b"), env("d", "a")]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_iterator_yields_every_event_as_events_jsonl_records_it(
    tmp_path: Path, backend: str
) -> None:
    called: list[Event] = []

    async def main() -> tuple[list[Event], RunEvents]:
        seen: list[Event] = []
        async with run_events(
            envelopes(), agents={"w": work}, state_dir=tmp_path, on_event=called.append
        ) as events:
            async for event in events:
                seen.append(event)
        return seen, events

    seen, events = anyio.run(main, backend=backend)
    report = events.report
    assert isinstance(report, Report)
    assert isinstance(seen[0], RunStarted) and isinstance(seen[-1], RunFinished)
    assert called == seen  # the callback sees the same stream
    kinds = [e.type for e in seen]
    assert kinds.count("task_finished") == 3 and kinds.count("task_skipped") == 1
    skipped = next(e for e in seen if isinstance(e, TaskSkipped))
    assert skipped.task_id == "c" and skipped.error.message == "dependency b failed"
    logged = (Path(report.run_dir) / "events.jsonl").read_text().splitlines()
    adapter: TypeAdapter[Event] = TypeAdapter(Event)
    assert [adapter.validate_json(line) for line in logged] == seen
    assert all(e.run_id == report.run_id for e in seen)


def test_breaking_out_early_lets_the_run_finish(tmp_path: Path) -> None:
    async def main() -> RunEvents:
        async with run_events(envelopes(), agents={"w": work}, state_dir=tmp_path) as events:
            async for event in events:
                if isinstance(event, TaskFinished):
                    break
        return events

    events = anyio.run(main)
    assert events.report is not None and events.report.summary.total_tasks == 4
    assert {r.status for r in events.report.results} == {"succeeded", "failed", "skipped"}


def test_an_error_in_the_block_cancels_the_run_and_propagates_as_is(tmp_path: Path) -> None:
    async def slow(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        await anyio.sleep(30)
        return {}

    async def main() -> None:
        async with run_events(
            [build_envelope("w", "t", task_id="s", worktree=False, venv=False)],
            agents={"w": slow},
            state_dir=tmp_path,
        ) as events:
            async for event in events:
                if event.type == "task_started":
                    raise KeyError("reader gave up")

    with pytest.raises(KeyError, match="reader gave up"):
        anyio.run(main)
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["status"] for r in report["results"]] == ["cancelled"]


def test_the_runs_own_error_is_raised_when_the_block_is_left(tmp_path: Path) -> None:
    async def main() -> list[Event]:
        seen: list[Event] = []
        async with run_events(
            [build_envelope("w", "t", task_id="a", depends_on=["a"])],
            agents={"w": work},
            state_dir=tmp_path,
        ) as events:
            async for event in events:
                seen.append(event)
        return seen

    with pytest.raises(PlanError, match="cycle a -> a"):
        anyio.run(main)


def test_unwrapped_takes_a_lone_exception_out_of_its_groups() -> None:
    from orchestrator.errors import EventHandlerFailed, GitError, RunDirError
    from orchestrator.events import unwrapped

    lone = ValueError("x")
    assert unwrapped(BaseExceptionGroup("g", [BaseExceptionGroup("h", [lone])])) is lone
    # A failed handler comes out as the handler's own exception.
    cause = KeyError("handler's")
    failed = EventHandlerFailed("the on_event handler raised")
    failed.__cause__ = cause
    assert unwrapped(ExceptionGroup("g", [RunDirError("disk"), failed])) is cause
    # Several of the orchestrator's own errors: the first; anything else: the group.
    first, second = RunDirError("a"), GitError(["git", "x"], 1, "b")
    assert unwrapped(ExceptionGroup("g", [first, second])) is first
    mixed = ExceptionGroup("g", [RunDirError("a"), ValueError("b")])
    assert unwrapped(mixed) is mixed
