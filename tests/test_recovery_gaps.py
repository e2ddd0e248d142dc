"""Promises of recovery, the journal, fail-fast and the audit that no other test held.

Each test is the behaviour a user relies on, found missing when a hand-made mutation of the
core went unnoticed: a run stopped by a signal and resumed, a run resumed twice, a stale git
lock left by a crash, the journal's fsync, fail-fast on a timeout, log paths that leave the
run directory, and the audit of a retried task's logs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import (
    HandoffEnvelope,
    Plan,
    Report,
    audit_report,
    build_envelope,
    seal_report,
    seal_result,
)
from orchestrator import Repository, Workspace, orchestrate_parallel, verify_report
from orchestrator.audit.html import page_facts
from orchestrator.gc import collect_garbage
from orchestrator.journal import Journal, read_journal
from orchestrator.recovery import replay
from orchestrator.report import report_bytes

from .conftest import MakeRepo, git
from .test_resume import orchestrator, run_dirs, start_run, succeeded_in_journal

RUN = "20260101-000000-aaaaaa"


def journaled_statuses(run_dir: Path, task_id: str) -> list[str]:
    """The statuses of *task_id*'s result records in the run's journal, in order."""
    return [
        r["result"]["status"]
        for r in read_journal(run_dir / "journal.jsonl").of_type("result")
        if r["result"]["task_id"] == task_id
    ]


def run_until(stop_at: str, plan: Any, **options: Any) -> None:
    """One orchestrator's life, cancelled from inside when task *stop_at* starts (its
    agent ``a`` does nothing for the others)."""

    async def main() -> None:
        with anyio.CancelScope() as scope:

            async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
                if envelope.task_id == stop_at:
                    scope.cancel()
                    await anyio.sleep_forever()
                return {}

            await orchestrate_parallel(plan, agents={"a": agent}, **options)

    anyio.run(main)


# -- a run stopped by SIGINT or SIGTERM, then resumed ----------------------------------------

STOPPABLE = """
import os, pathlib, sys, time
task = os.environ["ORCHESTRATOR_TASK_ID"]
runs = pathlib.Path(sys.argv[1])
with open(runs, "a") as f:  # counts its runs, outside the repository
    f.write(task + "\\n")
pathlib.Path(task + ".txt").write_text(task + "\\n")
if task == "slow" and runs.read_text().split().count(task) == 1:
    pathlib.Path(sys.argv[2]).touch()  # running: the run may be stopped now
    time.sleep(60)
