"""What a run is given, made into what it runs: the plan normalised to envelopes, the agent
table, the settings resolved, the repository opened and the base resolved to a commit.

A plan comes as a Plan, a plan as a dict, a LoadedPlan (from a file, with positions for its
errors) or a list of HandoffEnvelopes; :func:`take_in` checks it and everything with it before
anything is made on disk, so that a run refused here leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from envelopes import AgentSpec, HandoffEnvelope, Plan, canonical_json, plan_problems, sha256_hex

from ._fs import atomic_write
from .agents import Agent, AgentLike, as_agent
from .command_agent import refuse_task_settings
from .errors import OrchestratorError, PlanError, PlanIssue
from .notify import Webhook, read_webhooks
from .plan import LoadedPlan, check_plan_repository, envelopes_of, load_plan, validate_plan_data
from .repo import Repository
from .scheduler import graph_problems
from .settings import RunSettings, SettingsOverrides, resolve_settings

__all__ = ["Intake", "PlanLike", "agent_table", "normalise", "take_in"]

#: What may be given as a plan.
PlanLike = (
    Plan | LoadedPlan | Sequence[HandoffEnvelope] | Mapping[str, Any] | str | os.PathLike[str]
)


@dataclass
class Intake:
    """A run's inputs, checked: everything :func:`orchestrate_parallel` needs to start it."""

    loaded: LoadedPlan | None
    envelopes: list[HandoffEnvelope]
    agents: dict[str, Agent]
    settings: RunSettings
    repository: Repository | None
    #: Whether the repository was opened here (and so is closed when the run ends).
    owns_repository: bool
    base_commit: str | None
    base_tree: str | None
    #: The plan as written to ``plan.json`` and hashed: canonical JSON, secret values masked.
    #: None once written (given envelopes, it is some 550 bytes a task: not kept for the run).
    plan_bytes: bytes | None
    #: ``plan_sha256`` of the report: the digest of ``plan_bytes``.
    plan_sha256: str
    #: What the caller passed: settings given as keywords, and a RunSettings object, if any
    #: (a resume resolves the settings again over the ones its run started with).
    overrides: SettingsOverrides
    given: RunSettings | None
    #: The plan's ``notify`` endpoints, their secrets read from the environment.
    webhooks: tuple[Webhook, ...] = ()

    @property
    def plan(self) -> Plan | None:
        """The plan, when the run was given one (not a list of envelopes)."""
        return self.loaded.plan if self.loaded is not None else None

    async def write_plan(self, run_dir: Path) -> None:
        """Write ``plan.json`` in *run_dir* (whole or not at all), and let go of its bytes.
        Its digest is ``plan_sha256``, which a resumed run checked against its journal."""
        data, self.plan_bytes = self.plan_bytes, None
        assert data is not None
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(atomic_write, run_dir / "plan.json", data)

    @property
    def plan_dir(self) -> Path:
        """Where the plan's relative paths start: its file's directory, else the cwd."""
        return self.loaded.plan_dir if self.loaded is not None else Path.cwd()

    def close(self) -> None:
        """Let go of the repository's lock file, if the repository was opened here."""
        if self.repository is not None and self.owns_repository:
            self.repository.lock.close()


async def take_in(
    plan: PlanLike,
    *,
    repo: Path | str | Repository | None,
    agents: Mapping[str, AgentLike] | None,
    overrides: SettingsOverrides,
    recorded: RunSettings | None = None,
) -> Intake:
    """Check *plan*, its agents and the settings; open the repository; resolve the base.

    Raises PlanError (with every problem found, or a webhook's secret not set), SettingsError,
    or OrchestratorError.
    """
    given = dict(agents or {})
    if isinstance(plan, str | os.PathLike):  # a plan file, read as `orchestrator run` reads it
        path = Path(plan)
        plan = await anyio.to_thread.run_sync(lambda: load_plan(path, callable_agents=list(given)))
    loaded, envelopes = normalise(plan, given)
    if unsafe := unsafe_installs(envelopes):
        raise PlanError(unsafe)
    webhooks = read_webhooks(loaded, os.environ)
    settings = resolve_settings(loaded.plan if loaded else None, overrides, recorded=recorded)
    table = agent_table(loaded.plan if loaded else None, given, envelopes)
    repository, commit, tree = await _open_repository(loaded, envelopes, repo, settings)
    plan_bytes = (
        loaded.json_bytes
        if loaded is not None
        else canonical_json({"envelopes": [e.to_json_dict() for e in envelopes]})
    )
    return Intake(
        loaded=loaded,
        envelopes=envelopes,
        agents=table,
        settings=settings,
        repository=repository,
        owns_repository=not isinstance(repo, Repository),
        base_commit=commit,
        base_tree=tree,
        plan_bytes=plan_bytes,
        plan_sha256=sha256_hex(plan_bytes),
        overrides=overrides,
        given=recorded,
        webhooks=tuple(webhooks),
    )


