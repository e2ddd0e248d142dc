"""Running an agent's command: its own session, logs straight to files, a hard end.

The command's stdout and stderr are files in the run directory, handed to the child as its
file descriptors: the orchestrator never holds the output in memory, whatever the agent prints.

A command ends one of three ways: it exits; its timeout passes; the caller is cancelled. In
the last two the whole process group gets SIGTERM, then SIGKILL after ``kill_grace`` seconds.
After every end, any process that still carries the attempt's tag in its environment (a child
that called setsid to escape the group, say) is killed too, so no process of a task survives.

A command that speaks a protocol on its standard streams (an ACP agent) is run with a
``talk`` function: its stdin and stdout are then pipes (:mod:`orchestrator.pipes`; what it
writes is still copied to the stdout log) and ``talk(pipes)`` converses with it while it
runs. When *talk* returns, the command's stdin is closed and it has ``kill_grace`` seconds to
exit before it is terminated; when the command exits first, *talk* has as long to read what
it left. The timeout and a cancellation cancel *talk*, which may end its side of the
conversation (shielded) before the process group is terminated.

Resource limits (``rlimits``) are set before the command's program starts: by util-linux's
``prlimit``, which sets them and execs the program (a fraction of a millisecond, outside the
event loop), or, where it is not installed, by a ``preexec_fn``, which costs a real fork
instead of vfork, about 3 ms in the loop. A ``lifeline`` is told of the command's process
group while it runs, so that it is killed if the orchestrator dies (orchestrator/lifeline.py).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
import psutil

from .lifeline import Lifeline
from .pipes import Pipes, open_pipes

__all__ = [
    "TAG_VARIABLE",
    "ProcessOutcome",
    "find_tagged",
    "kill_processes",
    "kill_tagged",
    "reaping_by_pidfd",
    "run_command",
]

#: Environment variable that marks every process of one attempt.
TAG_VARIABLE = "ORCHESTRATOR_ATTEMPT_TAG"


@dataclass(frozen=True)
class ProcessOutcome:
    """How a command ended."""

    exit_code: int | None
    timed_out: bool
    cancelled: bool
    signal: int | None
    duration_s: float
    cpu_user_s: float | None
    cpu_system_s: float | None
    max_rss_kb: int | None
    #: Killed for writing nothing to either log for ``stall_timeout`` seconds.
    stalled: bool = False


async def _wait_or_stall(
    pid: int, progress: Callable[[], int], stall_timeout: float | None
) -> tuple[int, resource.struct_rusage | None] | None:
    """Wait for *pid* to exit; None if *progress* (bytes it wrote so far) stood still for
    *stall_timeout* seconds."""
    if stall_timeout is None:
        return await _wait_exit(pid)
    ended: tuple[int, resource.struct_rusage | None] | None = None
    async with anyio.create_task_group() as tg:

        async def wait() -> None:
            nonlocal ended
            ended = await _wait_exit(pid)
            tg.cancel_scope.cancel()

        tg.start_soon(wait)
        size, changed = -1, time.monotonic()
        while True:
            await anyio.sleep(min(1.0, stall_timeout / 4))
            now, grown = time.monotonic(), progress()
            if grown != size:
                size, changed = grown, now
            elif now - changed >= stall_timeout:
                tg.cancel_scope.cancel()
                break
    return ended


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


async def _wait_exit(pid: int) -> tuple[int, resource.struct_rusage | None]:
    """Wait for *pid* to exit without a thread: a pidfd where the kernel has them, else polling."""
    fd: int | None
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            await anyio.wait_readable(fd)
        finally:
            os.close(fd)
    delay = 0.001
    while True:
        try:
            waited, status, usage = os.wait4(pid, os.WNOHANG)  # noqa: ASYNC222 (never blocks)
        except ChildProcessError:
            return -1, None
        if waited:
            return status, usage
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.05)


@contextlib.contextmanager
def reaping_by_pidfd() -> Iterator[bool]:
    """While in the block, asyncio (on Python 3.11) learns that a child process it started
    ended through a pidfd, not a thread started for each process and joined after; yields
    whether it does.

    Python 3.11's asyncio watches each child with a thread of its own (``ThreadedChildWatcher``):
    a loop that only starts 200 git processes spends about a third of its time on those
    threads here, a 16-task run about 7%. 3.12 watches them with pidfds already, and trio
    never used threads. The watcher is the process's, and 3.11's ``PidfdChildWatcher`` serves
    only a loop made by ``asyncio.run`` or ``anyio.run`` (no ``loop_factory``) in the main
    thread: so the block is for the main thread, around such a call, outside any running
    loop. Elsewhere (another thread, inside a running loop, another event loop policy such as
    uvloop's, 3.12 and later, a kernel without pidfds) it changes nothing and yields False.
    The command line uses it around the event loop it owns. After the block the watcher
    before it is put back (3.11 closes it when it is replaced: the default one, as any
    ``ThreadedChildWatcher``, works on after that).
    """
    import asyncio
    import threading

    try:
        asyncio.get_running_loop()
        running = True
    except RuntimeError:
        running = False
    policy = asyncio.get_event_loop_policy()
    if (
        sys.version_info >= (3, 12)
        or running
        or threading.current_thread() is not threading.main_thread()
        or not isinstance(policy, asyncio.DefaultEventLoopPolicy)
        or not _pidfd_works()
    ):
        yield False
        return
    before = policy.get_child_watcher()
    policy.set_child_watcher(asyncio.PidfdChildWatcher())
    try:
        yield True
    finally:
        policy.set_child_watcher(before)


def _pidfd_works() -> bool:
    """Whether this kernel (and its seccomp filter) gives a pidfd for a process."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_processes(matches: Callable[[psutil.Process], bool]) -> int:
    """SIGKILL every process but this one for which *matches* is true; how many were signalled.

    Sweeps until a pass matches none (a process may fork while a pass runs, and one just
    signalled may not have died yet), at most 5 passes. A process that is gone by the time
    it is looked at, a zombie, and one that may not be read or signalled (another user's)
    are passed over, whatever *matches* was about to ask of it (psutil's errors).
    """
    me = os.getpid()
    killed: set[int] = set()
    for _ in range(5):
        matched = 0
        for process in psutil.process_iter():
            if process.pid == me:
                continue
            try:
                if not matches(process):
                    continue
                matched += 1
                # psutil checks first that the pid still names the process that matched.
                process.kill()
                killed.add(process.pid)
            except psutil.Error:
                continue
        if not matched:
            break
    return len(killed)


def _tag_of(process: psutil.Process) -> str | None:
    """*process*'s ``TAG_VARIABLE``; psutil.Error when it is gone or may not be read."""
    return process.environ().get(TAG_VARIABLE)


_TAG_ENTRY = f"{TAG_VARIABLE}=".encode()


@functools.cache
def _proc_scan() -> bool:
    """Whether processes can be found by reading ``/proc`` and signalled through pidfds
    (Linux 5.3 and later): a pass over a machine's processes then costs a read of each one's
    ``environ`` (1 to 2 ms for a hundred), not psutil's 12 ms, after every attempt."""
    if not hasattr(os, "pidfd_open") or not os.path.isdir("/proc"):
        return False
    try:
        pidfd = os.pidfd_open(os.getpid())
    except OSError:
        return False
    try:
        signal.pidfd_send_signal(pidfd, 0)  # allowed too (a seccomp profile may not)
    except OSError:
        return False
    finally:
        os.close(pidfd)
    return True


#: Most of a process's environment read for its tag. An environment is at most a few MiB
#: as exec makes it, but a process can point the kernel at a larger region of its own
#: memory (prctl PR_SET_MM_MAP): past this, the rest is not read.
MAX_ENVIRON_BYTES = 16 << 20


def _proc_tags(pid: int) -> list[str]:
    """The values of ``TAG_VARIABLE`` in the environment of *pid* (``/proc/<pid>/environ``,
    its first :data:`MAX_ENVIRON_BYTES`); none when it cannot be read (gone, a zombie,
    another user's)."""
    try:
        fd = os.open(f"/proc/{pid}/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    chunks, size = [], 0
    try:
        while size < MAX_ENVIRON_BYTES and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        return []
    finally:
        os.close(fd)
    data = b"".join(chunks)
    values, at = [], data.find(_TAG_ENTRY)
    while at >= 0:
        if at == 0 or data[at - 1] == 0:  # an entry of its own, not inside another's value
            end = data.find(b"\0", at)
            value = data[at + len(_TAG_ENTRY) : end if end >= 0 else len(data)]
            values.append(value.decode("utf-8", "surrogateescape"))
        at = data.find(_TAG_ENTRY, at + 1)
    return values


def _scan_tagged(wanted: Callable[[str], bool]) -> list[tuple[int, str]]:
    """(pid, tag) of every process but this one with a tag that is *wanted*, from ``/proc``."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            tag = next((t for t in _proc_tags(int(name)) if wanted(t)), None)
            if tag is not None:
                found.append((int(name), tag))
    return found


def _kill_if_tagged(pid: int, wanted: Callable[[str], bool]) -> bool:
    """SIGKILL *pid* if it carries a wanted tag, read again through a pidfd taken first: a
    pid reused since the scan names another process, which is signalled only if it carries
    the tag too (the pidfd stays with the process it was opened on)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not any(wanted(t) for t in _proc_tags(pid)):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def kill_tagged(tag: str, *, prefix: bool = False) -> int:
    """SIGKILL every process whose environment carries ``TAG_VARIABLE=tag``.

    With *prefix*, every process whose tag starts with *tag* (``<run_id>/``: a whole run's).
    Sweeps until a pass finds none, at most 5 passes (:func:`kill_processes`). Returns how
    many were signalled. Processes of other users are skipped.
    """

    def wanted(found: str) -> bool:
        return found.startswith(tag) if prefix else found == tag

    if not _proc_scan():
        return kill_processes(lambda process: (t := _tag_of(process)) is not None and wanted(t))
    killed: set[int] = set()
    for _ in range(5):
        matched = _scan_tagged(wanted)
        killed.update(pid for pid, _ in matched if _kill_if_tagged(pid, wanted))
        if not matched:
            break
    return len(killed)


def find_tagged(prefix: str) -> list[tuple[int, str]]:
    """Processes whose ``TAG_VARIABLE`` starts with *prefix*: (pid, tag) pairs."""
    if _proc_scan():
        return _scan_tagged(lambda tag: tag.startswith(prefix))
    me = os.getpid()
    found: list[tuple[int, str]] = []
    for process in psutil.process_iter():
        if process.pid == me:
            continue
        try:
            tag = _tag_of(process)
        except psutil.Error:  # gone meanwhile, a zombie, or another user's
            continue
        if tag is not None and tag.startswith(prefix):
            found.append((process.pid, tag))
    return found


_PRLIMIT_OPTIONS = {
    resource.RLIMIT_AS: "as",
    resource.RLIMIT_CPU: "cpu",
    resource.RLIMIT_NOFILE: "nofile",
    resource.RLIMIT_FSIZE: "fsize",
    resource.RLIMIT_NPROC: "nproc",
    resource.RLIMIT_CORE: "core",
}


@functools.cache
def _prlimit() -> str | None:
    return shutil.which("prlimit")


def _with_limits(
    argv: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    rlimits: Sequence[tuple[int, int, int]],
) -> tuple[list[str], Callable[[], None] | None]:
    """*argv* run under *rlimits*: through ``prlimit``, or with a preexec_fn to set them."""
    prlimit = _prlimit()
    if prlimit is None or any(which not in _PRLIMIT_OPTIONS for which, _, _ in rlimits):
        limits = tuple(rlimits)

        def set_limits() -> None:  # in the child, between fork and exec
            for which, soft, hard in limits:
                resource.setrlimit(which, (soft, hard))

        return list(argv), set_limits
    # A program that cannot start is told as Popen tells it, not as prlimit's exit code.
    program = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH"))
    if program is None or not (found := cwd / program).exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    if found.is_dir() or not os.access(found, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), argv[0])
    options = [f"--{_PRLIMIT_OPTIONS[which]}={soft}:{hard}" for which, soft, hard in rlimits]
    return [prlimit, *options, "--", program, *argv[1:]], None


def _spawn(
    argv: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    stdout: Path | int,
    stderr: Path,
    rlimits: Sequence[tuple[int, int, int]],
    stdin: Path | int | None = None,
) -> subprocess.Popen[bytes]:
    """Start *argv* in its own session, its streams into the two log files (or, for a
    descriptor, a pipe's end); OSError if not."""
    argv, preexec = _with_limits(argv, cwd, env, rlimits) if rlimits else (list(argv), None)
    with contextlib.ExitStack() as stack:
        out = stdout if isinstance(stdout, int) else stack.enter_context(stdout.open("wb"))
        err = stack.enter_context(stderr.open("wb"))
        source: int | BinaryIO = (
            stdin
            if isinstance(stdin, int)
            else stack.enter_context(Path(os.devnull if stdin is None else stdin).open("rb"))
        )
        # Popen forks with vfork: about a millisecond in the loop, less than a thread hop.
        try:
            return subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=source,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
                preexec_fn=preexec,
            )
        except subprocess.SubprocessError as exc:
            # Only the preexec_fn (setrlimit, without prlimit) raises this: a limit the
            # kernel refused. The command did not start, as with any OSError.
            raise OSError(errno.EPERM, f"cannot set its resource limits ({exc})") from exc


