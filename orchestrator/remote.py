"""A task on a Dask worker: the worker's side of the ``dask`` executor.

The coordinator (orchestrator/dask_executor.py) submits :func:`run_job` with a
:class:`RemoteJob`: everything the task needs, since the worker sees nothing of the
coordinator's disk. The worker keeps, in its local directory
(``<local_directory>/worktree-orchestrator``):

- ``mirrors/<repo>.git``: a bare repository per coordinator repository, holding what bundles
  brought (the base once, then the upstream results a dependent needs) and the results made
  here;
- ``state/``: worktrees, venvs and their pools, shared by the tasks this worker runs, and
  ``state/plans/<run_id>/``, ``state/copies/<run_id>/`` (the plan's files the tasks name, the
  plan's ``copy`` files) and ``state/runs/<run_id>/<key>/`` (one task's envelope, logs and
  outputs while it runs): all of it hidden from sandboxed agents, as a state directory is.

The task runs the same lifecycle as on the coordinator (``subagent.run_subagent``: worktree
from the mirror, venv, agent, checks, commit) in an event loop of its own, in the Dask
thread that runs it. :func:`run_job` returns a :class:`RemoteOutcome` encoded as plain bytes
(:func:`encode_outcome`: JSON, a bundle, file contents), which the coordinator decodes and
validates (:func:`decode_outcome`) instead of unpickling what a worker sent.

Stopping a running task: Dask's ``cancel`` does not interrupt a running function, so the
runner watches a flag (:func:`cancel_job`, sent with ``Client.run`` by the coordinator); the
task is then cancelled as on the coordinator (agent killed, partial work committed) and its
result still returned. :class:`JobWatch`, a worker plugin, sets the flag when the scheduler
lets go of a running task (the coordinator died: its client is gone): its agents do not run
on. :func:`sweep_run` kills what is left of a run's agents on the worker (a resume asks).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
from pydantic import TypeAdapter

from envelopes import (
    Attempt,
    Event,
    HandoffEnvelope,
    TaskFinished,
    TaskResult,
    TaskStarted,
    loads_bounded,
    ref_safe,
)

from ._git import Git
from ._version import __version__
from .agents import Agent
from .context import RUN_SUBDIRS, RunContext
from .errors import GitError
from .guard import RepoGuard
from .lifeline import Lifeline
from .locks import RepoLock
from .pool import VenvPool, WorktreePool
from .process import kill_tagged
from .repo import Repository
from .settings import RunSettings
from .shipping import MAX_SHIPPED_FILES, Files, pack_files, unbundle, unpack_files
from .subagent import run_subagent
from .workspace import PortSlots

__all__ = [
    "JobWatch",
    "RemoteJob",
    "RemoteOutcome",
    "cancel_job",
    "decode_outcome",
    "encode_outcome",
    "run_job",
    "sweep_run",
    "worker_facts",
]

#: The worker's directory of its own, in its local directory.
HOME_NAME = "worktree-orchestrator"
#: How long a task whose start commit is on its way (another task to this worker brings
#: it) waits for it before it says it is missing, in seconds.
MIRROR_WAIT_S = 30.0
#: Longest a sweep waits for the jobs it stopped to end, in seconds.
SWEEP_WAIT_S = 30.0
#: Left in a run's copies directory once the plan's copy files are all there.
COPIES_MARK = ".complete"
#: How often a running task looks at its cancel flag, in seconds.
CANCEL_POLL_S = 0.05

#: What the coordinator may find in a task's run directory: its envelope, logs, outputs.
RETURNED_FILE = re.compile(r"(?:envelopes|logs|outputs)/[A-Za-z0-9@][A-Za-z0-9@._-]{0,250}")
#: Most a task's returned files may weigh together.
RETURNED_BYTES = 256 << 20


@dataclass
class RemoteJob:
    """One dispatch of a task to a worker: what it needs, no path of the coordinator's."""

    run_id: str
    #: The dispatch's Dask key (unique per dispatch), which its cancel flag is keyed by.
    key: str
    envelope: HandoffEnvelope
    agent: Agent
    #: The run's settings, with nothing of the coordinator's machine (no state_dir).
    settings: RunSettings
    start_commit: str | None
    start_tree: str | None
    #: A bundle bringing *start_commit* (None: the worker has it, or another task brings it).
    bundle: bytes | None
    #: The plan's files the task names, those the worker was not sent yet.
    plan_files: Files
    #: Every plan file the task names (the worker must have them all).
    plan_needs: list[str]
    #: The plan's ``copy`` files (None: sent before, or the plan has none).
    copies: Files | None
    #: Whether the plan has copy files, which the task must wait for when another brings them.
    copies_needed: bool
    #: The task's slot on the worker (``ORCHESTRATOR_SLOT``, its ports).
    slot: int
    #: What it holds on the worker while it runs (its agent's ``resources``).
    resources: dict[str, float]
    #: Worktrees and venvs the worker keeps for later tasks.
    pool_size: int
    #: Attempts made before, on workers that were lost.
    earlier: list[Attempt]
    #: Whether the task's branch may be in the mirror from an earlier dispatch (to remove).
    clear_branch: bool
    #: The author and committer of the task's commits (the coordinator's identity).
    identity: dict[str, str]
    #: Which mirror on the worker: a digest naming the coordinator's repository (no path).
    repo_key: str
    #: The Dask topic the task's events are told on as they happen (None: only at the end).
    events_topic: str | None = None
    #: When the task was queued on the coordinator (its timings start from then).
    queued_at: datetime | None = None
    #: The coordinator's version of the orchestrator: the worker must run the same.
    version: str = __version__


