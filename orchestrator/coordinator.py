"""The coordinator: run many subagents at once, exactly ``concurrency`` at a time."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from envelopes import (
    AgentSpec,
    ErrorInfo,
    HandoffEnvelope,
    LogFile,
    MergeRecord,
    MergeSpec,
    Plan,
    Report,
    TaskResult,
    Upstream,
    canonical_json,
    digest,
    ref_safe,
    seal_report,
    sha256_hex,
)
from envelopes._events import (
    Event,
    GroupDecided,
    MergeFinished,
    RunFinished,
    RunStarted,
    TaskFinished,
    TaskQueued,
    TaskSkipped,
)
from envelopes._secrets import masked_plan

from ._fs import atomic_write, write_file
from .agents import Agent, AgentFunction, as_agent
from .cache import agent_digest, cache_key, cached_result, reusable_results, usable
from .cache import lookup as cache_lookup
from .cache import store as cache_store
from .context import EventHandler, RunContext
from .errors import (
    EventHandlerFailed,
    GitError,
    MergeError,
    OrchestratorError,
    PlanError,
    PlanIssue,
    RunDirError,
)
from .guard import moved_refs, ref_values
from .journal import JOURNAL, Journal, RunLock, read_journal
from .merge import Combined, combine_commits
from .mergeback import merge_results
from .plan import LoadedPlan, check_plan_repository, envelopes_of, validate_plan_data
from .pool import VenvPool, WorktreePool
from .recovery import carried_over, clear_task_leftovers, kill_orphans, replay
from .repo import Repository
from .report import aggregate_results, write_report
from .scheduler import GroupState, Scheduler, TaskBook, graph_problems
from .subagent import finished_event, journal_result, not_started_result, run_subagent
from .venv import VenvBackend, get_backend

__all__ = ["RunEvents", "orchestrate_parallel", "resume_run", "run_events"]

KEEP_POLICIES = ("never", "failed", "always")

AgentLike = Agent | AgentSpec | Sequence[str] | AgentFunction


async def orchestrate_parallel(
    plan: Plan | LoadedPlan | Sequence[HandoffEnvelope] | Mapping[str, Any],
    *,
    repo: Path | str | Repository | None = None,
    agents: Mapping[str, AgentLike] | None = None,
    concurrency: int | None = None,
    base: str | None = None,
    keep_worktrees: str | None = None,
    run_id: str | None = None,
    state_dir: Path | str | None = None,
    report_path: Path | str | None = None,
    venv_backend: str | VenvBackend = "auto",
    kill_grace: float = 2.0,
    backoff: tuple[float, float] = (1.0, 30.0),
    on_event: EventHandler | None = None,
    agent_limits: Mapping[str, int] | None = None,
    fail_fast: bool | None = None,
    resume: str | None = None,
    reuse: str | None = None,
    pool: int | None = None,
) -> Report:
    """Run every task of *plan* as a subagent and return the sealed Report.

    *plan* is a Plan (or a plan as a dict), a LoadedPlan from :func:`load_plan`, or a list of
    HandoffEnvelopes. *agents* maps agent names to commands (argv lists), AgentSpecs or async
    callables ``async def agent(envelope, workspace) -> dict``; they override the plan's own
    ``agents`` of the same name. The report is written to ``<run_dir>/report.json`` and, when
    *report_path* is given, there too.

    At most *concurrency* tasks run at once (default: the plan's), and at most
    *agent_limits[name]* of one agent's. A task with ``depends_on`` starts from its
    dependencies' results once they all succeeded, and is ``skipped`` if one did not. One
    task's failure never stops the others, unless *fail_fast* (default: the plan's) says to
    cancel everything at the first failure. Works under asyncio and trio and keeps no global
    state, so several runs may share an event loop.

    Cancellation: every running agent's process group is terminated, each running task is
    recorded as ``cancelled`` (its changes committed, its worktree removed unless the policy
    is ``always``), a partial report is written to the run directory, and the cancellation
    propagates.

    Every state change and result goes to the run's journal first, so a run whose
    orchestrator died (or was cancelled) can go on: *resume* names such a run, whose plan
    must be this one. Its finished tasks are kept (marked ``resumed``), except cancelled ones;
    the rest run again from a clean worktree, after the dead run's agents are killed and
    its leftovers cleared. See :func:`resume_run` to resume from the run's own plan.
    *reuse* names an earlier run (one whose plan changed, say) whose successes are reused, as
    ``cached`` results, by tasks of this new run that do exactly the same work (the result
    cache's key; see orchestrator/cache.py).

    *pool* bounds the repository's worktree pool (default: the run's concurrency; 0: no
    pool): tasks borrow an already checked-out worktree, reset to exactly their start
    commit, instead of checking out a new one, and give it back when done (see
    orchestrator/pool.py).
    """
    if any(n < 1 for n in (agent_limits or {}).values()):
        raise OrchestratorError(f"agent limits must be >= 1, got {dict(agent_limits or {})}")
    if concurrency is not None and concurrency < 1:
        raise OrchestratorError(f"concurrency must be >= 1, got {concurrency}")
    if pool is not None and pool < 0:
        raise OrchestratorError(f"pool must be >= 0, got {pool}")
    if keep_worktrees is not None and keep_worktrees not in KEEP_POLICIES:
        raise OrchestratorError(
            f"keep_worktrees must be one of {', '.join(KEEP_POLICIES)}, got {keep_worktrees!r}"
        )
    agents = dict(agents or {})
    loaded, envelopes = _normalise(plan, agents)
    the_plan = loaded.plan if loaded else None
    table: dict[str, Agent] = {}
    if the_plan is not None:
        table.update({name: as_agent(spec) for name, spec in the_plan.agents.items()})
    table.update({name: as_agent(value) for name, value in agents.items()})
    missing = sorted({e.agent for e in envelopes} - table.keys())
    if missing:
        raise PlanError(
            [
                PlanIssue(None, None, None, "agents", f"agent {name!r} is not defined")
                for name in missing
            ]
        )

    base_ref = base or (the_plan.base if the_plan else "HEAD")
    repository: Repository | None
    if loaded is not None and not isinstance(repo, Repository):
        if base is not None:
            loaded = LoadedPlan(
                loaded.plan.model_copy(update={"base": base}),
                loaded.file,
                loaded.plan_dir,
                loaded.positions,
            )
        repository, commit, tree = await check_plan_repository(
            loaded, repo_override=repo, state_dir=state_dir
        )
    else:
        if isinstance(repo, Repository) or repo is None:
            repository = repo
        else:
            repository = await Repository.open(repo, state_dir=state_dir)
        commit = tree = None
        if repository is not None:
            commit, tree = await repository.resolve_commit(base_ref)
        elif any(e.worktree for e in envelopes):
            needing = ", ".join(e.task_id for e in envelopes if e.worktree)
            raise OrchestratorError(
                f"tasks {needing} need a worktree but no repository was given (pass repo=, or worktree=False)"
            )
    # A Repository passed in may serve other runs too: only one opened here is closed here.
    owns_repo = not isinstance(repo, Repository)
    backend = get_backend(venv_backend) if isinstance(venv_backend, str) else venv_backend
    ctx = await RunContext.open(
        repo=repository,
        base=base_ref,
        base_commit=commit,
        base_tree=tree,
        run_id=resume or run_id,
        resume=resume is not None,
        state_dir=state_dir,
        plan_dir=loaded.plan_dir if loaded else Path.cwd(),
        keep_worktrees=keep_worktrees or (the_plan.keep_worktrees if the_plan else "failed"),
        venv_backend=backend,
        kill_grace=kill_grace,
        backoff_initial=backoff[0],
        backoff_max=backoff[1],
        on_event=on_event,
    )
    limit = concurrency or (the_plan.concurrency if the_plan else 4)
    pool_size = limit if pool is None else pool
    if pool_size > 0:
        if repository is not None:
            ctx.pool = WorktreePool(repository, pool_size)
        ctx.venv_pool = VenvPool(ctx.state_dir, backend, pool_size)
    # As written to plan.json and hashed: secret values masked (docs/security.md).
    plan_json = (
        masked_plan(the_plan.model_dump(mode="json"))
        if the_plan
        else {"envelopes": [e.to_json_dict() for e in envelopes]}
    )
    plan_sha = digest(plan_json)
    envelopes = [e.model_copy(update={"run_id": ctx.run_id}) for e in envelopes]
    started = datetime.now(UTC)
    hooks = _Hooks(ctx, table)
    restored: list[str] = []
    try:
        # The agents as they are now (their scripts fingerprinted): for the result cache,
        # and journaled so that a later run reusing this one compares with them as they were.
        hooks.agent_digests = await anyio.to_thread.run_sync(
            lambda: {name: agent_digest(agent, ctx.plan_dir) for name, agent in table.items()}
        )
        if resume is not None:
            started, restored = await _prepare_resume(ctx, plan_sha, envelopes)
        else:
            await _journal_run(ctx, plan_sha, started, the_plan, loaded, limit, hooks)
        if reuse is not None:
            old = ctx.state_dir / "runs" / reuse
            if not old.is_dir():
                raise OrchestratorError(f"no run {reuse} in {ctx.state_dir / 'runs'} to reuse")
            earlier = replay(await anyio.to_thread.run_sync(read_journal, old / JOURNAL), reuse)
            hooks.reusable = reusable_results(
                old, earlier.results, earlier.settings.get("agent_digests") or {}
            )
            await _supersede(old, ctx.run_id)
    except BaseException:
        ctx.close()
        if resume is None:
            # Refused before any task: a new run leaves no run directory behind.
            shutil.rmtree(ctx.run_dir, ignore_errors=True)
        if ctx.repo is not None and owns_repo:
            ctx.repo.lock.close()
        raise
    limits = {
        name: spec.max_concurrency
        for name, spec in (the_plan.agents.items() if the_plan else ())
        if spec.max_concurrency
    }
    limits.update(agent_limits or {})
    book = ctx.book = TaskBook([e.task_id for e in envelopes], on_move=ctx.journal_move)
    scheduler = Scheduler(
        envelopes,
        hooks,
        limit=limit,
        agent_limits=limits,
        book=book,
        results=ctx.results,
        fail_fast=fail_fast if fail_fast is not None else bool(the_plan and the_plan.fail_fast),
        restored=restored,
    )

    report_file = ctx.run_dir / "report.json"
    # Every ref as the run starts, so that one an agent moves is reported (docs/security.md).
    refs_before: dict[str, str] = {}

    async def finish(results: list[TaskResult]) -> Report:
        warnings: list[str] = []
        if ctx.repo is not None and refs_before:
            with anyio.CancelScope(shield=True):
                warnings = moved_refs(refs_before, await ref_values(ctx.repo.git), results)
        if ctx.repo is not None and ctx.guarding and ctx.repo.git.guard is not None:
            warnings += await anyio.to_thread.run_sync(ctx.repo.git.guard.unblamed)
        report = aggregate_results(
            results,
            run_id=ctx.run_id,
            plan_name=the_plan.name if the_plan else "envelopes",
            plan_sha256=plan_sha,
            repo=str(ctx.repo.root) if ctx.repo else None,
            base_ref=ctx.base_ref,
            base_commit=ctx.base_commit,
            run_dir=ctx.run_dir,
            started_at=started,
            finished_at=datetime.now(UTC),
            groups={
                name: (group.select, group.selected if group.decided else None)
                for name, group in scheduler.groups.items()
            },
            warnings=warnings,
        )
        await write_report(report, report_file, *([Path(report_path)] if report_path else []))
        await _tidy(ctx)
        return report

    # From here on, however the run ends, it ends with a report and the lock closed.
    try:
        ctx.open_events_log()
        if ctx.repo is not None:
            refs_before.update(await ref_values(ctx.repo.git))
        if resume is None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(
                    atomic_write, ctx.run_dir / "plan.json", canonical_json(plan_json)
                )
        await _emit(
            ctx,
            RunStarted(
                run_id=ctx.run_id,
                total_tasks=len(envelopes),
                base_commit=ctx.base_commit,
                run_dir=str(ctx.run_dir),
                resumed_tasks=len(restored),
                orphans_killed=ctx.orphans_killed,
            ),
        )
        await scheduler.run()
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            for e in envelopes:
                if e.task_id not in ctx.results:
                    ctx.results[e.task_id] = not_started_result(e, table[e.agent], ctx)
                    if book.states[e.task_id] in ("pending", "ready"):
                        book.move(e.task_id, "cancelled")
            try:
                await finish([ctx.results[e.task_id] for e in envelopes])
            except RunDirError:
                # The report cannot be written either (a full disk): the first error is
                # the one to tell, unless it was a cancellation.
                if isinstance(exc, Exception):
                    raise _unwrapped(exc) from None
                raise
            finally:
                ctx.close_events_log()
                ctx.close()
                if ctx.repo is not None and owns_repo:
                    ctx.repo.lock.close()
        unwrapped = _unwrapped(exc)
        if unwrapped is not exc:
            raise unwrapped from None
        raise
    try:
        try:
            report = await finish([ctx.results[e.task_id] for e in envelopes])
            if the_plan is not None and the_plan.merge is not None and ctx.repo is not None:
                copies = [Path(report_path)] if report_path else []
                report = await _merge_at_end(ctx, report, the_plan.merge, report_file, copies)
            if ctx.journal is not None:
                with anyio.CancelScope(shield=True):
                    await ctx.journal.write(
                        {
                            "type": "finished",
                            "at": datetime.now(UTC).isoformat(),
                            "report_sha256": report.report_sha256,
                        }
                    )
                    ctx.finished = True
        finally:
            ctx.close()
            if ctx.repo is not None and owns_repo:
                ctx.repo.lock.close()
        await _emit(
            ctx,
            RunFinished(
                run_id=ctx.run_id,
                report_path=str(report_path or report_file),
                successful=report.summary.successful,
                total_tasks=report.summary.total_tasks,
            ),
        )
        ctx.flush_events_log()  # a full disk now is told, not lost at close
    finally:
        ctx.close_events_log()
    return report


async def _journal_run(
    ctx: RunContext,
    plan_sha: str,
    started: datetime,
    plan: Plan | None,
    loaded: LoadedPlan | None,
    limit: int,
    hooks: _Hooks,
) -> None:
    """The journal's first record: what a resume needs to go on with the same run."""
    assert ctx.journal is not None
    await ctx.journal.write(
        {
            "type": "run",
            "run_id": ctx.run_id,
            "at": started.isoformat(),
            "pid": os.getpid(),
            "plan_sha256": plan_sha,
            "plan_name": plan.name if plan else "envelopes",
            "plan_file": str(Path(loaded.file).absolute()) if loaded and loaded.file else None,
            "plan_dir": str(ctx.plan_dir),
            "repo": str(ctx.repo.root) if ctx.repo else None,
            "base_ref": ctx.base_ref,
            "base_commit": ctx.base_commit,
            "base_tree": ctx.base_tree,
            "agent_digests": hooks.agent_digests,
            "options": {
                "concurrency": limit,
                "pool": ctx.venv_pool.size if ctx.venv_pool else 0,
                "keep_worktrees": ctx.keep_worktrees,
                "venv_backend": ctx.venv_backend.name,
                "kill_grace": ctx.kill_grace,
                "backoff": [ctx.backoff_initial, ctx.backoff_max],
            },
        }
    )


