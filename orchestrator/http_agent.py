"""The ``http`` kind: an agent behind an HTTP endpoint, driven with httpx in this process.

A plan's ``agents: {remote: {http: {url: ..., headers: {...}}}}`` becomes an
:class:`HttpAgent`. Each attempt POSTs the task's envelope (as written to the run directory,
its secret values masked) to ``url`` as JSON. A ``200`` answer's JSON object is the output; a
``202`` answer's ``Location`` is polled with GET every ``poll_interval`` seconds until it
answers ``200``. The output may carry ``patch``, a unified diff that ``git apply`` applies to
the task's worktree, which the task's commit then takes (kind ``patch`` when it does not
apply). Other answers fail the attempt with a kind the task's retries act on: ``auth`` (401,
403; never retried), ``rate_limited`` (429), ``agent_error`` (5xx, other statuses, no
connection), ``invalid_output`` (a body that is not a JSON object, or over 16 MiB).

Header values may use ``${NAME}``, filled from the agent's environment when the request is
sent. A filled-in value is a secret: it is never written to an event, the report, an error
message or the provenance, and is masked wherever the server echoes it back. The attempt's
``timeout`` bounds all of it, polls and ``git apply`` included. See docs/agents.md, "HTTP
agents".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from envelopes import (
    HEADER_VARIABLE,
    MAX_VALUE_DEPTH,
    AgentInfo,
    AgentSpec,
    ErrorInfo,
    ErrorKind,
    canonical_json,
    digest,
    env_values,
    loads_bounded,
)

from ._version import __version__
from .attempt import MAX_OUTPUT_BYTES, AttemptOutcome, AttemptRequest, timed_out
from .errors import GitError
from .secrets import MIN_DECLARED_LENGTH, Masker

if TYPE_CHECKING:
    # Imported where a request is made (0.1 s with the command-line module it pulls in):
    # a run without HTTP agents or webhooks never pays for it.
    import httpx

__all__ = ["HttpAgent"]

#: Most of an error answer's body read, for the one-line excerpt in the error message.
MAX_ERROR_BODY_BYTES = 4096
#: Longest excerpt of an answer (or of git's complaint) in an error message.
MAX_EXCERPT_CHARS = 200

#: An HTTP header name (RFC 9110 token).
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Headers that frame the request: httpx sets them, a plan may not.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "host"})
#: What git apply names when it refuses a patch: ``patch failed: F:3``, ``F: patch does not
#: apply``, ``invalid path 'F'``, ``affected file 'F' is beyond a symbolic link``...
_GIT_FILE = re.compile(
    r"^(?:patch failed: (?P<failed>.+):\d+"
    r"|(?:invalid path|affected file) '(?P<quoted>.+?)'.*"
    r"|(?P<named>[^:]+): .+)$"
)


class _Failed(Exception):
    """The attempt fails with *kind* and *message* (raised inside, returned as an outcome)."""

    def __init__(self, kind: ErrorKind, message: str, paths: list[str] | None = None) -> None:
        super().__init__(message)
        self.error = ErrorInfo(kind=kind, message=message, paths=paths or [])


class _TimedOut(Exception):
    """The attempt's deadline passed while git applied the patch."""


