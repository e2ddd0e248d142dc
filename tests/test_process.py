"""run_command: real processes, logs straight to files, and no process left behind.

Every test runs under asyncio and under trio. Nothing here asserts on seconds: a timeout only
decides *which* end a command meets, and the tests check that end and what survives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import orchestrator
from orchestrator.process import TAG_VARIABLE, ProcessOutcome, run_command

from .conftest import live_processes_with

PYTHON = sys.executable

# A process of the task that ignores SIGTERM, optionally after leaving the process group.
# It writes its pid and process group to READY (atomically) once it is ignoring SIGTERM.
CHILD = """
import os, signal, sys, time
ready, how = sys.argv[1], sys.argv[2]
if "setsid" in how:
    os.setsid()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(ready + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {os.getpgid(0)}")
os.replace(ready + ".tmp", ready)
time.sleep(120)
"""

# The command itself: starts CHILD, waits until it is ready, then exits or sleeps.
LEADER = """
import os, signal, subprocess, sys, time
child, ready, how, marker = sys.argv[1:5]
if "leader-ignores-term" in how:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, child, ready, how, marker])
while not os.path.exists(ready):
    time.sleep(0.01)
if "leader-exits" in how:
    sys.exit(0)
time.sleep(120)
"""

# Runs one call in a fresh interpreter and reports its peak RSS before and after.
MEASURE_RSS = """
import json, os, resource, sys
from pathlib import Path

import anyio

from orchestrator.process import run_command

WRITER = (
    "import sys\\n"
    "chunk = b'x' * (1 << 20)\\n"
    "for _ in range(50):\\n"
    "    sys.stdout.buffer.write(chunk)\\n"
    "    sys.stderr.buffer.write(chunk)\\n"
)


async def main() -> None:
    backend, out, err, tag = sys.argv[1:5]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = await run_command(
        [sys.executable, "-c", WRITER],
        cwd=Path.cwd(),
        env=dict(os.environ),
        stdout=Path(out),
        stderr=Path(err),
        timeout=120,
        tag=tag,
        kill_grace=2.0,
    )
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kb": before, "after_kb": after, "exit_code": outcome.exit_code}))


