"""The client's half of the resident process (orchestrator/resident.py): where it looks, for
which code, and what it makes of a resident process that answers oddly. The resident
process is played here by a thread of the test that says what each test needs; the real one
is in tests/test_server.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import resident
from orchestrator.errors import ServerError

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="Linux with pidfds")


@pytest.fixture
def sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "sockets"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv(resident.DIR_VARIABLE, str(directory))
    monkeypatch.delenv(resident.DISABLE_VARIABLE, raising=False)
    return directory


@pytest.fixture(autouse=True)
def handlers() -> Iterator[None]:
    """The client sets SIGINT, SIGTERM and SIGHUP while it waits: put them back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


Script = Callable[[socket.socket, dict[str, Any], list[int]], None]


class Fake:
    """A listener at the socket's name that plays *script* to the first client."""

    def __init__(self, directory: Path, script: Script) -> None:
        name = resident.socket_name()
        assert name is not None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where = os.open(directory, os.O_PATH | os.O_DIRECTORY)
        try:  # however long tmp_path is (a socket's address holds 108 bytes)
            self.listener.bind(resident.at(where, name))
        finally:
            os.close(where)
        self.listener.listen(1)
        self.script = script
        self.request: dict[str, Any] = {}
        self.fds: list[int] = []
        self.cwd = ""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data, self.fds, _, _ = socket.recv_fds(conn, 1 << 20, 4 + resident.MAX_INHERITED)
            (size,) = struct.unpack(">I", data[:4])
            while len(data) < 4 + size:
                data += conn.recv(1 << 20)
            self.request = json.loads(data[4:])
            if len(self.fds) >= 4:
                self.cwd = os.readlink(f"/proc/self/fd/{self.fds[3]}")
            for fd in self.fds:  # the client's stdout among them: its reader waits for EOF
                os.close(fd)
            self.script(conn, self.request, self.fds)

    def close(self) -> None:
        self.thread.join(30)
        self.listener.close()