@dataclass(frozen=True)
class HttpAgent:
    """An agent behind *url*: the envelope POSTed as JSON, its answer the task's output.

    *headers* are sent as written, ``${NAME}`` filled in from the agent's environment;
    *poll_interval* is the seconds between polls of a ``202`` answer's ``Location``.
    """

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    poll_interval: float = 2.0
    env: Mapping[str, str] = field(default_factory=dict)

    #: A client in this process: it cannot be sandboxed.
    in_process = True
    #: The envelope goes in the request's body: no file of it is read, so a task with nothing
    #: made for it keeps its envelope as a record of envelopes.jsonl.
    envelope_record = True
    #: No program, no stdout or stderr: its attempts have no log files.
    writes_logs = False

    @classmethod
    def from_spec(cls, spec: AgentSpec) -> HttpAgent:
        """The agent a plan's ``agents`` entry with ``http`` describes.

        ValueError for credentials in the URL (they would be in the report: use a header),
        a header name that is not a token, a header that frames the request
        (``Content-Length``, ``Transfer-Encoding``, ``Connection``, ``Host``), or a header
        value with a line break or NUL.
        """
        import httpx

        http = spec.http
        if http is None:
            raise ValueError("an http agent needs http: {url: ...}")
        if spec.program is not None or spec.model is not None or spec.args:
            raise ValueError("program, model and args go with a preset, not an http agent")
        try:
            credentials = httpx.URL(http.url).userinfo
        except httpx.InvalidURL as exc:
            raise ValueError(f"an http agent's url is not a valid URL: {exc}") from None
        if credentials:
            raise ValueError(
                "an http agent's url must not hold credentials (they would be in the report): "
                "send them in a header, as ${NAME}"
            )
        for name, template in http.headers.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"http header {name!r} is not a valid header name")
            if name.lower() in _FRAMING:
                raise ValueError(f"http header {name!r} is set by the client, not by a plan")
            if any(c in template for c in "\r\n\0"):
                raise ValueError(f"http header {name!r} holds a line break or NUL")
        return cls(
            url=http.url,
            headers=dict(http.headers),
            poll_interval=http.poll_interval,
            env=env_values(spec.env),
        )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> HttpAgent:
        """The agent of ``{"http": {"url": ..., "headers": ..., "poll_interval": ...}, "env":
        ...}``, checked as a plan's entry is; task settings (``sandbox``, ``secrets``...) are
        refused, as for a command."""
        from .command_agent import refuse_task_settings

        spec = AgentSpec.model_validate(dict(options))
        refuse_task_settings(spec, "the agent", allowed={"http"})
        return cls.from_spec(spec)

    def info(self, program: str | None = None) -> AgentInfo:
        """Provenance: the URL only (never a header)."""
        return AgentInfo(kind="http", command=[self.url])

    def fingerprint(self, plan_dir: Path) -> str:
        """The URL, the headers as written (names and ``${NAME}`` templates, never a filled-in
        value) and the agent's env."""
        return digest(
            {"http": {"url": self.url, "headers": dict(self.headers)}, "env": dict(self.env)}
        )

    async def run_attempt(self, request: AttemptRequest) -> AttemptOutcome:
        """POST the envelope, poll a ``202`` answer, apply the output's ``patch``.

        All of it within the task's timeout (then ``timed_out``). A header naming a variable
        the environment lacks is a ``spawn`` failure. Cancellation: the request or poll is
        abandoned, the client closed under a shielded scope, and the cancellation propagates.
        """
        try:
            headers, masker = self._headers(request)
        except _Failed as exc:
            return AttemptOutcome("failed", error=exc.error)
        deadline = anyio.current_time() + request.timeout
        body = canonical_json(request.envelope.to_json_dict())
        # Made in a thread: a client loads its CA bundle from disk.
        client = await anyio.to_thread.run_sync(functools.partial(_client, headers))
        outcome: AttemptOutcome | None = None
        try:
            with anyio.CancelScope(deadline=deadline):
                try:
                    output = await self._exchange(client, body)
                    await _apply_patch(request, output, masker, deadline)
                    outcome = AttemptOutcome("succeeded", output=masker.value(output))
                except _Failed as exc:
                    error = exc.error
                    masked = error.model_copy(
                        update={
                            "message": masker.text(error.message),
                            "paths": [masker.text(p) for p in error.paths],
                        }
                    )
                    outcome = AttemptOutcome("failed", error=masked)
                except _TimedOut:
                    outcome = None
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
        return outcome if outcome is not None else timed_out(request.timeout)

    def _headers(self, request: AttemptRequest) -> tuple[httpx.Headers, Masker]:
        """The request's headers, ``${NAME}`` filled in from the agent's environment, and a
        masker of the values filled in."""
        import httpx

        headers = httpx.Headers(
            {
                "Accept": "application/json",
                # Bodies are capped as they are decoded; uncompressed, the cap is on the wire.
                "Accept-Encoding": "identity",
                "Content-Type": "application/json",
                "User-Agent": f"worktree-orchestrator/{__version__}",
                "X-Orchestrator-Run-Id": request.run_id,
                "X-Orchestrator-Task-Id": request.task_id,
                "X-Orchestrator-Attempt": str(request.attempt),
            }
        )
        secrets: set[str] = set()
        for name, template in self.headers.items():
            value = template
            for variable in dict.fromkeys(HEADER_VARIABLE.findall(template)):
                if variable not in request.env:
                    raise _Failed(
                        "spawn",
                        f"http header {name} uses ${{{variable}}}, which the agent's "
                        "environment does not set",
                    )
                filled = request.env[variable]
                if any(c in filled for c in "\r\n\0"):
                    raise _Failed(
                        "spawn", f"http header {name}: ${{{variable}}} holds a line break or NUL"
                    )
                value = value.replace(f"${{{variable}}}", filled)
                secrets.add(filled)
            if value != template:
                secrets.add(value)
            headers[name] = value
        values = sorted(
            (v for v in secrets if len(v) >= MIN_DECLARED_LENGTH), key=lambda v: (-len(v), v)
        )
        return headers, Masker(tuple(values))

    async def _exchange(self, client: httpx.AsyncClient, body: bytes) -> dict[str, Any]:
        """POST the envelope and, while the answer is ``202``, poll its ``Location``: the
        output of the ``200`` answer at the end."""
        import httpx

        url = origin = httpx.URL(self.url)
        method = "POST"
        status, location, data = await _send(client, method, url, content=body)
        if status == 202 and location is None:
            raise _Failed("agent_error", f"POST {url}: HTTP 202 without a Location to poll")
        while status == 202:
            if location is not None:
                url = _resolve(url, location)
            if _origin(url) != _origin(origin):
                # A Location elsewhere would have the orchestrator fetch, from where it runs,
                # what an endpoint chose (a cloud's metadata address, say) into the output.
                raise _Failed(
                    "agent_error",
                    f"POST {origin}: HTTP 202 to poll another origin ({_origin(url)[1]}): refused",
                )
            await anyio.sleep(self.poll_interval)
            method = "GET"
            status, location, data = await _send(client, method, url)
        if status != 200:
            raise _status_error(method, url, status, data)
        return _output(data)


