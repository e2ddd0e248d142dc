"""The resident process (orchestrator/server.py, orchestrator/resident.py), for real: a
``serve`` process started here, commands sent to it by real clients, and clients that lie,
dawdle, die, or belong to someone else.

Every process is started as ``python -c LAUNCH ...`` (the same ``sys.path`` on both sides,
which the socket's name depends on); a client can write the engine modules it imported to a
file at its exit, which tells a served command (none imported) from one run in the client.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import resident

from .conftest import MakeRepo, git, live_processes_with

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open") or not os.path.isdir("/proc"), reason="Linux with pidfds"
)

LAUNCH = """
import atexit, os, sys
if os.environ.get("MODULES_FILE"):
    def _modules():
        heavy = sorted({m.split(".")[0] for m in sys.modules} & {"pydantic", "anyio", "envelopes", "rich"})
        with open(os.environ["MODULES_FILE"], "w") as f:
            f.write(" ".join(heavy))
    atexit.register(_modules)
from orchestrator.resident import entry
entry(sys.argv[1:])
"""

# Records where it ran and what it was given, then waits for out/<id>.go if asked to.
AGENT = """
import json, os, pathlib, resource, time
ancestors, pid = [], os.getpid()
while pid > 1:
    with open(f"/proc/{pid}/stat") as f:
        pid = int(f.read().rsplit(")", 1)[1].split()[1])
    ancestors.append(pid)
mask = os.umask(0); os.umask(mask)
record = {
    "ancestors": ancestors,
    "marker": os.environ.get("CLIENT_MARKER"),
    "umask": mask,
    "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    "sigign": int(next(l for l in open("/proc/self/status") if l.startswith("SigIgn:")).split()[1], 16),
}
task = os.environ["ORCHESTRATOR_TASK_ID"]
pathlib.Path(os.environ["RECORD_DIR"], task + ".json").write_text(json.dumps(record))
pathlib.Path("out.txt").write_text(task + "\\n")
while os.environ.get("WAIT") and not pathlib.Path(os.environ["RECORD_DIR"], "go").exists():
    time.sleep(0.05)
"""


class Resident:
    """A ``serve`` process and what its clients need to find it."""

    def __init__(self, process: subprocess.Popen[bytes], env: dict[str, str], home: Path) -> None:
        self.process = process
        self.env = env
        self.home = home
        self.directory = Path(env[resident.DIR_VARIABLE])

    def sockets(self) -> list[Path]:
        return sorted(self.directory.glob("*.sock"))

    def client(
        self, *argv: str, cwd: Path, env: dict[str, str] | None = None, **popen: Any
    ) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", LAUNCH, *argv],
            cwd=cwd,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )

    def behind(
        self, *wrapper: str, argv: tuple[str, ...], cwd: Path
    ) -> tuple[subprocess.CompletedProcess[str], str]:
        """A client started by *wrapper* (``setpriv ...``, ``unshare ...``), the rest as
        :meth:`run`: what it did, and the engine modules it imported itself."""
        modules = self.home / f"modules-{time.monotonic_ns()}"
        done = subprocess.run(
            [*wrapper, sys.executable, "-c", LAUNCH, *argv],
            cwd=cwd,
            env={**self.env, "MODULES_FILE": str(modules)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done, modules.read_text() if modules.exists() else "?"

    def run(
        self, *argv: str, cwd: Path, env: dict[str, str] | None = None, **popen: Any
    ) -> tuple[int, str, str, str]:
        """A client's exit code, stdout, stderr, and the engine modules it imported itself."""
        modules = self.home / f"modules-{time.monotonic_ns()}"
        process = self.client(
            *argv, cwd=cwd, env={"MODULES_FILE": str(modules), **(env or {})}, **popen
        )
        out, err = process.communicate(timeout=120)
        return process.returncode, out, err, modules.read_text() if modules.exists() else "?"


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def start_server(env: dict[str, str], cwd: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "serve", *extra],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Resident]:
    env = {k: v for k, v in os.environ.items() if k != resident.DISABLE_VARIABLE}
    env[resident.DIR_VARIABLE] = str(tmp_path / "sockets")
    process = start_server(env, tmp_path, "--idle-timeout", "600")
    server = Resident(process, env, tmp_path)
    try:
        wait_for(lambda: server.sockets() or process.poll() is not None, "the socket")
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        yield server
    finally:
        process.terminate()
        process.communicate(timeout=60)
        assert server.sockets() == []


