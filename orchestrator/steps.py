"""Setup steps and checks: the commands a plan runs before a task's agent and after it.

A step runs as the agent's program does (:func:`orchestrator.command_agent.run_program`): in
the task's worktree, with its venv first on PATH and its environment, under its isolation
(sandbox, network, limits: a check runs code the agent wrote), with its own timeout, which
ends its whole process group. Its stdout and stderr are logs of the run directory, hashed
and masked as an attempt's are, named ``logs/<task>.<phase>-<name>.<turn>.stdout``. Each step
that ran is a :class:`~envelopes.CheckResult` of the task's result.

A setup step runs before each attempt's agent (a retry starts from a clean worktree, so its
setup runs again); a required one that fails ends the attempt, kind ``setup``, the agent not
run. The checks run after an attempt whose agent succeeded, all of them; when a required one
fails the attempt fails, kind ``check``, and the lifecycle may give the agent a repair turn.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio

from envelopes import CheckResult, ErrorInfo, Step, fill_placeholders

from .attempt import AttemptOutcome, AttemptRequest, log_entries

if TYPE_CHECKING:
    from .secrets import Masker

__all__ = [
    "MAX_TAIL_BYTES",
    "Phase",
    "StepRun",
    "failure_of",
    "how_it_ended",
    "run_steps",
    "step_argv",
    "tail_of",
]

#: Most bytes of a failed step's output given to the next turn's prompt (its end).
MAX_TAIL_BYTES = 4096
#: Lines of a failed step's output quoted in the task's error message.
MESSAGE_LINES = 5

#: A hook of the plan (orchestrator/workspace.py) runs as a step too, phase ``hook``.
Phase = Literal["setup", "check", "hook"]


@dataclass(frozen=True)
class StepRun:
    """A step as it ran: its record, and the end of its output (masked) when it failed."""

    record: CheckResult
    tail: str = ""


def step_argv(step: Step, values: Mapping[str, str]) -> list[str]:
    """The command *step* runs, its placeholders filled in from *values*: an argv list as it
    is, a shell string as ``/bin/sh -c`` with each value quoted for the shell."""
    if isinstance(step.run, str):
        return ["/bin/sh", "-c", fill_placeholders(step.run, values, shlex.quote)]
    return [fill_placeholders(arg, values) for arg in step.run]


async def run_steps(
    steps: Sequence[Step],
    phase: Phase,
    *,
    turn: int,
    request: AttemptRequest,
    values: Mapping[str, str],
    masker: Masker,
    log_stem: Path,
) -> list[StepRun]:
    """Run *steps* in order for *turn*: every check; setup steps until a required one fails.

    *request* is the turn's attempt request (its environment, cwd and isolation); each step
    gets its own logs (named from *log_stem*, ``logs/<task>``) and time limit. Cancellation:
    the running step's process group is ended, and the cancellation propagates.
    """
    runs: list[StepRun] = []
    for step in steps:
        ran = await _run_step(step, phase, turn, request, values, masker, log_stem)
        runs.append(ran)
        if phase == "setup" and step.required and not ran.record.passed:
            break
    return runs


async def _run_step(
    step: Step,
    phase: Phase,
    turn: int,
    request: AttemptRequest,
    values: Mapping[str, str],
    masker: Masker,
    log_stem: Path,
) -> StepRun:
    from .command_agent import run_program

    name = f"{log_stem.name}.{phase}-{step.name}.{turn}"
    stdout, stderr = log_stem.with_name(name + ".stdout"), log_stem.with_name(name + ".stderr")
    # A step has no output: what it writes where the agent's would go is thrown away (it
    # would stay in the run directory unmasked).
    trash = log_stem.with_name(name + ".output")
    env = {key: value for key, value in request.env.items() if key != "ORCHESTRATOR_OUTPUT"}
    own = dataclasses.replace(
        request,
        stdout_path=stdout,
        stderr_path=stderr,
        output_path=trash,
        env=env,
        time_limit=step.timeout,
    )
    argv = step_argv(step, values)
    start = time.monotonic()
    try:
        ran = await run_program(own, argv)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: trash.unlink(missing_ok=True))
    duration = round(time.monotonic() - start, 6)
    if isinstance(ran, AttemptOutcome):  # it could not start: as a program failing, 127
        await anyio.to_thread.run_sync(_note, stderr, ran.error)
        exit_code, timed_out = None, False
    else:
        exit_code, timed_out = ran[1].exit_code, ran[1].timed_out
    out, err, _ = await anyio.to_thread.run_sync(
        log_entries, stdout, stderr, request.run_dir, masker
    )
    passed = exit_code == 0 and not timed_out
    record = CheckResult(
        name=step.name,
        phase=phase,
        turn=turn,
        command=[masker.text(a) for a in argv],
        exit_code=exit_code,
        passed=passed,
        required=step.required,
        timed_out=timed_out,
        duration_s=duration,
        stdout=out,
        stderr=err,
    )
    tail = "" if passed else await anyio.to_thread.run_sync(tail_of, stdout, stderr)
    return StepRun(record, tail)


def _note(stderr: Path, error: ErrorInfo | None) -> None:
    """Why a step could not start, as its stderr log (so that its record says it)."""
    stderr.write_text((error.message if error else "it could not start") + "\n", "utf-8")


def tail_of(stdout: Path, stderr: Path, limit: int = MAX_TAIL_BYTES) -> str:
    """The end of a step's output: its stdout's last *limit* bytes, or its stderr's when it
    wrote nothing on stdout (pytest's summary is at the end of stdout; a crash is on stderr)."""
    for path in (stdout, stderr):
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - limit))
                data = f.read(limit)
        except OSError:
            continue
        text = data.decode("utf-8", "replace").strip()
        if text:
            return text
    return ""


def how_it_ended(record: CheckResult) -> str:
    """How a step that did not pass ended, in words: ``timed out``, ``could not start`` or
    ``exit code N``."""
    if record.timed_out:
        return "timed out"
    if record.exit_code is None:
        return "could not start"
    return f"exit code {record.exit_code}"


def failure_of(run: StepRun) -> ErrorInfo:
    """The task's error when *run*, a required step, failed: kind ``setup``, ``check`` or
    ``hook``, naming the step, its exit code (or its timeout) and the last lines of its output."""
    record = run.record
    how = how_it_ended(record)
    if record.exit_code is not None and not record.timed_out:
        how = f"failed with {how}"
    lines = [line for line in run.tail.splitlines() if line.strip()][-MESSAGE_LINES:]
    what = f"hook {record.name}" if record.phase == "hook" else f"{record.phase} step {record.name}"
    message = f"{what} {how}"
    if lines:
        message += ": " + "\n".join(lines)
    return ErrorInfo.model_validate({"kind": record.phase, "message": message[:2000]})