@dataclass
class RemoteOutcome:
    """What a dispatch brings back."""

    #: What the worker lacked, when it could not run the task: ``commit`` or ``files``.
    missing: str | None = None
    #: Stopped before the task started (a cancel while it waited for what it needs).
    stopped: bool = False
    result: TaskResult | None = None
    worker: str = ""
    #: A bundle of the result commit (less the start commit's history), when it made one.
    bundle: bytes | None = None
    #: The task's envelope, logs and outputs, by their paths in the run directory.
    files: Files = field(default_factory=dict)
    #: The task's events, in order (the coordinator tells them as its own).
    events: list[Event] = field(default_factory=list)


# -- what travels back, as bytes ----------------------------------------------------------

#: Most an outcome's header (its result and events, as JSON) may weigh, inflated.
MAX_HEADER_BYTES = 64 << 20
#: Most events one task may send back.
MAX_EVENTS = 10_000
_EVENTS: TypeAdapter[Event] = TypeAdapter(Event)


def encode_outcome(outcome: RemoteOutcome) -> bytes:
    """*outcome* as bytes: a length, a JSON header (result, events, what follows), the
    bundle, then each file's content."""
    files = sorted(outcome.files.items())
    header = {
        "missing": outcome.missing,
        "stopped": outcome.stopped,
        "worker": outcome.worker,
        "result": outcome.result.model_dump(mode="json") if outcome.result else None,
        "events": [_EVENTS.dump_python(e, mode="json") for e in outcome.events[:MAX_EVENTS]],
        "bundle": len(outcome.bundle) if outcome.bundle is not None else None,
        "files": [[path, mode, len(data)] for path, (mode, data) in files],
    }
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 6)
    parts = [len(head).to_bytes(8, "big"), head, outcome.bundle or b""]
    parts += [data for _, (_, data) in files]
    return b"".join(parts)


def _count(value: Any) -> bool:
    """Whether *value* is a count (an int >= 0, not a bool)."""
    return type(value) is int and value >= 0