async def run_command(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    stdout: Path,
    stderr: Path,
    timeout: float,  # noqa: ASYNC109 (a per-attempt limit, part of the contract)
    tag: str,
    kill_grace: float,
    rlimits: Sequence[tuple[int, int, int]] = (),
    lifeline: Lifeline | None = None,
    stdin: Path | None = None,
    stall_timeout: float | None = None,
    talk: Callable[[Pipes], Awaitable[None]] | None = None,
) -> ProcessOutcome:
    """Run *argv* to its end; see the module docstring for how it ends.

    *rlimits* are ``(resource, soft, hard)`` triples set in the child before exec. *stdin*
    is a file the command reads as its standard input (else nothing). With *stall_timeout*,
    a command that writes nothing to either log for that many seconds is ended as a timed-out
    one is (``stalled``). Raises OSError when the command cannot be started. On cancellation
    the process group is terminated (under a shielded scope) before the cancellation
    propagates.

    With *talk*, ``talk(pipes)`` converses with the command on its stdin and stdout (see
    the module docstring).
    """
    full_env = {**env, TAG_VARIABLE: tag}
    proc, pipes = _start(argv, cwd, full_env, stdout, stderr, rlimits, stdin, talking=bool(talk))
    started = time.monotonic()
    timed_out = cancelled = stalled = False
    status: int | None = None
    usage: resource.struct_rusage | None = None
    try:
        if lifeline is not None:
            prefix = tag.split("/", 1)[0] + "/"
            lifeline.watch(proc.pid, tag_variable=TAG_VARIABLE, prefix=prefix)
        with anyio.move_on_after(timeout) as scope:
            if pipes is None or talk is None:
                written = lambda: _size(stdout) + _size(stderr)  # noqa: E731
                ended = await _wait_or_stall(proc.pid, written, stall_timeout)
                stalled = ended is None
            else:
                stalled, ended = await _talk_and_wait(
                    proc.pid, pipes, talk, stderr, stall_timeout, kill_grace
                )
            if ended is not None:
                status, usage = ended
        if scope.cancelled_caught:
            timed_out = True
    except anyio.get_cancelled_exc_class():
        cancelled = True
        raise
    finally:
        with anyio.CancelScope(shield=True):
            if status is None:
                status, usage = await _terminate(proc.pid, kill_grace)
            # Popen must not reap the pid again later: it is ours and already waited for.
            proc.returncode = os.waitstatus_to_exitcode(status) if status >= 0 else -1
            _signal_group(proc.pid, signal.SIGKILL)
            if pipes is not None:
                pipes.close()
            await anyio.to_thread.run_sync(kill_tagged, tag)
            if lifeline is not None:
                lifeline.unwatch(proc.pid)
    exit_code, sig = _exit_of(status)
    return ProcessOutcome(
        exit_code=exit_code,
        timed_out=timed_out,
        cancelled=cancelled,
        signal=sig,
        duration_s=time.monotonic() - started,
        cpu_user_s=usage.ru_utime if usage else None,
        cpu_system_s=usage.ru_stime if usage else None,
        max_rss_kb=_max_rss_kb(usage),
        stalled=stalled,
    )


