"""orchestrator/command_agent.py: one attempt of a program, as the lifecycle asks for it.

Each test hands ``CommandAgent.run_attempt`` an AttemptRequest made by hand (no repository,
no lifecycle) and runs a real process.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import AgentInfo, AgentSpec, HandoffEnvelope, build_envelope
from orchestrator.agents import AttemptOutcome, AttemptRequest, CommandAgent

from .conftest import live_processes_with

WriteAgent = Callable[[str, str], Path]


class Recorded:
    """What the attempt told the lifecycle it ran."""

    def __init__(self) -> None:
        self.commands: list[tuple[list[str], str | None]] = []

    def __call__(self, argv: Sequence[str], program: str | None) -> None:
        self.commands.append((list(argv), program))


def request_for(
    tmp_path: Path,
    envelope: HandoffEnvelope,
    *,
    record: Recorded | None = None,
    run_id: str = "run-1",
    env: dict[str, str] | None = None,
) -> AttemptRequest:
    """Attempt 1 of *envelope*, working in tmp_path/work, with a run directory of its own."""
    run_dir = tmp_path / "state" / "runs" / run_id
    for name in ("envelopes", "logs", "outputs"):
        (run_dir / name).mkdir(parents=True, exist_ok=True)
    cwd = tmp_path / "work"
    cwd.mkdir(exist_ok=True)
    output = run_dir / "outputs" / f"{envelope.task_id}.attempt-1.json"
    return AttemptRequest(
        envelope=envelope,
        attempt=1,
        run_id=run_id,
        cwd=cwd,
        worktree=None,
        venv=None,
        env={
            "PATH": os.environ["PATH"],
            "ORCHESTRATOR_OUTPUT": str(output),
            "ORCHESTRATOR_TASK_ID": envelope.task_id,
            **(env or {}),
        },
        envelope_path=run_dir / "envelopes" / f"{envelope.task_id}.json",
        output_path=output,
        stdout_path=run_dir / "logs" / f"{envelope.task_id}.attempt-1.stdout",
        stderr_path=run_dir / "logs" / f"{envelope.task_id}.attempt-1.stderr",
        run_dir=run_dir,
        state_dir=tmp_path / "state",
        plan_dir=tmp_path,
        repo=None,
        kill_grace=0.5,
        lifeline=None,
        record_command=record or Recorded(),
    )


def envelope_of(**fields: Any) -> HandoffEnvelope:
    return build_envelope("a", "do it", task_id="t1", worktree=False, venv=False, **fields)


def attempt(agent: CommandAgent, request: AttemptRequest) -> AttemptOutcome:
    return anyio.run(agent.run_attempt, request)


def python_agent(script: Path, *args: str) -> CommandAgent:
    return CommandAgent(command=(sys.executable, str(script), *args))


# one attempt


def test_a_program_that_writes_its_output_succeeds(tmp_path: Path, write_agent: WriteAgent) -> None:
    script = write_agent(
        "ok",
        """
        import json, os
        print("working in", os.getcwd())
        with open(os.environ["ORCHESTRATOR_OUTPUT"], "w") as f:
            json.dump({"done": os.environ["ORCHESTRATOR_TASK_ID"]}, f)
        """,
    )
    record = Recorded()
    request = request_for(tmp_path, envelope_of(), record=record)
    outcome = attempt(python_agent(script), request)
    assert outcome.status == "succeeded", outcome.error
    assert (outcome.exit_code, outcome.output, outcome.error) == (0, {"done": "t1"}, None)
    assert outcome.metrics.cpu_user_s is not None and outcome.metrics.max_rss_kb
    assert request.stdout_path.read_text() == f"working in {request.cwd}\n"
    # What it ran, told before it ran: the argv, and its program with links followed.
    assert record.commands == [([sys.executable, str(script)], os.path.realpath(sys.executable))]


def test_no_output_file_is_no_output(tmp_path: Path, write_agent: WriteAgent) -> None:
    script = write_agent("silent", "pass\n")
    outcome = attempt(python_agent(script), request_for(tmp_path, envelope_of()))
    assert (outcome.status, outcome.output) == ("succeeded", None)


def test_an_exit_code_fails_with_the_last_line_of_stderr(
    tmp_path: Path, write_agent: WriteAgent
) -> None:
    script = write_agent(
        "exit3", "import sys\nprint('first', file=sys.stderr)\nsys.exit('cannot do it')\n"
    )
    outcome = attempt(python_agent(script), request_for(tmp_path, envelope_of()))
    assert (outcome.status, outcome.exit_code) == ("failed", 1)
    assert outcome.error is not None and outcome.error.kind == "exit_code"
    assert outcome.error.message == "exited with code 1: cannot do it"


def test_a_signal_fails_naming_it(tmp_path: Path, write_agent: WriteAgent) -> None:
    script = write_agent("killed", "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n")
    outcome = attempt(python_agent(script), request_for(tmp_path, envelope_of()))
    assert (outcome.status, outcome.exit_code) == ("failed", None)
    assert outcome.error is not None
    assert (outcome.error.kind, outcome.error.message) == ("exit_code", "killed by SIGTERM")


def test_a_program_that_runs_too_long_times_out(tmp_path: Path, write_agent: WriteAgent) -> None:
    script = write_agent("slow", "import time\ntime.sleep(60)\n")
    outcome = attempt(python_agent(script), request_for(tmp_path, envelope_of(timeout=0.5)))
    assert outcome.status == "timed_out"
    assert outcome.error is not None
    assert (outcome.error.kind, outcome.error.message) == ("timeout", "timed out after 0.5 s")


def test_a_program_that_cannot_start_is_a_spawn_failure(tmp_path: Path) -> None:
    agent = CommandAgent(command=("/nonexistent/agent-binary",))
    outcome = attempt(agent, request_for(tmp_path, envelope_of()))
    assert (outcome.status, outcome.exit_code) == ("failed", None)
    assert outcome.error is not None and outcome.error.kind == "spawn"
    assert outcome.error.message == (
        "cannot start /nonexistent/agent-binary: No such file or directory"
    )


def test_a_nul_byte_in_an_argument_is_a_spawn_failure(tmp_path: Path) -> None:
    record = Recorded()
    agent = CommandAgent(command=(sys.executable, "-c", "pass\0"))
    outcome = attempt(agent, request_for(tmp_path, envelope_of(), record=record))
    assert outcome.error is not None and outcome.error.kind == "spawn"
    assert len(record.commands) == 1  # told, though it never started


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("[1, 2]", "output must be a JSON object, found list"),
        ("{not json", "output is not valid JSON"),
    ],
)
def test_an_output_that_is_not_a_json_object_fails(
    tmp_path: Path, write_agent: WriteAgent, written: str, message: str
) -> None:
    script = write_agent(
        "bad", f"import os\nopen(os.environ['ORCHESTRATOR_OUTPUT'], 'w').write({written!r})\n"
    )
    outcome = attempt(python_agent(script), request_for(tmp_path, envelope_of()))
    assert (outcome.status, outcome.exit_code, outcome.output) == ("failed", 0, None)
    assert outcome.error is not None and outcome.error.kind == "invalid_output"
    assert outcome.error.message.startswith(message)


def test_a_cancelled_attempt_ends_its_processes_and_propagates(
    tmp_path: Path, write_agent: WriteAgent
) -> None:
    script = write_agent(
        "waits",
        """
        import pathlib, sys, time
        pathlib.Path(sys.argv[1]).write_text("started")
        time.sleep(60)
        """,
    )
    started = tmp_path / "started"
    run_id = f"cancel-{uuid.uuid4().hex}"
    request = request_for(tmp_path, envelope_of(), run_id=run_id)
    reached_the_end = False

    async def main() -> None:
        nonlocal reached_the_end
        async with anyio.create_task_group() as group:

            async def run() -> None:
                nonlocal reached_the_end
                await python_agent(script, str(started)).run_attempt(request)
                reached_the_end = True

            group.start_soon(run)
            while not started.exists():  # noqa: ASYNC110 (a file another process writes)
                await anyio.sleep(0.01)
            assert live_processes_with(run_id)
            group.cancel_scope.cancel()

    anyio.run(main)
    assert not reached_the_end
    assert live_processes_with(run_id) == []


# the command as it runs


def argv_of(agent: CommandAgent, tmp_path: Path, *, path_var: str = "") -> list[str]:
    return agent.argv(
        plan_dir=tmp_path / "plan",
        worktree=tmp_path / "wt",
        task_id="t1",
        run_id="r1",
        path_var=path_var,
        venv_bin=None,
    )


def test_placeholders_are_filled_in(tmp_path: Path) -> None:
    agent = CommandAgent(
        command=("/bin/prog", "{plan_dir}/a.py", "{worktree}", "{task_id}@{run_id}")
    )
    assert argv_of(agent, tmp_path) == [
        "/bin/prog",
        f"{tmp_path}/plan/a.py",
        str(tmp_path / "wt"),
        "t1@r1",
    ]


def test_python_without_a_venv_is_this_interpreter(tmp_path: Path) -> None:
    assert argv_of(CommandAgent(command=("python", "-V")), tmp_path)[0] == sys.executable


def test_a_relative_program_is_the_plans(tmp_path: Path) -> None:
    program = argv_of(CommandAgent(command=("agents/run.sh",)), tmp_path)[0]
    assert program == str(tmp_path / "plan" / "agents" / "run.sh")


def test_a_bare_name_is_looked_up_on_the_tasks_path(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "my-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    agent = CommandAgent(command=("my-tool",))
    assert argv_of(agent, tmp_path, path_var=str(bin_dir))[0] == str(tool)
    assert argv_of(agent, tmp_path, path_var="")[0] == "my-tool"  # left to fail at spawn


# what it tells the provenance and the cache


def test_info_is_the_command_as_written_and_its_program() -> None:
    agent = CommandAgent(command=("python", "{plan_dir}/a.py"))
    assert agent.info("/usr/bin/python3.11") == AgentInfo(
        kind="command", command=["python", "{plan_dir}/a.py"], program="/usr/bin/python3.11"
    )


def test_from_a_plan_spec_and_from_options() -> None:
    spec = AgentSpec.model_validate({"command": "prog --x", "env": {"A": "1"}})
    assert CommandAgent.from_spec(spec) == CommandAgent(("prog", "--x"), env={"A": "1"})
    assert CommandAgent.from_options({"command": ["prog", "--x"], "env": {"A": "1"}}) == (
        CommandAgent(("prog", "--x"), env={"A": "1"})
    )
    with pytest.raises(ValueError):
        CommandAgent.from_options({"command": []})


def test_the_fingerprint_follows_the_files_the_plan_ships(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text("print(1)\n")
    agent = CommandAgent(command=("python", "{plan_dir}/agent.py", "data.txt"))
    first = agent.fingerprint(tmp_path)
    assert agent.fingerprint(tmp_path) == first
    script.write_text("print(2)\n")
    assert agent.fingerprint(tmp_path) != first
    changed = agent.fingerprint(tmp_path)
    (tmp_path / "data.txt").write_text("not shipped with the plan: counts as written\n")
    assert agent.fingerprint(tmp_path) == changed
    with_env = CommandAgent(command=agent.command, env={"MODE": "fast"})
    assert with_env.fingerprint(tmp_path) != changed
