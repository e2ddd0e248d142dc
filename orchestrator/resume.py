"""Going on with a run, or taking over from one: the journal's first record, what a resume
keeps, kills and runs again, and the superseding of a run whose plan changed.

A run's journal starts with a ``run`` record (:func:`journal_run`): its plan's digest, its
repository and base, its agents' fingerprints and its settings, as one object. A resume reads
it back (:func:`recorded_run`), checks the plan is the same, kills the dead run's agents,
clears the leftovers of unfinished tasks and keeps the rest (:func:`prepare_resume`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from envelopes import HandoffEnvelope, Plan, TaskResult

from ._fs import read_json
from .cache import reusable_results, usable
from .context import RunContext
from .errors import OrchestratorError
from .journal import JOURNAL, Journal, read_journal
from .locks import RunLock
from .plan import MAX_PLAN_BYTES, LoadedPlan
from .pool import detach_dead_slots
from .recovery import carried_over, clear_task_leftovers, kill_orphans, replay
from .repo import Repository
from .settings import RunSettings

__all__ = [
    "RecordedRun",
    "Resumed",
    "journal_run",
    "journaled_settings",
    "open_run_repository",
    "prepare_resume",
    "recorded_run",
    "supersede",
    "take_over",
]


async def journal_run(
    ctx: RunContext,
    *,
    plan_sha256: str,
    started: datetime,
    plan_name: str,
    plan_file: str | None,
    agent_digests: Mapping[str, str],
) -> None:
    """The journal's first record: what a resume needs to go on with the same run."""
    assert ctx.journal is not None
    await ctx.journal.write(
        {
            "type": "run",
            "run_id": ctx.run_id,
            "at": started.isoformat(),
            "pid": os.getpid(),
            "plan_sha256": plan_sha256,
            "plan_name": plan_name,
            "plan_file": str(Path(plan_file).absolute()) if plan_file else None,
            "plan_dir": str(ctx.plan_dir),
            "repo": str(ctx.repo.root) if ctx.repo else None,
            "base_ref": ctx.base_ref,
            "base_commit": ctx.base_commit,
            "base_tree": ctx.base_tree,
            "agent_digests": dict(agent_digests),
            "settings": ctx.settings.journal_form(),
        }
    )


@dataclass(frozen=True)
class RecordedRun:
    """A run as its directory holds it: its plan and the settings it started with."""

    plan: LoadedPlan | list[HandoffEnvelope]
    settings: RunSettings
    repo: str | None


def recorded_run(run_dir: Path, run_id: str) -> RecordedRun:
    """Read *run_dir*'s plan and settings (blocking); OrchestratorError if they are unreadable."""
    try:
        record = replay(read_journal(run_dir / JOURNAL), run_id).settings
        plan_data = read_json(run_dir / "plan.json", MAX_PLAN_BYTES)
        settings = journaled_settings(record)
        plan: LoadedPlan | list[HandoffEnvelope]
        if isinstance(plan_data, dict) and "envelopes" in plan_data:
            plan = [HandoffEnvelope.model_validate(e) for e in plan_data["envelopes"]]
        else:
            plan = LoadedPlan(
                Plan.model_validate(plan_data),
                record.get("plan_file"),
                Path(record.get("plan_dir") or Path.cwd()),
            )
    except FileNotFoundError:
        raise OrchestratorError(f"no run {run_id} in {run_dir.parent}") from None
    except (OSError, ValueError) as exc:
        raise OrchestratorError(f"cannot read run {run_id}: {exc}") from exc
    return RecordedRun(plan=plan, settings=settings, repo=record.get("repo"))


@dataclass(frozen=True)
class Resumed:
    """What a resume took up: when the run first started, the tasks whose results are kept,
    and the settings the run started with (as its journal recorded them)."""

    started: datetime
    kept: list[str]
    settings: RunSettings


def journaled_settings(record: Mapping[str, Any]) -> RunSettings:
    """The settings a journal's ``run`` record holds (journals written before the settings had
    one home recorded them as ``options``)."""
    return RunSettings.from_journal(record.get("settings") or record.get("options") or {})


