"""The ``dask`` executor: tasks on the workers of a Dask cluster (the ``dask`` extra).

A run with ``executor: dask`` connects to a cluster (``scheduler: tcp://...``) or starts one
on this machine (``workers: N``: a ``LocalCluster`` of N worker processes), and hands each
prepared task to a worker it chooses (:class:`_Placement`: a free slot, the agent's
``resources``, and a worker that has the task's start commit already, when one is free).
What the task needs travels with it (orchestrator/shipping.py): its envelope, agent and
settings, the plan's files its commands name, and a git bundle of the commits the worker's
mirror lacks. The worker runs the task's whole lifecycle (orchestrator/remote.py) and sends
back its result, a bundle of its result commit, and its logs and outputs; here the commit is
fetched into the user's repository and checked (commit and tree as the worker said), the
task's branch made, the files written to the run directory, and the result recorded as the
local executor records one. The report has the same form; ``verify`` passes on it as is.

Nothing is lost: a task whose worker leaves the cluster runs again on another (an attempt
of kind ``worker_lost``; at most :data:`MAX_WORKER_LOSSES` times); cancelling the run stops
remote agents through a flag the worker-side runner watches (Dask's own ``cancel`` does not
stop a running function) and still brings back what they committed; a resumed run first
stops whatever the dead run left running on the workers.

The Dask client is the synchronous one, called from threads (``anyio.to_thread``): it keeps
its own event loop on a thread of its own, so this works under asyncio and trio alike, and
the engine's structured concurrency is kept (every wait is a cancellable thread hop).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from envelopes import (
    Attempt,
    ErrorInfo,
    ExecutorSpec,
    Resources,
    TaskFinished,
    TaskResult,
    TaskStarted,
    canonical_json,
    ref_safe,
    seal_result,
    sha256_hex,
)

from ._version import __version__
from .agents import Agent, plan_program_of, program_of
from .context import RunContext
from .errors import ExecutorError, GitError, ShippingError
from .executor import PreparedTask
from .remote import (
    JobWatch,
    RemoteJob,
    RemoteOutcome,
    cancel_job,
    run_job,
    sweep_run,
    task_key,
    worker_facts,
)
from .shipping import (
    Files,
    fetch_bundle,
    make_bundle,
    pack_files,
    pack_tree,
    plan_references,
    unpack_files,
)
from .subagent import not_started_result, record_result

__all__ = ["MAX_WORKER_LOSSES", "DaskExecutor"]

#: Most times one task runs again because its worker left the cluster.
MAX_WORKER_LOSSES = 3
#: How often a running task's worker is looked for among the cluster's, in seconds.
WORKER_POLL_S = 1.0
#: Jobs whose bundle and files weigh more than this go to their worker with ``scatter``
#: first, not inside the task's arguments (which Dask warns about past 10 MiB).
SCATTER_ABOVE = 1 << 20


class DaskExecutor:
    """Run tasks on a Dask cluster: an existing one (*scheduler*, its address) or one
    started for the run on this machine (*workers* processes of *slots* tasks each, with
    *resources* each).

    Pass it as ``orchestrate_parallel(plan, executor=DaskExecutor(scheduler="tcp://..."))``;
    *security* is a ``distributed.Security`` for a ``tls://`` scheduler (see
    docs/distributed.md). Reusable: each run binds its own (:meth:`bind`).
    """

    name = "dask"

    def __init__(
        self,
        *,
        scheduler: str | None = None,
        workers: int | None = None,
        slots: int | None = None,
        resources: Resources | None = None,
        placement_timeout: float | None = None,
        connect_timeout: float | None = None,
        security: Any = None,
    ) -> None:
        given = {
            "scheduler": scheduler,
            "workers": workers,
            "slots": slots,
            "resources": resources,
            "placement_timeout": placement_timeout,
            "connect_timeout": connect_timeout,
        }
        self.spec = ExecutorSpec.model_validate(
            {"kind": "dask", **{k: v for k, v in given.items() if v is not None}}
        )
        self.security = security

    @classmethod
    def from_spec(cls, spec: ExecutorSpec) -> DaskExecutor:
        """The executor a plan's ``executor`` (or ``--executor dask``) describes."""
        executor = cls()
        executor.spec = spec
        return executor

    def bind(self, ctx: RunContext) -> _DaskRun:
        """This executor for one run."""
        return _DaskRun(self, ctx)


