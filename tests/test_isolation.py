"""orchestrator/isolation.py: the environment an agent starts from, the command as it is to run
(as it is, or in a bubblewrap sandbox laid out for the task), and what comes out of the
sandbox afterwards (the agent's commits and output file, never its scratch directory).

``isolate`` is given a stand-in for the attempt request holding only the fields it reads, so
that these tests need no run: a real repository, worktree, files and bwrap."""

from __future__ import annotations

import errno
import getpass
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from envelopes import ErrorInfo, HandoffEnvelope, Limits
from orchestrator.isolation import (
    BASE_VARIABLES,
    SYSTEM_PATH,
    Spawn,
    agent_environment,
    isolate,
    isolate_error,
)
from orchestrator.process import ProcessOutcome
from orchestrator.repo import Repository
from orchestrator.sandbox import SandboxLayout, bwrap_argv, find_bwrap
from orchestrator.worktree import create_worktree

from .conftest import MakeRepo, git

ORCHESTRATOR_ENV = {
    "PATH": "/opt/orchestrator/bin:/usr/bin",
    "HOME": "/home/user",
    "LANG": "de_DE.UTF-8",
    "TERM": "xterm-256color",
    "TMPDIR": "/var/tmp/user",
    "USER": "user",
    "OPENAI_API_KEY": "sk-the-users-own-key",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "SSH_AUTH_SOCK": "/run/user/1000/ssh-agent",
    "PROJECT_SETTING": "on",
}


def envelope(**fields: Any) -> HandoffEnvelope:
    return HandoffEnvelope(task_id="t1", agent="a", task="probe", **fields)


# agent_environment: inherit, pass, set, secrets.


def test_inheriting_gives_the_whole_environment_as_a_copy() -> None:
    env = agent_environment(ORCHESTRATOR_ENV, envelope(inherit_env=True))
    assert env == ORCHESTRATOR_ENV
    env["PROJECT_SETTING"] = "changed by the caller"
    assert ORCHESTRATOR_ENV["PROJECT_SETTING"] == "on"


