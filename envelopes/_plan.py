"""The plan: which agents exist and which tasks to hand them.

A plan is data (YAML or JSON); these models are its schema. Checks that span several fields
(duplicate ids, undefined agents) live in :func:`plan_problems`, which reports each problem
with the path of the field at fault so that a loader can point at the line in the file.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._ids import task_id_problem

__all__ = [
    "AgentSpec",
    "KeepWorktrees",
    "Plan",
    "PlanDefaults",
    "PlanProblem",
    "TaskSpec",
    "plan_problems",
]

KeepWorktrees = Literal["never", "failed", "always"]
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def finite_json(value: Any) -> Any:
    """*value* unchanged, or ValueError if it holds NaN or an infinity (not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must not contain NaN or infinity (not representable in JSON)")
    if isinstance(value, dict):
        for item in value.values():
            finite_json(item)
    elif isinstance(value, list):
        for item in value:
            finite_json(item)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AgentSpec(_Strict):
    """How to start an agent: a command run in the task's worktree.

    ``command`` is a list of arguments (a string is split like a shell would). Placeholders
    ``{plan_dir}``, ``{worktree}``, ``{task_id}`` and ``{run_id}`` in arguments are replaced
    when the task starts.
    """

    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    max_concurrency: Annotated[int, Field(ge=1)] | None = None

    @field_validator("command", mode="before")
    @classmethod
    def _split_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return shlex.split(value)
        return value

    @field_validator("command")
    @classmethod
    def _non_empty_program(cls, value: list[str]) -> list[str]:
        if not value[0].strip():
            raise ValueError("the program (first element) must not be empty")
        return value


class PlanDefaults(_Strict):
    """Values every task gets unless it sets its own."""

    timeout: PositiveSeconds = 600.0
    retries: Annotated[int, Field(ge=0, le=100)] = 0
    requirements: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    worktree: bool = True
    venv: bool = True


class TaskSpec(_Strict):
    """One task of a plan, before defaults are applied."""

    id: str | None = None
    agent: str
    task: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    requirements: list[str] | None = None
    acceptance_criteria: list[str] = Field(default_factory=list)
    timeout: PositiveSeconds | None = None
    retries: Annotated[int, Field(ge=0, le=100)] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: int = 0
    worktree: bool | None = None
    venv: bool | None = None

    @field_validator("inputs", "metadata")
    @classmethod
    def _finite(cls, value: dict[str, Any]) -> dict[str, Any]:
        return finite_json(value)  # type: ignore[no-any-return]


class Plan(_Strict):
    """A whole plan file."""

    version: Literal[1] = 1
    name: str = Field(default="plan", min_length=1)
    repo: str | None = None
    base: str = Field(default="HEAD", min_length=1)
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 4
    keep_worktrees: KeepWorktrees = "failed"
    defaults: PlanDefaults = Field(default_factory=PlanDefaults)
    agents: dict[str, AgentSpec] = Field(default_factory=dict)
    tasks: list[TaskSpec] = Field(min_length=1)

    def task_ids(self) -> list[str]:
        """Every task's id, generating ``task-001``-style ids where the plan has none."""
        return [t.id or f"task-{i + 1:03d}" for i, t in enumerate(self.tasks)]


class PlanProblem(BaseModel):
    """One thing wrong with a plan, at a field path such as ``("tasks", 2, "timeout")``."""

    model_config = ConfigDict(frozen=True)

    loc: tuple[str | int, ...]
    message: str

    @property
    def path(self) -> str:
        """The field path as users write it: ``tasks[2].timeout``."""
        out = ""
        for part in self.loc:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
        return out or "<plan>"


def plan_problems(
    plan: Plan | Mapping[str, Any], *, callable_agents: frozenset[str] = frozenset()
) -> list[PlanProblem]:
    """Problems that span fields: ids, duplicate ids, agents that are not defined.

    Works on a validated Plan or on raw plan data (where it skips values of the wrong type,
    which schema validation reports), so that a loader can report these problems together
    with schema errors. *callable_agents* names agents supplied in code rather than in the
    plan's ``agents``.
    """
    data = plan.model_dump() if isinstance(plan, Plan) else plan
    agents = data.get("agents")
    agent_names = (
        {name for name in agents if isinstance(name, str)} if isinstance(agents, Mapping) else set()
    )
    tasks = data.get("tasks")
    problems: list[PlanProblem] = []
    for name in sorted(agent_names):
        if why := task_id_problem(name, what="agent name"):
            problems.append(PlanProblem(loc=("agents", name), message=why))
    if not isinstance(tasks, list):
        return problems
    seen: dict[str, int] = {}
    for index, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            continue
        written = task.get("id")
        task_id = written if written is not None else f"task-{index + 1:03d}"
        if not isinstance(task_id, str):
            pass
        elif written is not None and (why := task_id_problem(task_id)):
            problems.append(PlanProblem(loc=("tasks", index, "id"), message=why))
        elif task_id in seen:
            message = (
                f"duplicate task id {task_id!r} (first at tasks[{seen[task_id]}])"
                if written is not None
                else f"the generated id {task_id!r} is already used by tasks[{seen[task_id]}]; give this task an id"
            )
            problems.append(PlanProblem(loc=("tasks", index, "id"), message=message))
        else:
            seen[task_id] = index
        agent = task.get("agent")
        if isinstance(agent, str) and agent not in agent_names and agent not in callable_agents:
            defined = ", ".join(sorted({*agent_names, *callable_agents})) or "none"
            problems.append(
                PlanProblem(
                    loc=("tasks", index, "agent"),
                    message=f"agent {agent!r} is not defined (defined: {defined})",
                )
            )
    return problems
