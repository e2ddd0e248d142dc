"""One subagent: worktree, venv, agent attempts, commit, clean-up, and its TaskResult.

Every failure of the task itself becomes a status and an ErrorInfo on the result; only the
orchestrator's own bugs escape as exceptions. This module is the one place where that
conversion happens.

The lifecycle does not know which kind of agent it runs: it asks the
:class:`~orchestrator.agents.Agent` for one attempt at a time (an
:class:`~orchestrator.attempt.AttemptRequest` in, an
:class:`~orchestrator.attempt.AttemptOutcome` out) and for the few traits that change what
it does around one (see orchestrator/agents.py). The commit step is orchestrator/harvest.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import anyio

from envelopes import (
    NOT_RETRIED,
    Attempt,
    AttemptFailed,
    CheckResult,
    CopiedFile,
    Environment,
    ErrorInfo,
    HandoffEnvelope,
    InputFile,
    LogFile,
    Metrics,
    PhaseSpan,
    Provenance,
    TaskFinished,
    TaskPhase,
    TaskResult,
    TaskRetrying,
    TaskStarted,
    TaskStatus,
    Timings,
    Usage,
    add_usage,
    canonical_json,
    digest,
    fill_placeholders,
    ref_safe,
    sealed_result_line,
    sha256_hex,
    with_estimated_cost,
)

from ._fs import remove_tree, replace_file, write_file
from .agents import Agent
from .attempt import MAX_OUTPUT_BYTES, AttemptOutcome, AttemptRequest, log_entries
from .context import RunContext
from .errors import EventHandlerFailed, GitError, RunDirError, VenvError
from .harvest import Harvest, harvest
from .inputs import plan_inputs, program_input
from .journal import ENVELOPES
from .prompts import Feedback
from .repo import Repository
from .retry import retry_attempts
from .secrets import Masker
from .sparse import agent_git_config
from .steps import Phase, StepRun, failure_of, run_steps
from .venv import Venv, describe_environment, install_project, setup_virtualenv
from .workspace import HookName, copy_into, run_hook, slot_env
from .worktree import (
    Worktree,
    create_worktree,
    delete_if_unused,
    remove_worktree,
    reset_worktree,
    untracked_paths,
)

__all__ = [
    "MAX_OUTPUT_BYTES",
    "finished_event",
    "journal_result",
    "not_started_result",
    "run_subagent",
]


class _TaskFailed(Exception):
    """Setup of a task failed; carries the error for the result."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def _now() -> datetime:
    return datetime.now(UTC)


class _Files:
    """The task's files in the run directory: its envelope, each attempt's output and logs.

    Flat: one file per attempt in the run's ``logs/`` and ``outputs/`` (made once per run),
    so that a task makes no directory of its own.
    """

    def __init__(self, run_dir: Path, task_id: str) -> None:
        name = ref_safe(task_id)
        self.envelope = run_dir / "envelopes" / f"{name}.json"
        self._logs = run_dir / "logs" / name
        self._outputs = run_dir / "outputs" / name

    def output(self, number: int) -> Path:
        return self._outputs.with_name(f"{self._outputs.name}.attempt-{number}.json")

    def log(self, number: int, stream: str) -> Path:
        return self._logs.with_name(f"{self._logs.name}.attempt-{number}.{stream}")

    @property
    def log_stem(self) -> Path:
        """What the task's log files are named from (``logs/<task>``)."""
        return self._logs


class _Clock:
    """When the task was queued and started, and each stretch of each of its phases."""

    def __init__(self, queued_at: datetime | None = None) -> None:
        self.queued_at = queued_at
        self.started_at = _now()
        self.start = time.monotonic()
        self.spans: list[PhaseSpan] = []
        #: The slot the task ran in (set when it takes one).
        self.slot: int | None = None

    def add(self, phase: str, start: float) -> None:
        """*phase* (a ``Timings`` field: ``agent_s``) ran from *start* (monotonic) to now."""
        end = time.monotonic()
        self.spans.append(
            PhaseSpan(
                name=phase.removesuffix("_s"),  # type: ignore[arg-type]
                start_s=round(max(start - self.start, 0.0), 6),
                end_s=round(max(end - self.start, 0.0), 6),
            )
        )

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.add(phase, start)

    def timings(self) -> Timings:
        # Each total is the sum of its rounded stretches, so that the report adds up exactly.
        totals: dict[str, float] = {}
        for span in self.spans:
            name = f"{span.name}_s"
            totals[name] = totals.get(name, 0.0) + span.end_s - span.start_s
        return Timings(
            started_at=self.started_at,
            finished_at=_now(),
            duration_s=round(time.monotonic() - self.start, 6),
            queued_at=self.queued_at,
            slot=self.slot,
            # In the order they started (a span is recorded when it ends, and a hook's may end
            # inside the phase it runs in).
            phases=sorted(self.spans, key=lambda span: span.start_s),
            **{k: round(v, 6) for k, v in totals.items()},
        )


