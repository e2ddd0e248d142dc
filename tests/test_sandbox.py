"""Isolation end to end: the bubblewrap sandbox, the environment policy, resource limits, and
agents that die with the orchestrator. Real repositories, real bwrap, real processes."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import EnvSpec, Limits, Plan, Report, expand_tasks, json_schemas
from orchestrator import PlanError, Workspace, orchestrate_parallel, process
from orchestrator.plan import envelopes_of, parse_plan
from orchestrator.process import TAG_VARIABLE
from orchestrator.sandbox import (
    SandboxLayout,
    bwrap_argv,
    find_bwrap,
    sandbox_problem,
    system_hidden,
)
from orchestrator.sandbox_git import import_loose_objects

from .conftest import MakeRepo, cli, git, live_processes_with


def _bwrap_works() -> bool:
    bwrap = find_bwrap()
    if bwrap is None:
        return False
    probe = SandboxLayout(cwd=Path("/"))
    return (
        subprocess.run(bwrap_argv(probe, ["true"], bwrap=bwrap), capture_output=True).returncode
        == 0
    )


needs_bwrap = pytest.mark.skipif(not _bwrap_works(), reason="bwrap is missing or cannot run here")

WriteAgent = Callable[[str, str], Path]


def run_plan(plan: dict[str, Any], repo: Path | None, **options: Any) -> Report:
    report: Report = anyio.run(
        lambda: orchestrate_parallel(plan, repo=repo, venv_backend="uv", **options)
    )
    return report


def agent_plan(script: Path, tasks: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "agents": {"a": {"command": ["python", str(script)]}},
        "tasks": [{"agent": "a", "task": "probe", **t} for t in tasks],
        **extra,
    }


def outputs(report: Report) -> dict[str, dict[str, Any]]:
    return {r.task_id: r.output or {} for r in report.results}


# --- The plan: fields, layering, schema -------------------------------------------------------


def test_env_takes_a_plain_mapping_or_the_structured_form() -> None:
    plan = Plan.model_validate(
        {
            "defaults": {"env": {"A": "1"}},
            "agents": {"a": {"command": "x", "env": {"inherit": False, "pass": ["HOME"]}}},
            "tasks": [
                {"agent": "a", "task": "t", "env": {"set": {"B": "2"}, "pass": ["LANG"]}},
                {"agent": "a", "task": "t", "env": {"set": "a variable named set"}},
            ],
        }
    )
    assert plan.defaults.env == {"A": "1"}
    assert plan.tasks[0].env == EnvSpec.model_validate({"set": {"B": "2"}, "pass": ["LANG"]})
    assert plan.tasks[1].env == {"set": "a variable named set"}
    # Written as read, so that plan.json reads back to the same plan (and digest).
    data = plan.model_dump(mode="json")
    assert data["tasks"][0]["env"] == {"inherit": None, "pass": ["LANG"], "set": {"B": "2"}}
    assert Plan.model_validate(data) == plan
    first, second = envelopes_of(plan)
    assert first.env == {"A": "1", "B": "2"} and second.env == {
        "A": "1",
        "set": "a variable named set",
    }
    assert first.pass_env == ["HOME", "LANG"] and first.inherit_env is False
    assert second.inherit_env is False  # the agent's


def test_a_matrix_varies_env_in_either_form() -> None:
    plan = Plan.model_validate(
        {
            "agents": {"a": {"command": "x"}},
            "tasks": [
                {
                    "id": "p",
                    "agent": "a",
                    "task": "t",
                    "env": {"A": "1"},
                    "matrix": {"env.M": ["x"]},
                },
                {
                    "id": "s",
                    "agent": "a",
                    "task": "t",
                    "env": {"inherit": False},
                    "matrix": {"env.M": ["y"]},
                },
            ],
        }
    )
    specs = {e.task_id: e.spec.env for e in expand_tasks(plan)}
    assert specs["p[x]"] == {"A": "1", "M": "x"}
    assert specs["s[y]"] == EnvSpec(inherit=False, set={"M": "y"})


def test_isolation_fields_layer_task_over_agent_over_defaults() -> None:
    plan = Plan.model_validate(
        {
            "defaults": {
                "sandbox": "bwrap",
                "limits": {"memory_mb": 512, "cpu_s": 60},
                "secrets": ["API_KEY"],
                "max_commit_mb": 20,
            },
            "agents": {
                "a": {
                    "command": "x",
                    "network": True,
                    "limits": {"cpu_s": 30},
                    "secrets": ["TOKEN"],
                },
                "b": {"command": "y", "sandbox": "none"},
            },
            "tasks": [
                {"id": "one", "agent": "a", "task": "t", "limits": {"open_files": 64}},
                {"id": "two", "agent": "a", "task": "t", "network": False, "max_commit_mb": 1},
                {"id": "three", "agent": "b", "task": "t", "secrets": ["API_KEY", "OTHER"]},
            ],
        }
    )
    one, two, three = envelopes_of(plan)
    assert (one.sandbox, one.network, one.inherit_env) == ("bwrap", True, False)
    assert one.limits == Limits(memory_mb=512, cpu_s=30, open_files=64)
    assert one.secrets == ["API_KEY", "TOKEN"] and one.max_commit_mb == 20
    assert (two.network, two.max_commit_mb) == (False, 1)
    assert (three.sandbox, three.inherit_env, three.network) == ("none", True, False)
    assert three.secrets == ["API_KEY", "OTHER"]
    assert three.limits == Limits(memory_mb=512, cpu_s=60)


def test_isolation_problems_are_located() -> None:
    text = textwrap.dedent(
        """\
        agents:
          a:
            command: x
            sandbox: docker
        tasks:
          - agent: a
            task: t
            limits: {memory_mb: 0, swap_mb: 1}
            env: {A: 3}
          - agent: a
            task: t
            env: {inherit: "no", pass: [BAD-NAME]}
        """
    )
    with pytest.raises(PlanError) as caught:
        parse_plan(text, file="plan.yaml")
    assert [str(i) for i in caught.value.issues] == [
        "plan.yaml:4:5: agents.a.sandbox: must be one of 'none' or 'bwrap', found 'docker'",
        "plan.yaml:8:14: tasks[0].limits.memory_mb: must be > 0, found 0",
        "plan.yaml:8:28: tasks[0].limits.swap_mb: unknown key",
        "plan.yaml:9:11: tasks[0].env.A: must be a string, found 3",
        "plan.yaml:12:11: tasks[1].env.inherit: must be true or false, found 'no'",
        "plan.yaml:12:33: tasks[1].env.pass[0]: 'BAD-NAME' is not a variable name (letters, digits and _)",
    ]


def test_the_schema_accepts_both_forms_of_env() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schemas()["plan"]
    for env in ({}, {"A": "1"}, {"inherit": False, "pass": ["HOME"], "set": {"A": "1"}}):
        document = {
            "defaults": {"env": env, "sandbox": "bwrap", "limits": {"cpu_s": 1}},
            "agents": {"a": {"command": ["x"], "env": env, "network": True}},
            "tasks": [{"agent": "a", "task": "t", "env": env, "secrets": ["K"]}],
        }
        jsonschema.validate(document, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tasks": [{"task": "t", "limits": {"cpu_s": 0}}]}, schema)
    envelope = envelopes_of(Plan.model_validate(document))[0]
    jsonschema.validate(envelope.to_json_dict(), json_schemas()["envelope"])


def test_bwrap_argv_mounts_parents_first() -> None:
    layout = SandboxLayout(
        cwd=Path("/r/.git/s/wt"),
        hide=[Path("/r"), Path("/r/.git/s")],
        read_only=[Path("/r/.git")],
        writable=[Path("/r/.git/s/wt")],
        mounts=[(Path("/x/refs"), Path("/r/.git/refs/heads/o"), True)],
    )
    argv = bwrap_argv(layout, ["agent", "--flag"], bwrap="bwrap")
    assert argv[:8] == ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    targets = [argv[i + 1] for i, a in enumerate(argv) if a == "--tmpfs"]
    targets += [argv[i + 2] for i, a in enumerate(argv) if a in ("--bind", "--ro-bind")]
    order = {t: argv.index(t, 8) for t in ("/r", "/r/.git", "/r/.git/s", "/r/.git/s/wt")}
    assert order["/r"] < order["/r/.git"] < order["/r/.git/s"] < order["/r/.git/s/wt"]
    assert "/r/.git/refs/heads/o" in targets
    assert "--unshare-net" in argv and argv[-3:] == ["--", "agent", "--flag"]
    layout.network = True
    assert "--unshare-net" not in bwrap_argv(layout, ["agent"])


def test_a_sandboxed_plan_is_refused_without_bwrap(
    make_repo: MakeRepo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = make_repo()
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"repo: {json.dumps(str(repo))}\n"
        "defaults:\n  sandbox: bwrap\n"
        "agents:\n  a: {command: [python, x.py]}\n"
        "tasks:\n  - {agent: a, task: t}\n  - {agent: a, task: t, sandbox: none}\n"
    )
    bin_dir = tmp_path / "bin"  # git, and no bwrap
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(str(shutil.which("git")))
    monkeypatch.setenv("PATH", str(bin_dir))
    for command in ("validate", "run"):
        outcome = cli(capsys, command, str(plan))
        assert outcome.code == 2
        assert outcome.err.strip().splitlines()[-1] == (
            f"{plan}:3:3: defaults.sandbox: sandbox: bwrap: bwrap (bubblewrap) is not on PATH; "
            "install it (apt-get install bubblewrap, dnf install bubblewrap) or set sandbox: none"
        )
    assert not (repo / ".git" / "orchestrator" / "runs").exists()


def test_a_callable_agent_cannot_be_sandboxed(tmp_path: Path) -> None:
    async def agent(envelope: Any, workspace: Workspace) -> dict[str, Any]:
        return {"ran": True}

    plan = {
        "defaults": {"sandbox": "bwrap", "worktree": False, "venv": False},
        "tasks": [{"agent": "inline", "task": "t"}],
    }
    report: Report = anyio.run(
        lambda: orchestrate_parallel(plan, agents={"inline": agent}, state_dir=tmp_path)
    )
    (result,) = report.results
    assert result.status == "failed" and result.error is not None
    assert result.error.message == "agent 'inline' runs in this process: it cannot be sandboxed"


# --- The environment policy ----------------------------------------------------------------

ENV_AGENT = """
import json, os
json.dump(dict(os.environ), open(os.environ["ORCHESTRATOR_OUTPUT"], "w"))
"""

BASE = {"PATH", "HOME", "LANG", "TERM", "TMPDIR", "USER", "VIRTUAL_ENV", TAG_VARIABLE}


@pytest.mark.parametrize("sandbox", ["none", pytest.param("bwrap", marks=needs_bwrap)])
def test_inherit_false_gives_only_the_base_and_what_is_passed(
    make_repo: MakeRepo, write_agent: WriteAgent, monkeypatch: pytest.MonkeyPatch, sandbox: str
) -> None:
    repo = make_repo()
    script = write_agent("env", ENV_AGENT)
    monkeypatch.setenv("PASSED_ONE", "yes")
    monkeypatch.setenv("NOT_PASSED", "no")
    monkeypatch.setenv("TERM", "xterm")
    plan = agent_plan(
        script,
        [{"id": "strict", "env": {"inherit": False, "pass": ["PASSED_ONE"], "set": {"S": "1"}}}],
        defaults={"sandbox": sandbox},
    )
    report = run_plan(plan, repo)
    env = outputs(report)["strict"]
    assert report.results[0].status == "succeeded", report.results[0].error
    assert env["PASSED_ONE"] == "yes" and env["S"] == "1" and "NOT_PASSED" not in env
    extra = {k for k in env if not k.startswith("ORCHESTRATOR_")} - BASE - {"PASSED_ONE", "S"}
    # bwrap sets PWD; the sandbox sends new git objects to the attempt's private store.
    allowed = {"PWD", "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES"}
    assert extra <= (allowed if sandbox == "bwrap" else set()), extra
    venv_bin = Path(env["VIRTUAL_ENV"]) / "bin"
    assert env["PATH"] == f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["TERM"] == "xterm"


@needs_bwrap
def test_a_sandboxed_agent_inherits_nothing_unless_told(
    make_repo: MakeRepo, write_agent: WriteAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo()
    script = write_agent("env", ENV_AGENT)
    monkeypatch.setenv("FROM_ORCHESTRATOR", "1")
    plan = agent_plan(
        script,
        [{"id": "default"}, {"id": "inherits", "env": {"inherit": True}}],
        defaults={"sandbox": "bwrap", "venv": False},
    )
    env = outputs(run_plan(plan, repo))
    assert "FROM_ORCHESTRATOR" not in env["default"]
    assert env["inherits"]["FROM_ORCHESTRATOR"] == "1"
    # Inside, HOME is an empty private directory and TMPDIR the private /tmp.
    assert env["default"]["TMPDIR"] == env["inherits"]["TMPDIR"] == "/tmp"


# --- The sandbox ---------------------------------------------------------------------------

HOSTILE_AGENT = r"""
import json, os, socket, subprocess, sys, time

