"""orchestrator/locks.py: the repository lock, the run lock and the pool's slot mutexes.

Holders are real processes: a child takes a lock, says so, and waits for a line on stdin (or
is SIGKILLed, as a crashed orchestrator would be).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import psutil
import pytest

from orchestrator import locks
from orchestrator.errors import RunDirError, RunInUse
from orchestrator.locks import (
    LockFileGone,
    RepoLock,
    RunLock,
    is_locked,
    try_flock,
    try_lock,
)
from orchestrator.pool import Slots

HOLDER = r"""
import subprocess, sys
from pathlib import Path

import anyio

kind, where = sys.argv[1], Path(sys.argv[2])


def wait() -> None:
    print("held", flush=True)
    sys.stdin.readline()


if kind == "repo":
    from orchestrator.locks import RepoLock

    async def main() -> None:
        async with RepoLock(where).hold():
            wait()

    anyio.run(main)
elif kind == "run":
    from orchestrator.locks import RunLock

    RunLock(where).acquire()
    wait()
elif kind == "slot":
    from orchestrator.pool import Slots

    slot = Slots(where, 1).take_free()
    assert slot is not None
    # The slot's agent, left running when this holder dies.
    agent = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], cwd=slot, start_new_session=True
    )
    print(agent.pid, flush=True)
    wait()
"""


@dataclass
class Held:
    """A child process holding a lock; for a pool slot, the pid of the agent it started there."""

    proc: subprocess.Popen[str]
    agent: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


Holder = Callable[[str, Path], Held]


@pytest.fixture
def holder() -> Iterator[Holder]:
    """Factory: a child process holding the lock of *kind* at *where*, once it says so."""
    started: list[subprocess.Popen[str]] = []
    agents: list[int] = []

    def start(kind: str, where: Path) -> Held:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, kind, str(where)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2 if kind == "slot" else 1)]
        assert lines[-1] == "held\n", lines
        held = Held(proc, int(lines[0]) if kind == "slot" else None)
        if held.agent is not None:
            agents.append(held.agent)
        return held

    yield start
    for proc in started:
        with proc:  # closes its pipes, and waits
            proc.kill()
    for pid in agents:  # a slot holder's agent, in a session of its own: not left behind
        with contextlib.suppress(psutil.Error):
            agent = psutil.Process(pid)
            if "time.sleep(600)" in " ".join(agent.cmdline()):  # still it, not a pid reused
                agent.kill()


def let_go(held: Held) -> None:
    """Tell a holder to let go, and wait until it has."""
    proc = held.proc
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=30) == 0


def die(held: Held) -> None:
    """SIGKILL a holder: it lets go of nothing itself."""
    proc = held.proc
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def gone(pid: int) -> bool:
    """Whether *pid* has ended (a zombie nobody reaped yet counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


def test_the_repository_lock_waits_for_another_process(tmp_path: Path, holder: Holder) -> None:
    path = tmp_path / "metadata.mutex"
    other = holder("repo", path)
    lock = RepoLock(path)
    entered = anyio.Event()

    async def take() -> None:
        async with lock.hold():
            entered.set()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await anyio.sleep(0.2)  # many polls
            assert not entered.is_set()
            await anyio.to_thread.run_sync(let_go, other)
            with anyio.fail_after(30):
                await entered.wait()

    anyio.run(main)
    assert lock.acquisitions == 1
    lock.close()
    assert path.exists()  # the repository's lock file stays


def test_two_repository_locks_in_one_process_take_turns(tmp_path: Path) -> None:
    path = tmp_path / "metadata.mutex"
    first, second = RepoLock(path), RepoLock(path)
    order: list[str] = []

    async def hold(lock: RepoLock, name: str, until: anyio.Event | None) -> None:
        async with lock.hold():
            order.append(f"{name} in")
            if until is not None:
                await until.wait()
            order.append(f"{name} out")

    async def main() -> None:
        go = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, first, "first", go)
            await anyio.sleep(0.05)
            tg.start_soon(hold, second, "second", None)
            await anyio.sleep(0.2)
            assert order == ["first in"]
            go.set()

    anyio.run(main)
    assert order == ["first in", "first out", "second in", "second out"]
    first.close()
    second.close()


def test_one_repository_lock_serialises_its_own_tasks(tmp_path: Path) -> None:
    lock = RepoLock(tmp_path / "metadata.mutex")
    inside = most = 0

    async def step() -> None:
        nonlocal inside, most
        async with lock.hold():
            inside += 1
            most = max(most, inside)
            await anyio.sleep(0.001)
            inside -= 1

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(step)

    anyio.run(main)
    assert most == 1
    assert lock.acquisitions == 20
    lock.close()


def test_a_cancelled_waiter_leaves_the_repository_lock_free(tmp_path: Path) -> None:
    path = tmp_path / "metadata.mutex"
    first, second = RepoLock(path), RepoLock(path)

    async def main() -> None:
        go = anyio.Event()

        async def hold_first() -> None:
            async with first.hold():
                await go.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_first)
            await anyio.sleep(0.05)
            with anyio.move_on_after(0.1) as scope:
                async with second.hold():
                    pytest.fail("the second lock was taken while the first held it")
            assert scope.cancelled_caught
            go.set()

    anyio.run(main)
    assert second.acquisitions == 0
    probe = os.open(path, os.O_RDONLY)
    try:
        assert try_flock(probe)  # nobody holds it: the cancelled waiter never got it
    finally:
        os.close(probe)
    first.close()
    second.close()


