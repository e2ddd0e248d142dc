"""OpenAI Codex CLI, run headless: ``codex exec --json`` (JSON Lines events).

Checked against codex-cli 0.171.0 (npm ``@openai/codex``): every flag below is in
``codex exec --help``, and the fixtures in tests/fixtures/presets/codex/ are its real output,
captured against a local stand-in for the Responses API; also against openai/codex
docs/exec.md and codex-rs/exec/src/exec_events.rs (@08a1f30), which define the events.

Command line::

    codex exec --json --sandbox workspace-write --skip-git-repo-check [-m MODEL] - [ARGS...]

The prompt goes to stdin: ``-`` (or no prompt argument) makes ``codex exec`` read its
instructions there. ``--sandbox workspace-write`` lets it edit the working directory (the
task's worktree) and run commands in Codex's own sandbox; ``exec`` never asks for approval
(its policy is ``never``), and ``--full-auto`` is gone from 0.171.0's help.
``--skip-git-repo-check`` lets a task without a repository run too. Codex cannot write
``.git`` in that sandbox, so it commits nothing itself. The user's own ``--sandbox`` in
``args`` replaces the preset's (0.171.0 refuses ``--sandbox`` given twice: "cannot be used
multiple times"): ``args: [--sandbox, read-only]`` is the cautious setting.

What is parsed: ``thread.started`` (``thread_id``, the session id), ``item.completed`` items
of type ``agent_message`` (the last one's ``text`` is the task's ``result``),
``file_change`` (``changes[].path``/``kind``) and ``command_execution`` (``command``,
``exit_code``, ``status``), the last ``turn.completed``'s ``usage`` (``input_tokens``, which
includes ``cached_input_tokens``; ``cache_write_input_tokens`` where given;
``output_tokens``), ``turn.failed`` (``error.message``) and ``error`` events. The usage of
``turn.completed`` is the thread's total so far, so the last one is taken, never a sum.
Other events and item types (reasoning, todo_list, web_search, mcp_tool_call, the
non-fatal ``error`` item...) are ignored.

Error kinds: a ``turn.failed`` (or, with no terminal event, the last ``error``) whose
message says 401, "Unauthorized", "Not logged in", an incorrect API key or a missing
environment variable (a model provider's key) ->
``auth``; 429, "rate limit", "Quota exceeded", "usage limit" -> ``rate_limited``; any other
-> ``agent_error``. ``error`` events followed by ``turn.completed`` were retries
("Reconnecting... 2/5"), not failures. No terminal event -> ``exit_code`` (nonzero exit)
or ``invalid_output``.

Not known: the cost (Codex reports none: ``cost_usd`` and ``cost_source`` are null), the
model (the events do not name it), the number of model round-trips.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from envelopes import ErrorInfo

from ._protocol import Invocation, ModulePreset, Parsed, given
from ._reading import (
    classify,
    count,
    failure,
    guarded,
    ident,
    json_objects,
    make_usage,
    one_line,
    text,
    uncached,
)

__all__ = ["CHECKED_WITH", "PRESET", "SANDBOX", "invocation", "parse", "read_output"]

#: What ``checked_with`` says: the CLI version and the source the preset follows.
CHECKED_WITH = "codex-cli 0.171.0 (--help, real output); openai/codex exec_events.rs @08a1f30"

#: Most file changes and commands listed in the output.
MAX_LISTED = 200
_HINT = "run `codex login`, or set CODEX_API_KEY"
#: Where Codex may write and run commands: the worktree, in its own sandbox. The user's own
#: ``--sandbox`` in ``args`` replaces it (0.171.0 refuses ``--sandbox`` given twice).
SANDBOX = ("--sandbox", "workspace-write")


def invocation(
    *, program: str, prompt: str, prompt_file: Path, model: str | None, args: Sequence[str]
) -> Invocation:
    """``codex exec --json`` in the workspace-write sandbox, the prompt on stdin."""
    argv = [program, "exec", "--json"]
    if not given(args, "--sandbox", "-s"):
        argv += SANDBOX
    argv += ["--skip-git-repo-check"]
    if model is not None:
        argv += ["-m", model]
    return Invocation(argv=[*argv, "-", *args], prompt_on_stdin=True)


class _Thread:
    """What the events of one ``codex exec`` said."""

    def __init__(self) -> None:
        self.thread_id: str | None = None
        self.message: str | None = None
        self.usage: dict[str, Any] | None = None
        self.ended: str | None = None  # "completed" or "failed": the last terminal event
        self.failure: str | None = None
        self.last_error: str | None = None
        self.file_changes: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []

    def read(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "thread.started":
            self.thread_id = ident(event.get("thread_id")) or self.thread_id
        elif kind == "item.completed" and isinstance(event.get("item"), dict):
            self._item(event["item"])
        elif kind == "turn.completed":
            self.ended = "completed"
            usage = event.get("usage")
            self.usage = usage if isinstance(usage, dict) else self.usage
        elif kind == "turn.failed":
            self.ended = "failed"
            error = event.get("error")
            message = text(error.get("message"), 2000) if isinstance(error, dict) else None
            self.failure = message or "the turn failed"
        elif kind == "error":
            self.last_error = text(event.get("message"), 2000) or self.last_error

    def _item(self, item: dict[str, Any]) -> None:
        kind = item.get("type")
        if kind == "agent_message":
            self.message = text(item.get("text")) or self.message
        elif kind == "file_change" and isinstance(item.get("changes"), list):
            for change in item["changes"]:
                if isinstance(change, dict) and len(self.file_changes) < MAX_LISTED:
                    path, how = text(change.get("path"), 4096), ident(change.get("kind"))
                    if path is not None:
                        self.file_changes.append({"path": path, "kind": how})
        elif kind == "command_execution" and len(self.commands) < MAX_LISTED:
            command = text(item.get("command"), 4096)
            if command is not None:
                status = ident(item.get("status"))
                exit_code = _exit_code(item.get("exit_code"))
                self.commands.append({"command": command, "exit_code": exit_code, "status": status})


def _exit_code(value: Any) -> int | None:
    """*value* when it is a plausible exit code (an int, not a bool, that fits 32 bits)."""
    if isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31:
        return value
    return None


def _usage(thread: _Thread) -> Any:
    tokens = thread.usage or {}
    total_input = count(tokens.get("input_tokens"))
    cached = count(tokens.get("cached_input_tokens"))
    output = count(tokens.get("output_tokens"))
    return make_usage(
        input_tokens=uncached(total_input, cached),
        output_tokens=output,
        cache_read_tokens=cached,
        cache_write_tokens=count(tokens.get("cache_write_input_tokens")),
        total_tokens=total_input + output
        if total_input is not None and output is not None
        else None,
        session_id=thread.thread_id,
    )


def _failed(message: str) -> ErrorInfo:
    # "Missing environment variable: `OPENAI_API_KEY`." is a model provider's key not given.
    missing_key = "missing environment variable" in message.lower()
    kind = classify(message) or ("auth" if missing_key else "agent_error")
    hint = f" ({_HINT})" if kind == "auth" else ""
    return failure(kind, f"codex: {message}{hint}")


def _error(thread: _Thread, stderr_tail: str, exit_code: int | None) -> ErrorInfo | None:
    if thread.ended == "failed":
        return _failed(thread.failure or "the turn failed")
    if thread.ended == "completed":
        if exit_code:
            detail = one_line(stderr_tail) or "after its turn completed"
            return failure(
                classify(stderr_tail) or "exit_code", f"codex exited with {exit_code}: {detail}"
            )
        return None
    if thread.last_error:
        return _failed(thread.last_error)
    if exit_code:
        detail = one_line(stderr_tail) or "no turn.completed event"
        return failure(
            classify(stderr_tail) or "exit_code", f"codex exited with {exit_code}: {detail}"
        )
    return failure("invalid_output", "codex printed no turn.completed event (--json)")


def read_output(stdout: bytes, stderr_tail: str, exit_code: int | None) -> Parsed:
    """What *stdout*, the last line of stderr and the exit code say; :data:`parse` is this
    function made total (it cannot raise), and the tests check that it never has to be."""
    thread = _Thread()
    for event in json_objects(stdout):
        thread.read(event)
    error = _error(thread, stderr_tail, exit_code)
    output = None
    if thread.ended is not None or thread.thread_id is not None:
        output = {
            "result": thread.message,
            "session_id": thread.thread_id,
            "is_error": thread.ended != "completed",
            "file_changes": thread.file_changes,
            "commands": thread.commands,
        }
    return Parsed(output=output, usage=_usage(thread), error=error)


parse = guarded("codex", read_output)


#: The ``codex`` preset.
PRESET = ModulePreset(
    name="codex", program="codex", checked_with=CHECKED_WITH, build=invocation, read=parse
)
