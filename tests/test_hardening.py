"""Hardening: what a hostile environment, agent or moment of cancellation must not break.

Each test pins a fix of the review rounds (``git log``): git variables inherited from a hook,
cancellation at any moment, one task's disaster, agents that commit or break their worktree,
a user's worktree on an unplugged disk, a shared Repository, odd plans, and file modes.
Everything is real: git repositories, agent processes, uv venvs.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import Plan, Report, RunStarted
from orchestrator import Repository, _git, orchestrate_parallel, verify_report

from .conftest import MakeRepo, cli, git, live_processes_with, task_worktrees

WriteAgent = Callable[[str, str], Path]

ZERO_OID = "0" * 40

# Writes out/<task id>.txt; its output names the git variables it was given and the checkout
# its own git commands act on.
WRITE_OWN_FILE = """
import json, os, pathlib, subprocess
task = os.environ["ORCHESTRATOR_TASK_ID"]
pathlib.Path("out", task + ".txt").write_text(task + "\\n")
toplevel = subprocess.run(
    ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True
).stdout.strip()
output = {
    "cwd": os.getcwd(),
    "toplevel": toplevel,
    "GIT_INDEX_FILE": os.environ.get("GIT_INDEX_FILE"),
    "GIT_DIR": os.environ.get("GIT_DIR"),
}
pathlib.Path(os.environ["ORCHESTRATOR_OUTPUT"]).write_text(json.dumps(output))
"""

# Writes a file, deletes its worktree's .git file and exits with $EXIT_CODE (default 1).
DELETE_DOT_GIT = """
import os, pathlib, sys
pathlib.Path("after-dot-git.txt").write_text("written without a .git\\n")
if os.path.exists(".git"):
    os.remove(".git")
sys.exit(int(os.environ.get("EXIT_CODE", "1")))
"""


def run(coro_fn: Callable[[], Any]) -> Any:
    return anyio.run(coro_fn)


def plan_of(agent: Path, n: int, **extra: Any) -> Plan:
    tasks = [{"id": f"t{i:02d}", "agent": "w", "task": f"write t{i:02d}"} for i in range(n)]
    return Plan.model_validate(
        {"agents": {"w": {"command": [sys.executable, str(agent)]}}, "tasks": tasks, **extra}
    )


def verified(report: Report | Path) -> bool:
    path = report if isinstance(report, Path) else Path(report.run_dir) / "report.json"
    outcome = anyio.run(verify_report, path)
    assert outcome.ok, outcome.findings
    return True


def git_locks(repo: Path) -> list[Path]:
    return sorted((repo / ".git").rglob("*.lock"))


def assert_repository_clean(repo: Path) -> None:
    """Objects sound, only the main worktree registered (not locked), no git lock file left."""
    subprocess.run(["git", "-C", str(repo), "fsck", "--strict"], check=True, capture_output=True)
    listing = git(repo, "worktree", "list", "--porcelain")
    assert task_worktrees(repo) == [], listing  # pool slots stay, detached
    assert "locked" not in listing
    # Every admin entry left belongs to a worktree that exists (a pool slot): none is stale.
    for gitdir in (repo / ".git" / "worktrees").glob("*/gitdir"):
        assert Path(gitdir.read_text().strip()).exists(), gitdir
    assert git_locks(repo) == []


def run_branches(repo: Path, run_id: str) -> dict[str, str]:
    """The run's task branches and the commits they point at."""
    out = git(
        repo,
        "for-each-ref",
        "--format=%(refname:short) %(objectname)",
        f"refs/heads/orchestrator/{run_id}/",
    )
    return dict(line.split(" ") for line in out.splitlines())


def staged_lines(repo: Path) -> list[str]:
    """Lines of ``git status --porcelain`` with something in the index column."""
    status = git(repo, "status", "--porcelain", "--untracked-files=all")
    return [line for line in status.splitlines() if line[:1] not in (" ", "?")]


def only_run_dir(repo: Path) -> Path:
    [run_dir] = (repo / ".git" / "orchestrator" / "runs").iterdir()
    return run_dir