def test_not_inheriting_gives_the_base_and_the_systems_path_only() -> None:
    env = agent_environment(ORCHESTRATOR_ENV, envelope(inherit_env=False))
    assert env == {
        "PATH": SYSTEM_PATH,
        **{name: ORCHESTRATOR_ENV[name] for name in BASE_VARIABLES},
    }
    # Neither the user's keys nor the socket of their ssh agent.
    assert not {"OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "SSH_AUTH_SOCK"} & set(env)


def test_a_missing_base_variable_gets_a_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/from-the-process")
    env = agent_environment({"PATH": "/x"}, envelope(inherit_env=False))
    assert env == {
        "PATH": SYSTEM_PATH,
        "HOME": "/home/from-the-process",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "USER": getpass.getuser(),
    }
    assert "TERM" not in env  # no terminal is made up


def test_passed_names_come_from_the_orchestrator_and_missing_ones_are_skipped() -> None:
    task = envelope(inherit_env=False, pass_env=["PROJECT_SETTING", "PATH", "NOT_SET_ANYWHERE"])
    env = agent_environment(ORCHESTRATOR_ENV, task)
    assert env["PROJECT_SETTING"] == "on"
    assert env["PATH"] == ORCHESTRATOR_ENV["PATH"]  # passing PATH replaces the system's
    assert "NOT_SET_ANYWHERE" not in env


def test_a_secret_reaches_the_agent_only_when_passed() -> None:
    kept = envelope(inherit_env=False, secrets=["OPENAI_API_KEY"])
    assert "OPENAI_API_KEY" not in agent_environment(ORCHESTRATOR_ENV, kept)
    passed = envelope(inherit_env=False, secrets=["OPENAI_API_KEY"], pass_env=["OPENAI_API_KEY"])
    # The value itself: masking is for what is written and shown, not for the agent.
    assert agent_environment(ORCHESTRATOR_ENV, passed)["OPENAI_API_KEY"] == "sk-the-users-own-key"


def test_what_the_task_sets_is_layered_later_not_here() -> None:
    task = envelope(inherit_env=False, env={"S": "1", "HOME": "/set/by/plan"})
    env = agent_environment(ORCHESTRATOR_ENV, task)
    assert "S" not in env
    assert env["HOME"] == "/home/user"


def test_a_sandboxed_task_inherits_nothing_unless_told() -> None:
    default = envelope(sandbox="bwrap")
    assert not default.inherit_env
    assert "PROJECT_SETTING" not in agent_environment(ORCHESTRATOR_ENV, default)
    told = envelope(sandbox="bwrap", inherit_env=True)
    assert agent_environment(ORCHESTRATOR_ENV, told)["PROJECT_SETTING"] == "on"


# Spawn.outcome and isolate_error.


def outcome(exit_code: int | None, sig: int | None = None) -> ProcessOutcome:
    return ProcessOutcome(
        exit_code=exit_code,
        timed_out=False,
        cancelled=False,
        signal=sig,
        duration_s=0.1,
        cpu_user_s=0.0,
        cpu_system_s=0.0,
        max_rss_kb=None,
    )


def spawn(*, sandboxed: bool, rlimits: bool = False, problem: str | None = None) -> Spawn:
    limits = [(0, 1, 1)] if rlimits else []
    return Spawn(["agent"], Path("/"), {}, limits, sandboxed=sandboxed, problem=problem)


@pytest.mark.parametrize(
    ("sandboxed", "code", "expected"),
    [
        (True, 128 + signal.SIGKILL, (None, signal.SIGKILL)),
        (True, 128 + signal.SIGTERM, (None, signal.SIGTERM)),
        (True, 128, (128, None)),
        (True, 1, (1, None)),
        (True, 128 + signal.NSIG + 1, (128 + signal.NSIG + 1, None)),
        (False, 128 + signal.SIGKILL, (128 + signal.SIGKILL, None)),
    ],
    ids=["bwrap-sigkill", "bwrap-sigterm", "bwrap-128", "bwrap-exit-1", "past-nsig", "plain"],
)
def test_bwraps_exit_code_for_a_signal_is_told_as_the_signal(
    sandboxed: bool, code: int, expected: tuple[int | None, int | None]
) -> None:
    told = spawn(sandboxed=sandboxed).outcome(outcome(code))
    assert (told.exit_code, told.signal) == expected


def test_a_limit_that_ended_the_attempt_is_named(tmp_path: Path) -> None:
    stderr = tmp_path / "stderr.log"
    stderr.write_text("Traceback (most recent call last):\n  ...\nMemoryError\n")
    task = envelope(limits=Limits(memory_mb=150))
    error = anyio.run(isolate_error, task, spawn(sandboxed=False, rlimits=True), outcome(1), stderr)
    assert error == ErrorInfo(
        kind="limit", message="exceeded limits.memory_mb (150 MB): exited with code 1: MemoryError"
    )
    # Without limits set for the command, the same failure is not a limit's.
    unlimited = anyio.run(isolate_error, task, spawn(sandboxed=False), outcome(1), stderr)
    assert unlimited is None


def test_commits_that_could_not_come_out_fail_only_a_successful_attempt(tmp_path: Path) -> None:
    stderr = tmp_path / "stderr.log"
    stderr.write_text("")
    task = envelope(sandbox="bwrap")
    refused = spawn(sandboxed=True, problem="its branch was moved to 0123456789ab")
    error = anyio.run(isolate_error, task, refused, outcome(0), stderr)
    assert error == ErrorInfo(
        kind="commit", message="the agent's own commits: its branch was moved to 0123456789ab"
    )
    assert anyio.run(isolate_error, task, refused, outcome(3), stderr) is None
    assert anyio.run(isolate_error, task, spawn(sandboxed=True), outcome(0), stderr) is None


# isolate: without a sandbox, nothing is made; with one, a laid-out bwrap command.


def request(tmp_path: Path, task: HandoffEnvelope, **fields: Any) -> SimpleNamespace:
    run_dir = tmp_path / "state" / "runs" / "run1"
    values: dict[str, Any] = {
        "envelope": task,
        "attempt": 1,
        "cwd": tmp_path,
        "env": {"PATH": SYSTEM_PATH, "MARK": "1"},
        "worktree": None,
        "venv": None,
        "repo": None,
        "run_dir": run_dir,
        "state_dir": tmp_path / "state",
        "envelope_path": run_dir / "envelopes" / "t1.json",
        "output_path": run_dir / "outputs" / "t1.attempt-1.json",
    }
    return SimpleNamespace(**(values | fields))


def test_without_a_sandbox_the_command_runs_as_it_is_and_nothing_is_made(tmp_path: Path) -> None:
    task = envelope(limits=Limits(open_files=64))
    attempt = request(tmp_path, task)

    async def main() -> Spawn:
        async with isolate(attempt, ["python", "agent.py"]) as made:  # type: ignore[arg-type]
            return made

    made = anyio.run(main)
    assert made.argv == ["python", "agent.py"]
    assert (made.cwd, made.env, made.sandboxed) == (tmp_path, attempt.env, False)
    assert made.env is not attempt.env
    assert any(soft == 64 for _, soft, _ in made.rlimits)
    assert not (tmp_path / "state").exists()


def test_a_sandbox_without_bwrap_on_path_is_a_clear_oserror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    attempt = request(tmp_path, envelope(sandbox="bwrap"))

    async def main() -> None:
        async with isolate(attempt, ["true"]):  # type: ignore[arg-type]
            pytest.fail("no sandbox can be made")

    with pytest.raises(OSError) as caught:
        anyio.run(main)
    assert caught.value.errno == errno.ENOENT
    assert "the sandbox needs bwrap (bubblewrap), which is not on PATH" in str(caught.value)
    assert not (attempt.run_dir / "sandbox").exists()


def bwrap_works() -> bool:
    bwrap = find_bwrap()
    if bwrap is None:
        return False
    probe = bwrap_argv(SandboxLayout(cwd=Path("/")), ["true"], bwrap=bwrap)
    return subprocess.run(probe, capture_output=True).returncode == 0


needs_bwrap = pytest.mark.skipif(
    not bwrap_works(), reason="bwrap (bubblewrap) is not installed or cannot make a sandbox here"
)

PROBE = """
import json, os, subprocess, sys
repo, common, state, user_worktree, output = sys.argv[1:6]

def can_write(path):
    try:
        with open(path, "a"):
            return True
    except OSError:
        return False

def git(*args):
    ident = ["-c", "user.name=Agent", "-c", "user.email=agent@example.com"]
    return subprocess.run(["git", *ident, *args], capture_output=True, text=True)

open("made.txt", "w").write("by the sandboxed agent\\n")
git("add", "made.txt")
committed = git("commit", "-qm", "sandboxed work").returncode == 0
seen = {
    "checkout_files": os.path.exists(os.path.join(repo, "src", "file0000.txt")),
    "other_runs": os.path.exists(os.path.join(state, "runs", "run0")),
    "user_worktree": os.path.exists(os.path.join(user_worktree, "src")),
    "git_config_writable": can_write(os.path.join(common, "config")),
    "worktree_writable": can_write("made.txt"),
    "home_entries": sorted(os.listdir(os.environ["HOME"])),
    "committed": committed,
    "envelope": open(os.environ["ENVELOPE"]).read(),
}
with open(output, "w") as f:
    json.dump(seen, f)
"""


@needs_bwrap
def test_a_sandboxed_attempt_sees_only_its_own_and_its_commits_and_output_come_out(
    make_repo: MakeRepo, tmp_path: Path, write_agent: Any
) -> None:
    repo = make_repo()
    base = git(repo, "rev-parse", "HEAD")
    user_worktree = tmp_path / "users-own-worktree"
    git(repo, "worktree", "add", "--quiet", "-b", "mine", str(user_worktree))
    script = write_agent("probe", PROBE)

    async def main() -> tuple[dict[str, Any], Spawn, SimpleNamespace]:
        repository = await Repository.open(repo)
        state = repository.state_dir
        (state / "runs" / "run0").mkdir(parents=True)  # another run's files
        worktree = await create_worktree(
            repository, "orchestrator/run1/t1", state / "worktrees" / "run1" / "t1", base
        )
        attempt = request(
            tmp_path,
            envelope(sandbox="bwrap"),
            cwd=worktree.path,
            worktree=worktree,
            repo=repository,
            run_dir=state / "runs" / "run1",
            state_dir=state,
            envelope_path=state / "runs" / "run1" / "envelopes" / "t1.json",
            output_path=state / "runs" / "run1" / "outputs" / "t1.attempt-1.json",
        )
        attempt.envelope_path.parent.mkdir(parents=True)
        attempt.envelope_path.write_text('{"task_id": "t1"}')
        attempt.output_path.parent.mkdir(parents=True)
        argv = [
            sys.executable,
            str(script),
            str(repo),
            str(repository.common_dir),
            str(state),
            str(user_worktree),
            str(attempt.output_path),
        ]
        attempt.env = {**os.environ, "ENVELOPE": str(attempt.envelope_path)}
        async with isolate(attempt, argv) as made:  # type: ignore[arg-type]
            assert made.sandboxed and made.cwd == worktree.path
            assert made.env["TMPDIR"] == "/tmp"
            done = await anyio.run_process(made.argv, cwd=made.cwd, env=made.env, check=False)
            assert done.returncode == 0, done.stderr.decode()
        seen = json.loads(attempt.output_path.read_text())
        return seen, made, attempt

    seen, made, attempt = anyio.run(main)
    assert made.problem is None
    # HOME is an empty tmpfs, but for the interpreter running the probe, shown again when it
    # lives there (pyenv, say).
    home = Path(os.path.expanduser("~")).resolve()
    interpreters = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix)}
    shown = sorted({p.relative_to(home).parts[0] for p in interpreters if p.is_relative_to(home)})
    assert seen.pop("home_entries") == shown
    assert seen == {
        "checkout_files": False,
        "other_runs": False,
        "user_worktree": False,
        "git_config_writable": False,
        "worktree_writable": True,
        "committed": True,
        "envelope": '{"task_id": "t1"}',
    }
    # The commit came out onto the task's branch; the scratch directory is gone.
    tip = git(repo, "rev-parse", "orchestrator/run1/t1")
    assert git(repo, "rev-parse", f"{tip}~1") == base
    assert git(repo, "show", f"{tip}:made.txt") == "by the sandboxed agent"
    assert not (attempt.run_dir / "sandbox" / "t1.attempt-1").exists()