class _Place:
    """Where a task works: its worktree and venv, made, described, and removed or kept."""

    def __init__(self, envelope: HandoffEnvelope, ctx: RunContext, clock: _Clock) -> None:
        self.envelope = envelope
        self.ctx = ctx
        self.clock = clock
        self.task_id = envelope.task_id
        self.worktree: Worktree | None = None
        self.venv: Venv | None = None
        #: The venv as the agent left it (described after the attempts).
        self.environment: Environment | None = None
        #: The commands that made the venv, for the provenance.
        self.commands: list[list[str]] = []
        self.kept_worktree: Path | None = None
        self.branch_deleted = False
        #: Runs one of the plan's hooks for the task (its _Subagent's ``place_hook``): the
        #: task's error when a required one failed.
        self.run_hook: Callable[[HookName], Awaitable[ErrorInfo | None]] = _no_hook
        #: The plan's ``copy`` files as they were last put into the worktree.
        self.copied: list[CopiedFile] = []

    @property
    def sparse(self) -> tuple[str, ...] | None:
        """The directories the task's worktree holds (None: all of them)."""
        sparse = self.envelope.sparse
        return tuple(sparse) if sparse is not None else None

    async def make(self) -> None:
        """Create the worktree (from the pool when it has one) and the venv the task asks for,
        and install the task's own project into it (``install_project``).

        _TaskFailed (kinds ``worktree``, ``install``) when either cannot be made.
        """
        ctx = self.ctx
        base_commit, base_tree = ctx.start_of(self.task_id)
        if self.envelope.worktree and ctx.repo is not None and base_commit is not None:
            await self._make_worktree(ctx.repo, base_commit, base_tree)
            await self.ready()
        if self.envelope.venv:
            await self._make_venv()
        if self.envelope.install_project:
            await self.install_project()

    async def ready(self) -> None:
        """Make the worktree ready for the task: the plan's ``copy`` files put in, then its
        ``after_create`` hook run. Done for a new worktree, a borrowed one and one cleaned for
        a retry alike: each starts clean (orchestrator/workspace.py).

        _TaskFailed (kind ``worktree`` when a file cannot be copied, ``hook`` when the hook
        fails).
        """
        ctx, worktree = self.ctx, self.worktree
        if worktree is None or ctx.repo is None:
            return
        if ctx.settings.copy_paths:
            with self.clock.timed("worktree_s"):
                try:
                    self.copied = await anyio.to_thread.run_sync(
                        copy_into,
                        ctx.copy_root or ctx.repo.root,
                        worktree.path,
                        ctx.settings.copy_paths,
                    )
                except OSError as exc:
                    message = f"copying the plan's copy files: {exc}"
                    raise _TaskFailed(ErrorInfo(kind="worktree", message=message)) from exc
        if (error := await self.run_hook("after_create")) is not None:
            raise _TaskFailed(error)

    async def _make_worktree(
        self, repo: Repository, base_commit: str, base_tree: str | None
    ) -> None:
        ctx = self.ctx
        branch = ctx.branch(self.task_id)
        with self.clock.timed("worktree_s"):
            try:
                sparse = self.sparse
                if ctx.pool is not None:
                    self.worktree = await ctx.pool.borrow(
                        branch, base_commit, base_tree, sparse
                    ) or await ctx.pool.create(branch, base_commit, base_tree, sparse)
                if self.worktree is None:
                    self.worktree = await create_worktree(
                        repo, branch, ctx.worktree_path(self.task_id), base_commit, sparse
                    )
            except GitError as exc:
                raise _TaskFailed(ErrorInfo(kind="worktree", message=str(exc))) from exc
        if ctx.journal is not None:
            # Where the branch started: a resume after a crash tells the agent's own
            # commits (kept) from a branch with nothing on it (deleted).
            await ctx.journal.write(
                {
                    "type": "worktree",
                    "task": self.task_id,
                    "branch": self.worktree.branch,
                    "base_commit": self.worktree.base_commit,
                    "path": str(self.worktree.path),
                }
            )

    async def _make_venv(self) -> None:
        ctx, written, seed = self.ctx, self.envelope.requirements, self.envelope.venv_seed
        values = self.placeholders()
        requirements = [_filled(r, values) for r in written]
        with self.clock.timed("venv_s"):
            try:
                # A requirement naming this task's worktree (or id) makes the venv this
                # task's own: it is never pooled.
                if ctx.venv_pool is not None and requirements == written:
                    self.venv = await ctx.venv_pool.acquire(
                        requirements,
                        cwd=ctx.plan_dir,
                        fallback=ctx.venv_path(self.task_id),
                        seed=seed,
                    )
                else:
                    async with self._tidied(any("{worktree}" in r for r in written)):
                        self.venv = await setup_virtualenv(
                            ctx.venv_path(self.task_id),
                            requirements,
                            backend=ctx.venv_backend,
                            cwd=ctx.plan_dir,
                            seed=seed,
                        )
                self.commands.extend(self.venv.commands)
            except VenvError as exc:
                self.commands.extend(exc.commands)
                raise _TaskFailed(ErrorInfo(kind="install", message=str(exc))) from exc

    async def install_project(self) -> None:
        """Install the task's own tree (its worktree, else where its agent works) into its
        venv, editable, so that the agent imports the code it changes.

        Done for every task that asks, into a pooled venv too: the borrowed venv's previous
        project (another worktree's, removed by the pool's sync) is not reused. Telling when
        it could be (the same slot path, the same metadata and dependencies at this commit)
        would save one editable build: 0.5 s with an in-tree backend, 1.2 to 2 s with
        setuptools or hatchling, measured with uv 0.13 (uv rebuilds an editable every time).

        _TaskFailed (kind ``install``) when the task has no venv or the install fails.
        """
        ctx, venv = self.ctx, self.venv
        if venv is None:
            message = "install_project needs the task's venv, and this task has venv: false"
            raise _TaskFailed(ErrorInfo(kind="install", message=message))
        with self.clock.timed("venv_s"):
            try:
                async with self._tidied(True):
                    commands = await install_project(venv, self.cwd, backend=ctx.venv_backend)
                self.commands.extend(commands)
            except VenvError as exc:
                self.commands.extend(exc.commands)
                raise _TaskFailed(ErrorInfo(kind="install", message=str(exc))) from exc

    @contextlib.asynccontextmanager
    async def _tidied(self, into_worktree: bool) -> AsyncIterator[None]:
        """Remove, after an install *into_worktree*, what the installer wrote there that a
        commit would take (setuptools' ``*.egg-info``): the result commit holds the agent's
        work, not build metadata, which the installed project does not need (a retry's clean
        worktree has none either). Ignored files (a built extension module) stay."""
        worktree, repo = self.worktree, self.ctx.repo
        if not into_worktree or worktree is None or repo is None:
            yield
            return
        before = await untracked_paths(repo, worktree)
        yield
        made = await untracked_paths(repo, worktree) - before
        await anyio.to_thread.run_sync(_remove_files, worktree.path, made)

    def placeholders(self) -> dict[str, str]:
        """What ``{worktree}``, ``{repo_root}``, ``{plan_dir}`` and ``{task_id}`` stand for."""
        ctx, cwd = self.ctx, self.cwd
        return {
            "worktree": str(cwd),
            "repo_root": str(ctx.repo.root if ctx.repo is not None else cwd),
            "plan_dir": str(ctx.plan_dir),
            "task_id": self.task_id,
        }

    @property
    def cwd(self) -> Path:
        """Where the agent works: the worktree, else the repository, else the run directory."""
        if self.worktree is not None:
            return self.worktree.path
        return self.ctx.repo.root if self.ctx.repo is not None else self.ctx.run_dir

    async def describe(self, status: TaskStatus) -> bool:
        """Describe the venv and decide what the clean-up keeps; whether it keeps the worktree."""
        ctx = self.ctx
        if self.venv is not None:
            # Described after the agent ran, so that what it installed itself is on record.
            with contextlib.suppress(OSError):
                self.environment = await anyio.to_thread.run_sync(describe_environment, self.venv)
        policy = ctx.settings.keep_worktrees
        keep = policy == "always" or (policy == "failed" and status in ("failed", "timed_out"))
        if keep and self.worktree is not None:
            if ctx.pool is not None and ctx.pool.owns(self.worktree):
                # Out of the pool, to where a fresh worktree would be: nobody resets it.
                self.worktree = await ctx.pool.keep(self.worktree, ctx.worktree_path(self.task_id))
            self.kept_worktree = self.worktree.path
        return keep

    async def cleanup(self, status: TaskStatus, *, keep: bool, committed: bool) -> None:
        """Remove the worktree and venv unless *keep*; the branch stays unless the task was
        cancelled before anything was *committed*."""
        with self.clock.timed("cleanup_s"):
            if not keep:
                if self.worktree is not None:
                    await self.run_hook("before_remove")  # its failure is recorded, ignored
                keep = await self._remove_worktree(
                    delete_branch=status == "cancelled" and not committed
                )
            await self._remove_venv(kept=self.worktree is not None and keep)

    async def _remove_worktree(self, *, delete_branch: bool) -> bool:
        """Remove the worktree; whether it stays (it could not be removed)."""
        ctx, worktree = self.ctx, self.worktree
        if worktree is None or ctx.repo is None:
            return False
        try:
            if ctx.pool is not None and ctx.pool.owns(worktree):
                await ctx.pool.give_back(worktree)
                if delete_branch:
                    self.branch_deleted = await delete_if_unused(ctx.repo, worktree)
            else:
                self.branch_deleted = await remove_worktree(
                    ctx.repo, worktree, delete_branch=delete_branch
                )
        except (GitError, OSError):
            self.kept_worktree = worktree.path  # the report names it as kept
            return True
        return False

    async def _remove_venv(self, *, kept: bool) -> None:
        """Give the venv back to its pool, keep it with its worktree, or delete it."""
        venv, venv_pool = self.venv, self.ctx.venv_pool
        if venv is None:
            return
        if venv_pool is not None and venv_pool.owns(venv):
            if kept:
                venv_pool.keep(venv)
            elif self.envelope.sandbox != "none":
                await venv_pool.discard(venv)  # written by an untrusted agent
            else:
                venv_pool.give_back(venv)
        elif not kept:
            await anyio.to_thread.run_sync(remove_tree, venv.path, True)