anyio.run(main, backend=sys.argv[1])
"""


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    """The async backend a test's run_command call runs under."""
    return str(request.param)


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique string carried by every process a test starts; survivors are killed after it."""
    marker = f"orch-test-{uuid.uuid4().hex}"
    yield marker
    for pid in live_processes_with(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run(
    backend: str,
    argv: list[str],
    tmp_path: Path,
    *,
    tag: str,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    kill_grace: float = 0.2,
) -> ProcessOutcome:
    """Run *argv* with run_command under *backend*; logs go to tmp_path/out.log and err.log."""

    async def main() -> ProcessOutcome:
        return await run_command(
            argv,
            cwd=tmp_path,
            env=dict(os.environ) if env is None else env,
            stdout=tmp_path / "out.log",
            stderr=tmp_path / "err.log",
            timeout=timeout,
            tag=tag,
            kill_grace=kill_grace,
        )

    return anyio.run(main, backend=backend)


def survivors(marker: str) -> list[int]:
    """Live processes carrying *marker*, after giving pending SIGKILLs time to land."""
    deadline = time.monotonic() + 2
    found = live_processes_with(marker)
    while found and time.monotonic() < deadline:
        time.sleep(0.02)
        found = live_processes_with(marker)
    return found


def scripts(tmp_path: Path) -> tuple[Path, Path]:
    """Write LEADER and CHILD to *tmp_path*."""
    leader, child = tmp_path / "leader.py", tmp_path / "child.py"
    leader.write_text(LEADER)
    child.write_text(CHILD)
    return leader, child


@pytest.mark.parametrize(
    ("code", "exit_code", "sig"),
    [
        ("pass", 0, None),
        ("raise SystemExit(3)", 3, None),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", None, signal.SIGKILL),
    ],
    ids=["exit-0", "exit-3", "killed-by-signal"],
)
def test_exit_status_is_captured(
    backend: str,
    tmp_path: Path,
    marker: str,
    code: str,
    exit_code: int | None,
    sig: int | None,
) -> None:
    outcome = run(backend, [PYTHON, "-c", code], tmp_path, tag=marker)
    assert outcome.exit_code == exit_code
    assert outcome.signal == sig
    assert not outcome.timed_out
    assert not outcome.cancelled


def test_stdout_and_stderr_are_the_given_files(backend: str, tmp_path: Path, marker: str) -> None:
    code = (
        "import os, sys\n"
        "print('to stdout', os.readlink('/proc/self/fd/1'))\n"
        "print('to stderr', os.readlink('/proc/self/fd/2'), file=sys.stderr)\n"
    )
    (tmp_path / "out.log").write_text("stale content from an earlier attempt\n" * 100)
    outcome = run(backend, [PYTHON, "-c", code], tmp_path, tag=marker)
    assert outcome.exit_code == 0
    # The child's descriptors 1 and 2 are the log files themselves, not pipes to the orchestrator.
    out_log, err_log = tmp_path / "out.log", tmp_path / "err.log"
    assert out_log.read_text() == f"to stdout {out_log}\n"
    assert err_log.read_text() == f"to stderr {err_log}\n"


def test_50_mb_of_output_goes_to_disk_not_memory(backend: str, tmp_path: Path, marker: str) -> None:
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    package_root = Path(orchestrator.__path__[0]).parent
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    # ru_maxrss is a high-water mark for the whole process, so measure in a fresh interpreter.
    measured = subprocess.run(
        [PYTHON, "-c", MEASURE_RSS, backend, str(out), str(err), marker],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(measured.stdout)
    assert report["exit_code"] == 0
    assert out.stat().st_size == 50 * 1024 * 1024
    assert err.stat().st_size == 50 * 1024 * 1024
    grown_kb = report["after_kb"] - report["before_kb"]
    assert grown_kb < 10 * 1024, f"peak RSS grew by {grown_kb} KiB while 100 MiB were logged"


@pytest.mark.parametrize("how", ["child-ignores-term", "leader-ignores-term"])
def test_timeout_kills_the_whole_group(backend: str, tmp_path: Path, marker: str, how: str) -> None:
    leader, child = scripts(tmp_path)
    ready = tmp_path / "ready"
    outcome = run(
        backend,
        [PYTHON, str(leader), str(child), str(ready), how, marker],
        tmp_path,
        tag=marker,
        timeout=1.0,
    )
    assert ready.exists(), "the child never started, so the test proved nothing"
    assert outcome.timed_out
    assert not outcome.cancelled
    assert outcome.exit_code is None
    # A leader that ignores SIGTERM outlives the grace period and meets SIGKILL.
    expected = signal.SIGKILL if how == "leader-ignores-term" else signal.SIGTERM
    assert outcome.signal == expected
    assert outcome.cpu_user_s is not None
    assert survivors(marker) == []


@pytest.mark.parametrize("how", ["setsid,leader-exits", "setsid"])
def test_a_child_that_leaves_the_group_is_killed_too(
    backend: str, tmp_path: Path, marker: str, how: str
) -> None:
    leader, child = scripts(tmp_path)
    ready = tmp_path / "ready"
    outcome = run(
        backend,
        [PYTHON, str(leader), str(child), str(ready), how, marker],
        tmp_path,
        tag=marker,
        timeout=1.0,
    )
    child_pid, child_pgid = map(int, ready.read_text().split())
    assert child_pgid == child_pid, "the child did not leave the command's process group"
    if "leader-exits" in how:
        assert outcome.exit_code == 0
        assert not outcome.timed_out
    else:
        assert outcome.timed_out
    assert survivors(marker) == []


@pytest.mark.parametrize(
    "how",
    [
        "leader-ignores-term,child-ignores-term",
        "leader-ignores-term,setsid",
    ],
)
def test_cancelling_the_caller_kills_the_group_and_propagates(
    backend: str, tmp_path: Path, marker: str, how: str
) -> None:
    leader, child = scripts(tmp_path)
    ready = tmp_path / "ready"
    seen: list[str] = []

    async def call() -> None:
        try:
            await run_command(
                [PYTHON, str(leader), str(child), str(ready), how, marker],
                cwd=tmp_path,
                env=dict(os.environ),
                stdout=tmp_path / "out.log",
                stderr=tmp_path / "err.log",
                timeout=60,
                tag=marker,
                kill_grace=0.2,
            )
        except anyio.get_cancelled_exc_class():
            seen.append("cancelled")
            raise
        seen.append("returned")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            # A guard against hanging forever, not a measurement.
            with anyio.fail_after(30):
                while not ready.exists():  # noqa: ASYNC110 (polling a file another process writes)
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    anyio.run(main, backend=backend)
    assert seen == ["cancelled"]
    assert survivors(marker) == []


@pytest.mark.parametrize(
    "program", ["/nonexistent/no-such-program", "no-such-program-on-path-xyz", "not-executable"]
)
def test_a_program_that_cannot_start_raises_oserror(
    backend: str, tmp_path: Path, marker: str, program: str
) -> None:
    if program == "not-executable":
        script = tmp_path / "plain.txt"
        script.write_text("#!/bin/sh\necho hi\n")
        program = str(script)
    with pytest.raises(OSError):
        run(backend, [program], tmp_path, tag=marker)


def test_metrics_are_populated_for_a_normal_exit(backend: str, tmp_path: Path, marker: str) -> None:
    code = (
        "import time\n"
        "data = b'x' * (32 << 20)\n"
        "start = time.process_time()\n"
        "while time.process_time() - start < 0.05:\n"
        "    pass\n"
    )
    outcome = run(backend, [PYTHON, "-c", code], tmp_path, tag=marker)
    assert outcome.exit_code == 0
    assert outcome.cpu_user_s is not None and outcome.cpu_system_s is not None
    assert outcome.cpu_user_s + outcome.cpu_system_s > 0
    assert outcome.max_rss_kb is not None and outcome.max_rss_kb >= 32 * 1024


def test_the_child_gets_exactly_the_given_env_plus_the_tag(
    backend: str, tmp_path: Path, marker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCH_TEST_NOT_PASSED", "1")
    code = "import json, os\nprint(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))\n"
    env = {"PATH": os.environ["PATH"], "FOO": "bar"}
    outcome = run(backend, [PYTHON, "-c", code], tmp_path, tag=marker, env=env)
    assert outcome.exit_code == 0
    seen = json.loads((tmp_path / "out.log").read_text())
    assert seen["env"][TAG_VARIABLE] == marker
    assert seen["env"]["FOO"] == "bar"
    assert "ORCH_TEST_NOT_PASSED" not in seen["env"]
    assert Path(seen["cwd"]) == tmp_path


@pytest.fixture
def stdin_never_closes() -> Iterator[None]:
    """Make this process's fd 0 a pipe nobody writes to, so an inherited stdin would block."""
    read_end, write_end = os.pipe()
    saved = os.dup(0)
    os.dup2(read_end, 0)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read_end, write_end):
            os.close(fd)


