"""Claude Code, run headless: ``claude -p`` with its stream-json output.

Checked against Claude Code 2.1.197 (npm ``@anthropic-ai/claude-code``): every flag below is
in its ``--help``, and the fixtures in tests/fixtures/presets/claude-code/ are its real output,
captured against a local stand-in for the Messages API; also against the docs at
code.claude.com/docs/en/headless, cli-reference and permission-modes (2026-12) and the Agent
SDK's ``ResultMessage`` (anthropics/claude-agent-sdk-python @e8bde60, types.py).

Command line::

    claude -p --output-format stream-json --verbose --permission-mode acceptEdits
           --allowedTools Bash [--model MODEL] [ARGS...]

The prompt goes to stdin (``-p`` with no prompt argument reads it there), so a long prompt
never meets the argv limit. ``stream-json`` with ``-p`` needs ``--verbose``.

Permissions: headless, a tool that would ask is denied (and listed in the result's
``permission_denials``). ``acceptEdits`` alone lets the agent edit files and run common
file-system commands (mkdir, touch, mv, cp) but denies every other command: it could not
run the tests it writes (checked against 2.1.197 with a stand-in API: a ``python3 -c ...``
Bash call is denied under ``acceptEdits``, ``dontAsk`` and, without its classifier,
``auto``; runs with ``--allowedTools Bash`` added). So the preset adds ``--allowedTools
Bash``: edits and shell commands, no other tool that asks (web fetches, say).
``bypassPermissions`` would allow everything, but Claude Code refuses it as root (exit 1,
"cannot be used with root/sudo privileges"), as agents in containers often run. What
contains the agent is the orchestrator's isolation (its own worktree and venv; a
``sandbox: bwrap`` task), not the CLI. The user's own ``--permission-mode`` (or
``--dangerously-skip-permissions``) in ``args`` replaces both flags, their own
``--allowedTools`` the second: ``args: [--permission-mode, acceptEdits]`` is the cautious
setting (edits only), ``[--disallowedTools, Bash]`` too (a denial beats an allowance).

What is parsed: the last ``result`` message: ``result`` (the final text), ``session_id``,
``num_turns``, ``is_error``, ``subtype``, ``total_cost_usd`` (cost source ``reported``),
``usage`` (``input_tokens``, ``output_tokens``, ``cache_read_input_tokens``,
``cache_creation_input_tokens``), ``modelUsage`` (the model: the one that cost most),
``permission_denials`` (tool names), ``errors`` and ``api_error_status``; the ``init``
message's ``session_id`` and ``model`` when there is no result; the ``error`` field of an
assistant message (``authentication_failed``, ``rate_limit``, ``overloaded``,
``billing_error``...) and ``api_retry`` events, for the kind of a failure. The
``--output-format json`` object (the same ``result`` message alone) is read as well.

Error kinds: ``authentication_failed``, ``oauth_org_not_allowed`` or HTTP 401/403 ->
``auth``; ``rate_limit``, ``overloaded``, ``billing_error`` or HTTP 429/529 ->
``rate_limited``; subtype ``error_max_turns`` -> ``turn_limit``; any other ``is_error`` or
``error_*`` subtype -> ``agent_error``; no result message -> the last error seen, else
``exit_code`` (nonzero exit) or ``invalid_output``.

Not known: the cost of a run cut short before its result message (none is printed); which
tokens went to sub-agents' other models (only their sum and the costliest model are kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from envelopes import ErrorInfo

from ._protocol import Invocation, ModulePreset, Parsed, given
from ._reading import (
    as_object,
    classify,
    cost,
    count,
    failure,
    guarded,
    ident,
    json_objects,
    make_usage,
    one_line,
    text,
)

__all__ = ["CHECKED_WITH", "PERMISSIONS", "PRESET", "invocation", "parse", "read_output"]

#: What ``checked_with`` says: the CLI version and the docs the preset follows.
CHECKED_WITH = "claude 2.1.197 (--help, real output); code.claude.com/docs/en/headless 2026-12"

_AUTH_ERRORS = {"authentication_failed", "oauth_org_not_allowed"}
_RATE_ERRORS = {"rate_limit", "overloaded", "billing_error"}
_HINT = "log in with `claude` once, or set ANTHROPIC_API_KEY"


#: What the agent may do without asking (the sandbox, not the CLI, contains it): edit files
#: and run commands. The user's own ``--permission-mode`` replaces both, their own
#: ``--allowedTools`` the second.
PERMISSIONS = ("--permission-mode", "acceptEdits", "--allowedTools", "Bash")
_MODE_FLAGS = ("--permission-mode", "--dangerously-skip-permissions")
_ALLOW_FLAGS = (*_MODE_FLAGS, "--allowedTools", "--allowed-tools")


def invocation(
    *, program: str, prompt: str, prompt_file: Path, model: str | None, args: Sequence[str]
) -> Invocation:
    """``claude -p`` in stream-json, edits and commands allowed, the prompt on stdin."""
    argv = [program, "-p", "--output-format", "stream-json", "--verbose"]
    if not given(args, *_MODE_FLAGS):
        argv += PERMISSIONS[:2]
    if not given(args, *_ALLOW_FLAGS):
        argv += PERMISSIONS[2:]
    if model is not None:
        argv += ["--model", model]
    return Invocation(argv=[*argv, *args], prompt_on_stdin=True)


class _Seen:
    """What the stream said before (or instead of) its result message."""

    def __init__(self) -> None:
        self.session_id: str | None = None
        self.model: str | None = None
        self.api_error: str | None = None
        self.api_message: str | None = None
        self.result: dict[str, Any] | None = None

    def read(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        self.session_id = ident(event.get("session_id")) or self.session_id
        if kind == "result":
            self.result = event
        elif kind == "system" and event.get("subtype") == "init":
            model = ident(event.get("model"))
            self.model = model if model and not model.startswith("<") else self.model
        elif kind == "system" and event.get("subtype") == "api_retry":
            self.api_error = ident(event.get("error")) or self.api_error
        elif kind == "assistant" and ident(event.get("error")):
            self.api_error = ident(event.get("error"))
            self.api_message = _message_text(event.get("message")) or self.api_message


def _message_text(message: Any) -> str | None:
    """The text blocks of an assistant message, joined."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return None
    parts = [text(block.get("text")) for block in message["content"] if isinstance(block, dict)]
    return " ".join(part for part in parts if part) or None