async def _no_hook(name: HookName) -> ErrorInfo | None:
    return None


def _filled(text: str, values: dict[str, str]) -> str:
    """*text* with each ``{name}`` of *values* replaced by its value."""
    return fill_placeholders(text, values)


def _remove_files(root: Path, paths: set[str]) -> None:
    """Remove *paths* (files under *root*), then the directories that held only them."""
    parents: set[Path] = set()
    for name in paths:
        path = root / name
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        parents.update(p for p in path.parents if p.is_relative_to(root) and p != root)
    for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: something else is in it
            directory.rmdir()


@dataclass
class _History:
    """What the task's attempts did, for its result."""

    attempts: list[Attempt] = field(default_factory=list)
    last: AttemptOutcome | None = None
    #: The commands the agent ran, for the provenance.
    commands: list[list[str]] = field(default_factory=list)
    #: What the agent's last program resolved to, if it ran one.
    program: str | None = None
    #: The task's secret values (set once its agent's environment is known).
    masker: Masker = field(default_factory=Masker)
    #: Every setup step and check that ran, in order.
    checks: list[CheckResult] = field(default_factory=list)
    #: The required step that failed last, with the end of its output.
    failed_step: StepRun | None = None
    #: Every hook of the plan that ran, in order.
    hooks: list[CheckResult] = field(default_factory=list)

    def record_command(self, argv: Sequence[str], program: str | None) -> None:
        self.commands.append(list(argv))
        if program is not None:
            self.program = program


