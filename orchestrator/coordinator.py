"""The coordinator: run many subagents at once, exactly ``concurrency`` at a time.

The three ways into a run are here: :func:`orchestrate_parallel`, :func:`resume_run` and
:func:`run_events`. A run's life, and the module each step lives in:

1. its inputs checked and its settings resolved (``intake``, ``settings``);
2. its directory, lock and journal opened (``context``), or a dead run's taken up (``resume``);
3. its tasks scheduled (``scheduler``), each served from the cache, started from its
   dependencies' merged results, or handed to the executor (``hooks``, ``executor``);
4. its report written, the plan's merge done (``closing``), its events delivered throughout
   (``events``), to the plan's webhooks too (``notify``).
"""

from __future__ import annotations

import inspect
import math
import shutil
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Unpack

import anyio

from envelopes import Event, HandoffEnvelope, Report, RunStarted, Select

from .agents import AgentLike
from .cache import agent_digest, workspace_of
from .closing import (
    ReportPlan,
    journal_finished,
    merge_at_end,
    run_finished,
    settle_webhooks,
    write_final_report,
)
from .context import EventHandler, RunContext
from .errors import OrchestratorError, RunDirError
from .events import RunEvents, emit_run_event, unwrapped
from .executor import make_executor
from .guard import ref_values
from .hooks import RunHooks
from .intake import Intake, PlanLike, take_in
from .notify import Webhooks
from .pool import VenvPool, WorktreePool
from .repo import Repository
from .resume import journal_run, open_run_repository, prepare_resume, recorded_run, take_over
from .scheduler import Scheduler, TaskBook
from .settings import RunSettings, SettingsOverrides, resolve_settings, state_root
from .subagent import not_started_result

__all__ = ["RunEvents", "orchestrate_parallel", "resume_run", "run_events"]


async def orchestrate_parallel(
    plan: PlanLike,
    *,
    repo: Path | str | Repository | None = None,
    agents: Mapping[str, AgentLike] | None = None,
    settings: RunSettings | None = None,
    on_event: EventHandler | None = None,
    report_path: Path | str | None = None,
    run_id: str | None = None,
    resume: str | None = None,
    reuse: str | None = None,
    **overrides: Unpack[SettingsOverrides],
) -> Report:
    """Run every task of *plan* as a subagent and return the sealed Report.

    *plan* is a Plan (or a plan as a dict), a LoadedPlan from :func:`load_plan`, or a list of
    HandoffEnvelopes. *agents* maps agent names to commands (argv lists), AgentSpecs or async
    callables ``async def agent(envelope, workspace) -> dict``; they override the plan's own
    ``agents`` of the same name. The report is written to ``<run_dir>/report.json`` and, when
    *report_path* is given, there too. *run_id* names the run (default: a new id such as
    ``20261122-034522-ccc105``; an existing run's raises RunDirError).

    Settings (see :class:`RunSettings`) come from the plan, then from *settings* (the fields
    it sets), then from keyword arguments: ``concurrency``, ``pool``, ``keep_worktrees``,
    ``fail_fast``, ``base``, ``venv_backend``, ``kill_grace``, ``backoff``, ``agent_limits``,
    ``state_dir``, ``executor``, ``budget``, ``pricing``, ``hooks``, ``copy_paths``, ``ports``.
    A value out of bounds raises SettingsError naming it.

    At most ``concurrency`` tasks run at once, and at most ``agent_limits[name]`` of one
    agent's. A task with ``depends_on`` starts from its dependencies' results once they all
    succeeded, and is ``skipped`` if one did not. One task's failure never stops the others,
    unless ``fail_fast`` says to cancel everything at the first failure. Works under asyncio
    and trio and keeps no global state, so several runs may share an event loop.

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

    ``pool`` bounds the repository's worktree pool (default: the run's concurrency; 0: no
    pool): tasks borrow an already checked-out worktree, reset to exactly their start
    commit, instead of checking out a new one, and give it back when done (see
    orchestrator/pool.py).
    """
    intake = await take_in(plan, repo=repo, agents=agents, overrides=overrides, recorded=settings)
    try:
        run = await _Run.start(
            intake,
            on_event=on_event,
            run_id=resume or run_id,
            resume=resume is not None,
            reuse=reuse,
        )
    except BaseException:
        intake.close()
        raise
    copies = [Path(report_path)] if report_path is not None else []
    return await run.go(copies)


