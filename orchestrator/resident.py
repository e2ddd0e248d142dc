"""The resident process: the engine imported once, a worker forked for each command.

A command's start is mostly importing: pydantic, anyio, rich and the engine's 70 models take
0.25 to 0.35 s of a small plan's 0.7 s here (docs/benchmarks.md). ``orchestrator serve``
starts a process that imports all that once and listens on a Unix socket. The
``orchestrator`` command (:func:`entry`) first looks for one; when it finds one it sends its
command line, environment, working directory, umask and its standard streams (as
descriptors), and the resident process forks a worker that becomes the command as if it had
been started there: the same streams, directory, environment, umask, and (read in /proc)
limits, CPU set, niceness and signal handling. The client waits, forwards the stopping
signals it does not ignore to the worker, and exits with the worker's status (or dies by its
signal). Without a resident process, or when it cannot serve this client, the command runs
in the client's own process as always.

Who may use it, and what it trusts:

- The socket lives in a directory only its user may enter: ``$ORCHESTRATOR_SERVER_DIR``, else
  ``$XDG_RUNTIME_DIR/worktree-orchestrator``, else ``/tmp/worktree-orchestrator-<uid>``; both
  sides refuse a directory that is a link, belongs to someone else or that others may open.
- The resident process accepts a connection only from its own user (``SO_PEERCRED``); the
  client talks only to a process of its own user.
- Each side serves or talks to only a process that sees the system as it does
  (:func:`peer_difference`: the same namespaces, control groups, capabilities, groups,
  security label, OOM score and scheduling; neither under seccomp or ``no_new_privs``),
  checked in ``/proc`` before anything is sent or read: a client in a sandbox or under a
  memory limit would otherwise run its command outside it, and a confined impostor
  listening at the socket's name would otherwise be sent a client's environment. The client
  then runs the command itself.
- The socket's name is a digest of everything the imported code depends on: the interpreter,
  ``sys.path``, the interpreter's flags, the ``PYTHON*``, ``PYDANTIC*`` and locale variables,
  the size, time and inode of every file of ``orchestrator`` and ``envelopes``, and the times
  of the ``site-packages`` directories on ``sys.path`` (an install or upgrade changes them).
  A client of other code finds no socket; a resident process whose code changed stops
  listening.
- A worker reads at most 8 MiB of request, all of it within 5 s, and checks its shape
  before anything else; a client that says nothing or something else costs the resident
  process nothing (the worker exits). A client waits at most 2 s for a worker to be ready.
- When the client goes away before its command has ended (killed, say), the worker gets a
  SIGHUP, as a command whose terminal closed does, and cleans up as it would.

What is not the client's: the worker's parent is the resident process, its session is its
own and it has no controlling terminal (it writes to the client's terminal through the
descriptors it was given). Ctrl-Z stops the client, not the worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

__all__ = [
    "CLIENT_TIMEOUT",
    "DIR_VARIABLE",
    "DISABLE_VARIABLE",
    "FORWARDED",
    "HANDSHAKE_TIMEOUT",
    "LIMITS",
    "MAX_INHERITED",
    "NAMESPACES",
    "REPLY_LIMIT",
    "REQUEST_LIMIT",
    "SERVED_COMMANDS",
    "STATUS_FIELDS",
    "UNCONFINED_FIELDS",
    "at",
    "confinement",
    "entry",
    "find_server",
    "inherited_descriptors",
    "message",
    "open_private",
    "peer_credentials",
    "peer_difference",
    "read_exactly",
    "serve",
    "server_dir",
    "signature",
    "socket_name",
    "stop_server",
]

#: The commands a resident process runs: those whose start is importing the engine.
SERVED_COMMANDS = frozenset({"run", "resume", "validate", "verify", "merge"})

#: Set (to anything but the empty string) to run every command in its own process.
DISABLE_VARIABLE = "ORCHESTRATOR_NO_SERVER"
#: Where the sockets live (the default: see the module's docstring).
DIR_VARIABLE = "ORCHESTRATOR_SERVER_DIR"

REQUEST_LIMIT = 8 * 1024 * 1024
REPLY_LIMIT = 4096
#: Seconds a worker waits for its whole request, and a client for the worker's "ready".
HANDSHAKE_TIMEOUT = 5.0
CLIENT_TIMEOUT = 2.0

#: ``/proc/<pid>/limits`` rows, as the kernel names them: the limits a worker takes over
#: from its client (read there, not from what the client says).
LIMITS = {
    "Max cpu time": "RLIMIT_CPU",
    "Max file size": "RLIMIT_FSIZE",
    "Max data size": "RLIMIT_DATA",
    "Max stack size": "RLIMIT_STACK",
    "Max core file size": "RLIMIT_CORE",
    "Max resident set": "RLIMIT_RSS",
    "Max processes": "RLIMIT_NPROC",
    "Max open files": "RLIMIT_NOFILE",
    "Max locked memory": "RLIMIT_MEMLOCK",
    "Max address space": "RLIMIT_AS",
    "Max file locks": "RLIMIT_LOCKS",
    "Max pending signals": "RLIMIT_SIGPENDING",
    "Max msgqueue size": "RLIMIT_MSGQUEUE",
    "Max nice priority": "RLIMIT_NICE",
    "Max realtime priority": "RLIMIT_RTPRIO",
    "Max realtime timeout": "RLIMIT_RTTIME",
}

#: What a worker and its client must share (``/proc/<pid>/ns/<name>``).
NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")
#: Lines of ``/proc/<pid>/status`` that must be the same.
STATUS_FIELDS = (
    b"CapInh:",
    b"CapPrm:",
    b"CapEff:",
    b"CapBnd:",
    b"CapAmb:",
    b"Uid:",
    b"Gid:",
    b"Groups:",
)
#: Lines of ``/proc/<pid>/status`` that must say 0 on both sides: a process under a seccomp
#: filter or ``no_new_privs`` (where Landlock is possible too) is confined in ways /proc
#: does not show whole, so it is never served, nor served by such a process.
UNCONFINED_FIELDS = (b"NoNewPrivs:", b"Seccomp:")


def peer_difference(pid: int) -> str | None:
    """How process *pid* does not see the system as this one does (None: it does): its
    namespaces, control groups, security label, capabilities, user and groups, confinement,
    OOM score adjustment and scheduling policy, as the kernel shows them in ``/proc``.
    Used by both sides: a worker serves only a client like itself, and a client talks only
    to a resident process like itself."""
    if pid <= 0:
        return "a process this one cannot see"
    for name in NAMESPACES:
        if _link(f"/proc/{pid}/ns/{name}") != _link(f"/proc/self/ns/{name}"):
            return f"a different {name} namespace"
    for what, name in (("control group", "cgroup"), ("security label", "attr/current")):
        if _read(f"/proc/{pid}/{name}") != _read(f"/proc/self/{name}"):
            return f"a different {what}"
    theirs, ours = _status(pid), _status("self")
    if not theirs:
        return "a process whose status cannot be read"
    for field in STATUS_FIELDS:
        if theirs.get(field) != ours.get(field):
            return f"a different {field.decode().rstrip(':')}"
    confined = confinement()
    if confined is not None:
        return confined
    for field in UNCONFINED_FIELDS:
        if theirs.get(field, field + b" 0").split()[-1:] != [b"0"]:  # (absent: no such thing)
            return f"{field.decode().rstrip(':')} set"
    if _read(f"/proc/{pid}/oom_score_adj") != _read("/proc/self/oom_score_adj"):
        return "a different OOM score adjustment"
    if _stat_fields(pid)[37:39] != _stat_fields("self")[37:39]:
        return "a different scheduling policy"
    return None


def confinement() -> str | None:
    """How this process is confined in ways a resident process cannot carry over (seccomp,
    ``no_new_privs``); None when it is not. A confined process is neither served nor serves
    (``serve`` says so), and does not look for a resident process at all."""
    ours = _status("self")
    for field in UNCONFINED_FIELDS:
        if ours.get(field, field + b" 0").split()[-1:] != [b"0"]:
            return f"{field.decode().rstrip(':')} set"
    return None


def _link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError as exc:
        return f"unreadable {exc.errno}"


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(65536)
    except OSError:
        return None


def _status(pid: int | str) -> dict[bytes, bytes]:
    lines = (_read(f"/proc/{pid}/status") or b"").splitlines()
    return {line.split(None, 1)[0]: line for line in lines if line.strip()}


def _stat_fields(pid: int | str) -> list[bytes]:
    """``/proc/<pid>/stat`` after the command's name: index 0 is field 3 (the state)."""
    return (_read(f"/proc/{pid}/stat") or b")").rsplit(b")", 1)[1].split()