def decode_outcome(data: bytes, *, max_bundle: int) -> RemoteOutcome:
    """What :func:`encode_outcome` made, every part checked: the result and events validated
    as the models they claim to be, sizes within what the data holds (and the bundle within
    *max_bundle* bytes). ValueError when anything does not fit."""
    if not isinstance(data, bytes) or len(data) < 8:
        raise ValueError("not an outcome")
    size = int.from_bytes(data[:8], "big")
    if size > min(len(data) - 8, 64 << 20):
        raise ValueError("an outcome's header runs past its end")
    inflate = zlib.decompressobj()
    try:
        text = inflate.decompress(data[8 : 8 + size], MAX_HEADER_BYTES)
    except zlib.error as exc:
        raise ValueError(f"an outcome's header is not deflated JSON: {exc}") from None
    if inflate.unconsumed_tail or not inflate.eof or inflate.unused_data:
        raise ValueError(
            f"an outcome's header is over {MAX_HEADER_BYTES >> 20} MiB, cut, or followed by more"
        )
    header = loads_bounded(text)
    if not isinstance(header, dict):
        raise ValueError("an outcome's header is not an object")
    at = 8 + size
    bundle = None
    if (length := header.get("bundle")) is not None:
        if not _count(length) or length > max_bundle:
            raise ValueError(f"a result bundle of {length} bytes (at most {max_bundle})")
        if at + length > len(data):
            raise ValueError("an outcome's bundle runs past its end")
        bundle, at = data[at : at + length], at + length
    files: Files = {}
    entries = header.get("files") or []
    if not isinstance(entries, list) or len(entries) > MAX_SHIPPED_FILES:
        raise ValueError("too many files in an outcome")
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ValueError("a file of an outcome is not [path, mode, size]")
        path, mode, length = entry
        if not (isinstance(path, str) and _count(mode) and _count(length)):
            raise ValueError("a file of an outcome is not [path, mode, size]")
        if path in files:
            raise ValueError(f"{path!r}: twice in an outcome")
        if at + length > len(data):
            raise ValueError(f"{path!r}: runs past the outcome's end")
        files[path], at = (mode & 0o777, data[at : at + length]), at + length
    if at != len(data):
        raise ValueError("an outcome has bytes left over")
    events = header.get("events") or []
    if not isinstance(events, list) or len(events) > MAX_EVENTS:
        raise ValueError("too many events in an outcome")
    missing, stopped, result = (
        header.get("missing"),
        header.get("stopped", False),
        header.get("result"),
    )
    if missing not in (None, "commit", "files"):
        raise ValueError(f"an outcome says it lacks {missing!r}")
    if stopped not in (True, False) or (missing is not None) + stopped + (result is not None) != 1:
        raise ValueError("an outcome must have exactly one of a result, a lack, or a stop")
    return RemoteOutcome(
        missing=missing,
        stopped=stopped,
        result=TaskResult.model_validate(result) if result is not None else None,
        worker=str(header.get("worker", ""))[:256],
        bundle=bundle,
        files=files,
        events=[_EVENTS.validate_python(e) for e in events],
    )


# -- the cancel flags of the jobs running in this worker process ---------------------------

_lock = threading.Lock()
#: Each running job's key -> (its run's id, its cancel flag).
_flags: dict[str, tuple[str, threading.Event]] = {}
#: Keys cancelled before their job started (or after it ended): when they were.
_early: dict[str, float] = {}
_mirror_lock = threading.Lock()
#: How many jobs of each mirror run now.
_running: dict[Path, int] = {}
#: Commits known to be in a mirror (mirror, commit): not asked of git again.
_present: set[tuple[Path, str]] = set()
#: Each mirror's repository guard in this worker process.
_guards: dict[Path, RepoGuard] = {}


