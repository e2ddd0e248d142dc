"""The resident process's side (:mod:`orchestrator.resident` says what it is and whom it
trusts): import the engine once, listen, fork a worker for each client, and tell each client
how its worker ended.

The resident process stays single-threaded (a fork copies only the thread that called it),
never reads what a client sends (its worker does, after the fork), and watches its workers
through pidfds. It stops listening when told to (SIGTERM, SIGINT), when its socket is no
longer its own, when the code it imported has changed on disk, or when it has been idle
(no worker, no client) for its idle time; it exits once its last worker has ended.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, NoReturn

from .errors import ServerError
from .resident import (
    HANDSHAKE_TIMEOUT,
    LIMITS,
    MAX_INHERITED,
    REQUEST_LIMIT,
    SERVED_COMMANDS,
    at,
    confinement,
    find_server,
    message,
    open_private,
    peer_credentials,
    peer_difference,
    server_dir,
    signature,
    socket_name,
)

__all__ = ["DEFAULT_IDLE_TIMEOUT", "serve", "serve_detached"]

#: Seconds without a client or a worker after which the resident process exits.
DEFAULT_IDLE_TIMEOUT = 1800.0
#: How often the resident process checks that its socket and its code are still current.
CHECK_INTERVAL = 1.0

#: The standard streams a worker's previous objects held, kept from the collector: their
#: finalizers would close descriptors 0 to 2, which are the client's once the worker adopts.
_kept_streams: list[object] = []

#: The command line's parser, built once by the resident process.
_parser: Any = None


class _Refused(Exception):
    """A worker will not serve its client (the reason is sent to it)."""


def serve(*, idle_timeout: float | None = None, ready_fd: int | None = None) -> int:
    """Be this user's resident process for this code until stopped (see the module's
    docstring); 0 once stopped. *ready_fd*: a pipe told ``ready <pid>`` once the socket
    listens, or ``error <reason>``. Raises ServerError when it cannot listen."""
    for fd in (0, 1, 2):  # so that no descriptor a worker receives lands on 0 to 2
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_RDWR), fd)
    try:
        directory, name = _place()
        _import_engine()
        listener = _bind(directory, name)
    except ServerError as exc:
        _tell(ready_fd, f"error {exc}")
        raise
    _tell(ready_fd, f"ready {os.getpid()}")
    if ready_fd is not None:
        os.close(ready_fd)
    idle = DEFAULT_IDLE_TIMEOUT if idle_timeout is None else idle_timeout
    _Residence(listener, directory, name, idle).loop()
    return 0


def serve_detached(idle_timeout: float | None = None) -> int:
    """Start the resident process in the background (its own session, its streams on
    ``/dev/null``) and return its pid once it listens; ServerError with its reason if it
    cannot."""
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - measured in the process it becomes (tests/test_server.py)
        os.close(ready_read)
        code = 1
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            code = serve(idle_timeout=idle_timeout, ready_fd=ready_write)
        except BaseException:
            pass
        os._exit(code)
    os.close(ready_write)
    os.waitpid(child, 0)
    with os.fdopen(ready_read, "rb") as ready:
        line = ready.readline(4096).decode("utf-8", "replace").strip()
    word, _, rest = line.partition(" ")
    if word == "ready" and rest.isdigit():
        return int(rest)
    raise ServerError(rest if word == "error" else "the resident process did not start")


def _tell(fd: int | None, line: str) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, (line + "\n").encode())


def _place() -> tuple[int, str]:
    """Where to listen: the sockets' directory (a descriptor) and the socket's name there."""
    confined = confinement()
    if confined is not None:
        raise ServerError(
            f"this process is confined ({confined}): a resident process could not carry that "
            "over to its clients, and would serve none"
        )
    if not (
        hasattr(os, "pidfd_open") and hasattr(socket, "SO_PEERCRED") and os.path.isdir("/proc")
    ):
        raise ServerError(
            "a resident process needs Linux 5.3 or later (pidfds, SO_PEERCRED, /proc)"
        )
    name = socket_name()
    if name is None:
        raise ServerError("the envelopes package is not beside orchestrator: no resident process")
    where = server_dir()
    try:
        os.mkdir(where, 0o700)
    except FileExistsError:
        pass  # checked below, as one made now is
    except OSError as exc:
        raise ServerError(f"cannot make {where}: {exc.strerror}") from exc
    pid = find_server()
    if pid is not None:
        raise ServerError(f"a resident process is already listening (pid {pid})")
    return open_private(where), name


def _bind(directory: int, name: str) -> socket.socket:
    """A socket listening at *name*: bound under a name of its own, then renamed over it
    (a client never finds a socket that does not listen yet)."""
    temporary = f"{name}.{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(at(directory, temporary))
        os.chmod(temporary, 0o600, dir_fd=directory)
        listener.listen(64)
        os.rename(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
    except OSError as exc:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=directory)
        raise ServerError(f"cannot listen in {server_dir()}: {exc.strerror or exc}") from exc
    listener.setblocking(False)
    return listener


#: What a run imports only once it starts (the event loop, anyio's backend for it, uv's
#: finder), imported by the resident process too: 40 ms of each worker's start otherwise.
_ALSO_IMPORTED = ("asyncio", "anyio._backends._asyncio", "concurrent.futures", "uv._find_uv")


def _import_engine() -> None:
    import importlib

    from . import cli

    for command in sorted(SERVED_COMMANDS):
        cli.preload(command)
    for name in _ALSO_IMPORTED:
        with contextlib.suppress(ImportError):  # uv's finder: a venv backend is found otherwise
            importlib.import_module(name)
    global _parser
    _parser = cli.build_parser()  # 10 ms; reused by every worker (parse_args keeps nothing)
    if threading.active_count() != 1:
        raise ServerError("importing the engine started a thread: a fork would not be safe")


class _Residence:
    """The listening loop: clients accepted and forked, workers reaped and reported."""

    def __init__(
        self, listener: socket.socket, directory: int, name: str, idle_timeout: float
    ) -> None:
        self.listener: socket.socket | None = listener
        self.directory = directory
        self.name = name
        self.inode = self._inode()
        self.signature = signature()
        self.idle_timeout = idle_timeout
        self.selector = selectors.DefaultSelector()
        self.workers: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> pid, connection
        self.last_busy = time.monotonic()
        self.stop_requested = False
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake = wake_read
        signal.set_wakeup_fd(wake_write)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_stop)
        self.selector.register(listener, selectors.EVENT_READ, "listener")
        self.selector.register(wake_read, selectors.EVENT_READ, "wake")

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def loop(self) -> None:
        next_check = time.monotonic() + CHECK_INTERVAL
        while self.listener is not None or self.workers:
            for key, _ in self.selector.select(CHECK_INTERVAL):
                if key.data == "listener":
                    self._accept()
                elif key.data == "wake":
                    _drain(self.wake)
                else:
                    self._reap(key.fd)
            now = time.monotonic()
            if self.workers:
                self.last_busy = now
            if self.listener is None:
                continue
            if self.stop_requested or (
                self.idle_timeout > 0 and now - self.last_busy > self.idle_timeout
            ):
                self._stop_listening()
            elif now >= next_check:
                next_check = now + CHECK_INTERVAL
                if not self._current():
                    self._stop_listening()

    def _inode(self) -> int | None:
        try:
            return os.stat(self.name, dir_fd=self.directory, follow_symlinks=False).st_ino
        except OSError:
            return None

    def _current(self) -> bool:
        """Whether the socket is still this process's and its code unchanged."""
        return self._inode() == self.inode and signature() == self.signature

    def _stop_listening(self) -> None:
        assert self.listener is not None
        self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        if self._inode() == self.inode:
            with contextlib.suppress(OSError):
                os.unlink(self.name, dir_fd=self.directory)

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError:  # out of descriptors, say: the client waits in the backlog, or gives
            time.sleep(0.05)  # up and runs its command itself
            return
        self.last_busy = time.monotonic()
        try:
            _, uid, _ = peer_credentials(conn)
        except OSError:
            uid = -1
        if uid != os.getuid():
            conn.close()
            return
        conn.setblocking(True)
        try:
            pid = os.fork()
        except OSError:  # out of processes or memory: the client runs its command itself
            conn.close()
            return
        if pid == 0:
            _worker(conn)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # cannot watch it: it is not let run (its client runs the command)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            conn.close()
            return
        self.workers[pidfd] = (pid, conn)
        self.selector.register(pidfd, selectors.EVENT_READ, "worker")

    def _reap(self, pidfd: int) -> None:
        pid, conn = self.workers.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        reply = (
            message(b"X", str(code).encode()) if code >= 0 else message(b"K", str(-code).encode())
        )
        try:
            conn.setblocking(False)
            conn.send(reply)
        except OSError:
            pass
        conn.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass


