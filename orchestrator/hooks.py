"""The run's side of the scheduler: what happens when a task is queued, runs, is never
started, or waits on its dependencies (see ``scheduler.SchedulerHooks``).

Two things sit here between the scheduler and the executor: the result cache (a task whose
work was already done is served from it, and no agent runs), and dependency merges (a task
that depends on others starts from the merge of their result commits, made once per set).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal

import anyio

from envelopes import (
    MAX_CHANGED_FILES,
    ErrorInfo,
    Event,
    GroupDecided,
    HandoffEnvelope,
    LogFile,
    TaskFinished,
    TaskQueued,
    TaskResult,
    TaskSkipped,
    Upstream,
    canonical_json,
    ref_safe,
    sha256_hex,
)

from ._fs import write_file
from .agents import Agent
from .cache import cache_key, cached_result, usable
from .cache import lookup as cache_lookup
from .cache import store as cache_store
from .context import RunContext
from .errors import GitError, RunDirError
from .executor import Executor, LocalExecutor, PreparedTask
from .merge import Combined, changed_files, combine_commits
from .scheduler import GroupState
from .subagent import not_started_result, record_result

__all__ = ["RunHooks"]


class RunHooks:
    """What the scheduler calls for a run's tasks (a ``SchedulerHooks``)."""

    def __init__(
        self, ctx: RunContext, agents: Mapping[str, Agent], executor: Executor | None = None
    ) -> None:
        self.ctx = ctx
        self.agents = agents
        #: Where tasks run (set once the run's settings are final: a resume's are its own).
        self.executor: Executor = executor or LocalExecutor(ctx)
        self._merges: dict[tuple[str, ...], Combined] = {}
        #: What each dependency's result changed, by task id (``_changed_files``).
        self._changed: dict[str, tuple[list[str], int]] = {}
        self._merging = anyio.Lock()
        #: Results of an earlier run to reuse, by cache key (``reuse=``).
        self.reusable: dict[str, tuple[TaskResult, str]] = {}
        #: Each agent's fingerprint, for the cache's keys.
        self.agent_digests: dict[str, str] = {}

    async def queued(self, envelope: HandoffEnvelope) -> None:
        self.ctx.queued_at[envelope.task_id] = datetime.now(UTC)
        await self.ctx.emit(
            TaskQueued(
                run_id=self.ctx.run_id,
                task_id=envelope.task_id,
                agent=envelope.agent,
                priority=envelope.priority,
            )
        )

    async def run(self, envelope: HandoffEnvelope) -> None:
        ctx = self.ctx
        commit, tree = ctx.start_of(envelope.task_id)
        key = None
        if envelope.cache or self.reusable:
            key = cache_key(envelope, commit, self.agent_digests[envelope.agent])
            if await self._from_cache(envelope, key):
                return
        task = PreparedTask(envelope, self.agents[envelope.agent], commit, tree)
        result = await self.executor.run(task)
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
                queued_at=ctx.queued_at.get(envelope.task_id),
            )
        await record_result(ctx, result)
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
        told = {}
        for r in results:
            files, omitted = await self._changed_files(r)
            told[r.task_id] = Upstream(
                output=r.output,
                result_commit=r.provenance.result_commit,
                branch=r.branch,
                changed_files=files,
                changed_files_omitted=omitted,
            )
        envelope = envelope.model_copy(update={"upstream": told})
        with_commit = [r for r in results if r.provenance.result_commit]
        if not with_commit or ctx.repo is None or not envelope.worktree:
            return envelope
        try:
            combined = await self._combined(with_commit)
        except GitError as exc:
            return ErrorInfo(
                kind="dependency_conflict",
                message=f"cannot merge the dependencies' results: {exc}",
            )
        if combined.commit is None or combined.tree is None:
            index = combined.conflicting or 0
            names = [r.task_id for r in with_commit]
            return ErrorInfo(
                kind="dependency_conflict",
                message=f"dependency merge conflict: {names[index]} and "
                f"{', '.join(names[:index])} both change {', '.join(combined.conflicts)}",
                paths=combined.conflicts,
            )
        ctx.starts[envelope.task_id] = (combined.commit, combined.tree)
        return envelope

    async def _changed_files(self, result: TaskResult) -> tuple[list[str], int]:
        """What *result* changed from where it started: at most MAX_CHANGED_FILES paths and
        how many more. As its commit step found it, else (the agent committed itself, a
        result of an earlier session or from the cache) from git, once per task; nothing
        when it has no commits or git cannot tell."""
        ctx, provenance = self.ctx, result.provenance
        known = ctx.changed_files.get(result.task_id)
        if known is not None:
            return known[:MAX_CHANGED_FILES], max(0, len(known) - MAX_CHANGED_FILES)
        base, commit = provenance.base_commit, provenance.result_commit
        if ctx.repo is None or base is None or commit is None:
            return [], 0
        if result.task_id not in self._changed:
            found: tuple[list[str], int] = ([], 0)
            with contextlib.suppress(GitError):
                found = await changed_files(ctx.repo.git, base, commit, limit=MAX_CHANGED_FILES)
            self._changed[result.task_id] = found
        return self._changed[result.task_id]

    async def _combined(self, results: list[TaskResult]) -> Combined:
        """The merge of *results*' commits, made once per set of commits."""
        assert self.ctx.repo is not None
        commits = tuple(r.provenance.result_commit or "" for r in results)
        async with self._merging:
            if commits not in self._merges:
                names = ", ".join(r.task_id for r in results)
                self._merges[commits] = await combine_commits(
                    self.ctx.repo.git,
                    list(commits),
                    message=f"orchestrator: start from the results of {names}\n",
                )
            return self._merges[commits]
