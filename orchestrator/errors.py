"""Exceptions of the engine.

Only bad input to a whole run and the orchestrator's own failures are exceptions; a task that
fails is data (a TaskResult with a status and an error), never an exception.

    OrchestratorError
    ├── PlanError            a plan that cannot run; one line per problem
    ├── SettingsError        a run setting out of its bounds (names the setting)
    ├── PlanChanged          --resume: the plan changed since its interrupted run started
    ├── RunAlreadyFinished   --resume: the plan's latest run finished; nothing to resume
    ├── NotARepository       a path that is not inside a git repository
    ├── EventHandlerFailed   the on_event handler raised (internal; its exception propagates)
    ├── GitError             a git command failed
    ├── VenvError            a virtualenv could not be created or its requirements installed
    ├── RunDirError          the run directory cannot be created or written
    ├── RunInUse             another live orchestrator holds the run
    ├── JournalCorrupt       a journal line other than the last cannot be read
    ├── ReportUnreadable     a report file that cannot be read or is not a report
    ├── MergeError           a merge-back that cannot start: bad target, task or report
    ├── ExecutorError        tasks cannot run where asked: no scheduler, a worker unfit
    ├── ShippingError        what a task needs cannot be packed or unpacked to travel
    ├── AttestationError     a key or an attestation that cannot be read, made or checked
    ├── ServerError          a resident process that cannot be started, found or stopped
    └── IllegalTransition    a task state change the lifecycle forbids: a bug of the engine
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AttestationError",
    "EventHandlerFailed",
    "ExecutorError",
    "GitError",
    "IllegalTransition",
    "JournalCorrupt",
    "MergeError",
    "NotARepository",
    "OrchestratorError",
    "PlanChanged",
    "PlanError",
    "PlanIssue",
    "ReportUnreadable",
    "RunAlreadyFinished",
    "RunDirError",
    "RunInUse",
    "ServerError",
    "SettingsError",
    "ShippingError",
    "VenvError",
]


class OrchestratorError(Exception):
    """Root of the engine's exceptions."""


@dataclass(frozen=True)
class PlanIssue:
    """One problem of a plan, located in its file when it came from one."""

    file: str | None
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        if self.file is None and self.line is None:
            return f"{self.path}: {self.message}"
        where = self.file or "<plan>"
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}"


class PlanError(OrchestratorError):
    """A plan that cannot run. ``issues`` holds every problem found, in file order."""

    def __init__(self, issues: Sequence[PlanIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


class ServerError(OrchestratorError):
    """A resident process (``orchestrator serve``) that cannot be started, found or stopped;
    the reason is the message (orchestrator/resident.py)."""


class SettingsError(OrchestratorError):
    """A run setting (a CLI option, a keyword argument, a journal's record) out of its bounds.

    ``name`` is the setting's (``concurrency``), ``reason`` what is wrong, worded as a plan's
    problems are (``must be <= 1024, found 2000``), so that the CLI can name its option.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class GitError(OrchestratorError):
    """A git command exited non-zero."""

    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        self.command = list(args)
        self.returncode = returncode
        self.stderr = stderr.strip()
        last = self.stderr.splitlines()[-1] if self.stderr else f"exit code {returncode}"
        super().__init__(f"git {' '.join(self.command)}: {last}")


class EventHandlerFailed(OrchestratorError):
    """The ``on_event`` handler raised. The run stops; ``orchestrate_parallel`` re-raises the
    handler's own exception (this class only carries it out of the task that emitted)."""


class VenvError(OrchestratorError):
    """A virtualenv could not be created, or its requirements not installed.

    ``commands`` lists the commands that ran, the failing one last.
    """

    def __init__(self, message: str, *, commands: Sequence[Sequence[str]] = ()) -> None:
        super().__init__(message)
        self.commands = [list(c) for c in commands]


class RunDirError(OrchestratorError):
    """The run directory (or a file in it) cannot be created or written."""


class ReportUnreadable(OrchestratorError):
    """A report file that cannot be read, is not JSON, or is not a report."""


class MergeError(OrchestratorError):
    """A merge-back that cannot start (bad input); nothing has moved.

    A target branch that does not exist, an unknown or unsuccessful task, a deleted task branch,
    a missing result commit, a report with no repository, or an altered report; for a checked
    merge, tasks none of which has a required check, or an envelope that cannot be read or
    does not match the report.
    """


class ExecutorError(OrchestratorError):
    """The run's executor cannot run its tasks: no scheduler at the address, a worker
    without git or with another version of the orchestrator, Dask not installed."""


class ShippingError(OrchestratorError):
    """What a task needs (or brought back) cannot be packed or unpacked: too many or too
    big files, a path that is not a plain relative one."""


class AttestationError(OrchestratorError):
    """A signing key that cannot be read or made, or an attestation that cannot be checked:
    one line saying which and why."""


class NotARepository(OrchestratorError):
    """The path is not inside a git repository (or does not exist)."""


class PlanChanged(OrchestratorError):
    """An interrupted run of the plan file exists, but the plan changed since it started."""

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"the plan changed since run {run_id} started (its digest differs); run it as a "
            "new run, restore the plan it started with to resume, or pass --force to start "
            "a new run that reuses what still matches"
        )
        self.run_id = run_id


class RunAlreadyFinished(OrchestratorError):
    """``run --resume``: the plan's latest run finished; there is nothing to resume."""

    def __init__(self, run_id: str, run_dir: Path) -> None:
        super().__init__(
            f"run {run_id} of this plan already finished: nothing to resume "
            "(--rerun starts a new run)"
        )
        self.run_id = run_id
        self.run_dir = run_dir


class JournalCorrupt(OrchestratorError):
    """A journal line other than the last cannot be read: the file was damaged or edited."""


class RunInUse(OrchestratorError):
    """Another live orchestrator holds the run."""


class IllegalTransition(OrchestratorError):
    """A state change the lifecycle does not allow: a bug in the orchestrator.

    Not an AssertionError: ``python -O`` must not make it vanish.
    """
