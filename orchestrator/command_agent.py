"""The ``command`` kind: any program, run once per attempt in the task's worktree.

The program runs under the task's isolation (:func:`orchestrator.isolation.isolate`: as it
is, or in a bubblewrap sandbox, with the plan's limits) through
:func:`orchestrator.process.run_command`, which writes its stdout and stderr to the attempt's
log files and ends its whole process group however the attempt ends. It reads its envelope
from ``ORCHESTRATOR_ENVELOPE`` and writes its output, a JSON object, to
``ORCHESTRATOR_OUTPUT``; exiting with 0 is success.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from envelopes import AgentInfo, AgentSpec, ErrorInfo, Metrics, digest, env_values

from ._fs import last_line
from .attempt import AttemptOutcome, AttemptRequest, read_output, stalled, timed_out
from .process import ProcessOutcome, run_command

if TYPE_CHECKING:
    from .isolation import Spawn
    from .pipes import Pipes

__all__ = ["CommandAgent", "ended_abnormally", "metrics_of", "refuse_task_settings", "run_program"]


def refuse_task_settings(
    spec: AgentSpec, who: str, *, allowed: frozenset[str] | set[str] = frozenset()
) -> None:
    """ValueError when *spec* sets more than ``command`` and ``env``, outside a plan.

    In a plan's ``agents``, the other keys (``sandbox``, ``network``, ``secrets``,
    ``limits``, ``max_commit_mb``, ``allow_secrets_in_commit``, ``max_concurrency``) are
    applied to the agent's tasks when the plan becomes envelopes; an agent given in code has
    no tasks of its own to apply them to.
    """
    extra = sorted(spec.model_fields_set - {"command", "env"} - set(allowed))
    if extra:
        raise ValueError(
            f"{who} sets {', '.join(extra)}, which only a plan's agents entry applies to its "
            "tasks: set them on the envelopes (or in the plan) instead"
        )


@dataclass(frozen=True)
class CommandAgent:
    """A program run with cwd = the task's worktree (or the repository when it has none).

    Arguments may use the placeholders ``{plan_dir}``, ``{worktree}``, ``{task_id}`` and
    ``{run_id}``. A relative program path containing a slash is taken relative to the plan's
    directory; ``python``/``python3`` is the task venv's interpreter, or this interpreter
    when the task has no venv; any other bare name is looked up on the task's PATH.
    """

    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)

    #: Not in this process: a program, which can be sandboxed.
    in_process = False
    #: Its stdout and stderr go to the attempt's two log files.
    writes_logs = True

    @classmethod
    def from_spec(cls, spec: AgentSpec) -> CommandAgent:
        """The agent a plan's ``agents`` entry describes."""
        if spec.command is None:
            raise ValueError("a command agent needs a command")
        return cls(command=tuple(spec.command), env=env_values(spec.env))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> CommandAgent:
        """The agent of ``{"command": ..., "env": ...}``, checked as a plan's entry is.

        ValueError (pydantic's ValidationError) when the options are not a valid entry, and
        for the keys of a plan's entry that apply to its tasks (``sandbox``, ``secrets``,
        ``limits``...): given in code they would be silently not applied, so they are refused.
        """
        spec = AgentSpec.model_validate(dict(options))
        refuse_task_settings(spec, "the agent")
        return cls.from_spec(spec)

    def argv(
        self,
        *,
        plan_dir: Path,
        worktree: Path,
        task_id: str,
        run_id: str,
        path_var: str,
        venv_bin: Path | None,
    ) -> list[str]:
        """The command as it will run for one task."""
        values = {
            "plan_dir": str(plan_dir),
            "worktree": str(worktree),
            "task_id": task_id,
            "run_id": run_id,
        }
        args = [_substitute(arg, values) for arg in self.command]
        program = args[0]
        if program in ("python", "python3") and venv_bin is None:
            args[0] = sys.executable
        elif "/" in program and not os.path.isabs(program):
            args[0] = str((plan_dir / program).absolute())
        elif "/" not in program:
            args[0] = shutil.which(program, path=path_var) or program
        return args

    def info(self, program: str | None = None) -> AgentInfo:
        """Provenance description: the command as written, and the program it resolved to."""
        return AgentInfo(kind="command", command=list(self.command), program=program)

    def fingerprint(self, plan_dir: Path) -> str:
        """The command with ``{plan_dir}`` filled in, the agent's env, and a fingerprint of the
        program and of each file the plan ships with it (an argument written
        ``{plan_dir}/...``), so that an edited agent script is another agent. Other arguments
        count as written (a path among them may be data that changes every run). Blocking."""
        command = [arg.replace("{plan_dir}", str(plan_dir)) for arg in self.command]
        try:
            program = command[0] if os.sep in command[0] else shutil.which(command[0])
        except ValueError:  # a NUL byte: the task itself fails to start, with that reason
            program = None
        files = {"program": _file_fingerprint(Path(program)) if program else None}
        for written, arg in zip(self.command[1:], command[1:], strict=True):
            if written.startswith("{plan_dir}") and "{" not in arg:
                files[written] = _file_fingerprint(Path(arg))
        return digest({"command": command, "env": dict(self.env), "files": files})

    async def run_attempt(self, request: AttemptRequest) -> AttemptOutcome:
        """Run the command once, under the task's isolation, and judge how it ended.

        A program that cannot be started is a ``spawn`` failure. Cancellation: the program's
        process group is terminated (under a shielded scope), then the cancellation
        propagates.
        """
        argv = self.argv(
            plan_dir=request.plan_dir,
            worktree=request.cwd,
            task_id=request.task_id,
            run_id=request.run_id,
            path_var=request.env.get("PATH", ""),
            venv_bin=request.venv.bin_dir if request.venv else None,
        )
        request.record_command(argv, _program(argv[0]))
        ran = await run_program(request, argv)
        if isinstance(ran, AttemptOutcome):
            return ran
        spawn, proc = ran
        return await _judge(request, spawn, proc)