class _Subagent:
    """One task while it runs; :meth:`result` turns it into a TaskResult."""

    def __init__(
        self,
        envelope: HandoffEnvelope,
        agent: Agent,
        ctx: RunContext,
        *,
        earlier: Sequence[Attempt] = (),
        worker: str | None = None,
    ) -> None:
        self.envelope = envelope
        self.agent = agent
        self.ctx = ctx
        self.task_id = envelope.task_id
        self.clock = _Clock(ctx.queued_at.get(envelope.task_id))
        self.files = _Files(ctx.run_dir, self.task_id)
        self.envelope_bytes = canonical_json(envelope.to_json_dict())  # secrets masked
        self.envelope_sha256 = sha256_hex(self.envelope_bytes)
        self.envelope_entry: LogFile | None = None
        self.place = _Place(envelope, ctx, self.clock)
        self.place.run_hook = self.place_hook
        self.history = _History(attempts=list(earlier))
        #: Attempts made before this run of the task (elsewhere: on a worker that was lost),
        #: which this run's attempts are numbered after.
        self.earlier = len(earlier)
        #: The Dask worker running it, named on each of its attempts (None: this machine).
        self.worker = worker
        self.harvest = Harvest()
        #: The task's slot among the running ones (``ORCHESTRATOR_SLOT``), while it runs.
        self.slot: int | None = None
        #: What it ran from: the plan's files its commands name, its agent's program.
        self.inputs: list[InputFile] = []

    async def run(self) -> tuple[TaskStatus, ErrorInfo | None]:
        """Prepare, run the attempts (with retries), commit: the status and error they give."""
        ctx, envelope = self.ctx, self.envelope
        if ctx.journal is not None and (envelope.worktree or envelope.venv):
            await ctx.journal.sync()  # "running" is on disk before anything is made for it
        self.slot = self.clock.slot = await ctx.slots.take()
        await self.prepare()
        self.inputs = await plan_inputs(ctx, envelope, self.agent)

        earlier = self.earlier

        async def before_retry(number: int, wait: float) -> None:
            ctx.move(self.task_id, "retrying")
            await ctx.emit(
                TaskRetrying(
                    run_id=ctx.run_id, task_id=self.task_id, attempt=number + earlier, wait_s=wait
                )
            )

        async def attempt(number: int) -> AttemptOutcome:
            return await self.attempt(number + earlier)

        outcome = await retry_attempts(
            attempt,
            retries=envelope.retries,
            should_retry=_worth_retrying,
            before_retry=before_retry,
            initial=ctx.settings.backoff[0],
            maximum=ctx.settings.backoff[1],
        )
        if outcome.status == "succeeded" and envelope.checks:
            outcome = await self.check_and_repair(outcome)
        status, error = outcome.status, outcome.error
        self.harvest = await self.commit()
        if self.harvest.error is not None:
            status, error = "failed", self.harvest.error
        if self.harvest.refused is not None:
            # What the commit step refused fails the task, whatever the agent's outcome.
            status, error = "failed", self.harvest.refused
        return status, error

    async def prepare(self) -> None:
        """Write the envelope, create the worktree and the venv."""
        await self._write_envelope()
        await self.place.make()

    async def _write_envelope(self) -> None:
        data, path, envelope = self.envelope_bytes, self.files.envelope, self.envelope
        records = self.ctx.envelope_records
        if self.record_only:
            assert records is not None
            offset = records.append(data)
            self.envelope_entry = LogFile(
                path=ENVELOPES, sha256=self.envelope_sha256, size=len(data), offset=offset
            )
            return
        if envelope.worktree or envelope.venv or not self.agent.in_process:
            await anyio.to_thread.run_sync(write_file, path, data)
        else:
            # A task with nothing else to make writes its envelope (a few hundred bytes) in
            # the event loop: cheaper than a thread hop, and than a writer thread, which
            # would wait for the GIL after every system call (see docs/benchmarks.md).
            write_file(path, data)
        self.envelope_entry = LogFile(
            path=path.relative_to(self.ctx.run_dir).as_posix(),
            sha256=self.envelope_sha256,
            size=len(data),
        )

    @property
    def record_only(self) -> bool:
        """The task needs no envelope file of its own: nothing is made for it, and its kind
        of agent says it reads no envelope file (``envelope_record``: the callable and http
        kinds; a kind that does not say so gets its file), nor do setup steps or checks. Its
        envelope is a record of the run's envelopes.jsonl; the file is written only if the
        agent asks for it (see Workspace)."""
        envelope = self.envelope
        return (
            self.ctx.envelope_records is not None
            and getattr(self.agent, "envelope_record", False) is True
            and not (envelope.worktree or envelope.venv or envelope.setup or envelope.checks)
        )

    def _envelope_file(self) -> None:
        """Write the envelope's own file, for an agent that asked for it: whole or not at all
        (a new file renamed into place), a few hundred bytes."""
        try:
            replace_file(self.files.envelope, self.envelope_bytes)
        except OSError as exc:
            raise RunDirError(f"cannot write {self.files.envelope}: {exc.strerror or exc}") from exc

    def _env(self, output_path: Path) -> dict[str, str]:
        from .isolation import agent_environment

        if self.envelope.sandbox != "none" and self.agent.in_process:
            message = f"agent {self.envelope.agent!r} runs in this process: it cannot be sandboxed"
            raise _TaskFailed(ErrorInfo(kind="spawn", message=message))
        env = agent_environment(self.ctx.base_env, self.envelope)
        env.update(self.agent.env)
        env.update(self.envelope.env)
        venv = self.place.venv
        if venv is not None:
            env["VIRTUAL_ENV"] = str(venv.path)
            env["PATH"] = str(venv.bin_dir) + os.pathsep + env.get("PATH", "")
            env.pop("PYTHONHOME", None)
        env.update(
            ORCHESTRATOR_ENVELOPE=str(self.files.envelope),
            ORCHESTRATOR_OUTPUT=str(output_path),
            ORCHESTRATOR_TASK_ID=self.task_id,
            ORCHESTRATOR_RUN_ID=self.ctx.run_id,
        )
        env.update(slot_env(self.slot, self.ctx.settings.ports))
        if self.place.worktree is not None:
            # The agent's own git sees its worktree as sparse, as the orchestrator's does.
            env.update(agent_git_config(env, self.place.worktree.sparse))
        return env

    def _request(self, number: int, feedback: Feedback | None = None) -> AttemptRequest:
        """What attempt *number* is given (told *feedback*, else why the previous attempt
        failed); _TaskFailed when the task cannot have one."""
        ctx, place, files = self.ctx, self.place, self.files
        output_path = files.output(number)
        feedback = feedback or _feedback(self.history.last, number - 1)
        env = self._env(output_path)
        env["ORCHESTRATOR_ATTEMPT"] = str(number)
        if feedback is not None:
            env["ORCHESTRATOR_FEEDBACK"] = json.dumps(feedback.parts(), ensure_ascii=False)
        return AttemptRequest(
            envelope=self.envelope,
            attempt=number,
            run_id=ctx.run_id,
            cwd=place.cwd,
            worktree=place.worktree,
            venv=place.venv,
            env=env,
            envelope_path=files.envelope,
            output_path=output_path,
            stdout_path=files.log(number, "stdout"),
            stderr_path=files.log(number, "stderr"),
            run_dir=ctx.run_dir,
            state_dir=ctx.state_dir,
            plan_dir=ctx.plan_dir,
            repo=ctx.repo,
            kill_grace=ctx.settings.kill_grace,
            lifeline=ctx.lifeline,
            record_command=self.history.record_command,
            feedback=feedback,
            write_envelope=self._envelope_file if self.record_only else None,
        )

    async def attempt(self, number: int, *, repair: Feedback | None = None) -> AttemptOutcome:
        """Run the agent once and judge the outcome: from a clean worktree, after the setup
        steps; or, for a *repair* turn, in the worktree as the last turn left it, told why
        its checks failed."""
        ctx = self.ctx
        if number > self.earlier + 1 and repair is None:  # a retry: from a clean worktree
            ctx.move(self.task_id, "running")
            worktree = self.place.worktree
            if worktree is not None and ctx.repo is not None:
                if ctx.pool is not None and ctx.pool.owns(worktree):
                    await ctx.pool.reset(worktree, ctx.start_of(self.task_id)[1])
                else:
                    await reset_worktree(ctx.repo, worktree)
                await self.place.ready()  # the reset removed what copy and after_create made
                if self.envelope.install_project:
                    # ... and what the editable install built in the tree (an extension).
                    await self.place.install_project()
        request = self._request(number, repair)
        self.history.masker = Masker.for_env(request.env, self.envelope.secrets)
        started_at = _now()
        start = time.monotonic()
        failed = await self._hook("before_run", number)
        if failed is not None:
            outcome = AttemptOutcome("failed", error=failed)
            return await self._ended(number, outcome, started_at, start, repair=bool(repair))
        try:
            return await self._turn(number, request, repair, started_at, start)
        finally:
            # Whatever the turn came to (cancelled too): what before_run started is stopped.
            if self._has_hook("after_run"):
                with anyio.CancelScope(shield=True):
                    await self._hook("after_run", number)

    async def _turn(
        self,
        number: int,
        request: AttemptRequest,
        repair: Feedback | None,
        started_at: datetime,
        start: float,
    ) -> AttemptOutcome:
        """Attempt *number* once its before_run hook passed: its setup steps (unless it is a
        *repair* turn), then the agent; its outcome, recorded."""
        ctx, masker = self.ctx, self.history.masker
        if repair is None and self.envelope.setup:
            await self._phase("setup", number)
            failed = await self._steps("setup", number, request)
            if failed is not None:
                outcome = AttemptOutcome("failed", error=failed)
                return await self._ended(number, outcome, started_at, start)
        await self._phase("repair" if repair else "agent", number)
        try:
            outcome = await self.agent.run_attempt(request)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                cancelled = AttemptOutcome("cancelled", error=ctx.cancelled_error(self.task_id))
                await self._record(request, started_at, start, cancelled)
            raise
        finally:
            self.clock.add("agent_s", start)
        outcome = await self._guarded(outcome, started_at)
        outcome = await self._record(request, started_at, start, outcome, repair=bool(repair))
        if masker:
            # The output file stays in the run directory: masked like the logs.
            with contextlib.suppress(OSError):
                await anyio.to_thread.run_sync(masker.mask_file, request.output_path)
        if outcome.error is not None:
            await self._failed(number, outcome)
        return outcome

    async def _failed(self, number: int, outcome: AttemptOutcome) -> None:
        """Tell that attempt *number* failed (the ``AttemptFailed`` event)."""
        assert outcome.error is not None
        ctx = self.ctx
        await ctx.emit(
            AttemptFailed(
                run_id=ctx.run_id,
                task_id=self.task_id,
                attempt=number,
                status=outcome.status,
                error=outcome.error,
            )
        )

    async def _ended(
        self,
        number: int,
        outcome: AttemptOutcome,
        started_at: datetime,
        start: float,
        *,
        repair: bool = False,
    ) -> AttemptOutcome:
        """Record attempt (or *repair* turn) *number*, which ended before its agent ran (its
        before_run hook or a setup step failed)."""
        self.history.attempts.append(
            Attempt(
                number=number,
                status=outcome.status,
                started_at=started_at,
                finished_at=_now(),
                duration_s=round(time.monotonic() - start, 6),
                error=outcome.error,
                repair=repair or None,
            )
        )
        self.history.last = outcome
        await self._failed(number, outcome)
        return outcome

    async def _phase(self, phase: Literal["setup", "agent", "checks", "repair"], turn: int) -> None:
        """Tell that the task moved on to *phase* (only a task with setup steps or checks:
        others have one phase, the agent)."""
        envelope = self.envelope
        if not (envelope.setup or envelope.checks):
            return
        repairs = envelope.repair_attempts if envelope.checks else None
        repair = (
            sum(1 for a in self.history.attempts if a.repair) + 1 if phase == "repair" else None
        )
        await self.ctx.emit(
            TaskPhase(
                run_id=self.ctx.run_id,
                task_id=self.task_id,
                phase=phase,
                attempt=turn,
                repair=repair,
                repairs=repairs,
            )
        )

    def _has_hook(self, name: HookName) -> bool:
        """Whether the plan has a hook *name* that this task runs (it has a worktree)."""
        hooks = self.ctx.settings.hooks
        return (
            hooks is not None
            and getattr(hooks, name) is not None
            and self.place.worktree is not None
        )

    async def _hook(self, name: HookName, turn: int) -> ErrorInfo | None:
        """Run the plan's hook *name* for *turn*, when it has one and the task a worktree; the
        task's error (kind ``hook``) when it is required and failed, else None."""
        if not self._has_hook(name):
            return None
        hooks = self.ctx.settings.hooks
        assert hooks is not None
        request = self._request(turn)
        masker = Masker.for_env(request.env, self.envelope.secrets)
        if not self.history.masker:
            self.history.masker = masker  # before the first attempt: an error is masked too
        with self.clock.timed("hooks_s"):
            ran = await run_hook(
                hooks,
                name,
                turn=turn,
                request=request,
                values=self.place.placeholders(),
                masker=masker,
                log_stem=self.files.log_stem,
            )
        if ran is None:
            return None
        self.history.hooks.append(ran.record)
        return failure_of(ran) if ran.record.required and not ran.record.passed else None

    async def place_hook(self, name: HookName) -> ErrorInfo | None:
        """Run a hook of the worktree's own (``after_create``, ``before_remove``): the first
        for the attempt about to start, the second for the last one. A failing
        ``before_remove`` never stops the clean-up, whatever it is."""
        turns = len(self.history.attempts)
        if name != "before_remove":
            return await self._hook(name, turns + 1)
        with contextlib.suppress(_TaskFailed, OSError):
            await self._hook(name, max(turns, 1))
        return None

    def give_back_slot(self) -> None:
        """Let another task have this one's slot (once)."""
        if self.slot is not None:
            self.ctx.slots.give_back(self.slot)
            self.slot = None

    async def _steps(self, phase: Phase, turn: int, request: AttemptRequest) -> ErrorInfo | None:
        """Run the envelope's setup steps or checks for *turn*; the task's error when a
        required one failed (kind ``setup`` or ``check``), else None."""
        steps = self.envelope.setup if phase == "setup" else self.envelope.checks
        with self.clock.timed("checks_s" if phase == "check" else "setup_s"):
            runs = await run_steps(
                steps,
                phase,
                turn=turn,
                request=request,
                values=self.place.placeholders(),
                masker=self.history.masker,
                log_stem=self.files.log_stem,
            )
        self.history.checks.extend(run.record for run in runs)
        failed = next((r for r in runs if r.record.required and not r.record.passed), None)
        if failed is None:
            return None
        self.history.failed_step = failed
        return failure_of(failed)

    async def check_and_repair(self, outcome: AttemptOutcome) -> AttemptOutcome:
        """Run the checks on what the agent did; while a required one fails and repair turns
        are left, give the agent another turn in the same worktree, told why, and check
        again. The outcome of the last turn, failed (kind ``check``) if its checks did."""
        envelope = self.envelope
        turn = len(self.history.attempts)
        for repairs_left in range(envelope.repair_attempts, -1, -1):
            request = self._request(turn, None)
            await self._phase("checks", turn)
            failed = await self._steps("check", turn, request)
            if failed is None:
                return outcome
            outcome = dataclasses.replace(outcome, status="failed", output=None, error=failed)
            self.history.last = outcome
            await self._failed(turn, outcome)
            if not repairs_left:
                break
            step = self.history.failed_step
            assert step is not None
            feedback = Feedback.of_check(
                failed,
                attempt=turn,
                step=step.record.name,
                exit_code=step.record.exit_code,
                output_tail=step.tail,
            )
            turn += 1
            outcome = await self.attempt(turn, repair=feedback)
            if outcome.status != "succeeded":
                break
        return outcome

    async def _guarded(self, outcome: AttemptOutcome, started_at: datetime) -> AttemptOutcome:
        """*outcome*, failed if the repository's guard put back something changed meanwhile."""
        guard = self.ctx.repo.git.guard if self.ctx.repo is not None else None
        if guard is None or outcome.status == "cancelled":
            return outcome
        changes = await anyio.to_thread.run_sync(guard.blame, started_at.timestamp(), time.time())
        if not changes:
            return outcome
        names = sorted({str(c.path) for c in changes})
        message = (
            f"{', '.join(names)} {changes[0].what} while this task's agent ran, and was put back"
        )
        error = ErrorInfo(kind="tamper", message=message, paths=names)
        return dataclasses.replace(outcome, status="failed", output=None, error=error)

    async def _record(
        self,
        request: AttemptRequest,
        started_at: datetime,
        start: float,
        outcome: AttemptOutcome,
        *,
        repair: bool = False,
    ) -> AttemptOutcome:
        """Add the attempt to the log, its logs hashed and its secrets masked; *outcome* as
        recorded."""
        masker = self.history.masker
        stdout = stderr = None
        if self.agent.writes_logs:
            stdout, stderr, problem = await anyio.to_thread.run_sync(
                log_entries, request.stdout_path, request.stderr_path, request.run_dir, masker
            )
            if problem is not None and outcome.status != "cancelled":
                error = ErrorInfo(kind="tamper", message=f"the agent's {problem}")
                outcome = dataclasses.replace(outcome, status="failed", output=None, error=error)
            sizes = {"stdout_bytes": stdout.size, "stderr_bytes": stderr.size}
            outcome = dataclasses.replace(outcome, metrics=outcome.metrics.model_copy(update=sizes))
        if masker:
            # Before anything is written of it: the attempt log, events, journal, report.
            outcome = dataclasses.replace(
                outcome,
                error=self._masked(outcome.error) if outcome.error is not None else None,
                output=masker.value(outcome.output) if outcome.output is not None else None,
            )
        self.history.attempts.append(
            Attempt(
                number=request.attempt,
                status=outcome.status,
                started_at=started_at,
                finished_at=_now(),
                duration_s=round(time.monotonic() - start, 6),
                exit_code=outcome.exit_code,
                error=outcome.error,
                stdout=stdout,
                stderr=stderr,
                usage=with_estimated_cost(_usage(outcome), self.ctx.settings.pricing),
                repair=repair or None,
            )
        )
        self.history.last = outcome
        return outcome

    async def commit(self) -> Harvest:
        """Commit whatever the agent left in the worktree (see orchestrator/harvest.py)."""
        ctx, worktree = self.ctx, self.place.worktree
        _, base_tree = ctx.start_of(self.task_id)
        if worktree is None or ctx.repo is None or base_tree is None:
            return self.harvest
        with self.clock.timed("commit_s"):
            harvested = await harvest(
                ctx.repo,
                worktree,
                self.envelope,
                run_id=ctx.run_id,
                envelope_sha256=self.envelope_sha256,
                base_tree=base_tree,
                masker=self.history.masker,
                checks=self.history.checks,
                copied=self.place.copied,
            )
        if harvested.changed is not None:
            ctx.changed_files[self.task_id] = harvested.changed
        else:
            ctx.changed_files.pop(self.task_id, None)
        return harvested

    def _masked(self, error: ErrorInfo) -> ErrorInfo:
        masker = self.history.masker
        return error.model_copy(
            update={
                "message": masker.text(error.message),
                "paths": [masker.text(p) for p in error.paths],
            }
        )

    def result(self, status: TaskStatus, error: ErrorInfo | None) -> TaskResult:
        """The sealed TaskResult: what it says of the task's secrets masked (see secrets.py)."""
        last, place = self.history.last, self.place
        output = last.output if last is not None and status == "succeeded" else None
        if self.history.masker and error is not None:
            error = self._masked(error)
        branch = place.worktree.branch if place.worktree and not place.branch_deleted else None
        result = TaskResult(
            task_id=self.task_id,
            agent=self.envelope.agent,
            status=status,
            attempts=len(self.history.attempts),
            exit_code=last.exit_code if last else None,
            output=output,
            error=error,
            timings=self.clock.timings(),
            metrics=last.metrics if last else Metrics(),
            usage=_task_usage(self.history.attempts),
            branch=branch,
            worktree=str(place.kept_worktree) if place.kept_worktree else None,
            envelope=self.envelope_entry,
            attempt_log=self._attempt_log(),
            checks=self.history.checks,
            hooks=self.history.hooks,
            group=self.envelope.group,
            depends_on=self.envelope.depends_on,
            provenance=self._provenance(output, on_branch=branch is not None),
        )
        sealed, line = sealed_result_line(result)
        self.ctx.results.seal(sealed, line)
        return sealed

    def release(self) -> None:
        """Break the task's one reference cycle (its place runs its hooks through it), so
        that it is freed when it ends rather than by the cyclic collector, with all it holds."""
        self.place.run_hook = _no_hook

    async def hash_inputs(self) -> None:
        """Add the program the agent ran to what the task ran from (``provenance.inputs``;
        the plan's files were hashed before it ran: see orchestrator/inputs.py)."""
        self.inputs += await program_input(self.ctx, self.history.program)

    def _attempt_log(self) -> list[Attempt]:
        """The attempts, this run's named with the worker that ran them (if not here)."""
        attempts = self.history.attempts
        if self.worker is None:
            return attempts
        return [
            *attempts[: self.earlier],
            *(a.model_copy(update={"worker": self.worker}) for a in attempts[self.earlier :]),
        ]

    def _provenance(self, output: dict[str, Any] | None, *, on_branch: bool) -> Provenance:
        """The result's provenance; *on_branch*: the task's branch is still there, holding
        what it committed."""
        history, place = self.history, self.place
        masker = history.masker
        agent_info = self.agent.info(history.program)
        if masker and agent_info.command is not None:
            agent_info = agent_info.model_copy(
                update={"command": [masker.text(a) for a in agent_info.command]}
            )
        last_attempt = history.attempts[-1] if history.attempts else None
        environment = place.environment
        return Provenance(
            envelope_sha256=self.envelope_sha256,
            base_commit=place.worktree.base_commit if place.worktree else None,
            result_commit=self.harvest.result_commit if on_branch else None,
            result_tree=self.harvest.result_tree if on_branch else None,
            environment=environment,
            env_sha256=digest(environment.model_dump(mode="json")) if environment else None,
            agent=agent_info,
            agent_sha256=digest(agent_info.model_dump(mode="json")),
            output_sha256=digest(output),
            stdout_sha256=last_attempt.stdout.sha256
            if last_attempt and last_attempt.stdout
            else None,
            stderr_sha256=last_attempt.stderr.sha256
            if last_attempt and last_attempt.stderr
            else None,
            commands=[[masker.text(a) for a in c] for c in [*place.commands, *history.commands]],
            prompt_sha256=history.last.prompt_sha256 if history.last else None,
            copied=place.copied,
            inputs=self.inputs,
            sparse=list(place.worktree.sparse)
            if place.worktree is not None and place.worktree.sparse is not None
            else None,
        )