# --- where, and for which code ------------------------------------------------------------


def server_dir(environ: Mapping[str, str] | None = None) -> str:
    """The directory of this user's sockets (see the module's docstring)."""
    env = os.environ if environ is None else environ
    if env.get(DIR_VARIABLE):
        return env[DIR_VARIABLE]
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "worktree-orchestrator")
    return f"/tmp/worktree-orchestrator-{os.getuid()}"


def open_private(directory: str) -> int:
    """A descriptor (``O_PATH``) of *directory*, after checking that it may hold this user's
    sockets; :class:`~orchestrator.errors.ServerError` saying why not. Sockets are then
    reached through ``/proc/self/fd/<fd>/<name>``: no check-then-use race on the directory,
    and no limit of 108 bytes on its path (a socket's address may be no longer)."""
    fd, why = _open_private(directory)
    if fd is None:
        from .errors import ServerError  # here: the client's start imports no more than it must

        raise ServerError(why)
    return fd


def _open_private(directory: str) -> tuple[int | None, str]:
    try:
        info = os.lstat(directory)
    except OSError as exc:
        return None, f"{directory}: {exc.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return None, f"{directory} is not a directory"
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return None, f"{directory}: {exc.strerror}"
    info = os.fstat(fd)
    why = ""
    if info.st_uid != os.getuid():
        why = f"{directory} belongs to another user"
    elif info.st_mode & 0o077:
        why = f"{directory} may be opened by others (mode {stat.S_IMODE(info.st_mode):o})"
    if why:
        os.close(fd)
        return None, why
    return fd, ""


