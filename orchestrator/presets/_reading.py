"""Reading an agent's output as hostile input: bounded, typed by hand, never raising.

Every preset's parser reads through these helpers, so that each bound is written once:
how much of stdout is read and how long a line may be (:func:`json_objects`), what counts
as a token count, a cost or an identifier (:func:`count`, :func:`cost`, :func:`ident`),
how an error message is shortened to one line (:func:`one_line`) and what in it says
"log in" or "slow down" (:func:`classify`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal

from pydantic import ValidationError

from envelopes import MAX_VALUE_DEPTH, ErrorInfo, Usage, loads_bounded

from ._protocol import Parsed

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_STDOUT_BYTES",
    "MAX_TEXT_CHARS",
    "as_object",
    "classify",
    "cost",
    "count",
    "failure",
    "guarded",
    "ident",
    "json_document",
    "json_objects",
    "make_usage",
    "one_line",
    "stdout_text",
    "text",
    "uncached",
]

#: Most of an agent's stdout a parser reads: the last this many bytes (results come last).
MAX_STDOUT_BYTES = 64 << 20
#: A longer line is skipped unread (no event an agent prints is near this size).
MAX_LINE_BYTES = 16 << 20
#: Longest text (an agent's final message) kept in the task's output, in characters.
MAX_TEXT_CHARS = 256 * 1024
#: Largest token count believed (2**53: what every JSON reader holds exactly).
MAX_COUNT = 1 << 53
#: Largest cost believed, in US dollars.
MAX_COST_USD = 1e9
#: Longest message in an ErrorInfo.
MAX_MESSAGE_CHARS = 300

ErrorKind = Literal["auth", "rate_limited"]

_AUTH = re.compile(
    r"\b(?:401|403)\b|unauthori[sz]ed|unauthenticated|authenticat|forbidden|not logged in"
    r"|/login\b|\blog ?in again\b|invalid[ _-]?api[ _-]?key|incorrect api key|api key not valid"
    r"|missing (?:an? )?api key|no api keys?\b|invalid x-api-key|oauth token",
    re.IGNORECASE,
)
_RATE = re.compile(
    r"\b(?:429|529)\b|rate[ _-]?limit|too many requests|quota|resource[ _]exhausted"
    r"|resource has been exhausted|overloaded|usage limit|out of credits|insufficient credits"
    r"|credit balance",
    re.IGNORECASE,
)
_SPACE = re.compile(r"\s+")
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def classify(message: str) -> ErrorKind | None:
    """``auth`` when *message* says the agent is not logged in or its key is bad,
    ``rate_limited`` when it says a rate limit, quota or overload stopped it, else None."""
    if _AUTH.search(message):
        return "auth"
    if _RATE.search(message):
        return "rate_limited"
    return None


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """*message* on one line, terminal escapes and control characters dropped, whitespace
    collapsed, at most *limit* characters."""
    plain = _ESCAPE.sub("", text(message, limit * 4) or "")
    printable = "".join(char if char.isprintable() else " " for char in plain)
    line = _SPACE.sub(" ", printable).strip()
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def failure(kind: str, message: str) -> ErrorInfo:
    """An ErrorInfo of *kind* whose message is *message* on one short line."""
    return ErrorInfo.model_validate({"kind": kind, "message": one_line(message)})


def as_object(value: Any) -> dict[str, Any]:
    """*value* when it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def count(value: Any) -> int | None:
    """*value* when it is a token count (an int, not a bool, from 0 to 2**53), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        return value
    return None


def cost(value: Any) -> float | None:
    """*value* as US dollars when it is a finite number from 0 to a billion, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and 0 <= number <= MAX_COST_USD else None


def text(value: Any, limit: int = MAX_TEXT_CHARS) -> str | None:
    """*value* when it is a string, cut to *limit* characters and made valid UTF-8 (a lone
    surrogate from a ``\\ud800`` escape becomes U+FFFD), else None."""
    if not isinstance(value, str):
        return None
    cut = value[:limit]
    try:
        cut.encode("utf-8")
    except UnicodeEncodeError:
        cut = cut.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return cut


def ident(value: Any) -> str | None:
    """*value* when it is a short printable string (a session id, a model name), else None."""
    if isinstance(value, str) and 0 < len(value) <= 200 and value.isprintable():
        return value
    return None


def uncached(total_input: int | None, cached: int | None) -> int | None:
    """Input tokens not read from a cache, from a count that includes the cached ones."""
    if total_input is None or cached is None:
        return total_input
    return total_input - cached if cached <= total_input else None


def make_usage(**fields: Any) -> Usage | None:
    """A Usage of the *fields* that are known; None when none is."""
    known = {key: value for key, value in fields.items() if value is not None}
    if not known:
        return None
    try:
        return Usage.model_validate(known)
    except ValidationError:
        return None


def _tail(stdout: bytes) -> bytes:
    """The last MAX_STDOUT_BYTES of *stdout*, from the start of a line."""
    if len(stdout) <= MAX_STDOUT_BYTES:
        return stdout
    tail = stdout[-MAX_STDOUT_BYTES:]
    return tail[tail.find(b"\n") + 1 :] if b"\n" in tail else b""


def json_objects(stdout: bytes) -> Iterator[dict[str, Any]]:
    """The JSON objects of *stdout*, one per line (JSON Lines); anything else is skipped:
    blank lines, text, truncated or invalid JSON, too deep or too long lines, non-objects."""
    data = _tail(stdout)
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            end = len(data)
        line = data[start:end].strip()
        start = end + 1
        if not line.startswith(b"{") or len(line) > MAX_LINE_BYTES:
            continue
        try:
            value = loads_bounded(line, max_depth=MAX_VALUE_DEPTH)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            yield value


def json_document(stdout: bytes) -> dict[str, Any] | None:
    """*stdout* as one JSON object (a pretty-printed one too), None when it is not one."""
    data = stdout.strip()
    if not data.startswith(b"{") or len(data) > MAX_LINE_BYTES:
        return None
    try:
        value = loads_bounded(data, max_depth=MAX_VALUE_DEPTH)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def stdout_text(stdout: bytes) -> str:
    """The last MAX_STDOUT_BYTES of *stdout* as text (invalid UTF-8 replaced)."""
    return _tail(stdout).decode("utf-8", "replace")


def guarded(
    name: str, parse: Callable[[bytes, str, int | None], Parsed]
) -> Callable[[bytes, str, int | None], Parsed]:
    """*parse*, made total: an exception it raises after all (a bug of the parser, which the
    tests look for) is an ``invalid_output`` error, so that hostile output cannot crash a run."""

    def total(stdout: bytes, stderr_tail: str, exit_code: int | None) -> Parsed:
        try:
            return parse(stdout, stderr_tail, exit_code)
        except Exception as exc:
            return Parsed(
                output=None,
                usage=None,
                error=failure("invalid_output", f"{name}: its output could not be read ({exc!r})"),
            )

    return total