class _Run:
    """One run, from its context opened to its report written."""

    def __init__(self, intake: Intake, ctx: RunContext, hooks: RunHooks) -> None:
        self.intake = intake
        self.ctx = ctx
        self.hooks = hooks
        #: The intake's, with the run's id, until the scheduler takes them (and drops each
        #: as its task ends: a run does not hold them all).
        self.envelopes = [self._stamped(e) for e in intake.envelopes]
        self.task_ids = [e.task_id for e in self.envelopes]
        self.started = datetime.now(UTC)
        self.restored: list[str] = []
        self.resumed = False
        self.book = ctx.book = TaskBook(self.task_ids, on_move=ctx.journal_move)
        self.scheduler: Scheduler | None = None
        self.webhooks = Webhooks(intake.webhooks, run_id=ctx.run_id, record=ctx.emit)
        ctx.notify = self.webhooks.offer

    @classmethod
    async def start(
        cls,
        intake: Intake,
        *,
        on_event: EventHandler | None,
        run_id: str | None,
        resume: bool,
        reuse: str | None,
    ) -> _Run:
        """Open the run's context and journal it (or take up the run *resume*)."""
        settings = intake.settings
        ctx = await RunContext.open(
            repo=intake.repository,
            settings=settings,
            base_commit=intake.base_commit,
            base_tree=intake.base_tree,
            run_id=run_id,
            resume=resume,
            plan_dir=intake.plan_dir,
            on_event=on_event,
        )
        run = cls(intake, ctx, RunHooks(ctx, intake.agents))
        try:
            await run.open_journal(resume, reuse)
            # Made for the settings as they are now (a resume's are the journal's).
            run.hooks.executor = make_executor(ctx)
        except BaseException:
            ctx.close()
            if not resume:
                # Refused before any task: a new run leaves no run directory behind.
                shutil.rmtree(ctx.run_dir, ignore_errors=True)
            raise
        settings = ctx.settings  # a resume's: over the ones its run started with
        if settings.pool_size > 0:
            if ctx.repo is not None:
                ctx.pool = WorktreePool(ctx.repo, settings.pool_size)
            ctx.venv_pool = VenvPool(ctx.state_dir, ctx.venv_backend, settings.pool_size)
        run.scheduler = Scheduler(
            run.envelopes,
            run.hooks,
            limit=settings.concurrency,
            agent_limits=settings.agent_limits,
            book=run.book,
            results=ctx.results,
            fail_fast=settings.fail_fast,
            restored=run.restored,
            budget=settings.budget,
        )
        run.envelopes = []  # the scheduler's now
        try:  # before the run is told to have started: nothing left behind if it fails
            await run.hooks.executor.start()
        except BaseException:
            ctx.close()
            if not resume:
                shutil.rmtree(ctx.run_dir, ignore_errors=True)
            raise
        return run

    async def open_journal(self, resume: bool, reuse: str | None) -> None:
        """The journal's first record, or the resumed run's taken up; the run to reuse."""
        ctx, intake = self.ctx, self.intake
        # The agents as they are now (their scripts fingerprinted): for the result cache,
        # and journaled so that a later run reusing this one compares with them as they were.
        workspace = workspace_of(ctx.settings)
        self.hooks.agent_digests = await anyio.to_thread.run_sync(
            lambda: {
                name: agent_digest(a, ctx.plan_dir, workspace) for name, a in intake.agents.items()
            }
        )
        if resume:
            self.resumed = True
            resumed = await prepare_resume(ctx, intake.plan_sha256, self.envelopes)
            self.started, self.restored = resumed.started, resumed.kept
            if intake.given is None:
                # The settings the run started with take the plan's place; the caller's
                # keywords (--concurrency, say) still win.
                ctx.settings = resolve_settings(
                    intake.plan, intake.overrides, recorded=resumed.settings
                )
                ctx.venv_backend = ctx.settings.backend()
            if not (ctx.run_dir / "plan.json").exists():  # killed before it, by an older version
                await intake.write_plan(ctx.run_dir)
        else:
            # Before the journal's first record: a run the journal knows has its plan.
            await intake.write_plan(ctx.run_dir)
            await journal_run(
                ctx,
                plan_sha256=intake.plan_sha256,
                started=self.started,
                plan_name=intake.plan.name if intake.plan else "envelopes",
                plan_file=intake.loaded.file if intake.loaded else None,
                agent_digests=self.hooks.agent_digests,
            )
        if reuse is not None:
            self.hooks.reusable = await take_over(ctx, reuse)

    async def go(self, copies: list[Path]) -> Report:
        """Run every task; however the run ends, it ends with a report and its lock let go.
        The plan's webhooks are delivered to meanwhile, beside the run."""
        plan = self.intake.plan
        self.report_plan = ReportPlan(
            plan_name=plan.name if plan else "envelopes",
            plan_sha256=self.intake.plan_sha256,
            started=self.started,
            file=self.ctx.run_dir / "report.json",
            copies=copies,
        )
        return await self.webhooks.deliver_during(self._run_to_the_end)

    async def _run_to_the_end(self) -> Report:
        try:
            try:
                await self._execute()
            finally:
                with anyio.CancelScope(shield=True):
                    await self.hooks.executor.aclose()
        except BaseException as exc:
            await self._end_early(exc)
            raise
        try:
            return await self._end()
        finally:
            self.ctx.close_events_log()

    async def _execute(self) -> None:
        ctx = self.ctx
        assert self.scheduler is not None
        ctx.open_events_log()
        if ctx.repo is not None:
            self.report_plan.refs_before.update(await ref_values(ctx.repo.git))
        await emit_run_event(
            ctx,
            RunStarted(
                run_id=ctx.run_id,
                total_tasks=len(self.task_ids),
                base_commit=ctx.base_commit,
                run_dir=str(ctx.run_dir),
                resumed_tasks=len(self.restored),
                orphans_killed=ctx.orphans_killed,
            ),
        )
        async with ctx.repo.git.kept() if ctx.repo else nullcontext():  # git kept running
            await self.scheduler.run()

    def _stamped(self, envelope: HandoffEnvelope) -> HandoffEnvelope:
        return envelope.model_copy(update={"run_id": self.ctx.run_id})

    def _budget_warning(self) -> list[str]:
        scheduler = self.scheduler
        if scheduler is None or scheduler.budget_spent is None:
            return []
        at = scheduler.budget_spent_at.isoformat() if scheduler.budget_spent_at else "?"
        skipped = sum(1 for b in self.ctx.results.briefs() if b.error and b.error.kind == "budget")
        why = scheduler.budget_spent.message.removeprefix("not started: ")
        return [f"{why} at {at}: {skipped} task(s) not run or cancelled (kind budget)"]

    def _groups(self) -> dict[str, tuple[Select, list[str] | None]]:
        assert self.scheduler is not None
        return {
            name: (group.select, group.selected if group.decided else None)
            for name, group in self.scheduler.groups.items()
        }

    async def _end_early(self, exc: BaseException) -> None:
        """A run cut short: every task gets a result, a partial report is written; the
        exception to raise is made what callers want to catch (``unwrapped``)."""
        ctx = self.ctx
        with anyio.CancelScope(shield=True):
            for given in self.intake.envelopes:
                if given.task_id not in ctx.results:
                    e = self._stamped(given)  # as the scheduler had it before it started
                    agent = self.intake.agents[e.agent]
                    ctx.results[e.task_id] = not_started_result(e, agent, ctx)
                    if self.book.states[e.task_id] in ("pending", "ready"):
                        self.book.move(e.task_id, "cancelled")
            self.report_plan.groups = self._groups()
            self.report_plan.warnings = self._budget_warning()
            try:
                await write_final_report(ctx, self.task_ids, self.report_plan)
            except RunDirError:
                # The report cannot be written either (a full disk): the first error is
                # the one to tell, unless it was a cancellation.
                if isinstance(exc, Exception):
                    raise unwrapped(exc) from None
                raise
            finally:
                ctx.close_events_log()
                ctx.close()
                self.intake.close()
        if (inner := unwrapped(exc)) is not exc:
            raise inner from None

    async def _end(self) -> Report:
        ctx, plan = self.ctx, self.intake.plan
        try:
            self.report_plan.groups = self._groups()
            self.report_plan.warnings = self._budget_warning()
            with anyio.CancelScope(shield=True):  # all tasks ended: a cancellation waits for it
                report = await write_final_report(ctx, self.task_ids, self.report_plan)
            if plan is not None and plan.merge is not None and ctx.repo is not None:
                report = await merge_at_end(ctx, report, plan.merge, self.report_plan)
            try:
                # Told before the journal's last record: the webhooks' warnings may change
                # the report, whose digest that record holds.
                await emit_run_event(ctx, run_finished(ctx, report, self.report_plan))
                report = await settle_webhooks(ctx, report, self.report_plan, self.webhooks)
            finally:
                await journal_finished(ctx, report)
        finally:
            ctx.close()
            self.intake.close()
        ctx.flush_events_log()  # a full disk now is told, not lost at close
        return report


