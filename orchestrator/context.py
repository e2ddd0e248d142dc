"""RunContext: what every task of one run shares (no global state: one context per run)."""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from envelopes import (
    ErrorInfo,
    Event,
    InputFile,
    TaskResult,
    new_run_id,
    ref_safe,
    run_id_problem,
)

from ._git import clean_environment
from .errors import EventHandlerFailed, OrchestratorError, RunDirError
from .guard import RepoGuard
from .journal import ENVELOPES, JOURNAL, Journal, RecordFile
from .lifeline import Lifeline
from .locks import RunLock
from .pool import VenvPool, WorktreePool
from .repo import Repository
from .results import ResultStore
from .scheduler import TaskBook, TaskState
from .settings import RunSettings
from .venv import VenvBackend, get_backend
from .workspace import PortSlots

__all__ = ["EventHandler", "RunContext", "guard_repository"]

#: A task id JSON writes as it is (no quote, backslash, control or non-ASCII character).
_PLAIN_ID = re.compile(r"[A-Za-z0-9._\-\[\]=,:+@ ]*")

#: Made once per run, so that a task makes no directory of its own: each attempt's files are
#: ``<dir>/<task>.attempt-<n>.<ext>`` and each envelope ``envelopes/<task>.json``.
RUN_SUBDIRS = ("envelopes", "logs", "outputs")

#: Longest an event line may stay in the buffer while events keep coming, in seconds.
EVENTS_FLUSH_INTERVAL = 0.05

EventHandler = Callable[[Event], Awaitable[None] | None]