@dataclass
class _Worker:
    """A worker as the run sees it: its slots, resources, and what it has been sent."""

    address: str
    slots: int
    resources: dict[str, float]
    free: list[int] = field(default_factory=list)
    held: dict[str, float] = field(default_factory=dict)
    #: Commits its mirror has (or is being sent): never sent again.
    have: set[str] = field(default_factory=set)
    #: The plan's files it has been sent, and whether it has the copies.
    files: set[str] = field(default_factory=set)
    copies: bool = False
    #: Programs checked on its PATH: found or not.
    programs: dict[str, bool] = field(default_factory=dict)
    gone: bool = False

    def fits(self, needs: Mapping[str, float]) -> bool:
        return all(self.resources.get(name, 0) >= amount for name, amount in needs.items())

    def can_take(self, needs: Mapping[str, float]) -> bool:
        return bool(self.free) and all(
            self.resources.get(name, 0) - self.held.get(name, 0) >= amount - 1e-9
            for name, amount in needs.items()
        )


class _Unplaceable(Exception):
    """No worker of the cluster has what a task needs."""


class _Placement:
    """Which worker runs a task: one with a free slot and the resources its agent needs."""

    def __init__(self, run: _DaskRun, timeout: float) -> None:
        self.run = run
        self.timeout = timeout
        self.workers: dict[str, _Worker] = {}
        self._changed: anyio.Event | None = None
        self._refreshed = 0.0
        self._refreshing = anyio.Lock()

    async def refresh(self, *, force: bool = False) -> None:
        """Learn which workers the cluster has now (at most once a second unless *force*)."""
        async with self._refreshing:
            if not force and time.monotonic() - self._refreshed < WORKER_POLL_S:
                return
            info = await self.run.call(_workers_of, self.run.client)
            self._refreshed = time.monotonic()
        for address, (nthreads, resources) in info.items():
            if address not in self.workers or self.workers[address].gone:
                self.workers[address] = _Worker(
                    address,
                    nthreads,
                    dict(resources),
                    free=list(range(nthreads)),
                )
        for address, worker in self.workers.items():
            if address not in info and not worker.gone:
                worker.gone = True
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def take(self, needs: Mapping[str, float], start: str | None) -> tuple[_Worker, int]:
        """A worker and slot for a task needing *needs*; a worker that has *start* first.

        Waits while every fitting worker is busy; _Unplaceable when none of the cluster's
        workers has *needs* for ``placement_timeout`` seconds.
        """
        since = time.monotonic()
        while True:
            live = [w for w in self.workers.values() if not w.gone]
            ready = [w for w in live if w.can_take(needs)]
            if ready:
                ready.sort(key=lambda w: (start not in w.have, -len(w.free), w.address))
                worker = ready[0]
                slot = worker.free.pop(0)
                for name, amount in needs.items():
                    worker.held[name] = worker.held.get(name, 0) + amount
                return worker, slot
            if any(w.fits(needs) for w in live):
                since = time.monotonic()
            elif time.monotonic() - since > self.timeout:
                have = ", ".join(f"{k}={v:g}" for k, v in needs.items()) or "a free slot"
                raise _Unplaceable(
                    f"no worker of the cluster has {have} (waited {self.timeout:g} s for one)"
                )
            if self._changed is None:
                self._changed = anyio.Event()
            changed = self._changed
            with anyio.move_on_after(WORKER_POLL_S):
                await changed.wait()
            await self.refresh()

    def give_back(self, worker: _Worker, slot: int, needs: Mapping[str, float]) -> None:
        worker.free.append(slot)
        worker.free.sort()
        for name, amount in needs.items():
            worker.held[name] = max(0.0, worker.held.get(name, 0) - amount)
        self._wake()


def _workers_of(client: Any) -> dict[str, tuple[int, dict[str, float]]]:
    """The cluster's workers now: address -> (threads, resources). Blocking."""
    info = client.sync(client.scheduler.identity, n_workers=-1)
    return {
        address: (int(w.get("nthreads", 1)), dict(w.get("resources") or {}))
        for address, w in info.get("workers", {}).items()
    }