@pytest.mark.usefixtures("stdin_never_closes")
def test_stdin_is_closed(backend: str, tmp_path: Path, marker: str) -> None:
    code = "import sys\nprint(len(sys.stdin.buffer.read()))\n"
    outcome = run(backend, [PYTHON, "-c", code], tmp_path, tag=marker, timeout=1.0)
    assert not outcome.timed_out, "reading stdin blocked: the child inherited the caller's stdin"
    assert outcome.exit_code == 0
    assert (tmp_path / "out.log").read_text() == "0\n"


def test_an_agent_that_goes_quiet_is_stopped_as_stalled(tmp_path: Path) -> None:
    """It prints once, then sleeps: after stall_timeout seconds without output it is killed,
    and nothing of it is left running."""
    from envelopes import build_envelope
    from orchestrator import orchestrate_parallel

    marker = f"stall-{uuid.uuid4().hex}"
    script = tmp_path / "quiet.py"
    script.write_text("import sys, time\nprint('working', flush=True)\ntime.sleep(120)\n")
    envelope = build_envelope(
        "quiet", "x", task_id="q", worktree=False, venv=False, timeout=120, stall_timeout=0.5
    )
    report = anyio.run(
        lambda: orchestrate_parallel(
            [envelope],
            agents={"quiet": [sys.executable, str(script), marker]},
            state_dir=tmp_path / "state",
        )
    )
    [result] = report.results
    assert result.status == "failed" and result.error is not None
    assert result.error.kind == "stalled"
    assert result.error.message == "no output for 0.5 s: the agent was stopped"
    assert live_processes_with(marker) == []
    stdout = Path(report.run_dir) / "logs" / "q.attempt-1.stdout"
    assert stdout.read_text() == "working\n"


