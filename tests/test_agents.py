"""orchestrator/agents.py: the Agent interface, the table of kinds, as_agent.

A kind added by a test (``note``, below) runs end to end through ``orchestrate_parallel``
with nothing else changed: one class and one table entry, as docs/agents.md describes.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import AgentInfo, AgentSpec, HandoffEnvelope, Report, build_envelope, digest
from orchestrator import Workspace, orchestrate_parallel, verify_report
from orchestrator.agents import (
    KINDS,
    Agent,
    AttemptOutcome,
    AttemptRequest,
    CallableAgent,
    CommandAgent,
    as_agent,
)
from orchestrator.attempt import timed_out

from .conftest import MakeRepo, git

ORCHESTRATOR = Path(__file__).resolve().parent.parent / "orchestrator"


async def greet(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    return {"hello": envelope.task_id}


class AsyncCallableObject:
    async def __call__(self, envelope: HandoffEnvelope, workspace: Workspace) -> None:
        return None


@dataclass(frozen=True)
class NoteAgent:
    """A kind for these tests: writes its text to a file of the task's worktree, in process."""

    path: str
    text: str

    in_process = True
    writes_logs = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> NoteAgent:
        path, text = options.get("path"), options.get("text")
        if not isinstance(path, str) or not isinstance(text, str):
            raise TypeError("a note agent takes a path and a text, both strings")
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise ValueError(f"a note's path must stay in the worktree: {path!r}")
        return cls(path=path, text=text)

    @property
    def env(self) -> Mapping[str, str]:
        return {}

    def info(self, program: str | None = None) -> AgentInfo:
        return AgentInfo(kind="callable", qualname=f"{__name__}.NoteAgent")

    def fingerprint(self, plan_dir: Path) -> str:
        return digest({"note": [self.path, self.text]})

    async def run_attempt(self, request: AttemptRequest) -> AttemptOutcome:
        with anyio.move_on_after(request.timeout) as scope:
            await anyio.Path(request.cwd / self.path).write_text(self.text)
        if scope.cancelled_caught:
            return timed_out(request.timeout)
        return AttemptOutcome(status="succeeded", output={"wrote": self.path})


# as_agent


def test_an_argv_list_is_a_command() -> None:
    agent = as_agent(["python", "agent.py", "{task_id}"])
    assert agent == CommandAgent(command=("python", "agent.py", "{task_id}"))


def test_a_tuple_is_a_command_too() -> None:
    assert as_agent(("prog", "-v")) == CommandAgent(command=("prog", "-v"))


def test_a_string_is_split_like_a_shell() -> None:
    agent = as_agent("python 'my agent.py' --fast")
    assert agent == CommandAgent(command=("python", "my agent.py", "--fast"))


def test_a_plan_spec_is_a_command_with_its_env() -> None:
    spec = AgentSpec.model_validate({"command": ["prog"], "env": {"MODE": "fast"}})
    agent = as_agent(spec)
    assert agent == CommandAgent(command=("prog",), env={"MODE": "fast"})


def test_an_async_function_is_a_callable() -> None:
    agent = as_agent(greet)
    assert agent == CallableAgent(function=greet)
    assert agent.info() == AgentInfo(kind="callable", qualname=f"{__name__}.greet")


def test_an_object_with_an_async_call_is_a_callable() -> None:
    value = AsyncCallableObject()
    assert as_agent(value) == CallableAgent(function=value)


def test_an_agent_is_itself() -> None:
    command, callable_, note = CommandAgent(("p",)), CallableAgent(greet), NoteAgent("n", "x")
    assert as_agent(command) is command
    assert as_agent(callable_) is callable_
    assert as_agent(note) is note


def test_a_mapping_names_its_kind() -> None:
    assert as_agent({"kind": "callable", "function": greet}) == CallableAgent(function=greet)
    assert as_agent({"kind": "command", "command": ["p", "q"], "env": {"A": "b"}}) == (
        CommandAgent(command=("p", "q"), env={"A": "b"})
    )


def test_a_mapping_without_a_kind_is_a_command() -> None:
    assert as_agent({"command": "p q"}) == CommandAgent(command=("p", "q"))


def test_a_plain_function_is_refused() -> None:
    def sync_agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        return {}

    with pytest.raises(TypeError, match="must be an async function"):
        as_agent(sync_agent)  # type: ignore[arg-type]


def test_a_value_no_kind_takes_is_refused() -> None:
    with pytest.raises(TypeError, match="cannot use 42 as an agent"):
        as_agent(42)  # type: ignore[arg-type]


def test_an_unknown_kind_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown agent kind 'telepathy' \(known: acp, callable, command, http, preset\)",
    ):
        as_agent({"kind": "telepathy", "url": "http://localhost"})


@pytest.mark.parametrize(
    "value",
    [
        [],
        [""],
        {"command": ["p"], "colour": "red"},
        {"kind": "callable", "function": greet, "x": 1},
    ],
    ids=["empty-argv", "empty-program", "unknown-command-option", "unknown-callable-option"],
)
def test_options_a_kind_refuses_are_a_value_error(value: Any) -> None:
    with pytest.raises(ValueError):
        as_agent(value)


# the table


def test_the_table_holds_command_and_callable() -> None:
    assert set(KINDS) >= {"command", "callable"}
    assert isinstance(KINDS["command"]({"command": ["p"]}), CommandAgent)
    assert isinstance(KINDS["callable"]({"function": greet}), CallableAgent)