def _exit_of(status: int | None) -> tuple[int | None, int | None]:
    """(exit code, signal) of a wait status: one of them, or neither when it is unknown."""
    if status is not None and status >= 0:
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status), None
        if os.WIFSIGNALED(status):
            return None, os.WTERMSIG(status)
    return None, None


def _max_rss_kb(usage: resource.struct_rusage | None) -> int | None:
    """The peak memory *usage* says, in kilobytes (ru_maxrss is in bytes on macOS)."""
    if usage is None:
        return None
    return usage.ru_maxrss // 1024 if sys.platform == "darwin" else usage.ru_maxrss


def _start(
    argv: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    stdout: Path,
    stderr: Path,
    rlimits: Sequence[tuple[int, int, int]],
    stdin: Path | None,
    *,
    talking: bool,
) -> tuple[subprocess.Popen[bytes], Pipes | None]:
    """Start the command; when *talking*, with pipes on its stdin and stdout (the stdout log
    then being the copy of what it writes)."""
    if not talking:
        return _spawn(argv, cwd, env, stdout, stderr, rlimits, stdin), None
    pipes, child_in, child_out = open_pipes(stdout.open("wb"))
    try:
        return _spawn(argv, cwd, env, child_out, stderr, rlimits, child_in), pipes
    except BaseException:
        pipes.close()
        raise
    finally:
        os.close(child_in)
        os.close(child_out)