main, port, sibling = os.environ["MAIN"], int(os.environ["PORT"]), os.environ["SIBLING"]
common = os.path.join(main, ".git")
tried = {}

def attempt(name, action):
    try:
        action()
        tried[name] = "done"
    except Exception as exc:
        tried[name] = f"{type(exc).__name__}: {exc}"

def git(*args):
    done = subprocess.run(["git", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip())

def append(path):
    with open(path, "a") as f:
        f.write("pwned\n")

def connect():
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"hello")

attempt("read_main", lambda: open(os.path.join(main, "src", "file0000.txt")).read())
tried["neighbours"] = os.listdir(os.path.dirname(os.getcwd()))
sibling_path = os.path.join(os.path.dirname(os.getcwd()), sibling)
attempt("write_sibling", lambda: append(os.path.join(sibling_path, "src", "file0000.txt")))
attempt("write_config", lambda: append(os.path.join(common, "config")))
attempt("write_hook", lambda: append(os.path.join(common, "hooks", "post-commit")))
attempt("move_main", lambda: git("update-ref", "refs/heads/main", "HEAD"))
attempt("write_object", lambda: append(os.path.join(common, "objects", "pwned")))
attempt("connect", connect)
if os.fork() == 0:  # a daemon: double fork, new session, sleeps on
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "DAEMON-MARK"])
    os._exit(0)