class _WorkerLifeline(Lifeline):
    """The lifeline of every job of one run in this worker process: their agents' process
    groups die with the worker.

    One watcher process per run for the worker's life, not one per job (each costs an
    interpreter start); shared by the jobs' threads, so its calls are serialised; never
    closed.
    """

    def __init__(self) -> None:
        super().__init__()
        self._calls = threading.Lock()

    def watch(self, group: int, *, tag_variable: str, prefix: str) -> None:
        # The process groups only: a tag sweep would also kill the same run's agents of the
        # other workers on this machine (a LocalCluster's), which live on. An agent that
        # left its group is stopped by the resumed run's sweep instead.
        with self._calls:
            super().watch(group, tag_variable=tag_variable, prefix=NO_TAG)

    def unwatch(self, group: int) -> None:
        with self._calls:
            super().unwatch(group)

    def close(self) -> None:
        """Kept open: other jobs, and later ones, use it (it ends with the worker)."""


#: A tag prefix no agent's tag has (tags start with a run id).
NO_TAG = "//"
#: The lifeline of each run's jobs in this worker process (by run id).
_lifelines: dict[str, _WorkerLifeline] = {}


def _lifeline_of(run_id: str) -> _WorkerLifeline:
    with _lock:
        return _lifelines.setdefault(run_id, _WorkerLifeline())


def cancel_job(key: str, dask_worker: Any = None) -> bool:
    """Stop the job *key* on this worker (run with ``Client.run``); whether it was running.

    A job not started yet is stopped as it starts.
    """
    with _lock:
        entry = _flags.get(key)
        if entry is None:
            now = time.monotonic()
            _early[key] = now
            for old in [k for k, t in _early.items() if now - t > 3600]:
                del _early[old]
            return False
    entry[1].set()
    return True


def sweep_run(run_id: str, dask_worker: Any = None) -> int:
    """Stop every job of *run_id* on this worker, kill its agents' processes, and wait (at
    most :data:`SWEEP_WAIT_S`) for the jobs to end: a resumed run asks before its first task,
    so that none of its dispatches meets a dead run's job of the same task. How many
    processes were killed."""
    with _lock:
        flags = [flag for run, flag in _flags.values() if run == run_id]
    for flag in flags:
        flag.set()
    killed = kill_tagged(f"{run_id}/", prefix=True)
    deadline = time.monotonic() + SWEEP_WAIT_S
    while time.monotonic() < deadline:
        with _lock:
            if not any(run == run_id for run, _ in _flags.values()):
                break
        time.sleep(0.05)
    return killed


def worker_facts(programs: list[str], dask_worker: Any = None) -> dict[str, Any]:
    """What the coordinator checks of a worker before the run: its orchestrator version,
    whether it has git, and which of *programs* it finds on its PATH."""
    return {
        "version": __version__,
        "git": shutil.which("git"),
        "missing": [name for name in programs if shutil.which(name) is None],
    }


try:
    from distributed import WorkerPlugin
except ImportError:  # pragma: no cover (the dask extra is not installed: nothing runs here)
    WorkerPlugin = object  # type: ignore[assignment,misc]


class JobWatch(WorkerPlugin):
    """Stops a running job when the scheduler lets go of it (its coordinator is gone)."""

    name = "worktree-orchestrator"

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if start == "executing" and finish not in ("memory", "error"):
            with _lock:
                entry = _flags.get(str(key))
            if entry is not None:
                entry[1].set()


# -- one job ----------------------------------------------------------------------------


def run_job(job: RemoteJob) -> bytes:
    """Run *job* in this Dask worker and say what came of it, encoded (the function Dask
    runs)."""
    from distributed import get_worker

    worker = get_worker()
    home = Path(worker.local_directory) / HOME_NAME
    flag = threading.Event()
    with _lock:
        if _early.pop(job.key, None) is not None:
            flag.set()
        _flags[job.key] = (job.run_id, flag)

    def tell(number: int, event: Event) -> None:
        if job.events_topic is not None:
            payload = {
                "key": job.key,
                "n": number,
                "event": _EVENTS.dump_python(event, mode="json"),
            }
            with contextlib.suppress(Exception):  # a live event is a nicety: the end has all
                worker.log_event(job.events_topic, payload)

    try:
        outcome = anyio.run(_run, job, home, flag, worker.address, tell)
    finally:
        with _lock:
            _flags.pop(job.key, None)
    return encode_outcome(outcome)