async def _talk_and_wait(
    pid: int,
    pipes: Pipes,
    talk: Callable[[Pipes], Awaitable[None]],
    stderr: Path,
    stall_timeout: float | None,
    grace: float,
) -> tuple[bool, tuple[int, resource.struct_rusage | None] | None]:
    """Converse with the program while waiting for it: (stalled, its exit status or None).

    Whichever ends first, the conversation or the program, the other gets *grace* seconds to
    follow; None for the status when the program has not exited by then (it is terminated).
    """
    ended: tuple[int, resource.struct_rusage | None] | None = None
    stalled = False
    talked, exited = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:

        async def wait() -> None:
            nonlocal ended, stalled
            ended = await _wait_or_stall(pid, lambda: pipes.received + _size(stderr), stall_timeout)
            exited.set()
            if ended is None:
                stalled = True
            else:
                with anyio.move_on_after(grace):
                    await talked.wait()  # what the program left in the pipe is read
            tg.cancel_scope.cancel()

        tg.start_soon(wait)
        try:
            await talk(pipes)
        finally:
            talked.set()
            pipes.close_input()
        with anyio.move_on_after(grace):
            await exited.wait()
        tg.cancel_scope.cancel()
    return stalled, ended


async def _terminate(pid: int, grace: float) -> tuple[int, resource.struct_rusage | None]:
    """SIGTERM the group, wait up to *grace* seconds, then SIGKILL it; reap the leader."""
    _signal_group(pid, signal.SIGTERM)
    with anyio.move_on_after(grace):
        return await _wait_exit(pid)
    _signal_group(pid, signal.SIGKILL)
    return await _wait_exit(pid)
