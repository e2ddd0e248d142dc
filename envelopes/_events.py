"""Lifecycle events of a run, one model per kind, each with a time and the run's id.

The CLI's progress display is built on these, and library users receive them through
``orchestrate_parallel(..., on_event=...)`` or ``run_events(...)``. Every event is also a
line of the run directory's ``events.jsonl``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._plan import Select
from ._result import ErrorInfo, MergeConflict, MergeStatus, TaskStatus
from ._usage import Usage

__all__ = [
    "AttemptFailed",
    "Event",
    "GroupDecided",
    "MergeFinished",
    "MergePredicted",
    "Notification",
    "RunFinished",
    "RunStarted",
    "TaskFinished",
    "TaskPhase",
    "TaskQueued",
    "TaskRetrying",
    "TaskSkipped",
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
    #: On a resume: the tasks whose results were kept, and the dead run's agent processes
    #: that were still running and were killed.
    resumed_tasks: int = 0
    orphans_killed: int = 0


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


class TaskPhase(_Event):
    """A task with setup steps or checks moved on to its next phase: ``setup`` (before the
    agent of attempt ``attempt``), ``agent``, ``checks`` (of that attempt), or ``repair`` (the
    agent again in the same worktree: repair turn ``repair`` of ``repairs``)."""

    type: Literal["task_phase"] = "task_phase"
    task_id: str
    phase: Literal["setup", "agent", "checks", "repair"]
    attempt: int
    repair: int | None = None
    repairs: int | None = None


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
    #: What the task's agent spent, where it said so.
    usage: Usage | None = None


class TaskSkipped(_Event):
    """A task will never run: a dependency did not succeed, or its dependencies conflict."""

    type: Literal["task_skipped"] = "task_skipped"
    task_id: str
    agent: str
    error: ErrorInfo


class GroupDecided(_Event):
    """A matrix group's selection is known (with ``first_success``, its first success)."""

    type: Literal["group_decided"] = "group_decided"
    group: str
    select: Select
    selected: list[str]


class MergePredicted(_Event):
    """Conflicts predicted between the results to merge, and against the target branch."""

    type: Literal["merge_predicted"] = "merge_predicted"
    into: str
    tasks: list[str]
    conflicts: list[MergeConflict]


class MergeFinished(_Event):
    """A merge into ``into`` moved it to ``new_commit``, or did not (``status``)."""

    type: Literal["merge_finished"] = "merge_finished"
    into: str
    status: MergeStatus
    new_commit: str | None
    message: str


class RunFinished(_Event):
    """Every task has a result and the report is written."""

    type: Literal["run_finished"] = "run_finished"
    report_path: str
    successful: int
    total_tasks: int


class Notification(_Event):
    """What became of the run's events at one webhook (``notify``): one event ``delivered``
    or ``failed``, or a number of them ``dropped`` (never sent). Never sent to a webhook itself.

    ``url`` is the webhook's without its user, password and query, which may hold tokens.
    """

    type: Literal["notification"] = "notification"
    url: str
    outcome: Literal["delivered", "failed", "dropped"]
    #: Delivered or failed: the event sent (its type and time, and task if it has one), the
    #: delivery's id (its ``X-Orchestrator-Delivery`` header), the requests made, the last
    #: answer's status (None: none came).
    event: str | None = None
    event_at: datetime | None = None
    task_id: str | None = None
    delivery: str | None = None
    attempts: int = 0
    status_code: int | None = None
    #: Dropped: how many events.
    dropped: int = 0
    #: Why it failed or was dropped, on one line; empty when delivered.
    message: str = ""


Event = Annotated[
    RunStarted
    | TaskQueued
    | TaskStarted
    | TaskPhase
    | AttemptFailed
    | TaskRetrying
    | TaskFinished
    | TaskSkipped
    | GroupDecided
    | MergePredicted
    | MergeFinished
    | RunFinished
    | Notification,
    Field(discriminator="type"),
]
