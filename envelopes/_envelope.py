"""The HandoffEnvelope: everything an agent is told about its task."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from ._canonical import digest
from ._ids import BranchName, ObjectId, new_task_id, task_id_problem
from ._lean import SharedFieldNames
from ._plan import (
    DEFAULT_TIMEOUT_S,
    EnvName,
    Limits,
    Sandbox,
    Select,
    SparsePath,
    Step,
    finite_json,
)
from ._secrets import masked_env

__all__ = ["ENVELOPE_SCHEMA", "MAX_CHANGED_FILES", "HandoffEnvelope", "Upstream", "build_envelope"]

ENVELOPE_SCHEMA = "worktree-orchestrator/envelope/v1"

#: Fields added after the first envelopes were hashed, left out of the JSON while unset.
_ADDED = (
    "prompt",
    "stall_timeout",
    "setup",
    "checks",
    "repair_attempts",
    "install_project",
    "venv_seed",
    "sparse",
)
#: The same, of each ``upstream`` entry.
_UPSTREAM_ADDED = ("changed_files", "changed_files_omitted")


#: Most paths an envelope lists of what one dependency changed (``changed_files``).
MAX_CHANGED_FILES = 100


class Upstream(SharedFieldNames):
    """What a dependency produced, as its dependent task is told.

    ``changed_files`` are the paths its result changed (added, modified, deleted) from where
    it started, sorted, at most :data:`MAX_CHANGED_FILES`; ``changed_files_omitted`` counts
    those left out.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: dict[str, Any] | None = None
    result_commit: ObjectId | None = None
    branch: BranchName | None = None
    changed_files: list[str] = Field(default_factory=list, max_length=MAX_CHANGED_FILES)
    changed_files_omitted: int = Field(default=0, ge=0)


class HandoffEnvelope(SharedFieldNames):
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
    timeout: float = Field(default=DEFAULT_TIMEOUT_S, gt=0, allow_inf_nan=False)
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
    #: Isolation (see docs/plan-format.md, "Isolation: sandbox, env, limits"). ``env`` holds
    #: the variables the plan sets; ``inherit_env`` whether the agent also gets the
    #: orchestrator's environment (default: yes, unless sandboxed), ``pass_env`` the names
    #: it gets from it when not.
    sandbox: Sandbox = "none"
    network: bool = False
    inherit_env: bool = True
    pass_env: list[EnvName] = Field(default_factory=list)
    #: Names (never values) of variables whose values are secret.
    secrets: list[EnvName] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    max_commit_mb: int = Field(default=100, gt=0)
    #: Commit a file holding a secret's value instead of failing the task (``secret_leak``).
    allow_secrets_in_commit: bool = False
    #: The prompt template a coding agent's preset renders (None: the preset's default).
    prompt: str | None = None
    #: Seconds without a byte of the agent's output after which it is killed (``stalled``).
    stall_timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    #: Steps run before the agent and checks run after it (docs/plan-format.md, "Setup and
    #: checks"); more turns the agent gets after a required check failed.
    setup: list[Step] = Field(default_factory=list)
    checks: list[Step] = Field(default_factory=list)
    repair_attempts: int = Field(default=0, ge=0, le=20)
    #: The task's own worktree installed into its venv (editable); pip in the venv.
    install_project: bool = False
    venv_seed: bool = False
    #: The directories the worktree holds (git's cone mode, and every top-level file); None:
    #: the whole repository.
    sparse: Annotated[list[SparsePath], Field(min_length=1, max_length=1000)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _inherit_by_sandbox(cls, data: Any) -> Any:
        # Unless told, a sandboxed agent starts from a minimal environment.
        if isinstance(data, dict) and "inherit_env" not in data:
            return {**data, "inherit_env": data.get("sandbox", "none") == "none"}
        return data

    @field_validator("inputs", "metadata")
    @classmethod
    def _finite(cls, value: dict[str, Any]) -> dict[str, Any]:
        return finite_json(value)  # type: ignore[no-any-return]

    @field_validator("sparse")
    @classmethod
    def _one_order(cls, value: list[str] | None) -> list[str] | None:
        # The set, not the order the plan named it in: one set, one envelope digest.
        return None if value is None else sorted(set(value))

    @field_validator("task_id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if why := task_id_problem(value, matrix=True):
            raise ValueError(why)
        return value

    def to_json_dict(self) -> dict[str, Any]:
        """The envelope as a JSON object, as written to disk and hashed: the values of its
        secret variables (see ``envelopes._secrets``) are ``***``; the agent gets them in its
        environment, not in its envelope file."""
        data = self.model_dump(mode="json", by_alias=True)
        data["env"] = masked_env(data["env"], self.secrets)
        for name in _ADDED:  # unset, newer fields: envelopes from before them hash the same
            if name in data and data[name] == _ADDED_DEFAULTS[name]:
                del data[name]
        for told in data["upstream"].values():
            for name in _UPSTREAM_ADDED:
                if not told.get(name):
                    told.pop(name, None)
        return data

    def sha256(self) -> str:
        """``envelope_sha256``: digest of the canonical JSON of the envelope."""
        return digest(self.to_json_dict())


#: What each newer field is when unset (and so left out of the JSON).
_ADDED_DEFAULTS: dict[str, Any] = {
    name: HandoffEnvelope.model_fields[name].get_default(call_default_factory=True)
    for name in _ADDED
}


def build_envelope(
    agent: str,
    task: str,
    *,
    task_id: str | None = None,
    run_id: str | None = None,
    inputs: dict[str, Any] | None = None,
    requirements: list[str] | None = None,
    acceptance_criteria: list[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
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
    sandbox: Sandbox = "none",
    network: bool = False,
    inherit_env: bool | None = None,
    pass_env: list[str] | None = None,
    secrets: list[str] | None = None,
    limits: Limits | None = None,
    max_commit_mb: int = 100,
    allow_secrets_in_commit: bool = False,
    prompt: str | None = None,
    stall_timeout: float | None = None,
    setup: list[Step] | None = None,
    checks: list[Step] | None = None,
    repair_attempts: int = 0,
    install_project: bool = False,
    venv_seed: bool = False,
    sparse: list[str] | None = None,
) -> HandoffEnvelope:
    """Build an envelope in code, generating a task id when none is given.

    *inherit_env* defaults to true without a sandbox and to false with one.
    """
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
        sandbox=sandbox,
        network=network,
        inherit_env=inherit_env if inherit_env is not None else sandbox == "none",
        pass_env=pass_env or [],
        secrets=secrets or [],
        limits=limits or Limits(),
        max_commit_mb=max_commit_mb,
        allow_secrets_in_commit=allow_secrets_in_commit,
        prompt=prompt,
        stall_timeout=stall_timeout,
        setup=setup or [],
        checks=checks or [],
        repair_attempts=repair_attempts,
        install_project=install_project,
        venv_seed=venv_seed,
        sparse=sparse,
    )