async def resume_run(
    run_id: str,
    *,
    repo: Path | str | Repository | None = None,
    state_dir: Path | str | None = None,
    agents: Mapping[str, AgentLike] | None = None,
    on_event: EventHandler | None = None,
    report_path: Path | str | None = None,
    concurrency: int | None = None,
    executor: Any = None,
) -> Report:
    """Go on with run *run_id*, interrupted (its orchestrator died) or cancelled.

    The plan is the run's own (``plan.json`` in its run directory), with the settings it
    started with (*concurrency* may override its limit, *executor* where its tasks run: the
    same cluster, say, which the dead run's remote agents are stopped on first). Agents given in code (*agents*) are
    needed for callable agents, which a plan file cannot hold. The repository is *repo*,
    else the one the run was made in. See ``orchestrate_parallel(..., resume=)``.
    """
    repository = await open_run_repository(repo, state_dir)
    try:
        root = state_root(repository.state_dir if repository else None, state_dir)
        run_dir = root / "runs" / run_id
        if not run_dir.is_dir():
            raise OrchestratorError(f"no run {run_id} in {root / 'runs'}")
        recorded = await anyio.to_thread.run_sync(recorded_run, run_dir, run_id)
        if repository is None and recorded.repo:
            repository = await Repository.open(recorded.repo, state_dir=state_dir)
        return await orchestrate_parallel(
            recorded.plan,
            repo=repository,
            agents=agents,
            on_event=on_event,
            report_path=report_path,
            resume=run_id,
            concurrency=concurrency,
            executor=executor,
            state_dir=state_dir,
        )
    finally:
        if repository is not None and not isinstance(repo, Repository):
            repository.lock.close()


@asynccontextmanager
async def run_events(plan: PlanLike, **options: Any) -> AsyncIterator[RunEvents]:
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
        inner = unwrapped(group)
        if inner is group:
            raise
        raise inner from None
    if failed:
        raise failed[0]
