"""One attempt of an agent: what it is given, what it returns, and the files it leaves.

An :class:`AttemptRequest` holds everything one attempt of any kind of agent may need (the
envelope, where it works, its environment, the paths of its output and log files, the run's
settings it obeys); an :class:`AttemptOutcome` is what the attempt came to. The agent kinds
(orchestrator/command_agent.py, orchestrator/callable_agent.py, and those to come) turn the
one into the other; the task's lifecycle (orchestrator/subagent.py) makes the request and
judges the outcome, without knowing which kind ran.

The helpers here are shared by every kind and by the lifecycle: the timeout outcome
(:func:`timed_out`), reading the output file an agent wrote (:func:`read_output`), and the
entries of an attempt's log files (:func:`log_entries`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from envelopes import (
    MAX_LOG_BYTES,
    MAX_VALUE_DEPTH,
    ErrorInfo,
    HandoffEnvelope,
    LogFile,
    Metrics,
    TaskStatus,
    Usage,
    canonical_json,
    hash_file,
    loads_bounded,
    read_bounded,
    sha256_hex,
)

from ._fs import write_file

if TYPE_CHECKING:
    from .lifeline import Lifeline
    from .prompts import Feedback
    from .repo import Repository
    from .secrets import Masker
    from .venv import Venv
    from .worktree import Worktree

__all__ = [
    "MAX_OUTPUT_BYTES",
    "AttemptOutcome",
    "AttemptRequest",
    "Prompt",
    "give_prompt",
    "log_entries",
    "read_output",
    "stalled",
    "timed_out",
]

#: Largest output JSON an agent may write.
MAX_OUTPUT_BYTES = 16 * 1024 * 1024


def _not_recorded(argv: Sequence[str], program: str | None) -> None:
    """A request made outside a task's lifecycle (a test, say) records nothing."""


@dataclass(frozen=True)
class AttemptRequest:
    """Everything one attempt of an agent may need; made by the lifecycle for each attempt.

    ``cwd`` is where the agent works: its worktree, or the repository when the task has none,
    or the run directory when there is no repository either. ``env`` is the agent's whole
    environment (the task's starting variables, the agent's own, the task's, the venv's and
    the ``ORCHESTRATOR_*`` ones). The files are the attempt's own, in the run directory.

    A kind that runs a program calls ``record_command(argv, program)`` before it starts it:
    the command goes into the provenance's ``commands`` and the program it resolved to into
    its ``AgentInfo``, even when the attempt is then cancelled.
    """

    envelope: HandoffEnvelope
    attempt: int
    run_id: str
    cwd: Path
    worktree: Worktree | None
    venv: Venv | None
    env: Mapping[str, str]
    envelope_path: Path
    output_path: Path
    stdout_path: Path
    stderr_path: Path
    run_dir: Path
    state_dir: Path
    plan_dir: Path
    repo: Repository | None
    kill_grace: float
    lifeline: Lifeline | None
    record_command: Callable[[Sequence[str], str | None], None] = field(default=_not_recorded)
    #: Why the previous turn failed (an attempt's error, or a check's); None on the first.
    feedback: Feedback | None = None
    #: Seconds this run may take, when not the envelope's ``timeout`` (a setup step's or a
    #: check's own); such a run is not watched for stalls.
    time_limit: float | None = None
    #: Writes the file at ``envelope_path`` when the envelope is only a record of the run's
    #: ``envelopes.jsonl`` so far (None: the file is there). Only an agent in this process
    #: is given such a request: one that starts a program calls it first.
    write_envelope: Callable[[], None] | None = None

    @property
    def task_id(self) -> str:
        """The task this attempt belongs to."""
        return self.envelope.task_id

    @property
    def timeout(self) -> float:
        """How long the attempt may take, in seconds (the envelope's ``timeout``, or the
        request's own ``time_limit``)."""
        return self.envelope.timeout if self.time_limit is None else self.time_limit

    @property
    def stall_timeout(self) -> float | None:
        """Seconds without output after which the program is stopped (the envelope's
        ``stall_timeout``; None for a step, which may rightly be quiet for long)."""
        return self.envelope.stall_timeout if self.time_limit is None else None

    @property
    def attempt_tag(self) -> str:
        """The ``ORCHESTRATOR_ATTEMPT_TAG`` of the attempt's processes: ``<run>/<task>/<n>``."""
        return f"{self.run_id}/{self.task_id}/{self.attempt}"


