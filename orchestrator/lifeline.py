"""The lifeline: a run's agents die with the orchestrator, even when it is SIGKILLed.

One small watcher process per run (started with the run's first agent) holds the read end
of a pipe whose write end only the orchestrator holds (close-on-exec: no agent inherits it).
The orchestrator tells it each agent's process group as it starts and ends. When the pipe
reaches end of file without a goodbye, the orchestrator is gone: the watcher kills the groups
it was told of, then every process whose environment carries the run's tag (a child that
left its group with setsid), until none is left, and exits. A run that ends normally says
goodbye, and the watcher exits at once.

A sandboxed agent (bubblewrap's ``--die-with-parent`` and its own PID namespace) dies with
the orchestrator without it; the watcher kills it too, which does no harm.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil

__all__ = ["Lifeline"]

#: The directory psutil was imported from, for the watcher (which runs without site-packages).
_PSUTIL_HOME = str(Path(psutil.__file__).parent.parent)

#: The watcher, run as ``python -I -S -c WATCHER <fd> <tag variable> <tag prefix> <dir>``:
#: the standard library and psutil (found in *dir*) only, so that it starts in milliseconds.
WATCHER = r"""
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
    signal.signal(s, signal.SIG_IGN)
fd, variable, prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.append(sys.argv[4])
try:
    import psutil  # now, not once the orchestrator is gone (its venv may be gone too)
except ImportError:
    psutil = None  # the groups are still killed
groups, pending = set(), b""
while True:
    try:
        chunk = os.read(fd, 4096)
    except InterruptedError:
        continue
    if not chunk:
        break
    pending += chunk
    *lines, pending = pending.split(b"\n")
    for line in lines:
        if line == b"bye":
            os._exit(0)
        if line[:1] == b"+":
            groups.add(int(line[1:]))
        elif line[:1] == b"-":
            groups.discard(int(line[1:]))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
me, deadline = os.getpid(), time.monotonic() + 10
while psutil is not None and time.monotonic() < deadline:
    matched = 0
    for process in psutil.process_iter():
        if process.pid == me:
            continue
        try:
            if process.environ().get(variable, "").startswith(prefix):
                matched += 1
                process.kill()
        except psutil.Error:
            pass
    if not matched:
        break
    time.sleep(0.01)
"""


class Lifeline:
    """The watcher of one run's agents (see the module docstring).

    Not started until the first :meth:`watch`; :meth:`close` says goodbye and waits for it.
    Writes go straight to a pipe the watcher keeps reading: they never block in practice.
    """

    def __init__(self) -> None:
        self._write: int | None = None
        self._watcher: subprocess.Popen[bytes] | None = None
        self._closed = False

    def _start(self, tag_variable: str, prefix: str) -> None:
        read, write = os.pipe()  # neither end inherited by what this process starts
        try:
            self._watcher = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    WATCHER,
                    str(read),
                    tag_variable,
                    prefix,
                    _PSUTIL_HOME,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(read,),
                # Not in the orchestrator's group: a Ctrl-C or a kill of the group spares it.
                start_new_session=True,
                close_fds=True,
                env={k: v for k, v in os.environ.items() if k != tag_variable},
            )
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        self._write = write

    def watch(self, group: int, *, tag_variable: str, prefix: str) -> None:
        """Kill process group *group*, and every process whose *tag_variable* starts with
        *prefix*, if this process dies before :meth:`unwatch` or :meth:`close`."""
        if self._closed:
            return
        if self._write is None:
            try:
                self._start(tag_variable, prefix)
            except OSError:
                # No watcher (no interpreter to start it with, say): the agents still run,
                # and are still killed when they end or the run is cancelled.
                self._closed = True
                return
        self._send(f"+{group}\n")

    def unwatch(self, group: int) -> None:
        """*group* has ended: forget it."""
        if self._write is not None:
            self._send(f"-{group}\n")

    def _send(self, line: str) -> None:
        assert self._write is not None
        # A watcher that died (killed by hand) is no reason to fail a task.
        with contextlib.suppress(OSError):
            os.write(self._write, line.encode())

    def close(self) -> None:
        """Say goodbye (nothing is killed) and wait for the watcher to exit. Idempotent."""
        self._closed = True
        if self._write is None:
            return
        self._send("bye\n")
        os.close(self._write)
        self._write = None
        if self._watcher is not None:
            try:
                self._watcher.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._watcher.kill()
                self._watcher.wait()
            self._watcher = None
