"""orchestrate_parallel end to end: real repositories, real venvs, real agent processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from envelopes import HandoffEnvelope, Plan, Report, TaskFinished, TaskStarted, build_envelope
from orchestrator import Workspace, orchestrate_parallel, verify_report
from orchestrator._git import FALLBACK_IDENTITY

from .conftest import MakeRepo, git, live_processes_with, task_worktrees

WRITE_OWN_FILE = """
import json, os, sys
task = os.environ["ORCHESTRATOR_TASK_ID"]
with open(os.path.join("out", task + ".txt"), "w") as f:
    f.write(task + "\\n")
with open(os.environ["ORCHESTRATOR_OUTPUT"], "w") as f:
    json.dump({"task": task, "cwd": os.getcwd(), "venv": os.environ.get("VIRTUAL_ENV")}, f)
"""


def plan_of(agent_script: Path, n: int, **extra: Any) -> Plan:
    tasks = [{"id": f"t{i:02d}", "agent": "w", "task": f"write t{i:02d}"} for i in range(n)]
    return Plan.model_validate(
        {"agents": {"w": {"command": [sys.executable, str(agent_script)]}}, "tasks": tasks, **extra}
    )


def run(coro_fn: Callable[[], Any], backend: str = "asyncio") -> Any:
    return anyio.run(coro_fn, backend=backend)


def test_32_tasks_at_concurrency_32_three_times(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("own_file", WRITE_OWN_FILE)
    base = git(repo, "rev-parse", "HEAD")
    commits: set[str] = set()
    for _ in range(3):
        report: Report = run(
            lambda: orchestrate_parallel(
                plan_of(agent, 32, concurrency=32), repo=repo, venv_backend="uv"
            )
        )
        assert report.summary.successful == 32, report.errors
        for result in report.results:
            commit = result.provenance.result_commit
            assert commit is not None and commit != base
            changed = git(
                repo, "diff-tree", "--no-commit-id", "--name-only", "-r", base, commit
            ).splitlines()
            assert changed == [f"out/{result.task_id}.txt"]
            assert git(repo, "rev-parse", f"refs/heads/{result.branch}") == commit
            commits.add(commit)
        assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok
    assert len(commits) == 96  # distinct runs, distinct envelopes, distinct commits
    assert task_worktrees(repo) == []
    subprocess.run(["git", "-C", str(repo), "fsck", "--strict"], check=True, capture_output=True)
    assert not list((repo / ".git").rglob("*.lock"))


def test_commits_use_fallback_identity_on_a_fresh_machine(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("own_file", WRITE_OWN_FILE)
    report: Report = run(
        lambda: orchestrate_parallel(plan_of(agent, 1), repo=repo, venv_backend="uv")
    )
    commit = report.results[0].provenance.result_commit
    assert (
        git(repo, "log", "-1", "--format=%an <%ae>", str(commit))
        == f"{FALLBACK_IDENTITY[0]} <{FALLBACK_IDENTITY[1]}>"
    )
    message = git(repo, "log", "-1", "--format=%B", str(commit))
    assert message.startswith("w: write t00 [task t00]")


def test_users_identity_wins(make_repo: MakeRepo, write_agent: Callable[[str, str], Path]) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    git(repo, "config", "user.name", "Ada")
    git(repo, "config", "user.email", "ada@example.com")
    agent = write_agent("own_file", WRITE_OWN_FILE)
    report: Report = run(
        lambda: orchestrate_parallel(plan_of(agent, 1), repo=repo, venv_backend="uv")
    )
    assert (
        git(
            repo, "log", "-1", "--format=%an <%ae>", str(report.results[0].provenance.result_commit)
        )
        == "Ada <ada@example.com>"
    )


def test_flaky_agent_succeeds_on_third_attempt(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path], tmp_path: Path
) -> None:
    repo = make_repo()
    counter = tmp_path / "count"
    agent = write_agent(
        "flaky",
        f"""
        import pathlib, sys
        counter = pathlib.Path({str(counter)!r})
        n = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(n))
        pathlib.Path("attempt.txt").write_text(str(n))
        pathlib.Path("leftover-%d.txt" % n).write_text("from attempt %d" % n)
        if n < 3:
            sys.exit("flaky failure %d" % n)
        """,
    )
    plan = Plan.model_validate(
        {
            "agents": {"f": {"command": [sys.executable, str(agent)]}},
            "tasks": [{"id": "flaky", "agent": "f", "task": "t", "retries": 2}],
        }
    )
    report: Report = run(lambda: orchestrate_parallel(plan, repo=repo, venv_backend="uv"))
    result = report.results[0]
    assert result.status == "succeeded"
    assert result.attempts == 3
    assert [a.status for a in result.attempt_log] == ["failed", "failed", "succeeded"]
    assert "flaky failure 1" in (
        result.attempt_log[0].error.message if result.attempt_log[0].error else ""
    )
    # Each attempt started from a clean worktree: only the last attempt's files are committed.
    files = git(
        repo, "ls-tree", "-r", "--name-only", str(result.provenance.result_commit)
    ).splitlines()
    assert (
        "leftover-3.txt" in files
        and "leftover-1.txt" not in files
        and "leftover-2.txt" not in files
    )


def test_bad_agents_are_clear_results_and_others_unaffected(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    good = write_agent("own_file", WRITE_OWN_FILE)
    invalid = write_agent(
        "invalid", "import os\nopen(os.environ['ORCHESTRATOR_OUTPUT'], 'w').write('{not json')\n"
    )
    not_object = write_agent(
        "list", "import os\nopen(os.environ['ORCHESTRATOR_OUTPUT'], 'w').write('[1, 2]')\n"
    )
    exit3 = write_agent("exit3", "import sys\nprint('going down', file=sys.stderr)\nsys.exit(3)\n")
    loud = write_agent(
        "loud",
        "import sys\nchunk = b'x' * (1 << 20)\nfor _ in range(50):\n    sys.stdout.buffer.write(chunk)\n",
    )
    plan = Plan.model_validate(
        {
            "agents": {
                "good": {"command": [sys.executable, str(good)]},
                "invalid": {"command": [sys.executable, str(invalid)]},
                "list": {"command": [sys.executable, str(not_object)]},
                "exit3": {"command": [sys.executable, str(exit3)]},
                "loud": {"command": [sys.executable, str(loud)]},
                "missing": {"command": ["/nonexistent/agent-binary"]},
            },
            "tasks": [
                {"id": "good1", "agent": "good", "task": "t"},
                {"id": "invalid", "agent": "invalid", "task": "t"},
                {"id": "list", "agent": "list", "task": "t"},
                {"id": "exit3", "agent": "exit3", "task": "t"},
                {"id": "loud", "agent": "loud", "task": "t"},
                {"id": "missing", "agent": "missing", "task": "t"},
                {"id": "good2", "agent": "good", "task": "t"},
            ],
        }
    )
    report: Report = run(lambda: orchestrate_parallel(plan, repo=repo, venv_backend="uv"))
    by_id = {r.task_id: r for r in report.results}
    assert by_id["good1"].status == by_id["good2"].status == "succeeded"
    assert by_id["loud"].status == "succeeded"
    assert by_id["loud"].metrics.stdout_bytes == 50 << 20
    invalid_error = by_id["invalid"].error
    assert by_id["invalid"].status == "failed" and invalid_error is not None
    assert invalid_error.kind == "invalid_output" and "not valid JSON" in invalid_error.message
    list_error = by_id["list"].error
    assert (
        list_error is not None and list_error.message == "output must be a JSON object, found list"
    )
    exit_error = by_id["exit3"].error
    assert by_id["exit3"].exit_code == 3 and exit_error is not None
    assert exit_error.message == "exited with code 3: going down"
    missing_error = by_id["missing"].error
    assert missing_error is not None and missing_error.kind == "spawn"
    assert "cannot start /nonexistent/agent-binary" in missing_error.message
    assert report.summary.failed == 4 and report.summary.successful == 3
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok
    # Policy "failed": worktrees of failed tasks are kept and named in the report.
    for task_id in ("invalid", "list", "exit3", "missing"):
        kept = by_id[task_id].worktree
        assert kept is not None and Path(kept).is_dir()
    assert by_id["good1"].worktree is None


def test_concurrency_limit_is_exact(make_repo: MakeRepo) -> None:
    running = 0
    peak = 0

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.02)
        running -= 1
        return {"n": envelope.inputs["n"]}

    envelopes = [
        build_envelope("a", "t", task_id=f"t{i}", inputs={"n": i}, worktree=False, venv=False)
        for i in range(40)
    ]
    report: Report = run(
        lambda: orchestrate_parallel(
            envelopes, agents={"a": agent}, concurrency=3, state_dir=make_repo().parent / "state"
        )
    )
    assert report.summary.successful == 40
    assert peak == 3
    assert [r.output for r in report.results] == [{"n": i} for i in range(40)]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_same_plan_under_asyncio_and_trio(
    backend: str, make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("own_file", WRITE_OWN_FILE)
    events: list[str] = []

    async def main() -> Report:
        return await orchestrate_parallel(
            plan_of(agent, 4, concurrency=2), repo=repo, on_event=lambda e: events.append(e.type)
        )

    report: Report = run(main, backend)
    assert report.summary.successful == 4
    assert events[0] == "run_started" and events[-1] == "run_finished"
    assert events.count("task_started") == events.count("task_finished") == 4
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json", backend=backend).ok


def test_two_runs_on_two_repos_in_one_event_loop(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    repos = [make_repo(extra={"out/.keep": ""}) for _ in range(2)]
    agent = write_agent("own_file", WRITE_OWN_FILE)
    reports: list[Report] = []

    async def main() -> None:
        async def one(repo: Path) -> None:
            reports.append(
                await orchestrate_parallel(plan_of(agent, 3), repo=repo, venv_backend="uv")
            )

        async with anyio.create_task_group() as tg:
            for repo in repos:
                tg.start_soon(one, repo)

    run(main)
    assert sorted(r.repo or "" for r in reports) == sorted(str(r) for r in repos)
    assert all(r.summary.successful == 3 for r in reports)


def test_cancelling_mid_run_leaves_nothing_behind(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path], tmp_path: Path
) -> None:
    repo = make_repo()
    marker = f"cancel-marker-{tmp_path.name}"
    started = tmp_path / "started"
    started.mkdir()
    agent = write_agent(
        "sleeper",
        f"""
        import os, pathlib, signal, subprocess, sys, time
        pathlib.Path("work.txt").write_text("partial work")
        # A child that ignores SIGTERM, to prove the group is killed.
        subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)", {marker!r}])
        pathlib.Path({str(started)!r}, os.environ["ORCHESTRATOR_TASK_ID"]).touch()
        time.sleep(60)
        """,
    )
    plan = Plan.model_validate(
        {
            "agents": {"s": {"command": [sys.executable, str(agent), marker]}},
            "tasks": [{"id": f"s{i}", "agent": "s", "task": "sleep"} for i in range(6)],
            "concurrency": 3,
        }
    )
    events: list[Any] = []

    async def main() -> None:
        with anyio.move_on_after(30) as scope:
            async with anyio.create_task_group() as tg:

                async def orchestrate() -> None:
                    await orchestrate_parallel(
                        plan, repo=repo, venv_backend="uv", kill_grace=0.2, on_event=events.append
                    )

                tg.start_soon(orchestrate)
                while len(list(started.iterdir())) < 3:  # noqa: ASYNC110 (polling files other processes write)
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught, "the agents never started"

    run(main)
    assert live_processes_with(marker) == []
    assert task_worktrees(repo) == []
    assert not list((repo / ".git").rglob("*.lock"))
    subprocess.run(["git", "-C", str(repo), "fsck", "--strict"], check=True, capture_output=True)
    run_dirs = list((repo / ".git" / "orchestrator" / "runs").iterdir())
    assert len(run_dirs) == 1
    partial = json.loads((run_dirs[0] / "report.json").read_text())
    # Every task appears once: three were running, three never started.
    assert [(r["task_id"], r["status"], r["attempts"]) for r in partial["results"]] == [
        *[(f"s{i}", "cancelled", 1) for i in range(3)],
        *[(f"s{i}", "cancelled", 0) for i in range(3, 6)],
    ]
    # Nothing is lost: the partial work of each cancelled task is committed on its branch.
    for result in partial["results"][:3]:
        assert git(repo, "show", f"{result['branch']}:work.txt") == "partial work"
    assert anyio.run(verify_report, run_dirs[0] / "report.json").ok
    finished = [e for e in events if isinstance(e, TaskFinished)]
    assert {e.status for e in finished} == {"cancelled"}
    assert len([e for e in events if isinstance(e, TaskStarted)]) == 3


def test_tasks_without_worktree_or_venv(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    repo = make_repo()
    agent = write_agent(
        "noop",
        "import json, os\njson.dump({'cwd': os.getcwd(), 'venv': os.environ.get('VIRTUAL_ENV')}, open(os.environ['ORCHESTRATOR_OUTPUT'], 'w'))\n",
    )
    plan = Plan.model_validate(
        {
            "agents": {"n": {"command": ["python", str(agent)]}},
            "defaults": {"worktree": False, "venv": False},
            "tasks": [{"id": "a", "agent": "n", "task": "t"}],
        }
    )
    report: Report = run(lambda: orchestrate_parallel(plan, repo=repo))
    result = report.results[0]
    assert result.status == "succeeded"
    assert result.output is not None and result.output["cwd"] == str(repo)
    assert result.branch is None and result.provenance.result_commit is None
    assert result.provenance.environment is None
    assert git(repo, "branch", "--list", "orchestrator/*") == ""


def test_callable_agent_timeout_and_exception(make_repo: MakeRepo) -> None:
    async def slow(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        await anyio.sleep(10)
        return {}

    async def broken(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        raise ValueError("no such thing")

    async def writes(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        assert workspace.path is not None
        await anyio.Path(workspace.path / "made-by-callable.txt").write_text("hi\n")
        return {"ok": True}

    envelopes = [
        build_envelope("slow", "t", task_id="slow", timeout=0.1, venv=False),
        build_envelope("broken", "t", task_id="broken", venv=False),
        build_envelope("writes", "t", task_id="writes", venv=False),
    ]
    repo = make_repo()
    report: Report = run(
        lambda: orchestrate_parallel(
            envelopes, repo=repo, agents={"slow": slow, "broken": broken, "writes": writes}
        )
    )
    by_id = {r.task_id: r for r in report.results}
    assert by_id["slow"].status == "timed_out"
    broken_error = by_id["broken"].error
    assert broken_error is not None and broken_error.message == "ValueError: no such thing"
    assert by_id["writes"].status == "succeeded"
    assert (
        git(repo, "show", f"{by_id['writes'].provenance.result_commit}:made-by-callable.txt")
        == "hi"
    )
    assert by_id["writes"].provenance.agent.qualname is not None
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_keep_worktrees_always_and_never(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    repo = make_repo()
    fail = write_agent("fail", "import sys\nsys.exit(1)\n")
    plan = Plan.model_validate(
        {
            "agents": {"f": {"command": [sys.executable, str(fail)]}},
            "tasks": [{"id": "f", "agent": "f", "task": "t"}],
        }
    )
    never: Report = run(
        lambda: orchestrate_parallel(plan, repo=repo, keep_worktrees="never", venv_backend="uv")
    )
    assert never.results[0].worktree is None
    assert task_worktrees(repo) == []
    always: Report = run(
        lambda: orchestrate_parallel(plan, repo=repo, keep_worktrees="always", venv_backend="uv")
    )
    kept = always.results[0].worktree
    assert kept is not None and Path(kept).is_dir()


@pytest.mark.parametrize(
    "event_type", ["task_queued", "task_started", "attempt_failed", "task_finished", "run_started"]
)
def test_a_failing_event_handler_stops_the_run_with_its_own_exception(
    event_type: str, make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    repo = make_repo()
    agent = write_agent("fail_once", "import sys\nsys.exit(1)\n")

    class HandlerBug(Exception):
        pass

    def handler(event: Any) -> None:
        if event.type == event_type:
            raise HandlerBug(event.type)

    plan = Plan.model_validate(
        {
            "agents": {"f": {"command": [sys.executable, str(agent)]}},
            "tasks": [{"id": f"f{i}", "agent": "f", "task": "t"} for i in range(3)],
        }
    )
    with pytest.raises(HandlerBug):
        run(
            lambda: orchestrate_parallel(
                plan, repo=repo, venv_backend="uv", on_event=handler, keep_worktrees="never"
            )
        )
    # Whatever the handler did, nothing is left behind.
    assert task_worktrees(repo) == []
    assert not list((repo / ".git").rglob("*.lock"))


def test_every_event_is_in_events_jsonl(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    from pydantic import TypeAdapter

    from envelopes import Event

    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("own_file", WRITE_OWN_FILE)
    told: list[Any] = []
    report: Report = run(
        lambda: orchestrate_parallel(plan_of(agent, 3), repo=repo, on_event=told.append)
    )
    lines = (Path(report.run_dir) / "events.jsonl").read_text().splitlines()
    adapter = TypeAdapter(Event)
    logged = [adapter.validate_json(line) for line in lines]
    assert logged == told  # the audit log holds exactly what the caller was told, in order
    assert [e.type for e in logged][:1] == ["run_started"] and logged[-1].type == "run_finished"
    assert sum(e.type == "task_finished" for e in logged) == 3


def test_a_run_cancelled_as_its_report_is_written_still_ends_with_its_report(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every task has ended when the final report is written: a cancellation arriving right
    then (found by the random cancellations of tests/test_hardening.py on a loaded machine)
    waits for the report, and is delivered after it."""
    from orchestrator import coordinator

    async def noop(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        return {}

    write = coordinator.write_final_report
    scopes: list[anyio.CancelScope] = []

    async def cancelled_while_writing(*args: Any, **kwargs: Any) -> Report:
        scopes[0].cancel()
        await anyio.lowlevel.checkpoint()  # as the report's own writes have
        return await write(*args, **kwargs)

    monkeypatch.setattr(coordinator, "write_final_report", cancelled_while_writing)
    envelopes = [build_envelope("noop", "t", task_id="a", venv=False, worktree=False)]
    repo = make_repo()

    async def main() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await orchestrate_parallel(envelopes, repo=repo, agents={"noop": noop})

    run(main)
    assert scopes[0].cancel_called
    [run_dir] = (repo / ".git" / "orchestrator" / "runs").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["status"] for r in report["results"]] == ["succeeded"]
    journal = (run_dir / "journal.jsonl").read_text().splitlines()
    assert json.loads(journal[-1])["type"] == "finished"  # not left looking interrupted