class _DaskRun:
    """The ``dask`` executor of one run (an ``executor.Executor``)."""

    name = "dask"

    def __init__(self, executor: DaskExecutor, ctx: RunContext) -> None:
        self.executor = executor
        self.spec = executor.spec
        self.ctx = ctx
        self.client: Any = None
        self.cluster: Any = None
        self.placement = _Placement(self, self.spec.placement_timeout)
        self._threads = anyio.CapacityLimiter(max(8, ctx.settings.concurrency * 2 + 4))
        self._plan_files: Files = {}
        self._copies: Files | None = None
        self._identity: dict[str, str] = {}
        self._dispatches: dict[str, int] = {}
        #: Bytes sent to and brought back from workers, per dispatch (for the benchmarks):
        #: (task id, worker, bytes sent, bytes back).
        self.shipped: list[tuple[str, str, int, int]] = []

    # -- the cluster ---------------------------------------------------------------------

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call a blocking Dask function in a thread (cancellable: the thread is left to
        finish on its own)."""
        return await anyio.to_thread.run_sync(
            lambda: fn(*args, **kwargs), limiter=self._threads, abandon_on_cancel=True
        )

    async def start(self) -> None:
        try:
            import distributed  # noqa: F401
        except ImportError as exc:
            raise ExecutorError(
                "the dask executor needs Dask: pip install 'worktree-orchestrator[dask]'"
            ) from exc
        self.client, self.cluster = await self.call(self._connect)
        try:
            await self._check_workers()
            await self.call(self.client.register_plugin, JobWatch(), name=JobWatch.name)
            # A resumed run's dead coordinator may have left agents running: stopped now,
            # before any task of this run starts (a new run's id matches nothing).
            await self.call(self.client.run, sweep_run, self.ctx.run_id)
            await self._prepare_files()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise

    def _connect(self) -> tuple[Any, Any]:
        """A client of the spec's scheduler, or of a cluster started here. Blocking."""
        import dask
        from distributed import Client, LocalCluster

        spec, timeout = self.spec, self.spec.connect_timeout
        if spec.scheduler is not None:
            try:
                client = Client(  # type: ignore[no-untyped-call]
                    spec.scheduler,
                    timeout=timeout,
                    security=self.executor.security,
                    set_as_default=False,
                )
            except (OSError, TimeoutError) as exc:
                raise ExecutorError(
                    f"no Dask scheduler answered at {spec.scheduler} within {timeout:g} s"
                ) from exc
            return client, None
        workers = spec.workers or 2
        slots = spec.slots or max(1, math.ceil(self.ctx.settings.concurrency / workers))
        with dask.config.set(
            {
                # A task whose worker dies is this executor's to run again (worker_lost),
                # not the scheduler's to rerun behind its back.
                "distributed.scheduler.allowed-failures": 0,
                "distributed.worker.daemon": False,
                "distributed.admin.large-graph-warning-threshold": "1GiB",
            }
        ):
            cluster = LocalCluster(  # type: ignore[no-untyped-call]
                n_workers=workers,
                threads_per_worker=slots,
                processes=True,
                host="127.0.0.1",
                scheduler_port=0,
                # Its HTTP server (health, metrics) on a free port of this machine only: a
                # second run, or any other cluster, may have 8787.
                dashboard_address="127.0.0.1:0",
                resources=dict(spec.resources) or None,
                silence_logs=logging.ERROR,
                local_directory=tempfile.gettempdir(),
            )
            try:
                client = Client(cluster, timeout=timeout, set_as_default=False)  # type: ignore[no-untyped-call]
            except BaseException:
                cluster.close()
                raise
        return client, cluster

    async def _check_workers(self) -> None:
        """ExecutorError unless the cluster has workers, each with this version of the
        orchestrator and with git."""
        deadline = time.monotonic() + self.spec.connect_timeout
        while True:
            await self.placement.refresh(force=True)
            if self.placement.workers:
                break
            if time.monotonic() > deadline:
                raise ExecutorError(
                    f"the Dask cluster at {self.spec.scheduler} has no workers "
                    f"(waited {self.spec.connect_timeout:g} s)"
                )
            await anyio.sleep(0.2)
        facts = await self.call(self.client.run, worker_facts, [])
        for address, fact in sorted(facts.items()):
            self._refuse(address, fact)

    def _refuse(self, address: str, fact: Mapping[str, Any]) -> None:
        if fact.get("version") != __version__:
            raise ExecutorError(
                f"worker {address} runs worktree-orchestrator {fact.get('version')}, this "
                f"coordinator {__version__}: install the same version on both"
            )
        if not fact.get("git"):
            raise ExecutorError(f"worker {address} has no git on its PATH")

    async def _prepare_files(self) -> None:
        """The plan's copy files, packed once for every worker; the run's commit identity."""
        ctx = self.ctx
        if ctx.repo is not None:
            self._identity = await _identity(ctx.repo)
            if ctx.settings.copy_paths:
                self._copies = await anyio.to_thread.run_sync(
                    _pack_copies, ctx.repo.root, list(ctx.settings.copy_paths)
                )

    async def aclose(self) -> None:
        client, cluster = self.client, self.cluster
        self.client = self.cluster = None
        if client is None and cluster is None:
            return

        def close() -> None:
            with contextlib.suppress(Exception):
                if client is not None:
                    client.close(timeout=10)
            with contextlib.suppress(Exception):
                if cluster is not None:
                    cluster.close(timeout=10)

        await anyio.to_thread.run_sync(close)

    # -- one task --------------------------------------------------------------------------

    async def run(self, task: PreparedTask) -> TaskResult:
        """Run *task* on a worker; see ``executor.Executor.run`` for the contract."""
        ctx, envelope = self.ctx, task.envelope
        await ctx.emit(
            TaskStarted(run_id=ctx.run_id, task_id=envelope.task_id, agent=envelope.agent)
        )
        lost: list[Attempt] = []
        while True:
            try:
                outcome = await self._dispatch(task, lost)
            except _Unplaceable as exc:
                result = self._failed(task, ErrorInfo(kind="placement", message=str(exc)), lost)
                break
            except _WorkerLost as exc:
                lost.append(exc.attempt)
                if len(lost) <= MAX_WORKER_LOSSES:
                    continue
                result = self._failed(task, exc.attempt.error, lost)  # type: ignore[arg-type]
                break
            except _Refused as exc:
                result = self._failed(task, exc.error, lost)
                break
            result = await self._take(task, outcome)
            break
        await record_result(ctx, result)
        return result

    async def _dispatch(self, task: PreparedTask, lost: list[Attempt]) -> RemoteOutcome:
        """Send *task* to a worker and wait for what comes back (once the worker has all
        it needs: a worker that lost its mirror is sent everything again)."""
        ctx, envelope = self.ctx, task.envelope
        needs = _resources_of(ctx, envelope.agent)
        await self.placement.refresh()
        worker, slot = await self.placement.take(needs, task.start_commit)
        try:
            await self._check_program(worker, task.agent)
            for _ in range(3):
                job = await self._job(task, worker, slot, lost)
                outcome = await self._await(task, worker, job)
                if outcome.missing is None:
                    return outcome
                # The worker lacks what it was thought to have (restarted, say): all again.
                worker.have.clear()
                worker.files.clear()
                worker.copies = False
            raise _Refused(
                ErrorInfo(
                    kind="transfer",
                    message=f"worker {worker.address} kept lacking the task's {outcome.missing}",
                )
            )
        finally:
            self.placement.give_back(worker, slot, needs)

    async def _check_program(self, worker: _Worker, agent: Agent) -> None:
        program = program_of(agent)
        if program is None:
            return
        if program not in worker.programs:
            facts = await self.call(
                self.client.run, worker_facts, [program], workers=[worker.address]
            )
            missing = facts.get(worker.address, {}).get("missing", [program])
            worker.programs[program] = program not in missing
        if not worker.programs[program]:
            message = f"worker {worker.address} has no program {program!r} on its PATH"
            raise _Refused(ErrorInfo(kind="spawn", message=message))

    async def _job(
        self, task: PreparedTask, worker: _Worker, slot: int, lost: list[Attempt]
    ) -> RemoteJob:
        ctx, envelope = self.ctx, task.envelope
        bundle = None
        # A task without a worktree needs none of the repository: nothing of it travels.
        start = task.start_commit if envelope.worktree else None
        if start is not None and ctx.repo is not None:
            with tempfile.TemporaryDirectory(dir=ctx.run_dir) as scratch:
                path = await make_bundle(ctx.repo, start, worker.have, Path(scratch, "s.bundle"))
                if path is not None:
                    bundle = await anyio.Path(path).read_bytes()
            worker.have.add(start)  # on its way: later tasks there wait for it
        hooks = ctx.settings.hooks.model_dump(mode="json") if ctx.settings.hooks else None
        agent_info = task.agent.info().model_dump(mode="json")
        needed = sorted(
            plan_references(
                envelope, hooks, agent_info, [p for p in [plan_program_of(task.agent)] if p]
            )
        )
        unsent = [p for p in needed if p not in self._plan_files]
        if unsent:
            self._plan_files.update(
                await anyio.to_thread.run_sync(pack_files, ctx.plan_dir, unsent)
            )
        needs = [p for p in needed if p in self._plan_files or _packed_under(self._plan_files, p)]
        files = {
            p: e
            for p, e in self._plan_files.items()
            if p not in worker.files and _wanted(p, needed)
        }
        worker.files.update(files)
        copies = None
        if self._copies is not None and not worker.copies:
            copies, worker.copies = self._copies, True
        self._dispatches[envelope.task_id] = number = self._dispatches.get(envelope.task_id, 0) + 1
        return RemoteJob(
            run_id=ctx.run_id,
            key=task_key(ctx.run_id, envelope.task_id, number),
            envelope=envelope,
            agent=task.agent,
            settings=ctx.settings.model_copy(
                update={"state_dir": None, "executor": ExecutorSpec(), "keep_worktrees": "never"}
            ),
            start_commit=start,
            start_tree=task.start_tree if start is not None else None,
            bundle=bundle,
            plan_files=files,
            plan_needs=needs,
            copies=copies,
            copies_needed=self._copies is not None,
            slot=slot,
            pool_size=worker.slots if ctx.settings.pool_size > 0 else 0,
            earlier=list(lost),
            identity=self._identity,
        )

    async def _await(self, task: PreparedTask, worker: _Worker, job: RemoteJob) -> RemoteOutcome:
        """Submit *job* to *worker* and wait for its outcome; _WorkerLost when the worker
        leaves the cluster first. Cancelled: the remote task is stopped, and its result
        (what it committed) still taken, within the kill grace and a margin."""
        ctx = self.ctx
        started, clock = datetime.now(UTC), time.monotonic()
        sent = (
            len(job.bundle or b"")
            + sum(len(d) for _, d in job.plan_files.values())
            + sum(len(d) for _, d in (job.copies or {}).values())
        )
        if ctx.journal is not None:
            await ctx.journal.write(
                {
                    "type": "dispatch",
                    "task": task.envelope.task_id,
                    "worker": worker.address,
                    "key": job.key,
                    "attempt": len(job.earlier) + 1,
                }
            )
        future = await self.call(self._submit, job, worker.address, sent > SCATTER_ABOVE)
        try:
            while not await self.call(_wait, future, WORKER_POLL_S):
                await self.placement.refresh()
                if worker.gone:
                    with contextlib.suppress(Exception):
                        await self.call(future.cancel)
                    raise _WorkerLost(_lost_attempt(job, worker, started, clock))
            outcome = await self._outcome(future, job, worker, started, clock)
        except BaseException as exc:
            if job.bundle is not None and job.start_commit is not None:
                # Perhaps never delivered: sent again to the next task there that needs it.
                worker.have.discard(job.start_commit)
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                with anyio.CancelScope(shield=True):
                    await self._cancelled(task, future, job, worker)
            raise
        back = len(outcome.bundle or b"") + sum(len(d) for _, d in outcome.files.values())
        self.shipped.append((task.envelope.task_id, worker.address, sent, back))
        return outcome

    async def _cancelled(
        self, task: PreparedTask, future: Any, job: RemoteJob, worker: _Worker
    ) -> None:
        """Record the result of *task*, cancelled: what the stopped remote task sends back
        (its work committed and fetched), else a cancelled result with nothing."""
        ctx, task_id = self.ctx, task.envelope.task_id
        stopped = await self._stop(future, job, worker)
        if stopped is not None and stopped.result is not None:
            result = await self._take(task, stopped, cancelled=True)
        else:
            error = ctx.cancelled_error(task_id)
            result = not_started_result(task.envelope, task.agent, ctx, "cancelled", error)
        await record_result(ctx, result, leaving=True)

    def _submit(self, job: RemoteJob, address: str, scatter: bool) -> Any:
        client = self.client
        argument: Any = job
        if scatter:
            argument = client.scatter(job, workers=[address], hash=False)
        future = client.submit(
            run_job,
            argument,
            key=job.key,
            workers=[address],
            allow_other_workers=False,
            pure=False,
            retries=0,
        )
        done = threading.Event()
        future.wo_done = done
        future.add_done_callback(lambda _: done.set())
        return future

    async def _outcome(
        self, future: Any, job: RemoteJob, worker: _Worker, started: datetime, clock: float
    ) -> RemoteOutcome:
        try:
            outcome = await self.call(future.result)
        except Exception as exc:
            if type(exc).__name__ in ("KilledWorker", "CancelledError", "FutureCancelledError"):
                raise _WorkerLost(_lost_attempt(job, worker, started, clock)) from exc
            message = f"the task raised on worker {worker.address}: {type(exc).__name__}: {exc}"
            raise _Refused(ErrorInfo(kind="internal", message=message[:2000])) from exc
        if not isinstance(outcome, RemoteOutcome):
            raise _Refused(
                ErrorInfo(kind="transfer", message=f"worker {worker.address} sent back no outcome")
            )
        return outcome

    async def _stop(self, future: Any, job: RemoteJob, worker: _Worker) -> RemoteOutcome | None:
        """Stop the remote task and take what it sends back, if it does in time."""
        grace = self.ctx.settings.kill_grace + 30
        with anyio.move_on_after(grace):
            with contextlib.suppress(Exception):
                await self.call(self.client.run, cancel_job, job.key, workers=[worker.address])
            while not await self.call(_wait, future, WORKER_POLL_S):
                await self.placement.refresh()
                if worker.gone:
                    return None
            with contextlib.suppress(Exception):
                outcome = await self.call(future.result)
                if isinstance(outcome, RemoteOutcome):
                    return outcome
        with contextlib.suppress(Exception):
            await self.call(future.cancel)
        return None

    async def _take(
        self, task: PreparedTask, outcome: RemoteOutcome, *, cancelled: bool = False
    ) -> TaskResult:
        """The result *outcome* brings, made this run's: its files written, its commit
        fetched and checked, its branch made, its events told."""
        ctx, envelope = self.ctx, task.envelope
        result = outcome.result
        task_id = envelope.task_id
        assert result is not None
        expected = sha256_hex(canonical_json(envelope.to_json_dict()))
        if result.task_id != task_id or result.provenance.envelope_sha256 != expected:
            return self._failed(
                task,
                ErrorInfo(
                    kind="transfer",
                    message=f"worker {outcome.worker} sent back the result of another task",
                ),
                [],
            )
        name = re.escape(ref_safe(task_id))
        allowed = re.compile(
            rf"envelopes/{name}\.json|(?:logs|outputs)/{name}\.[A-Za-z0-9@._-]{{1,200}}"
        )
        try:
            await anyio.to_thread.run_sync(
                lambda: unpack_files(ctx.run_dir, outcome.files, allowed=allowed)
            )
        except (ShippingError, OSError) as exc:
            return self._failed(
                task,
                ErrorInfo(
                    kind="transfer", message=f"the task's files from worker {outcome.worker}: {exc}"
                ),
                result.attempt_log,
            )
        update: dict[str, Any] = {"worktree": None}
        commit, tree = result.provenance.result_commit, result.provenance.result_tree
        if commit is not None and result.branch is not None:
            try:
                await self._fetch(task, outcome, commit, tree)
            except (GitError, OSError) as exc:
                error = ErrorInfo(
                    kind="transfer",
                    message=f"the result commit from worker {outcome.worker}: {exc}"[:2000],
                )
                update.update(
                    status="failed",
                    error=error,
                    branch=None,
                    provenance=result.provenance.model_copy(
                        update={"result_commit": None, "result_tree": None}
                    ),
                )
        if cancelled:
            update.update(status="cancelled", error=ctx.cancelled_error(task_id))
        for event in outcome.events:
            if isinstance(event, TaskStarted | TaskFinished):
                continue
            if (
                getattr(event, "task_id", None) == task_id
                and getattr(event, "run_id", None) == ctx.run_id
            ):
                await ctx.emit(event)
        return seal_result(result.model_copy(update=update))

    async def _fetch(
        self, task: PreparedTask, outcome: RemoteOutcome, commit: str, tree: str | None
    ) -> None:
        ctx = self.ctx
        assert ctx.repo is not None and tree is not None
        branch = ctx.branch(task.envelope.task_id)
        if commit == task.start_commit:
            await ctx.repo.git.run("update-ref", f"refs/heads/{branch}", commit)
            return
        if outcome.bundle is None:
            raise GitError(["bundle"], 1, "no bundle of the result commit came back")
        with tempfile.TemporaryDirectory(dir=ctx.run_dir) as scratch:
            path = Path(scratch, "result.bundle")
            await anyio.Path(path).write_bytes(outcome.bundle)
            await fetch_bundle(ctx.repo, path, commit, tree, branch)
        if task.start_commit is not None and not await ctx.repo.git.ok(
            "merge-base", "--is-ancestor", task.start_commit, commit
        ):
            await ctx.repo.git.run("update-ref", "-d", f"refs/heads/{branch}", check=False)
            raise GitError(
                ["merge-base"], 1, f"commit {commit} does not descend from {task.start_commit}"
            )
        worker = self.placement.workers.get(outcome.worker)
        if worker is not None:
            worker.have.add(commit)

    def _failed(self, task: PreparedTask, error: ErrorInfo, attempts: list[Attempt]) -> TaskResult:
        result = not_started_result(task.envelope, task.agent, self.ctx, "failed", error)
        if not attempts:
            return result
        return seal_result(
            result.model_copy(update={"attempts": len(attempts), "attempt_log": attempts})
        )