# --- the worker ----------------------------------------------------------------------------


def _worker(conn: socket.socket) -> NoReturn:
    """Become the client's command and end with its status (never returns)."""
    code = 1
    try:
        _reset(conn)
        client = _check_peer(conn)  # before anything it sends is read
        request, fds = _receive(conn)
        try:
            conn = _clear_way(conn, fds, request["fds"])
            _adopt(client, request, fds)
        finally:
            for fd in fds:
                if fd > 2:
                    os.close(fd)
        conn.settimeout(HANDSHAKE_TIMEOUT)  # (what _receive left of it may be nothing)
        conn.sendall(message(b"P", str(os.getpid()).encode()))
        try:
            if conn.recv(1) != b"A":
                os._exit(0)
        except KeyboardInterrupt:  # Ctrl-C at the client before anything ran
            print("orchestrator: interrupted", file=sys.stderr, flush=True)
            os._exit(130)
        conn.settimeout(None)
        _watch_client(conn)
        code = _command(request["argv"])
        with contextlib.suppress(OSError):
            conn.sendall(message(b"X", str(code).encode()))
    except _Refused as exc:
        with contextlib.suppress(OSError):
            conn.sendall(message(b"F", str(exc).encode()[:1000]))
        code = 0
    except BaseException:  # the client is told nothing ran (no "P"): it runs the command itself
        code = 1
    os._exit(code)