async def run_program(
    request: AttemptRequest,
    argv: list[str],
    *,
    stdin: Path | None = None,
    talk: Callable[[Pipes], Awaitable[None]] | None = None,
) -> tuple[Spawn, ProcessOutcome] | AttemptOutcome:
    """Run *argv* for one attempt under the task's isolation (sandbox, limits), its output
    into the attempt's logs, stopped at the timeout or a stall: how the isolation and the
    process ended, or the ``spawn`` failure when it could not start. Every kind that runs a
    program runs it so; one that converses with it on its stdin and stdout gives *talk*
    (see :func:`~orchestrator.process.run_command`). Cancellation: the process group is terminated (shielded), then the
    cancellation propagates."""
    from .isolation import isolate

    try:
        async with isolate(request, argv) as spawn:
            proc = spawn.outcome(
                await run_command(
                    spawn.argv,
                    cwd=spawn.cwd,
                    env=spawn.env,
                    stdout=request.stdout_path,
                    stderr=request.stderr_path,
                    timeout=request.timeout,
                    tag=request.attempt_tag,
                    kill_grace=request.kill_grace,
                    rlimits=spawn.rlimits,
                    lifeline=request.lifeline,
                    stdin=stdin,
                    stall_timeout=request.stall_timeout,
                    talk=talk,
                )
            )
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in an argument or variable
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        error = ErrorInfo(kind="spawn", message=f"cannot start {argv[0]}: {reason}")
        return AttemptOutcome(status="failed", error=error)
    return spawn, proc


async def ended_abnormally(
    request: AttemptRequest, spawn: Spawn, proc: ProcessOutcome
) -> AttemptOutcome | None:
    """The outcome of a program whose run ended other than by its own exit: its timeout, a
    stall, a limit or what the sandbox refused (``isolate_error``), a signal. None when it
    exited by itself (its exit code and output are then the kind's to judge)."""
    from .isolation import isolate_error

    metrics = metrics_of(proc)
    if proc.timed_out:
        return timed_out(request.timeout, exit_code=proc.exit_code, metrics=metrics)
    if proc.stalled and request.stall_timeout is not None:
        return stalled(request.stall_timeout, exit_code=proc.exit_code, metrics=metrics)
    stderr = request.stderr_path
    if (error := await isolate_error(request.envelope, spawn, proc, stderr)) is not None:
        return AttemptOutcome("failed", exit_code=proc.exit_code, metrics=metrics, error=error)
    if proc.signal is not None:
        try:
            name = signal.Signals(proc.signal).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {proc.signal}"
        error = ErrorInfo(kind="exit_code", message=f"killed by {name}")
        return AttemptOutcome("failed", metrics=metrics, error=error)
    return None


def metrics_of(proc: ProcessOutcome) -> Metrics:
    """What the program used, as the result's ``metrics`` say it."""
    return Metrics(
        cpu_user_s=proc.cpu_user_s, cpu_system_s=proc.cpu_system_s, max_rss_kb=proc.max_rss_kb
    )


async def _judge(request: AttemptRequest, spawn: Spawn, proc: ProcessOutcome) -> AttemptOutcome:
    """How the program's run ended: its timeout, a limit, a signal, its exit code, its output."""
    if (ended := await ended_abnormally(request, spawn, proc)) is not None:
        return ended
    metrics, stderr = metrics_of(proc), request.stderr_path
    if proc.exit_code != 0:
        tail = await anyio.to_thread.run_sync(last_line, stderr)
        message = f"exited with code {proc.exit_code}" + (f": {tail}" if tail else "")
        failure = ErrorInfo(kind="exit_code", message=message)
        return AttemptOutcome("failed", exit_code=proc.exit_code, metrics=metrics, error=failure)
    output, error = await anyio.to_thread.run_sync(
        read_output, request.output_path, request.run_dir
    )
    if error is not None:
        return AttemptOutcome("failed", exit_code=0, metrics=metrics, error=error)
    return AttemptOutcome("succeeded", exit_code=0, output=output, metrics=metrics)


def _program(program: str) -> str | None:
    """What *program* resolves to, symlinks followed (None: a NUL byte, it cannot start)."""
    with contextlib.suppress(ValueError):
        return os.path.realpath(program) if os.path.isabs(program) else program
    return None


def _substitute(arg: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def _file_fingerprint(path: Path) -> str | None:
    """A small file's SHA-256, a large one's size and modification time, or None."""
    try:
        info = path.stat()
        if not path.is_file():
            return None
        if info.st_size <= 4 * 1024 * 1024:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        return f"{info.st_size}:{info.st_mtime_ns}"
    except (OSError, ValueError):  # ValueError: a NUL byte (the task fails to spawn, later)
        return None
