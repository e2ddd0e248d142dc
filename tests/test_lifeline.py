"""orchestrator/lifeline.py: a run's agents die with the orchestrator, even a SIGKILLed one.

A child process plays the orchestrator: it starts an agent (in a group of its own, carrying
the run's tag) through which come a child left in the agent's group without the tag and one
that escaped the group with setsid but kept the tag. The test then SIGKILLs the
"orchestrator" and looks at who is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
import pytest

from orchestrator.process import TAG_VARIABLE

RUN = "20260101-000000-life"

AGENT = r"""
import subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
in_group = subprocess.Popen(sleep, env={})  # no tag: found by its group alone
escaped = subprocess.Popen(sleep, start_new_session=True)  # the tag, another group
print(in_group.pid, escaped.pid, flush=True)
time.sleep(600)
"""

ORCHESTRATOR = r"""
import os, subprocess, sys
import orchestrator.lifeline
from orchestrator.lifeline import Lifeline
from orchestrator.process import TAG_VARIABLE

run, how, agent_source = sys.argv[1], sys.argv[2], sys.argv[3]
if how == "no psutil":
    orchestrator.lifeline._PSUTIL_HOME = "/nonexistent"
lifeline = Lifeline()
agent = subprocess.Popen(
    [sys.executable, "-c", agent_source],
    env={**os.environ, TAG_VARIABLE: run + "/t/1"},
    start_new_session=True,
    stdout=subprocess.PIPE,
    text=True,
)
in_group, escaped = agent.stdout.readline().split()
lifeline.watch(agent.pid, tag_variable=TAG_VARIABLE, prefix=run + "/")
if how == "unwatched":
    lifeline.unwatch(agent.pid)
watcher = lifeline._watcher.pid
if how == "goodbye":
    lifeline.close()
print(agent.pid, in_group, escaped, watcher, flush=True)
sys.stdin.readline()
"""


@dataclass
class Run:
    """The pids of one pretend run."""

    orchestrator: subprocess.Popen[str]
    agent: int
    in_group: int
    escaped: int
    watcher: int

    def agents(self) -> list[int]:
        return [self.agent, self.in_group, self.escaped]


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie nobody reaped yet has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


@pytest.fixture
def start_run() -> Iterator[Callable[[str], Run]]:
    """Factory: a pretend orchestrator with one agent, watched as *how* says."""
    runs: list[Run] = []

    def start(how: str) -> Run:
        proc = subprocess.Popen(
            [sys.executable, "-c", ORCHESTRATOR, RUN, how, AGENT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 4, pids
        run = Run(proc, *pids)
        runs.append(run)
        return run

    yield start
    for run in runs:
        with run.orchestrator:
            run.orchestrator.kill()
        for pid in run.agents():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def bystanders() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes no lifeline of RUN may kill: another run's agent, and one with no tag."""
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
    started = [
        subprocess.Popen(sleep, env={**env, TAG_VARIABLE: f"{RUN}x/t/1"}),
        subprocess.Popen(sleep, env=env),
    ]
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def die(run: Run) -> None:
    run.orchestrator.send_signal(signal.SIGKILL)
    assert run.orchestrator.wait(timeout=30) == -signal.SIGKILL


def test_the_agents_die_with_the_orchestrator(
    start_run: Callable[[str], Run], bystanders: list[subprocess.Popen[bytes]]
) -> None:
    run = start_run("watched")
    assert all(alive(pid) for pid in run.agents())
    die(run)
    wait_until(lambda: not any(alive(pid) for pid in [*run.agents(), run.watcher]))
    assert all(b.poll() is None for b in bystanders)


def test_a_goodbye_kills_nothing(start_run: Callable[[str], Run]) -> None:
    run = start_run("goodbye")
    wait_until(lambda: not alive(run.watcher))  # the watcher left at once
    die(run)
    assert all(alive(pid) for pid in run.agents())


def test_an_unwatched_group_is_spared_but_tagged_processes_are_not(
    start_run: Callable[[str], Run],
) -> None:
    run = start_run("unwatched")
    die(run)
    wait_until(lambda: not alive(run.agent) and not alive(run.escaped))
    wait_until(lambda: not alive(run.watcher))
    assert alive(run.in_group)  # no tag, and its group was no longer watched


def test_without_psutil_the_watcher_still_kills_the_groups(
    start_run: Callable[[str], Run],
) -> None:
    run = start_run("no psutil")
    die(run)
    wait_until(lambda: not alive(run.agent) and not alive(run.in_group))
    wait_until(lambda: not alive(run.watcher))
    assert alive(run.escaped)  # found by its tag only, which takes psutil