def _reset(conn: socket.socket) -> None:
    """The worker as a process of its own: its own session, and no descriptor of the
    resident process's but its connection (its signal handling is its client's:
    :func:`_take_signals`)."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    os.setsid()
    keep = conn.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The client's request and its four descriptors (stdin, stdout, stderr, working
    directory), all within HANDSHAKE_TIMEOUT; ValueError or OSError when it is not one."""
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    conn.settimeout(HANDSHAKE_TIMEOUT)
    data, fds, flags, _ = socket.recv_fds(conn, 65536 + 4, 4 + MAX_INHERITED)
    try:
        if flags & socket.MSG_CTRUNC or len(fds) < 4 or len(data) < 4:
            raise ValueError("a request comes with at least four descriptors")
        size = int.from_bytes(data[:4], "big")
        if size > REQUEST_LIMIT or len(data) - 4 > size:
            raise ValueError("request too long")
        chunks, left = [data[4:]], size - (len(data) - 4)
        while left:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = conn.recv(min(left, 1 << 20))
            if not chunk or time.monotonic() > deadline:
                raise ValueError("the request did not come whole in time")
            chunks.append(chunk)
            left -= len(chunk)
        request = _checked(json.loads(b"".join(chunks)))
        if len(fds) != 4 + len(request["fds"]):
            raise ValueError("not the descriptors the request names")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return request, fds


def _checked(request: Any) -> dict[str, Any]:
    """*request* if it has the request's shape (ValueError otherwise)."""
    ok = (
        isinstance(request, dict)
        and _strings(request.get("argv"), list)
        and isinstance(request.get("env"), dict)
        and _strings(list(request["env"]), list)
        and _strings(list(request["env"].values()), list)
        and _is_int(request.get("umask"))
        and 0 <= request["umask"] <= 0o777
        and isinstance(request.get("fds"), list)
        and all(_is_int(fd) and 2 < fd < 1 << 20 for fd in request["fds"])
        and len(set(request["fds"])) == len(request["fds"])
    )
    if not ok or not request["argv"] or request["argv"][0] not in SERVED_COMMANDS:
        raise ValueError("not a request")
    checked: dict[str, Any] = request
    return checked