"""


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"]
)
def test_a_run_stopped_by_a_signal_resumes_running_its_cancelled_tasks_again(
    make_repo: MakeRepo, tmp_path: Path, signum: int, code: int
) -> None:
    """Ctrl-C or SIGTERM cancels the running tasks (journaled ``cancelled``); a resume keeps
    what had succeeded and runs the cancelled tasks again, to success."""
    repo = make_repo()
    agent, runs, running = tmp_path / "agent.py", tmp_path / "runs.txt", tmp_path / "running"
    agent.write_text(STOPPABLE)
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"repo: {json.dumps(str(repo))}\nconcurrency: 2\ndefaults: {{venv: false}}\n"
        f"agents: {{w: {{command: [{json.dumps(sys.executable)}, {json.dumps(str(agent))}, "
        f"{json.dumps(str(runs))}, {json.dumps(str(running))}]}}}}\n"
        "tasks:\n  - {id: quick, agent: w, task: t}\n  - {id: slow, agent: w, task: t}\n"
    )
    first = start_run(plan, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (running.exists() and succeeded_in_journal(repo) == {"quick"}):
            assert first.poll() is None, "the run ended before it was stopped"
            assert time.monotonic() < deadline, "slow never started or quick never finished"
            time.sleep(0.05)
        first.send_signal(signum)
        assert first.wait(timeout=60) == code
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    (run_dir,) = run_dirs(repo)
    assert journaled_statuses(run_dir, "slow")[-1] == "cancelled"

    resumed = orchestrator("run", str(plan), "--resume", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["run_id"] == run_dir.name
    outcome = {r["task_id"]: (r["status"], r["resumed"]) for r in report["results"]}
    assert outcome == {"quick": ("succeeded", True), "slow": ("succeeded", False)}
    assert Counter(runs.read_text().split()) == {"quick": 1, "slow": 2}
    slow = next(r for r in report["results"] if r["task_id"] == "slow")
    assert git(repo, "show", f"{slow['branch']}:slow.txt") == "slow"
    verified = orchestrator("verify", str(run_dir / "report.json"), cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


# -- a run resumed twice ------------------------------------------------------------------

CHAIN = Plan.model_validate(
    {
        "defaults": {"worktree": False, "venv": False},
        "concurrency": 1,
        "tasks": [
            {"id": "a", "agent": "a", "task": "first"},
            {"id": "b", "agent": "a", "task": "second", "depends_on": ["a"]},
            {"id": "c", "agent": "a", "task": "third", "depends_on": ["b"]},
        ],
    }
)


def test_a_run_resumed_twice_keeps_what_each_session_finished(tmp_path: Path) -> None:
    """A task cancelled in one session and finished in the next has two results in the
    journal; the last one counts: a second resume keeps it and runs only what is left."""
    state = tmp_path / "state"
    ran: Counter[str] = Counter()

    def session(stop_at: str | None, *, resume: str | None = None) -> Report | None:
        """One orchestrator's life: cancelled from inside when *stop_at* starts."""

        async def main() -> Report | None:
            with anyio.CancelScope() as scope:

                async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
                    ran[envelope.task_id] += 1
                    if envelope.task_id == stop_at:
                        scope.cancel()
                        await anyio.sleep_forever()
                    return {}

                return await orchestrate_parallel(
                    CHAIN,
                    agents={"a": agent},
                    state_dir=state,
                    run_id=None if resume else RUN,
                    resume=resume,
                )
            return None

        return anyio.run(main)

    assert session("b") is None
    assert session("c", resume=RUN) is None
    run_dir = state / "runs" / RUN
    assert journaled_statuses(run_dir, "b") == ["cancelled", "succeeded"]
    record = replay(read_journal(run_dir / "journal.jsonl"), RUN)
    assert {t: r.status for t, r in record.results.items()} == {
        "a": "succeeded",
        "b": "succeeded",
        "c": "cancelled",
    }

    report = session(None, resume=RUN)
    assert report is not None
    assert {r.task_id: (r.status, r.resumed) for r in report.results} == {
        "a": ("succeeded", True),
        "b": ("succeeded", True),
        "c": ("succeeded", False),
    }
    assert ran == {"a": 1, "b": 2, "c": 2}


# -- the plan of a run the journal knows ---------------------------------------------------


def test_a_run_has_its_plan_before_its_journal_says_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed just after its journal's first record is resumable: its plan.json must
    be there already, or its report would not verify (``plan_sha256``)."""
    import orchestrator.coordinator as coordinator

    seen: list[bool] = []
    journal_run = coordinator.journal_run

    async def spy(ctx: Any, **kwargs: Any) -> None:
        seen.append((ctx.run_dir / "plan.json").exists())
        await journal_run(ctx, **kwargs)

    monkeypatch.setattr(coordinator, "journal_run", spy)
    report = anyio.run(
        lambda: orchestrate_parallel(
            CHAIN, agents={"a": _noop}, state_dir=tmp_path / "state", run_id=RUN
        )
    )
    assert seen == [True] and report.summary.successful == 3


def test_a_resumed_run_without_its_plan_writes_it_again_and_verifies(tmp_path: Path) -> None:
    """A run an older version left with a journal and no plan.json (killed between the
    two) is resumed to a report that verifies."""
    state = tmp_path / "state"
    run_until("b", CHAIN, state_dir=state, run_id=RUN)
    run_dir = state / "runs" / RUN
    (run_dir / "plan.json").unlink()
    report = anyio.run(
        lambda: orchestrate_parallel(CHAIN, agents={"a": _noop}, state_dir=state, resume=RUN)
    )
    assert report.summary.successful == 3
    assert (run_dir / "plan.json").is_file()
    assert anyio.run(verify_report, run_dir / "report.json").ok


# -- a stale git lock file of a task's branch ---------------------------------------------


async def _noop(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    return {}


def test_resume_removes_a_stale_lock_of_a_task_branch_and_runs_the_task(
    make_repo: MakeRepo,
) -> None:
    """A crash in the middle of ``git update-ref`` leaves ``<branch>.lock``, which would stop
    the task's branch from being made again; a resume removes it and the task succeeds."""
    repo = make_repo()
    envelopes = [
        build_envelope("a", "t", task_id="done", venv=False),
        build_envelope("a", "t", task_id="stopped", venv=False, depends_on=["done"]),
    ]
    run_until("stopped", envelopes, repo=repo, run_id=RUN)
    lock = repo / ".git" / "refs" / "heads" / "orchestrator" / RUN / "stopped.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("0" * 40 + "\n")  # what git writes there before it renames it

    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"a": _noop}, resume=RUN)
    )
    assert {r.task_id: (r.status, r.resumed) for r in report.results} == {
        "done": ("succeeded", True),
        "stopped": ("succeeded", False),
    }, report.errors
    assert not lock.exists()
    assert git(repo, "rev-parse", f"orchestrator/{RUN}/stopped") == (
        report.result("stopped").provenance.result_commit
    )


