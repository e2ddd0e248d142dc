"""Lifecycle events of a run, one model per kind, each with a time and the run's id.

The CLI's progress display is built on these, and library users receive them through
``orchestrate_parallel(..., on_event=...)``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._result import ErrorInfo, TaskStatus

__all__ = [
    "AttemptFailed",
    "Event",
    "RunFinished",
    "RunStarted",
    "TaskFinished",
    "TaskQueued",
    "TaskRetrying",
    "TaskStarted",
]


def _now() -> datetime:
    return datetime.now(UTC)


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: datetime = Field(default_factory=_now)
    run_id: str


class RunStarted(_Event):
    """The run has resolved its base commit and is about to start tasks."""

    type: Literal["run_started"] = "run_started"
    total_tasks: int
    base_commit: str | None
    run_dir: str


class TaskQueued(_Event):
    """A task is ready and waits for a slot (the run's and its agent's limits)."""

    type: Literal["task_queued"] = "task_queued"
    task_id: str
    agent: str
    priority: int


class TaskStarted(_Event):
    """A task got a concurrency slot and is being set up."""

    type: Literal["task_started"] = "task_started"
    task_id: str
    agent: str


class AttemptFailed(_Event):
    """One attempt did not succeed (it may be retried)."""

    type: Literal["attempt_failed"] = "attempt_failed"
    task_id: str
    attempt: int
    status: TaskStatus
    error: ErrorInfo


class TaskRetrying(_Event):
    """A task will be retried after ``wait_s`` seconds."""

    type: Literal["task_retrying"] = "task_retrying"
    task_id: str
    attempt: int
    wait_s: float


class TaskFinished(_Event):
    """A task has its final result."""

    type: Literal["task_finished"] = "task_finished"
    task_id: str
    agent: str
    status: TaskStatus
    attempts: int
    duration_s: float
    result_commit: str | None
    error: ErrorInfo | None


class RunFinished(_Event):
    """Every task has a result and the report is written."""

    type: Literal["run_finished"] = "run_finished"
    report_path: str
    successful: int
    total_tasks: int


Event = Annotated[
    RunStarted
    | TaskQueued
    | TaskStarted
    | AttemptFailed
    | TaskRetrying
    | TaskFinished
    | RunFinished,
    Field(discriminator="type"),
]