def agent_table(
    plan: Plan | None, given: Mapping[str, AgentLike], envelopes: Sequence[HandoffEnvelope]
) -> dict[str, Agent]:
    """The plan's agents, then those given in code (same name: code wins); PlanError for a
    task whose agent is defined by neither."""
    table: dict[str, Agent] = {}
    if plan is not None:
        table.update({name: as_agent(spec) for name, spec in plan.agents.items()})
    for name, value in given.items():
        if isinstance(value, AgentSpec):
            ways = {"preset", "program", "model", "args", "http"}
            refuse_task_settings(value, f"agent {name!r}, given in code,", allowed=ways)
        table[name] = as_agent(value)
    missing = sorted({e.agent for e in envelopes} - table.keys())
    if missing:
        raise PlanError(
            [
                PlanIssue(None, None, None, "agents", f"agent {name!r} is not defined")
                for name in missing
            ]
        )
    return table


async def _open_repository(
    loaded: LoadedPlan | None,
    envelopes: Sequence[HandoffEnvelope],
    repo: Path | str | Repository | None,
    settings: RunSettings,
) -> tuple[Repository | None, str | None, str | None]:
    """The run's repository (None when no task needs one) and its base commit and tree."""
    if loaded is not None and not isinstance(repo, Repository):
        if settings.base != loaded.plan.base:
            loaded = replace(loaded, plan=loaded.plan.model_copy(update={"base": settings.base}))
        return await check_plan_repository(loaded, repo_override=repo, state_dir=settings.state_dir)
    if isinstance(repo, Repository) or repo is None:
        repository = repo
    else:
        repository = await Repository.open(repo, state_dir=settings.state_dir)
    if repository is not None:
        commit, tree = await repository.resolve_commit(settings.base)
        return repository, commit, tree
    if any(e.worktree for e in envelopes):
        needing = ", ".join(e.task_id for e in envelopes if e.worktree)
        raise OrchestratorError(
            f"tasks {needing} need a worktree but no repository was given "
            "(pass repo=, or worktree=False)"
        )
    return None, None, None


def unsafe_installs(envelopes: Sequence[HandoffEnvelope]) -> list[PlanIssue]:
    """A sandboxed task that starts from other tasks' results and installs its own worktree
    (``install_project``, or a requirement naming ``{worktree}``): the install runs the
    project's build backend outside the sandbox, on code other agents wrote. Refused."""
    issues = []
    for envelope in envelopes:
        installs = envelope.install_project or any(
            "{worktree}" in requirement for requirement in envelope.requirements
        )
        if envelope.sandbox != "none" and envelope.depends_on and installs:
            message = (
                "a sandboxed task that starts from other tasks' work cannot install its "
                "worktree (install_project or -e {worktree}): the install would run their "
                "build code outside the sandbox; install in a setup step instead, which runs "
                "sandboxed"
            )
            issues.append(PlanIssue(None, None, None, f"tasks.{envelope.task_id}", message))
    return issues


def normalise(
    plan: PlanLike, agents: Mapping[str, Any]
) -> tuple[LoadedPlan | None, list[HandoffEnvelope]]:
    """The plan (None for a list of envelopes) and its envelopes, checked: PlanError if not."""
    if isinstance(plan, LoadedPlan):
        return plan, envelopes_of(plan.plan)
    if isinstance(plan, Plan):
        loaded = LoadedPlan(plan=plan, file=None, plan_dir=Path.cwd())
        problems = plan_problems(plan, callable_agents=frozenset(agents))
        if problems:
            raise PlanError([loaded.issue(p.loc, p.message) for p in problems])
        return loaded, envelopes_of(plan)
    if isinstance(plan, Mapping):
        loaded = validate_plan_data(dict(plan), callable_agents=list(agents))
        return loaded, envelopes_of(loaded.plan)
    if isinstance(plan, str | os.PathLike):
        raise TypeError("a plan file is read by take_in, not here")
    return None, _checked_envelopes(plan)


def _checked_envelopes(given: Sequence[HandoffEnvelope]) -> list[HandoffEnvelope]:
    envelopes = list(given)
    if not envelopes:
        raise PlanError([PlanIssue(None, None, None, "tasks", "no tasks to run")])
    seen: set[str] = set()
    for envelope in envelopes:
        if not isinstance(envelope, HandoffEnvelope):
            raise TypeError(f"expected HandoffEnvelope, got {type(envelope).__name__}")
        if envelope.task_id in seen:
            raise PlanError(
                [PlanIssue(None, None, None, "tasks", f"duplicate task id {envelope.task_id!r}")]
            )
        seen.add(envelope.task_id)
    problems = graph_problems(envelopes)
    if problems:
        raise PlanError([PlanIssue(None, None, None, "depends_on", p) for p in problems])
    return envelopes