@dataclass(frozen=True)
class AttemptOutcome:
    """What one attempt came to: its status, and what the result says of it.

    ``output`` is the agent's output (a JSON object) when it succeeded; ``error`` says why
    it did not; ``exit_code`` is a program's, when it ran one.
    """

    status: TaskStatus
    exit_code: int | None = None
    output: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    metrics: Metrics = field(default_factory=Metrics)
    #: What the agent spent, where it says so (a preset's parser, or ``usage`` in an output).
    usage: Usage | None = None
    #: The digest of the prompt the attempt was given, for an agent that is given one.
    prompt_sha256: str | None = None


def timed_out(
    timeout: float, *, exit_code: int | None = None, metrics: Metrics | None = None
) -> AttemptOutcome:
    """The outcome of an attempt that ran out of its *timeout* (seconds)."""
    return AttemptOutcome(
        status="timed_out",
        exit_code=exit_code,
        metrics=metrics or Metrics(),
        error=ErrorInfo(kind="timeout", message=f"timed out after {timeout:g} s"),
    )


def stalled(
    stall_timeout: float, *, exit_code: int | None = None, metrics: Metrics | None = None
) -> AttemptOutcome:
    """The outcome of an attempt whose agent wrote nothing for *stall_timeout* seconds."""
    return AttemptOutcome(
        status="failed",
        exit_code=exit_code,
        metrics=metrics or Metrics(),
        error=ErrorInfo(
            kind="stalled", message=f"no output for {stall_timeout:g} s: the agent was stopped"
        ),
    )


def read_output(path: Path, run_dir: Path) -> tuple[dict[str, Any] | None, ErrorInfo | None]:
    """The agent's output file: a regular file of at most MAX_OUTPUT_BYTES, JSON of bounded depth.

    None and no error when there is no such file. The agent chose what is at that path: a
    link, a FIFO or a device is refused without being followed or read (kind
    ``invalid_output``), so neither can hang the run or fill memory. Blocking (a thread).
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


def log_entries(
    stdout: Path, stderr: Path, run_dir: Path, masker: Masker
) -> tuple[LogFile, LogFile, str | None]:
    """Entries for an attempt's two log files, and what an agent did to them, if anything.

    Empty files are made if the command never started. The agent had the files' paths (its
    /proc/self/fd): one it replaced with a link, a FIFO or a device is not followed or read;
    it is replaced by an empty file, and the problem is returned for the attempt's result.
    Blocking (a thread).
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


@dataclass(frozen=True)
class Prompt:
    """An attempt's rendered prompt: its text, the file it is saved in, and its digest."""

    text: str
    path: Path
    sha256: str


async def give_prompt(request: AttemptRequest) -> Prompt | AttemptOutcome:
    """Render the attempt's prompt (orchestrator/prompts.py: the envelope's template, else
    the default, with the previous attempt's feedback) and save it beside the attempt's logs
    as ``<task>.attempt-<n>.prompt``; its digest goes into the provenance. A kind that gives
    its agent a prompt calls this; the ``prompt`` failure when it cannot be rendered."""
    from .prompts import PromptError, render_prompt

    try:
        text = await anyio.to_thread.run_sync(
            lambda: render_prompt(
                request.envelope, attempt=request.attempt, feedback=request.feedback
            )
        )
    except PromptError as exc:
        return AttemptOutcome("failed", error=exc.info())
    data = text.encode("utf-8", "surrogatepass")
    path = request.stdout_path.with_suffix(".prompt")
    await anyio.to_thread.run_sync(write_file, path, data)
    return Prompt(text=text, path=path, sha256=sha256_hex(data))