async def _run(
    job: RemoteJob, home: Path, flag: threading.Event, address: str, tell: Any = None
) -> RemoteOutcome:
    if job.version != __version__:
        raise RuntimeError(
            f"this worker runs worktree-orchestrator {__version__}, the coordinator {job.version}"
        )
    state = home / "state"
    mirror = await _mirror(home, job.repo_key)
    try:
        return await _run_in(job, home, state, mirror, flag, address, tell)
    finally:
        mirror.lock.close()
        _let_go(mirror)


async def _run_in(
    job: RemoteJob,
    home: Path,
    state: Path,
    mirror: Repository,
    flag: threading.Event,
    address: str,
    tell: Any = None,
) -> RemoteOutcome:
    if job.start_commit is not None and not await _has_start(mirror, job, flag):
        return _stopped_or_missing("commit", flag, address)
    plan_dir = state / "plans" / job.run_id
    copy_root = state / "copies" / job.run_id
    if not await _has_files(job, plan_dir, copy_root, flag):
        return _stopped_or_missing("files", flag, address)
    if job.start_commit is not None and job.clear_branch:
        # An earlier dispatch of this task here (a run resumed after its coordinator died,
        # say, whose jobs were stopped first) left its branch: this dispatch starts afresh.
        branch = f"refs/heads/orchestrator/{job.run_id}/{ref_safe(job.envelope.task_id)}"
        await mirror.git.run("update-ref", "-d", branch, check=False)
    run_dir = state / "runs" / job.run_id / job.key
    for name in RUN_SUBDIRS:
        await anyio.Path(run_dir / name).mkdir(parents=True, exist_ok=True)
    events: list[Event] = []
    told = 0

    def on_event(event: Event) -> None:
        nonlocal told
        events.append(event)
        if tell is not None and live(event):
            tell(told, event)
            told += 1

    ctx = await _context(job, mirror, state, run_dir, plan_dir, copy_root, on_event)
    try:
        result = await _run_task(job, ctx, flag, address)
        bundle = await _result_bundle(mirror, job, result, run_dir)
        files = await anyio.to_thread.run_sync(_returned_files, run_dir)
    finally:
        ctx.close()
        await anyio.to_thread.run_sync(shutil.rmtree, run_dir, True)
    return RemoteOutcome(result=result, worker=address, bundle=bundle, files=files, events=events)


def live(event: Event) -> bool:
    """Whether *event* is told as it happens (the coordinator tells a task's start and end
    itself)."""
    return not isinstance(event, TaskStarted | TaskFinished)


def _stopped_or_missing(what: str, flag: threading.Event, address: str) -> RemoteOutcome:
    """A job that ended before its task started: stopped (nothing ran), or lacking *what*."""
    if flag.is_set():
        return RemoteOutcome(stopped=True, worker=address)
    return RemoteOutcome(missing=what, worker=address)


def _returned_files(run_dir: Path) -> Files:
    """The task's envelope, logs and outputs, as the coordinator may take them: small files
    first, up to :data:`RETURNED_BYTES` in all (past it, the largest logs stay behind and
    ``verify`` names them; the result and its commit still go back)."""
    sizes = []
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir).as_posix()
        if RETURNED_FILE.fullmatch(relative) and path.is_file() and not path.is_symlink():
            sizes.append((path.stat().st_size, relative))
    chosen: list[str] = []
    total = 0
    for size, relative in sorted(sizes):
        if total + size > RETURNED_BYTES or len(chosen) >= MAX_SHIPPED_FILES:
            break
        chosen.append(relative)
        total += size
    return pack_files(run_dir, chosen)


