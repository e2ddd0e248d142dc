"""Agents: what runs a task. A command (any program) or an async callable in this process.

Backends as a small interface plus a table: :class:`CommandAgent` and :class:`CallableAgent`
both describe themselves for provenance (``AgentInfo``); the subagent runner knows how to run
each. :func:`as_agent` turns what a user passes (a plan's ``AgentSpec``, an argv list, an async
function) into one of them.
"""

from __future__ import annotations

import inspect
import os
import shutil
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envelopes import AgentInfo, AgentSpec, HandoffEnvelope
from envelopes._plan import env_values

__all__ = ["Agent", "AgentFunction", "CallableAgent", "CommandAgent", "Workspace", "as_agent"]


@dataclass(frozen=True)
class Workspace:
    """Where a callable agent works: its worktree, venv and files of the run directory."""

    task_id: str
    run_id: str
    path: Path | None
    venv: Path | None
    output_path: Path
    envelope_path: Path
    env: Mapping[str, str]


AgentFunction = Callable[[HandoffEnvelope, Workspace], Awaitable[Mapping[str, Any] | None]]


@dataclass(frozen=True)
class CommandAgent:
    """A program run with cwd = the task's worktree (or the repository when it has none).

    Arguments may use the placeholders ``{plan_dir}``, ``{worktree}``, ``{task_id}`` and
    ``{run_id}``. A relative program path containing a slash is taken relative to the plan's
    directory; ``python``/``python3`` is the task venv's interpreter, or this interpreter
    when the task has no venv; any other bare name is looked up on the task's PATH.
    """

    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(
        self,
        *,
        plan_dir: Path,
        worktree: Path,
        task_id: str,
        run_id: str,
        path_var: str,
        venv_bin: Path | None,
    ) -> list[str]:
        """The command as it will run for one task."""
        values = {
            "plan_dir": str(plan_dir),
            "worktree": str(worktree),
            "task_id": task_id,
            "run_id": run_id,
        }
        args = [_substitute(arg, values) for arg in self.command]
        program = args[0]
        if program in ("python", "python3") and venv_bin is None:
            args[0] = sys.executable
        elif "/" in program and not os.path.isabs(program):
            args[0] = str((plan_dir / program).absolute())
        elif "/" not in program:
            args[0] = shutil.which(program, path=path_var) or program
        return args

    def info(self, program: str | None = None) -> AgentInfo:
        """Provenance description: the command as written, and the program it resolved to."""
        return AgentInfo(kind="command", command=list(self.command), program=program)


def _substitute(arg: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


@dataclass(frozen=True)
class CallableAgent:
    """An ``async def agent(envelope, workspace) -> dict`` run in this process."""

    function: AgentFunction

    def info(self) -> AgentInfo:
        """Provenance description: the function's module and qualified name."""
        fn: Any = self.function
        qualname = (
            f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        )
        return AgentInfo(kind="callable", qualname=qualname)


Agent = CommandAgent | CallableAgent


def as_agent(value: Agent | AgentSpec | Sequence[str] | AgentFunction) -> Agent:
    """Turn a plan's AgentSpec, an argv list or an async function into an Agent."""
    if isinstance(value, CommandAgent | CallableAgent):
        return value
    if isinstance(value, AgentSpec):
        return CommandAgent(command=tuple(value.command), env=env_values(value.env))
    if isinstance(value, str):
        return as_agent(AgentSpec(command=value))  # type: ignore[arg-type]
    if isinstance(value, Sequence):
        return CommandAgent(command=tuple(value))
    if callable(value):
        if not (
            inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(type(value).__call__)
        ):
            raise TypeError(
                f"agent {value!r} must be an async function (async def agent(envelope, workspace))"
            )
        return CallableAgent(function=value)
    raise TypeError(f"cannot use {value!r} as an agent")