@dataclass
class RunContext:
    """The shared state of one run: repository, base commit, run directory, policies.

    ``results`` collects each task's final TaskResult as it is decided, including results of
    tasks cut short by cancellation, so that a partial report can always be written.
    """

    run_id: str
    run_dir: Path
    repo: Repository | None
    base_ref: str | None
    base_commit: str | None
    base_tree: str | None
    plan_dir: Path
    #: How the run runs (resolved once; see orchestrator/settings.py).
    settings: RunSettings = field(default_factory=RunSettings)
    #: The settings' venv backend, made once for the run.
    venv_backend: VenvBackend = field(default_factory=get_backend)
    on_event: EventHandler | None = None
    #: Held as their sealed JSON lines, which the journal and the report write as they are
    #: (see orchestrator/results.py).
    results: ResultStore = field(default_factory=ResultStore)
    book: TaskBook | None = None
    events_log: BinaryIO | None = None
    #: Where a dependent task starts, if not from the run's base: (commit, tree).
    starts: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: What each task's commit changed from its start, sorted, where its commit step knew
    #: it without asking git (see ``Harvest.changed``): what its dependents are told.
    changed_files: dict[str, list[str]] = field(default_factory=dict)
    #: The files tasks ran from, hashed once per run (orchestrator/inputs.py).
    input_files: dict[tuple[str, str], list[InputFile]] = field(default_factory=dict)
    #: The files being hashed now, each with the event set when that is done: a task asking
    #: for one waits for it rather than hashing it a second time.
    inputs_hashing: dict[tuple[str, str], anyio.Event] = field(default_factory=dict)
    #: Each agent's info as JSON and whether it names ``{plan_dir}``, by ``id`` (with the
    #: agent, so that an id is never another's): orchestrator/inputs.py.
    agent_infos: dict[int, tuple[Any, dict[str, Any], bool]] = field(default_factory=dict)
    #: When each task was queued (its dependencies done, waiting for a slot).
    queued_at: dict[str, datetime] = field(default_factory=dict)
    #: Why a running task is being cancelled, when it is not the whole run (fail-fast, say).
    cancel_reasons: dict[str, ErrorInfo] = field(default_factory=dict)
    journal: Journal | None = None
    #: The run's envelopes.jsonl, for the envelopes of tasks that need no file (None: every
    #: task writes its own, as on a Dask worker).
    envelope_records: RecordFile | None = None
    run_lock: RunLock | None = None
    #: The repository's worktree pool and the state directory's venv pool, when used.
    pool: WorktreePool | None = None
    venv_pool: VenvPool | None = None
    _events_flushed: float = 0.0
    #: Whether this run set the repository's guard (and so removes it when it ends).
    guarding: bool = False
    #: Set once the journal says the run finished: closing then removes the lock file.
    finished: bool = False
    #: On a resume: how many of the dead run's agent processes were found and killed.
    orphans_killed: int = 0
    #: The environment agents start from: this process's, read once per run, without the
    #: variables that would tie git to one repository.
    base_env: dict[str, str] = field(default_factory=lambda: clean_environment(os.environ))
    #: Kills the run's agents if this process dies (a watcher, started with the first agent).
    lifeline: Lifeline = field(default_factory=Lifeline)
    #: Queues each event for the plan's webhooks, without waiting (orchestrator/notify.py).
    notify: Callable[[Event], None] | None = None
    #: The running tasks' slots (``ORCHESTRATOR_SLOT``), made when the first task takes one
    #: (or given: a task's on a Dask worker, where the coordinator chose it).
    port_slots: PortSlots | None = field(default=None, repr=False)
    #: Where worktrees, venvs and pools live, when not beside the run directories (a Dask
    #: worker's, shared by the tasks it runs; see orchestrator/remote.py).
    home: Path | None = None
    #: Where the plan's ``copy`` files are copied from, when not the repository's checkout
    #: (a Dask worker's copy of them).
    copy_root: Path | None = None

    def result_line(self, result: TaskResult) -> str:
        """*result*'s JSON line: the one made when it was sealed, if it is that result."""
        return self.results.line_of(result)

    def start_of(self, task_id: str) -> tuple[str | None, str | None]:
        """The commit and tree *task_id* starts from."""
        return self.starts.get(task_id, (self.base_commit, self.base_tree))

    @property
    def slots(self) -> PortSlots:
        """The running tasks' slots: as many as the run's concurrency (made on first use, so
        that a resume's settings are the ones it has)."""
        if self.port_slots is None:
            self.port_slots = PortSlots(self.settings.concurrency)
        return self.port_slots

    def cancelled_error(self, task_id: str) -> ErrorInfo:
        """Why *task_id* was cancelled."""
        return self.cancel_reasons.get(
            task_id, ErrorInfo(kind="cancelled", message="the run was cancelled")
        )

    def move(self, task_id: str, state: TaskState) -> None:
        """Record a task's new state in the run's TaskBook (when the run keeps one).

        The book queues the change for the journal; ``await ctx.journal.sync()`` makes it
        durable.
        """
        if self.book is not None and task_id in self.book.states:
            self.book.move(task_id, state)

    def journal_move(self, task_id: str, state: TaskState) -> None:
        """Queue a task's state change for the journal (the run's TaskBook calls this)."""
        if self.journal is not None:
            if _PLAIN_ID.fullmatch(task_id):
                # The line json.dumps would make, without it: three per task.
                line = f'{{"type":"state","task":"{task_id}","state":"{state}"}}'
                self.journal.append_line(line)
            else:
                self.journal.append({"type": "state", "task": task_id, "state": state})

    @classmethod
    async def open(
        cls,
        *,
        repo: Repository | None,
        settings: RunSettings,
        base_commit: str | None = None,
        base_tree: str | None = None,
        run_id: str | None = None,
        plan_dir: Path | None = None,
        resume: bool = False,
        on_event: EventHandler | None = None,
    ) -> RunContext:
        """Make (or, with *resume*, find) the run directory, take the run's lock, open its journal.

        *base_commit* and *base_tree* are ``settings.base`` resolved (the repository's
        ``resolve_commit``); they are resolved here when not given. Without a repository (all
        tasks ``worktree: false``), the run directory is under the settings' state directory.
        With *resume*, the run directory of *run_id* must exist instead. Either way the run's
        lock is taken (RunInUse when a live process holds it) and its journal opened.
        """
        run_id = run_id or new_run_id()
        if why := run_id_problem(run_id):
            raise OrchestratorError(why)
        backend = settings.backend()  # VenvError (uv missing, say) before anything is made
        commit, tree = base_commit, base_tree
        if repo is not None and (commit is None or tree is None):
            commit, tree = await repo.resolve_commit(settings.base)
        root = settings.state_root(repo.state_dir if repo is not None else None)
        run_dir = root / "runs" / run_id
        await _make_run_dir(run_dir, resume=resume)
        run_lock = RunLock(run_dir)
        journal = Journal(run_dir / JOURNAL)
        try:
            run_lock.acquire()
            journal.open()
            guarding = repo is not None and repo.git.guard is None
            if repo is not None and guarding:
                await guard_repository(repo)
        except BaseException:
            journal.close()
            run_lock.release()
            if not resume:
                # Refused or cancelled before any task (the guard's snapshot is read in a
                # thread): a new run leaves no run directory behind, as a run directory
                # always ends with a report.
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return cls(
            run_id=run_id,
            run_dir=run_dir,
            repo=repo,
            base_ref=settings.base if repo else None,
            base_commit=commit,
            base_tree=tree,
            plan_dir=plan_dir or Path.cwd(),
            settings=settings,
            venv_backend=backend,
            on_event=on_event,
            journal=journal,
            envelope_records=RecordFile(run_dir / ENVELOPES),
            run_lock=run_lock,
            guarding=guarding,
        )

    def close(self) -> None:
        """Close the journal, let go of pool slots, release the run's lock (idempotent)."""
        self.lifeline.close()
        if self.repo is not None and self.guarding:
            self.repo.git.guard = None
            self.guarding = False
        if self.pool is not None:
            self.pool.close()
        if self.venv_pool is not None:
            self.venv_pool.close()
        if self.journal is not None:
            self.journal.close()
        if self.envelope_records is not None:
            self.envelope_records.close()
        if self.run_lock is not None:
            if self.finished:
                self.run_lock.remove()  # a finished run leaves no lock file behind
            else:
                self.run_lock.release()

    @property
    def state_dir(self) -> Path:
        """Where worktrees and venvs of this run live (beside the run directories)."""
        return self.home or self.run_dir.parent.parent

    def worktree_path(self, task_id: str) -> Path:
        """Where *task_id*'s worktree goes."""
        return self.state_dir / "worktrees" / self.run_id / ref_safe(task_id)

    def venv_path(self, task_id: str) -> Path:
        """Where *task_id*'s venv goes (never inside its worktree, so it is never committed)."""
        return self.state_dir / "venvs" / self.run_id / ref_safe(task_id)

    def branch(self, task_id: str) -> str:
        """The task's branch: ``orchestrator/<run_id>/<task_id>`` (see ``envelopes.ref_safe``)."""
        return f"orchestrator/{self.run_id}/{ref_safe(task_id)}"

    def open_events_log(self) -> None:
        """Start appending every event to ``events.jsonl`` in the run directory."""
        try:
            self.events_log = (self.run_dir / "events.jsonl").open("ab", buffering=1 << 16)
        except OSError as exc:
            raise RunDirError(
                f"cannot write {self.run_dir / 'events.jsonl'}: {exc.strerror or exc}"
            ) from exc
        self._events_flushed = time.monotonic()
        if self.journal is not None:
            self.journal.before_write = self.flush_events_log

    def flush_events_log(self) -> None:
        """Hand the buffered event lines to the kernel; RunDirError when they cannot be written."""
        if self.events_log is not None:
            try:
                self.events_log.flush()
            except OSError as exc:
                path = self.run_dir / "events.jsonl"
                raise RunDirError(f"cannot write {path}: {exc.strerror or exc}") from exc
            self._events_flushed = time.monotonic()

    def close_events_log(self) -> None:
        """Flush and stop writing ``events.jsonl`` (idempotent)."""
        if self.events_log is not None:
            if self.journal is not None:
                self.journal.before_write = None
            # A run that ends well flushed already (a failure there is told); one on its way
            # out with another error keeps that error.
            with contextlib.suppress(OSError):
                self.events_log.close()
            self.events_log = None

    async def emit(self, event: Event) -> None:
        """Log *event* to ``events.jsonl``, queue it for the webhooks and deliver it to the
        handler (awaited if async).

        Lines are buffered, and handed to the kernel before every journal write, and on an
        event that comes 50 ms or more after the last flush: a write system call per event
        was most of the cost of a task without a worktree (see docs/benchmarks.md). The
        journal, not this log, is what a resume relies on.
        """
        if self.events_log is not None:
            try:
                self.events_log.write(event.model_dump_json().encode() + b"\n")
            except OSError as exc:
                path = self.run_dir / "events.jsonl"
                raise RunDirError(f"cannot write {path}: {exc.strerror or exc}") from exc
            if time.monotonic() - self._events_flushed >= EVENTS_FLUSH_INTERVAL:
                self.flush_events_log()
        if self.notify is not None:
            self.notify(event)
        if self.on_event is not None:
            try:
                outcome = self.on_event(event)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception as exc:
                raise EventHandlerFailed(
                    f"the on_event handler raised {type(exc).__name__}: {exc}"
                ) from exc


