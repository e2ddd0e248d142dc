"""orchestrator/gc.py: a dead run's orphans go, a live run is left alone.

Run directories are made by hand here (a journal with its ``run`` record, a lock file); the
agent processes are real, found by their tag as a crashed orchestrator's would be. Whole runs
killed and collected are tested in tests/test_resume.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from orchestrator.gc import GcOutcome, collect_garbage
from orchestrator.locks import RunLock
from orchestrator.process import TAG_VARIABLE, find_tagged
from orchestrator.repo import Repository

from .conftest import MakeRepo

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


def make_run(repo: Path, run_id: str) -> Path:
    """A run directory as an interrupted run leaves it: a journal that never finished."""
    run_dir = repo / ".git" / "orchestrator" / "runs" / run_id
    run_dir.mkdir(parents=True)
    record = {"type": "run", "at": "2026-01-01T00:00:00+00:00", "plan_name": "p"}
    (run_dir / "journal.jsonl").write_text(json.dumps(record) + "\n")
    return run_dir


@pytest.fixture
def agents() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Sleeping processes by tag (``None``: no tag), as *start* makes them; killed after."""
    started: dict[str, subprocess.Popen[bytes]] = {}
    yield started
    for proc in started.values():
        proc.kill()
        proc.wait()


def start(agents: dict[str, subprocess.Popen[bytes]], tag: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
    agents[tag] = subprocess.Popen(SLEEP, env={**env, TAG_VARIABLE: tag})
    return agents[tag]


def wait_for_tag(tag: str) -> None:
    """Until a process carries *tag* (a fresh exec takes a moment)."""
    deadline = time.monotonic() + 30
    while not find_tagged(tag):
        assert time.monotonic() < deadline, f"no process took the tag {tag}"
        time.sleep(0.01)


def gc(repo: Path, *, dry_run: bool = False) -> GcOutcome:
    async def main() -> GcOutcome:
        return await collect_garbage(await Repository.open(repo), dry_run=dry_run)

    return anyio.run(main)


def test_a_dead_runs_agents_and_stale_lock_go(
    make_repo: MakeRepo, agents: dict[str, subprocess.Popen[bytes]]
) -> None:
    repo = make_repo()
    run_dir = make_run(repo, "20260101-000000-dead")
    # The lock file of a holder that died: it names a pid, and nobody holds it.
    (run_dir / "lock").write_text(json.dumps({"pid": 999999, "started_at": "then"}) + "\n")
    orphan = start(agents, "20260101-000000-dead/t1/1")
    other = start(agents, "20260101-000000-other/t1/1")  # no run directory: not gc's to kill
    wait_for_tag("20260101-000000-dead/t1/1")
    wait_for_tag("20260101-000000-other/t1/1")

    dry = gc(repo, dry_run=True)
    assert f"would kill agent process {orphan.pid} (20260101-000000-dead/t1/1)" in dry.done
    assert f"would remove stale lock {run_dir / 'lock'}" in dry.done
    assert orphan.poll() is None and (run_dir / "lock").exists()

    done = gc(repo)
    assert f"killed agent process {orphan.pid} (20260101-000000-dead/t1/1)" in done.done
    assert f"removed stale lock {run_dir / 'lock'}" in done.done
    assert orphan.wait(timeout=30) < 0
    assert other.poll() is None
    assert not (run_dir / "lock").exists()
    assert run_dir.is_dir()  # not older than the limit: the run itself stays


def test_a_live_run_is_left_alone(
    make_repo: MakeRepo, agents: dict[str, subprocess.Popen[bytes]]
) -> None:
    repo = make_repo()
    run_dir = make_run(repo, "20260101-000000-live")
    holder = RunLock(run_dir)
    holder.acquire()  # as the orchestrator working on it does
    try:
        agent = start(agents, "20260101-000000-live/t1/1")
        wait_for_tag("20260101-000000-live/t1/1")
        for dry_run in (True, False):
            outcome = gc(repo, dry_run=dry_run)
            assert "run 20260101-000000-live: live, left alone" in outcome.kept
            assert not any("agent process" in line for line in outcome.done)
        assert agent.poll() is None
        assert (run_dir / "lock").exists() and holder.is_held()
    finally:
        holder.release()


def test_a_run_with_no_lock_file_gets_none(make_repo: MakeRepo) -> None:
    """gc takes the lock of a run it cleans, which makes the file: it goes again, unreported."""
    repo = make_repo()
    run_dir = make_run(repo, "20260101-000000-none")
    done = gc(repo)
    assert not any(line.startswith("removed stale lock") for line in done.done), done.done
    assert not (run_dir / "lock").exists()
    assert not RunLock(run_dir).is_held()