async def _prepare_resume(
    ctx: RunContext, plan_sha: str, envelopes: Sequence[HandoffEnvelope]
) -> tuple[datetime, list[str]]:
    """Take up an interrupted run: its journal, its dead agents, its leftovers.

    Returns when the run first started and the tasks whose results are kept.
    """
    assert ctx.journal is not None
    contents = await anyio.to_thread.run_sync(read_journal, ctx.journal.path)
    record = replay(contents, ctx.run_id)
    if record.finished:
        raise OrchestratorError(
            f"run {ctx.run_id} has finished; its report is {ctx.run_dir / 'report.json'}"
        )
    if record.superseded_by is not None:
        raise OrchestratorError(
            f"run {ctx.run_id} was taken over by run {record.superseded_by} "
            "(run --resume --force); resume that one"
        )
    if record.settings.get("plan_sha256") != plan_sha:
        raise OrchestratorError(
            f"the plan changed since run {ctx.run_id} started (its digest was "
            f"{str(record.settings.get('plan_sha256'))[:12]}, it is {plan_sha[:12]} now); "
            "resume it with the plan it started with"
        )
    ctx.base_ref = record.settings.get("base_ref")
    ctx.base_commit = record.settings.get("base_commit")
    ctx.base_tree = record.settings.get("base_tree")
    ctx.orphans_killed = await anyio.to_thread.run_sync(kill_orphans, ctx.run_id)
    wanted = {e.task_id for e in envelopes}
    kept: dict[str, TaskResult] = {}
    for task_id, result in record.results.items():
        # Cancelled tasks, and tasks failed by the orchestrator itself (a full disk, a bug)
        # rather than by their agent, run again.
        internal = result.error is not None and result.error.kind == "internal"
        if task_id in wanted and result.status != "cancelled" and not internal:
            kept[task_id] = result
    if ctx.repo is not None:
        kept = await _still_there(ctx.repo, kept)
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
    return datetime.fromisoformat(record.settings["at"]), restored


