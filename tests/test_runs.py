"""orchestrator/runs.py: what each run directory is (live, finished, interrupted, superseded,
unknown), the list ``orchestrator runs`` prints, and which run ``run --resume`` goes on with.

Runs are made by running small plans with a callable agent, in no repository; an interrupted
one is a run cancelled from inside (its orchestrator cancelled before it could finish, as a
crash would leave it, less the dead processes). The edge cases are hand-written run
directories. The CLI end to end, with killed orchestrators, is in tests/test_resume.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import HandoffEnvelope
from orchestrator import OrchestratorError, Workspace, orchestrate_parallel
from orchestrator.errors import PlanChanged, RunAlreadyFinished
from orchestrator.locks import RunLock
from orchestrator.plan import load_plan
from orchestrator.runs import describe_run, find_resumable, list_runs

PLAN = """\
defaults: {worktree: false, venv: false}
concurrency: 1
tasks:
  - {id: a, agent: a, task: first}
  - {id: b, agent: a, task: after a, depends_on: [a]}
  - {id: c, agent: a, task: last}
"""

RUN1, RUN2, RUN3, RUN4 = (f"20260101-00000{i}-aaaaaa" for i in range(1, 5))


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The state directory; the cwd is a directory in no git repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path / "state"


def plan_file(tmp_path: Path, name: str = "plan", text: str = PLAN) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def sha(plan: Path) -> str:
    """The digest a run of the plan file records (``plan_sha256``)."""
    return load_plan(plan, callable_agents=["a"]).sha256


def run(
    plan: Path,
    state: Path,
    run_id: str,
    *,
    fail: Iterable[str] = (),
    cancel_at: str | None = None,
    **options: Any,
) -> str:
    """Run *plan* as run *run_id* with a callable agent ``a``; return the run's id.

    Tasks in *fail* raise; the run is cancelled (left interrupted) when *cancel_at* starts.
    """
    failing = set(fail)

    async def main() -> None:
        with anyio.CancelScope() as scope:

            async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
                if envelope.task_id == cancel_at:
                    scope.cancel()
                    await anyio.sleep_forever()
                if envelope.task_id in failing:
                    raise RuntimeError("told to fail")
                return {}

            loaded = load_plan(plan, callable_agents=["a"])
            await orchestrate_parallel(
                loaded, agents={"a": agent}, state_dir=state, run_id=run_id, **options
            )
        assert scope.cancelled_caught == (cancel_at is not None)

    anyio.run(main)
    return run_id


def write_run(
    state: Path,
    run_id: str,
    lines: Iterable[dict[str, Any] | str],
    *,
    plan: Any = None,
) -> Path:
    """A run directory by hand: a journal of *lines* (a str is written as it is)."""
    run_dir = state / "runs" / run_id
    run_dir.mkdir(parents=True)
    text = "".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines)
    (run_dir / "journal.jsonl").write_text(text)
    if plan is not None:
        (run_dir / "plan.json").write_text(json.dumps(plan))
    return run_dir


def run_record(run_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "run",
        "run_id": run_id,
        "at": "2026-01-01T00:00:00+00:00",
        "plan_sha256": "1" * 64,
        "plan_name": "hand",
        "plan_file": None,
        **fields,
    }


def test_a_finished_run_counts_every_status_from_its_report(tmp_path: Path, state: Path) -> None:
    plan = plan_file(tmp_path)
    run_dir = state / "runs" / run(plan, state, RUN1, fail=["a"])
    info = describe_run(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    assert info.state == "finished"
    assert (info.run_id, info.run_dir, info.total_tasks) == (RUN1, run_dir, 3)
    assert (info.plan_name, info.plan_file) == ("plan", str(plan))
    assert info.plan_sha256 == report["plan_sha256"] == sha(plan)
    # b never started (its dependency failed): only the report has a result for it.
    assert info.counts == {"failed": 1, "skipped": 1, "succeeded": 1}
    assert info.started_at is not None and info.started_at.tzinfo is not None
    assert info.to_json_dict() == {
        "run_id": RUN1,
        "run_dir": str(run_dir),
        "state": "finished",
        "plan_name": "plan",
        "plan_file": str(plan),
        "started_at": info.started_at.isoformat(),
        "last_activity": info.last_activity.isoformat() if info.last_activity else None,
        "total_tasks": 3,
        "counts": {"failed": 1, "skipped": 1, "succeeded": 1},
    }
    # Without a readable report, the journal's results are what is known.
    (run_dir / "report.json").write_text("{not json")
    assert describe_run(run_dir).counts == {"failed": 1, "succeeded": 1}
    (run_dir / "report.json").unlink()
    assert describe_run(run_dir).state == "finished"  # the journal says so
    assert describe_run(run_dir).counts == {"failed": 1, "succeeded": 1}


def test_an_interrupted_run_counts_what_its_journal_holds(tmp_path: Path, state: Path) -> None:
    run_dir = state / "runs" / run(plan_file(tmp_path), state, RUN1, cancel_at="c")
    # A cancelled run writes a partial report and leaves its lock file, held by nobody.
    assert (run_dir / "report.json").exists() and (run_dir / "lock").exists()
    info = describe_run(run_dir)
    assert info.state == "interrupted"
    assert info.counts == {"succeeded": 2, "cancelled": 1}
    assert info.total_tasks == 3


def test_a_run_whose_lock_is_held_is_live_whatever_its_journal_says(
    tmp_path: Path, state: Path
) -> None:
    interrupted = state / "runs" / run(plan_file(tmp_path), state, RUN1, cancel_at="b")
    finished = state / "runs" / run(plan_file(tmp_path), state, RUN2)
    starting = state / "runs" / RUN3  # a run that has its lock and no journal yet
    starting.mkdir()
    locks = [RunLock(d) for d in (interrupted, finished, starting)]
    for lock in locks:
        lock.acquire()
    try:
        assert [describe_run(d).state for d in (interrupted, finished, starting)] == ["live"] * 3
        assert describe_run(interrupted).counts == {"succeeded": 1, "cancelled": 1}
    finally:
        for lock in locks:
            lock.release()
    assert [describe_run(d).state for d in (interrupted, finished, starting)] == [
        "interrupted",
        "finished",
        "unknown",
    ]


def test_a_run_without_a_journal_is_unknown_and_nothing_else(state: Path) -> None:
    empty = state / "runs" / RUN1
    empty.mkdir(parents=True)
    info = describe_run(empty)
    assert info.state == "unknown"
    known = (info.plan_name, info.plan_sha256, info.started_at, info.total_tasks)
    assert known == (None, None, None, None)
    assert info.counts == {} and info.settings == {} and info.last_activity is None
    # Files but no journal: it was last active when its newest file was written.
    (empty / "plan.json").write_text("{}")
    (empty / "events.jsonl").write_text("")
    os.utime(empty / "plan.json", (1_700_000_000, 1_700_000_000))
    os.utime(empty / "events.jsonl", (1_700_000_100, 1_700_000_100))
    info = describe_run(empty)
    assert info.state == "unknown"
    assert info.last_activity == datetime.fromtimestamp(1_700_000_100, UTC)


@pytest.mark.parametrize(
    "lines",
    [
        [run_record(RUN1), "{not json\n", {"type": "finished"}],
        [{"type": "state", "task": "a", "state": "ready"}],  # no run record
        [run_record(RUN1), {"type": "result", "result": {"task_id": "a"}}],  # not a result
        ["[1, 2]\n", run_record(RUN1)],
    ],
    ids=["garbage-in-the-middle", "no-run-record", "invalid-result", "not-an-object"],
)
def test_a_journal_that_cannot_be_read_is_unknown(
    state: Path, lines: list[dict[str, Any] | str]
) -> None:
    info = describe_run(write_run(state, RUN1, lines))
    assert info.state == "unknown"
    assert info.plan_name is None and info.counts == {}


@pytest.mark.parametrize("record", [{"type": "result"}, {"type": "worktree"}])
def test_a_record_without_its_fields_is_unknown_not_a_crash(
    state: Path, record: dict[str, Any]
) -> None:
    assert describe_run(write_run(state, RUN1, [run_record(RUN1), record])).state == "unknown"


def test_a_torn_last_line_is_ignored(state: Path) -> None:
    run_dir = write_run(state, RUN1, [run_record(RUN1), '{"type": "finis'])
    info = describe_run(run_dir)
    assert (info.state, info.plan_name) == ("interrupted", "hand")


def test_total_tasks_comes_from_the_runs_plan(state: Path) -> None:
    matrix = {
        "agents": {"a": {"command": ["true"]}},
        "tasks": [
            {"id": "m", "agent": "a", "task": "t", "matrix": {"inputs.n": [1, 2, 3]}},
            {"id": "x", "agent": "a", "task": "t"},
        ],
    }
    rows = {
        RUN1: (matrix, 4),  # matrix members expanded
        RUN2: ({"envelopes": [{}, {}]}, 2),  # a run of envelopes, not of a plan
        RUN3: ({"tasks": "not a list"}, None),
        RUN4: (None, None),  # no plan.json
    }
    for run_id, (plan, _) in rows.items():
        write_run(state, run_id, [run_record(run_id)], plan=plan)
    assert {i.run_id: i.total_tasks for i in list_runs(state)} == {
        run_id: total for run_id, (_, total) in rows.items()
    }


def test_runs_are_listed_oldest_first(state: Path) -> None:
    assert list_runs(state) == []  # no state directory yet
    (state / "runs").mkdir(parents=True)
    assert list_runs(state) == []
    write_run(state, RUN2, [run_record(RUN2)])
    write_run(state, RUN1, [run_record(RUN1)])
    # Two runs started in the same second go by when their journals say they started.
    same_second = "20260101-000003-"
    write_run(state, same_second + "zzzzzz", [run_record("z", at="2026-01-01T00:00:03.1+00:00")])
    write_run(state, same_second + "aaaaaa", [run_record("a", at="2026-01-01T00:00:03.9+00:00")])
    (state / "runs" / "notes.txt").write_text("not a run")
    ids = [info.run_id for info in list_runs(state)]
    assert ids == [RUN1, RUN2, same_second + "zzzzzz", same_second + "aaaaaa"]


def test_resume_picks_the_latest_interrupted_run_of_the_same_plan(
    tmp_path: Path, state: Path
) -> None:
    plan = plan_file(tmp_path)
    other = plan_file(tmp_path, "other", PLAN.replace("task: last", "task: other"))
    run(plan, state, RUN1, cancel_at="c")
    run(plan, state, RUN2, cancel_at="b")
    run(other, state, RUN4, cancel_at="c")  # newer, but another plan's
    digest = sha(plan)
    assert find_resumable(state, digest, str(plan)) == RUN2
    assert find_resumable(state, sha(other), str(other)) == RUN4
    assert find_resumable(tmp_path / "no-state", digest, str(plan)) is None


def test_when_the_plans_latest_run_finished_there_is_nothing_to_resume(
    tmp_path: Path, state: Path
) -> None:
    plan = plan_file(tmp_path)
    run(plan, state, RUN1, cancel_at="c")
    run(plan, state, RUN2, fail=["c"])  # finished, with a failure: finished all the same
    with pytest.raises(RunAlreadyFinished) as finished:
        find_resumable(state, sha(plan), str(plan))
    assert (finished.value.run_id, finished.value.run_dir) == (RUN2, state / "runs" / RUN2)
    assert str(finished.value) == (
        f"run {RUN2} of this plan already finished: nothing to resume (--rerun starts a new run)"
    )
    # Asked to run again: the interrupted run before it is what there is to go on with.
    assert find_resumable(state, sha(plan), str(plan), rerun=True) == RUN1
    run(plan, state, RUN3, cancel_at="c")  # interrupted after it: resumed
    assert find_resumable(state, sha(plan), str(plan)) == RUN3


def test_a_changed_plan_file_is_refused_with_the_run_it_would_resume(
    tmp_path: Path, state: Path
) -> None:
    plan = plan_file(tmp_path)
    run(plan, state, RUN1, cancel_at="c")
    run(plan, state, RUN2, cancel_at="c")
    plan.write_text(PLAN.replace("concurrency: 1", "concurrency: 2"))
    changed = sha(plan)
    with pytest.raises(PlanChanged) as refused:
        find_resumable(state, changed, str(plan))
    assert refused.value.run_id == RUN2
    assert isinstance(refused.value, OrchestratorError)
    # The same new plan from another file, or from no file, is a plan never run.
    assert find_resumable(state, changed, str(tmp_path / "elsewhere.yaml")) is None
    assert find_resumable(state, changed, None) is None


def test_a_superseded_run_is_neither_resumed_nor_a_changed_plan(
    tmp_path: Path, state: Path
) -> None:
    plan = plan_file(tmp_path)
    run(plan, state, RUN1, cancel_at="c")
    old_sha = sha(plan)
    plan.write_text(PLAN.replace("task: last", "task: last but better"))
    # What `run --resume --force` does: a new run that takes over from the old one.
    run(plan, state, RUN2, reuse=RUN1)
    assert describe_run(state / "runs" / RUN1).state == "superseded"
    with pytest.raises(RunAlreadyFinished):
        find_resumable(state, sha(plan), str(plan))
    assert find_resumable(state, sha(plan), str(plan), rerun=True) is None
    assert find_resumable(state, old_sha, str(plan)) is None


def test_a_live_run_of_the_plan_is_refused_and_another_plans_is_not(
    tmp_path: Path, state: Path
) -> None:
    plan = plan_file(tmp_path)
    other = plan_file(tmp_path, "other", PLAN.replace("task: last", "task: other"))
    run(plan, state, RUN1)
    run(other, state, RUN2, cancel_at="c")
    digest = sha(plan)
    live = write_run(state, RUN3, [run_record(RUN3, plan_sha256=digest, plan_file=str(plan))])
    lock = RunLock(live)
    lock.acquire()
    try:
        with pytest.raises(OrchestratorError, match=f"^run {RUN3} of this plan is still running$"):
            find_resumable(state, digest, str(plan))
        assert find_resumable(state, sha(other), str(other)) == RUN2
    finally:
        lock.release()
    assert find_resumable(state, digest, str(plan)) == RUN3  # its orchestrator is gone
