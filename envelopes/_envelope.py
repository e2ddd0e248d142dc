"""The HandoffEnvelope: everything an agent is told about its task."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._canonical import digest
from ._ids import BranchName, ObjectId, new_task_id, task_id_problem
from ._plan import Select, finite_json

__all__ = ["ENVELOPE_SCHEMA", "HandoffEnvelope", "Upstream", "build_envelope"]

ENVELOPE_SCHEMA = "worktree-orchestrator/envelope/v1"


class Upstream(BaseModel):
    """What a dependency produced, as its dependent task is told."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: dict[str, Any] | None = None
    result_commit: ObjectId | None = None
    branch: BranchName | None = None


class HandoffEnvelope(BaseModel):
    """A task handed to one agent.

    It is written as JSON to the path in ``ORCHESTRATOR_ENVELOPE`` before a command agent
    starts, and passed as is to a callable agent. Its digest (``envelope_sha256``) is the first
    link of the task's provenance.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_: Literal["worktree-orchestrator/envelope/v1"] = Field(
        default="worktree-orchestrator/envelope/v1", alias="schema"
    )
    task_id: str
    run_id: str | None = None
    agent: str
    task: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    requirements: list[str] = Field(default_factory=list)
    acceptance_criteria: list[str] = Field(default_factory=list)
    timeout: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    retries: int = Field(default=0, ge=0)
    env: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: int = 0
    worktree: bool = True
    venv: bool = True
    depends_on: list[str] = Field(default_factory=list)
    cache: bool = False
    group: str | None = None
    select: Select | None = None
    upstream: dict[str, Upstream] = Field(default_factory=dict)

    @field_validator("inputs", "metadata")
    @classmethod
    def _finite(cls, value: dict[str, Any]) -> dict[str, Any]:
        return finite_json(value)  # type: ignore[no-any-return]

    @field_validator("task_id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if why := task_id_problem(value, matrix=True):
            raise ValueError(why)
        return value

    def to_json_dict(self) -> dict[str, Any]:
        """The envelope as a JSON object, as written to disk and hashed."""
        return self.model_dump(mode="json", by_alias=True)

    def sha256(self) -> str:
        """``envelope_sha256``: digest of the canonical JSON of the envelope."""
        return digest(self.to_json_dict())


def build_envelope(
    agent: str,
    task: str,
    *,
    task_id: str | None = None,
    run_id: str | None = None,
    inputs: dict[str, Any] | None = None,
    requirements: list[str] | None = None,
    acceptance_criteria: list[str] | None = None,
    timeout: float = 600.0,
    retries: int = 0,
    env: dict[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
    priority: int = 0,
    worktree: bool = True,
    venv: bool = True,
    depends_on: list[str] | None = None,
    group: str | None = None,
    select: Select | None = None,
    cache: bool = False,
) -> HandoffEnvelope:
    """Build an envelope in code, generating a task id when none is given."""
    return HandoffEnvelope(
        task_id=task_id if task_id is not None else new_task_id(),
        run_id=run_id,
        agent=agent,
        task=task,
        inputs=inputs or {},
        requirements=requirements or [],
        acceptance_criteria=acceptance_criteria or [],
        timeout=timeout,
        retries=retries,
        env=env or {},
        metadata=metadata or {},
        priority=priority,
        worktree=worktree,
        venv=venv,
        depends_on=depends_on or [],
        cache=cache,
        group=group,
        select=select,
    )
