"""Agents: what runs a task. One small interface, :class:`Agent`, and a table of its kinds.

A task's lifecycle (orchestrator/subagent.py) asks an agent for the few things that differ
between kinds: its provenance (:meth:`Agent.info`), whether it runs in this process, whether
its attempts write log files, the variables it adds, its fingerprint for the result cache,
and, above all, one attempt (:meth:`Agent.run_attempt`: an
:class:`~orchestrator.attempt.AttemptRequest` in, an
:class:`~orchestrator.attempt.AttemptOutcome` out). Nothing else in the engine looks at
which kind an agent is.

:data:`KINDS` names each kind and how to make one from its options: ``command`` (any program,
orchestrator/command_agent.py) and ``callable`` (an async function in this process,
orchestrator/callable_agent.py). :func:`as_agent` turns what a user passes (a plan's
``AgentSpec``, an argv list or string, an async function, a ``{"kind": ...}`` mapping, or an
agent already made) into an :class:`Agent`. See docs/agents.md, which also tells how to add
a kind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from envelopes import AgentInfo, AgentSpec

from .acp_agent import AcpAgent
from .attempt import AttemptOutcome, AttemptRequest
from .callable_agent import AgentFunction, CallableAgent, Workspace
from .command_agent import CommandAgent
from .http_agent import HttpAgent
from .preset_agent import PresetAgent

__all__ = [
    "KINDS",
    "Agent",
    "AgentFunction",
    "AgentKind",
    "AgentLike",
    "AttemptOutcome",
    "AttemptRequest",
    "CallableAgent",
    "CommandAgent",
    "Workspace",
    "as_agent",
    "plan_program_of",
    "program_of",
]


@runtime_checkable
class Agent(Protocol):
    """An agent of some kind, configured: what a task's lifecycle asks of it."""

    @property
    def in_process(self) -> bool:
        """Whether it runs in the orchestrator's own process.

        Such an agent cannot be sandboxed (a task asking for it fails, kind ``spawn``), and
        its task, when it has no worktree or venv to make either, writes its envelope
        without a thread hop.
        """
        ...

    @property
    def writes_logs(self) -> bool:
        """Whether each attempt writes its stdout and stderr to the request's two log files
        (then hashed, masked and listed in the attempt log and the provenance)."""
        ...

    @property
    def env(self) -> Mapping[str, str]:
        """Its own variables: over the task's starting environment, under the task's ``env``."""
        ...

    def info(self, program: str | None = None) -> AgentInfo:
        """What ran, for the provenance; *program* is what the last attempt reported with
        ``AttemptRequest.record_command``, if anything."""
        ...

    def fingerprint(self, plan_dir: Path) -> str:
        """Its part of the result cache's key: a digest that changes when the agent does.

        Blocking (it may read the files it runs); called once per run, in a thread.
        """
        ...

    async def run_attempt(self, request: AttemptRequest) -> AttemptOutcome:
        """Run one attempt and say how it went.

        A failure of the agent is an outcome (``failed`` or ``timed_out``, with an
        ``ErrorInfo``), never an exception. Cancellation is anyio's: the attempt is cancelled
        by its cancel scope, ends what it started (shielded), and lets the cancellation
        propagate.
        """
        ...


class AgentKind(Protocol):
    """An entry of :data:`KINDS`: makes an agent of its kind from its options.

    The options are the agent's entry as written, without ``kind``; a kind checks its own
    (TypeError or ValueError when they do not fit).
    """

    def __call__(self, options: Mapping[str, Any], /) -> Agent: ...


#: Every kind of agent, by the name a ``{"kind": ...}`` mapping gives.
KINDS: dict[str, AgentKind] = {
    "command": CommandAgent.from_options,
    "callable": CallableAgent.from_options,
    "preset": PresetAgent.from_options,
    "http": HttpAgent.from_options,
    "acp": AcpAgent.from_options,
}

#: What a user may pass as an agent (see :func:`as_agent`).
AgentLike = Agent | AgentSpec | Sequence[str] | AgentFunction | Mapping[str, Any]


def as_agent(value: AgentLike) -> Agent:
    """Turn what a user passes into an :class:`Agent`.

    An agent already made is itself; a plan's ``AgentSpec``, an argv list or a command
    string is a ``command``; an async function is a ``callable``; a mapping is made by the
    kind its ``kind`` names (``command`` when it names none) from its other keys. TypeError
    for a value no kind takes (a function that is not async, say), ValueError for an
    unknown kind or options that kind refuses.
    """
    if isinstance(value, Agent):
        return value
    if isinstance(value, AgentSpec):
        # A plan's entry: a coding agent's preset, an HTTP endpoint, an ACP agent, or a command.
        if value.preset is not None:
            return PresetAgent.from_spec(value)
        if value.http is not None:
            return HttpAgent.from_spec(value)
        if value.acp is not None:
            return AcpAgent.from_spec(value)
        return CommandAgent.from_spec(value)
    if isinstance(value, Mapping):
        options = dict(value)
        default = next((k for k in ("preset", "http", "acp") if k in options), "command")
        return _kind(str(options.pop("kind", default)))(options)
    if isinstance(value, str):
        return _kind("command")({"command": value})
    if isinstance(value, Sequence):
        return _kind("command")({"command": list(value)})
    if callable(value):
        return _kind("callable")({"function": value})
    raise TypeError(f"cannot use {value!r} as an agent")


def _kind(name: str) -> AgentKind:
    try:
        return KINDS[name]
    except KeyError:
        known = ", ".join(sorted(KINDS))
        raise ValueError(f"unknown agent kind {name!r} (known: {known})") from None


def program_of(agent: Agent) -> str | None:
    """The program *agent* runs, when it is a name looked up on the PATH (``claude``): what a
    Dask worker must have. None for an agent in this process, a path, a placeholder, or
    ``python`` (the task's venv's, else the worker's own interpreter)."""
    if isinstance(agent, PresetAgent):
        name = agent.program_name
    elif isinstance(agent, CommandAgent | AcpAgent):
        name = agent.command[0]
    else:
        return None
    if "{" in name or "/" in name or name in ("python", "python3"):
        return None
    return name


def plan_program_of(agent: Agent) -> str | None:
    """*agent*'s program when it is a file of the plan's (``./agent.sh``, ``bin/agent``: a
    relative path, taken from the plan's directory), relative to that directory."""
    if isinstance(agent, CommandAgent | AcpAgent):
        first = agent.command[0]
        if "/" in first and not first.startswith("/") and "{" not in first:
            return first.removeprefix("./")
    return None