def test_gc_removes_a_stale_lock_of_a_dead_runs_branch(make_repo: MakeRepo) -> None:
    """gc removes the git lock file a crash left beside a dead run's branch, so that git can
    write that branch again."""
    repo = make_repo()
    run_dir = repo / ".git" / "orchestrator" / "runs" / RUN
    run_dir.mkdir(parents=True)
    record = {"type": "run", "at": "2026-01-01T00:00:00+00:00", "plan_name": "p"}
    (run_dir / "journal.jsonl").write_text(json.dumps(record) + "\n")
    lock = repo / ".git" / "refs" / "heads" / "orchestrator" / RUN / "t.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("0" * 40 + "\n")

    async def gc() -> list[str]:
        repository = await Repository.open(repo)
        try:
            return (await collect_garbage(repository)).done
        finally:
            repository.lock.close()

    done = anyio.run(gc)
    assert f"removed stale lock {lock}" in done
    assert not lock.exists()
    git(repo, "branch", f"orchestrator/{RUN}/t")  # git can write the branch again
    assert run_dir.is_dir()  # not old: the run itself stays


# -- the journal's fsync ------------------------------------------------------------------


def test_every_way_of_writing_the_journal_returns_only_once_its_lines_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record is durable when ``write``, ``write_line`` or ``sync`` returns: the journal's
    file was fsynced after its last byte was written."""
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.open()
    assert journal._fd is not None
    fd = journal._fd
    synced: list[int] = []  # the file's size at each fsync of the journal
    real_fsync = os.fsync

    def fsync(target: int) -> None:
        if target == fd:
            synced.append(os.fstat(fd).st_size)
        real_fsync(target)

    monkeypatch.setattr(os, "fsync", fsync)

    def queue_and_sync() -> Any:
        journal.append({"type": "state", "n": 3})
        journal.append({"type": "state", "n": 4})
        return journal.sync()

    for write in (
        lambda: journal.write({"type": "run", "n": 1}),
        lambda: journal.write_line('{"type":"state","n":2}'),
        queue_and_sync,
    ):
        before = len(synced)
        anyio.run(write)
        assert len(synced) > before
        assert synced[-1] == path.stat().st_size
    journal.close()
    assert [r["n"] for r in read_journal(path).records] == [1, 2, 3, 4]


# -- fail-fast on a task that timed out ---------------------------------------------------


def test_fail_fast_stops_the_run_when_a_task_times_out(tmp_path: Path) -> None:
    """With fail-fast, a task that runs out of time is a failure like any other: the running
    tasks are cancelled and no more start."""

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        if envelope.task_id == "stuck":
            await anyio.sleep_forever()
        await anyio.sleep(10)  # cancelled long before this, unless fail-fast is ignored
        return {}

    envelopes = [
        build_envelope("a", "t", task_id="stuck", timeout=0.5, worktree=False, venv=False),
        build_envelope("a", "t", task_id="busy", worktree=False, venv=False),
        build_envelope("a", "t", task_id="later", worktree=False, venv=False),
    ]
    report = anyio.run(
        lambda: orchestrate_parallel(
            envelopes,
            agents={"a": agent},
            state_dir=tmp_path,
            concurrency=2,
            fail_fast=True,
        )
    )
    assert {r.task_id: r.status for r in report.results} == {
        "stuck": "timed_out",
        "busy": "cancelled",
        "later": "cancelled",
    }
    for task_id in ("busy", "later"):
        error = report.result(task_id).error
        assert error is not None and "stuck timed out" in error.message, error
    assert report.result("later").attempts == 0


# -- log paths that leave the run directory -----------------------------------------------


def logged_run(tmp_path: Path) -> Report:
    """A run of one command task that prints a line: a report with a stdout log."""
    agent = tmp_path / "printer.py"
    agent.write_text("print('hello from the agent')\n")
    plan = Plan.model_validate(
        {
            "agents": {"w": {"command": [sys.executable, str(agent)]}},
            "defaults": {"venv": False, "worktree": False},
            "tasks": [{"id": "t", "agent": "w", "task": "t"}],
        }
    )
    report: Report = anyio.run(lambda: orchestrate_parallel(plan, state_dir=tmp_path / "state"))
    return report


def test_the_audit_reads_no_log_outside_the_run_directory(tmp_path: Path) -> None:
    """A report whose log path leads out of its run directory fails the audit, even where
    the file it reaches holds exactly the bytes whose digest the report gives."""
    report = logged_run(tmp_path)
    run_dir = Path(report.run_dir)
    [result] = report.results
    last = result.attempt_log[-1]
    assert last.stdout is not None
    assert audit_report(report.to_json_dict(), run_dir=run_dir) == []
    copy = run_dir.parent / "copied.stdout"
    copy.write_bytes((run_dir / last.stdout.path).read_bytes())
    top = last.stdout.path.split("/")[0]
    for path in ("../copied.stdout", f"{top}/../../copied.stdout", str(copy)):
        # model_copy does not validate: what a forger writes by hand.
        attempt = last.model_copy(update={"stdout": last.stdout.model_copy(update={"path": path})})
        forged = result.model_copy(update={"attempt_log": [*result.attempt_log[:-1], attempt]})
        raw = seal_report(report.model_copy(update={"results": [seal_result(forged)]}))
        findings = audit_report(raw.to_json_dict(), run_dir=run_dir)
        assert [(f.task_id, f.field) for f in findings] == [("t", "attempt_log[1].stdout")], path


def test_the_page_shows_no_log_reached_through_a_link_out_of_the_run_directory(
    tmp_path: Path,
) -> None:
    """``report --html`` shows a log's tail only from a file inside the run directory: a
    directory on the way that links out of it is not followed, even to the very bytes
    recorded."""
    report = logged_run(tmp_path)
    run_dir = Path(report.run_dir)
    facts = anyio.run(lambda: page_facts(report, repo=None, run_dir=run_dir))
    assert facts.logs["t"]["stdout"].lines == ("hello from the agent",)
    stdout = report.results[0].attempt_log[-1].stdout
    assert stdout is not None
    top = stdout.path.split("/")[0]
    (run_dir / top).rename(tmp_path / "moved")
    (run_dir / top).symlink_to(tmp_path / "moved")
    facts = anyio.run(lambda: page_facts(report, repo=None, run_dir=run_dir))
    assert facts.logs == {}


# -- the audit of a retried task ----------------------------------------------------------

SECOND_TIME_LUCKY = """
import os, pathlib, sys
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.touch()
    print("first attempt")
    print("it failed", file=sys.stderr)
    sys.exit(1)