def test_output_keeps_a_chatty_agent_alive_past_its_stall_timeout(tmp_path: Path) -> None:
    from envelopes import build_envelope
    from orchestrator import orchestrate_parallel

    script = tmp_path / "chatty.py"
    script.write_text(
        "import json, os, sys, time\n"
        "for i in range(8):\n"
        "    print(i, flush=True); time.sleep(0.2)\n"
        "json.dump({'done': True}, open(os.environ['ORCHESTRATOR_OUTPUT'], 'w'))\n"
    )
    envelope = build_envelope(
        "chatty", "x", task_id="c", worktree=False, venv=False, stall_timeout=0.8
    )
    report = anyio.run(
        lambda: orchestrate_parallel(
            [envelope],
            agents={"chatty": [sys.executable, str(script)]},
            state_dir=tmp_path / "state",
        )
    )
    assert report.results[0].status == "succeeded", report.errors


def test_the_command_lines_loop_reaps_its_children_without_a_thread_each() -> None:
    """On Python 3.11, asyncio's default watcher starts (and joins) a thread per child
    process; inside ``reaping_by_pidfd`` the children of a loop are reaped through pidfds,
    their exit statuses are the same, and the watcher before is put back after."""
    import asyncio
    import threading
    import warnings

    from orchestrator.process import reaping_by_pidfd

    started: list[str] = []
    real_start = threading.Thread.start

    def counting_start(thread: threading.Thread) -> None:
        started.append(thread.name)
        real_start(thread)

    async def children() -> list[int]:
        codes = []
        for code in (0, 3, 0, 7):
            done = await anyio.run_process(
                [sys.executable, "-c", f"raise SystemExit({code})"], check=False
            )
            codes.append(done.returncode)
        return codes

    def watcher() -> object:
        with warnings.catch_warnings():  # 3.12 deprecates the child watchers
            warnings.simplefilter("ignore", DeprecationWarning)
            return asyncio.get_event_loop_policy().get_child_watcher()

    from orchestrator import process

    pidfds = sys.version_info < (3, 12) and process._pidfd_works()
    before = watcher() if sys.version_info < (3, 12) else None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(threading.Thread, "start", counting_start)
        with reaping_by_pidfd() as used:
            assert used is pidfds
            assert anyio.run(children) == [0, 3, 0, 7]
        without = anyio.run(children)
    assert without == [0, 3, 0, 7]
    if pidfds:
        # Four children inside, none of them a thread; four outside, a thread each.
        assert len([n for n in started if "waitpid" in n]) == 4
        assert watcher() is before


def test_reaping_by_pidfd_changes_nothing_where_its_watcher_would_not_work() -> None:
    """3.11's PidfdChildWatcher serves only a main-thread loop made by asyncio.run: in a
    thread of its own, inside a running loop, or under another policy, the block yields False
    and child processes are awaited as before."""
    import asyncio
    import threading

    from orchestrator.process import reaping_by_pidfd

    async def child() -> int:
        done = await anyio.run_process([sys.executable, "-c", "raise SystemExit(5)"], check=False)
        return done.returncode

    seen: list[object] = []

    def in_a_thread() -> None:
        with reaping_by_pidfd() as used:
            seen.append((used, anyio.run(child)))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [(False, 5)]

    async def inside_a_loop() -> tuple[bool, int]:
        with reaping_by_pidfd() as used:
            return used, await child()

    assert anyio.run(inside_a_loop) == (False, 5)

    class OtherPolicy(asyncio.AbstractEventLoopPolicy):
        """Not asyncio's default (as uvloop's is not): it has no child watchers."""

        def __init__(self) -> None:
            self.default = asyncio.DefaultEventLoopPolicy()

        def get_event_loop(self) -> asyncio.AbstractEventLoop:
            return self.default.get_event_loop()

        def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
            self.default.set_event_loop(loop)

        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return self.default.new_event_loop()

    before = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(OtherPolicy())
    try:
        with reaping_by_pidfd() as used:
            assert used is False
    finally:
        asyncio.set_event_loop_policy(before)