def _worth_retrying(outcome: AttemptOutcome) -> bool:
    """A failed attempt is tried again (retries permitting), unless its kind of failure says
    another try cannot help (``auth``: the agent is not logged in)."""
    if outcome.status == "succeeded":
        return False
    return outcome.error is None or outcome.error.kind not in NOT_RETRIED


def _feedback(last: AttemptOutcome | None, number: int) -> Feedback | None:
    """Why the previous attempt (*number*) failed, as the next attempt's prompt is told."""
    if last is None or last.error is None:
        return None
    return Feedback.of_error(last.error, attempt=number)


def _usage(outcome: AttemptOutcome) -> Usage | None:
    """What an attempt spent: its agent's own account (a preset's), else ``usage`` in its
    output when that is a valid Usage (any agent may report it so); else unknown."""
    if outcome.usage is not None:
        return outcome.usage
    reported = (outcome.output or {}).get("usage")
    if isinstance(reported, dict):
        with contextlib.suppress(ValueError):
            usage = Usage.model_validate(reported)
            # Whence the cost is the orchestrator's to say: an agent's own figure is reported.
            source = "reported" if usage.cost_usd is not None else None
            return usage.model_copy(update={"cost_source": source})
    return None


def _task_usage(attempts: Sequence[Attempt]) -> Usage | None:
    """What the task spent: its attempts' usage added up (see ``envelopes.add_usage``)."""
    total = add_usage(a.usage.model_dump(mode="json") if a.usage else None for a in attempts)
    return Usage.model_validate(total) if total is not None else None