def at(directory_fd: int, name: str) -> str:
    """The address of *name* in the directory *directory_fd* (see :func:`open_private`)."""
    return f"/proc/self/fd/{directory_fd}/{name}"


def _code_dirs() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return [here, os.path.join(os.path.dirname(here), "envelopes")]


def signature() -> str | None:
    """A digest of what the imported code depends on (see the module's docstring); None when
    the ``envelopes`` package is not beside ``orchestrator`` (an unusual install: no server)."""
    digest = hashlib.sha256()
    variables = sorted(
        (k, v)
        for k, v in os.environ.items()
        if k.startswith(("PYTHON", "PYDANTIC", "LC_")) or k in ("LANG", "LANGUAGE")
    )
    head = (sys.executable, sys.version, sys.path, tuple(sys.flags), sys.warnoptions)
    digest.update(repr((head, sorted(sys._xoptions.items()), os.getuid(), variables)).encode())
    dirs = _code_dirs()
    if not os.path.isdir(dirs[1]):
        return None
    while dirs:
        directory = dirs.pop()
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name == "__pycache__":
                    continue
                info = entry.stat(follow_symlinks=False)
                digest.update(
                    f"{entry.path}\0{info.st_mtime_ns}\0{info.st_size}\0{info.st_ino}\n".encode()
                )
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(entry.path)
    for place in sys.path:
        if not place.endswith(("site-packages", "dist-packages")):
            continue  # where installs happen; the rest moves with the interpreter (or is cwd)
        try:
            digest.update(f"{place}\0{os.stat(place or '.').st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{place}\0-\n".encode())
    return digest.hexdigest()[:32]


def socket_name() -> str | None:
    """The name of the socket of a resident process of this code (None: no such socket may
    exist, a code layout without ``envelopes``)."""
    sig = signature()
    return None if sig is None else f"{sig}.sock"