def _strings(value: Any, kind: type[Any]) -> bool:
    return isinstance(value, kind) and all(isinstance(v, str) and "\0" not in v for v in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _clear_way(conn: socket.socket, fds: list[int], targets: list[int]) -> socket.socket:
    """The connection and the received descriptors (*fds*, changed in place) moved above
    every number the client's inherited descriptors are to take (*targets*), so that
    putting them there overwrites nothing of the worker's; the connection as moved."""
    import fcntl

    floor = max([conn.fileno(), *fds, *targets]) + 1
    for i, fd in enumerate(fds):
        fds[i] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
        os.close(fd)
    moved = socket.socket(fileno=fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD_CLOEXEC, floor))
    conn.close()
    return moved


def _check_peer(conn: socket.socket) -> int:
    """The client's pid, if it sees the system as the worker does (see
    :func:`orchestrator.resident.peer_difference`: what the kernel says of it, not what it
    says); _Refused otherwise."""
    pid, uid, _ = peer_credentials(conn)
    why = "another user" if uid != os.getuid() else peer_difference(pid)
    if why is None and _ioprio(pid) != _ioprio(0):
        why = "a different I/O priority"
    if why is not None:
        raise _Refused(why)
    return pid


#: ``ioprio_get``'s number where it is known (no Python binding exists); elsewhere the I/O
#: priority is not compared.
_IOPRIO_GET = {"x86_64": 252, "aarch64": 31, "i686": 290, "armv7l": 315}


def _ioprio(pid: int) -> int | None:
    """The I/O priority of *pid* (0: this process), None where it cannot be read."""
    import ctypes
    import platform

    number = _IOPRIO_GET.get(platform.machine())
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    value: int = libc.syscall(number, 1, pid)  # IOPRIO_WHO_PROCESS
    return None if value < 0 else value


def _limits(pid: int) -> dict[int, tuple[int, int]]:
    """*pid*'s resource limits, from ``/proc/<pid>/limits``."""
    import resource

    try:
        with open(f"/proc/{pid}/limits") as f:
            rows = f.read(65536).splitlines()[1:]
    except OSError as exc:
        raise _Refused(f"its limits cannot be read ({exc.strerror})") from None
    found = {}
    for row in rows:
        name = row[:26].strip()
        values = row[26:].split()
        which = getattr(resource, LIMITS.get(name, "-"), None)
        if which is None or len(values) < 2:
            continue
        found[which] = tuple(
            resource.RLIM_INFINITY if v == "unlimited" else int(v) for v in values[:2]
        )
    return found  # type: ignore[return-value]


def _adopt(client: int, request: Mapping[str, Any], fds: list[int]) -> None:
    """Take on the client's limits, CPUs, niceness and signal handling (as the kernel shows
    them), then its streams, directory, umask and environment (what may refuse comes
    first)."""
    import resource

    for which, wanted in _limits(client).items():
        if resource.getrlimit(which) != wanted:
            try:
                resource.setrlimit(which, wanted)
            except (ValueError, OSError) as exc:
                raise _Refused(f"cannot take its resource limits: {exc}") from exc
    status = {k: v.split() for k, v in _status_lines(client).items()}
    try:
        cpus = _cpu_list(status[b"Cpus_allowed_list:"][1].decode())
        nice = int(_stat_of(client)[16])
        if os.sched_getaffinity(0) != cpus:
            os.sched_setaffinity(0, cpus)
        if os.getpriority(os.PRIO_PROCESS, 0) != nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        _take_signals(int(status[b"SigIgn:"][1], 16), int(status[b"SigBlk:"][1], 16))
    except (KeyError, IndexError, ValueError, OSError) as exc:
        raise _Refused(f"cannot take its CPUs, niceness or signal handling: {exc}") from exc
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    os.fchdir(fds[3])
    for target, fd in zip(request["fds"], fds[4:], strict=True):
        os.dup2(fd, target)  # inheritable, as the client's were
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()
    sys.argv = ["orchestrator", *request["argv"]]
    _new_streams()
    _refresh_modules()