async def run_subagent(
    envelope: HandoffEnvelope,
    agent: Agent,
    ctx: RunContext,
    *,
    earlier: Sequence[Attempt] = (),
    worker: str | None = None,
) -> TaskResult:
    """Run one task to its end and return its sealed TaskResult.

    *earlier* are attempts already made elsewhere (on a Dask worker that was lost): they
    lead the attempt log, and this run's attempts are numbered after them. *worker* names
    the Dask worker running this one, on each of its attempts.

    Steps: write the envelope, create the worktree and venv, run the agent (retrying failed
    attempts up to ``envelope.retries`` times, each from a clean worktree), commit what it
    changed, clean up per the keep policy. The result is also stored in ``ctx.results``.

    Cancellation: the agent's processes are terminated, whatever it changed is committed (so
    nothing is lost), the worktree is removed unless the policy is ``always``, a ``cancelled``
    result is stored in ``ctx.results``, and the cancellation propagates.
    """
    # Told first: what follows (the envelope's JSON and digest, its environment) is the task's
    # own setting up, not the wait for its start.
    await ctx.emit(TaskStarted(run_id=ctx.run_id, task_id=envelope.task_id, agent=envelope.agent))
    task = _Subagent(envelope, agent, ctx, earlier=earlier, worker=worker)
    status: TaskStatus = "failed"
    error: ErrorInfo | None = None
    cancelled = leaving = False
    try:
        status, error = await task.run()
    except _TaskFailed as exc:
        status, error = "failed", exc.error
    except GitError as exc:
        # The worktree broke under the agent (its .git removed, say): this task fails, the
        # run goes on.
        status, error = "failed", ErrorInfo(kind="worktree", message=str(exc))
    except anyio.get_cancelled_exc_class():
        cancelled = leaving = True
        status, error = "cancelled", ctx.cancelled_error(task.task_id)
        raise
    except RunDirError as exc:
        # The run directory cannot be written (a full disk): nothing more can be recorded
        # durably, so the run stops, naming the path.
        leaving = True
        status, error = "failed", ErrorInfo(kind="internal", message=str(exc))
        raise
    except EventHandlerFailed:
        # The caller's handler is broken: that stops the run (see orchestrate_parallel).
        leaving = True
        status, error = "failed", ErrorInfo(kind="internal", message="the on_event handler raised")
        raise
    except Exception as exc:
        # An unexpected failure of this task (a bug, a full disk) is this task's result; one
        # task never takes the others down.
        status, error = "failed", ErrorInfo(kind="internal", message=f"{type(exc).__name__}: {exc}")
    finally:
        result = await _finish(task, status, error, cancelled=cancelled, leaving=leaving)
    return result


