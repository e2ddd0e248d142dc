"""Aider, run headless: ``aider --message-file FILE --yes-always`` and its text output.

Checked against aider-chat 0.86.2 (PyPI): every flag below is in its ``--help``, and the
fixtures in tests/fixtures/presets/aider/ are its real output, captured against a local
stand-in for an OpenAI-compatible API; also against aider.chat/docs/scripting.html and the
0.86.2 source (aider/coders/base_coder.py ``calculate_and_show_tokens_and_cost`` and
``show_usage_report``, aider/utils.py ``format_tokens``, aider/main.py, aider/exceptions.py).

Command line::

    aider --message-file PROMPT_FILE --yes-always --no-auto-commits --no-dirty-commits
          --no-gitignore --no-check-update --no-show-release-notes --no-analytics
          --no-pretty --no-stream --no-fancy-input --no-show-model-warnings --no-detect-urls
          --chat-history-file /dev/null --input-history-file /dev/null [--model MODEL] [ARGS...]

The prompt is the rendered prompt file, named by ``--message-file``: aider sends it as one
message and exits. ``--yes-always`` answers its questions (it still declines to run shell
commands, which need an explicit yes). The orchestrator commits, so aider does not
(``--no-auto-commits``, ``--no-dirty-commits``; it does ``git add`` the files it creates).
``--no-gitignore`` keeps it from adding ``.aider*`` to the repository's .gitignore; the
chat and input histories go to /dev/null rather than into the worktree (their defaults are
``.aider.chat.history.md`` and ``.aider.input.history`` there; the LLM history is written
only when ``--llm-history-file`` names one); no update check, no analytics, no release
notes, no model-warning or URL prompts, plain unstreamed output.

Its repo map's cache, ``.aider.tags.cache.v4/`` (a SQLite database), has no flag: 0.86.2's
``RepoMap`` puts it in the git root whenever the repo map is on (``--map-tokens 0`` would
turn the map off, and aider with it into a worse editor). It is the preset's ``scratch``:
what an attempt made of ``.aider.tags.cache.v*`` is removed when the attempt ends, so the
task's commit never takes it (checked: one headless run against a stand-in API leaves
``cache.db``, ``cache.db-shm`` and ``cache.db-wal`` there).

Aider has no JSON output. Its ``--analytics-log`` JSONL holds exact counts (the
``message_send`` event), but it is a file the parser is not handed, written only with
analytics machinery on, and its model names are redacted. So stdout is parsed: each reply
ends with ``Tokens: 2.3k sent, 1.2k cache write, 3.4k cache hit, 67 received. Cost: $0.0052
message, $0.02 session.`` (the cache parts only when non-zero, the cost part only when the
model has a price, a line break before ``Cost:`` when both cache parts are there, and
long lines wrapped by the console, so whitespace is matched loosely). Each report is one
message's tokens (the counters restart after it), so tokens are the sum over all reports;
the cost is the last report's ``session`` figure. ``Main model: NAME`` names the model,
``Applied edit to PATH`` the edited files, and the text between the banner and the last
report is the task's ``result`` (best effort: aider prints no boundary).

Error kinds: aider 0.86.2 exits with 0 even when the provider refused every request, so the
text after the last report decides: ``litellm.AuthenticationError``, "The API provider is
not able to authenticate you", "No LLM model was specified and no API keys were provided"
(after which aider offers an OpenRouter login and, with --yes-always, waits up to 5 minutes
for a browser) -> ``auth``; ``litellm.RateLimitError``, "The API provider has rate limited
you", "Insufficient credits" -> ``rate_limited``; any other ``litellm.*Error`` or "Message
file not found" -> ``agent_error``. No report and no error -> ``exit_code`` (nonzero exit)
or ``invalid_output``.

Not known: exact token counts (aider rounds them: ``1.2k`` is 1150 to 1249, ``12k`` is
11500 to 12499), a session id (aider has none), whether tokens aider counts as "sent"
included cache reads (it depends on the provider), turns beyond "messages sent" (the
number of reports).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from envelopes import ErrorInfo

from ._protocol import Invocation, ModulePreset, Parsed
from ._reading import (
    MAX_TEXT_CHARS,
    cost,
    count,
    failure,
    guarded,
    ident,
    make_usage,
    one_line,
    stdout_text,
)

__all__ = [
    "CHECKED_WITH",
    "PRESET",
    "QUIET",
    "SCRATCH",
    "invocation",
    "parse",
    "read_output",
    "tokens",
]

#: What ``checked_with`` says: the CLI version and the source the preset follows.
CHECKED_WITH = "aider 0.86.2 (--help, real output, base_coder.py); aider.chat/docs/scripting"

#: The flags that keep aider non-interactive, quiet, and out of the repository's history.
QUIET = (
    "--yes-always",
    "--no-auto-commits",
    "--no-dirty-commits",
    "--no-gitignore",
    "--no-check-update",
    "--no-show-release-notes",
    "--no-analytics",
    "--no-pretty",
    "--no-stream",
    "--no-fancy-input",
    "--no-show-model-warnings",
    "--no-detect-urls",
)

_COUNT = r"[0-9][0-9.]{0,15}k?"
_REPORT = re.compile(
    rf"Tokens:\s+(?P<sent>{_COUNT})\s+sent,"
    rf"(?:\s+(?P<write>{_COUNT})\s+cache\s+write,)?"
    rf"(?:\s+(?P<hit>{_COUNT})\s+cache\s+hit,)?"
    rf"\s+(?P<received>{_COUNT})\s+received\."
    r"(?:\s+Cost:\s+\$(?P<message>[0-9][0-9.]{0,20})\s+message,"
    r"\s+\$(?P<session>[0-9][0-9.]{0,20})\s+session\.)?"
)
_MODEL = re.compile(r"^(?:Main model|Model): (\S{1,200})", re.MULTILINE)
_APPLIED = re.compile(r"^Applied edit to (.{1,4096})$", re.MULTILINE)
#: What aider prints when the provider refused it, most telling first (exceptions.py, main.py).
_ERRORS = (
    (re.compile(r"The API provider is not able to authenticate you"), "auth"),
    (re.compile(r"No LLM model was specified and no API keys were provided"), "auth"),
    (
        re.compile(
            r"OpenRouter authentication did not complete|Authentication with OpenRouter failed"
        ),
        "auth",
    ),
    (re.compile(r"litellm\.AuthenticationError"), "auth"),
    (
        re.compile(
            r"The API provider has rate limited you|Insufficient credits with the API provider"
        ),
        "rate_limited",
    ),
    (re.compile(r"litellm\.(?:Router)?RateLimitError"), "rate_limited"),
    (
        re.compile(
            r"litellm\.[A-Za-z]{1,60}Error\b|Message file not found"
            r"|Error reading message file|has hit a token limit"
        ),
        "agent_error",
    ),
)
#: A line aider prints before a reply: its banner (0.86.2's main.py and base_coder.py), and
#: the last line of a failed request it retries.
_PREAMBLE = re.compile(
    r"(?:Aider v\d|Main model: |Model: |Weak model: |Editor model: |Git repo: |Repo-map: "
    r"|Cur working dir: |Git working dir: |Use /help|Added .{1,4096} to the chat\.$"
    r"|Retrying in [0-9.]{1,20} seconds\.\.\.$)"
)
#: A line that starts another message of aider's, after an error's first line.
_NEXT = re.compile(r"(?:The API provider|Retrying in|litellm\.|https?://|\s*$)")
_HINT = "give the agent a model and its provider's key, e.g. OPENAI_API_KEY or ANTHROPIC_API_KEY"
#: Most edited files listed in the output.
MAX_LISTED = 200


def invocation(
    *, program: str, prompt: str, prompt_file: Path, model: str | None, args: Sequence[str]
) -> Invocation:
    """``aider --message-file``, answering yes, committing nothing, printing plain text."""
    argv = [program, "--message-file", str(prompt_file), *QUIET]
    argv += ["--chat-history-file", os.devnull, "--input-history-file", os.devnull]
    if model is not None:
        argv += ["--model", model]
    return Invocation(argv=[*argv, *args], prompt_on_stdin=False)


def tokens(value: str | None) -> int | None:
    """A token count as aider prints it (``999``, ``1.2k``, ``12k``), None if it is not one."""
    if not value:
        return None
    thousands = value.endswith("k")
    try:
        number = float(value.removesuffix("k"))
    except ValueError:
        return None
    return count(round(number * 1000) if thousands else round(number))


def _dollars(value: str | None) -> float | None:
    try:
        return cost(float(value)) if value else None
    except ValueError:
        return None


def _sum(values: list[int | None]) -> int | None:
    known = [value for value in values if value is not None]
    return sum(known) if known else None


def _usage(reports: list[re.Match[str]], output: str) -> Any:
    sent = _sum([tokens(r["sent"]) for r in reports])
    write = _sum([tokens(r["write"]) for r in reports])
    hit = _sum([tokens(r["hit"]) for r in reports])
    received = _sum([tokens(r["received"]) for r in reports])
    fresh = sent - write if sent is not None and write is not None and write <= sent else sent
    parts = [fresh, write, hit, received]
    session = _dollars(reports[-1]["session"]) if reports else None
    model = _MODEL.search(output)
    return make_usage(
        input_tokens=fresh,
        output_tokens=received,
        cache_read_tokens=hit,
        cache_write_tokens=write,
        total_tokens=_sum(parts),
        cost_usd=session,
        cost_source="reported" if session is not None else None,
        turns=len(reports) or None,
        model=ident(model[1]) if model else None,
    )


def _reply(output: str, reports: list[re.Match[str]]) -> str | None:
    """The text of the last reply: after the previous report, the banner and any retried
    request, before the last report."""
    start = reports[-2].end() if len(reports) > 1 else 0
    lines = output[start : reports[-1].start()].splitlines()
    preamble = [number for number, line in enumerate(lines) if _PREAMBLE.match(line)]
    reply = "\n".join(lines[preamble[-1] + 1 if preamble else 0 :]).strip()
    return reply[:MAX_TEXT_CHARS] or None


def _message_at(output: str, start: int) -> str:
    """The message that starts at *start*: its line, and the lines the console wrapped it
    onto (up to two more), not the next message."""
    begin = output.rfind("\n", 0, start) + 1
    lines = output[begin : begin + 2000].splitlines()[:3]
    message = lines[:1]
    for line in lines[1:]:
        if _NEXT.match(line):
            break
        message.append(line)
    return " ".join(message)


def _error(
    after: str, output: str, reported: bool, stderr_tail: str, exit_code: int | None
) -> ErrorInfo | None:
    for pattern, kind in _ERRORS:
        found = pattern.search(after)
        if found:
            hint = f" ({_HINT})" if kind == "auth" else ""
            return failure(kind, f"aider: {_message_at(after, found.start())}{hint}")
    if exit_code:
        lines = [line for line in output.splitlines() if line.strip()]
        detail = one_line(stderr_tail) or (one_line(lines[-1]) if lines else "no output")
        return failure("exit_code", f"aider exited with {exit_code}: {detail}")
    if not reported:
        return failure(
            "invalid_output", "aider printed no `Tokens: ... sent, ... received.` report"
        )
    return None


def read_output(stdout: bytes, stderr_tail: str, exit_code: int | None) -> Parsed:
    """What *stdout*, the last line of stderr and the exit code say; :data:`parse` is this
    function made total (it cannot raise), and the tests check that it never has to be."""
    output = stdout_text(stdout)
    reports = list(_REPORT.finditer(output))
    after = output[reports[-1].end() :] if reports else output
    error = _error(after, output, bool(reports), stderr_tail, exit_code)
    applied = [match[1].strip() for match in _APPLIED.finditer(output)][:MAX_LISTED]
    result = {
        "result": _reply(output, reports) if reports else None,
        "session_id": None,
        "is_error": error is not None,
        "applied_edits": list(dict.fromkeys(applied)),
    }
    usage = _usage(reports, output)
    return Parsed(output=result if reports or applied else None, usage=usage, error=error)


parse = guarded("aider", read_output)


#: The ``aider`` preset.
#: What aider writes into the worktree for itself: its repo map's cache (no flag moves it).
SCRATCH = (".aider.tags.cache.v*",)

PRESET = ModulePreset(
    name="aider",
    program="aider",
    checked_with=CHECKED_WITH,
    build=invocation,
    read=parse,
    scratch=SCRATCH,
)