def _client(headers: httpx.Headers) -> httpx.AsyncClient:
    """A client for one attempt: no timeouts of its own (the attempt's bounds it all), no
    redirects followed, nothing from the orchestrator's environment (neither proxies nor a
    ~/.netrc password, which would be sent to a host the plan names). Blocking."""
    import httpx

    return httpx.AsyncClient(
        headers=headers, timeout=httpx.Timeout(None), follow_redirects=False, trust_env=False
    )


async def _send(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL,
    *,
    content: bytes | None = None,
) -> tuple[int, str | None, bytes]:
    """One request: its answer's status, ``Location`` and body (a ``200`` body up to
    MAX_OUTPUT_BYTES, else ``invalid_output``; another's first MAX_ERROR_BODY_BYTES)."""
    import httpx

    request = client.build_request(method, url, content=content)
    try:
        response = await client.send(request, stream=True)
        try:
            status = response.status_code
            if status == 200:
                data = await _read(response, MAX_OUTPUT_BYTES, method, url)
            elif status == 202:
                data = b""
            else:
                data = await _read(response, MAX_ERROR_BODY_BYTES, method, url, cut=True)
            return status, response.headers.get("location"), data
        finally:
            await response.aclose()
    except httpx.HTTPError as exc:
        raise _Failed("agent_error", f"{method} {url}: {_reason(exc)}") from None


async def _read(
    response: httpx.Response, limit: int, method: str, url: httpx.URL, *, cut: bool = False
) -> bytes:
    """The body, up to *limit* bytes: cut there with *cut*, else ``invalid_output`` beyond."""
    too_large = _Failed(
        "invalid_output", f"{method} {url}: the answer is larger than {limit >> 20} MiB"
    )
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # Decoded, a few compressed bytes could be gigabytes before any limit is seen.
        raise _Failed(
            "invalid_output", f"{method} {url}: the answer is {encoding}-encoded; send it plain"
        )
    declared = response.headers.get("content-length", "")
    if not cut and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if cut:
                break
            raise too_large
    return b"".join(chunks)[:limit]


