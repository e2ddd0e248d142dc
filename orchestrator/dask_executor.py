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
import queue
import re
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from pydantic import TypeAdapter

from envelopes import (
    Attempt,
    ErrorInfo,
    Event,
    ExecutorSpec,
    LogFile,
    Resources,
    TaskResult,
    TaskStarted,
    TaskStatus,
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
from .journal import JOURNAL
from .remote import (
    JobWatch,
    RemoteJob,
    RemoteOutcome,
    cancel_job,
    decode_outcome,
    live,
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

__all__ = ["MAX_WORKER_LOSSES", "DaskExecutor", "unfit"]

_EVENTS: TypeAdapter[Event] = TypeAdapter(Event)

#: Most times one task runs again because its worker left the cluster.
MAX_WORKER_LOSSES = 3
#: How often a running task's worker is looked for among the cluster's, in seconds.
WORKER_POLL_S = 1.0
#: Longest the cluster may take to be checked when the run starts (past the connect
#: timeout), in seconds.
START_TIMEOUT_S = 60.0
#: Longest the coordinator waits for a finished task's outcome to come over, in seconds.
GATHER_TIMEOUT_S = 300.0
#: How long, past the kill grace, a stopped remote task has to send back what it did.
STOP_MARGIN_S = 30.0
#: Dask's ways of saying a task's worker (or the task) is gone.
_LOST = frozenset({"KilledWorker", "CancelledError", "FutureCancelledError"})
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
    #: Slots held by jobs that would not stop (slot -> (future, resources)), given back
    #: once their future ends.
    stuck: dict[int, tuple[Any, dict[str, float]]] = field(default_factory=dict)
    #: What it said of itself (``remote.worker_facts``), once asked.
    fact: dict[str, Any] | None = None
    #: Programs checked on its PATH: found or not.
    programs: dict[str, bool] = field(default_factory=dict)
    gone: bool = False

    def fits(self, needs: Mapping[str, float]) -> bool:
        if len(self.stuck) >= self.slots:
            return False  # every slot held by a job that would not stop
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
            self._free_stuck()
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

    def _free_stuck(self) -> None:
        """Give back the slots of stuck jobs that have ended since."""
        for worker in self.workers.values():
            for slot, (future, needs) in list(worker.stuck.items()):
                if worker.gone or future.done():
                    del worker.stuck[slot]
                    self.give_back(worker, slot, needs)

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
        #: The files each task's outcome wrote to the run directory: path -> task id.
        self._written: dict[str, str] = {}
        #: Where workers tell the run's events as they happen (``Worker.log_event``), and
        #: what came in there, not told yet.
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._telling = anyio.Lock()
        #: The running dispatches whose events are told live: key -> [task id, events told].
        self._live: dict[str, list[Any]] = {}
        #: How many events of each task's last dispatch were told live.
        self._told: dict[str, int] = {}
        #: Tasks whose cancellation was recorded with what their stopped job sent back.
        self._cancelled_here: set[str] = set()
        #: Whether an earlier session of this run sent tasks to workers (a resume).
        self._resumed = False
        #: Dispatches that would not stop, by key: their futures (their slots stay taken).
        self._stuck: dict[str, Any] = {}
        #: Part of every Dask key of this session of the run: a resumed run's keys never
        #: meet the dead session's, on the scheduler or in a worker's cancel flags.
        self._session = secrets.token_hex(4)
        self._topic = f"wo-events-{ctx.run_id}-{self._session}"
        #: Names the worker's mirror of this repository (a digest: no path travels).
        self._repo_key = sha256_hex(f"{socket.gethostname()}\0{ctx.state_dir}".encode())[:32]
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
            with anyio.fail_after(START_TIMEOUT_S + self.spec.connect_timeout):
                await self._check_workers()
                await self.call(self.client.register_plugin, JobWatch(), name=JobWatch.name)
                # A resumed run's dead coordinator may have left agents running: stopped
                # now, before any task of this run starts (a new run's id matches nothing).
                await self.call(self.client.run, sweep_run, self.ctx.run_id)
                await self.call(self.client.subscribe_topic, self._topic, self._inbox.put)
            self._resumed = await anyio.to_thread.run_sync(_dispatched_before, self.ctx.run_dir)
            await self._prepare_files()
        except TimeoutError as exc:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise ExecutorError(
                f"the Dask cluster did not answer within {START_TIMEOUT_S:g} s while the run "
                "started (its workers checked, its plugin registered)"
            ) from exc
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
                # Its statistical profiler samples every thread's stack 100 times a second:
                # CPU the agents' tasks need more, on a machine this cluster shares with them.
                "distributed.worker.profile.enabled": False,
                # Likewise its event loop's watchdog and its system monitor, every 20 and
                # 500 ms: once a second and every 5 s are plenty for tasks of minutes.
                "distributed.admin.tick.interval": "1s",
                "distributed.admin.system-monitor.interval": "5s",
                "distributed.worker.memory.monitor-interval": "1s",
                # Every task is placed on its worker by this executor: nothing to steal.
                "distributed.scheduler.work-stealing": False,
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
        try:
            facts = await self.call(self.client.run, worker_facts, [])
        except Exception as exc:  # the orchestrator not installed on a worker, say
            raise ExecutorError(
                f"the workers cannot run the orchestrator's code ({type(exc).__name__}: {exc}): "
                "install worktree-orchestrator on every worker"
            ) from exc
        for address, fact in sorted(facts.items()):
            if (why := unfit(address, fact)) is not None:
                raise ExecutorError(why)

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
        if client is not None:
            with contextlib.suppress(Exception):
                await self.call(client.unsubscribe_topic, self._topic)
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
        """Run *task* on a worker; see ``executor.Executor.run`` for the contract.

        What goes wrong with the task here (a worker lost for good, nothing to place it on,
        what came back refused, the cluster failing under it) is the task's result, never
        an exception; a cancellation is recorded (what the stopped remote task committed
        brought back) and propagates.
        """
        ctx, envelope = self.ctx, task.envelope
        await ctx.emit(
            TaskStarted(run_id=ctx.run_id, task_id=envelope.task_id, agent=envelope.agent)
        )
        lost: list[Attempt] = []
        while True:
            try:
                placed = await self._dispatch(task, lost)
            except anyio.get_cancelled_exc_class():
                if envelope.task_id not in self._cancelled_here:
                    # Cancelled before any job went (placing it, preparing it): recorded so.
                    with anyio.CancelScope(shield=True):
                        error = ctx.cancelled_error(envelope.task_id)
                        failed = self._failed(task, error, lost, status="cancelled")
                        await record_result(ctx, failed, leaving=True)
                raise
            except _WorkerLost as exc:
                lost.append(exc.attempt)
                if len(lost) <= MAX_WORKER_LOSSES:
                    continue
                assert exc.attempt.error is not None
                result = self._failed(task, exc.attempt.error, lost)
            except _Refused as exc:
                result = self._failed(task, exc.error, lost)
            except Exception as exc:  # the cluster failing under the task, a bug: its result
                error = ErrorInfo(kind="internal", message=f"{type(exc).__name__}: {exc}"[:2000])
                result = self._failed(task, error, lost)
            else:
                with anyio.CancelScope(shield=True):  # a finished task's work is not dropped
                    try:
                        result = await self._take(task, *placed)
                    except Exception as exc:
                        message = f"what came back could not be taken: {type(exc).__name__}: {exc}"
                        error = ErrorInfo(kind="transfer", message=message[:2000])
                        result = self._failed(task, error, lost)
            break
        await record_result(ctx, result)
        return result

    async def _dispatch(
        self, task: PreparedTask, lost: list[Attempt]
    ) -> tuple[RemoteOutcome, _Worker]:
        """Send *task* to a worker and wait for what comes back (once the worker has all
        it needs: a worker that lost its mirror is sent everything again)."""
        ctx, envelope = self.ctx, task.envelope
        needs = _resources_of(ctx, envelope.agent)
        await self.placement.refresh()
        try:
            worker, slot = await self.placement.take(needs, task.start_commit)
        except _Unplaceable as exc:
            raise _Refused(ErrorInfo(kind="placement", message=str(exc))) from exc
        job: RemoteJob | None = None
        try:
            await self._check_worker(worker, task.agent, len(lost))
            for _ in range(3):
                job = await self._job(task, worker, slot, lost)
                outcome = await self._await(task, worker, job)
                if outcome.stopped:
                    message = f"stopped on worker {worker.address} before it started"
                    raise _Refused(ErrorInfo(kind="cancelled", message=message))
                if outcome.missing is None:
                    return outcome, worker
                # The worker lacks what it was thought to have (restarted, say): all again.
                worker.have.clear()
                worker.files.clear()
                worker.copies = False
            message = f"worker {worker.address} kept lacking the task's {outcome.missing}"
            raise _Refused(ErrorInfo(kind="transfer", message=message))
        finally:
            # A job that would not stop keeps its slot (and ports) until it ends there.
            if job is not None and job.key in self._stuck:
                worker.stuck[slot] = (self._stuck.pop(job.key), dict(needs))
            else:
                self.placement.give_back(worker, slot, needs)

    async def _check_worker(self, worker: _Worker, agent: Agent, earlier: int) -> None:
        """_Refused unless *worker* (asked once) runs this version of the orchestrator, has
        git, and has *agent*'s program (asked once per program); _WorkerLost when it left
        meanwhile (*earlier*: the task's attempts so far)."""
        program = program_of(agent)
        if worker.fact is None or (program is not None and program not in worker.programs):
            started, clock = datetime.now(UTC), time.monotonic()
            try:
                facts = await self.call(
                    self.client.run,
                    worker_facts,
                    [program] if program else [],
                    workers=[worker.address],
                )
                fact = dict(facts[worker.address])
            except Exception as exc:
                await self.placement.refresh(force=True)
                if worker.gone:
                    raise _WorkerLost(_lost_attempt(earlier, worker, started, clock)) from exc
                message = f"worker {worker.address} cannot be asked what it has: {exc}"
                raise _Refused(ErrorInfo(kind="spawn", message=message[:2000])) from exc
            worker.fact = fact
            if program is not None:
                worker.programs[program] = program not in fact.get("missing", [program])
        if why := unfit(worker.address, worker.fact):
            raise _Refused(ErrorInfo(kind="spawn", message=why))
        if program is not None and not worker.programs[program]:
            message = f"worker {worker.address} has no program {program!r} on its PATH"
            raise _Refused(ErrorInfo(kind="spawn", message=message))

    async def _job(
        self, task: PreparedTask, worker: _Worker, slot: int, lost: list[Attempt]
    ) -> RemoteJob:
        ctx, envelope = self.ctx, task.envelope
        bundle = None
        # A task without a worktree needs none of the repository: nothing of it travels.
        start = task.start_commit if envelope.worktree else None
        reserved = start is not None and ctx.repo is not None and start not in worker.have
        if start is not None and ctx.repo is not None:
            # Counted as the worker's at once: a task sent there meanwhile waits for it there
            # rather than carrying it too (taken back if this job never goes).
            have = set(worker.have)
            worker.have.add(start)
        try:
            if start is not None and ctx.repo is not None:
                bundle = await self._start_bundle(ctx.repo, start, have)
            return await self._job_with(task, worker, slot, lost, start, bundle)
        except BaseException:
            if reserved and start is not None:
                worker.have.discard(start)
            raise

    async def _start_bundle(self, repo: Any, start: str, have: set[str]) -> bytes | None:
        """A bundle of *start* less what *have* reaches; _Refused when git cannot make it."""
        try:
            with tempfile.TemporaryDirectory(dir=self.ctx.run_dir) as scratch:
                path = await make_bundle(repo, start, have, Path(scratch, "s.bundle"))
                return await anyio.Path(path).read_bytes() if path is not None else None
        except (GitError, OSError) as exc:
            message = f"the bundle of the task's start commit: {exc}"[:2000]
            raise _Refused(ErrorInfo(kind="transfer", message=message)) from exc

    async def _job_with(
        self,
        task: PreparedTask,
        worker: _Worker,
        slot: int,
        lost: list[Attempt],
        start: str | None,
        bundle: bytes | None,
    ) -> RemoteJob:
        ctx, envelope = self.ctx, task.envelope
        hooks = ctx.settings.hooks.model_dump(mode="json") if ctx.settings.hooks else None
        agent_info = task.agent.info().model_dump(mode="json")
        program = plan_program_of(task.agent)
        needed = sorted(plan_references(envelope, hooks, agent_info, [program] if program else []))
        unsent = [p for p in needed if p not in self._plan_files]
        if unsent:
            try:
                packed = await anyio.to_thread.run_sync(pack_files, ctx.plan_dir, unsent)
            except ShippingError as exc:
                raise _Refused(ErrorInfo(kind="transfer", message=str(exc))) from exc
            self._plan_files.update(packed)
        needs = [p for p in needed if p in self._plan_files or _packed_under(self._plan_files, p)]
        files = {
            p: e
            for p, e in self._plan_files.items()
            if p not in worker.files and _wanted(p, needed)
        }
        # Counted as sent from here on (no await follows): taken back if the job fails.
        worker.files.update(files)
        copies = None
        if self._copies is not None and not worker.copies:
            copies, worker.copies = self._copies, True
        self._dispatches[envelope.task_id] = number = self._dispatches.get(envelope.task_id, 0) + 1
        return RemoteJob(
            run_id=ctx.run_id,
            key=task_key(ctx.run_id, envelope.task_id, f"{self._session}-{number}"),
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
            resources=_resources_of(ctx, envelope.agent),
            events_topic=self._topic,
            pool_size=worker.slots if ctx.settings.pool_size > 0 else 0,
            earlier=list(lost),
            # A branch of the task may be on the worker from an earlier dispatch.
            clear_branch=self._resumed or number > 1,
            identity=self._identity,
            repo_key=self._repo_key,
            queued_at=ctx.queued_at.get(envelope.task_id),
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
        future: Any = None
        self._live[job.key] = [task.envelope.task_id, 0]
        try:
            if ctx.journal is not None:
                # On disk before the job is: a resume then knows the task's branch may be on
                # a worker (see _dispatched_before).
                await ctx.journal.write(
                    {
                        "type": "dispatch",
                        "task": task.envelope.task_id,
                        "worker": worker.address,
                        "key": job.key,
                        "attempt": len(job.earlier) + 1,
                    }
                )
            with anyio.CancelScope(shield=True):  # never a job submitted that nobody follows
                future = await anyio.to_thread.run_sync(
                    self._submit, job, worker.address, sent > SCATTER_ABOVE, limiter=self._threads
                )
            while not await self.call(_wait, future, WORKER_POLL_S):
                await self._tell_live()
                await self.placement.refresh()
                if worker.gone:
                    with contextlib.suppress(Exception):
                        await self.call(future.cancel)
                    raise _WorkerLost(_lost_attempt(len(job.earlier), worker, started, clock))
            await self._tell_live()
            outcome = await self._outcome(task, future, job, worker, started, clock)
        except BaseException as exc:
            # Perhaps never delivered: sent again to the next task there that needs them.
            if job.bundle is not None and job.start_commit is not None:
                worker.have.discard(job.start_commit)
            worker.files.difference_update(job.plan_files)
            if job.copies is not None:
                worker.copies = False
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                with anyio.CancelScope(shield=True):
                    await self._cancelled(task, future, job, worker)
            raise
        finally:
            # What was told live is not told again when the outcome comes (see _take).
            self._told[task.envelope.task_id] = self._live.pop(job.key, [None, 0])[1]
        back = len(outcome.bundle or b"") + sum(len(d) for _, d in outcome.files.values())
        self.shipped.append((task.envelope.task_id, worker.address, sent, back))
        return outcome

    async def _tell_live(self) -> None:
        """Tell the events workers told of running tasks since last time, in order (one
        arriving out of order waits for the task's outcome, which has them all)."""
        async with self._telling:
            while True:
                try:
                    _, payload = self._inbox.get_nowait()
                except queue.Empty:
                    return
                except (TypeError, ValueError):
                    continue
                await self._tell_one(payload)

    async def _tell_one(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        entry = self._live.get(str(payload.get("key")))
        if entry is None or payload.get("n") != entry[1]:
            return
        try:
            event = _EVENTS.validate_python(payload.get("event"))
        except ValueError:
            return
        if getattr(event, "task_id", None) != entry[0] or event.run_id != self.ctx.run_id:
            return
        if not live(event):
            return
        entry[1] += 1
        await self.ctx.emit(event)

    async def _cancelled(
        self, task: PreparedTask, future: Any, job: RemoteJob, worker: _Worker
    ) -> None:
        """Record the result of *task*, cancelled: what the stopped remote task sends back
        (its work committed and fetched), else a cancelled result with nothing."""
        ctx, task_id = self.ctx, task.envelope.task_id
        stopped = await self._stop(task, future, job, worker) if future is not None else None
        if stopped is not None and stopped.result is not None:
            result = await self._take(task, stopped, worker, cancelled=True)
        else:
            error = ctx.cancelled_error(task_id)
            result = self._failed(task, error, job.earlier, status="cancelled")
        self._cancelled_here.add(task_id)
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
            # Held in Dask's books too: another client of the cluster sees them taken.
            resources=dict(job.resources) or None,
            pure=False,
            retries=0,
        )
        done = threading.Event()
        future.wo_done = done
        future.add_done_callback(lambda _: done.set())
        return future

    async def _outcome(
        self,
        task: PreparedTask,
        future: Any,
        job: RemoteJob,
        worker: _Worker,
        started: datetime,
        clock: float,
    ) -> RemoteOutcome:
        """What the finished *future* brought, decoded and checked; _WorkerLost when its
        worker died first (or before it was fetched), _Refused when it is not an outcome."""
        try:
            data = await self.call(future.result, GATHER_TIMEOUT_S)
        except Exception as exc:
            await self.placement.refresh(force=True)
            if worker.gone or type(exc).__name__ in _LOST:
                lost = _lost_attempt(len(job.earlier), worker, started, clock)
                raise _WorkerLost(lost) from exc
            message = f"the task raised on worker {worker.address}: {type(exc).__name__}: {exc}"
            raise _Refused(ErrorInfo(kind="internal", message=message[:2000])) from exc
        try:
            return decode_outcome(data, max_bundle=_max_bundle(task))
        except (ValueError, TypeError) as exc:
            message = f"worker {worker.address} sent back no valid outcome: {exc}"[:2000]
            raise _Refused(ErrorInfo(kind="transfer", message=message)) from exc

    async def _stop(
        self, task: PreparedTask, future: Any, job: RemoteJob, worker: _Worker
    ) -> RemoteOutcome | None:
        """Stop the remote task and take what it sends back, if it does in time (else the
        worker's slot is not given back: the job may still be running there)."""
        grace = self.ctx.settings.kill_grace + STOP_MARGIN_S
        with anyio.move_on_after(grace):
            with contextlib.suppress(Exception):
                await self.call(self.client.run, cancel_job, job.key, workers=[worker.address])
            while not await self.call(_wait, future, WORKER_POLL_S):
                await self.placement.refresh()
                if worker.gone:
                    return None
            with contextlib.suppress(Exception):
                data = await self.call(future.result, GATHER_TIMEOUT_S)
                return decode_outcome(data, max_bundle=_max_bundle(task))
            return None
        self._stuck[job.key] = future
        with contextlib.suppress(Exception):
            await self.call(future.cancel)
        return None

    async def _take(
        self,
        task: PreparedTask,
        outcome: RemoteOutcome,
        worker: _Worker,
        *,
        cancelled: bool = False,
    ) -> TaskResult:
        """The result *outcome* brings, made this run's: its commit fetched and checked
        (commit, tree, descent from the task's start), the task's branch made, its own files
        written (the coordinator's own envelope), its events told. What does not check out
        fails the task (kind ``transfer``), its commit not taken."""
        ctx, envelope = self.ctx, task.envelope
        result, task_id = outcome.result, envelope.task_id
        assert result is not None
        envelope_bytes = canonical_json(envelope.to_json_dict())
        provenance = result.provenance
        start = task.start_commit if envelope.worktree else None
        if result.task_id != task_id or provenance.envelope_sha256 != sha256_hex(envelope_bytes):
            message = f"worker {worker.address} sent back the result of another task"
            return self._failed(task, ErrorInfo(kind="transfer", message=message), [])
        # What the coordinator knows itself is its own: the envelope file, the agent's name,
        # the group and dependencies (only what the task did is the worker's to say).
        entry = LogFile(
            path=f"envelopes/{ref_safe(task_id)}.json",
            sha256=sha256_hex(envelope_bytes),
            size=len(envelope_bytes),
        )
        update: dict[str, Any] = {
            "worktree": None,
            "branch": None,
            "envelope": entry,
            "agent": envelope.agent,
            "group": envelope.group,
            "depends_on": envelope.depends_on,
        }
        cleared = provenance.model_copy(update={"result_commit": None, "result_tree": None})
        commit, tree = provenance.result_commit, provenance.result_tree
        problem = None
        if commit is not None:
            if ctx.repo is None or start is None or tree is None or provenance.base_commit != start:
                problem = "a result commit for a task that starts from no commit of this run"
            else:
                try:
                    await self._fetch(task, outcome, commit, tree, worker)
                    update["branch"] = ctx.branch(task_id)
                except (GitError, OSError) as exc:
                    problem = f"the result commit from worker {worker.address}: {exc}"
        if problem is not None:
            error = ErrorInfo(kind="transfer", message=problem[:2000])
            update.update(status="failed", error=error, provenance=cleared)
        elif commit is None:
            update["provenance"] = cleared
        try:
            await anyio.to_thread.run_sync(
                _write_files, ctx.run_dir, task_id, result, outcome, envelope_bytes, self._written
            )
        except (ShippingError, OSError) as exc:
            message = f"the task's files from worker {worker.address}: {exc}"[:2000]
            update.update(status="failed", error=ErrorInfo(kind="transfer", message=message))
        if cancelled:
            update.update(status="cancelled", error=ctx.cancelled_error(task_id))
        skip = self._told.pop(task_id, 0)  # told already, as they happened
        for event in [e for e in outcome.events if live(e)][skip:]:
            if (
                getattr(event, "task_id", None) == task_id
                and getattr(event, "run_id", None) == ctx.run_id
            ):
                await ctx.emit(event)
        return seal_result(result.model_copy(update=update))

    async def _fetch(
        self, task: PreparedTask, outcome: RemoteOutcome, commit: str, tree: str, worker: _Worker
    ) -> None:
        ctx = self.ctx
        assert ctx.repo is not None and task.start_commit is not None
        branch = ctx.branch(task.envelope.task_id)
        if commit == task.start_commit:
            # Nothing committed: the start commit, whose tree this run knows already.
            if tree != task.start_tree:
                raise GitError(["rev-parse"], 1, f"commit {commit} has another tree than {tree}")
            await ctx.repo.git.run("update-ref", f"refs/heads/{branch}", commit)
            return
        if outcome.bundle is None:
            raise GitError(["bundle"], 1, "no bundle of the result commit came back")
        await fetch_bundle(
            ctx.repo, outcome.bundle, commit, tree, branch, descends_from=task.start_commit
        )
        worker.have.add(commit)

    def _failed(
        self,
        task: PreparedTask,
        error: ErrorInfo,
        attempts: list[Attempt],
        status: TaskStatus = "failed",
    ) -> TaskResult:
        """The result of *task*, ended here with *error* after *attempts* (lost ones)."""
        result = not_started_result(task.envelope, task.agent, self.ctx, status, error)
        if not attempts:
            return result
        update = {"attempts": len(attempts), "attempt_log": attempts}
        return seal_result(result.model_copy(update=update))


def _write_files(
    run_dir: Path,
    task_id: str,
    result: TaskResult,
    outcome: RemoteOutcome,
    envelope: bytes,
    written: dict[str, str],
) -> None:
    """Write the task's files that came back: the logs its result names (its attempts',
    checks' and hooks'), each only with the digest the result records, and its attempts'
    outputs; and its envelope as the coordinator has it. Nothing else: no file another task
    of the run wrote (*written*: path -> task), nothing outside the run directory."""
    name = ref_safe(task_id)
    numbers = sorted(a.number for a in result.attempt_log)
    outputs = {f"outputs/{name}.attempt-{n}.json" for n in numbers}
    prompts = {f"logs/{name}.attempt-{n}.prompt" for n in numbers}
    last_prompt = f"logs/{name}.attempt-{numbers[-1]}.prompt" if numbers else None
    # This task's own log names: an attempt's streams, a step's or hook's (never another
    # task's, whose id may start with this one's: ``a`` and ``a.b``).
    own = re.compile(
        rf"logs/{re.escape(name)}\.(?:attempt-\d+\.(?:stdout|stderr)"
        rf"|(?:setup|check|hook)-[A-Za-z0-9_.-]+\.\d+\.(?:stdout|stderr))"
    )
    named = {entry["path"]: entry["sha256"] for entry in _log_files(result.model_dump(mode="json"))}
    prompt = result.provenance.prompt_sha256
    wanted: Files = {}
    for path, (mode, data) in outcome.files.items():
        if written.get(path, task_id) != task_id:
            continue  # another task's
        if own.fullmatch(path):
            keep = named.get(path) == sha256_hex(data)
        elif path in prompts:  # the last one's digest is the provenance's
            keep = path != last_prompt or prompt is None or sha256_hex(data) == prompt
        else:
            keep = path in outputs
        if keep:
            wanted[path] = (mode, data)
    wanted[f"envelopes/{name}.json"] = (0o644, envelope)
    unpack_files(run_dir, wanted)
    written.update(dict.fromkeys(wanted, task_id))


def _log_files(value: Any) -> list[dict[str, Any]]:
    """Every ``LogFile`` (a ``path`` with its ``sha256``) in a result as JSON."""
    found: list[dict[str, Any]] = []
    if isinstance(value, dict):
        if isinstance(value.get("path"), str) and isinstance(value.get("sha256"), str):
            found.append(value)
        for item in value.values():
            found += _log_files(item)
    elif isinstance(value, list):
        for item in value:
            found += _log_files(item)
    return found


def _dispatched_before(run_dir: Path) -> bool:
    """Whether the run's journal records a dispatch (an earlier session of the run sent
    tasks to workers). Blocking; reads the journal in pieces."""
    try:
        with open(run_dir / JOURNAL, "rb") as f:
            tail = b""
            while chunk := f.read(1 << 20):
                if b'"type":"dispatch"' in tail + chunk:
                    return True
                tail = chunk[-32:]
    except OSError:
        return False
    return False


def _max_bundle(task: PreparedTask) -> int:
    """The largest result bundle a task may send back: its commit's limit and a margin."""
    return (task.envelope.max_commit_mb + 64) << 20


def unfit(address: str, fact: Mapping[str, Any]) -> str | None:
    """Why the worker at *address*, as ``remote.worker_facts`` describes it, cannot run this
    run's tasks (another version of the orchestrator, no git), or None."""
    version = fact.get("version")
    if version != __version__:
        return (
            f"worker {address} runs worktree-orchestrator {version}, this coordinator "
            f"{__version__}: install the same version on both"
        )
    if not fact.get("git"):
        return f"worker {address} has no git on its PATH"
    return None


class _WorkerLost(Exception):
    def __init__(self, attempt: Attempt) -> None:
        super().__init__(attempt.error.message if attempt.error else "worker lost")
        self.attempt = attempt


class _Refused(Exception):
    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def _lost_attempt(earlier: int, worker: _Worker, started: datetime, clock: float) -> Attempt:
    """The attempt a task made on *worker*, which left the cluster (after *earlier* ones)."""
    message = f"worker {worker.address} left the cluster while it ran this task"
    return Attempt(
        number=earlier + 1,
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
    result = await repo.git.run(
        "config", "--get-regexp", r"^(user|author|committer)\.(name|email)$", check=False
    )
    configured = dict(
        line.split(" ", 1)
        for line in result.stdout.decode(errors="replace").splitlines()
        if " " in line
    )
    identity: dict[str, str] = {}
    fallback = await repo.git.identity_env()
    for role in ("AUTHOR", "COMMITTER"):
        for part in ("NAME", "EMAIL"):
            name = f"GIT_{role}_{part}"
            value = (
                os.environ.get(name)
                or configured.get(f"{role.lower()}.{part.lower()}")
                or configured.get(f"user.{part.lower()}")
                or (os.environ.get("EMAIL") if part == "EMAIL" else None)
                or fallback.get(name)
            )
            if value:
                identity[name] = value
    return identity