async def _supersede(run_dir: Path, by: str) -> None:
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


async def _still_there(repo: Repository, results: dict[str, TaskResult]) -> dict[str, TaskResult]:
    """*results* less those whose work is gone: their branch no longer holds their result
    commit (deleted by ``gc --branches``, say). Those tasks run again."""
    return {task_id: r for task_id, r in results.items() if await usable(repo, r)}


async def _merge_at_end(
    ctx: RunContext, report: Report, spec: MergeSpec, report_file: Path, copies: list[Path]
) -> Report:
    """The plan's ``merge``: when every task succeeded, merge the results; record the outcome.

    Members of a ``first_success`` group cancelled because another member won count as
    done. The report is already on disk without the record, so a failure or cancellation
    here loses nothing; it is written again with the record.
    """
    assert ctx.repo is not None
    # A member of a first_success group that another member beat is not a failure.
    unfinished = [
        r
        for r in report.results
        if not r.succeeded and not (r.error is not None and r.error.kind == "not_needed")
    ]
    if unfinished:
        total = len(report.results)
        record = MergeRecord(
            into=spec.into,
            status="skipped",
            message=f"{len(unfinished)} of {total} tasks did not succeed; nothing was merged",
            at=datetime.now(UTC),
        )
        await _emit(ctx, _merge_finished(ctx, record))
    else:
        try:
            record = await merge_results(
                report,
                into=spec.into,
                tasks=spec.tasks,
                repo=ctx.repo,
                on_event=lambda event: _emit(ctx, event),
            )
        except MergeError as exc:
            record = MergeRecord(
                into=spec.into, status="refused", message=str(exc), at=datetime.now(UTC)
            )
            await _emit(ctx, _merge_finished(ctx, record))
    report = seal_report(report.model_copy(update={"merge": [*report.merge, record]}))
    with anyio.CancelScope(shield=True):
        await write_report(report, report_file, *copies)
    return report