@pytest.mark.parametrize("kind", ["repo", "run", "slot"])
def test_a_dead_holders_lock_is_free(kind: str, tmp_path: Path, holder: Holder) -> None:
    root = tmp_path / "pool"
    (root / "slot").mkdir(parents=True)
    where = {"repo": tmp_path / "metadata.mutex", "run": tmp_path, "slot": root}[kind]
    path = {"repo": where, "run": tmp_path / "lock", "slot": root / "slot.mutex"}[kind]
    dead = holder(kind, where)
    assert is_locked(path)
    assert try_lock(path) is None
    die(dead)
    assert not is_locked(path)
    fd = try_lock(path)
    assert fd is not None
    os.close(fd)


def test_the_run_lock_is_taken_over_from_a_dead_holder(tmp_path: Path, holder: Holder) -> None:
    dead = holder("run", tmp_path)
    lock = RunLock(tmp_path)
    assert lock.is_held()
    die(dead)
    assert not lock.is_held()
    stale = lock.owner()
    assert stale is not None and stale["pid"] == dead.pid  # the file still names it
    lock.acquire()
    owner = lock.owner()
    assert owner is not None and owner["pid"] == os.getpid()
    lock.release()


def test_run_in_use_names_the_live_holder(tmp_path: Path, holder: Holder) -> None:
    live = holder("run", tmp_path)
    lock = RunLock(tmp_path)
    with pytest.raises(RunInUse, match=f"is in use by pid {live.pid}, running since "):
        lock.acquire()
    assert lock.is_held()
    let_go(live)
    lock.acquire()
    lock.remove()
    assert not (tmp_path / "lock").exists()
    assert not lock.is_held()


def test_the_run_lock_file_names_its_holder(tmp_path: Path) -> None:
    lock = RunLock(tmp_path)
    lock.acquire()
    record = json.loads((tmp_path / "lock").read_text())
    me = psutil.Process()
    assert record["pid"] == me.pid
    assert record["process_start"] == me.create_time()  # with the pid: this very process
    assert record["started_at"]
    # A second lock object of this same process is a second holder: refused.
    with pytest.raises(RunInUse, match=f"pid {me.pid}"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert (tmp_path / "lock").exists()  # released, not removed: stale until taken or gc'd
    assert not lock.is_held()


def test_a_lock_file_removed_while_being_locked_is_no_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc removes a lock file while holding it: a lock taken on the removed file never counts."""
    path = tmp_path / "lock"
    real = locks.try_flock
    removals = 1

    def removed_first(fd: int, *, shared: bool = False) -> bool:
        nonlocal removals
        if removals:
            removals -= 1
            path.unlink()  # as if its holder removed it between our open and our flock
        return real(fd, shared=shared)

    monkeypatch.setattr(locks, "try_flock", removed_first)
    with pytest.raises(LockFileGone):
        try_lock(path)
    assert not path.exists()

    removals = 1
    lock = RunLock(tmp_path)
    lock.acquire()  # tries again, on the file now at the path
    assert lock._fd is not None
    assert os.path.samestat(os.fstat(lock._fd), os.stat(path))
    lock.release()


def test_a_lock_that_cannot_be_opened(tmp_path: Path) -> None:
    missing = tmp_path / "no such directory"
    assert not is_locked(missing / "lock")
    with pytest.raises(FileNotFoundError):
        try_lock(missing / "lock")
    with pytest.raises(RunDirError, match="cannot open"):
        RunLock(missing).acquire()


def test_pool_slots_are_lent_to_one_holder_at_a_time(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    (root / "a").mkdir(parents=True)
    first, second = Slots(root, 2), Slots(root, 2)
    assert first.take_free() == root / "a"
    assert second.take_free() is None
    made = second.reserve()  # a new slot: room for one more
    assert made is not None and made != root / "a"
    made.mkdir()
    second.made(made)
    assert first.reserve() is None  # the pool is full
    first.release(root / "a")
    assert second.take_free() == root / "a"
    second.close()
    assert not is_locked(root / "a.mutex") and not is_locked(made.with_name(made.name + ".mutex"))


def test_a_dead_holders_slot_is_lent_after_its_agents_are_killed(
    tmp_path: Path, holder: Holder
) -> None:
    root = tmp_path / "pool"
    slot = root / "slot"
    slot.mkdir(parents=True)
    beside = root / "slotx"  # a slot whose path starts like the first one's
    beside.mkdir()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], cwd=beside)
    try:
        dead = holder("slot", root)  # takes "slot", the first free one
        agent = dead.agent
        assert agent is not None
        slots = Slots(root, 2)
        assert slots.take_free() == beside  # never lent before: nothing killed there
        assert slots.take_free() is None
        die(dead)
        assert not gone(agent)  # the holder's death spared its agent
        assert slots.take_free() == slot
        wait_until(lambda: gone(agent))
        assert bystander.poll() is None
        slots.close()
        assert (root / "slot.mutex").read_bytes() == b""  # given back properly
    finally:
        bystander.kill()
        bystander.wait()