async def _finish(
    task: _Subagent,
    status: TaskStatus,
    error: ErrorInfo | None,
    *,
    cancelled: bool,
    leaving: bool,
) -> TaskResult:
    """Clean up and record the task's result, whatever happened before.

    Shielded, so that a cancellation arriving now cannot leave a worktree, a venv or a
    missing result. *leaving*: the task is already on its way out with an exception, which
    a failing ``on_event`` handler does not replace.
    """
    ctx = task.ctx
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(120):
            if cancelled:
                # Nothing is lost: partial work lands on the branch. A commit that fails now
                # leaves what an earlier one made.
                with contextlib.suppress(GitError, OSError):
                    harvested = await task.commit()
                    if harvested.error is None:
                        task.harvest = harvested
            keep = await task.place.describe(status)
            await task.hash_inputs()
            if task.place.worktree is not None or task.place.venv is not None:
                # On disk before the worktree goes: a crash from here on loses nothing.
                await journal_result(ctx, task.result(status, error), final=False)
            await task.place.cleanup(status, keep=keep, committed=task.harvest.committed)
        task.give_back_slot()
        # Recorded even if the clean-up above ran out of time.
        result = task.result(status, error)
        try:
            await record_result(ctx, result, leaving=leaving)
        finally:
            task.release()
    return result