@pytest.fixture
def project(make_repo: MakeRepo, tmp_path: Path) -> Path:
    """tmp_path/work: a repository "repo", the agent, and plan.yaml (one task, no venv)."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "records").mkdir()
    repo = make_repo(name="work/repo")
    (work / "agent.py").write_text(AGENT)
    plan = {
        "name": "served",
        "repo": "repo",
        "agents": {"a": {"command": [sys.executable, str(work / "agent.py")]}},
        "tasks": [{"id": "one", "agent": "a", "task": "t"}],
        "defaults": {"venv": False},
    }
    (work / "plan.yaml").write_text(json.dumps(plan))
    assert repo.is_dir()
    return work


def record(tmp_path: Path, task: str = "one") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / "records" / f"{task}.json").read_text())
    return data


def test_a_served_run_is_the_run_it_would_be(
    served: Resident, project: Path, tmp_path: Path
) -> None:
    env = {"CLIENT_MARKER": "from-the-client", "RECORD_DIR": str(tmp_path / "records")}
    code, out, err, modules = served.run("run", "plan.yaml", "--json", cwd=project, env=env)
    assert code == 0, err
    assert modules == ""  # the client imported none of the engine: the resident process ran it
    summary = json.loads(out)
    assert [result["status"] for result in summary["results"]] == ["succeeded"]
    seen = record(tmp_path)
    assert served.process.pid in seen["ancestors"]
    assert seen["marker"] == "from-the-client"  # the client's environment, not the server's
    code, out, err, _ = served.run(
        "verify", str(Path(summary["run_dir"]) / "report.json"), cwd=project
    )
    assert code == 0, err


def test_exit_codes_and_messages_are_the_clients(
    served: Resident, project: Path, tmp_path: Path
) -> None:
    code, out, err, modules = served.run("validate", "plan.yaml", cwd=project)
    assert (code, modules) == (0, "") and out.startswith("plan.yaml: OK"), err
    (project / "bad.yaml").write_text("tasks: [{agent: nobody, task: t}]\n")
    code, out, err, modules = served.run("validate", "bad.yaml", cwd=project)
    assert (code, modules) == (2, "")
    assert "nobody" in err and "Traceback" not in err
    code, out, err, _ = served.run("run", "missing.yaml", cwd=project)
    assert code == 2 and "missing.yaml" in err and "Traceback" not in err
    code, out, err, _ = served.run("run", "--concurrency", "zero", "plan.yaml", cwd=project)
    assert code == 2 and "not an integer" in err  # argparse's usage error, from the worker


def test_the_worker_takes_the_clients_umask_and_limits(
    served: Resident, project: Path, tmp_path: Path
) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(soft, 512)

    def as_client() -> None:
        os.umask(0o077)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))

    env = {"RECORD_DIR": str(tmp_path / "records")}
    code, out, err, modules = served.run(
        "run", "plan.yaml", "--json", cwd=project, env=env, preexec_fn=as_client
    )
    assert (code, modules) == (0, ""), err
    seen = record(tmp_path)
    assert seen["umask"] == 0o077 and seen["nofile"][0] == lower
    report = Path(json.loads(out)["run_dir"]) / "report.json"
    assert report.stat().st_mode & 0o777 == 0o600  # written under the client's umask


def test_signals_the_client_ignores_are_ignored_by_its_agents_and_no_others(
    served: Resident, project: Path, tmp_path: Path
) -> None:
    env = {"RECORD_DIR": str(tmp_path / "records")}
    usr1 = 1 << (signal.SIGUSR1 - 1)
    # (set either way: a machine's harness may ignore SIGUSR1 in pytest itself)
    for disposition, ignored in ((signal.SIG_IGN, True), (signal.SIG_DFL, False)):
        code, _, err, modules = served.run(
            "run",
            "plan.yaml",
            "--state-dir",
            str(tmp_path / str(ignored)),
            cwd=project,
            env=env,
            preexec_fn=lambda d=disposition: signal.signal(signal.SIGUSR1, d),
        )
        assert (code, modules) == (0, ""), err
        assert bool(record(tmp_path)["sigign"] & usr1) is ignored


def test_a_command_given_another_descriptor_is_served_with_it(
    served: Resident, project: Path
) -> None:
    modules = served.home / "modules-fd3"
    done = subprocess.run(
        ["sh", "-c", 'exec "$0" -c "$1" validate /dev/fd/3 3<plan.yaml', sys.executable, LAUNCH],
        cwd=project,
        env={**served.env, "MODULES_FILE": str(modules)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr
    assert modules.read_text() == ""  # served, descriptor 3 the worker's at the same number


def test_confined_processes_neither_serve_nor_are_served(
    served: Resident, project: Path, tmp_path: Path
) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv(1)")
    done, modules = served.behind(
        setpriv, "--no-new-privs", argv=("validate", "plan.yaml"), cwd=project
    )
    assert done.returncode == 0, done.stderr
    assert "resident" not in done.stderr  # it does not even look
    assert modules != ""
    refused = subprocess.run(
        [setpriv, "--no-new-privs", sys.executable, "-c", LAUNCH, "serve"],
        cwd=tmp_path,
        env={**served.env, resident.DIR_VARIABLE: str(tmp_path / "other-sockets")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1
    assert "this process is confined (NoNewPrivs set)" in refused.stderr


def test_ctrl_c_at_the_client_stops_the_run_it_started(
    served: Resident, project: Path, tmp_path: Path
) -> None:
    env = {"RECORD_DIR": str(tmp_path / "records"), "WAIT": "1"}
    client = served.client(  # SIGINT as a foreground command has it, whatever pytest's is
        "run",
        "plan.yaml",
        cwd=project,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for(lambda: (tmp_path / "records" / "one.json").exists(), "the agent")
    client.send_signal(signal.SIGINT)
    _, err = client.communicate(timeout=60)
    assert client.returncode == 130, err
    assert "interrupted" in err
    wait_for(lambda: not live_processes_with(str(project / "agent.py")), "the agent to be gone")
    assert git(project / "repo", "worktree", "list").count("\n") == 1


def test_a_killed_client_hangs_its_command_up(
    served: Resident, project: Path, tmp_path: Path
) -> None:
    env = {"RECORD_DIR": str(tmp_path / "records"), "WAIT": "1"}
    client = served.client("run", "plan.yaml", cwd=project, env=env)
    wait_for(lambda: (tmp_path / "records" / "one.json").exists(), "the agent")
    [worker] = [
        p
        for p in record(tmp_path)["ancestors"]
        if os.path.exists(f"/proc/{p}") and _parent(p) == served.process.pid
    ]
    client.kill()
    client.communicate(timeout=60)
    wait_for(lambda: not live_processes_with(str(project / "agent.py")), "the agent to be gone")
    wait_for(lambda: _parent(worker) != served.process.pid, "the worker to end")
    assert git(project / "repo", "worktree", "list").count("\n") == 1


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def connect(sock: socket.socket, path: Path) -> None:
    """*sock* connected to *path*, however long (a socket's address holds 108 bytes)."""
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.connect(resident.at(directory, path.name))
    finally:
        os.close(directory)


def _raw_request(path: Path, body: bytes, fds: list[int], *, declared: int | None = None) -> bytes:
    """Send *body* as a request with *fds*; everything the other end says before it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        connect(sock, path)
        sock.settimeout(30)
        head = struct.pack(">I", len(body) if declared is None else declared)
        if fds:
            socket.send_fds(sock, [head + body], fds)
        else:
            sock.sendall(head + body)
        chunks = []
        with contextlib.suppress(ConnectionResetError):  # closed with some of it unread
            while chunk := sock.recv(4096):
                chunks.append(chunk)
    return b"".join(chunks)


def _valid(argv: list[str], cwd: Path) -> dict[str, Any]:
    return {"argv": argv, "env": dict(os.environ), "umask": 0o022, "fds": []}


@pytest.mark.parametrize(
    "case",
    [
        "not json",
        "a list",
        "no descriptors",
        "too long",
        "not a served command",
        "env not strings",
        "null in argv",
        "bad umask",
        "descriptors it does not send",
    ],
)
def test_a_request_that_is_not_one_runs_nothing(
    served: Resident, project: Path, tmp_path: Path, case: str
) -> None:
    [path] = served.sockets()
    good = _valid(["run", "plan.yaml", "--state-dir", str(tmp_path / "state")], project)
    body = json.dumps(good).encode()
    declared = None
    fds = [0, 1, 2, os.open(project, os.O_PATH | os.O_DIRECTORY)]
    try:
        if case == "not json":
            body = b"{not json"
        elif case == "a list":
            body = b"[]"
        elif case == "too long":
            declared = resident.REQUEST_LIMIT + 1
        elif case == "not a served command":
            body = json.dumps({**good, "argv": ["gc", "--older-than", "0s"]}).encode()
        elif case == "env not strings":
            body = json.dumps({**good, "env": {"A": 1}}).encode()
        elif case == "null in argv":
            body = json.dumps({**good, "argv": ["run", "plan\0.yaml"]}).encode()
        elif case == "descriptors it does not send":
            body = json.dumps({**good, "fds": [7]}).encode()
        elif case == "bad umask":
            body = json.dumps({**good, "umask": 0o7777}).encode()
        reply = _raw_request(path, body, [] if case == "no descriptors" else fds, declared=declared)
    finally:
        os.close(fds[3])
    assert not reply.startswith(b"P")  # no worker became the command
    assert not (tmp_path / "state").exists()
    assert served.process.poll() is None
    code, _, err, modules = served.run("validate", "plan.yaml", cwd=project)  # still serving
    assert (code, modules) == (0, ""), err


def test_a_client_that_says_nothing_holds_nobody_up(served: Resident, project: Path) -> None:
    [path] = served.sockets()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        connect(silent, path)
        code, _, err, modules = served.run("validate", "plan.yaml", cwd=project)
        assert (code, modules) == (0, ""), err
        silent.settimeout(30)
        assert silent.recv(64)[:1] == b"X"  # its worker gave up (HANDSHAKE_TIMEOUT) and ended


def test_another_user_is_turned_away(served: Resident, project: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to become another user")
    base = Path(tempfile.mkdtemp(prefix="resident-", dir="/tmp"))  # others may pass through
    try:
        base.chmod(0o711)
        env = {**served.env, resident.DIR_VARIABLE: str(base / "sockets")}
        process = start_server(env, served.home, "--idle-timeout", "600")
        try:
            wait_for(lambda: list(base.glob("sockets/*.sock")), "the second socket")
            [path] = base.glob("sockets/*.sock")
            (base / "sockets").chmod(0o711)
            path.chmod(0o666)
            probe = f"""
import os, socket
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect({str(path)!r})
s.settimeout(30)
try:
    socket.send_fds(s, [b"\\0\\0\\0\\2{{}}"], [0, 1, 2, 0])
    print(repr(s.recv(64)))
except (BrokenPipeError, ConnectionResetError):  # closed, the request unread
    print("closed")
"""
            done = subprocess.run(
                [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
            )
            assert done.stdout.strip() in ("b''", "closed"), done.stderr  # closed: no worker
            # and a client of this user refuses a directory others may open: it runs the
            # command itself
            modules = served.home / "modules-open"
            done = subprocess.run(
                [sys.executable, "-c", LAUNCH, "validate", "plan.yaml"],
                cwd=project,
                env={**env, "MODULES_FILE": str(modules)},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0 and modules.read_text() != "", done.stderr
        finally:
            process.terminate()
            process.communicate(timeout=60)
    finally:
        shutil.rmtree(base)


def test_a_client_in_another_namespace_runs_its_command_itself(
    served: Resident, project: Path
) -> None:
    unshare = "/usr/bin/unshare"
    if not os.path.exists(unshare) or os.getuid() != 0:
        pytest.skip("needs unshare(1) as root")
    done, modules = served.behind(unshare, "--net", argv=("validate", "plan.yaml"), cwd=project)
    assert done.returncode == 0, done.stderr
    assert "will not run this (a different net namespace); running it here" in done.stderr
    assert modules != ""


def test_changed_code_makes_the_resident_process_stop_listening(
    served: Resident, project: Path
) -> None:
    marker = Path(resident.__file__).with_name("py.typed")
    before = marker.stat()
    try:
        os.utime(marker, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        served.process.wait(timeout=60)  # idle: it exits once it stopped listening
        assert served.sockets() == []
        code, _, err, modules = served.run("validate", "plan.yaml", cwd=project)
        assert code == 0 and modules != "", err  # no server for this code: run in the client
    finally:
        os.utime(marker, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_serve_refuses_a_second_one_and_an_open_directory(served: Resident, tmp_path: Path) -> None:
    second = start_server(served.env, tmp_path)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 1
    assert f"already listening (pid {served.process.pid})" in err.decode()
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    third = start_server({**served.env, resident.DIR_VARIABLE: str(open_dir)}, tmp_path)
    _, err = third.communicate(timeout=120)
    assert third.returncode == 1 and "may be opened by others" in err.decode()


def test_detach_status_and_stop(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != resident.DISABLE_VARIABLE}
    env[resident.DIR_VARIABLE] = str(tmp_path / "sockets")

    def command(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", LAUNCH, "serve", *argv],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert command("--status").returncode == 1
    started = command("--detach", "--idle-timeout", "120")
    assert started.returncode == 0, started.stderr
    pid = int(started.stdout.split("pid ")[1].rstrip(")\n"))
    status = command("--status")
    assert (status.returncode, status.stdout.strip()) == (
        0,
        f"a resident process is listening (pid {pid})",
    )
    stopped = command("--stop")
    assert stopped.stdout.strip() == f"stopped the resident process {pid}"
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z", "the server to exit")
    assert command("--status").returncode == 1
    assert command("--idle-timeout", "-1").returncode == 2


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
