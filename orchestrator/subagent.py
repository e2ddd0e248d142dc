"""One subagent: worktree, venv, agent attempts, commit, clean-up, and its TaskResult.

Every failure of the task itself becomes a status and an ErrorInfo on the result; only the
orchestrator's own bugs escape as exceptions. This module is the one place where that
conversion happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from envelopes import (
    Attempt,
    Environment,
    ErrorInfo,
    HandoffEnvelope,
    LogFile,
    Metrics,
    Provenance,
    TaskResult,
    TaskStatus,
    Timings,
    canonical_json,
    digest,
    ref_safe,
    seal_result,
    sha256_hex,
)
from envelopes._audit import MAX_LOG_BYTES
from envelopes._bounded import MAX_VALUE_DEPTH, hash_file, loads_bounded, read_bounded
from envelopes._events import AttemptFailed, TaskFinished, TaskRetrying, TaskStarted

from ._fs import last_line, write_file
from ._git import Git
from .agents import Agent, CallableAgent, CommandAgent, Workspace
from .context import RunContext
from .errors import EventHandlerFailed, GitError, RunDirError, VenvError
from .process import run_command
from .retry import retry_attempts
from .secrets import Masker
from .venv import Venv, describe_environment, setup_virtualenv
from .worktree import (
    Worktree,
    branch_tip,
    changed_paths,
    check_branch,
    commit_worktree,
    create_worktree,
    delete_if_unused,
    remove_worktree,
    reset_worktree,
    restore_admin_files,
)

__all__ = ["MAX_OUTPUT_BYTES", "finished_event", "journal_result", "run_subagent"]

#: Largest output JSON an agent may write.
MAX_OUTPUT_BYTES = 16 * 1024 * 1024


class _TaskFailed(Exception):
    """Setup of a task failed; carries the error for the result."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class _AttemptOutcome:
    status: TaskStatus
    exit_code: int | None = None
    output: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    metrics: Metrics = field(default_factory=Metrics)


def _now() -> datetime:
    return datetime.now(UTC)