def _merge_finished(ctx: RunContext, record: MergeRecord) -> MergeFinished:
    return MergeFinished(
        run_id=ctx.run_id,
        into=record.into,
        status=record.status,
        new_commit=record.new_commit,
        message=record.message,
    )


async def resume_run(
    run_id: str,
    *,
    repo: Path | str | Repository | None = None,
    state_dir: Path | str | None = None,
    agents: Mapping[str, AgentLike] | None = None,
    on_event: EventHandler | None = None,
    report_path: Path | str | None = None,
    concurrency: int | None = None,
) -> Report:
    """Go on with run *run_id*, interrupted (its orchestrator died) or cancelled.

    The plan is the run's own (``plan.json`` in its run directory), with the settings it
    started with (*concurrency* may override its limit). Agents given in code (*agents*) are
    needed for callable agents, which a plan file cannot hold. The repository is *repo*,
    else the one the run was made in. See ``orchestrate_parallel(..., resume=)``.
    """
    repository = repo if isinstance(repo, Repository) else None
    if repository is None and (repo is not None or state_dir is None):
        where = Path.cwd() if repo is None or isinstance(repo, Repository) else repo
        repository = await Repository.open(where, state_dir=state_dir)
    root = repository.state_dir if repository else Path(state_dir or ".orchestrator").absolute()
    run_dir = root / "runs" / run_id
    if not run_dir.is_dir():
        raise OrchestratorError(f"no run {run_id} in {root / 'runs'}")
    try:
        settings = replay(read_journal(run_dir / "journal.jsonl"), run_id).settings
        plan_data = json.loads((run_dir / "plan.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OrchestratorError(f"no run {run_id} in {root / 'runs'}") from None
    except (OSError, ValueError) as exc:
        raise OrchestratorError(f"cannot read run {run_id}: {exc}") from exc
    options = settings.get("options", {})
    plan: Any
    if isinstance(plan_data, dict) and "envelopes" in plan_data:
        plan = [HandoffEnvelope.model_validate(e) for e in plan_data["envelopes"]]
    else:
        plan = LoadedPlan(
            Plan.model_validate(plan_data),
            settings.get("plan_file"),
            Path(settings.get("plan_dir") or Path.cwd()),
        )
    if repository is None and settings.get("repo"):
        repository = await Repository.open(settings["repo"], state_dir=state_dir)
    try:
        return await orchestrate_parallel(
            plan,
            repo=repository if repository is not None else None,
            agents=agents,
            concurrency=concurrency or options.get("concurrency"),
            pool=options.get("pool"),
            keep_worktrees=options.get("keep_worktrees"),
            state_dir=state_dir,
            report_path=report_path,
            venv_backend=options.get("venv_backend", "auto"),
            kill_grace=options.get("kill_grace", 2.0),
            backoff=tuple(options.get("backoff", (1.0, 30.0))),
            on_event=on_event,
            resume=run_id,
        )
    finally:
        if repository is not None and not isinstance(repo, Repository):
            repository.lock.close()


class _Hooks:
    """The run's side of the scheduler (see ``SchedulerHooks``)."""

    def __init__(self, ctx: RunContext, agents: Mapping[str, Agent]) -> None:
        self.ctx = ctx
        self.agents = agents
        self._merges: dict[tuple[str, ...], Combined] = {}
        self._merging = anyio.Lock()
        #: Results of an earlier run to reuse, by cache key (``reuse=``).
        self.reusable: dict[str, tuple[TaskResult, str]] = {}
        self.agent_digests: dict[str, str] = {}

    async def queued(self, envelope: HandoffEnvelope) -> None:
        await self.ctx.emit(
            TaskQueued(
                run_id=self.ctx.run_id,
                task_id=envelope.task_id,
                agent=envelope.agent,
                priority=envelope.priority,
            )
        )

    async def run(self, envelope: HandoffEnvelope) -> None:
        ctx, agent = self.ctx, self.agents[envelope.agent]
        key = None
        if envelope.cache or self.reusable:
            key = cache_key(
                envelope, ctx.start_of(envelope.task_id)[0], self.agent_digests[envelope.agent]
            )
            if await self._from_cache(envelope, key):
                return
        await run_subagent(envelope, agent, ctx)
        result = ctx.results[envelope.task_id]
        if key is not None and envelope.cache and result.status == "succeeded":
            with contextlib.suppress(RunDirError):  # a cache that cannot be written is a miss later
                await cache_store(ctx.state_dir, key, ctx.run_id, result)

    async def _from_cache(self, envelope: HandoffEnvelope, key: str) -> bool:
        """Serve the task from the cache, if it has a usable result (no agent runs)."""
        ctx = self.ctx
        started, clock = datetime.now(UTC), time.monotonic()
        hit = self.reusable.get(key)
        if hit is not None and not await usable(ctx.repo, hit[0]):
            hit = None
        if hit is None and envelope.cache:
            hit = await cache_lookup(ctx.repo, ctx.state_dir, key)
        if hit is None:
            return False
        earlier, run_id = hit
        data = canonical_json(envelope.to_json_dict())
        path = ctx.run_dir / "envelopes" / f"{ref_safe(envelope.task_id)}.json"
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(write_file, path, data)
            entry = LogFile(
                path=path.relative_to(ctx.run_dir).as_posix(),
                sha256=sha256_hex(data),
                size=len(data),
            )
            result = cached_result(
                earlier,
                envelope=envelope,
                envelope_file=entry,
                key=key,
                run_id=run_id,
                started=started,
                clock=clock,
            )
            ctx.results[envelope.task_id] = result
            ctx.move(envelope.task_id, "cached")
            await journal_result(ctx, result, final=True)
        await ctx.emit(finished_event(ctx, result))
        return True

    def cancelling(self, task_id: str, error: ErrorInfo) -> None:
        self.ctx.cancel_reasons[task_id] = error

    async def never_started(
        self, envelope: HandoffEnvelope, status: Literal["skipped", "cancelled"], error: ErrorInfo
    ) -> None:
        ctx = self.ctx
        result = not_started_result(envelope, self.agents[envelope.agent], ctx, status, error)
        ctx.results[envelope.task_id] = result
        if status == "skipped":
            event: Event = TaskSkipped(
                run_id=ctx.run_id, task_id=envelope.task_id, agent=envelope.agent, error=error
            )
        else:
            event = TaskFinished(
                run_id=ctx.run_id,
                task_id=envelope.task_id,
                agent=envelope.agent,
                status=status,
                attempts=0,
                duration_s=0.0,
                result_commit=None,
                error=error,
            )
        await ctx.emit(event)

    async def group_decided(self, name: str, group: GroupState) -> None:
        await self.ctx.emit(
            GroupDecided(
                run_id=self.ctx.run_id, group=name, select=group.select, selected=group.selected
            )
        )

    async def resolve(
        self, envelope: HandoffEnvelope, upstream: list[str]
    ) -> HandoffEnvelope | ErrorInfo:
        """Tell the task what its dependencies produced, and start it from their results."""
        ctx = self.ctx
        results = [ctx.results[task_id] for task_id in upstream]
        told = {
            r.task_id: Upstream(
                output=r.output, result_commit=r.provenance.result_commit, branch=r.branch
            )
            for r in results
        }
        envelope = envelope.model_copy(update={"upstream": told})
        commits = [r.provenance.result_commit for r in results if r.provenance.result_commit]
        if not commits or ctx.repo is None or not envelope.worktree:
            return envelope
        key = tuple(commits)
        try:
            async with self._merging:
                if key not in self._merges:
                    names = ", ".join(r.task_id for r in results if r.provenance.result_commit)
                    self._merges[key] = await combine_commits(
                        ctx.repo.git,
                        commits,
                        message=f"orchestrator: start from the results of {names}\n",
                    )
                combined = self._merges[key]
        except GitError as exc:
            return ErrorInfo(
                kind="dependency_conflict",
                message=f"cannot merge the dependencies' results: {exc}",
            )
        if combined.commit is None or combined.tree is None:
            with_commit = [r.task_id for r in results if r.provenance.result_commit]
            index = combined.conflicting or 0
            before = ", ".join(with_commit[:index])
            return ErrorInfo(
                kind="dependency_conflict",
                message=f"dependency merge conflict: {with_commit[index]} and {before} both "
                f"change {', '.join(combined.conflicts)}",
                paths=combined.conflicts,
            )
        ctx.starts[envelope.task_id] = (combined.commit, combined.tree)
        return envelope


class RunEvents:
    """The events of a run, as an async iterator; ``report`` is set once the run has ended."""

    def __init__(self, receive: MemoryObjectReceiveStream[Event]) -> None:
        self._receive = receive
        self.report: Report | None = None

    def __aiter__(self) -> RunEvents:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


@asynccontextmanager
async def run_events(
    plan: Plan | LoadedPlan | Sequence[HandoffEnvelope] | Mapping[str, Any], **options: Any
) -> AsyncIterator[RunEvents]:
    """Start :func:`orchestrate_parallel` and iterate over its events as they happen::

        async with run_events(plan, repo=repo) as events:
            async for event in events:
                print(event.type)
        report = events.report

    The run starts on entry and takes the same options. Events are buffered without limit,
    so a slow reader never slows the run. Leaving the block waits for the run to end
    (nothing is cut short by a ``break``); an exception in the block cancels the run, which
    then writes its partial report. The run's own exception (a PlanError, say) is raised
    when the block is left. An ``on_event`` handler, if given, is called too.
    """
    handler: EventHandler | None = options.pop("on_event", None)
    send, receive = anyio.create_memory_object_stream[Event](math.inf)
    events = RunEvents(receive)
    failed: list[Exception] = []

    async def deliver(event: Event) -> None:
        send.send_nowait(event)
        if handler is not None:
            outcome = handler(event)
            if inspect.isawaitable(outcome):
                await outcome

    async def go() -> None:
        with send:
            try:
                events.report = await orchestrate_parallel(plan, on_event=deliver, **options)
            except Exception as exc:
                failed.append(exc)

    try:
        async with receive, anyio.create_task_group() as tg:
            tg.start_soon(go)
            yield events
    except BaseExceptionGroup as group:
        unwrapped = _unwrapped(group)
        if unwrapped is group:
            raise
        raise unwrapped from None
    if failed:
        raise failed[0]


async def _emit(ctx: RunContext, event: Event) -> None:
    """Emit a run-level event; a failing handler's own exception propagates."""
    try:
        await ctx.emit(event)
    except EventHandlerFailed as exc:
        raise (exc.__cause__ or exc) from None


def _unwrapped(exc: BaseException) -> BaseException:
    """What a task group raised, as callers want to catch it.

    A lone exception comes out of its group; a failed ``on_event`` handler comes out as the
    handler's own exception (the first, if several tasks' handlers failed together); several
    tasks stopped by the orchestrator's own errors (a full disk, met by two tasks at once)
    come out as the first of them.
    """
    leaves = _leaves(exc)
    failed = [e for e in leaves if isinstance(e, EventHandlerFailed)]
    if failed and failed[0].__cause__ is not None:
        return failed[0].__cause__
    if len(leaves) > 1 and all(isinstance(e, OrchestratorError) for e in leaves):
        return leaves[0]
    return leaves[0] if len(leaves) == 1 else exc


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _normalise(
    plan: Plan | LoadedPlan | Sequence[HandoffEnvelope] | Mapping[str, Any],
    agents: Mapping[str, Any],
) -> tuple[LoadedPlan | None, list[HandoffEnvelope]]:
    if isinstance(plan, LoadedPlan):
        return plan, envelopes_of(plan.plan)
    if isinstance(plan, Plan):
        loaded = LoadedPlan(plan=plan, file=None, plan_dir=Path.cwd())
        _check_plan(loaded, agents)
        return loaded, envelopes_of(plan)
    if isinstance(plan, Mapping):
        loaded = validate_plan_data(dict(plan), callable_agents=list(agents))
        return loaded, envelopes_of(loaded.plan)
    envelopes = list(plan)
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
    return None, envelopes


def _check_plan(loaded: LoadedPlan, agents: Mapping[str, Any]) -> None:
    from envelopes import plan_problems

    problems = plan_problems(loaded.plan, callable_agents=frozenset(agents))
    if problems:
        raise PlanError([loaded.issue(p.loc, p.message) for p in problems])


async def _tidy(ctx: RunContext) -> None:
    """Remove this run's empty worktree and venv directories."""

    def tidy() -> None:
        for kind in ("worktrees", "venvs"):
            path = ctx.state_dir / kind / ctx.run_id
            try:
                path.rmdir()
            except OSError:
                if path.exists() and not any(path.iterdir()):
                    shutil.rmtree(path, ignore_errors=True)

    await anyio.to_thread.run_sync(tidy)