@needs_bwrap
def test_the_scratch_directory_goes_even_when_the_attempt_is_cancelled(tmp_path: Path) -> None:
    attempt = request(tmp_path, envelope(sandbox="bwrap"))
    scratch = attempt.run_dir / "sandbox" / "t1.attempt-1"
    seen: list[bool] = []

    async def main() -> None:
        with anyio.CancelScope() as scope:
            async with isolate(attempt, ["true"]):  # type: ignore[arg-type]
                seen.append(scratch.is_dir())
                scope.cancel()
                await anyio.sleep_forever()

    anyio.run(main)
    assert seen == [True]
    assert not scratch.exists()
    assert not attempt.output_path.exists()  # an empty output file is no output


@needs_bwrap
def test_a_scratch_directory_left_by_a_dead_session_does_not_fail_the_attempt(
    tmp_path: Path,
) -> None:
    attempt = request(tmp_path, envelope(sandbox="bwrap"))
    stale = attempt.run_dir / "sandbox" / "t1.attempt-1"
    (stale / "objects").mkdir(parents=True)  # as a SIGKILLed orchestrator leaves it

    async def main() -> bool:
        async with isolate(attempt, ["true"]) as made:  # type: ignore[arg-type]
            return made.sandboxed

    assert anyio.run(main)