async def _run_task(
    job: RemoteJob, ctx: RunContext, flag: threading.Event, address: str
) -> TaskResult:
    """The task's lifecycle, cancelled when *flag* is set; its result, whatever came of it."""
    task_id = job.envelope.task_id

    async def watch(scope: anyio.CancelScope) -> None:
        # A thread's flag (set from the worker's own loop): looked at, not awaited.
        while not flag.is_set():  # noqa: ASYNC110
            await anyio.sleep(CANCEL_POLL_S)
        scope.cancel()

    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, outer)
            try:
                await run_subagent(
                    job.envelope, job.agent, ctx, earlier=job.earlier, worker=address
                )
            finally:
                tg.cancel_scope.cancel()
    return ctx.results[task_id]


async def _context(
    job: RemoteJob,
    mirror: Repository,
    state: Path,
    run_dir: Path,
    plan_dir: Path,
    copy_root: Path,
    on_event: Any,
) -> RunContext:
    settings = job.settings
    backend = settings.backend()
    ctx = RunContext(
        run_id=job.run_id,
        run_dir=run_dir,
        repo=mirror if job.start_commit is not None else None,
        base_ref=None,
        base_commit=job.start_commit,
        base_tree=job.start_tree,
        plan_dir=plan_dir,
        settings=settings,
        venv_backend=backend,
        on_event=on_event,
        home=state,
        copy_root=copy_root,
        lifeline=_lifeline_of(job.run_id),
        port_slots=PortSlots(1, only=job.slot),
    )
    if job.queued_at is not None:
        ctx.queued_at[job.envelope.task_id] = job.queued_at
    if job.pool_size > 0:
        if ctx.repo is not None:
            ctx.pool = WorktreePool(mirror, job.pool_size)
        ctx.venv_pool = VenvPool(state, backend, job.pool_size)
    if ctx.repo is not None:
        mirror.git.use_identity(job.identity)
    return ctx


