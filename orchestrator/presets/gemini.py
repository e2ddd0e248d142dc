"""Gemini CLI, run headless: ``gemini -p`` with its stream-json output.

Checked against Gemini CLI 0.61.0 (npm ``@google/gemini-cli``): every flag below is in its
``--help``, and the fixtures in tests/fixtures/presets/gemini/ are its real output, captured
against a local stand-in for the Gemini API; also against google-gemini/gemini-cli
docs/cli/headless.md (@0e5aa96) and, for what the docs do not say, the 0.61.0 bundle itself
(``readStdin``, ``handleError``, ``convertToStreamStats``, the ``Fatal*Error`` exit codes).

Command line::

    gemini -p "" --output-format stream-json --skip-trust --approval-mode yolo
           [-m MODEL] [ARGS...]

The prompt goes to stdin: in headless mode Gemini CLI reads piped stdin (up to 8 MiB) and
puts the ``-p`` text after it; ``-p ""`` adds nothing and makes the run headless. stream-json
rather than ``-o json``: in 0.61.0 the json format writes a failure's JSON to stderr (stdout
stays empty), while stream-json writes every failure as its ``result`` event on stdout, and
names the session in its first event. ``--skip-trust`` trusts the task's worktree for this
run (0.61.0 stops in an untrusted folder with exit code 55).

Approvals: headless, a tool that would ask is denied. Under ``auto_edit`` the shell tool
is not even registered (checked against 0.61.0 with a stand-in API: a
``run_shell_command`` call ends "Tool not found"), so the agent could not run the tests it
writes; ``--approval-mode yolo`` approves every tool, and the shell command runs. (The
docs say yolo turns Gemini's own sandbox on; 0.61.0's ``loadSandboxConfig`` reads only
``--sandbox``, ``GEMINI_SANDBOX`` and the settings.) What contains the agent is the
orchestrator's isolation (its own worktree and venv; a ``sandbox: bwrap`` task), not the
CLI. The user's own ``--approval-mode`` (or ``--yolo``) in ``args`` replaces the preset's:
``args: [--approval-mode, auto_edit]`` is the cautious setting (edits only). Given twice,
0.61.0 fails ("Invalid approval mode: yolo,auto_edit"), hence the replacing.

What is parsed: ``init`` (``session_id``, ``model``), ``assistant`` ``message`` events (their
``content``, joined, is the task's ``result``), ``tool_use``/``tool_result`` (counted),
``result`` (``status``, ``error.message``, ``stats``: ``input`` -- input tokens not read from
the cache --, ``cached``, ``output_tokens``, ``total_tokens``, and ``models``, whose
largest entry names the model). The ``-o json`` object (``session_id``, ``response``,
``stats.models.<model>.tokens``, ``error``) is read as well.

Error kinds, by exit code first: 41 -> ``auth``; 53 -> ``turn_limit``; 42 (input), 44
(sandbox), 52 (config), 54 (a tool failed), 55 (untrusted folder), 130 (cancelled) ->
``agent_error``. An API error exits with its HTTP status modulo 256 (0.61.0): 145 and 147
(401, 403) -> ``auth``, 173 (429) -> ``rate_limited``. Otherwise a ``result`` with
``status: error`` whose message says 401, UNAUTHENTICATED, an invalid key -> ``auth``;
429, RESOURCE_EXHAUSTED, quota -> ``rate_limited``; any other -> ``agent_error``.

Not known: the cost (Gemini CLI reports none), the turns, and thought tokens in
stream-json (in ``total_tokens`` but in no other field).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from envelopes import ErrorInfo

from ._protocol import Invocation, ModulePreset, Parsed, given
from ._reading import (
    MAX_TEXT_CHARS,
    as_object,
    classify,
    count,
    failure,
    guarded,
    ident,
    json_document,
    json_objects,
    make_usage,
    one_line,
    text,
    uncached,
)

__all__ = [
    "APPROVAL",
    "CHECKED_WITH",
    "EXIT_CODES",
    "PRESET",
    "invocation",
    "parse",
    "read_output",
]

#: What ``checked_with`` says: the CLI version and the docs the preset follows.
CHECKED_WITH = "gemini-cli 0.61.0 (--help, real output, bundle); docs/cli/headless.md @0e5aa96"

#: Exit codes of Gemini CLI 0.61.0 (``FatalError`` subclasses, and HTTP status % 256).
EXIT_CODES: dict[int, tuple[str, str]] = {
    41: ("auth", "not authenticated"),
    42: ("agent_error", "its input was refused"),
    44: ("agent_error", "its sandbox failed"),
    52: ("agent_error", "its configuration is invalid"),
    53: ("turn_limit", "reached its maximum session turns (model.maxSessionTurns)"),
    54: ("agent_error", "a tool failed"),
    55: ("agent_error", "the folder is not trusted"),
    130: ("agent_error", "cancelled"),
    145: ("auth", "HTTP 401"),
    147: ("auth", "HTTP 403"),
    173: ("rate_limited", "HTTP 429"),
}
_HINT = "set GEMINI_API_KEY, or sign in once with `gemini`"
#: What the agent may do without asking (the sandbox, not the CLI, contains it): every tool,
#: shell commands included. The user's own ``--approval-mode`` in ``args`` replaces it.
APPROVAL = ("--approval-mode", "yolo")


def invocation(
    *, program: str, prompt: str, prompt_file: Path, model: str | None, args: Sequence[str]
) -> Invocation:
    """``gemini -p ""`` in stream-json, every tool approved, the prompt on stdin."""
    argv = [program, "-p", "", "--output-format", "stream-json", "--skip-trust"]
    if not given(args, "--approval-mode", "--yolo", "-y"):
        argv += APPROVAL
    if model is not None:
        argv += ["-m", model]
    return Invocation(argv=[*argv, *args], prompt_on_stdin=True)


class _Run:
    """What Gemini CLI printed: its events, or its one JSON object."""

    def __init__(self) -> None:
        self.session_id: str | None = None
        self.model: str | None = None
        self.parts: list[str] = []
        self.size = 0
        self.tool_calls = 0
        self.status: str | None = None
        self.message: str | None = None
        self.code: int | None = None
        self.usage: dict[str, Any] = {}

    def read(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "init":
            self.session_id = ident(event.get("session_id")) or self.session_id
            self.model = ident(event.get("model")) or self.model
        elif kind == "message" and event.get("role") == "assistant":
            self._say(text(event.get("content")))
        elif kind == "tool_use":
            self.tool_calls += 1
        elif kind == "result":
            self.status = ident(event.get("status")) or "unknown"
            self._error(event.get("error"))
            stats = event.get("stats")
            self.usage = _stream_usage(stats) if isinstance(stats, dict) else {}

    def read_document(self, document: dict[str, Any]) -> None:
        self.session_id = ident(document.get("session_id"))
        self._say(text(document.get("response")))
        stats = document.get("stats")
        self.usage = _json_usage(stats) if isinstance(stats, dict) else {}
        if self._error(document.get("error")):
            self.status = "error"
        elif "response" in document:
            self.status = "success"

    def _say(self, part: str | None) -> None:
        if part and self.size < MAX_TEXT_CHARS:
            self.parts.append(part[: MAX_TEXT_CHARS - self.size])
            self.size += len(self.parts[-1])

    def _error(self, error: Any) -> bool:
        if not isinstance(error, dict):
            return False
        self.message = text(error.get("message"), 2000) or ident(error.get("type")) or "error"
        self.code = count(error.get("code"))
        if ident(error.get("type")) == "FatalTurnLimitedError":
            self.code = 53
        return True


def _largest(models: dict[str, Any], size: Callable[[Any], Any]) -> str | None:
    entries = [(count(size(entry)) or 0, name) for name, entry in models.items()]
    named = [(total, name) for total, name in entries if ident(name)]
    return max(named)[1] if named else None


def _stream_usage(stats: dict[str, Any]) -> dict[str, Any]:
    models = as_object(stats.get("models"))
    cached = count(stats.get("cached"))
    given = count(stats.get("input"))
    return {
        "input_tokens": given
        if given is not None
        else uncached(count(stats.get("input_tokens")), cached),
        "cache_read_tokens": cached,
        "output_tokens": count(stats.get("output_tokens")),
        "total_tokens": count(stats.get("total_tokens")),
        "model": _largest(models, lambda e: e.get("total_tokens") if isinstance(e, dict) else None),
    }


def _json_usage(stats: dict[str, Any]) -> dict[str, Any]:
    models = as_object(stats.get("models"))
    tokens = [
        entry["tokens"]
        for entry in models.values()
        if isinstance(entry, dict) and isinstance(entry.get("tokens"), dict)
    ]

    def total(key: str) -> int | None:
        values = [count(t.get(key)) for t in tokens]
        known = [value for value in values if value is not None]
        return sum(known) if known else None

    def model_total(entry: Any) -> Any:
        return (
            entry["tokens"].get("total")
            if isinstance(entry, dict) and isinstance(entry.get("tokens"), dict)
            else None
        )

    return {
        "input_tokens": total("input"),
        "cache_read_tokens": total("cached"),
        "output_tokens": total("candidates"),
        "total_tokens": total("total"),
        "model": _largest(models, model_total),
    }


def _error(run: _Run, stderr_tail: str, exit_code: int | None) -> ErrorInfo | None:
    if run.status == "success":
        if not exit_code:
            return None
        detail = one_line(stderr_tail) or "after a successful result"
        return failure(
            classify(stderr_tail) or "exit_code", f"gemini exited with {exit_code}: {detail}"
        )
    known = EXIT_CODES.get(exit_code or 0) or EXIT_CODES.get(run.code or 0)
    detail = run.message or one_line(stderr_tail)
    if known is not None:
        kind, meaning = known
    elif run.status is not None:
        kind, meaning = classify(detail) or "agent_error", "failed"
    elif exit_code:
        kind, meaning = classify(stderr_tail) or "exit_code", f"exited with {exit_code}"
    else:
        return failure("invalid_output", "gemini printed no result event (stream-json)")
    hint = f" ({_HINT})" if kind == "auth" else ""
    return failure(kind, f"gemini {meaning}: {detail or 'no message'}{hint}")


def read_output(stdout: bytes, stderr_tail: str, exit_code: int | None) -> Parsed:
    """What *stdout*, the last line of stderr and the exit code say; :data:`parse` is this
    function made total (it cannot raise), and the tests check that it never has to be."""
    run = _Run()
    first_line = stdout.lstrip()[:64].split(b"\n", 1)[0].strip()
    document = json_document(stdout) if first_line == b"{" else None
    if document is not None:
        run.read_document(document)
    else:
        for event in json_objects(stdout):
            run.read(event)
    usage = make_usage(
        **{**run.usage, "model": run.usage.get("model") or run.model}, session_id=run.session_id
    )
    output = None
    if run.status is not None or run.session_id is not None:
        output = {
            "result": "".join(run.parts) if run.parts else None,
            "session_id": run.session_id,
            "is_error": run.status != "success",
            "tool_calls": run.tool_calls,
        }
    return Parsed(output=output, usage=usage, error=_error(run, stderr_tail, exit_code))


parse = guarded("gemini", read_output)


#: The ``gemini`` preset.
PRESET = ModulePreset(
    name="gemini", program="gemini", checked_with=CHECKED_WITH, build=invocation, read=parse
)