def _status_lines(pid: int) -> dict[bytes, bytes]:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            lines = f.read(65536).splitlines()
    except OSError:
        return {}
    return {line.split(None, 1)[0]: line for line in lines if line.strip()}


def _stat_of(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read(65536).rsplit(b")", 1)[1].split()


def _cpu_list(text: str) -> set[int]:
    """``0-3,6`` as {0, 1, 2, 3, 6}."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _take_signals(ignored: int, blocked: int) -> None:
    """The client's signal dispositions as Python started them (each signal it ignores
    ignored, SIGINT otherwise Python's KeyboardInterrupt, the rest their default) and its
    blocked signals."""
    for signum in range(1, signal.NSIG):
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if ignored >> (signum - 1) & 1:
            handler: Any = signal.SIG_IGN
        elif signum == signal.SIGINT:
            handler = signal.default_int_handler
        else:
            handler = signal.SIG_DFL
        with contextlib.suppress(OSError, ValueError):  # (signals the C library keeps)
            signal.signal(signum, handler)
    signal.pthread_sigmask(
        signal.SIG_SETMASK, {n for n in range(1, signal.NSIG) if blocked >> (n - 1) & 1}
    )


def _new_streams() -> None:
    """sys.stdin, stdout and stderr on the client's descriptors, buffered as Python buffers
    them at its start (stdout by line on a terminal, stderr always; neither with ``-u`` or
    ``PYTHONUNBUFFERED``, which the resident process shares with its clients)."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    _kept_streams.extend(
        (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__)
    )
    errors = getattr(sys.stdout, "errors", None) or "strict"
    unbuffered = bool(getattr(sys.__stdout__, "write_through", False))  # as Python made it
    sys.stdin = open(0, encoding=encoding, errors=errors, newline="\n", closefd=False)  # noqa: SIM115
    for fd, name, how in ((1, "stdout", errors), (2, "stderr", "backslashreplace")):
        stream = io.TextIOWrapper(
            open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False),  # noqa: SIM115
            encoding=encoding,
            errors=how,
            line_buffering=not unbuffered and (fd == 2 or os.isatty(fd)),
            write_through=unbuffered,
        )
        setattr(sys, name, stream)


def _refresh_modules() -> None:
    """What imported modules read from the process at import, read again for the client."""
    import importlib
    import tempfile

    from ._faults import load as load_faults
    from ._fs import reread_umask

    reread_umask()
    load_faults()
    for name, module in list(sys.modules.items()):
        if module is not None and name.partition(".")[0] in ("orchestrator", "envelopes"):
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()  # a program found on PATH, say: found again
    tempfile.tempdir = None  # TMPDIR
    importlib.invalidate_caches()


def _watch_client(conn: socket.socket) -> None:
    """The worker told when its client goes away (killed, say): a SIGHUP, as when a
    terminal closes; a SIGTERM where the client ignored that (``nohup``); else a SIGKILL."""

    def watch() -> None:
        try:
            while conn.recv(64):
                pass
        except OSError:
            pass
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGKILL):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                os.kill(os.getpid(), signum)
                return

    threading.Thread(target=watch, name="resident-client", daemon=True).start()


def _command(argv: list[str]) -> int:
    """The command *argv*, as ``orchestrator`` runs it: its exit status (0 to 255, as the
    process's would be), output flushed. Interrupted by a KeyboardInterrupt it did not
    handle, the worker dies by SIGINT after its clean-up, as Python does."""
    import atexit
    import traceback

    from . import cli

    interrupted = False
    try:
        code = cli.dispatch((_parser or cli.build_parser()).parse_args(argv))
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code, interrupted = 1, True
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter's exit: its hooks, then the threads joined
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or cli.EXIT_FAILED
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code & 0xFF


def _exit_code(code: object) -> int:
    """What ``sys.exit(code)`` makes a process's status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return int(code)
    print(code, file=sys.stderr)
    return 1
