"""What a preset is: how to start its CLI headless (:class:`Invocation`) and what its output
said (:class:`Parsed`), behind one small interface (:class:`Preset`); and :func:`given`, for
an invocation that leaves a setting to the user's ``args``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from envelopes import ErrorInfo, Usage

__all__ = ["Invocation", "Parsed", "Preset", "given"]


@dataclass(frozen=True)
class Invocation:
    """How to start the agent: its command line, and whether the prompt goes to its stdin.

    ``argv`` starts with the program as the caller gave it, then the preset's flags, then the
    user's ``args``. With ``prompt_on_stdin`` the runner feeds the rendered prompt file to
    the process's stdin; otherwise the command line names the file (or the agent gets no
    prompt at all, which no preset does).
    """

    argv: list[str]
    prompt_on_stdin: bool


@dataclass(frozen=True)
class Parsed:
    """What an agent's output said: the task's output, what it spent, and why it failed.

    ``output`` is a JSON object for the task's output (``result``, the agent's final text,
    ``session_id``, ``is_error`` and what else the preset reads), None when nothing usable
    was printed. ``usage`` is None when the agent said nothing of what it spent. ``error``
    is None when the agent succeeded; otherwise its kind is ``auth`` (never retried),
    ``rate_limited`` (retried), ``turn_limit``, ``agent_error``, ``invalid_output`` (the
    output could not be read) or ``exit_code`` (a nonzero exit the output does not explain).
    """

    output: dict[str, Any] | None
    usage: Usage | None
    error: ErrorInfo | None


class Preset(Protocol):
    """A coding agent's CLI, as the ``preset`` kind runs it headless and reads its output.

    ``invocation`` and ``parse`` are pure functions: no I/O, no clock, no environment.
    ``parse`` never raises: garbage is an ``invalid_output`` error.
    """

    #: The preset's name in a plan: ``claude-code``, ``codex``, ``gemini``, ``aider``.
    name: str
    #: The program looked up on the task's PATH when the plan names none.
    program: str
    #: The CLI version (and doc or source revision) the command line and parser follow.
    checked_with: str
    #: What the CLI writes into its working directory for itself (a cache), as glob patterns
    #: of names there: what an attempt made of them is removed when it ends, before the
    #: task's commit could take it.
    scratch: tuple[str, ...]

    def invocation(
        self,
        *,
        program: str,
        prompt: str,
        prompt_file: Path,
        model: str | None,
        args: Sequence[str],
    ) -> Invocation:
        """The command line that runs *program* headless on the prompt in *prompt_file*."""
        ...

    def parse(self, *, stdout: bytes, stderr_tail: str, exit_code: int | None) -> Parsed:
        """What the agent's *stdout* (and the last line of its stderr, and its exit code) say."""
        ...


@dataclass(frozen=True)
class ModulePreset:
    """A preset made of one module's two pure functions: every built-in preset is one.

    *build* is the module's ``invocation`` (keyword arguments as :meth:`Preset.invocation`
    takes them), *read* its guarded parser ``(stdout, stderr_tail, exit_code) -> Parsed``.
    """

    name: str
    program: str
    checked_with: str
    build: Callable[..., Invocation]
    read: Callable[[bytes, str, int | None], Parsed]
    scratch: tuple[str, ...] = ()

    def invocation(
        self,
        *,
        program: str,
        prompt: str,
        prompt_file: Path,
        model: str | None,
        args: Sequence[str],
    ) -> Invocation:
        """The module's command line (see its docstring)."""
        return self.build(
            program=program, prompt=prompt, prompt_file=prompt_file, model=model, args=args
        )

    def parse(self, *, stdout: bytes, stderr_tail: str, exit_code: int | None) -> Parsed:
        """The module's reading of the agent's output; never raises."""
        return self.read(stdout, stderr_tail, exit_code)


def given(args: Sequence[str], *flags: str) -> bool:
    """Whether the user's *args* give one of *flags* (``--flag value`` or ``--flag=value``):
    then the preset leaves that setting to them rather than pass its own."""
    return any(arg.split("=", 1)[0] in flags for arg in args)