def _model(model_usage: Any, fallback: str | None) -> str | None:
    """The model that cost most in ``modelUsage``; *fallback* when it names none."""
    if not isinstance(model_usage, dict):
        return fallback
    costs = [
        (cost(entry.get("costUSD")) or 0.0, name)
        for name, entry in model_usage.items()
        if ident(name) and isinstance(entry, dict)
    ]
    return max(costs, key=lambda pair: pair[0])[1] if costs else fallback


def _usage(result: dict[str, Any] | None, seen: _Seen) -> Any:
    if result is None:
        return make_usage(session_id=seen.session_id, model=seen.model)
    tokens = as_object(result.get("usage"))
    parts = {
        "input_tokens": count(tokens.get("input_tokens")),
        "output_tokens": count(tokens.get("output_tokens")),
        "cache_read_tokens": count(tokens.get("cache_read_input_tokens")),
        "cache_write_tokens": count(tokens.get("cache_creation_input_tokens")),
    }
    known = [value for value in parts.values() if value is not None]
    reported = cost(result.get("total_cost_usd"))
    return make_usage(
        **parts,
        total_tokens=sum(known) if known else None,
        cost_usd=reported,
        cost_source="reported" if reported is not None else None,
        turns=count(result.get("num_turns")),
        model=_model(result.get("modelUsage"), seen.model),
        session_id=ident(result.get("session_id")) or seen.session_id,
    )


def _output(result: dict[str, Any], seen: _Seen) -> dict[str, Any]:
    denials = result.get("permission_denials")
    denied = [
        name
        for entry in (denials if isinstance(denials, list) else [])[:100]
        if isinstance(entry, dict) and (name := ident(entry.get("tool_name")))
    ]
    is_error = result.get("is_error")
    return {
        "result": text(result.get("result")),
        "session_id": ident(result.get("session_id")) or seen.session_id,
        "is_error": is_error if isinstance(is_error, bool) else None,
        "subtype": ident(result.get("subtype")),
        "num_turns": count(result.get("num_turns")),
        "permission_denials": denied,
    }


def _error_kind(api_error: str | None, status: int | None) -> str:
    """The kind of a failed request, from Claude Code's own words for it (the final text
    may be the model's prose, which is not searched for words like "quota")."""
    if api_error in _AUTH_ERRORS or status in (401, 403):
        return "auth"
    if api_error in _RATE_ERRORS or status in (429, 529):
        return "rate_limited"
    return "agent_error"


def _result_error(result: dict[str, Any], seen: _Seen) -> ErrorInfo | None:
    subtype = ident(result.get("subtype")) or ""
    if result.get("is_error") is not True and not subtype.startswith("error"):
        return None
    errors = result.get("errors")
    first = text(errors[0], 1000) if isinstance(errors, list) and errors else None
    message = text(result.get("result"), 1000) or first or seen.api_message or subtype
    if subtype == "error_max_turns":
        return failure("turn_limit", f"claude: {message or 'reached its maximum number of turns'}")
    kind = _error_kind(seen.api_error, count(result.get("api_error_status")))
    hint = f" ({_HINT})" if kind == "auth" else ""
    return failure(kind, f"claude: {message or 'failed'}{hint}")


def _no_result(seen: _Seen, stderr_tail: str, exit_code: int | None) -> ErrorInfo:
    if seen.api_error:
        kind = _error_kind(seen.api_error, None)
        hint = f" ({_HINT})" if kind == "auth" else ""
        return failure(kind, f"claude: {seen.api_message or seen.api_error}{hint}")
    if exit_code:
        kind = classify(stderr_tail) or "exit_code"
        detail = one_line(stderr_tail) or "no result message"
        return failure(kind, f"claude exited with {exit_code}: {detail}")
    return failure("invalid_output", "claude printed no result message (stream-json)")


def read_output(stdout: bytes, stderr_tail: str, exit_code: int | None) -> Parsed:
    """What *stdout*, the last line of stderr and the exit code say; :data:`parse` is this
    function made total (it cannot raise), and the tests check that it never has to be."""
    seen = _Seen()
    for event in json_objects(stdout):
        seen.read(event)
    result = seen.result
    usage = _usage(result, seen)
    if result is None:
        return Parsed(output=None, usage=usage, error=_no_result(seen, stderr_tail, exit_code))
    output = _output(result, seen)
    error = _result_error(result, seen)
    if error is None and exit_code:
        detail = one_line(stderr_tail) or "after a successful result"
        error = failure(
            classify(stderr_tail) or "exit_code", f"claude exited with {exit_code}: {detail}"
        )
    return Parsed(output=output, usage=usage, error=error)


parse = guarded("claude", read_output)


#: The ``claude-code`` preset.
PRESET = ModulePreset(
    name="claude-code", program="claude", checked_with=CHECKED_WITH, build=invocation, read=parse
)