async def _mirror(home: Path, repo_key: str) -> Repository:
    """The worker's mirror of the coordinator's repository *repo_key* (made on first use),
    guarded from the first time this process opens it."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", repo_key):
        raise ValueError(f"not a repository key: {repo_key!r}")
    path = home / "mirrors" / f"{repo_key}.git"
    if not (path / "HEAD").exists():
        await anyio.to_thread.run_sync(_with_mirror_lock, _init_mirror, path)
    if path not in _guards:  # first use in this process: is it the bare mirror it should be?
        opened = await Repository.open(path, state_dir=home / "state")
        opened.lock.close()
        if not opened.bare or opened.common_dir.resolve() != path.resolve():
            raise RuntimeError(f"{path} is not the bare mirror it should be")
        guard = await anyio.to_thread.run_sync(RepoGuard.snapshot, opened.common_dir)
        _guards.setdefault(path, guard)
    mirror = Repository(  # known to be a bare repository: opened without asking git
        root=path,
        common_dir=path,
        bare=True,
        state_dir=home / "state",
        git=Git(path),
        lock=RepoLock(path / "orchestrator" / "metadata.mutex"),
    )
    # One guard per mirror in this process: jobs side by side would otherwise each take the
    # others' agents' changes for the mirror's own, and fight over putting them back. Taken
    # again whenever no job of the mirror runs, so that the worker's own later changes to
    # its git config stand.
    guard = _guards[path]
    with _lock:
        first = _running.get(path, 0) == 0
        _running[path] = _running.get(path, 0) + 1
    if first:
        await anyio.to_thread.run_sync(guard.record)
    mirror.git.guard = guard
    return mirror


def _let_go(mirror: Repository) -> None:
    """A job of *mirror* ended (see :func:`_mirror`)."""
    with _lock:
        _running[mirror.common_dir] = max(0, _running.get(mirror.common_dir, 1) - 1)


def _with_mirror_lock(fn: Any, *args: Any) -> Any:
    with _mirror_lock:
        return fn(*args)


def _init_mirror(path: Path) -> None:
    import subprocess

    if (path / "HEAD").exists():
        return
    # A mirror made again (its directory was removed): nothing known of the old one holds.
    _guards.pop(path, None)
    for known in [k for k in _present if k[0] == path]:
        _present.discard(known)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="mirror-", dir=path.parent))
    subprocess.run(
        ["git", "init", "--quiet", "--bare", str(scratch)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    scratch.rename(path)


async def _has_start(mirror: Repository, job: RemoteJob, flag: threading.Event) -> bool:
    """Whether the mirror has the job's start commit, once its bundle (if it brings one) is
    in; waits a while for what is on its way with another task to this worker (the base,
    which this job's bundle then builds on)."""
    commit = job.start_commit
    assert commit is not None
    if (mirror.common_dir, commit) in _present:
        return True  # a commit, once here, stays (its ref keeps it)
    with tempfile.TemporaryDirectory(dir=mirror.root) as scratch:
        bundle = Path(scratch, "start.bundle")
        if job.bundle is not None:
            await anyio.Path(bundle).write_bytes(job.bundle)
        waited = 0.0  # only waiting counts: not the time another job holds the lock
        while True:
            await anyio.to_thread.run_sync(_mirror_lock.acquire)
            try:
                if await _holds(mirror, commit):
                    _present.add((mirror.common_dir, commit))
                    return True
                if job.bundle is not None:
                    with contextlib.suppress(GitError):  # what it builds on is not here yet
                        await unbundle(mirror, bundle, commit, f"refs/orchestrator/have/{commit}")
                        _present.add((mirror.common_dir, commit))
                        return True
            finally:
                _mirror_lock.release()
            if waited > MIRROR_WAIT_S or flag.is_set():
                return False
            await anyio.sleep(0.2)
            waited += 0.2


async def _holds(mirror: Repository, commit: str) -> bool:
    return await mirror.git.ok("cat-file", "-e", f"{commit}^{{commit}}")


async def _has_files(
    job: RemoteJob, plan_dir: Path, copy_root: Path, flag: threading.Event
) -> bool:
    """Whether the plan's files the job needs, and the plan's copies, are here once what it
    brings is unpacked; waits a while for those on their way with another task."""
    await anyio.to_thread.run_sync(_receive_files, job, plan_dir, copy_root)
    waited = 0.0
    while not await anyio.to_thread.run_sync(
        _with_mirror_lock, _files_here, job, plan_dir, copy_root
    ):
        if waited > MIRROR_WAIT_S or flag.is_set():
            return False
        await anyio.sleep(0.1)
        waited += 0.1
    return True


def _receive_files(job: RemoteJob, plan_dir: Path, copy_root: Path) -> None:
    with _mirror_lock:
        if job.plan_files:
            unpack_files(plan_dir, job.plan_files)
        plan_dir.mkdir(parents=True, exist_ok=True)
        if job.copies is not None:
            unpack_files(copy_root, job.copies)
            (copy_root / COPIES_MARK).touch()
        copy_root.mkdir(parents=True, exist_ok=True)


def _files_here(job: RemoteJob, plan_dir: Path, copy_root: Path) -> bool:
    if job.copies_needed and not (copy_root / COPIES_MARK).exists():
        return False
    return all((plan_dir / p).exists() for p in job.plan_needs)


async def _result_bundle(
    mirror: Repository, job: RemoteJob, result: TaskResult, run_dir: Path
) -> bytes | None:
    """A bundle of the task's branch less the start commit's history, when it has a result
    commit of its own."""
    commit = result.provenance.result_commit
    if commit is None or commit == job.start_commit or result.branch is None:
        return None
    path = run_dir / "result.bundle"
    exclude = [f"^{job.start_commit}"] if job.start_commit else []
    await mirror.git.run(
        "bundle", "create", "--quiet", str(path), f"refs/heads/{result.branch}", *exclude
    )
    data = await anyio.Path(path).read_bytes()
    await anyio.Path(path).unlink()
    return data


def task_key(run_id: str, task_id: str, dispatch: str) -> str:
    """The Dask key of *task_id*'s dispatch *dispatch* (session and number) in *run_id*."""
    return f"wo-{run_id}-{ref_safe(task_id)}-{dispatch}"
