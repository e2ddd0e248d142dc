"""orchestrator/subagent.py: one task's lifecycle, whatever kind of agent it runs.

The agent here is a kind made for these tests (:class:`Scripted`): each attempt runs a
coroutine the test gives, with the AttemptRequest the lifecycle made. Nothing in the
lifecycle knows about it, which is the point.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import (
    AgentInfo,
    ErrorInfo,
    Event,
    Rates,
    Report,
    RunStarted,
    TaskFinished,
    TaskRetrying,
    Usage,
    build_envelope,
    digest,
    report_digest,
    report_layout,
)
from orchestrator import orchestrate_parallel, verify_report
from orchestrator.agents import AttemptOutcome, AttemptRequest, Workspace
from orchestrator.errors import ReportUnreadable

from .conftest import MakeRepo, git, task_worktrees

Step = Callable[[AttemptRequest], Awaitable[AttemptOutcome]]


@dataclass
class Scripted:
    """A kind for these tests: an attempt is ``step(request)``; every request is kept."""

    step: Step
    in_process: bool = True
    writes_logs: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    requests: list[AttemptRequest] = field(default_factory=list)

    def info(self, program: str | None = None) -> AgentInfo:
        return AgentInfo(kind="command", command=["scripted"], program=program)

    def fingerprint(self, plan_dir: Path) -> str:
        return digest({"scripted": True})

    async def run_attempt(self, request: AttemptRequest) -> AttemptOutcome:
        self.requests.append(request)
        return await self.step(request)


SUCCEEDED = AttemptOutcome(status="succeeded", output={"ok": True})


def failed(message: str) -> AttemptOutcome:
    return AttemptOutcome(status="failed", error=ErrorInfo(kind="exit_code", message=message))


def run(agent: Scripted, repo: Path | None, *, on_event: Any = None, **fields: Any) -> Report:
    """One task ``t1`` of agent ``s`` (no venv), run by orchestrate_parallel."""
    settings = ("keep_worktrees", "state_dir", "pricing", "budget")
    options = {key: fields.pop(key) for key in settings if key in fields}
    envelope = build_envelope("s", "Change things\n\nin detail", task_id="t1", venv=False, **fields)
    return anyio.run(
        lambda: orchestrate_parallel(
            [envelope], repo=repo, agents={"s": agent}, on_event=on_event, **options
        )
    )


def test_a_failed_attempt_is_retried_from_a_clean_worktree(make_repo: MakeRepo) -> None:
    repo = make_repo()
    seen: list[list[str]] = []

    async def step(request: AttemptRequest) -> AttemptOutcome:
        seen.append(sorted(p.name for p in request.cwd.iterdir() if p.name != ".git"))
        (request.cwd / f"attempt-{request.attempt}.txt").write_text("x\n")
        return SUCCEEDED if request.attempt == 3 else failed(f"attempt {request.attempt}")

    events: list[Event] = []
    agent = Scripted(step)
    report = run(agent, repo, retries=3, on_event=events.append)
    (result,) = report.results
    assert (result.status, result.attempts, result.output) == ("succeeded", 3, {"ok": True})
    assert [a.status for a in result.attempt_log] == ["failed", "failed", "succeeded"]
    assert [a.error.message if a.error else None for a in result.attempt_log] == [
        "attempt 1",
        "attempt 2",
        None,
    ]
    assert [r.attempt for r in agent.requests] == [1, 2, 3]
    # Each attempt has its own output file, and starts from the base's files only.
    assert len({r.output_path for r in agent.requests}) == 3
    assert seen == [["src"], ["src"], ["src"]]
    assert [e.attempt for e in events if isinstance(e, TaskRetrying)] == [2, 3]
    commit = result.provenance.result_commit
    assert commit is not None
    changed = git(repo, "diff-tree", "--no-commit-id", "--name-only", "-r", f"{commit}^", commit)
    assert changed.splitlines() == ["attempt-3.txt"]


def test_retries_run_out_with_the_last_failure(make_repo: MakeRepo) -> None:
    async def step(request: AttemptRequest) -> AttemptOutcome:
        return failed(f"attempt {request.attempt}")

    report = run(Scripted(step), None, retries=1, worktree=False, state_dir=make_repo().parent)
    (result,) = report.results
    assert (result.status, result.attempts) == ("failed", 2)
    assert result.error == ErrorInfo(kind="exit_code", message="attempt 2")


def test_what_the_agent_changed_is_committed_on_its_branch(make_repo: MakeRepo) -> None:
    repo = make_repo()

    async def step(request: AttemptRequest) -> AttemptOutcome:
        (request.cwd / "src" / "file0000.txt").write_text("changed\n")
        (request.cwd / "new.txt").write_text("new\n")
        return SUCCEEDED

    report = run(Scripted(step), repo)
    (result,) = report.results
    commit, branch = result.provenance.result_commit, result.branch
    assert commit is not None and branch == f"orchestrator/{report.run_id}/t1"
    assert git(repo, "rev-parse", f"refs/heads/{branch}") == commit
    assert git(repo, "show", f"{commit}:src/file0000.txt") == "changed"
    assert git(repo, "show", f"{commit}:new.txt") == "new"
    message = git(repo, "log", "-1", "--format=%B", commit)
    assert message.splitlines()[0] == "s: Change things [task t1]"
    assert f"Orchestrator-Run: {report.run_id}" in message
    assert f"Envelope-SHA256: {result.provenance.envelope_sha256}" in message
    assert result.worktree is None and task_worktrees(repo) == []
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_a_task_that_changes_nothing_leaves_its_branch_at_the_base(make_repo: MakeRepo) -> None:
    repo = make_repo()

    async def step(request: AttemptRequest) -> AttemptOutcome:
        return SUCCEEDED

    (result,) = run(Scripted(step), repo).results
    assert result.provenance.result_commit == git(repo, "rev-parse", "HEAD")


@pytest.mark.parametrize(
    ("policy", "succeeds", "kept"),
    [
        ("failed", False, True),
        ("failed", True, False),
        ("never", False, False),
        ("always", True, True),
    ],
)
def test_the_keep_policy_decides_what_stays(
    make_repo: MakeRepo, policy: str, succeeds: bool, kept: bool
) -> None:
    repo = make_repo()

    async def step(request: AttemptRequest) -> AttemptOutcome:
        (request.cwd / "work.txt").write_text("done\n")
        return SUCCEEDED if succeeds else failed("no")

    (result,) = run(Scripted(step), repo, keep_worktrees=policy).results
    assert result.status == ("succeeded" if succeeds else "failed")
    if kept:
        assert result.worktree is not None
        assert (Path(result.worktree) / "work.txt").read_text() == "done\n"
        assert task_worktrees(repo) == [result.worktree]
    else:
        assert result.worktree is None and task_worktrees(repo) == []
    # The work is on the branch either way.
    assert git(repo, "show", f"{result.provenance.result_commit}:work.txt") == "done"


def test_a_cancelled_task_is_recorded_with_its_work_committed(make_repo: MakeRepo) -> None:
    repo = make_repo()
    started = anyio.Event()

    async def step(request: AttemptRequest) -> AttemptOutcome:
        (request.cwd / "partial.txt").write_text("half\n")
        started.set()
        await anyio.sleep(60)
        return SUCCEEDED

    run_dirs: list[str] = []

    def remember(event: Event) -> None:
        if isinstance(event, RunStarted):
            run_dirs.append(event.run_dir)

    envelope = build_envelope("s", "Change things", task_id="t1", venv=False)

    async def main() -> None:
        async with anyio.create_task_group() as group:

            async def orchestrate() -> None:
                await orchestrate_parallel(
                    [envelope], repo=repo, agents={"s": Scripted(step)}, on_event=remember
                )

            group.start_soon(orchestrate)
            await started.wait()
            group.cancel_scope.cancel()

    anyio.run(main)
    report = json.loads((Path(run_dirs[0]) / "report.json").read_text())
    (result,) = report["results"]
    assert (result["status"], result["attempts"]) == ("cancelled", 1)
    assert result["error"] == {"kind": "cancelled", "message": "the run was cancelled", "paths": []}
    assert [a["status"] for a in result["attempt_log"]] == ["cancelled"]
    commit = result["provenance"]["result_commit"]
    assert git(repo, "show", f"{commit}:partial.txt") == "half"  # nothing is lost
    assert result["worktree"] is None and task_worktrees(repo) == []


def test_what_a_kind_reports_reaches_the_provenance(make_repo: MakeRepo) -> None:
    """Log files, commands and the program: the lifecycle records what the kind says."""

    async def step(request: AttemptRequest) -> AttemptOutcome:
        request.record_command(["scripted", "--fast"], "/opt/scripted")
        request.stdout_path.write_text("out\n")
        request.stderr_path.write_text("")
        return SUCCEEDED

    agent = Scripted(step, in_process=False, writes_logs=True, env={"SCRIPTED_MODE": "fast"})
    (result,) = run(Scripted(step), None, worktree=False, state_dir=make_repo().parent).results
    assert result.attempt_log[0].stdout is None  # an agent without log files has none
    (result,) = run(agent, None, worktree=False, state_dir=make_repo().parent).results
    attempt = result.attempt_log[0]
    assert attempt.stdout is not None and attempt.stdout.size == 4
    assert result.metrics.stdout_bytes == 4
    assert result.provenance.stdout_sha256 == attempt.stdout.sha256
    assert result.provenance.commands == [["scripted", "--fast"]]
    assert result.provenance.agent == AgentInfo(
        kind="command", command=["scripted"], program="/opt/scripted"
    )
    assert agent.requests[0].env["SCRIPTED_MODE"] == "fast"
    assert agent.requests[0].env["ORCHESTRATOR_TASK_ID"] == "t1"


def test_a_kind_that_raises_fails_its_task_not_the_run(make_repo: MakeRepo) -> None:
    async def step(request: AttemptRequest) -> AttemptOutcome:
        raise RuntimeError("a bug in the kind")

    (result,) = run(Scripted(step), None, worktree=False, state_dir=make_repo().parent).results
    assert result.status == "failed"
    assert result.error == ErrorInfo(kind="internal", message="RuntimeError: a bug in the kind")


def test_a_retried_tasks_usage_is_its_attempts_added_up(make_repo: MakeRepo) -> None:
    """Three attempts each spent something: the task, the run's totals and the budget count
    all three (not the last one only), and the report still verifies."""
    spent = {
        1: Usage(
            input_tokens=100,
            output_tokens=10,
            cost_usd=0.5,
            cost_source="reported",
            model="m1",
            session_id="s1",
        ),
        2: Usage(input_tokens=1_000_000, output_tokens=20, turns=2, model="m2"),
        3: Usage(input_tokens=300, output_tokens=30, cost_usd=0.25, cost_source="reported"),
    }

    async def step(request: AttemptRequest) -> AttemptOutcome:
        outcome = SUCCEEDED if request.attempt == 3 else failed(f"attempt {request.attempt}")
        return dataclasses.replace(outcome, usage=spent[request.attempt])

    pricing = {"m2": Rates(input=2.0, output=0.0)}
    report = run(
        Scripted(step),
        None,
        retries=2,
        worktree=False,
        state_dir=make_repo().parent,
        pricing=pricing,
        budget={"max_cost_usd": 2.6},
    )
    (result,) = report.results
    assert [a.usage.cost_usd if a.usage else None for a in result.attempt_log] == [0.5, 2.0, 0.25]
    assert result.attempt_log[1].usage is not None
    assert result.attempt_log[1].usage.cost_source == "estimated"
    assert result.usage == Usage(
        input_tokens=1_000_400,
        output_tokens=60,
        turns=2,
        cost_usd=2.75,
        cost_source="estimated",
        model="m2",  # the last one named
        session_id="s1",
    )
    assert report.summary.usage is not None and report.summary.usage.cost_usd == 2.75
    assert report.pricing == pricing
    assert any("max_cost_usd 2.6 is spent" in w for w in report.warnings)
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_an_attempt_that_said_nothing_makes_the_tasks_cost_partial(make_repo: MakeRepo) -> None:
    async def step(request: AttemptRequest) -> AttemptOutcome:
        if request.attempt == 1:
            return failed("killed before it said what it spent")
        return dataclasses.replace(SUCCEEDED, usage=Usage(output_tokens=5, cost_usd=0.5))

    report = run(Scripted(step), None, retries=1, worktree=False, state_dir=make_repo().parent)
    (result,) = report.results
    assert result.usage is not None
    assert (result.usage.cost_usd, result.usage.cost_source) == (0.5, "partial")
    assert report.summary.usage is not None and report.summary.usage.cost_unknown == 1
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def callable_run(tmp_path: Path, agent: Any, n: int = 3, **fields: Any) -> tuple[Report, Path]:
    """*n* tasks of the callable *agent* with nothing made for them, in a state directory
    of their own; the report and its path."""
    envelopes = [
        build_envelope("c", "do", task_id=f"t{i}", worktree=False, venv=False, **fields)
        for i in range(n)
    ]
    state = tmp_path / "state"
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, agents={"c": agent}, state_dir=state)
    )
    return report, Path(report.run_dir) / "report.json"


def test_a_task_that_needs_no_envelope_file_is_a_record_of_the_runs(tmp_path: Path) -> None:
    async def agent(envelope: Any, workspace: Any) -> dict[str, str]:
        return {"id": envelope.task_id}

    report, path = callable_run(tmp_path, agent)
    run_dir = path.parent
    records = (run_dir / "envelopes.jsonl").read_bytes()
    assert records.count(b"\n") == 3
    assert not list((run_dir / "envelopes").iterdir())  # no file per task
    for result in report.results:
        entry = result.envelope
        assert entry is not None and (entry.path, entry.offset is not None) == (
            "envelopes.jsonl",
            True,
        )
        assert entry.offset is not None
        data = records[entry.offset : entry.offset + entry.size]
        assert json.loads(data)["task_id"] == result.task_id
        assert digest(json.loads(data)) == result.provenance.envelope_sha256
    assert anyio.run(lambda: verify_report(path)).ok


def test_a_changed_or_missing_record_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    async def agent(envelope: Any, workspace: Any) -> dict[str, str]:
        return {}

    report, path = callable_run(tmp_path, agent)
    records = path.parent / "envelopes.jsonl"
    data = records.read_bytes()
    entry = report.results[1].envelope
    assert entry is not None and entry.offset is not None
    at = data.index(b'"task"', entry.offset)
    records.write_bytes(data[:at] + b'"tusk"' + data[at + 6 :])
    found = anyio.run(lambda: verify_report(path)).findings
    assert {(f.task_id, f.field) for f in found} == {
        ("t1", "envelope.sha256"),
        ("t1", "provenance.envelope_sha256"),
    }
    records.write_bytes(data[: entry.offset])  # cut short: t1's and t2's records are gone
    found = anyio.run(lambda: verify_report(path)).findings
    assert {f.task_id for f in found} == {"t1", "t2"}
    assert all(f.field in ("envelope.sha256", "envelope.size") for f in found)


def test_a_record_entry_reaching_past_any_file_is_refused_as_a_report(tmp_path: Path) -> None:
    async def agent(envelope: Any, workspace: Any) -> dict[str, str]:
        return {}

    _, path = callable_run(tmp_path, agent, n=1)
    raw = json.loads(path.read_bytes())
    raw["results"][0]["envelope"]["offset"] = 1 << 63
    path.write_text(json.dumps(raw))
    with pytest.raises(ReportUnreadable, match=r"envelope\.offset"):
        anyio.run(lambda: verify_report(path))


def test_an_agent_that_asks_for_its_envelope_file_gets_it(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    async def agent(envelope: Any, workspace: Workspace) -> dict[str, str]:
        if envelope.task_id == "t0":
            seen["path"] = workspace.envelope_path
            seen["bytes"] = workspace.envelope_path.read_bytes()
        if envelope.task_id == "t1":
            seen["env"] = Path(workspace.env["ORCHESTRATOR_ENVELOPE"]).read_bytes()
        return {}

    report, path = callable_run(tmp_path, agent, n=3)
    envelopes = path.parent / "envelopes"
    assert sorted(p.name for p in envelopes.iterdir()) == ["t0.json", "t1.json"]
    records = (path.parent / "envelopes.jsonl").read_bytes()
    for result, file in zip(report.results, ("bytes", "env"), strict=False):
        entry = result.envelope
        assert entry is not None and entry.offset is not None
        assert seen[file] == records[entry.offset : entry.offset + entry.size]
    assert seen["path"] == envelopes / "t0.json"
    assert anyio.run(lambda: verify_report(path)).ok


def test_a_run_serialises_each_result_once(tmp_path: Path, result_dumps: Callable[[], int]) -> None:
    """Sealed, journaled, written in the report: one model dump each (the lean path)."""

    async def agent(envelope: Any, workspace: Any) -> dict[str, str]:
        return {}

    callable_run(tmp_path, agent, n=20)
    assert result_dumps() == 20


def test_a_kind_that_does_not_say_it_reads_no_envelope_file_gets_one(tmp_path: Path) -> None:
    """An in-process kind of someone else's may hand ORCHESTRATOR_ENVELOPE to a program: only
    a kind with ``envelope_record`` has its envelopes kept as records."""
    seen: list[bytes] = []

    async def step(request: AttemptRequest) -> AttemptOutcome:
        assert request.write_envelope is None
        seen.append(Path(request.env["ORCHESTRATOR_ENVELOPE"]).read_bytes())
        return SUCCEEDED

    report = run(Scripted(step), None, worktree=False, state_dir=tmp_path / "state")
    entry = report.results[0].envelope
    assert entry is not None and entry.offset is None
    assert entry.path == "envelopes/t1.json" and len(seen[0]) == entry.size


def test_threads_that_ask_for_the_envelope_file_at_once_all_read_it_whole(
    tmp_path: Path,
) -> None:
    import threading

    reads: list[bytes] = []

    async def agent(envelope: Any, workspace: Workspace) -> dict[str, str]:
        def read() -> None:
            reads.append(workspace.envelope_path.read_bytes())

        threads = [threading.Thread(target=read) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {}

    report, path = callable_run(tmp_path, agent, n=20)
    sizes = {r.envelope.size for r in report.results if r.envelope is not None}
    assert len(reads) == 160 and {len(data) for data in reads} <= sizes
    assert all(json.loads(data)["task"] == "do" for data in reads)
    assert anyio.run(lambda: verify_report(path)).ok


def test_a_handler_that_changes_what_it_is_told_changes_no_result(tmp_path: Path) -> None:
    """Events carry copies: the report holds what the result was sealed with."""

    def redact(event: Event) -> None:
        if isinstance(event, TaskFinished) and event.error is not None:
            event.error.message = "redacted"

    async def agent(envelope: Any, workspace: Any) -> dict[str, str]:
        raise RuntimeError("the real reason")

    envelopes = [build_envelope("c", "do", task_id="t0", worktree=False, venv=False)]
    report = anyio.run(
        lambda: orchestrate_parallel(
            envelopes, agents={"c": agent}, state_dir=tmp_path / "state", on_event=redact
        )
    )
    assert report.results[0].error is not None
    assert report.results[0].error.message == "RuntimeError: the real reason"
    assert anyio.run(lambda: verify_report(Path(report.run_dir) / "report.json")).ok


def test_an_offset_is_for_an_envelope_record_only(tmp_path: Path) -> None:
    async def agent(envelope: Any, workspace: Any) -> dict[str, str]:
        return {}

    _, path = callable_run(tmp_path, agent, n=1)
    raw = json.loads(path.read_bytes())
    entry = raw["results"][0]["envelope"]
    # The same bytes, named as a record of another file of the run directory.
    (path.parent / "other.jsonl").write_bytes((path.parent / "envelopes.jsonl").read_bytes())
    raw["results"][0]["envelope"] = {**entry, "path": "other.jsonl"}
    raw["results"][0]["provenance"].pop("result_sha256")
    raw["results"][0]["provenance"]["result_sha256"] = digest(raw["results"][0])
    raw["report_sha256"] = report_digest(raw)
    path.write_bytes(report_layout(raw))
    found = anyio.run(lambda: verify_report(path)).findings
    assert [(f.task_id, f.field) for f in found] == [("t0", "envelope.offset")]


def test_a_finished_task_is_freed_at_once_not_by_the_cyclic_collector(tmp_path: Path) -> None:
    """A task's state (its place, history, clock, the envelope's bytes) goes when it ends:
    left to the cyclic collector, 100,000 tasks' worth would wait for it (docs/benchmarks.md,
    "Shared field names")."""
    import gc

    from orchestrator.subagent import _Subagent

    async def noop(envelope: Any, workspace: Workspace) -> dict[str, Any]:
        if envelope.task_id == "bad":
            raise RuntimeError("no")
        return {}

    envelopes = [
        build_envelope("n", "t", task_id=task_id, worktree=False, venv=False)
        for task_id in ("bad", *(f"t{i}" for i in range(20)))
    ]
    # One task is never started (its dependency failed): its result is made all the same.
    envelopes.append(
        build_envelope("n", "t", task_id="late", worktree=False, venv=False, depends_on=["bad"])
    )
    gc.collect()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        report = anyio.run(
            lambda: orchestrate_parallel(
                envelopes, agents={"n": noop}, state_dir=tmp_path, concurrency=4
            )
        )
        assert report.summary.successful == 20
        assert report.result("late").status == "skipped"
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, _Subagent)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