class _WorkerLost(Exception):
    def __init__(self, attempt: Attempt) -> None:
        super().__init__(attempt.error.message if attempt.error else "worker lost")
        self.attempt = attempt


class _Refused(Exception):
    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def _lost_attempt(job: RemoteJob, worker: _Worker, started: datetime, clock: float) -> Attempt:
    message = f"worker {worker.address} left the cluster while it ran this task"
    return Attempt(
        number=len(job.earlier) + 1,
        status="failed",
        started_at=started,
        finished_at=datetime.now(UTC),
        duration_s=round(time.monotonic() - clock, 6),
        error=ErrorInfo(kind="worker_lost", message=message),
        worker=worker.address,
    )


def _wait(future: Any, timeout: float) -> bool:
    """Whether *future* is done, waiting at most *timeout* seconds. Blocking."""
    return bool(future.wo_done.wait(timeout))


def _resources_of(ctx: RunContext, agent_name: str) -> dict[str, float]:
    return dict(ctx.settings.agent_resources.get(agent_name, {}))


def _packed_under(files: Files, directory: str) -> bool:
    return any(p.startswith(directory + "/") for p in files)


def _wanted(path: str, needed: list[str]) -> bool:
    return any(path == n or path.startswith(n + "/") for n in needed)


def _pack_copies(root: Path, paths: list[str]) -> Files:
    """The plan's copy files as the main checkout has them (copied the way each worktree
    gets them, into a scratch directory, then packed). Blocking."""
    from .workspace import copy_into

    with tempfile.TemporaryDirectory() as scratch:
        copy_into(root, Path(scratch), paths)
        return pack_tree(Path(scratch))


async def _identity(repo: Any) -> dict[str, str]:
    """The author and committer of this repository's commits, as variables."""
    result = await repo.git.run("config", "--get-regexp", r"^user\.(name|email)$", check=False)
    configured = dict(
        line.split(" ", 1)
        for line in result.stdout.decode(errors="replace").splitlines()
        if " " in line
    )
    identity: dict[str, str] = {}
    fallback = await repo.git.identity_env()
    for role in ("AUTHOR", "COMMITTER"):
        for part, key in (("NAME", "user.name"), ("EMAIL", "user.email")):
            name = f"GIT_{role}_{part}"
            value = os.environ.get(name) or configured.get(key) or fallback.get(name)
            if value:
                identity[name] = value
    return identity
