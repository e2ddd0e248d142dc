"""The ``preset`` kind: a real coding agent (Claude Code, Codex, Gemini CLI, Aider) run headless.

A plan's ``agents: {claude: {preset: claude-code, model: ..., args: [...]}}`` becomes a
:class:`PresetAgent`. Each attempt renders the task's prompt (orchestrator/prompts.py) into
``logs/<task>.attempt-<n>.prompt`` (its digest goes into the provenance), starts the preset's
program on the task's PATH (or ``program:``) with the flags its preset module gives
(orchestrator/presets/), under the task's isolation as a command is, and reads the agent's
machine-readable output into the task's output, its usage and, when it failed, an error of a
kind a user can act on (``auth``, ``rate_limited``, ``turn_limit``, ``agent_error``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from envelopes import (
    AgentInfo,
    AgentSpec,
    Metrics,
    TaskStatus,
    digest,
    env_values,
    open_regular,
)

from ._fs import last_line
from .attempt import AttemptOutcome, AttemptRequest, Prompt, give_prompt
from .command_agent import ended_abnormally, metrics_of, run_program
from .presets import PRESETS, Preset

__all__ = ["MAX_AGENT_STDOUT_BYTES", "PresetAgent", "remove_scratch", "scratch_names"]

#: Most of an agent's stdout its preset's parser reads (the log keeps what the limits allow).
MAX_AGENT_STDOUT_BYTES = 64 << 20


@dataclass(frozen=True)
class PresetAgent:
    """A coding agent its preset knows how to run headless and read."""

    preset: str
    program: str | None = None
    model: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    #: A program, which can be sandboxed.
    in_process = False
    #: Its stdout (the agent's machine-readable output) and stderr go to the log files.
    writes_logs = True

    @classmethod
    def from_spec(cls, spec: AgentSpec) -> PresetAgent:
        """The agent a plan's ``agents`` entry with a ``preset`` describes."""
        if spec.preset is None:
            raise ValueError("a preset agent needs a preset")
        if spec.preset not in PRESETS:
            known = ", ".join(sorted(PRESETS))
            raise ValueError(f"unknown preset {spec.preset!r} (known: {known})")
        return cls(
            preset=spec.preset,
            program=spec.program,
            model=spec.model,
            args=tuple(spec.args),
            env=env_values(spec.env),
        )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PresetAgent:
        """The agent of ``{"preset": ..., "model": ..., "args": [...], "program": ...}``."""
        from .command_agent import refuse_task_settings

        spec = AgentSpec.model_validate(dict(options))
        refuse_task_settings(spec, "the agent", allowed={"preset", "program", "model", "args"})
        return cls.from_spec(spec)

    @property
    def _preset(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def program_name(self) -> str:
        """The program it runs: ``program``, else its preset's (looked up on the PATH)."""
        return self.program or self._preset.program

    def _configured(self) -> list[str]:
        """The agent as configured: what ``info`` and the fingerprint describe."""
        words = [f"preset={self.preset}", f"program={self.program_name}"]
        if self.model is not None:
            words.append(f"model={self.model}")
        return [*words, *self.args]

    def info(self, program: str | None = None) -> AgentInfo:
        """Provenance: the preset, model and extra arguments, and the program it ran."""
        return AgentInfo(kind="preset", command=self._configured(), program=program)

    def fingerprint(self, plan_dir: Path) -> str:
        """What decides what the agent does: preset (and the version its parser follows),
        program (its file, when found), model, arguments and env. Blocking."""
        program = self.program_name
        found = program if os.sep in program else shutil.which(program)
        stat: list[int] | None = None
        if found is not None:
            try:
                info = os.stat(found)
                stat = [info.st_size, info.st_mtime_ns]
            except OSError:
                stat = None
        return digest(
            {
                "preset": self.preset,
                "checked_with": self._preset.checked_with,
                "configured": self._configured(),
                "program": [found, stat],
                "env": dict(self.env),
            }
        )

    async def run_attempt(self, request: AttemptRequest) -> AttemptOutcome:
        """Render the prompt, run the agent headless, and read what it reported; then remove
        what the CLI left in the working directory for itself (its preset's ``scratch``)."""
        prompt = await give_prompt(request)
        if isinstance(prompt, AttemptOutcome):
            return prompt
        patterns = self._preset.scratch
        if not patterns:
            return await self._run(request, prompt)
        before = await anyio.to_thread.run_sync(scratch_names, request.cwd, patterns)
        try:
            return await self._run(request, prompt)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_scratch, request.cwd, patterns, before)

    async def _run(self, request: AttemptRequest, prompt: Prompt) -> AttemptOutcome:
        """Run the program on the prompt, and read what it printed."""
        prompt_file, prompt_sha256 = prompt.path, prompt.sha256
        # As a command's program is: {plan_dir} filled in, a relative path from the plan's
        # directory, a bare name looked up on the task's PATH.
        program = self.program_name
        program = program.replace("{plan_dir}", str(request.plan_dir))
        if os.sep in program and not os.path.isabs(program):
            program = str((request.plan_dir / program).absolute())
        elif os.sep not in program:
            program = shutil.which(program, path=request.env.get("PATH", "")) or program
        invocation = self._preset.invocation(
            program=program,
            prompt=prompt.text,
            prompt_file=prompt_file,
            model=self.model,
            args=self.args,
        )
        argv = invocation.argv
        request.record_command(argv, os.path.realpath(argv[0]) if os.sep in argv[0] else argv[0])
        prompt_on_stdin = prompt_file if invocation.prompt_on_stdin else None
        ran = await run_program(request, argv, stdin=prompt_on_stdin)
        if isinstance(ran, AttemptOutcome):
            return replace(ran, prompt_sha256=prompt_sha256)
        spawn, proc = ran
        outcome = await ended_abnormally(request, spawn, proc)
        if outcome is None:
            outcome = await self._read(request, proc.exit_code, metrics_of(proc))
        return replace(outcome, prompt_sha256=prompt_sha256)

    async def _read(
        self, request: AttemptRequest, exit_code: int | None, metrics: Metrics
    ) -> AttemptOutcome:
        """The agent's report, as its preset reads its stdout (and the last line of stderr)."""

        def read() -> tuple[bytes, str]:
            relative = request.stdout_path.relative_to(request.run_dir).as_posix()
            try:
                stdout = _tail(relative, MAX_AGENT_STDOUT_BYTES, request.run_dir)
            except OSError:
                stdout = b""  # replaced by a link or a FIFO: nothing of it is read
            return stdout, last_line(request.stderr_path)

        stdout, stderr_tail = await anyio.to_thread.run_sync(read)
        # In a thread: up to 64 MiB of an agent's output is parsed, the event loop goes on.
        parsed = await anyio.to_thread.run_sync(
            lambda: self._preset.parse(stdout=stdout, stderr_tail=stderr_tail, exit_code=exit_code)
        )
        usage = parsed.usage
        if usage is not None and usage.model is None and self.model is not None:
            usage = usage.model_copy(update={"model": self.model})  # for the plan's pricing
        status: TaskStatus = "succeeded" if parsed.error is None else "failed"
        return AttemptOutcome(
            status,
            exit_code=exit_code,
            output=parsed.output if parsed.error is None else None,
            error=parsed.error,
            metrics=metrics,
            usage=usage,
        )


def _tail(relative: str, limit: int, within: Path) -> bytes:
    """The last *limit* bytes of a regular file of *within* (the agent's report comes last)."""
    fd = open_regular(relative, within=within)
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - limit)
        chunks, offset = [], start
        while offset < start + limit:
            chunk = os.pread(fd, min(1 << 20, start + limit - offset), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def scratch_names(cwd: Path, patterns: Sequence[str]) -> set[str]:
    """The names in *cwd* that match one of *patterns* (globs). Blocking."""
    if not patterns:
        return set()
    try:
        names = os.listdir(cwd)
    except OSError:
        return set()
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def remove_scratch(cwd: Path, patterns: Sequence[str], before: set[str]) -> None:
    """Remove what matches *patterns* in *cwd* and was not there *before* (a repository that
    tracks such a file keeps it). A directory is removed without following a link in it
    (``shutil.rmtree`` works on file descriptors here), a link itself is unlinked. Blocking."""
    for name in sorted(scratch_names(cwd, patterns) - before):
        path = cwd / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
