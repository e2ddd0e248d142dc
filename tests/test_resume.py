"""Nothing lost: kill the orchestrator at many moments, resume, and check every promise.

Real processes all the way: the orchestrator runs as ``python -m orchestrator`` and is killed
with SIGKILL (at a seeded random time, or by itself at a named point, see
``orchestrator/_faults.py``); its agents keep running as orphans until resume or gc kills them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from orchestrator.journal import read_journal
from orchestrator.process import find_tagged

from .conftest import MakeRepo, git, task_worktrees

TASKS = [f"t{i:02d}" for i in range(12)]

AGENT = """
import json, os, pathlib, sys, time
task = os.environ["ORCHESTRATOR_TASK_ID"]
with open(sys.argv[1], "a") as f:  # counts its runs, outside the repository
    f.write(task + "\\n")
time.sleep(float(sys.argv[2]))
pathlib.Path(task + ".txt").write_text(task + "\\n")
pathlib.Path(os.environ["ORCHESTRATOR_OUTPUT"]).write_text(json.dumps({"task": task}))
"""


def _moments() -> list[tuple[str, Any]]:
    rng = random.Random(20261122)
    # The run takes at least 3 waves of 1 s (12 tasks of write_plan's default, 4 at a time):
    # every moment falls inside it.
    times = sorted(round(rng.uniform(0.05, 2.6), 2) for _ in range(10))
    points = ["worktree:3", "worktree:9", "commit:2", "commit:7", "report:1", "journal:4"]
    points += ["journal:30"]
    return [("time", t) for t in times] + [("crash", p) for p in points]


MOMENTS = _moments()


def orchestrator(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_plan(tmp_path: Path, repo: Path, *, seconds: float = 1.0) -> tuple[Path, Path]:
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    counts = tmp_path / "counts.txt"
    plan = tmp_path / "plan.yaml"
    tasks = "".join(f"  - {{id: {t}, agent: w, task: 'write {t}'}}\n" for t in TASKS)
    plan.write_text(
        f"repo: {json.dumps(str(repo))}\nconcurrency: 4\n"
        f"agents:\n  w: {{command: [{json.dumps(sys.executable)}, '{{plan_dir}}/agent.py', "
        f"{json.dumps(str(counts))}, '{seconds}']}}\n"
        f"tasks:\n{tasks}"
    )
    return plan, counts


def held_agents(plan_dir: Path) -> Path:
    """Have the agent write_plan wrote in *plan_dir* wait for a file rather than sleep: a run
    the test needs alive stays alive however loaded the machine is. The file's path."""
    gate = plan_dir / "gate"
    agent = plan_dir / "agent.py"
    waiting = f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)"
    agent.write_text(agent.read_text().replace("time.sleep(float(sys.argv[2]))", waiting))
    assert waiting in agent.read_text()
    return gate


def start_run(
    plan: Path, *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``orchestrator run PLAN ARGS...`` in the background, its output dropped."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(plan), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def crash_at(plan: Path, point: str, *, cwd: Path) -> None:
    """Run PLAN until the orchestrator kills itself at *point* (``commit:6``, say)."""
    crashed = start_run(plan, cwd=cwd, env={**os.environ, "ORCHESTRATOR_CRASH_AT": point})
    assert crashed.wait(timeout=120) == -signal.SIGKILL, f"never reached {point}"


def run_dirs(repo: Path) -> list[Path]:
    runs = repo / ".git" / "orchestrator" / "runs"
    return sorted(runs.iterdir()) if runs.is_dir() else []


def succeeded_in_journal(repo: Path) -> set[str]:
    """Tasks whose success the journal holds: what resume must not run again."""
    last: dict[str, str] = {}
    for run_dir in run_dirs(repo):
        for record in read_journal(run_dir / "journal.jsonl").of_type("result"):
            last[record["result"]["task_id"]] = record["result"]["status"]
    return {task for task, status in last.items() if status == "succeeded"}


def assert_nothing_left(repo: Path) -> None:
    """After gc: no worktree but the main one, no venv, no agent process, no lock file."""
    assert task_worktrees(repo) == []
    state = repo / ".git" / "orchestrator"
    for kind in ("worktrees", "venvs"):
        leftovers = list((state / kind).rglob("*")) if (state / kind).exists() else []
        assert leftovers == [], leftovers
    for run_dir in run_dirs(repo):
        assert not find_tagged(f"{run_dir.name}/")
        assert not (run_dir / "lock").exists()
    assert not list((repo / ".git").rglob("*.lock"))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "when"), MOMENTS, ids=[f"{k}-{w}" for k, w in MOMENTS])