def _output(data: bytes) -> dict[str, Any]:
    """A ``200`` answer's body as the output: a JSON object of bounded depth, as canonical
    JSON writes it; ``invalid_output`` otherwise."""
    try:
        value = loads_bounded(data, max_depth=MAX_VALUE_DEPTH)
    except ValueError as exc:
        reason = _one_line(str(exc)) or type(exc).__name__
        raise _Failed("invalid_output", f"the answer is not valid JSON: {reason}") from None
    if not isinstance(value, dict):
        raise _Failed(
            "invalid_output", f"the answer must be a JSON object, found {type(value).__name__}"
        )
    try:
        canonical_json(value)
    except ValueError as exc:
        raise _Failed("invalid_output", f"the answer is not canonical JSON: {exc}") from None
    return value


def _status_error(method: str, url: httpx.URL, status: int, data: bytes) -> _Failed:
    """The failure an answer other than 200 or 202 is."""
    import httpx

    kind: ErrorKind
    if status in (401, 403):
        kind = "auth"
    elif status == 429:
        kind = "rate_limited"
    else:
        kind = "agent_error"
    message = f"{method} {url}: HTTP {status} {httpx.codes.get_reason_phrase(status)}".rstrip()
    if excerpt := _one_line(data.decode("utf-8", "replace")):
        message += f": {excerpt}"
    return _Failed(kind, message)


async def _apply_patch(
    request: AttemptRequest, output: dict[str, Any], masker: Masker, deadline: float
) -> None:
    """Apply the output's ``patch`` (a unified diff) to the task's worktree with git apply.

    All or nothing (git apply's own rule); git refuses paths outside the worktree (``..``,
    absolute paths), in ``.git``, or beyond a symbolic link. Kind ``patch`` when it does not
    apply, naming the file git names; ``_TimedOut`` when the deadline passes.
    """
    patch = output.get("patch")
    if patch is None or patch == "":
        return
    if not isinstance(patch, str):
        raise _Failed("invalid_output", f"patch must be a string, found {type(patch).__name__}")
    if request.worktree is None or request.repo is None:
        raise _Failed("patch", "the answer carries a patch, but the task has no worktree")
    try:
        data = patch.encode("utf-8")
    except UnicodeEncodeError:
        raise _Failed("invalid_output", "patch is not valid UTF-8 text") from None
    if masker.found_in(data):
        raise _Failed(
            "secret_leak", "the patch holds the value of an http header: it was not applied"
        )
    remaining = deadline - anyio.current_time()
    if remaining <= 0:
        raise _TimedOut
    try:
        result = await request.repo.git.run(
            "apply",
            "--whitespace=nowarn",
            "--end-of-options",
            "-",
            cwd=request.cwd,
            stdin=data,
            check=False,
            timeout=remaining,
        )
    except GitError as exc:
        if anyio.current_time() >= deadline:
            raise _TimedOut from None
        raise _Failed("patch", f"git apply: {_one_line(str(exc))}") from None
    if result.returncode != 0:
        raise _patch_error(result.stderr.decode("utf-8", "replace"))


def _patch_error(stderr: str) -> _Failed:
    """The ``patch`` failure of git apply's complaint, naming the files it names."""
    complaints = [
        line.removeprefix("error: ").strip()
        for line in stderr.splitlines()
        if line.startswith(("error: ", "fatal: "))
    ]
    complaints = [line.removeprefix("fatal: ") for line in complaints]
    paths: list[str] = []
    for line in complaints:
        match = _GIT_FILE.match(line)
        if match is not None:
            name = match["failed"] or match["quoted"] or match["named"]
            if name and name.strip() not in paths:
                paths.append(name.strip())
    reason = _one_line("; ".join(complaints) or stderr) or "git apply failed"
    return _Failed("patch", f"the patch does not apply: {reason}", paths[:10])


def _resolve(base: httpx.URL, location: str) -> httpx.URL:
    """*location* (absolute, or relative to *base*) as an http(s) URL to poll."""
    import httpx

    try:
        url = base.join(location)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise _Failed(
            "agent_error", f"{base}: Location {_one_line(location)!r} is not an http(s) URL"
        )
    return url


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def _reason(exc: httpx.HTTPError) -> str:
    """Why a request failed, in one line: ``ConnectError: [Errno 111] Connection refused``."""
    text = _one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(text: str, limit: int = MAX_EXCERPT_CHARS) -> str:
    """*text* on one line of printable characters, cut at *limit*."""
    line = "".join(c if c.isprintable() else " " for c in " ".join(text.split()))
    return line if len(line) <= limit else line[: limit - 3] + "..."