print("second attempt, a longer line")
print("it worked", file=sys.stderr)
"""


def test_a_retried_tasks_log_digests_are_its_last_attempts(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """A task that succeeded on its second attempt verifies: its provenance's log digests
    are the last attempt's; the first attempt's put there are a finding."""
    repo = make_repo()
    agent = tmp_path / "lucky.py"
    agent.write_text(SECOND_TIME_LUCKY)
    plan = Plan.model_validate(
        {
            "agents": {"w": {"command": [sys.executable, str(agent), str(tmp_path / "tried")]}},
            "defaults": {"venv": False, "worktree": False},
            "tasks": [{"id": "t", "agent": "w", "task": "t", "retries": 1}],
        }
    )
    report = anyio.run(lambda: orchestrate_parallel(plan, repo=repo))
    [result] = report.results
    assert (result.status, result.attempts) == ("succeeded", 2), result.error
    first, last = result.attempt_log
    assert first.stdout is not None and last.stdout is not None
    assert first.stderr is not None and last.stderr is not None
    assert first.stdout.sha256 != last.stdout.sha256
    assert result.provenance.stdout_sha256 == last.stdout.sha256
    run_dir = Path(report.run_dir)
    genuine = anyio.run(lambda: verify_report(run_dir / "report.json", repo=repo))
    assert genuine.ok, genuine.findings

    older = result.provenance.model_copy(
        update={"stdout_sha256": first.stdout.sha256, "stderr_sha256": first.stderr.sha256}
    )
    forged = report.model_copy(
        update={"results": [seal_result(result.model_copy(update={"provenance": older}))]}
    )
    path = tmp_path / "forged.json"
    path.write_bytes(report_bytes(seal_report(forged)))
    outcome = anyio.run(lambda: verify_report(path, repo=repo, run_dir=run_dir))
    assert {(f.task_id, f.field) for f in outcome.findings} == {
        ("t", "provenance.stdout_sha256"),
        ("t", "provenance.stderr_sha256"),
    }