def test_a_killed_run_resumes_without_losing_or_redoing_work(
    make_repo: MakeRepo, tmp_path: Path, kind: str, when: Any
) -> None:
    repo = make_repo()
    plan, counts = write_plan(tmp_path, repo)
    env = dict(os.environ)
    if kind == "crash":
        env["ORCHESTRATOR_CRASH_AT"] = when
    first = start_run(plan, cwd=tmp_path, env=env)
    if kind == "time":
        try:
            first.wait(timeout=when)
        except subprocess.TimeoutExpired:
            first.send_signal(signal.SIGKILL)
    first.wait(timeout=120)
    if kind == "crash":
        assert first.returncode == -signal.SIGKILL, f"never reached {when}"
    done_before = succeeded_in_journal(repo)

    resumed = orchestrator("run", str(plan), "--resume", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert [r["task_id"] for r in report["results"]] == TASKS  # each exactly once
    assert {r["status"] for r in report["results"]} == {"succeeded"}
    assert {r["task_id"] for r in report["results"] if r["resumed"]} == done_before
    runs = counts.read_text().split()
    for task in done_before:
        assert runs.count(task) == 1, (task, runs)
    report_file = Path(report["run_dir"]) / "report.json"
    verified = orchestrator("verify", str(report_file), cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert subprocess.run(["git", "-C", str(repo), "fsck"], capture_output=True).returncode == 0
    for result in report["results"]:  # every result is on its branch, with its file
        assert git(repo, "show", f"{result['branch']}:{result['task_id']}.txt") == result["task_id"]
    # resume itself cleared the worktrees the crash left (gc is for the rest).
    assert task_worktrees(repo) == []

    cleaned = orchestrator("gc", "--repo", str(repo), cwd=tmp_path)
    assert cleaned.returncode == 0, cleaned.stderr
    assert_nothing_left(repo)


@pytest.mark.slow  # a real run killed or resumed: 5 to 11 s here (loaded)
def test_a_torn_last_journal_line_is_ignored(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    plan, _ = write_plan(tmp_path, repo, seconds=0.2)
    # Killed at a named point, not after a sleep: on a loaded machine a run killed after a
    # fixed time may not have written its run directory yet.
    crash_at(plan, "commit:5", cwd=tmp_path)
    (run_dir,) = run_dirs(repo)
    journal = run_dir / "journal.jsonl"
    data = journal.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    cut = data[: last_start + (len(data) - last_start) // 2]
    journal.write_bytes(cut)  # the last line, cut in half
    assert read_journal(journal).torn
    resumed = orchestrator("resume", run_dir.name, "--repo", str(repo), "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert [r["task_id"] for r in report["results"]] == TASKS
    assert orchestrator("verify", str(run_dir / "report.json"), cwd=tmp_path).returncode == 0
    # The journal is whole again: the torn line was cut off before new lines were added.
    assert not read_journal(journal).torn


@pytest.mark.slow  # a real run killed or resumed: 5 to 11 s here (loaded)
def test_a_journal_damaged_in_the_middle_is_refused(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    plan, _ = write_plan(tmp_path, repo, seconds=0.2)
    crash_at(plan, "commit:3", cwd=tmp_path)
    (run_dir,) = run_dirs(repo)
    journal = run_dir / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[1] = b"{not json\n"
    journal.write_bytes(b"".join(lines))
    resumed = orchestrator("resume", run_dir.name, "--repo", str(repo), cwd=tmp_path)
    assert resumed.returncode == 1
    assert resumed.stderr.strip() == (
        f"orchestrator: {journal}: line 2 cannot be read "
        "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    )


@pytest.mark.slow  # orchestrator processes run, killed or resumed: 12 to 31 s here (loaded)
def test_a_second_orchestrator_on_a_live_run_refuses(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    plan, _ = write_plan(tmp_path, repo)
    gate = held_agents(tmp_path)
    first = start_run(plan, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not run_dirs(repo) or not (run_dirs(repo)[0] / "journal.jsonl").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (run_dir,) = run_dirs(repo)
        second = orchestrator("resume", run_dir.name, "--repo", str(repo), cwd=tmp_path)
        assert second.returncode == 1
        assert second.stderr.startswith(
            f"orchestrator: run {run_dir.name} is in use by pid {first.pid}, running since "
        )
        again = orchestrator("run", str(plan), "--resume", cwd=tmp_path)
        assert again.returncode == 1
        assert (
            again.stderr.strip()
            == f"orchestrator: run {run_dir.name} of this plan is still running"
        )
        listed = orchestrator("runs", "--repo", str(repo), "--json", cwd=tmp_path)
        assert json.loads(listed.stdout)["state"] == "live"
    finally:
        gate.touch()
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


@pytest.mark.slow  # orchestrator processes run, killed or resumed: 12 to 31 s here (loaded)
def test_gc_dry_run_removes_nothing_and_gc_leaves_a_live_run_alone(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    plan, _ = write_plan(tmp_path, repo, seconds=0.3)
    crash_at(plan, "commit:6", cwd=tmp_path)
    (crashed_run,) = run_dirs(repo)
    deadline = time.monotonic() + 30
    while find_tagged(f"{crashed_run.name}/"):  # orphaned agents still writing: let them end
        assert time.monotonic() < deadline
        time.sleep(0.05)

    def snapshot() -> tuple[list[str], str]:
        files = sorted(str(p.relative_to(repo)) for p in (repo / ".git").rglob("*"))
        return files, git(repo, "for-each-ref")

    before = snapshot()
    dry = orchestrator(
        "gc", "--repo", str(repo), "--older-than", "0", "--branches", "--dry-run", cwd=tmp_path
    )
    assert dry.returncode == 0, dry.stderr
    # The crashed run's worktrees are the pool's (their locks died with it): idle, collected.
    assert "would remove pool worktree" in dry.stdout
    assert "would delete orchestrator/" in dry.stdout
    assert snapshot() == before

    (tmp_path / "slow").mkdir()
    slow_plan, _ = write_plan(tmp_path / "slow", repo)
    # A task that ended while gc works would take its worktree away with it.
    gate = held_agents(tmp_path / "slow")
    earlier = set(run_dirs(repo))
    live = start_run(slow_plan, "--pool", "0", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        # The new run, not the last by name (ids of one second differ in their random part).
        while not (new := sorted(set(run_dirs(repo)) - earlier)) or not list(
            (repo / ".git/orchestrator/worktrees").glob(f"{new[0].name}/*")
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        live_run = new[0]
        worktrees = sorted((repo / ".git/orchestrator/worktrees" / live_run.name).iterdir())
        cleaned = orchestrator(
            "gc", "--repo", str(repo), "--older-than", "0", "--branches", cwd=tmp_path
        )
        assert cleaned.returncode == 0, cleaned.stderr
        assert f"kept: run {live_run.name}: live, left alone" in cleaned.stdout
        assert live_run.is_dir() and all(w.is_dir() for w in worktrees)
        assert run_dirs(repo) == [live_run]  # the crashed run, older than 0, is gone
    finally:
        gate.touch()
        live.wait(timeout=120)
    assert live.returncode == 0
    report = json.loads((live_run / "report.json").read_text())
    assert {r["status"] for r in report["results"]} == {"succeeded"}


@pytest.mark.slow  # a real run killed or resumed: 5 to 11 s here (loaded)
def test_an_interrupted_branch_holding_commits_is_kept_aside(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    agent = tmp_path / "committer.py"
    marker = tmp_path / "committed"
    agent.write_text(
        "import os, pathlib, subprocess, sys, time\n"
        "if not pathlib.Path(sys.argv[1]).exists():\n"
        "    pathlib.Path('own.txt').write_text('mine\\n')\n"
        "    subprocess.run(['git', '-c', 'user.name=a', '-c', 'user.email=a@a', 'add', '-A'], check=True)\n"
        "    subprocess.run(['git', '-c', 'user.name=a', '-c', 'user.email=a@a', 'commit', '-qm', 'own'], check=True)\n"
        "    pathlib.Path(sys.argv[1]).touch()\n"
        "    time.sleep(60)\n"
    )
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"repo: {json.dumps(str(repo))}\ndefaults: {{venv: false}}\n"
        f"agents: {{c: {{command: [{json.dumps(sys.executable)}, {json.dumps(str(agent))}, "
        f"{json.dumps(str(marker))}]}}}}\n"
        "tasks:\n  - {id: own, agent: c, task: t}\n"
    )
    first = start_run(plan, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    (run_dir,) = run_dirs(repo)
    own_commit = git(repo, "rev-parse", f"orchestrator/{run_dir.name}/own")
    resumed = orchestrator("resume", run_dir.name, "--repo", str(repo), "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    kept = git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/orchestrator/")
    assert kept == f"refs/orchestrator/interrupted/{run_dir.name}/own/1 {own_commit}"
    # The re-run started from the base again, on the task's own branch name.
    report = json.loads(resumed.stdout)
    assert report["results"][0]["provenance"]["base_commit"] == report["base_commit"]
    # gc keeps it while the run is young; --branches with the run gone deletes it.
    assert orchestrator("gc", "--repo", str(repo), "--branches", cwd=tmp_path).returncode == 0
    assert git(repo, "for-each-ref", "refs/orchestrator/") != ""
    gone = orchestrator("gc", "--repo", str(repo), "--branches", "--older-than", "0", cwd=tmp_path)
    assert gone.returncode == 0, gone.stderr
    assert f"deleted refs/orchestrator/interrupted/{run_dir.name}/own/1" in gone.stdout
    assert git(repo, "for-each-ref", "refs/orchestrator/", "refs/heads/orchestrator/") == ""


@pytest.mark.slow  # orchestrator processes run, killed or resumed: 12 to 31 s here (loaded)
def test_runs_lists_states_and_bad_input_is_one_line(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    plan, _ = write_plan(tmp_path, repo, seconds=0.05)
    assert orchestrator("run", str(plan), cwd=tmp_path).returncode == 0
    crash_at(plan, "commit:5", cwd=tmp_path)
    listed = orchestrator("runs", "--repo", str(repo), "--json", cwd=tmp_path)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["state"], r["total_tasks"], r["plan_name"]) for r in rows] == [
        ("finished", 12, "plan"),
        ("interrupted", 12, "plan"),
    ]
    assert rows[0]["counts"] == {"succeeded": 12}
    table = orchestrator("runs", "--repo", str(repo), cwd=tmp_path)
    assert "interrupted" in table.stdout and "12: 12 succeeded" in table.stdout
    for args, code, message in [
        (
            ["resume", "20990101-000000-abcdef", "--repo", str(repo)],
            1,
            "no run 20990101-000000-abcdef in ",
        ),
        (
            ["resume", rows[0]["run_id"], "--repo", str(repo)],
            1,
            f"run {rows[0]['run_id']} has finished",
        ),
        (
            ["gc", "--repo", str(repo), "--older-than", "soon"],
            2,
            "--older-than: not an age: 'soon'",
        ),
        (["runs", "--repo", str(tmp_path / "nowhere")], 2, "not a git repository"),
    ]:
        outcome = orchestrator(*args, cwd=tmp_path)
        assert outcome.returncode == code, outcome.stderr
        assert outcome.stderr.startswith(f"orchestrator: {message}"), outcome.stderr
        assert len(outcome.stderr.splitlines()) == 1
    # A plan that changed since the interrupted run started: refused, not guessed.
    plan.write_text(plan.read_text().replace("concurrency: 4", "concurrency: 3"))
    changed = orchestrator("run", str(plan), "--resume", cwd=tmp_path)
    assert changed.returncode == 1
    assert changed.stderr.startswith(
        f"orchestrator: the plan changed since run {rows[1]['run_id']} started"
    )


@pytest.mark.slow  # orchestrator processes run, killed or resumed: 12 to 31 s here (loaded)
def test_force_starts_a_new_run_that_reuses_what_still_matches(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    plan, counts = write_plan(tmp_path, repo, seconds=0.05)
    crash_at(plan, "commit:6", cwd=tmp_path)
    done_before = succeeded_in_journal(repo)
    assert done_before
    (old_run,) = run_dirs(repo)
    # The plan changes in a way that changes no task's work, and one task's text.
    text = plan.read_text().replace("concurrency: 4", "concurrency: 3")
    plan.write_text(text.replace("'write t11'", "'write t11 better'"))
    refused = orchestrator("run", str(plan), "--resume", cwd=tmp_path)
    assert refused.returncode == 1 and "--force" in refused.stderr
    forced = orchestrator("run", str(plan), "--resume", "--force", "--json", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    report = json.loads(forced.stdout)
    assert report["run_id"] != old_run.name
    statuses = {r["task_id"]: r["status"] for r in report["results"]}
    assert {t for t, s in statuses.items() if s == "cached"} == done_before - {"t11"}
    for result in report["results"]:
        if result["status"] == "cached":
            assert result["provenance"]["cached_from"]["run_id"] == old_run.name
    runs = counts.read_text().split()
    for task in done_before - {"t11"}:
        assert runs.count(task) == 1, (task, runs)
    report_file = Path(report["run_dir"]) / "report.json"
    assert orchestrator("verify", str(report_file), cwd=tmp_path).returncode == 0
    # The old run is superseded: resuming this plan now finds nothing to take up, and the
    # old run cannot be resumed by id either.
    listed = [
        json.loads(line)
        for line in orchestrator(
            "runs", "--repo", str(repo), "--json", cwd=tmp_path
        ).stdout.splitlines()
    ]
    assert [r["state"] for r in listed] == ["superseded", "finished"]
    again = orchestrator("run", str(plan), "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    refused = orchestrator("resume", old_run.name, "--repo", str(repo), cwd=tmp_path)
    assert refused.returncode == 1 and "was taken over by run" in refused.stderr
    # The agent's script changed: nothing of the old run matches any more.
    agent = tmp_path / "agent.py"
    agent.write_text(agent.read_text() + "\n# changed\n")
    plan.write_text(plan.read_text().replace("'write t11 better'", "'write t11 best'"))
    counts.write_text("")
    crash_at(plan, "commit:6", cwd=tmp_path)
    plan.write_text(plan.read_text().replace("concurrency: 3", "concurrency: 2"))
    agent.write_text(agent.read_text() + "# changed again\n")
    forced = orchestrator("run", str(plan), "--resume", "--force", "--json", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert {r["status"] for r in json.loads(forced.stdout)["results"]} == {"succeeded"}


def test_journal_lines_share_fsyncs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Group commit: many tasks' lines reach the disk with far fewer fsyncs than lines."""
    import anyio

    import orchestrator.journal as journal_module
    from envelopes import HandoffEnvelope, build_envelope
    from orchestrator import Workspace, orchestrate_parallel

    fsyncs = 0
    real_write = journal_module.Journal._write

    def counting_write(self: journal_module.Journal, data: bytes) -> None:
        nonlocal fsyncs
        fsyncs += 1  # one fsync per write of a batch
        real_write(self, data)

    monkeypatch.setattr(journal_module.Journal, "_write", counting_write)

    async def noop(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, str]:
        return {}

    envelopes = [
        build_envelope("n", "t", task_id=f"n{i}", worktree=False, venv=False) for i in range(64)
    ]
    report = anyio.run(
        lambda: orchestrate_parallel(
            envelopes, agents={"n": noop}, state_dir=tmp_path, concurrency=64
        )
    )
    lines = (Path(report.run_dir) / "journal.jsonl").read_text().splitlines()
    assert len(lines) > 64 * 4  # ready, running, succeeded and the result: per task
    # Each task waits for the disk twice (running before its agent starts, its result
    # before it is done), and tasks that wait at the same time share the fsync.
    assert fsyncs <= 16, (fsyncs, len(lines))  # measured: 6 for 258 lines


def test_the_run_lock_is_the_file_at_its_path(tmp_path: Path) -> None:
    from orchestrator.errors import RunInUse
    from orchestrator.locks import RunLock

    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    assert second.is_held()
    with pytest.raises(RunInUse, match=f"in use by pid {os.getpid()}"):
        second.acquire()
    # A holder that removes the file (gc, when done) frees the run for the next one, and a
    # lock taken on the removed file would not count.
    stale_fd = os.open(tmp_path / "lock", os.O_RDONLY)
    first.remove()
    assert not (tmp_path / "lock").exists()
    second.acquire()
    assert os.fstat(stale_fd).st_ino != os.stat(tmp_path / "lock").st_ino
    os.close(stale_fd)
    second.release()
    assert not RunLock(tmp_path).is_held()


@pytest.mark.slow  # a real run killed or resumed: 5 to 11 s here (loaded)
def test_gc_keeps_the_branches_a_kept_report_names(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    plan, _ = write_plan(tmp_path, repo, seconds=0.01)
    plan.write_text("cache: true\n" + plan.read_text())
    assert orchestrator("run", str(plan), cwd=tmp_path).returncode == 0
    second = orchestrator("run", str(plan), "--json", cwd=tmp_path)
    report = json.loads(second.stdout)
    assert {r["status"] for r in report["results"]} == {"cached"}
    first_run, second_run = run_dirs(repo)
    # The first run is old; the second, whose cached results name its branches, is not.
    eight_days_ago = time.time() - 8 * 86400
    for path in [first_run, *first_run.rglob("*")]:
        os.utime(path, (eight_days_ago, eight_days_ago))
    cleaned = orchestrator("gc", "--repo", str(repo), "--branches", cwd=tmp_path)
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"removed run directory {first_run}" in cleaned.stdout
    assert "deleted orchestrator/" not in cleaned.stdout
    assert run_dirs(repo) == [second_run]
    verified = orchestrator("verify", str(second_run / "report.json"), cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout


@pytest.mark.slow  # orchestrator processes run, killed or resumed: 12 to 31 s here (loaded)
def test_resume_reruns_tasks_whose_branch_gc_deleted(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    plan, _ = write_plan(tmp_path, repo, seconds=0.01)
    crash_at(plan, "commit:6", cwd=tmp_path)
    done_before = succeeded_in_journal(repo)
    assert done_before
    # gc --branches keeps what the interrupted run's journal names...
    orchestrator("gc", "--repo", str(repo), "--branches", cwd=tmp_path)
    assert git(repo, "for-each-ref", "refs/heads/orchestrator/") != ""
    # ...but a user may delete them: those tasks run again rather than point at nothing.
    for ref in git(repo, "for-each-ref", "--format=%(refname)", "refs/heads/orchestrator/").split():
        git(repo, "update-ref", "-d", ref)
    resumed = orchestrator("run", str(plan), "--resume", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert not any(r["resumed"] for r in report["results"])
    assert (
        orchestrator(
            "verify", str(Path(report["run_dir"]) / "report.json"), cwd=tmp_path
        ).returncode
        == 0
    )


@pytest.mark.slow  # a real run killed or resumed: 5 to 11 s here (loaded)
def test_gc_skips_a_run_that_comes_alive(make_repo: MakeRepo, tmp_path: Path) -> None:
    """gc takes each run's lock before cleaning it: a run held by anyone is left alone."""
    from orchestrator.locks import RunLock

    repo = make_repo()
    plan, _ = write_plan(tmp_path, repo, seconds=0.01)
    crash_at(plan, "commit:6", cwd=tmp_path)
    (run_dir,) = run_dirs(repo)
    holder = RunLock(run_dir)
    holder.acquire()  # as a resume starting now would
    try:
        cleaned = orchestrator(
            "gc", "--repo", str(repo), "--older-than", "0", "--branches", cwd=tmp_path
        )
        assert cleaned.returncode == 0, cleaned.stderr
        assert f"kept: run {run_dir.name}: live, left alone" in cleaned.stdout
        assert (run_dir / "journal.jsonl").exists()
        assert git(repo, "for-each-ref", "refs/heads/orchestrator/") != ""
    finally:
        holder.release()


def test_recorded_run_reads_the_settings_as_one_object_and_older_options(tmp_path: Path) -> None:
    from orchestrator.errors import OrchestratorError
    from orchestrator.resume import recorded_run

    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    plan = {
        "agents": {"a": {"command": ["true"]}},
        "tasks": [{"id": "t", "agent": "a", "task": "x"}],
    }
    (run_dir / "plan.json").write_text(json.dumps(plan))
    record = {"type": "run", "run_id": "r1", "at": "2026-01-01T00:00:00+00:00", "plan_dir": "/p"}
    for key, expected in [("settings", 7), ("options", 5)]:
        line = {**record, key: {"concurrency": expected, "backoff": [0.0, 1.0]}}
        (run_dir / "journal.jsonl").write_text(json.dumps(line) + "\n")
        recorded = recorded_run(run_dir, "r1")
        assert recorded.settings.concurrency == expected
        assert recorded.settings.backoff == (0.0, 1.0)
        assert recorded.settings.model_fields_set == {"concurrency", "backoff"}
    # A journal whose settings are out of bounds is refused, naming the setting.
    line = {**record, "settings": {"concurrency": 0}}
    (run_dir / "journal.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(OrchestratorError, match="concurrency: must be >= 1, found 0"):
        recorded_run(run_dir, "r1")
    # A plan.json that is not a file of the run is refused without being followed.
    (run_dir / "plan.json").unlink()
    (run_dir / "plan.json").symlink_to("/etc/passwd")
    with pytest.raises(OrchestratorError, match="cannot read run r1"):
        recorded_run(run_dir, "r1")


@pytest.mark.slow  # orchestrator processes run, killed or resumed: 12 to 31 s here (loaded)
def test_resume_of_a_finished_run_runs_nothing_and_exits_with_its_status(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """``run --resume`` after a run that finished (succeeded, or failed) runs no agent: it
    shows that run's report and exits as that run did; after an interrupted run it resumes;
    ``--rerun`` starts a new run."""
    repo = make_repo()
    plan, counts = write_plan(tmp_path, repo, seconds=0.0)
    first = orchestrator("run", str(plan), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (run_dir,) = run_dirs(repo)
    ran = counts.read_text()
    out = tmp_path / "copy.json"
    again = orchestrator("run", str(plan), "--resume", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"run {run_dir.name} of this plan already finished; nothing to resume" in again.stderr
    assert "12 tasks: 12 succeeded" in again.stdout
    assert f"report: {out}" in again.stdout
    assert out.read_bytes() == (run_dir / "report.json").read_bytes()
    assert counts.read_text() == ran and run_dirs(repo) == [run_dir]  # nothing ran
    # A finished run with a failure: the same, exiting 1 as it did.
    agent = tmp_path / "agent.py"
    agent.write_text(
        agent.read_text().replace("time.sleep", "sys.exit(task == 't03') or time.sleep")
    )
    before = set(run_dirs(repo))
    failed = orchestrator("run", str(plan), cwd=tmp_path)
    assert failed.returncode == 1
    (latest,) = set(run_dirs(repo)) - before
    ran = counts.read_text()
    again = orchestrator("run", str(plan), "--resume", cwd=tmp_path)
    assert (
        again.returncode == 1 and f"run {latest.name} of this plan already finished" in again.stderr
    )
    assert "1 failed" in again.stdout and counts.read_text() == ran
    # --rerun: a new run, every task again; without --resume it is refused as meaningless.
    assert orchestrator("run", str(plan), "--rerun", cwd=tmp_path).returncode == 1
    rerun = orchestrator("run", str(plan), "--resume", "--rerun", cwd=tmp_path)
    assert rerun.returncode == 1 and len(run_dirs(repo)) == 3
    assert "no interrupted run of this plan: starting a new one" in rerun.stderr
    # An interrupted run is resumed, as before.
    agent.write_text(AGENT)
    before = set(run_dirs(repo))
    crash_at(plan, "commit:6", cwd=tmp_path)
    # The new one, not the last by name: two runs started in the same second have ids
    # that differ only by their random part.
    (interrupted,) = set(run_dirs(repo)) - before
    resumed = orchestrator("run", str(plan), "--resume", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["run_id"] == interrupted.name
    # Asked for another base than the finished run had: not that run; a new one starts.
    other = orchestrator("run", str(plan), "--resume", "--base", "main", "--json", cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    assert "started from HEAD, not main: starting a new run" in other.stderr
    assert "no interrupted run" not in other.stderr
    assert json.loads(other.stdout)["run_id"] not in {d.name for d in run_dirs(repo)[:-1]}


# -- resume in one process: a run cancelled from inside, then taken up again --------------

RUN = "20260101-000000-eeeeee"


async def _nothing(envelope: Any, workspace: Any) -> dict[str, Any]:
    return {}


def cancelled_at(
    stop_at: str,
    plan: Any,
    *,
    agents: dict[str, Any] | None = None,
    leave: str | None = None,
    **options: Any,
) -> None:
    """One orchestrator's life (run RUN), cancelled from inside when task *stop_at* starts
    (after writing the file *leave* in its worktree, if given); its agent ``a`` does nothing
    for the other tasks (*agents* adds others)."""
    import anyio

    from orchestrator import orchestrate_parallel

    async def main() -> None:
        with anyio.CancelScope() as scope:

            async def agent(envelope: Any, workspace: Any) -> dict[str, Any]:
                if envelope.task_id == stop_at:
                    if leave is not None:
                        (workspace.path / leave).write_text("work of its own\n")
                    scope.cancel()
                    await anyio.sleep_forever()
                return {}

            everyone = {"a": agent, **(agents or {})}
            await orchestrate_parallel(plan, agents=everyone, run_id=RUN, **options)

    anyio.run(main)


def resumed(plan: Any, **options: Any) -> Any:
    """Run RUN taken up again, with the agent ``a`` doing nothing; its report."""
    import anyio

    from orchestrator import orchestrate_parallel

    options.setdefault("agents", {"a": _nothing})
    return anyio.run(lambda: orchestrate_parallel(plan, resume=RUN, **options))


def two_tasks(**defaults: Any) -> list[Any]:
    from envelopes import build_envelope

    return [
        build_envelope("a", "first", task_id="first", venv=False, **defaults),
        build_envelope("a", "second", task_id="second", venv=False, **defaults),
    ]


def test_a_resumed_run_goes_on_from_the_base_it_started_from(make_repo: MakeRepo) -> None:
    """The base branch moved while the run was down: the tasks run again still start where
    the run started, and the report says so."""
    repo = make_repo()
    base = git(repo, "rev-parse", "HEAD")
    tree = git(repo, "rev-parse", "HEAD^{tree}")
    envelopes = two_tasks()
    cancelled_at("second", envelopes, repo=repo, concurrency=1)
    (repo / "later.txt").write_text("later\n")
    git(repo, "add", "later.txt")
    git(repo, "commit", "--quiet", "-m", "later")
    report = resumed(envelopes, repo=repo)
    assert (report.base_ref, report.base_commit) == ("HEAD", base)
    assert [(r.task_id, r.status, r.resumed) for r in report.results] == [
        ("first", "succeeded", True),
        ("second", "succeeded", False),
    ]
    second = report.result("second")
    assert second.provenance.base_commit == base
    assert git(repo, "rev-parse", f"{second.provenance.result_commit}^{{tree}}") == tree


def test_the_journal_records_the_run_and_each_session_that_took_it_up(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``run`` record holds what a resume needs (plan, repository, base, agents,
    settings); each resume adds a ``resumed`` record: when, which process, what it kept."""
    from orchestrator.plan import load_plan

    repo = make_repo()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "p.yaml").write_text(
        "name: two\nconcurrency: 1\ndefaults: {venv: false}\nagents: {a: {command: ['true']}}\n"
        "tasks:\n  - {id: first, agent: a, task: t}\n  - {id: second, agent: a, task: t}\n"
    )
    plan = load_plan("plans/p.yaml")
    cancelled_at("second", plan, repo=repo)
    journal = read_journal(repo / ".git" / "orchestrator" / "runs" / RUN / "journal.jsonl")
    (run,) = journal.of_type("run")
    assert {k: v for k, v in run.items() if k not in ("at", "settings", "agent_digests")} == {
        "type": "run",
        "run_id": RUN,
        "pid": os.getpid(),
        "plan_sha256": plan.sha256,
        "plan_name": "two",
        "plan_file": str(tmp_path / "plans" / "p.yaml"),
        "plan_dir": str(tmp_path / "plans"),
        "repo": str(repo),
        "base_ref": "HEAD",
        "base_commit": git(repo, "rev-parse", "HEAD"),
        "base_tree": git(repo, "rev-parse", "HEAD^{tree}"),
    }
    assert set(run["agent_digests"]) == {"a"}
    assert run["settings"]["concurrency"] == 1
    report = resumed(plan, repo=repo)
    assert report.started_at.isoformat() == run["at"]  # the run's start, not the resume's
    journal = read_journal(Path(report.run_dir) / "journal.jsonl")
    (session,) = journal.of_type("resumed")
    assert session["pid"] == os.getpid() and session["kept"] == ["first"]
    assert report.started_at < datetime.fromisoformat(session["at"]) <= report.finished_at


async def _broken(envelope: Any, workspace: Any) -> dict[str, Any]:
    raise RuntimeError("the agent's own bug")


def test_a_resume_runs_again_what_the_orchestrator_failed_but_keeps_what_an_agent_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task failed by the orchestrator itself (a bug of its own, a full disk) says nothing
    about the task: it runs again. A task its agent failed keeps its result, like a success."""
    from envelopes import build_envelope
    from orchestrator import subagent

    envelopes = [
        build_envelope("b", "t", task_id="broken", worktree=False, venv=False),
        build_envelope("a", "t", task_id="done", worktree=False, venv=False),
        build_envelope("a", "t", task_id="hit", worktree=False, venv=False),
        build_envelope("a", "t", task_id="stopped", worktree=False, venv=False),
    ]
    real_run = subagent._Subagent.run

    async def run(self: Any) -> Any:
        if self.task_id == "hit":
            raise RuntimeError("the orchestrator's own bug")
        return await real_run(self)

    monkeypatch.setattr(subagent._Subagent, "run", run)
    cancelled_at("stopped", envelopes, agents={"b": _broken}, state_dir=tmp_path, concurrency=1)
    monkeypatch.undo()
    journal = read_journal(tmp_path / "runs" / RUN / "journal.jsonl")
    errors = {r["result"]["task_id"]: r["result"]["error"] for r in journal.of_type("result")}
    assert errors["hit"]["kind"] == "internal" and errors["broken"]["kind"] == "agent_exception"
    report = resumed(envelopes, agents={"a": _nothing, "b": _broken}, state_dir=tmp_path)
    assert [(r.task_id, r.status, r.resumed) for r in report.results] == [
        ("broken", "failed", True),
        ("done", "succeeded", True),
        ("hit", "succeeded", False),
        ("stopped", "succeeded", False),
    ]


def test_a_resume_kills_the_dead_runs_agents_and_says_how_many(tmp_path: Path) -> None:
    from envelopes import RunStarted
    from orchestrator.process import TAG_VARIABLE

    envelopes = two_tasks(worktree=False)
    cancelled_at("second", envelopes, state_dir=tmp_path)
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        env={**os.environ, TAG_VARIABLE: f"{RUN}/second/1"},
    )
    try:
        deadline = time.monotonic() + 30
        while not find_tagged(f"{RUN}/"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        events: list[Any] = []
        report = resumed(envelopes, state_dir=tmp_path, on_event=events.append)
        assert orphan.wait(timeout=30) == -signal.SIGKILL
    finally:
        orphan.kill()
        orphan.wait()
    (started,) = [e for e in events if isinstance(e, RunStarted)]
    assert (started.orphans_killed, started.resumed_tasks) == (1, 1)
    assert report.summary.successful == 2


def test_a_finished_tasks_worktree_left_by_the_crash_goes_and_its_branch_stays(
    make_repo: MakeRepo,
) -> None:
    """The crash came after a task's result was on disk, before its worktree went: the
    resume removes the worktree and keeps the task, whose branch holds its result."""
    import anyio

    from orchestrator import verify_report

    repo = make_repo()
    envelopes = two_tasks()
    cancelled_at("second", envelopes, repo=repo, concurrency=1, pool=0)
    branch = f"orchestrator/{RUN}/first"
    result_commit = git(repo, "rev-parse", branch)
    left = repo / ".git" / "orchestrator" / "worktrees" / RUN / "first"
    git(repo, "worktree", "add", "--quiet", str(left), branch)
    report = resumed(envelopes, repo=repo, pool=0)
    assert [(r.task_id, r.resumed) for r in report.results] == [("first", True), ("second", False)]
    assert not left.exists()
    assert git(repo, "rev-parse", branch) == result_commit
    assert task_worktrees(repo) == []
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_a_resume_refuses_a_finished_run_a_changed_plan_and_a_run_taken_over(
    tmp_path: Path,
) -> None:
    import anyio

    from orchestrator import orchestrate_parallel
    from orchestrator.errors import OrchestratorError

    envelopes = two_tasks(worktree=False)
    cancelled_at("second", envelopes, state_dir=tmp_path)
    run_dir = tmp_path / "runs" / RUN
    (first,) = read_journal(run_dir / "journal.jsonl").of_type("run")
    changed = [envelopes[0], envelopes[1].model_copy(update={"task": "second, said otherwise"})]
    message = (
        f"^the plan changed since run {RUN} started \\(its digest was "
        f"{first['plan_sha256'][:12]}, it is [0-9a-f]{{12}} now\\); "
        "resume it with the plan it started with$"
    )
    with pytest.raises(OrchestratorError, match=message):
        resumed(changed, state_dir=tmp_path)

    async def take_over() -> Any:
        return await orchestrate_parallel(
            envelopes, agents={"a": _nothing}, state_dir=tmp_path, reuse=RUN
        )

    newer = anyio.run(take_over)
    with pytest.raises(OrchestratorError) as taken:
        resumed(envelopes, state_dir=tmp_path)
    assert str(taken.value) == (
        f"run {RUN} was taken over by run {newer.run_id} (run --resume --force); resume that one"
    )
    with pytest.raises(OrchestratorError) as finished:
        anyio.run(
            lambda: orchestrate_parallel(
                envelopes, agents={"a": _nothing}, state_dir=tmp_path, resume=newer.run_id
            )
        )
    assert str(finished.value) == (
        f"run {newer.run_id} has finished; its report is {Path(newer.run_dir) / 'report.json'}"
    )


def test_a_run_reusing_another_takes_its_successes_and_marks_it_taken_over(
    tmp_path: Path,
) -> None:
    import anyio

    from orchestrator import orchestrate_parallel
    from orchestrator.errors import OrchestratorError, RunInUse
    from orchestrator.locks import RunLock
    from orchestrator.recovery import replay

    envelopes = two_tasks(worktree=False)
    anyio.run(
        lambda: orchestrate_parallel(
            envelopes, agents={"a": _nothing}, state_dir=tmp_path, run_id=RUN
        )
    )
    old = tmp_path / "runs" / RUN
    # The new plan changes one task's work: the other's success is reused.
    changed = [envelopes[0], envelopes[1].model_copy(update={"task": "second, said otherwise"})]

    def reusing(run_id: str) -> Any:
        return anyio.run(
            lambda: orchestrate_parallel(
                changed, agents={"a": _nothing}, state_dir=tmp_path, reuse=run_id
            )
        )

    with pytest.raises(OrchestratorError) as missing:
        reusing("20260101-000000-ffffff")
    assert str(missing.value) == (f"no run 20260101-000000-ffffff in {tmp_path / 'runs'} to reuse")
    holder = RunLock(old)
    holder.acquire()  # the old run came alive meanwhile
    try:
        with pytest.raises(RunInUse):
            reusing(RUN)
    finally:
        holder.release()
    assert replay(read_journal(old / "journal.jsonl"), RUN).superseded_by is None
    report = reusing(RUN)
    assert [(r.task_id, r.status) for r in report.results] == [
        ("first", "cached"),
        ("second", "succeeded"),
    ]
    assert replay(read_journal(old / "journal.jsonl"), RUN).superseded_by == report.run_id
    (taken,) = read_journal(old / "journal.jsonl").of_type("superseded")
    assert report.started_at <= datetime.fromisoformat(taken["at"]) <= report.finished_at


def test_the_repository_of_a_resumed_run_is_the_one_given_else_the_cwds(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Repository is used as it is; a path is opened (with the state directory given); with
    neither, the cwd's repository, unless a state directory says where the run lives."""
    import anyio

    from orchestrator.repo import Repository
    from orchestrator.resume import open_run_repository

    repo = make_repo()
    state = tmp_path / "state"

    async def check() -> None:
        given = await Repository.open(repo)
        assert await open_run_repository(given, state) is given
        opened = await open_run_repository(str(repo / "src"), state)
        assert opened is not None and (opened.root, opened.state_dir) == (repo, state)
        assert await open_run_repository(None, state) is None
        monkeypatch.chdir(repo / "src")
        here = await open_run_repository(None, None)
        assert here is not None and here.root == repo
        assert here.state_dir == repo / ".git" / "orchestrator"

    anyio.run(check)


def test_a_run_of_envelopes_is_resumed_from_its_own_record(tmp_path: Path) -> None:
    """``resume_run`` takes the plan from the run directory: a run given envelopes in code
    goes on with those envelopes and the settings it started with."""
    import anyio

    from orchestrator import resume_run

    envelopes = two_tasks(worktree=False)
    cancelled_at("second", envelopes, state_dir=tmp_path, concurrency=1)
    report = anyio.run(lambda: resume_run(RUN, state_dir=tmp_path, agents={"a": _nothing}))
    assert [(r.task_id, r.status, r.resumed) for r in report.results] == [
        ("first", "succeeded", True),
        ("second", "succeeded", False),
    ]
    assert report.repo is None


def test_recorded_run_reads_where_the_plan_came_from_and_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.errors import OrchestratorError
    from orchestrator.plan import LoadedPlan
    from orchestrator.resume import recorded_run

    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    record = {"type": "run", "at": "2026-01-01T00:00:00+00:00", "repo": "/somewhere"}
    line = {**record, "plan_file": "/plans/p.yaml", "plan_dir": "/plans"}
    (run_dir / "journal.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(OrchestratorError) as missing:  # no plan.json
        recorded_run(run_dir, "r1")
    assert str(missing.value) == f"no run r1 in {tmp_path / 'runs'}"
    plan = {
        "agents": {"a": {"command": ["true"]}},
        "tasks": [{"id": "t", "agent": "a", "task": "x"}],
    }
    (run_dir / "plan.json").write_text(json.dumps(plan))
    recorded = recorded_run(run_dir, "r1")
    assert isinstance(recorded.plan, LoadedPlan)
    assert (recorded.plan.file, recorded.plan.plan_dir) == ("/plans/p.yaml", Path("/plans"))
    assert recorded.repo == "/somewhere"
    assert recorded.settings.model_fields_set == set()  # nothing recorded: the defaults
    # A journal of an older version, without the plan's directory: the cwd, as then.
    monkeypatch.chdir(tmp_path)
    (run_dir / "journal.jsonl").write_text(json.dumps(record) + "\n")
    recorded = recorded_run(run_dir, "r1")
    assert isinstance(recorded.plan, LoadedPlan)
    assert (recorded.plan.file, recorded.plan.plan_dir) == (None, tmp_path)


def test_a_resume_moves_aside_the_commits_of_a_task_it_runs_again(make_repo: MakeRepo) -> None:
    """The cancelled task's work was committed on its branch: the resume keeps it under
    refs/orchestrator/interrupted/ (the journal says where the task started), then runs the
    task again from the base."""
    repo = make_repo()
    base = git(repo, "rev-parse", "HEAD")
    envelopes = two_tasks()
    cancelled_at("second", envelopes, repo=repo, concurrency=1, leave="mine.txt")
    work = git(repo, "rev-parse", f"orchestrator/{RUN}/second")
    assert work != base
    report = resumed(envelopes, repo=repo)
    assert [(r.task_id, r.status) for r in report.results] == [
        ("first", "succeeded"),
        ("second", "succeeded"),
    ]
    kept = git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/orchestrator/")
    assert kept == f"refs/orchestrator/interrupted/{RUN}/second/1 {work}"
    assert report.result("second").provenance.base_commit == base


def test_a_resume_goes_on_with_the_settings_the_run_started_with(make_repo: MakeRepo) -> None:
    """Started with ``keep_worktrees="always"``, resumed without it: the task run again keeps
    its worktree, as the run said it would."""
    repo = make_repo()
    envelopes = two_tasks()
    cancelled_at("second", envelopes, repo=repo, concurrency=1, keep_worktrees="always")
    report = resumed(envelopes, repo=repo)
    again = report.result("second")
    assert (again.status, again.resumed) == ("succeeded", False)
    assert again.worktree is not None and Path(again.worktree).is_dir()


def test_a_resume_detaches_a_pool_slot_the_dead_run_left_on_a_branch(
    make_repo: MakeRepo,
) -> None:
    """The crash came after a slot was checked out on a task's branch, before it was given
    back: after the resume no slot has a branch of the run checked out."""
    from orchestrator.pool import pool_dir

    repo = make_repo()
    envelopes = two_tasks()
    cancelled_at("second", envelopes, repo=repo, concurrency=1, pool=1)
    (slot,) = (p for p in pool_dir(repo / ".git" / "orchestrator").iterdir() if p.is_dir())
    admin = Path((slot / ".git").read_text().removeprefix("gitdir:").strip())
    first = git(repo, "rev-parse", f"orchestrator/{RUN}/first")
    (admin / "HEAD").write_text(f"ref: refs/heads/orchestrator/{RUN}/first\n")
    report = resumed(envelopes, repo=repo, pool=0)  # the slot is not borrowed again
    assert report.summary.successful == 2
    assert (admin / "HEAD").read_text().strip() == first
    assert task_worktrees(repo) == []


def test_a_run_whose_journal_lost_its_run_record_is_named_when_resumed_or_reused(
    tmp_path: Path,
) -> None:
    import anyio

    from orchestrator import orchestrate_parallel
    from orchestrator.errors import OrchestratorError

    envelopes = two_tasks(worktree=False)
    cancelled_at("second", envelopes, state_dir=tmp_path)
    journal = tmp_path / "runs" / RUN / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(line for line in lines if '"type":"run"' not in line))
    assert len(journal.read_text().splitlines()) == len(lines) - 1
    with pytest.raises(OrchestratorError, match=f"^run {RUN} has no journal to resume from "):
        resumed(envelopes, state_dir=tmp_path)
    with pytest.raises(OrchestratorError, match=f"^run {RUN} has no journal to resume from "):
        anyio.run(
            lambda: orchestrate_parallel(
                envelopes, agents={"a": _nothing}, state_dir=tmp_path, reuse=RUN
            )
        )


def test_recorded_run_refuses_a_plan_past_its_size_and_a_journal_without_its_run_record(
    tmp_path: Path,
) -> None:
    from orchestrator.errors import OrchestratorError
    from orchestrator.plan import MAX_PLAN_BYTES, LoadedPlan
    from orchestrator.resume import recorded_run

    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    record = {"type": "run", "at": "2026-01-01T00:00:00+00:00"}
    (run_dir / "journal.jsonl").write_text(json.dumps(record) + "\n")
    plan = {
        "agents": {"a": {"command": ["true"]}},
        "tasks": [{"id": "t", "agent": "a", "task": "x"}],
    }
    text = json.dumps(plan)
    (run_dir / "plan.json").write_text(text.ljust(MAX_PLAN_BYTES))  # the most a plan may be
    recorded = recorded_run(run_dir, "r1")
    assert isinstance(recorded.plan, LoadedPlan)
    assert [(t.id, t.agent, t.task) for t in recorded.plan.plan.tasks] == [("t", "a", "x")]
    (run_dir / "plan.json").write_text(text.ljust(MAX_PLAN_BYTES + 1))  # valid JSON, too long
    with pytest.raises(
        OrchestratorError, match=f"^cannot read run r1: .*larger than {MAX_PLAN_BYTES} bytes"
    ):
        recorded_run(run_dir, "r1")
    (run_dir / "plan.json").write_text(text)
    (run_dir / "journal.jsonl").write_text(json.dumps({"type": "state"}) + "\n")
    with pytest.raises(OrchestratorError, match=r"^run r1 has no journal to resume from "):
        recorded_run(run_dir, "r1")