async def prepare_resume(
    ctx: RunContext, plan_sha256: str, envelopes: Sequence[HandoffEnvelope]
) -> Resumed:
    """Take up an interrupted run: its journal, its dead agents, its leftovers."""
    assert ctx.journal is not None
    record = replay(await anyio.to_thread.run_sync(read_journal, ctx.journal.path), ctx.run_id)
    _check_resumable(ctx, record.settings, plan_sha256, record.finished, record.superseded_by)
    settings = journaled_settings(record.settings)
    ctx.base_ref = record.settings.get("base_ref")
    ctx.base_commit = record.settings.get("base_commit")
    ctx.base_tree = record.settings.get("base_tree")
    ctx.orphans_killed = await anyio.to_thread.run_sync(kill_orphans, ctx.run_id)
    if ctx.repo is not None:
        await anyio.to_thread.run_sync(detach_dead_slots, ctx.state_dir, ctx.run_id)
    wanted = {e.task_id for e in envelopes}
    kept: dict[str, TaskResult] = {}
    for task_id, result in record.results.items():
        # Cancelled tasks, and tasks failed by the orchestrator itself (a full disk, a bug)
        # rather than by their agent, run again.
        internal = result.error is not None and result.error.kind == "internal"
        if task_id in wanted and result.status != "cancelled" and not internal:
            kept[task_id] = result
    if ctx.repo is not None:
        # Those whose work is gone (their branch deleted by ``gc --branches``, say) run again.
        kept = {task_id: r for task_id, r in kept.items() if await usable(ctx.repo, r)}
        for e in envelopes:
            finished = kept.get(e.task_id)
            if finished is None or finished.worktree is None:
                # A task to run again, or a finished one whose worktree the crash left
                # behind (its result, already on disk, says it is not kept).
                await clear_task_leftovers(
                    ctx.repo,
                    ctx.state_dir,
                    ctx.run_id,
                    e.task_id,
                    record.worktrees.get(e.task_id),
                    keep_branch=finished is not None,
                )
    restored = [e.task_id for e in envelopes if e.task_id in kept]
    for task_id in restored:
        ctx.results[task_id] = carried_over(kept[task_id])
    await ctx.journal.write(
        {
            "type": "resumed",
            "at": datetime.now(UTC).isoformat(),
            "pid": os.getpid(),
            "kept": restored,
        }
    )
    return Resumed(datetime.fromisoformat(record.settings["at"]), restored, settings)


def _check_resumable(
    ctx: RunContext,
    settings: Mapping[str, Any],
    plan_sha256: str,
    finished: bool,
    superseded_by: str | None,
) -> None:
    if finished:
        raise OrchestratorError(
            f"run {ctx.run_id} has finished; its report is {ctx.run_dir / 'report.json'}"
        )
    if superseded_by is not None:
        raise OrchestratorError(
            f"run {ctx.run_id} was taken over by run {superseded_by} "
            "(run --resume --force); resume that one"
        )
    if settings.get("plan_sha256") != plan_sha256:
        raise OrchestratorError(
            f"the plan changed since run {ctx.run_id} started (its digest was "
            f"{str(settings.get('plan_sha256'))[:12]}, it is {plan_sha256[:12]} now); "
            "resume it with the plan it started with"
        )


async def supersede(run_dir: Path, by: str) -> None:
    """Mark the interrupted run in *run_dir* as taken over by run *by*: no longer resumable."""
    lock = RunLock(run_dir)
    lock.acquire()  # RunInUse if it came alive meanwhile
    try:
        journal = Journal(run_dir / JOURNAL)
        journal.open()
        try:
            await journal.write(
                {"type": "superseded", "by": by, "at": datetime.now(UTC).isoformat()}
            )
        finally:
            journal.close()
    finally:
        lock.release()


async def open_run_repository(
    repo: Path | str | Repository | None, state_dir: Path | str | None
) -> Repository | None:
    """The repository a resumed run is in, as given (*repo*, else the cwd's when no
    *state_dir* says where the run lives instead)."""
    if isinstance(repo, Repository):
        return repo
    if repo is not None or state_dir is None:
        return await Repository.open(repo if repo is not None else Path.cwd(), state_dir=state_dir)
    return None


async def take_over(ctx: RunContext, reuse: str) -> dict[str, tuple[TaskResult, str]]:
    """The successes of run *reuse* that this run may reuse, by cache key; marks that run as
    taken over by this one (it is no longer resumable)."""
    old = ctx.state_dir / "runs" / reuse
    if not old.is_dir():
        raise OrchestratorError(f"no run {reuse} in {ctx.state_dir / 'runs'} to reuse")
    earlier = replay(await anyio.to_thread.run_sync(read_journal, old / JOURNAL), reuse)
    reusable = reusable_results(old, earlier.results, earlier.settings.get("agent_digests") or {})
    await supersede(old, ctx.run_id)
    return reusable