def say(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def ready_then(*replies: bytes) -> Script:
    """Say the worker is this process, wait for the client's "A", then say *replies*."""

    def script(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        conn.sendall(say(b"P", str(os.getpid()).encode()))
        assert conn.recv(1) == b"A"
        for reply in replies:
            conn.sendall(reply)

    return script


def test_the_request_carries_what_the_command_is_run_with(
    sockets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIENT_MARKER", "mine")
    fake = Fake(sockets, ready_then(say(b"X", b"3")))
    try:
        assert resident._served(["validate", "plan.yaml"]) == 3
    finally:
        fake.close()
    request = fake.request
    assert request["argv"] == ["validate", "plan.yaml"]
    assert request["env"]["CLIENT_MARKER"] == "mine"
    mask = os.umask(0)
    os.umask(mask)
    assert request["umask"] == mask
    assert set(request) == {"argv", "env", "umask", "fds"}  # the rest the worker reads in /proc
    assert len(fake.fds) == 4 + len(request["fds"])  # the inherited ones, at their numbers
    assert fake.cwd == str(tmp_path)  # the client's working directory, as a descriptor


@pytest.mark.parametrize(
    ("replies", "code", "said"),
    [
        ((say(b"X", b"0"),), 0, ""),
        ((say(b"X", b"999"),), 1, "ended before the command did"),
        ((say(b"X", b"one"),), 1, "ended before the command did"),
        ((b"X\xff\xff\xff\xff",), 1, "ended before the command did"),  # a length past the limit
        ((), 1, "ended before the command did"),  # closed without a word
    ],
)
def test_what_the_worker_says_at_its_end(
    sockets: Path,
    capsys: pytest.CaptureFixture[str],
    replies: tuple[bytes, ...],
    code: int,
    said: str,
) -> None:
    fake = Fake(sockets, ready_then(*replies))
    try:
        assert resident._served(["run", "plan.yaml"]) == code
    finally:
        fake.close()
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(
    "reply",
    [
        say(b"Z", b"what"),
        say(b"P", b"not a pid"),
        b"P\x7f\xff\xff\xff",  # a length past the limit
        b"",  # closed at once
    ],
)
def test_an_odd_answer_before_the_start_leaves_the_command_to_the_client(
    sockets: Path, reply: bytes
) -> None:
    def script(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        conn.sendall(reply)

    fake = Fake(sockets, script)
    try:
        assert resident._served(["run", "plan.yaml"]) is None
    finally:
        fake.close()


def test_a_refusal_is_said_and_shown_safely(
    sockets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def script(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        conn.sendall(say(b"F", b"a different net namespace \x1b[31m"))

    fake = Fake(sockets, script)
    try:
        assert resident._served(["run", "plan.yaml"]) is None
    finally:
        fake.close()
    err = capsys.readouterr().err
    assert "will not run this (a different net namespace ?[31m); running it here" in err


CLIENT = """
import sys
from orchestrator import resident
resident.socket_name = lambda: sys.argv[1]
code = resident._served(["run", "plan.yaml"])
print("none" if code is None else code, flush=True)
"""


def client_process(**popen: Any) -> subprocess.Popen[str]:
    """A client in a process of its own (it may kill itself), looking for the socket name
    the fakes of this process use."""
    name = resident.socket_name()
    assert name is not None
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, name], stdout=subprocess.PIPE, text=True, **popen
    )


def test_a_worker_killed_by_a_signal_kills_its_client_with_it(sockets: Path) -> None:
    fake = Fake(sockets, ready_then(say(b"K", b"15")))
    try:
        client = client_process()
        out, _ = client.communicate(timeout=60)
    finally:
        fake.close()
    assert (client.returncode, out) == (-signal.SIGTERM, "")  # died as the command did


def _signal_a_client(sockets: Path, signum: int, disposition: Any) -> tuple[int, int | None]:
    """A client started with *signum* at *disposition*, whose worker (a sleeping child
    here) reports its own end once the client got *signum*: the client's exit status and
    the child's (None: still alive half a second later)."""
    # The worker: a sleeping child with the client's dispositions, as a real worker takes them.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        preexec_fn=lambda: signal.signal(signum, disposition),
    )

    def script(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        client_pid, _, _ = resident.peer_credentials(conn)
        conn.sendall(say(b"P", str(child.pid).encode()))
        assert conn.recv(1) == b"A"
        os.kill(client_pid, signum)  # as Ctrl-C at the client would
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(0.5 if disposition is signal.SIG_IGN else 30)
        if child.returncode is None:
            conn.sendall(say(b"X", b"0"))
        else:
            conn.sendall(say(b"K", str(-child.returncode).encode()))

    fake = Fake(sockets, script)
    try:  # (the disposition set, whatever this process's harness has)
        client = client_process(preexec_fn=lambda: signal.signal(signum, disposition))
        client.communicate(timeout=60)
    finally:
        fake.close()
        ended = child.poll()
        child.kill()
        child.wait()
    return client.returncode, ended


def test_a_stopping_signal_goes_to_the_worker(sockets: Path) -> None:
    """SIGINT at the client reaches the process the worker said it was, and the client dies
    by it as the worker did."""
    client, child = _signal_a_client(sockets, signal.SIGINT, signal.SIG_DFL)
    assert (client, child) == (-signal.SIGINT, -signal.SIGINT)


def test_a_signal_the_client_ignores_is_ignored_by_its_worker(sockets: Path) -> None:
    """A client started with SIGHUP ignored (nohup): passed on, and ignored there too."""
    client, child = _signal_a_client(sockets, signal.SIGHUP, signal.SIG_IGN)
    assert (client, child) == (0, None)


def test_the_descriptors_it_inherited_are_found(tmp_path: Path) -> None:
    probe = "from orchestrator import resident; print(resident.inherited_descriptors())"
    alone = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert alone.stdout.strip() == "[]", alone.stderr
    with open(tmp_path / "given", "w") as given:  # as a shell's 3>given
        number = given.fileno()
        handed = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, pass_fds=(number,)
        )
    assert handed.stdout.strip() == f"[{number}]", handed.stderr


def test_no_listener_no_directory_or_asked_not_to(
    sockets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = resident.socket_name()
    assert name is not None
    where = os.open(sockets, os.O_PATH | os.O_DIRECTORY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(resident.at(where, name))  # a socket file nobody listens on
    os.close(where)
    assert resident._served(["run", "plan.yaml"]) is None
    assert resident.find_server() is None
    monkeypatch.setenv(resident.DIR_VARIABLE, str(sockets / "missing"))
    assert resident._served(["run", "plan.yaml"]) is None
    monkeypatch.setenv(resident.DIR_VARIABLE, str(sockets))
    monkeypatch.setenv(resident.DISABLE_VARIABLE, "1")
    (sockets / name).unlink()
    fake = Fake(sockets, ready_then(say(b"X", b"0")))
    try:
        assert resident._served(["run", "plan.yaml"]) is None  # not even asked
    finally:
        monkeypatch.delenv(resident.DISABLE_VARIABLE)
        assert resident._served(["run", "plan.yaml"]) == 0  # (lets the fake's thread end)
        fake.close()


def test_the_sockets_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {resident.DIR_VARIABLE: "/x/mine", "XDG_RUNTIME_DIR": "/run/user/7"}
    assert resident.server_dir(env) == "/x/mine"
    del env[resident.DIR_VARIABLE]
    assert resident.server_dir(env) == "/run/user/7/worktree-orchestrator"
    env["XDG_RUNTIME_DIR"] = "relative/dir"  # not a runtime directory: ignored
    assert resident.server_dir(env) == f"/tmp/worktree-orchestrator-{os.getuid()}"


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda p: None, "No such file"),
        (lambda p: p.write_text(""), "is not a directory"),
        (lambda p: p.symlink_to(p.with_name("real")), "is not a directory"),
        (lambda p: p.mkdir(mode=0o755) or p.chmod(0o755), "may be opened by others"),
        (lambda p: p.mkdir(mode=0o700) or os.chown(p, 65534, 65534), "belongs to another user"),
    ],
    ids=["missing", "file", "symlink", "open", "someone-else's"],
)
def test_a_directory_others_could_use_is_refused(
    tmp_path: Path, make: Callable[[Path], object], why: str
) -> None:
    if why == "belongs to another user" and os.getuid() != 0:
        pytest.skip("needs root to give a directory away")
    (tmp_path / "real").mkdir(mode=0o700)
    path = tmp_path / "sockets"
    make(path)
    with pytest.raises(ServerError, match=why):
        resident.open_private(str(path))
    fd = resident.open_private(str(tmp_path / "real"))
    os.close(fd)


def test_the_signature_follows_the_code_and_its_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = resident.signature()
    assert first is not None and first == resident.signature()
    monkeypatch.setenv("PYTHONWARNINGS", "error")
    assert resident.signature() != first
    monkeypatch.delenv("PYTHONWARNINGS")
    monkeypatch.setenv("ORCHESTRATOR_ANYTHING", "else")  # read when a command runs: no matter
    assert resident.signature() == first
    monkeypatch.setattr(sys, "path", [*sys.path, "/elsewhere"])
    assert resident.signature() != first
