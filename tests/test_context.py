"""RunContext: the run directory made once, its lock and journal, paths of a task's things."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from orchestrator import OrchestratorError
from orchestrator.context import RUN_SUBDIRS, RunContext
from orchestrator.errors import EventHandlerFailed, RunInUse
from orchestrator.settings import RunSettings


def open_ctx(tmp_path: Path, **kwargs: object) -> RunContext:
    settings = RunSettings(state_dir=tmp_path / "state")
    return anyio.run(lambda: RunContext.open(repo=None, settings=settings, **kwargs))  # type: ignore[arg-type]


def test_open_makes_the_run_directory_and_takes_its_lock(tmp_path: Path) -> None:
    ctx = open_ctx(tmp_path, run_id="20260101-000000-aaaaaa")
    try:
        assert ctx.run_dir == tmp_path / "state" / "runs" / "20260101-000000-aaaaaa"
        assert sorted(p.name for p in ctx.run_dir.iterdir() if p.is_dir()) == sorted(RUN_SUBDIRS)
        assert (ctx.run_dir / "lock").exists()
        with pytest.raises(RunInUse):
            open_ctx(tmp_path, run_id=ctx.run_id, resume=True)
    finally:
        ctx.close()
    # A run that did not finish keeps its lock file (unheld): resumable.
    assert (ctx.run_dir / "lock").exists()
    again = open_ctx(tmp_path, run_id=ctx.run_id, resume=True)
    again.finished = True
    again.close()
    assert not (ctx.run_dir / "lock").exists()


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "-rf", ""])
def test_a_bad_run_id_is_refused_before_anything_is_made(tmp_path: Path, run_id: str) -> None:
    if run_id == "":
        ctx = open_ctx(tmp_path, run_id=run_id)  # empty: a new id is made
        ctx.close()
        return
    with pytest.raises(OrchestratorError):
        open_ctx(tmp_path, run_id=run_id)
    assert not (tmp_path / "state").exists()


def test_resuming_a_run_that_is_not_there_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(OrchestratorError, match="no run 20260101-000000-bbbbbb in"):
        open_ctx(tmp_path, run_id="20260101-000000-bbbbbb", resume=True)


def test_a_new_run_never_reuses_an_existing_directory(tmp_path: Path) -> None:
    ctx = open_ctx(tmp_path, run_id="20260101-000000-cccccc")
    ctx.close()
    with pytest.raises(OrchestratorError, match="cannot create the run directory"):
        open_ctx(tmp_path, run_id="20260101-000000-cccccc")


def test_paths_of_a_task_are_beside_the_runs_and_ref_safe(tmp_path: Path) -> None:
    ctx = open_ctx(tmp_path, run_id="20260101-000000-dddddd")
    try:
        state = tmp_path / "state"
        assert ctx.state_dir == state
        assert ctx.worktree_path("t[1]").parent == state / "worktrees" / ctx.run_id
        assert ctx.venv_path("t").parent == state / "venvs" / ctx.run_id
        assert ctx.branch("t") == f"orchestrator/{ctx.run_id}/t"
        assert ctx.start_of("t") == (None, None)
        ctx.starts["t"] = ("c" * 40, "d" * 40)
        assert ctx.start_of("t") == ("c" * 40, "d" * 40)
        assert ctx.cancelled_error("t").kind == "cancelled"
    finally:
        ctx.close()


def test_emit_logs_the_event_and_wraps_a_failing_handler(tmp_path: Path) -> None:
    from envelopes import TaskQueued

    def broken(event: object) -> None:
        raise ValueError("nope")

    ctx = open_ctx(tmp_path, run_id="20260101-000000-eeeeee", on_event=broken)
    try:
        ctx.open_events_log()
        event = TaskQueued(run_id=ctx.run_id, task_id="t", agent="a", priority=0)
        with pytest.raises(
            EventHandlerFailed, match="the on_event handler raised ValueError: nope"
        ):
            anyio.run(ctx.emit, event)
        ctx.close_events_log()
        lines = (ctx.run_dir / "events.jsonl").read_text().splitlines()
        assert len(lines) == 1 and '"task_queued"' in lines[0]
    finally:
        ctx.close()