class _Subagent:
    """The state of one task while it runs; :meth:`result` turns it into a TaskResult."""

    def __init__(self, envelope: HandoffEnvelope, agent: Agent, ctx: RunContext) -> None:
        self.envelope = envelope
        self.agent = agent
        self.ctx = ctx
        self.task_id = envelope.task_id
        self.started_at = _now()
        self.clock = time.monotonic()
        self.timings: dict[str, float] = {}
        self.worktree: Worktree | None = None
        self.venv: Venv | None = None
        self.environment: Environment | None = None
        self.attempts: list[Attempt] = []
        self.last: _AttemptOutcome | None = None
        self.commands: list[list[str]] = []
        self.result_commit: str | None = None
        self.result_tree: str | None = None
        self.committed = False
        self.kept_worktree: Path | None = None
        self.envelope_entry: LogFile | None = None
        self.program: str | None = None
        self.branch_deleted = False
        self.keep = False
        #: Set when the commit step refused what it found (a branch moved by another
        #: process, a secret in a file, changes too large): the task fails with it,
        #: whatever the agent's outcome.
        self.refused: ErrorInfo | None = None
        #: The task's secret values (set once its agent's environment is known).
        self.masker = Masker()
        self.envelope_bytes = canonical_json(envelope.to_json_dict())  # secrets masked
        self.envelope_sha256 = sha256_hex(self.envelope_bytes)
        run_dir, name = ctx.run_dir, ref_safe(self.task_id)
        self.envelope_path = run_dir / "envelopes" / f"{name}.json"
        # Flat: one file per attempt in the run's logs/ and outputs/ (made once per run), so
        # that a task makes no directory of its own.
        self.logs_prefix = run_dir / "logs" / name
        self.outputs_prefix = run_dir / "outputs" / name

    def _timed(self, phase: str, start: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + time.monotonic() - start

    async def prepare(self) -> None:
        """Write the envelope, create the worktree and the venv."""
        data = self.envelope_bytes
        ctx = self.ctx
        if self.envelope.worktree or self.envelope.venv or isinstance(self.agent, CommandAgent):
            await anyio.to_thread.run_sync(write_file, self.envelope_path, data)
        else:
            # A task with nothing else to make writes its envelope (a few hundred bytes) in
            # the event loop: cheaper than a thread hop, and than a writer thread, which
            # would wait for the GIL after every system call (see docs/benchmarks.md).
            write_file(self.envelope_path, data)
        self.envelope_entry = LogFile(
            path=self.envelope_path.relative_to(self.ctx.run_dir).as_posix(),
            sha256=self.envelope_sha256,
            size=len(data),
        )
        base_commit, _ = ctx.start_of(self.task_id)
        if self.envelope.worktree and ctx.repo is not None and base_commit is not None:
            start = time.monotonic()
            branch = ctx.branch(self.task_id)
            try:
                if ctx.pool is not None:
                    self.worktree = await ctx.pool.borrow(
                        branch, base_commit
                    ) or await ctx.pool.create(branch, base_commit)
                if self.worktree is None:
                    self.worktree = await create_worktree(
                        ctx.repo, branch, ctx.worktree_path(self.task_id), base_commit
                    )
            except GitError as exc:
                raise _TaskFailed(ErrorInfo(kind="worktree", message=str(exc))) from exc
            finally:
                self._timed("worktree_s", start)
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
        if self.envelope.venv:
            start = time.monotonic()
            try:
                if ctx.venv_pool is not None:
                    self.venv = await ctx.venv_pool.acquire(
                        self.envelope.requirements,
                        cwd=ctx.plan_dir,
                        fallback=ctx.venv_path(self.task_id),
                    )
                else:
                    self.venv = await setup_virtualenv(
                        ctx.venv_path(self.task_id),
                        self.envelope.requirements,
                        backend=ctx.venv_backend,
                        cwd=ctx.plan_dir,
                    )
                self.commands.extend(self.venv.commands)
            except VenvError as exc:
                self.commands.extend(exc.commands)
                raise _TaskFailed(ErrorInfo(kind="install", message=str(exc))) from exc
            finally:
                self._timed("venv_s", start)

    def _env(self, output_path: Path) -> dict[str, str]:
        from .isolation import agent_environment

        if self.envelope.sandbox != "none" and not isinstance(self.agent, CommandAgent):
            message = f"agent {self.envelope.agent!r} runs in this process: it cannot be sandboxed"
            raise _TaskFailed(ErrorInfo(kind="spawn", message=message))
        env = agent_environment(self.ctx.base_env, self.envelope)
        if isinstance(self.agent, CommandAgent):
            env.update(self.agent.env)
        env.update(self.envelope.env)
        if self.venv is not None:
            env["VIRTUAL_ENV"] = str(self.venv.path)
            env["PATH"] = str(self.venv.bin_dir) + os.pathsep + env.get("PATH", "")
            env.pop("PYTHONHOME", None)
        env.update(
            ORCHESTRATOR_ENVELOPE=str(self.envelope_path),
            ORCHESTRATOR_OUTPUT=str(output_path),
            ORCHESTRATOR_TASK_ID=self.task_id,
            ORCHESTRATOR_RUN_ID=self.ctx.run_id,
        )
        return env

    def _cwd(self) -> Path:
        if self.worktree is not None:
            return self.worktree.path
        if self.ctx.repo is not None:
            return self.ctx.repo.root
        return self.ctx.run_dir

    async def attempt(self, number: int) -> _AttemptOutcome:
        """Run the agent once, from a clean worktree, and judge the outcome."""
        ctx = self.ctx
        if number > 1:
            ctx.move(self.task_id, "running")
            if self.worktree is not None and ctx.repo is not None:
                await reset_worktree(ctx.repo, self.worktree)
        output_path = self.outputs_prefix.with_name(
            f"{self.outputs_prefix.name}.attempt-{number}.json"
        )
        logs = self.logs_prefix
        stdout_path = logs.with_name(f"{logs.name}.attempt-{number}.stdout")
        stderr_path = logs.with_name(f"{logs.name}.attempt-{number}.stderr")
        env = self._env(output_path)
        self.masker = Masker.for_env(env, self.envelope.secrets)
        started_at = _now()
        start = time.monotonic()
        outcome: _AttemptOutcome
        try:
            if isinstance(self.agent, CommandAgent):
                outcome = await self._run_command(
                    number, env, output_path, stdout_path, stderr_path
                )
            else:
                outcome = await self._run_callable(self.agent, env, output_path)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                outcome = _AttemptOutcome(
                    status="cancelled", error=ctx.cancelled_error(self.task_id)
                )
                await self._record(number, started_at, start, outcome, stdout_path, stderr_path)
            raise
        finally:
            self._timed("agent_s", start)
        guard = ctx.repo.git.guard if ctx.repo is not None else None
        if guard is not None and outcome.status != "cancelled":
            began = started_at.timestamp()
            if changes := await anyio.to_thread.run_sync(guard.blame, began, time.time()):
                names = sorted({str(c.path) for c in changes})
                outcome.status, outcome.output = "failed", None
                outcome.error = ErrorInfo(
                    kind="tamper",
                    message=f"{', '.join(names)} {changes[0].what} while this task's agent "
                    "ran, and was put back",
                    paths=names,
                )
        await self._record(number, started_at, start, outcome, stdout_path, stderr_path)
        if self.masker:
            # The output file stays in the run directory: masked like the logs.
            with contextlib.suppress(OSError):
                await anyio.to_thread.run_sync(self.masker.mask_file, output_path)
        if outcome.error is not None:
            await ctx.emit(
                AttemptFailed(
                    run_id=ctx.run_id,
                    task_id=self.task_id,
                    attempt=number,
                    status=outcome.status,
                    error=outcome.error,
                )
            )
        return outcome

    async def _record(
        self,
        number: int,
        started_at: datetime,
        start: float,
        outcome: _AttemptOutcome,
        stdout_path: Path,
        stderr_path: Path,
    ) -> None:
        stdout = stderr = None
        if isinstance(self.agent, CommandAgent):
            stdout, stderr, problem = await anyio.to_thread.run_sync(
                _log_entries, stdout_path, stderr_path, self.ctx.run_dir, self.masker
            )
            if problem is not None and outcome.status != "cancelled":
                outcome.status, outcome.output = "failed", None
                outcome.error = ErrorInfo(kind="tamper", message=f"the agent's {problem}")
        if self.masker:
            # Before anything is written of it: the attempt log, events, journal, report.
            if outcome.error is not None:
                outcome.error = self._masked(outcome.error)
            if outcome.output is not None:
                outcome.output = self.masker.value(outcome.output)
        if stdout is not None and stderr is not None:
            outcome.metrics = outcome.metrics.model_copy(
                update={"stdout_bytes": stdout.size, "stderr_bytes": stderr.size}
            )
        self.attempts.append(
            Attempt(
                number=number,
                status=outcome.status,
                started_at=started_at,
                finished_at=_now(),
                duration_s=round(time.monotonic() - start, 6),
                exit_code=outcome.exit_code,
                error=outcome.error,
                stdout=stdout,
                stderr=stderr,
            )
        )
        self.last = outcome

    async def _run_command(
        self,
        number: int,
        env: dict[str, str],
        output_path: Path,
        stdout_path: Path,
        stderr_path: Path,
    ) -> _AttemptOutcome:
        assert isinstance(self.agent, CommandAgent)
        ctx = self.ctx
        argv = self.agent.argv(
            plan_dir=ctx.plan_dir,
            worktree=self._cwd(),
            task_id=self.task_id,
            run_id=ctx.run_id,
            path_var=env.get("PATH", ""),
            venv_bin=self.venv.bin_dir if self.venv else None,
        )
        self.commands.append(argv)
        from .isolation import isolate, isolate_error

        try:
            self.program = os.path.realpath(argv[0]) if os.path.isabs(argv[0]) else argv[0]
            async with isolate(
                ctx,
                self.envelope,
                argv,
                cwd=self._cwd(),
                env=env,
                worktree=self.worktree,
                venv=self.venv,
                envelope_path=self.envelope_path,
                output_path=output_path,
                number=number,
            ) as spawn:
                proc = spawn.outcome(
                    await run_command(
                        spawn.argv,
                        cwd=spawn.cwd,
                        env=spawn.env,
                        stdout=stdout_path,
                        stderr=stderr_path,
                        timeout=self.envelope.timeout,
                        tag=f"{ctx.run_id}/{self.task_id}/{number}",
                        kill_grace=ctx.kill_grace,
                        rlimits=spawn.rlimits,
                        lifeline=ctx.lifeline,
                    )
                )
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in an argument or variable
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return _AttemptOutcome(
                status="failed",
                error=ErrorInfo(kind="spawn", message=f"cannot start {argv[0]}: {reason}"),
            )
        metrics = Metrics(
            cpu_user_s=proc.cpu_user_s, cpu_system_s=proc.cpu_system_s, max_rss_kb=proc.max_rss_kb
        )
        if proc.timed_out:
            return _AttemptOutcome(
                status="timed_out",
                exit_code=proc.exit_code,
                metrics=metrics,
                error=ErrorInfo(
                    kind="timeout", message=f"timed out after {self.envelope.timeout:g} s"
                ),
            )
        if (error := await isolate_error(self.envelope, spawn, proc, stderr_path)) is not None:
            return _AttemptOutcome(
                status="failed", exit_code=proc.exit_code, metrics=metrics, error=error
            )
        if proc.signal is not None:
            try:
                name = signal.Signals(proc.signal).name
            except ValueError:  # a real-time signal has no name
                name = f"signal {proc.signal}"
            return _AttemptOutcome(
                status="failed",
                metrics=metrics,
                error=ErrorInfo(kind="exit_code", message=f"killed by {name}"),
            )
        if proc.exit_code != 0:
            tail = await anyio.to_thread.run_sync(last_line, stderr_path)
            message = f"exited with code {proc.exit_code}" + (f": {tail}" if tail else "")
            return _AttemptOutcome(
                status="failed",
                exit_code=proc.exit_code,
                metrics=metrics,
                error=ErrorInfo(kind="exit_code", message=message),
            )
        output, error = await anyio.to_thread.run_sync(_read_output, output_path, ctx.run_dir)
        if error is not None:
            return _AttemptOutcome(status="failed", exit_code=0, metrics=metrics, error=error)
        return _AttemptOutcome(status="succeeded", exit_code=0, output=output, metrics=metrics)

    async def _run_callable(
        self, agent: CallableAgent, env: dict[str, str], output_path: Path
    ) -> _AttemptOutcome:
        workspace = Workspace(
            task_id=self.task_id,
            run_id=self.ctx.run_id,
            path=self.worktree.path if self.worktree else None,
            venv=self.venv.path if self.venv else None,
            output_path=output_path,
            envelope_path=self.envelope_path,
            env=env,
        )
        value: Any = None
        with anyio.move_on_after(self.envelope.timeout) as scope:
            try:
                value = await agent.function(self.envelope, workspace)
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                return _AttemptOutcome(
                    status="failed", error=ErrorInfo(kind="agent_exception", message=message)
                )
        if scope.cancelled_caught:
            return _AttemptOutcome(
                status="timed_out",
                error=ErrorInfo(
                    kind="timeout", message=f"timed out after {self.envelope.timeout:g} s"
                ),
            )
        if value is None:
            # A callable may write its output to workspace.output_path instead of returning it.
            value, error = await anyio.to_thread.run_sync(
                _read_output, output_path, self.ctx.run_dir
            )
            if error is not None:
                return _AttemptOutcome(status="failed", error=error)
        if value is not None and not isinstance(value, Mapping):
            return _AttemptOutcome(
                status="failed",
                error=ErrorInfo(
                    kind="invalid_output",
                    message=f"agent returned {type(value).__name__}, not a mapping",
                ),
            )
        try:
            # The output as it will read back from the report: string keys, lists, no NaN.
            output = None if value is None else json.loads(canonical_json(dict(value)))
        except (TypeError, ValueError) as exc:
            return _AttemptOutcome(
                status="failed",
                error=ErrorInfo(
                    kind="invalid_output", message=f"output is not JSON-serialisable: {exc}"
                ),
            )
        return _AttemptOutcome(status="succeeded", output=output)

    async def commit(self) -> None:
        """Commit whatever the agent left in the worktree (on success and on failure alike)."""
        ctx = self.ctx
        _, base_tree = ctx.start_of(self.task_id)
        if self.worktree is None or ctx.repo is None or base_tree is None:
            return
        start = time.monotonic()
        subject = (
            self.envelope.task.strip().splitlines()[0]
            if self.envelope.task.strip()
            else "(no description)"
        )
        message = self.masker.text(
            f"{self.envelope.agent}: {subject} [task {self.task_id}]\n\n"
            f"Orchestrator-Run: {ctx.run_id}\nEnvelope-SHA256: {self.envelope_sha256}\n"
        )
        try:
            worktree, git = self.worktree, ctx.repo.git
            if tampered := await restore_admin_files(worktree):
                self.refused = ErrorInfo(
                    kind="tamper",
                    message=f"the agent pointed {', '.join(tampered)} elsewhere (put back)",
                    paths=tampered,
                )
            tip = await branch_tip(ctx.repo, worktree)
            if problem := await check_branch(ctx.repo, worktree, tip):
                # Not this task's doing: the branch goes back to the base (by compare-and-
                # swap from what was found), the worktree is committed on it for the record,
                # and the task fails.
                self.refused = ErrorInfo(
                    kind="tamper", message=problem, paths=[f"refs/heads/{worktree.branch}"]
                )
                tip = await _branch_back_to_base(git, worktree, tip)
            if (
                self.masker
                and not self.envelope.allow_secrets_in_commit
                and (why := await self._secrets_in_git(worktree, tip))
            ):
                # The agent's own commits or staged files hold a secret: none of it is
                # taken (its objects stay unreferenced until git gc prunes them).
                self.refused = self.refused or why
                await _branch_back_to_base(git, worktree, tip)
                return
            # Bounded by the task's timeout: what git reads here, the agent left.
            paths = await changed_paths(ctx.repo, worktree, timeout=self.envelope.timeout)
            if paths and (
                why := await anyio.to_thread.run_sync(self._refuse_changes, worktree.path, paths)
            ):
                self.refused = self.refused or why
                if why.kind == "too_large":
                    return  # nothing of it enters the repository; the worktree keeps it
                paths = [p for p in paths if p not in why.paths]
            self.result_commit, self.result_tree, self.committed = await commit_worktree(
                ctx.repo,
                worktree,
                message,
                base_tree=base_tree,
                parent=tip,
                paths=paths,
                timeout=self.envelope.timeout,
            )
        finally:
            self._timed("commit_s", start)

    async def _secrets_in_git(self, worktree: Worktree, tip: str) -> ErrorInfo | None:
        """A secret_leak error when the agent's own commits (content, paths, messages) or
        what it staged hold a secret's value, else None."""
        assert self.ctx.repo is not None
        git, args, env = self.ctx.repo.git, worktree.git_args(), worktree.git_env()
        text = ["--no-ext-diff", "--no-textconv", "--text", "--no-color"]
        outputs = [
            await git.run(
                *args,
                "diff",
                "--cached",
                *text,
                "--end-of-options",
                tip,
                cwd=worktree.path,
                env=env,
                timeout=self.envelope.timeout,
            )
        ]
        if tip != worktree.base_commit:
            span = f"{worktree.base_commit}..{tip}"
            outputs.append(await git.run("log", "--format=%B", "--end-of-options", span, env=env))
            outputs.append(
                await git.run("diff", *text, "--end-of-options", worktree.base_commit, tip)
            )
        if not any(self.masker.found_in(out.stdout) for out in outputs):
            return None
        return ErrorInfo(
            kind="secret_leak",
            message="the value of a secret variable is in the agent's own commits or in what "
            "it staged: nothing was committed (set allow_secrets_in_commit to commit it anyway)",
        )

    def _refuse_changes(self, root: Path, paths: list[str]) -> ErrorInfo | None:
        """Why the changed *paths* must not be committed (too large, holding a secret), if so.

        Blocking (a thread): sizes come from ``lstat`` (links are not followed), and with
        secrets to look for every changed file is read, up to the size limit.
        """
        limit = self.envelope.max_commit_mb * 1024 * 1024
        sizes: dict[str, int] = {}
        for path in paths:
            with contextlib.suppress(OSError):
                sizes[path] = os.lstat(root / path).st_size
        if sum(sizes.values()) > limit:
            largest = sorted(sizes, key=lambda p: -sizes[p])[:3]
            return ErrorInfo(
                kind="too_large",
                message=f"the changes are {sum(sizes.values())} bytes, more than max_commit_mb "
                f"({self.envelope.max_commit_mb}); largest: {', '.join(largest)}; nothing was "
                "committed",
                paths=largest,
            )
        if not self.masker or self.envelope.allow_secrets_in_commit:
            return None
        leaking = [p for p in paths if p not in sizes and self.masker.found_in(p.encode())]
        for path in sizes:
            try:
                if os.path.islink(root / path):
                    data = os.readlink(root / path).encode("utf-8", "surrogateescape")
                else:
                    data = read_bounded(path, limit, within=root)
            except OSError:
                continue  # not a regular file: git does not commit it either
            if self.masker.found_in(data) or self.masker.found_in(path.encode()):
                leaking.append(path)
        if not leaking:
            return None
        return ErrorInfo(
            kind="secret_leak",
            message=f"the value of a secret variable is in {', '.join(leaking)}: "
            "not committed (set allow_secrets_in_commit to commit it anyway)",
            paths=leaking,
        )

    async def describe(self, status: TaskStatus) -> None:
        """Describe the venv and decide what the clean-up keeps: the result as it will be."""
        if self.venv is not None:
            # Described after the agent ran, so that what it installed itself is on record.
            with contextlib.suppress(OSError):
                self.environment = await anyio.to_thread.run_sync(describe_environment, self.venv)
        ctx = self.ctx
        policy = ctx.keep_worktrees
        self.keep = policy == "always" or (policy == "failed" and status in ("failed", "timed_out"))
        if self.keep and self.worktree is not None:
            if ctx.pool is not None and ctx.pool.owns(self.worktree):
                # Out of the pool, to where a fresh worktree would be: nobody resets it.
                self.worktree = await ctx.pool.keep(self.worktree, ctx.worktree_path(self.task_id))
            self.kept_worktree = self.worktree.path

    async def cleanup(self, status: TaskStatus) -> None:
        """Remove the worktree and venv as :meth:`describe` decided; branches stay unless empty and cancelled."""
        start = time.monotonic()
        ctx = self.ctx
        keep = self.keep
        if self.worktree is not None and ctx.repo is not None and not keep:
            try:
                delete_branch = status == "cancelled" and not self.committed
                if ctx.pool is not None and ctx.pool.owns(self.worktree):
                    await ctx.pool.give_back(self.worktree)
                    if delete_branch:
                        self.branch_deleted = await delete_if_unused(ctx.repo, self.worktree)
                else:
                    self.branch_deleted = await remove_worktree(
                        ctx.repo, self.worktree, delete_branch=delete_branch
                    )
            except (GitError, OSError):
                keep = True  # could not remove it: the report names it as kept
                self.kept_worktree = self.worktree.path
        venv, venv_pool = self.venv, ctx.venv_pool
        if venv is not None:
            kept = self.worktree is not None and keep  # the venv stays with its worktree
            if venv_pool is not None and venv_pool.owns(venv):
                if kept:
                    venv_pool.keep(venv)
                elif self.envelope.sandbox != "none":
                    await venv_pool.discard(venv)  # written by an untrusted agent
                else:
                    venv_pool.give_back(venv)
            elif not kept:
                await anyio.to_thread.run_sync(shutil.rmtree, venv.path, True)
        self._timed("cleanup_s", start)

    def _masked(self, error: ErrorInfo) -> ErrorInfo:
        return error.model_copy(
            update={
                "message": self.masker.text(error.message),
                "paths": [self.masker.text(p) for p in error.paths],
            }
        )

    def result(self, status: TaskStatus, error: ErrorInfo | None) -> TaskResult:
        """The sealed TaskResult: what it says of the task's secrets masked (see secrets.py)."""
        last = self.last
        output = last.output if last is not None and status == "succeeded" else None
        last_attempt = self.attempts[-1] if self.attempts else None
        agent_info = (
            self.agent.info(self.program)
            if isinstance(self.agent, CommandAgent)
            else self.agent.info()
        )
        if self.masker:
            error = self._masked(error) if error is not None else None
            if agent_info.command is not None:
                agent_info = agent_info.model_copy(
                    update={"command": [self.masker.text(a) for a in agent_info.command]}
                )
        branch = self.worktree.branch if self.worktree and not self.branch_deleted else None
        finished = _now()
        result = TaskResult(
            task_id=self.task_id,
            agent=self.envelope.agent,
            status=status,
            attempts=len(self.attempts),
            exit_code=last.exit_code if last else None,
            output=output,
            error=error,
            timings=Timings(
                started_at=self.started_at,
                finished_at=finished,
                duration_s=round(time.monotonic() - self.clock, 6),
                **{k: round(v, 6) for k, v in self.timings.items()},
            ),
            metrics=last.metrics if last else Metrics(),
            branch=branch,
            worktree=str(self.kept_worktree) if self.kept_worktree else None,
            envelope=self.envelope_entry,
            attempt_log=self.attempts,
            group=self.envelope.group,
            depends_on=self.envelope.depends_on,
            provenance=Provenance(
                envelope_sha256=self.envelope_sha256,
                base_commit=self.worktree.base_commit if self.worktree else None,
                result_commit=self.result_commit if branch else None,
                result_tree=self.result_tree if branch else None,
                environment=self.environment,
                env_sha256=digest(self.environment.model_dump(mode="json"))
                if self.environment
                else None,
                agent=agent_info,
                agent_sha256=digest(agent_info.model_dump(mode="json")),
                output_sha256=digest(output),
                stdout_sha256=last_attempt.stdout.sha256
                if last_attempt and last_attempt.stdout
                else None,
                stderr_sha256=last_attempt.stderr.sha256
                if last_attempt and last_attempt.stderr
                else None,
                commands=[[self.masker.text(a) for a in c] for c in self.commands],
            ),
        )
        return seal_result(result)


async def _branch_back_to_base(git: Git, worktree: Worktree, tip: str) -> str:
    """Move the task's branch back to its base, by compare-and-swap from *tip*; the base."""
    if tip != worktree.base_commit:
        await git.run(
            "update-ref",
            "--end-of-options",
            f"refs/heads/{worktree.branch}",
            worktree.base_commit,
            tip,
        )
    return worktree.base_commit


def _log_entries(
    stdout: Path, stderr: Path, run_dir: Path, masker: Masker
) -> tuple[LogFile | None, LogFile | None, str | None]:
    """Entries for an attempt's two log files, and what an agent did to them, if anything.

    Empty files are made if the command never started. The agent had the files' paths (its
    /proc/self/fd): one it replaced with a link, a FIFO or a device is not followed or read;
    it is replaced by an empty file, and the problem is returned for the attempt's result.
    """
    entries: list[LogFile] = []
    problem = None
    for path in (stdout, stderr):
        relative = path.relative_to(run_dir).as_posix()
        try:
            digest_, size = hash_file(relative, MAX_LOG_BYTES, within=run_dir)
        except FileNotFoundError:
            path.touch()
            digest_, size = hash_file(relative, MAX_LOG_BYTES, within=run_dir)
        except OSError as exc:
            problem = problem or f"its log {relative} was tampered with: {exc.strerror or exc}"
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            path.touch()
            digest_, size = hash_file(relative, MAX_LOG_BYTES, within=run_dir)
        if masker and size and masker.mask_file(path):
            digest_, size = hash_file(relative, MAX_LOG_BYTES, within=run_dir)
        entries.append(LogFile(path=relative, sha256=digest_, size=size))
    return entries[0], entries[1], problem


def _read_output(path: Path, run_dir: Path) -> tuple[dict[str, Any] | None, ErrorInfo | None]:
    """The agent's output file: a regular file of at most MAX_OUTPUT_BYTES, JSON of bounded depth.

    The agent chose what is at that path: a link, a FIFO or a device is refused without being
    followed or read (kind ``invalid_output``), so neither can hang the run or fill memory.
    """
    relative = path.relative_to(run_dir).as_posix()
    try:
        data = read_bounded(relative, MAX_OUTPUT_BYTES, within=run_dir)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, ErrorInfo(
            kind="invalid_output",
            message=f"output file {relative} cannot be read: {exc.strerror or exc}",
        )
    try:
        value = loads_bounded(data, max_depth=MAX_VALUE_DEPTH)
    except ValueError as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return None, ErrorInfo(kind="invalid_output", message=f"output is not valid JSON: {reason}")
    if not isinstance(value, dict):
        return None, ErrorInfo(
            kind="invalid_output",
            message=f"output must be a JSON object, found {type(value).__name__}",
        )
    try:
        canonical_json(value)
    except ValueError as exc:
        return None, ErrorInfo(
            kind="invalid_output", message=f"output is not canonical JSON: {exc}"
        )
    return value, None


async def run_subagent(envelope: HandoffEnvelope, agent: Agent, ctx: RunContext) -> TaskResult:
    """Run one task to its end and return its sealed TaskResult.

    Steps: write the envelope, create the worktree and venv, run the agent (retrying failed
    attempts up to ``envelope.retries`` times, each from a clean worktree), commit what it
    changed, clean up per the keep policy. The result is also stored in ``ctx.results``.

    Cancellation: the agent's processes are terminated, whatever it changed is committed (so
    nothing is lost), the worktree is removed unless the policy is ``always``, a ``cancelled``
    result is stored in ``ctx.results``, and the cancellation propagates.
    """
    task = _Subagent(envelope, agent, ctx)
    await ctx.emit(TaskStarted(run_id=ctx.run_id, task_id=task.task_id, agent=envelope.agent))
    status: TaskStatus = "failed"
    error: ErrorInfo | None = None
    cancelled = leaving = False
    try:
        if ctx.journal is not None and (envelope.worktree or envelope.venv):
            await ctx.journal.sync()  # "running" is on disk before anything is made for it
        await task.prepare()

        async def before_retry(number: int, wait: float) -> None:
            ctx.move(task.task_id, "retrying")
            await ctx.emit(
                TaskRetrying(run_id=ctx.run_id, task_id=task.task_id, attempt=number, wait_s=wait)
            )

        outcome = await retry_attempts(
            task.attempt,
            retries=envelope.retries,
            should_retry=lambda o: o.status != "succeeded",
            before_retry=before_retry,
            initial=ctx.backoff_initial,
            maximum=ctx.backoff_max,
        )
        status, error = outcome.status, outcome.error
        try:
            await task.commit()
        except GitError as exc:
            status, error = "failed", ErrorInfo(kind="commit", message=str(exc))
        if task.refused is not None:
            status, error = "failed", task.refused
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
        # Whatever happened above, clean up and record the result, shielded so that a
        # cancellation arriving now cannot leave a worktree, a venv or a missing result.
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(120):
                if cancelled:
                    with contextlib.suppress(GitError, OSError):
                        await task.commit()  # nothing is lost: partial work lands on the branch
                await task.describe(status)
                if task.worktree is not None or task.venv is not None:
                    # On disk before the worktree goes: a crash from here on loses nothing.
                    await journal_result(ctx, task.result(status, error), final=False)
                await task.cleanup(status)
            # Recorded even if the clean-up above ran out of time.
            result = task.result(status, error)
            ctx.results[task.task_id] = result
            ctx.move(task.task_id, status)
            await journal_result(ctx, result, final=True)
            try:
                await ctx.emit(finished_event(ctx, result))
            except EventHandlerFailed:
                if not leaving:  # when already on the way out, the first failure is the one told
                    raise
    return result


async def journal_result(ctx: RunContext, result: TaskResult, *, final: bool) -> None:
    """Write *result* to the run's journal and wait until it is on disk.

    A journal that cannot be written (a full disk) does not lose the result: it is still in
    ``ctx.results`` and in the report.
    """
    if ctx.journal is None:
        return
    with contextlib.suppress(RunDirError):
        await ctx.journal.write(
            {"type": "result", "final": final, "result": result.model_dump(mode="json")}
        )


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
    return _Subagent(envelope, agent, ctx).result(status, error)


def finished_event(ctx: RunContext, result: TaskResult) -> TaskFinished:
    return TaskFinished(
        run_id=ctx.run_id,
        task_id=result.task_id,
        agent=result.agent,
        status=result.status,
        attempts=result.attempts,
        duration_s=result.timings.duration_s,
        result_commit=result.provenance.result_commit,
        error=result.error,
    )