async def _make_run_dir(run_dir: Path, *, resume: bool) -> None:
    """Make the run directory and its subdirectories (with *resume*: find it); RunDirError."""
    if resume:
        if not run_dir.is_dir():
            raise OrchestratorError(f"no run {run_dir.name} in {run_dir.parent}")
    else:
        # In the event loop (a few mkdir calls): a cancellation cannot fall between making
        # the directory and knowing it was made, which would leave it without a report.
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            raise RunDirError(
                f"cannot create the run directory {run_dir}: {exc.strerror or exc}"
            ) from exc
    try:
        for name in RUN_SUBDIRS:
            (run_dir / name).mkdir(exist_ok=True)
    except OSError as exc:
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise RunDirError(f"cannot write {run_dir}: {exc.strerror or exc}") from exc


async def guard_repository(repo: Repository) -> None:
    """Set the repository's guard. One guard per Repository object: a second run sharing it
    shares the first's (and only the run that set it removes it)."""
    repo.git.guard = await anyio.to_thread.run_sync(RepoGuard.snapshot, repo.common_dir)
    try:
        repo.lock.ensure_open()
    except OSError as exc:
        repo.git.guard = None
        path = repo.lock.path
        raise RunDirError(f"cannot create the lock file {path}: {exc.strerror or exc}") from exc