# --- the client ----------------------------------------------------------------------------


def entry(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``orchestrator`` command: served by a resident process when there is one that may
    serve it, run here otherwise (:func:`orchestrator.cli.entry`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _served(args) if args and args[0] in SERVED_COMMANDS else None
    except KeyboardInterrupt:  # before the worker started: nothing ran
        print("orchestrator: interrupted", file=sys.stderr)
        sys.exit(130)
    if code is None:
        from .cli import entry as run_here

        run_here(args)
    sys.exit(code)


def _served(argv: list[str]) -> int | None:
    """*argv* run by a resident process: its exit status, or None when there is none that
    may run it (nothing has run then)."""
    if os.environ.get(DISABLE_VARIABLE) or confinement() is not None:
        return None
    sock = _connect()
    if sock is None:
        return None
    with sock:
        try:
            pidfd = _handshake(sock, argv)
        except (OSError, ValueError):
            return None
        if pidfd is None:
            return None
        return _wait(sock, pidfd)


#: At most this many inherited descriptors are passed on (SCM_RIGHTS takes 253 a message).
MAX_INHERITED = 200


def inherited_descriptors() -> list[int] | None:
    """The descriptors besides 0 to 2 this process inherited (those a command can name as
    ``/dev/fd/3``, a jobserver's, a lock's): passed on, to be the worker's at the same
    numbers. None when they cannot be listed or are too many (the command runs here)."""
    try:
        listed = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except (OSError, ValueError):
        return None
    # Inheritable, as what a process inherits is (the listing's own is closed by now, and
    # what Python opens is not inheritable).
    found = sorted(fd for fd in listed if fd > 2 and _is_open(fd) and os.get_inheritable(fd))
    return found if len(found) <= MAX_INHERITED else None


def _connect(*, to_send: bool = True) -> socket.socket | None:
    """A connection to this user's resident process of this code, if one listens; *to_send*:
    only if it sees the system as this process does (:func:`peer_difference`), since the
    request carries this process's environment."""
    name = socket_name()
    if name is None:
        return None
    directory, _ = _open_private(server_dir())
    if directory is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CLIENT_TIMEOUT)  # a stopped resident process's full backlog
        sock.connect(at(directory, name))
        pid, uid, _ = peer_credentials(sock)
    except OSError:
        sock.close()
        return None
    finally:
        os.close(directory)
    why = "another user" if uid != os.getuid() else peer_difference(pid) if to_send else None
    if why is not None:
        sock.close()
        if to_send and uid == os.getuid():
            _say_not_served(why)
        return None
    return sock


def _say_not_served(why: str) -> None:
    shown = "".join(c if c.isprintable() else "?" for c in why)
    print(
        f"orchestrator: the resident process will not run this ({shown}); running it here",
        file=sys.stderr,
    )


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """The (pid, uid, gid) of the process at the other end of *sock*, as the kernel says."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _request(argv: list[str]) -> dict[str, Any]:
    # What the worker cannot read of this process from /proc (its limits, CPUs, niceness
    # and signal dispositions it reads there: a client does not say what it may do).
    umask = os.umask(0o022)
    os.umask(umask)
    return {"argv": argv, "env": dict(os.environ), "umask": umask}


def _handshake(sock: socket.socket, argv: list[str]) -> int | None:
    """Send the request; a pidfd of the worker once it is ready, None if it will not serve
    (nothing has run then)."""
    streams = [fd if _is_open(fd) else -1 for fd in (0, 1, 2)]
    extra = inherited_descriptors()
    if -1 in streams or extra is None:
        return None  # a closed standard stream: run here, where it stays closed
    body = json.dumps({**_request(argv), "fds": extra}).encode()
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY)
    try:
        message = struct.pack(">I", len(body)) + body
        sock.settimeout(CLIENT_TIMEOUT)
        first = socket.send_fds(sock, [message[:65536]], [*streams, cwd, *extra])
        sock.sendall(message[first:])
    except (BrokenPipeError, ConnectionResetError):
        pass  # a worker that refused before it read everything: its reason may be waiting
    finally:
        os.close(cwd)
    kind, payload = _read_message(sock)
    if kind == b"F":
        _say_not_served(payload.decode("utf-8", "replace"))
        return None
    if kind != b"P":
        return None
    pidfd = os.pidfd_open(int(payload))
    previous = _forward_signals(pidfd)  # before the worker starts: a Ctrl-C from then on is its
    try:
        sock.sendall(b"A")  # the worker waits for this: it was alive when pidfd_open found it
    except OSError:
        _restore(previous)  # the command runs here after all, as it would have
        os.close(pidfd)
        raise
    sock.settimeout(None)
    return pidfd


#: The signals a client passes on to its worker, which handles them as the command would
#: have: it ignores those the client was started ignoring (``nohup``'s SIGHUP), unless the
#: command itself handles them (``run`` stops on SIGINT, SIGTERM and SIGHUP whatever it
#: inherited, served or not).
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


def _forward_signals(pidfd: int) -> dict[int, Any]:
    """The signals of FORWARDED sent on to the worker *pidfd*; the handlers they had."""
    import signal

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signum)

    return {getattr(signal, n): signal.signal(getattr(signal, n), forward) for n in FORWARDED}


def _restore(previous: dict[int, Any]) -> None:
    import signal

    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _wait(sock: socket.socket, pidfd: int) -> int:
    """Wait for the worker *pidfd* to end (the stopping signals sent on to it meanwhile:
    :func:`_forward_signals`); its exit status. A worker killed by a signal kills this
    process with the same signal, as a command run here would have died."""
    import signal

    try:
        kind, payload = _read_message(sock)
        number = int(payload) if kind in (b"X", b"K") else -1
    except (OSError, ValueError):
        kind, number = b"", -1
    finally:
        for name in FORWARDED:
            signal.signal(getattr(signal, name), signal.SIG_IGN)  # nothing to forward to
        os.close(pidfd)
    if kind == b"X" and 0 <= number <= 255:
        return number
    if kind == b"K" and 0 < number < signal.NSIG:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler; a closed pipe
            sys.stdout.flush()
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        return 128 + number  # a signal that does not end a process (SIGCHLD, say)
    print("orchestrator: the resident process ended before the command did", file=sys.stderr)
    return 1


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    """One message (a kind byte, a 4-byte length, at most REPLY_LIMIT bytes)."""
    head = read_exactly(sock, 5)
    (size,) = struct.unpack(">I", head[1:])
    if size > REPLY_LIMIT:
        raise ValueError("reply too long")
    return head[:1], read_exactly(sock, size)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ValueError("the other end closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def message(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


# --- finding and stopping ------------------------------------------------------------------


def find_server() -> int | None:
    """The pid of the resident process of this code for this user, if one is listening."""
    sock = _connect(to_send=False)
    if sock is None:
        return None
    with sock:
        pid, _, _ = peer_credentials(sock)
    return pid if pid > 0 else None  # 0: listening in a pid namespace this one cannot see


def stop_server(timeout: float = 10.0) -> int | None:
    """Stop the resident process (it stops listening at once; commands it is running go on
    to their end): its pid, or None when there was none."""
    import signal
    import time

    pid = find_server()
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    name = socket_name()
    directory = open_private(server_dir())
    try:
        deadline = time.monotonic() + timeout
        while name is not None and _exists(name, directory):
            if time.monotonic() > deadline:
                from .errors import ServerError

                raise ServerError(f"the resident process {pid} did not stop listening")
            time.sleep(0.01)
    finally:
        os.close(directory)
    return pid


def _exists(name: str, directory: int) -> bool:
    try:
        os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def serve(*, idle_timeout: float | None = None, ready_fd: int | None = None) -> int:
    """Be the resident process (:func:`orchestrator.server.serve`, imported only here: the
    client's half stays small)."""
    from .server import serve as serve_here

    return serve_here(idle_timeout=idle_timeout, ready_fd=ready_fd)
