"""The ``callable`` kind: an ``async def agent(envelope, workspace)`` run in this process.

Each attempt awaits the function with the task's envelope and a :class:`Workspace` (its
worktree, venv, output file and environment), within the task's timeout. It returns its
output (a mapping), or None after writing it to ``workspace.output_path``. An exception it
raises fails the attempt (kind ``agent_exception``); it is not the run's.

Running in this process, it cannot be sandboxed and writes no log files; its code is not
fingerprinted for the result cache (its qualified name is).
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import anyio

from envelopes import AgentInfo, ErrorInfo, HandoffEnvelope, canonical_json, digest

from .attempt import AttemptOutcome, AttemptRequest, read_output, timed_out

__all__ = ["AgentFunction", "CallableAgent", "Workspace"]


class Workspace:
    """Where a callable agent works: its worktree, venv and files of the run directory.

    A task with nothing made for it (no worktree, no venv, no setup steps or checks) keeps
    its envelope as a record of the run's ``envelopes.jsonl`` rather than a file of its own:
    the file at ``envelope_path`` is written the first time ``envelope_path`` or ``env``
    (whose ``ORCHESTRATOR_ENVELOPE`` names it) is read, by *write_envelope*.
    """

    __slots__ = (
        "_env",
        "_envelope_path",
        "_lock",
        "_write",
        "output_path",
        "path",
        "run_id",
        "task_id",
        "venv",
    )

    def __init__(
        self,
        *,
        task_id: str,
        run_id: str,
        path: Path | None,
        venv: Path | None,
        output_path: Path,
        envelope_path: Path,
        env: Mapping[str, str],
        write_envelope: Callable[[], None] | None = None,
    ) -> None:
        self.task_id = task_id
        self.run_id = run_id
        self.path = path
        self.venv = venv
        self.output_path = output_path
        self._envelope_path = envelope_path
        self._env = env
        self._write = write_envelope
        self._lock = threading.Lock()  # an agent may ask from several threads at once

    @property
    def envelope_path(self) -> Path:
        """The task's envelope file (written now if it was not yet)."""
        self._written()
        return self._envelope_path

    @property
    def env(self) -> Mapping[str, str]:
        """The environment a command of the agent's would get (its envelope file written)."""
        self._written()
        return self._env

    def _written(self) -> None:
        with self._lock:
            if self._write is not None:
                self._write()  # RunDirError: the agent's exception, so its attempt's failure
                self._write = None

    def __repr__(self) -> str:
        return (
            f"Workspace(task_id={self.task_id!r}, run_id={self.run_id!r}, path={self.path!r}, "
            f"venv={self.venv!r}, output_path={self.output_path!r}, "
            f"envelope_path={self._envelope_path!r})"
        )


AgentFunction = Callable[[HandoffEnvelope, Workspace], Awaitable[Mapping[str, Any] | None]]

_NO_VARIABLES: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class CallableAgent:
    """An ``async def agent(envelope, workspace) -> dict`` run in this process."""

    function: AgentFunction

    #: In this process: it cannot be sandboxed.
    in_process = True
    #: It reads no envelope file but through its Workspace, which writes one when asked: a
    #: task with nothing made for it may keep its envelope as a record of envelopes.jsonl.
    envelope_record = True
    #: It has no stdout or stderr of its own: its attempts have no log files.
    writes_logs = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> CallableAgent:
        """The agent of ``{"function": an async function}``.

        TypeError when the function is not async, ValueError for other options.
        """
        if unknown := sorted(set(options) - {"function"}):
            raise ValueError(f"a callable agent takes only a function, not {', '.join(unknown)}")
        function = options.get("function")
        if not callable(function) or not (
            inspect.iscoroutinefunction(function)
            or inspect.iscoroutinefunction(type(function).__call__)
        ):
            raise TypeError(
                f"agent {function!r} must be an async function "
                "(async def agent(envelope, workspace))"
            )
        return cls(function=function)

    @property
    def env(self) -> Mapping[str, str]:
        """None of its own: it gets the task's variables in ``workspace.env``."""
        return _NO_VARIABLES

    def info(self, program: str | None = None) -> AgentInfo:
        """Provenance description: the function's module and qualified name."""
        fn: Any = self.function
        qualname = (
            f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        )
        return AgentInfo(kind="callable", qualname=qualname)

    def fingerprint(self, plan_dir: Path) -> str:
        """Its qualified name (its code is not fingerprinted)."""
        return digest({"info": self.info().model_dump(mode="json")})

    async def run_attempt(self, request: AttemptRequest) -> AttemptOutcome:
        """Await the function once, within the task's timeout, and check what it returned.

        Cancellation: the function is cancelled where it awaits, and the cancellation
        propagates.
        """
        workspace = Workspace(
            task_id=request.task_id,
            run_id=request.run_id,
            path=request.worktree.path if request.worktree else None,
            venv=request.venv.path if request.venv else None,
            output_path=request.output_path,
            envelope_path=request.envelope_path,
            env=request.env,
            write_envelope=request.write_envelope,
        )
        value: Any = None
        with anyio.move_on_after(request.timeout) as scope:
            try:
                value = await self.function(request.envelope, workspace)
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                error = ErrorInfo(kind="agent_exception", message=message)
                return AttemptOutcome(status="failed", error=error)
        if scope.cancelled_caught:
            return timed_out(request.timeout)
        if value is None:
            # A callable may write its output to workspace.output_path instead of returning it.
            value, problem = await anyio.to_thread.run_sync(
                read_output, request.output_path, request.run_dir
            )
            if problem is not None:
                return AttemptOutcome(status="failed", error=problem)
        return _checked(value)


def _checked(value: Any) -> AttemptOutcome:
    """The outcome of returning *value*: a mapping (or None) as it will read back from the
    report (string keys, lists, no NaN), else an ``invalid_output`` failure."""
    if value is not None and not isinstance(value, Mapping):
        message = f"agent returned {type(value).__name__}, not a mapping"
        return AttemptOutcome(
            status="failed", error=ErrorInfo(kind="invalid_output", message=message)
        )
    try:
        output = None if value is None else json.loads(canonical_json(dict(value)))
    except (TypeError, ValueError) as exc:
        message = f"output is not JSON-serialisable: {exc}"
        return AttemptOutcome(
            status="failed", error=ErrorInfo(kind="invalid_output", message=message)
        )
    return AttemptOutcome(status="succeeded", output=output)
