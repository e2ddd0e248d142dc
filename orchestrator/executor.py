"""Where a task runs: behind one interface, so that the coordinator does not care.

The coordinator hands an executor a :class:`PreparedTask` (the envelope with its upstream
results filled in, its agent, the commit and tree it starts from) and gets back the task's
finished, sealed TaskResult. Everything around that (the scheduler and its limits, the
journal, the result cache, the report, merges of dependencies' results) stays with the
coordinator, whichever executor runs the task.

``local`` runs the task in this process: a worktree and venv on this machine, the agent as a
local subprocess (or an async function in this event loop). ``dask`` runs it on a worker of
a Dask cluster, the repository's state shipped both ways as git bundles
(orchestrator/dask_executor.py; the ``dask`` extra).

An executor is made for one run (:func:`make_executor`), started before the run's first
task (:meth:`Executor.start`: a cluster connected to, and checked) and closed after its
last (:meth:`Executor.aclose`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from envelopes import ExecutorSpec, HandoffEnvelope, TaskResult

from .agents import Agent
from .context import RunContext
from .subagent import run_subagent

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "PreparedTask", "make_executor"]


@dataclass(frozen=True)
class PreparedTask:
    """A task ready to run: nothing left to decide but its outcome."""

    envelope: HandoffEnvelope
    agent: Agent
    #: The commit and tree its worktree starts from: the run's base, or the merge of its
    #: dependencies' results (None: the run has no repository).
    start_commit: str | None
    start_tree: str | None


class Executor(Protocol):
    """Runs prepared tasks of one run, any number at once (the scheduler bounds how many)."""

    #: The executor's name, as the ``executor`` setting selects it.
    name: str

    async def start(self) -> None:
        """Make ready to run tasks (connect to a cluster, say); an OrchestratorError that
        tells the user what is wrong when it cannot."""
        ...

    async def aclose(self) -> None:
        """Let go of what :meth:`start` took (idempotent; called however the run ends)."""
        ...

    async def run(self, task: PreparedTask) -> TaskResult:
        """Run *task* to its end and return its sealed result.

        The contract, whatever runs the task and wherever:

        - ``TaskStarted`` is emitted (``ctx.emit``) when the task starts;
        - the task starts from ``task.start_commit``: its result commit descends from it and
          its provenance names it as ``base_commit``;
        - the result is recorded with :func:`orchestrator.subagent.record_result` (results,
          task state, journal, ``TaskFinished``) before ``run`` returns, and before a
          cancellation propagates;
        - a task's own failures are its result's status and error, never an exception;
        - cancellation cancels the task: it is recorded as ``cancelled`` (its work committed
          to its branch, nothing lost) and the cancellation propagates.
        """
        ...


class LocalExecutor:
    """Tasks run on this machine, in this process (see orchestrator/subagent.py)."""

    name = "local"

    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx

    async def start(self) -> None:
        """Nothing to start: the run's context has everything."""

    async def aclose(self) -> None:
        """Nothing to close."""

    async def run(self, task: PreparedTask) -> TaskResult:
        """Run *task* as a subagent of this process."""
        return await run_subagent(task.envelope, task.agent, self._ctx)


def _dask(ctx: RunContext) -> Executor:
    from .dask_executor import DaskExecutor  # Dask is imported only when it is used

    return DaskExecutor.from_spec(ctx.settings.executor_spec).bind(ctx)


#: Executors by kind (``ExecutorSpec.kind``): each makes one for a run from the run's
#: context, whose settings hold its options.
EXECUTORS: dict[str, Callable[[RunContext], Executor]] = {"local": LocalExecutor, "dask": _dask}


def make_executor(ctx: RunContext) -> Executor:
    """The executor the run's settings select: an executor object's own (``bind``), else
    the one of the spec's kind."""
    choice = ctx.settings.executor
    if not isinstance(choice, ExecutorSpec):
        return choice.bind(ctx)  # type: ignore[no-any-return]
    return EXECUTORS[choice.kind](ctx)