os.wait()
with open("mine.txt", "w") as f:
    f.write(os.environ["ORCHESTRATOR_TASK_ID"] + "\n")
git("-c", "user.name=Agent", "-c", "user.email=agent@example.com", "add", "mine.txt")
git("-c", "user.name=Agent", "-c", "user.email=agent@example.com", "commit", "-q", "-m", "agent's own")
with open("after.txt", "w") as f:
    f.write("left for the orchestrator to commit\n")
json.dump(tried, open(os.environ["ORCHESTRATOR_OUTPUT"], "w"))
"""


class Listener:
    """A TCP server on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


def wait_gone(marker: str, deadline_s: float = 2.0) -> list[int]:
    """Pids still carrying *marker* once they are all gone or *deadline_s* has passed."""
    deadline = time.monotonic() + deadline_s
    while (left := live_processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


@needs_bwrap
def test_a_sandboxed_agent_cannot_reach_what_is_not_its_own(
    make_repo: MakeRepo, write_agent: WriteAgent, listener: Listener
) -> None:
    repo = make_repo()
    hook = repo / ".git" / "hooks" / "post-commit"
    hook.write_text("#!/bin/sh\nexit 0\n")
    config_before = (repo / ".git" / "config").read_text()
    main_before = git(repo, "rev-parse", "main")
    script = write_agent("hostile", HOSTILE_AGENT)
    tasks = [
        {"id": me, "env": {"MAIN": str(repo), "PORT": str(listener.port), "SIBLING": other}}
        for me, other in (("t1", "t2"), ("t2", "t1"))
    ]
    report = run_plan(agent_plan(script, tasks, defaults={"sandbox": "bwrap"}), repo, pool=0)
    assert [r.status for r in report.results] == ["succeeded", "succeeded"], report.errors
    for result in report.results:
        tried = result.output or {}
        assert tried["read_main"].startswith("FileNotFoundError"), tried
        assert tried["neighbours"] == [result.task_id], tried
        assert tried["write_sibling"].startswith("FileNotFoundError"), tried
        for name in ("write_config", "write_hook", "write_object"):
            assert "Read-only file system" in tried[name], tried
        assert "Read-only file system" in tried["move_main"], tried
        assert tried["connect"].startswith("ConnectionRefusedError"), tried
        # Its own commit is kept, under the orchestrator's, which holds what it left.
        commit = result.provenance.result_commit
        assert git(repo, "log", "--format=%s", str(commit)).splitlines() == [
            f"a: probe [task {result.task_id}]",
            "agent's own",
            "initial",
        ]
        assert git(repo, "show", f"{commit}:mine.txt") == result.task_id
        assert git(repo, "show", f"{commit}~1:mine.txt") == result.task_id
        assert "after.txt" in git(repo, "ls-tree", "--name-only", str(commit)).splitlines()
        assert git(repo, "rev-parse", f"refs/heads/{result.branch}") == commit
    assert listener.accepted == 0
    assert (repo / ".git" / "config").read_text() == config_before
    assert hook.read_text() == "#!/bin/sh\nexit 0\n"
    assert git(repo, "rev-parse", "main") == main_before
    assert not (repo / ".git" / "objects" / "pwned").exists()
    assert git(repo, "status", "--porcelain") == ""
    assert wait_gone("DAEMON-MARK") == []
    subprocess.run(["git", "-C", str(repo), "fsck", "--strict"], check=True, capture_output=True)
    assert not list((repo / ".git" / "orchestrator" / "runs").glob("*/sandbox/*"))


@needs_bwrap
def test_network_true_reaches_the_host(
    make_repo: MakeRepo, write_agent: WriteAgent, listener: Listener
) -> None:
    repo = make_repo()
    script = write_agent(
        "connect",
        f"""
        import socket
        socket.create_connection(("127.0.0.1", {listener.port}), timeout=5).close()
        """,
    )
    plan = agent_plan(
        script, [{"id": "net", "network": True}], defaults={"sandbox": "bwrap", "venv": False}
    )
    report = run_plan(plan, repo)
    assert report.results[0].status == "succeeded", report.errors
    assert listener.accepted == 1


@needs_bwrap
def test_a_branch_moved_off_its_start_is_refused(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo()
    script = write_agent(
        "orphan",
        """
        import subprocess
        def git(*args):
            return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()
        empty_tree = git("hash-object", "-t", "tree", "-w", "/dev/null")
        orphan = git("-c", "user.name=A", "-c", "user.email=a@example.com", "commit-tree", empty_tree, "-m", "unrelated")
        git("update-ref", "HEAD", orphan)  # its own branch: allowed, but not kept
        open("file.txt", "w").write("work\\n")
        """,
    )
    plan = agent_plan(script, [{"id": "orphan"}], defaults={"sandbox": "bwrap", "venv": False})
    result = run_plan(plan, repo).results[0]
    assert result.status == "failed" and result.error is not None
    assert result.error.kind == "commit"
    assert "which is not a commit built on" in result.error.message
    # The orchestrator still commits what the agent left, on the branch as it started.
    commit = result.provenance.result_commit
    assert git(repo, "rev-parse", f"{commit}~1") == git(repo, "rev-parse", "main")
    assert git(repo, "show", f"{commit}:file.txt") == "work"


@needs_bwrap
def test_a_retried_sandboxed_task_keeps_only_its_last_attempts_commits(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo()
    script = write_agent(
        "twice",
        """
        import os, subprocess, sys
        attempt = os.environ["ORCHESTRATOR_OUTPUT"].rsplit("attempt-", 1)[1].split(".")[0]
        open(f"attempt-{attempt}.txt", "w").write(attempt)
        ident = ["-c", "user.name=A", "-c", "user.email=a@example.com"]
        subprocess.run(["git", *ident, "add", "."], check=True)
        subprocess.run(["git", *ident, "commit", "-q", "-m", f"attempt {attempt}"], check=True)
        sys.exit(1 if attempt == "1" else 0)
        """,
    )
    plan = agent_plan(
        script, [{"id": "twice", "retries": 1}], defaults={"sandbox": "bwrap", "venv": False}
    )
    result = run_plan(plan, repo).results[0]
    assert result.status == "succeeded" and result.attempts == 2, result.error
    commit = str(result.provenance.result_commit)
    assert git(repo, "log", "--format=%s", commit).splitlines()[1:] == ["attempt 2", "initial"]
    assert "attempt-1.txt" not in git(repo, "ls-tree", "--name-only", commit).splitlines()


@needs_bwrap
def test_a_sandboxed_agent_past_its_timeout_is_gone(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo()
    script = write_agent(
        "slow",
        """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "SLOW-MARK"])
        time.sleep(60)
        """,
    )
    plan = agent_plan(
        script, [{"id": "slow", "timeout": 1}], defaults={"sandbox": "bwrap", "venv": False}
    )
    result = run_plan(plan, repo).results[0]
    assert result.status == "timed_out"
    assert live_processes_with("SLOW-MARK") == []


def test_only_loose_objects_that_are_what_they_say_are_taken(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    source = tmp_path / "private"
    other = make_repo(name="other")
    (tmp_path / "fresh.txt").write_text("fresh content\n")
    fresh = git(other, "hash-object", "-w", str(tmp_path / "fresh.txt"))
    (source / fresh[:2]).mkdir(parents=True)
    shutil.copyfile(
        other / ".git" / "objects" / fresh[:2] / fresh[2:], source / fresh[:2] / fresh[2:]
    )
    existing = git(repo, "rev-parse", "HEAD:src/file0000.txt")
    forged = existing[:2] + "0" * 38  # valid content under a name it does not hash to
    (source / forged[:2]).mkdir(exist_ok=True)
    shutil.copyfile(
        repo / ".git" / "objects" / existing[:2] / existing[2:], source / forged[:2] / forged[2:]
    )
    linked = "ee" + "1" * 38
    (source / "ee").mkdir()
    (source / "ee" / linked[2:]).symlink_to(repo / ".git" / "config")
    target = repo / ".git" / "objects"
    assert import_loose_objects(source, target, 40) == 1
    assert git(repo, "cat-file", "-p", fresh) == "fresh content"
    assert not (target / forged[:2] / forged[2:]).exists()
    assert not (target / "ee" / linked[2:]).exists()


# --- Limits --------------------------------------------------------------------------------

LIMIT_AGENTS = {
    "memory_mb": ("x = bytearray(400 * 1024 * 1024)", {"memory_mb": 150}),
    "cpu_s": ("while True: pass", {"cpu_s": 1}),
    "file_size_mb": ("open('big.bin', 'wb').write(b'x' * (3 << 20))", {"file_size_mb": 1}),
    "open_files": ("files = [open(__file__) for _ in range(200)]", {"open_files": 32}),
    "processes": (
        "import os, time\npids = [os.fork() or time.sleep(5) for _ in range(100)]",
        {"processes": 8},
    ),
}
EXPECTED = {
    "memory_mb": "exceeded limits.memory_mb (150 MB): exited with code 1: MemoryError",
    "cpu_s": "exceeded limits.cpu_s (1s of CPU): killed by SIGXCPU",
    "file_size_mb": (
        "exceeded limits.file_size_mb (1 MB per file): exited with code 1: "
        "OSError: [Errno 27] File too large"
    ),
    "open_files": "exceeded limits.open_files (32 files): exited with code 1: OSError: [Errno 24] Too many open files",
    "processes": (
        "exceeded limits.processes (8 processes): exited with code 1: "
        "BlockingIOError: [Errno 11] Resource temporarily unavailable"
    ),
}


@pytest.mark.parametrize("sandbox", ["none", pytest.param("bwrap", marks=needs_bwrap)])
@pytest.mark.parametrize("limit", sorted(LIMIT_AGENTS))
def test_an_agent_over_a_limit_fails_with_that_limit(
    make_repo: MakeRepo, write_agent: WriteAgent, limit: str, sandbox: str
) -> None:
    if limit == "processes" and os.geteuid() == 0:
        pytest.skip("the kernel does not count processes for root (RLIMIT_NPROC)")
    repo = make_repo()
    source, limits = LIMIT_AGENTS[limit]
    script = write_agent(limit, source)
    within = write_agent(
        "within",
        """
        import json, os, resource
        names = ["AS", "CPU", "NOFILE", "FSIZE", "NPROC", "CORE"]
        limits = {n: resource.getrlimit(getattr(resource, "RLIMIT_" + n)) for n in names}
        json.dump(limits, open(os.environ["ORCHESTRATOR_OUTPUT"], "w"))
        """,
    )
    plan = {
        "agents": {
            "over": {"command": [sys.executable, str(script)]},
            "within": {"command": [sys.executable, str(within)]},
        },
        "defaults": {"sandbox": sandbox, "venv": False, "limits": limits, "timeout": 60},
        "tasks": [
            {"id": "over", "agent": "over", "task": "t"},
            {"id": "within", "agent": "within", "task": "t"},
        ],
    }
    report = run_plan(plan, repo)
    over, within_result = report.results
    assert over.status == "failed" and over.error is not None
    assert over.error.kind == "limit" and over.error.message.startswith(EXPECTED[limit])
    assert within_result.status == "succeeded", within_result.error
    seen = (within_result.output or {})[
        {
            "memory_mb": "AS",
            "cpu_s": "CPU",
            "file_size_mb": "FSIZE",
            "open_files": "NOFILE",
            "processes": "NPROC",
        }[limit]
    ]
    value = next(iter(limits.values()))
    unit = 1 << 20 if limit in ("memory_mb", "file_size_mb") else 1
    assert seen[0] == value * unit
    assert (within_result.output or {})["CORE"] == [0, 0]


def test_limits_without_prlimit_are_set_in_the_child(
    make_repo: MakeRepo, write_agent: WriteAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "_prlimit", lambda: None)  # util-linux missing: a preexec_fn
    repo = make_repo()
    source, limits = LIMIT_AGENTS["file_size_mb"]
    script = write_agent("big", source)
    plan = agent_plan(script, [{"id": "big"}], defaults={"venv": False, "limits": limits})
    plan["tasks"].append({"id": "missing", "agent": "gone", "task": "t"})
    plan["agents"]["gone"] = {"command": ["/nonexistent/agent"]}
    big, missing = run_plan(plan, repo).results
    assert big.error is not None and big.error.message.startswith(EXPECTED["file_size_mb"])
    assert missing.error is not None
    assert missing.error.message == "cannot start /nonexistent/agent: No such file or directory"


def test_a_program_that_cannot_start_is_told_as_without_limits(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    not_executable = tmp_path / "agent.sh"
    not_executable.write_text("#!/bin/sh\n")
    plan = {
        "agents": {
            "gone": {"command": ["/nonexistent/agent"]},
            "noexec": {"command": [str(not_executable)]},
        },
        "defaults": {"venv": False, "limits": {"cpu_s": 10}},
        "tasks": [
            {"id": "gone", "agent": "gone", "task": "t"},
            {"id": "noexec", "agent": "noexec", "task": "t"},
        ],
    }
    gone, noexec = run_plan(plan, repo).results
    assert gone.error is not None and noexec.error is not None
    assert gone.error.message == "cannot start /nonexistent/agent: No such file or directory"
    assert noexec.error.message == f"cannot start {not_executable}: Permission denied"


def test_without_limits_none_is_set(make_repo: MakeRepo, write_agent: WriteAgent) -> None:
    repo = make_repo()
    script = write_agent(
        "soft",
        """
        import json, os, resource
        json.dump({"nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}, open(os.environ["ORCHESTRATOR_OUTPUT"], "w"))
        """,
    )
    plan = agent_plan(script, [{"id": "free"}], defaults={"venv": False})
    free = outputs(run_plan(plan, repo))["free"]
    assert free["nofile"] == list(resource.getrlimit(resource.RLIMIT_NOFILE))


# --- Agents die with the orchestrator -------------------------------------------------------

SLEEPER = """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a grandchild
if os.fork() == 0:  # and one that left the group
    os.setsid()
    time.sleep(60)
    os._exit(0)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("sandbox", ["none", pytest.param("bwrap", marks=needs_bwrap)])
def test_agents_die_with_a_killed_orchestrator(
    make_repo: MakeRepo, tmp_path: Path, sandbox: str
) -> None:
    repo = make_repo()
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    marker = f"sleeper-{sandbox}"
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"repo: {json.dumps(str(repo))}\n"
        f"defaults: {{sandbox: {sandbox}, venv: false}}\n"
        f"agents:\n  s: {{command: [{json.dumps(sys.executable)}, '{{plan_dir}}/sleeper.py']}}\n"
        f"tasks:\n  - {{id: {marker}-1, agent: s, task: t}}\n  - {{id: {marker}-2, agent: s, task: t}}\n"
    )
    orchestrator = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(plan)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    logs = repo / ".git" / "orchestrator" / "runs"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert orchestrator.poll() is None, "the orchestrator ended early"
            stdout = [p.read_text() for p in logs.glob("*/logs/*.stdout")]
            if stdout.count("ready\n") == 2:
                break
            time.sleep(0.05)
        # Each task: the agent, its grandchild and the child in its own session (and bwrap).
        assert len(live_processes_with(marker)) >= 6
    finally:
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait()
    assert wait_gone(marker) == []


def test_a_run_leaves_no_watcher_behind(make_repo: MakeRepo, write_agent: WriteAgent) -> None:
    repo = make_repo()
    script = write_agent("env", ENV_AGENT)
    report = run_plan(agent_plan(script, [{"id": "t"}], defaults={"venv": False}), repo)
    assert report.results[0].status == "succeeded"
    assert live_processes_with(f"{report.run_id}/") == []


# --- The sandbox's own parts: mounts, what is hidden of the system, the probe ---------------

BWRAP_PROGRAM = find_bwrap() or "bwrap"


def run_in_sandbox(layout: SandboxLayout, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        bwrap_argv(layout, ["sh", "-c", script], bwrap=BWRAP_PROGRAM),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


@needs_bwrap
def test_a_read_only_mount_cannot_be_written_and_a_writable_one_can(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    inside = tmp_path / "inside"  # hidden: only what is shown there is seen
    layout = SandboxLayout(
        cwd=Path("/"),
        hide=[inside],
        mounts=[
            (tmp_path / "ro", inside / "shown-ro", False),
            (tmp_path / "rw", inside / "shown-rw", True),
        ],
    )
    done = run_in_sandbox(
        layout, f"echo pwned > {inside}/shown-ro/f; echo ok > {inside}/shown-rw/f; ls {inside}"
    )
    assert "Read-only file system" in done.stderr, done.stderr
    assert not (tmp_path / "ro" / "f").exists()
    assert (tmp_path / "rw" / "f").read_text() == "ok\n"
    assert done.stdout.split() == ["shown-ro", "shown-rw"]


@needs_bwrap
def test_a_path_hidden_and_shown_again_is_shown(tmp_path: Path) -> None:
    """For one path the later entry wins: shown (writable) after hidden, whatever the names."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "before.txt").write_text("there\n")
    layout = SandboxLayout(cwd=Path("/"), hide=[shared], writable=[shared])
    done = run_in_sandbox(layout, f"cat {shared}/before.txt && echo made > {shared}/made.txt")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "there\n"
    assert (shared / "made.txt").read_text() == "made\n"


def test_a_path_listed_twice_is_mounted_once() -> None:
    layout = SandboxLayout(
        cwd=Path("/w"),
        hide=[Path("/h"), Path("/h"), Path("/tmp")],
        read_only=[Path("/h/r"), Path("/h/r")],
        writable=[Path("/w"), Path("/w")],
        mounts=[(Path("/w"), Path("/w"), True)],
    )
    argv = bwrap_argv(layout, ["agent"])
    ops = [tuple(argv[i : i + 2]) for i, a in enumerate(argv) if a in ("--tmpfs", "--ro-bind")]
    ops += [tuple(argv[i : i + 2]) for i, a in enumerate(argv) if a == "--bind"]
    assert sorted(ops) == sorted(
        [
            ("--ro-bind", "/"),
            ("--tmpfs", "/tmp"),
            ("--tmpfs", "/h"),
            ("--ro-bind", "/h/r"),
            ("--bind", "/w"),
        ]
    )


def test_the_users_home_is_hidden_unless_it_is_the_root_or_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = (tmp_path / "home").resolve()
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert home in system_hidden() and Path("/run") in system_hidden()
    monkeypatch.setenv("HOME", "/")
    assert Path("/") not in system_hidden()  # never the whole machine under a tmpfs
    monkeypatch.setenv("HOME", str(tmp_path / "missing"))
    assert tmp_path / "missing" not in system_hidden()


@needs_bwrap
def test_a_sandboxed_command_sees_nothing_of_the_users_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY\n")
    monkeypatch.setenv("HOME", str(home))
    layout = SandboxLayout(cwd=Path("/"), hide=system_hidden())
    done = run_in_sandbox(layout, f"ls -A {home}; cat {home}/.ssh/id_ed25519; ls -A /run")
    assert "PRIVATE KEY" not in done.stdout
    assert done.stdout == ""


SYSTEM_SEEN = """
import json
from orchestrator.sandbox import system_hidden, system_shown
print(json.dumps([[str(p) for p in system_hidden()], [str(p) for p in system_shown()]]))
"""


def system_seen(*arrangement: str) -> tuple[list[str], list[str]]:
    """What system_hidden and system_shown say on a machine arranged by bwrap *arrangement*
    (another /var/run, another /etc/resolv.conf), run in a sandbox of its own: not a
    read-only one, it only fakes a machine (and a test's subprocess may write where it ran)."""
    done = subprocess.run(
        [
            BWRAP_PROGRAM,
            *("--bind", "/", "/", "--dev", "/dev", "--proc", "/proc"),
            *arrangement,
            "--",
            sys.executable,
            "-c",
            SYSTEM_SEEN,
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    hidden, shown = json.loads(done.stdout)
    return hidden, shown


@needs_bwrap
def test_a_var_run_of_its_own_is_hidden_too() -> None:
    hidden, _ = system_seen("--tmpfs", "/var", "--dir", "/var/run")
    assert {"/run", "/var/run"} <= set(hidden)
    hidden, _ = system_seen("--tmpfs", "/var", "--symlink", "/run", "/var/run")
    assert "/run" in hidden and "/var/run" not in hidden


@needs_bwrap
@pytest.mark.parametrize(
    ("arrangement", "shown"),
    [
        (["--file-in-run"], ["/run/systemd/resolve/stub-resolv.conf"]),
        (["--symlink", "/run/systemd/resolve/none.conf", "/etc/resolv.conf"], []),
        (["--symlink", "/etc/real-resolv.conf", "/etc/resolv.conf"], []),
        ([], []),
    ],
    ids=["link-into-run", "dangling-link-into-run", "link-elsewhere", "plain-file"],
)
def test_the_resolver_file_is_shown_again_only_when_it_is_a_file_in_run(
    tmp_path: Path, arrangement: list[str], shown: list[str]
) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\n")
    etc = ["--tmpfs", "/etc", "--ro-bind", str(conf), "/etc/real-resolv.conf"]
    for kept in ("alternatives", "ld.so.cache", "passwd", "group"):  # what python may need
        if os.path.exists(f"/etc/{kept}"):
            etc += ["--ro-bind", f"/etc/{kept}", f"/etc/{kept}"]
    if arrangement == ["--file-in-run"]:
        arrangement = ["--symlink", shown[0], "/etc/resolv.conf"]
        etc += ["--tmpfs", "/run", "--ro-bind", str(conf), shown[0]]
    elif not arrangement:
        etc += ["--ro-bind", str(conf), "/etc/resolv.conf"]
    assert system_seen(*etc, *arrangement)[1] == shown


def fake_bwrap(tmp_path: Path, script: str) -> Path:
    """A bin directory whose only program is a `bwrap` running *script* (sh), counting runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    bwrap = bin_dir / "bwrap"
    bwrap.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/runs\n{script}\n')
    bwrap.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(
    ("script", "says"),
    [
        (
            "echo 'bwrap: first' >&2; echo 'bwrap: No permissions to create new namespace' >&2; "
            "exit 1",
            "bwrap: No permissions to create new namespace",
        ),
        ("exit 7", "7"),
        (
            r"printf 'bwrap: cannot mount on /home/\377\n' >&2; exit 1",
            "bwrap: cannot mount on /home/\ufffd",
        ),
    ],
    ids=["last-line", "silent", "undecodable"],
)
def test_a_bwrap_that_cannot_make_a_sandbox_is_told_once_with_its_last_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, says: str
) -> None:
    bin_dir = fake_bwrap(tmp_path, script)
    monkeypatch.setenv("PATH", str(bin_dir))
    expected = f"{bin_dir / 'bwrap'} cannot make a sandbox here: {says}"
    assert anyio.run(sandbox_problem) == expected
    assert anyio.run(sandbox_problem) == expected  # probed once per bwrap program
    assert len((tmp_path / "runs").read_text().splitlines()) == 1


def test_the_probe_hides_what_a_task_hides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bwrap that can make a sandbox but not hide HOME (an automounted home, say) is found
    when the plan is checked, not in every task."""
    home = (tmp_path / "home").resolve()
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    bin_dir = fake_bwrap(
        tmp_path,
        f'case "$*" in *"--tmpfs {home} "*) echo "bwrap: cannot mount tmpfs on {home}" >&2; '
        "exit 1;; esac\nexec /bin/true",
    )
    monkeypatch.setenv("PATH", str(bin_dir))
    assert anyio.run(sandbox_problem) == (
        f"{bin_dir / 'bwrap'} cannot make a sandbox here: bwrap: cannot mount tmpfs on {home}"
    )