@pytest.mark.parametrize("agent", [CommandAgent(("p",)), CallableAgent(greet)], ids=repr)
def test_every_builtin_kind_is_an_agent(agent: Agent) -> None:
    assert isinstance(agent, Agent)


def test_what_each_kind_tells_the_lifecycle() -> None:
    command = CommandAgent(("p",), env={"A": "1"})
    assert (command.in_process, command.writes_logs, dict(command.env)) == (False, True, {"A": "1"})
    callable_ = CallableAgent(greet)
    assert (callable_.in_process, callable_.writes_logs, dict(callable_.env)) == (True, False, {})


def test_a_registered_kind_runs_end_to_end(make_repo: MakeRepo, monkeypatch: Any) -> None:
    """One table entry, and a ``{"kind": ...}`` mapping selects it: worktree, commit, report."""
    monkeypatch.setitem(KINDS, "note", NoteAgent.from_options)
    repo = make_repo()
    envelopes = [build_envelope("noter", "Leave a note", task_id="n1", venv=False)]
    report: Report = anyio.run(
        lambda: orchestrate_parallel(
            envelopes,
            repo=repo,
            agents={"noter": {"kind": "note", "path": "NOTE.txt", "text": "hello\n"}},
        )
    )
    (result,) = report.results
    assert result.status == "succeeded", result.error
    assert result.output == {"wrote": "NOTE.txt"}
    assert result.attempt_log[0].stdout is None  # in process: no log files
    assert result.provenance.agent == AgentInfo(kind="callable", qualname=f"{__name__}.NoteAgent")
    commit = result.provenance.result_commit
    assert commit is not None
    assert git(repo, "show", f"{commit}:NOTE.txt") == "hello"
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_a_registered_in_process_kind_cannot_be_sandboxed(
    make_repo: MakeRepo, monkeypatch: Any
) -> None:
    monkeypatch.setitem(KINDS, "note", NoteAgent.from_options)
    envelopes = [
        build_envelope("noter", "t", task_id="n1", venv=False, worktree=False, sandbox="bwrap")
    ]
    report: Report = anyio.run(
        lambda: orchestrate_parallel(
            envelopes,
            agents={"noter": {"kind": "note", "path": "N", "text": "x"}},
            state_dir=make_repo().parent / "state",
        )
    )
    error = report.results[0].error
    assert error is not None and error.kind == "spawn"
    assert error.message == "agent 'noter' runs in this process: it cannot be sandboxed"


def test_a_kind_refusing_its_options_stops_the_run_before_it_starts(
    make_repo: MakeRepo, monkeypatch: Any
) -> None:
    monkeypatch.setitem(KINDS, "note", NoteAgent.from_options)
    state = make_repo().parent / "state"
    envelopes = [build_envelope("noter", "t", task_id="n1", venv=False, worktree=False)]
    with pytest.raises(ValueError, match="must stay in the worktree"):
        anyio.run(
            lambda: orchestrate_parallel(
                envelopes,
                agents={"noter": {"kind": "note", "path": "../x", "text": "x"}},
                state_dir=state,
            )
        )
    assert not (state / "runs").exists()


# no kind is looked at outside the table


KIND_CLASSES = {"CommandAgent", "CallableAgent"}


def _names(node: ast.AST) -> set[str]:
    return {
        n.id if isinstance(n, ast.Name) else n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Name | ast.Attribute)
    }


def test_no_module_but_the_table_asks_which_kind_an_agent_is() -> None:
    """No ``isinstance(x, CommandAgent)``, nor ``type(x) is CallableAgent``, outside
    orchestrator/agents.py."""
    found = []
    for path in sorted(ORCHESTRATOR.rglob("*.py")):
        if path == ORCHESTRATOR / "agents.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass")
                and len(node.args) == 2
            ):
                asked = _names(node.args[1])
            elif isinstance(node, ast.Compare):
                asked = _names(node)
            else:
                continue
            if asked & KIND_CLASSES:
                found.append(f"{path.relative_to(ORCHESTRATOR)}:{node.lineno}")
    assert found == []


@pytest.mark.parametrize("module", ["subagent", "cache", "harvest", "attempt", "coordinator"])
def test_the_engine_does_not_import_a_kind(module: str) -> None:
    tree = ast.parse((ORCHESTRATOR / f"{module}.py").read_text(encoding="utf-8"))
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not {alias.name for node in imports for alias in node.names} & KIND_CLASSES
    assert not {node.module for node in imports} & {"command_agent", "callable_agent"}


@pytest.mark.parametrize(
    "value",
    [
        {"command": ["true"], "sandbox": "bwrap"},
        {"command": ["true"], "secrets": ["TOKEN"]},
        {"command": ["true"], "limits": {"memory_mb": 64}},
    ],
)
def test_task_settings_on_an_agent_given_in_code_are_refused_not_dropped(value: Any) -> None:
    """A sandbox or secrets asked for on an agent given in code would silently not apply."""
    from envelopes import AgentSpec
    from orchestrator.intake import agent_table

    with pytest.raises(ValueError, match="which only a plan's agents entry applies"):
        as_agent(value)
    envelopes = [build_envelope("x", "t", task_id="t")]
    with pytest.raises(ValueError, match="agent 'x', given in code, sets"):
        agent_table(None, {"x": AgentSpec.model_validate(value)}, envelopes)