async def record_result(ctx: RunContext, result: TaskResult, *, leaving: bool = False) -> None:
    """Make *result* the task's, in the run: ``ctx.results``, its state in the TaskBook, the
    journal (on disk before this returns), and the ``TaskFinished`` event.

    Every executor does this for each task it runs (see orchestrator/executor.py), shielded
    from cancellation, whether the task ended or was cancelled. *leaving*: the caller is on
    its way out with an exception already, which a failing ``on_event`` handler does not
    replace.
    """
    with anyio.CancelScope(shield=True):
        ctx.results[result.task_id] = result
        ctx.move(result.task_id, result.status)
        await journal_result(ctx, result, final=True)
        try:
            await ctx.emit(finished_event(ctx, result))
        except EventHandlerFailed:
            if not leaving:  # when already on the way out, the first failure is the one told
                raise


async def journal_result(ctx: RunContext, result: TaskResult, *, final: bool) -> None:
    """Write *result* to the run's journal and wait until it is on disk.

    A journal that cannot be written (a full disk) does not lose the result: it is still in
    ``ctx.results`` and in the report.
    """
    if ctx.journal is None:
        return
    with contextlib.suppress(RunDirError):
        # The record {"type": "result", "final": ..., "result": {...}}, with the result's
        # line as it was made when it was sealed.
        head = '{"type":"result","final":' + ("true" if final else "false") + ',"result":'
        await ctx.journal.write_line(head + ctx.result_line(result) + "}")


def not_started_result(
    envelope: HandoffEnvelope,
    agent: Agent,
    ctx: RunContext,
    status: TaskStatus = "cancelled",
    error: ErrorInfo | None = None,
) -> TaskResult:
    """The result of a task that never started: ``cancelled`` by default, or ``skipped``."""
    error = error or ErrorInfo(
        kind="cancelled", message="the run was cancelled before this task started"
    )
    task = _Subagent(envelope, agent, ctx)
    try:
        return task.result(status, error)
    finally:
        task.release()


def finished_event(ctx: RunContext, result: TaskResult) -> TaskFinished:
    """The ``TaskFinished`` event of *result*."""
    return TaskFinished(
        run_id=ctx.run_id,
        task_id=result.task_id,
        agent=result.agent,
        status=result.status,
        attempts=result.attempts,
        duration_s=result.timings.duration_s,
        result_commit=result.provenance.result_commit,
        # Copies: a handler that changes what it is told must not change the sealed result
        # (whose line, made when it was sealed, is what the report holds).
        error=result.error.model_copy(deep=True) if result.error is not None else None,
        usage=result.usage.model_copy(deep=True) if result.usage is not None else None,
    )