def prunable_lines(repo: Path) -> list[str]:
    listing = git(repo, "worktree", "list", "--porcelain").splitlines()
    return [line for line in listing if line.startswith("prunable")]


def open_files() -> list[str]:
    """What this process's file descriptors point at."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed meanwhile
            continue
    return found


# 1. Variables inherited from a hook or a wrapper.


def test_inherited_git_dir_and_index_file_reach_neither_git_nor_agents(
    make_repo: MakeRepo, write_agent: WriteAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("own_file", WRITE_OWN_FILE)
    base = git(repo, "rev-parse", "HEAD")
    # As inside a pre-commit hook of the user's repository.
    monkeypatch.setenv("GIT_INDEX_FILE", str(repo / ".git" / "index"))
    monkeypatch.setenv("GIT_DIR", str(repo / ".git"))
    plan = plan_of(agent, 8, concurrency=8, defaults={"venv": False})
    report: Report = run(lambda: orchestrate_parallel(plan, repo=repo))
    monkeypatch.delenv("GIT_INDEX_FILE")
    monkeypatch.delenv("GIT_DIR")

    assert report.summary.successful == 8, report.errors
    for result in report.results:
        commit = result.provenance.result_commit
        assert commit is not None
        changed = git(repo, "diff-tree", "--no-commit-id", "--name-only", "-r", base, commit)
        assert changed.splitlines() == [f"out/{result.task_id}.txt"]
        assert result.output is not None
        assert result.output["GIT_INDEX_FILE"] is None and result.output["GIT_DIR"] is None
        # The agent's own git acts on its worktree, not on the user's checkout.
        assert result.output["toplevel"] == result.output["cwd"] != str(repo)
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "rev-parse", "HEAD") == base
    assert verified(report)
    assert_repository_clean(repo)


# 2. Cancellation at any moment.

SLEEPER = """
import os, pathlib, time
pathlib.Path("out", os.environ["ORCHESTRATOR_TASK_ID"] + ".txt").write_text("partial\\n")
time.sleep(float(os.environ["SLEEP_S"]))
"""


def wait_for_git_of(repo: Path) -> None:
    """Let git processes still at work on *repo* finish (bounded), so checks see a settled repo.

    asyncio can lose track of a git process whose start was cancelled (CPython #103847); it
    then finishes on its own.
    """
    deadline = time.monotonic() + 5
    while live_processes_with(f"{repo}/") and time.monotonic() < deadline:
        time.sleep(0.02)


def test_cancelling_at_random_moments_leaves_a_sound_repository_and_report(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    rng = random.Random(1234)
    agent = write_agent("sleeper", SLEEPER)
    task_ids = [f"t{i}" for i in range(8)]
    reports = 0
    for iteration in range(12):
        repo = make_repo(extra={"out/.keep": ""})
        marker = f"hardening-cancel-{uuid.uuid4().hex}"
        plan = Plan.model_validate(
            {
                "agents": {"s": {"command": [sys.executable, str(agent), marker]}},
                "concurrency": 8,
                "tasks": [
                    {
                        "id": task_id,
                        "agent": "s",
                        "task": "write, then sleep",
                        "env": {"SLEEP_S": f"{rng.uniform(0.05, 0.2):.3f}"},
                    }
                    for task_id in task_ids
                ],
            }
        )
        delay = rng.uniform(0, 0.6)

        async def main(plan: Plan = plan, repo: Path = repo, delay: float = delay) -> None:
            with anyio.move_on_after(delay):
                await orchestrate_parallel(plan, repo=repo, venv_backend="uv", kill_grace=0.2)

        run(main)
        gc.collect()
        where = f"iteration {iteration}, cancelled after {delay:.3f} s"
        assert live_processes_with(marker) == [], where
        wait_for_git_of(repo)
        state = repo / ".git" / "orchestrator"
        run_dirs = list((state / "runs").iterdir()) if (state / "runs").exists() else []
        assert len(run_dirs) <= 1, where
        assert_repository_clean(repo)
        for run_dir in run_dirs:
            for kind in ("venvs", "worktrees"):
                leftover = state / kind / run_dir.name
                assert not leftover.exists() or not any(leftover.iterdir()), (where, kind)
            branches = run_branches(repo, run_dir.name)
            report_file = run_dir / "report.json"
            assert report_file.exists(), where  # a run directory always ends with a report
            reports += 1
            partial = json.loads(report_file.read_text())
            assert sorted(r["task_id"] for r in partial["results"]) == task_ids, where
            reported = {r["branch"] for r in partial["results"] if r["branch"]}
            assert reported == branches.keys(), where  # no branch the report does not name
            assert verified(report_file)
    assert reports >= 3  # most cancels land after the run has started


@pytest.mark.parametrize("how", ["cancelled", "handler-raises"])
def test_a_run_stopped_as_it_announces_itself_still_writes_a_report(
    how: str, make_repo: MakeRepo
) -> None:
    repo = make_repo()
    plan = Plan.model_validate(
        {
            "agents": {"t": {"command": ["true"]}},
            "defaults": {"venv": False},
            "tasks": [
                {"id": "a", "agent": "t", "task": "t"},
                {"id": "b", "agent": "t", "task": "t"},
            ],
        }
    )

    class HandlerBug(Exception):
        pass

    async def main() -> None:
        announced = anyio.Event()

        async def on_event(event: Any) -> None:
            if isinstance(event, RunStarted):
                if how == "handler-raises":
                    raise HandlerBug
                announced.set()
                await anyio.sleep(30)

        if how == "handler-raises":
            with pytest.raises(HandlerBug):
                await orchestrate_parallel(plan, repo=repo, on_event=on_event)
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: orchestrate_parallel(plan, repo=repo, on_event=on_event))
            await announced.wait()
            tg.cancel_scope.cancel()

    run(main)
    assert_repository_clean(repo)
    report_file = only_run_dir(repo) / "report.json"
    assert report_file.exists(), "no partial report"
    lock_file = str(repo / ".git" / "orchestrator" / "metadata.mutex")
    assert lock_file not in open_files(), "the repository lock's descriptor was left open"
    partial = json.loads(report_file.read_text())
    assert [(r["task_id"], r["status"]) for r in partial["results"]] == [
        ("a", "cancelled"),
        ("b", "cancelled"),
    ]
    assert verified(report_file)


# Stalls the first "prepared" update of an existing task branch (git holds the branch's ref
# lock meanwhile) until git is gone, or at most 2 s; a directory marks that it has stalled.
STALLING_HOOK = """#!/bin/sh
[ "$1" = prepared ] || exit 0
while read old new ref; do
    case "$ref" in refs/heads/orchestrator/*) ;; *) continue ;; esac
    [ "$old" = {zero} ] && continue
    [ "$new" = {zero} ] && continue
    {which} || continue
    if mkdir "{stalled}" 2>/dev/null; then
        i=0
        while kill -0 $PPID 2>/dev/null && [ $i -lt 100 ]; do sleep 0.02; i=$((i + 1)); done
    fi
done
exit 0
"""


@pytest.mark.parametrize(
    ("step", "which"),
    [("reset", '[ "$old" = "$new" ]'), ("commit", '[ "$old" != "$new" ]')],
    ids=["reset", "commit"],
)
def test_a_cancel_never_kills_git_holding_a_ref_lock(
    step: str,
    which: str,
    make_repo: MakeRepo,
    write_agent: WriteAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The orchestrator's git runs no hook; this test needs one to stall git while it holds
    # the ref lock, so it turns hooks back on for this run only.
    hardening = list(_git.HARDENING)
    at = hardening.index("core.hooksPath=/dev/null")
    monkeypatch.setattr(_git, "HARDENING", tuple(hardening[: at - 1] + hardening[at + 1 :]))
    repo = make_repo()
    stalled = tmp_path / "stalled"
    hook = repo / ".git" / "hooks" / "reference-transaction"
    hook.write_text(
        STALLING_HOOK.replace("{zero}", ZERO_OID)
        .replace("{which}", which)
        .replace("{stalled}", str(stalled))
    )
    hook.chmod(0o755)
    agent = write_agent("work", "import pathlib\npathlib.Path('work.txt').write_text('work')\n")
    plan = Plan.model_validate(
        {
            "agents": {"w": {"command": [sys.executable, str(agent)]}},
            "defaults": {"venv": False},
            "tasks": [{"id": "a", "agent": "w", "task": "t"}],
        }
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: orchestrate_parallel(plan, repo=repo))
            while not stalled.exists():  # noqa: ASYNC110 (the hook is another process)
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    run(main)
    assert git_locks(repo) == []
    run_dir = only_run_dir(repo)
    [result] = json.loads((run_dir / "report.json").read_text())["results"]
    assert result["status"] == "cancelled"
    branches = run_branches(repo, run_dir.name)
    assert list(branches) == ([result["branch"]] if result["branch"] else [])
    if step == "commit":  # the agent ran: its work is on the branch
        assert git(repo, "show", f"{result['branch']}:work.txt") == "work"
    assert verified(run_dir / "report.json")


# 3. One task's disaster does not stop the others.


def test_a_broken_worktree_a_realtime_signal_and_nul_bytes_fail_only_their_tasks(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    good = write_agent("own_file", WRITE_OWN_FILE)
    no_dot_git = write_agent("no_dot_git", DELETE_DOT_GIT)
    realtime = write_agent(
        "realtime",
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGRTMIN + 6)\ntime.sleep(30)\n",
    )
    plan = Plan.model_validate(
        {
            "agents": {
                "good": {"command": [sys.executable, str(good)]},
                "no_dot_git": {"command": [sys.executable, str(no_dot_git)]},
                "realtime": {"command": [sys.executable, str(realtime)]},
                "nul_env": {"command": [sys.executable, str(good)], "env": {"BAD": "a\x00b"}},
            },
            "defaults": {"venv": False},
            "tasks": [
                {"id": "good1", "agent": "good", "task": "t"},
                {"id": "no_dot_git", "agent": "no_dot_git", "task": "t", "retries": 1},
                {"id": "realtime", "agent": "realtime", "task": "t"},
                {"id": "nul_env", "agent": "nul_env", "task": "t"},
                {"id": "nul_key", "agent": "good", "task": "t", "env": {"B\x00AD": "x"}},
                {"id": "good2", "agent": "good", "task": "t"},
            ],
        }
    )
    # The plan model takes NUL bytes in variables: the run has to cope with them.
    assert plan.agents["nul_env"].env == {"BAD": "a\x00b"}
    report: Report = run(lambda: orchestrate_parallel(plan, repo=repo))

    by_id = {r.task_id: r for r in report.results}
    assert by_id["good1"].status == by_id["good2"].status == "succeeded"
    assert by_id["no_dot_git"].status == "failed"  # its .git is restored for a retry
    realtime_error = by_id["realtime"].error
    assert by_id["realtime"].status == "failed" and realtime_error is not None
    assert realtime_error.message == f"killed by signal {int(signal.SIGRTMIN) + 6}"
    for task_id in ("nul_env", "nul_key"):
        error = by_id[task_id].error
        assert by_id[task_id].status == "failed" and error is not None
        assert error.kind == "spawn" and "embedded null byte" in error.message
    assert report.summary.successful == 2 and report.summary.failed == 4
    assert verified(report)


def test_a_retry_runs_in_a_worktree_whose_dot_git_is_restored(
    make_repo: MakeRepo, write_agent: WriteAgent, tmp_path: Path
) -> None:
    repo = make_repo()
    counter = tmp_path / "attempts"
    agent = write_agent(
        "break_then_add",
        f"""
        import os, pathlib, subprocess, sys
        counter = pathlib.Path({str(counter)!r})
        n = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(n))
        pathlib.Path("work.txt").write_text("work")
        if n == 1:
            os.remove(".git")
            sys.exit(1)
        assert os.path.isfile(".git"), "the retry must run in a real worktree"
        subprocess.run(["git", "add", "-A"], check=True)  # as agents do
        """,
    )
    plan = Plan.model_validate(
        {
            "agents": {"a": {"command": [sys.executable, str(agent)]}},
            "defaults": {"venv": False},
            "tasks": [{"id": "broken", "agent": "a", "task": "t", "retries": 1}],
        }
    )
    # The state directory inside the working tree: the worktree's parents are the user's.
    report: Report = run(lambda: orchestrate_parallel(plan, repo=repo, state_dir=repo / "state"))
    assert staged_lines(repo) == []
    [result] = report.results
    assert result.status == "succeeded" and result.attempts == 2
    assert git(repo, "show", f"{result.provenance.result_commit}:work.txt") == "work"


def test_a_nul_byte_in_the_program_path_is_a_spawn_failure(make_repo: MakeRepo) -> None:
    plan = Plan.model_validate(
        {
            "agents": {"a": {"command": [sys.executable + "\x00"]}},
            "defaults": {"venv": False},
            "tasks": [{"id": "a", "agent": "a", "task": "t"}],
        }
    )
    report: Report = run(lambda: orchestrate_parallel(plan, repo=make_repo()))
    [result] = report.results
    assert result.error is not None and result.error.kind == "spawn"
    assert result.attempts == 1
    assert verified(report)


# 4. Commits an agent makes itself.


def test_commits_the_agent_made_itself_are_kept_under_the_result(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo()
    base = git(repo, "rev-parse", "HEAD")
    agent = write_agent(
        "self_commit",
        """
        import json, os, pathlib, subprocess
        def git(*args):
            identity = ["-c", "user.name=Agent", "-c", "user.email=agent@example.com"]
            return subprocess.run(
                ["git", *identity, *args], check=True, capture_output=True, text=True
            ).stdout.strip()
        pathlib.Path("mine.txt").write_text("committed by the agent\\n")
        git("add", "-A")
        git("commit", "--quiet", "-m", "mine")
        mine = git("rev-parse", "HEAD")
        pathlib.Path("later.txt").write_text("left for the orchestrator\\n")
        pathlib.Path(os.environ["ORCHESTRATOR_OUTPUT"]).write_text(json.dumps({"mine": mine}))
        """,
    )
    plan = Plan.model_validate(
        {
            "agents": {"a": {"command": [sys.executable, str(agent)]}},
            "defaults": {"venv": False},
            "tasks": [{"id": "self", "agent": "a", "task": "commit, then write more"}],
        }
    )
    report: Report = run(lambda: orchestrate_parallel(plan, repo=repo))
    [result] = report.results
    assert result.status == "succeeded", result.error
    assert result.output is not None
    mine, commit = result.output["mine"], result.provenance.result_commit
    assert commit is not None and commit != mine
    assert git(repo, "log", "-1", "--format=%s", mine) == "mine"
    assert git(repo, "rev-parse", f"{commit}^") == mine
    for older, newer in ((base, mine), (mine, commit)):
        git(repo, "merge-base", "--is-ancestor", older, newer)  # raises if not
    files = git(repo, "ls-tree", "-r", "--name-only", commit).splitlines()
    assert {"mine.txt", "later.txt"} <= set(files)
    assert git(repo, "rev-parse", f"refs/heads/{result.branch}") == commit
    assert verified(report)


# 5. A user's worktree on an unplugged disk.


def test_a_prunable_worktree_of_the_user_survives_a_run(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    mine, away = repo.parent / "mine", repo.parent / "mine-unplugged"
    git(repo, "worktree", "add", "--quiet", str(mine))
    mine.rename(away)
    assert prunable_lines(repo) != []
    good = write_agent("own_file", WRITE_OWN_FILE)
    fails = write_agent("fails", "import sys\nsys.exit(1)\n")
    plan = Plan.model_validate(
        {
            "agents": {
                "w": {"command": [sys.executable, str(good)]},
                "f": {"command": [sys.executable, str(fails)]},
            },
            "defaults": {"venv": False},
            "keep_worktrees": "never",
            "tasks": [
                *({"id": f"t{i}", "agent": "w", "task": "t"} for i in range(3)),
                {"id": "fails", "agent": "f", "task": "t"},
            ],
        }
    )
    report: Report = run(lambda: orchestrate_parallel(plan, repo=repo))
    assert report.summary.successful == 3
    away.rename(mine)
    listing = git(repo, "worktree", "list", "--porcelain")
    assert f"worktree {mine}" in listing.splitlines() and prunable_lines(repo) == []
    assert task_worktrees(repo) == [str(mine)]
    git(mine, "status")  # raises if the worktree was dropped
    assert git(mine, "rev-parse", "--show-toplevel") == str(mine)


# 6. One Repository object shared by several runs.


def test_two_concurrent_runs_and_a_third_share_one_repository(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("own_file", WRITE_OWN_FILE)

    async def main() -> list[Report]:
        repository = await Repository.open(repo)
        reports: list[Report] = []

        async def one(n: int) -> None:
            plan = plan_of(agent, n, defaults={"venv": False})
            reports.append(await orchestrate_parallel(plan, repo=repository))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 3)
            tg.start_soon(one, 4)
        await one(2)
        return reports

    reports: list[Report] = run(main)
    assert sorted(r.summary.successful for r in reports) == [2, 3, 4]
    assert all(r.summary.successful == r.summary.total_tasks for r in reports)
    assert len({r.run_id for r in reports}) == 3
    for report in reports:
        assert verified(report)
    assert_repository_clean(repo)


# 7. Plans as a user writes them, through the CLI.


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def plan_data(repo: Path, agent: Path, **task: Any) -> dict[str, Any]:
    return {
        "repo": str(repo),
        "agents": {"w": {"command": [sys.executable, str(agent)]}},
        "defaults": {"venv": False},
        "tasks": [{"id": "a", "agent": "w", "task": "do it", **task}],
    }


def test_a_json_plan_with_an_emoji_as_json_dumps_writes_it_runs(
    make_repo: MakeRepo,
    write_agent: WriteAgent,
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("own_file", WRITE_OWN_FILE)
    text = json.dumps(plan_data(repo, agent, task="celebrate \U0001f389 loudly"))
    assert "\\ud83c\\udf89" in text  # a surrogate pair, as json.dumps escapes it
    Path("plan.json").write_text(text)
    validated = cli(capsys, "validate", "plan.json")
    assert (validated.code, validated.err) == (0, "")
    ran = cli(capsys, "run", "plan.json")
    assert ran.code == 0, ran.err
    [line] = [line for line in ran.out.splitlines() if line.startswith("report: ")]
    report_file = Path(line.removeprefix("report: "))
    [result] = json.loads(report_file.read_text())["results"]
    subject = git(repo, "log", "-1", "--format=%s", result["provenance"]["result_commit"])
    assert subject == "w: celebrate \U0001f389 loudly [task a]"
    assert verified(report_file)


def test_a_json_plan_indented_with_tabs_validates(
    make_repo: MakeRepo,
    write_agent: WriteAgent,
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = make_repo()
    agent = write_agent("own_file", WRITE_OWN_FILE)
    Path("plan.json").write_text(json.dumps(plan_data(repo, agent), indent="\t"))
    outcome = cli(capsys, "validate", "plan.json")
    assert (outcome.code, outcome.err) == (0, "")
    assert outcome.out.startswith("plan.json: OK, 1 tasks, 1 agents, ")


YAML_PLAN = """\
repo: repo
agents:
  w: {command: [python, agent.py]}
tasks:
  - agent: w
    task: t
"""


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "    timeout: .inf\n",
            "plan.yaml:7:5: tasks[0].timeout: must be a finite number",
        ),
        (
            "    inputs: {x: .nan}\n",
            "plan.yaml:7:5: tasks[0].inputs: must not contain NaN or infinity "
            "(not representable in JSON)",
        ),
    ],
    ids=["infinite-timeout", "nan-input"],
)
def test_non_finite_numbers_are_one_located_line(
    command: str,
    extra: str,
    expected: str,
    make_repo: MakeRepo,
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = make_repo(name="repo")
    Path("plan.yaml").write_text(YAML_PLAN + extra)
    outcome = cli(capsys, command, "plan.yaml")
    assert (outcome.code, outcome.out, outcome.err) == (2, "", expected + "\n")
    assert not (repo / ".git" / "orchestrator").exists()


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_repository_without_commits_says_so(
    command: str, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subprocess.run(["git", "init", "--quiet", "repo"], check=True)
    Path("plan.yaml").write_text(YAML_PLAN)
    outcome = cli(capsys, command, "plan.yaml")
    assert outcome.code == 2
    [line] = outcome.err.splitlines()
    assert line.startswith("plan.yaml:1:1: base: 'HEAD' does not resolve to a commit in ")
    assert line.endswith("(the repository has no commits yet)")


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("inside", [".git", ".git/refs"])
def test_repo_option_inside_the_git_directory_is_one_line(
    command: str,
    inside: str,
    make_repo: MakeRepo,
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = make_repo(name="repo")
    Path("plan.yaml").write_text(YAML_PLAN)
    outcome = cli(capsys, command, "plan.yaml", "--repo", str(repo / inside))
    assert (outcome.code, outcome.out) == (2, "")
    assert outcome.err == (
        f"--repo: {repo / inside} is inside a git directory, not a working tree; "
        "give the repository's top directory\n"
    )
    assert not (repo / ".git" / "orchestrator").exists()


def nested_plan(depth: int, layout: str) -> str:
    deep = "[" * depth + "]" * depth
    if layout == "yaml":
        return YAML_PLAN + f"    inputs: {{x: {deep}}}\n"
    body = '\t"agents": {"w": {"command": ["python"]}},\n'
    body += f'\t"tasks": [{{"agent": "w", "task": "t", "inputs": {{"x": {deep}}}}}]\n'
    text = '{\n\t"repo": "repo",\n' + body + "}\n"
    return text if layout == "json-tabs" else text.replace("\t", "  ")


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(
    ("layout", "depth", "reason"),
    [
        ("yaml", 2000, "nested too deeply"),
        ("json", 2000, "nested too deeply"),
        ("yaml", 300, "nested too deeply"),
        pytest.param(
            "json-tabs",
            2000,
            "nested too deeply",
        ),
    ],
)
def test_a_deeply_nested_plan_is_one_line(
    command: str,
    layout: str,
    depth: int,
    reason: str,
    make_repo: MakeRepo,
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = make_repo(name="repo")
    Path("plan.yaml").write_text(nested_plan(depth, layout))
    outcome = cli(capsys, command, "plan.yaml")
    assert (outcome.code, outcome.out) == (2, "")
    [line] = outcome.err.splitlines()
    assert line.startswith("plan.yaml") and reason in line
    assert not (repo / ".git" / "orchestrator").exists()


# 8. File modes.


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_of_a_run_are_readable_by_auditors(
    make_repo: MakeRepo, write_agent: WriteAgent, tmp_path: Path, umask_022: None
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("own_file", WRITE_OWN_FILE)
    copy = tmp_path / "copy" / "report.json"
    plan = plan_of(agent, 2, defaults={"venv": False})
    report: Report = run(lambda: orchestrate_parallel(plan, repo=repo, report_path=copy))
    run_dir = Path(report.run_dir)
    files = [
        run_dir / "report.json",
        run_dir / "plan.json",
        copy,
        *sorted((run_dir / "envelopes").glob("*.json")),
        *sorted((run_dir / "logs").rglob("*.std*")),
    ]
    assert len(files) == 3 + 2 + 4
    assert {str(f.relative_to(tmp_path)): oct(f.stat().st_mode & 0o777) for f in files} == {
        str(f.relative_to(tmp_path)): oct(0o644) for f in files
    }


# 9. A state directory inside the working tree.


def test_an_agent_without_dot_git_cannot_make_the_orchestrator_touch_the_users_index(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo()
    base = git(repo, "rev-parse", "HEAD")
    agent = write_agent("no_dot_git", DELETE_DOT_GIT)
    plan = Plan.model_validate(
        {
            "agents": {"a": {"command": [sys.executable, str(agent)]}},
            "defaults": {"venv": False},
            "tasks": [
                {"id": "succeeds", "agent": "a", "task": "t", "env": {"EXIT_CODE": "0"}},
                {"id": "fails", "agent": "a", "task": "t"},
            ],
        }
    )
    report: Report = run(lambda: orchestrate_parallel(plan, repo=repo, state_dir=repo / "state"))
    assert staged_lines(repo) == []
    status = git(repo, "status", "--porcelain").splitlines()
    assert status and all(line.startswith("?? state/") for line in status)
    assert git(repo, "diff", "--cached", "--name-only") == ""
    assert git(repo, "rev-parse", "HEAD") == base
    by_id = {r.task_id: r for r in report.results}
    assert by_id["succeeds"].status == "succeeded" and by_id["fails"].status == "failed"
    commit = by_id["succeeds"].provenance.result_commit
    assert git(repo, "show", f"{commit}:after-dot-git.txt") == "written without a .git"
    assert verified(report)


def test_a_run_cancelled_while_it_opens_leaves_no_run_directory(
    make_repo: MakeRepo, write_agent: WriteAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the repository guard's snapshot is taken (in a thread, after the run
    directory was made): the run directory goes, since a run directory always ends with a
    report (test_cancelling_at_random_moments found one without, now and then)."""
    from orchestrator import context

    repo = make_repo()
    agent = write_agent("sleeper", SLEEPER)
    plan = Plan.model_validate(
        {
            "agents": {"s": {"command": [sys.executable, str(agent), "x"]}},
            "tasks": [{"id": "t", "agent": "s", "task": "t"}],
        }
    )
    reached = []

    async def slow_guard(repository: Repository) -> None:
        reached.append(repository)
        await anyio.sleep(60)

    monkeypatch.setattr(context, "guard_repository", slow_guard)

    async def main() -> None:
        with anyio.move_on_after(0.5):
            await orchestrate_parallel(plan, repo=repo)

    run(main)
    assert reached
    runs = repo / ".git" / "orchestrator" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


CTRL_C_AGENT = """
import os, pathlib, sys, time
task = os.environ["ORCHESTRATOR_TASK_ID"]
pathlib.Path(task + ".txt").write_text(task + "\\n")
pathlib.Path(sys.argv[1]).touch()
time.sleep(60)
"""


@pytest.mark.slow  # about 3 s: a real run, interrupted
def test_ctrl_c_keeps_a_cancelled_tasks_work_on_its_branch(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """A run interrupted as a terminal's Ctrl-C does it (SIGINT to the whole process group):
    the running task's work is committed to its branch, as before the kept update-ref
    (at f9f820c the branch holds slow.txt; at ff557c8 the commit's branch move fails and
    the work is gone)."""
    import json

    repo = make_repo()
    agent, running = tmp_path / "agent.py", tmp_path / "running"
    agent.write_text(CTRL_C_AGENT)
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"repo: {json.dumps(str(repo))}\nconcurrency: 1\ndefaults: {{venv: false}}\n"
        f"agents: {{w: {{command: [{json.dumps(sys.executable)}, {json.dumps(str(agent))}, "
        f"{json.dumps(str(running))}]}}}}\n"
        "tasks:\n  - {id: slow, agent: w, task: t}\n"
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(plan)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a terminal of its own: its process group is its own
    )
    try:
        for _ in range(600):
            if running.exists():
                break
            assert run.poll() is None
            anyio.run(anyio.sleep, 0.05)
        anyio.run(anyio.sleep, 0.5)
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(timeout=60) == 130
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    branches = git(repo, "for-each-ref", "--format=%(refname)", "refs/heads/orchestrator/")
    assert branches, "the cancelled task's branch is gone"
    assert git(repo, "show", f"{branches.splitlines()[0]}:slow.txt") == "slow"
