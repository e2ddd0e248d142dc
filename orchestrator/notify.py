"""Webhooks: a plan's ``notify`` endpoints told of the run's events as they happen.

Each endpoint gets a queue of at most :data:`QUEUE_SIZE` events and one worker, in the run's
task group, that POSTs them in order with httpx (under asyncio and trio alike). Queueing never
waits: when an endpoint's queue is full, the event is dropped for that endpoint and counted.
A request that gets no answer, a ``429`` or a ``5xx`` is retried with exponential backoff, up
to :data:`ATTEMPTS` requests, waiting at least what the answer's ``Retry-After`` asks (at
most :data:`MAX_RETRY_AFTER_S`: asked for longer, the delivery fails at once); any other
answer but a ``2xx`` fails the delivery at once.

What became of each event is a ``notification`` event of the run (``envelopes.Notification``):
in ``events.jsonl`` and told to ``on_event`` like any other, and never sent to a webhook. When
the run ends, it waits at most :data:`DRAIN_S` seconds for the queues to empty, then stops the
workers; what was not delivered is recorded, and said in the report's ``warnings``. A webhook
never holds the run up nor fails it. See docs/agents.md, "Webhooks".

The signing secret is read from the environment once, when the run starts, and is written
nowhere. URLs are recorded without their user, password and query, which may hold tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import anyio

from envelopes import HEADER_VARIABLE, Event, Notification, NotifySpec

from ._version import __version__
from .errors import EventHandlerFailed, PlanError, PlanIssue
from .plan import LoadedPlan
from .retry import retry_attempts

if TYPE_CHECKING:
    # Imported where a request is made (0.1 s with the command-line module it pulls in):
    # a run without HTTP agents or webhooks never pays for it.
    import httpx

__all__ = [
    "ATTEMPTS",
    "BACKOFF",
    "DRAIN_S",
    "MAX_ANSWER_BYTES",
    "MAX_RETRY_AFTER_S",
    "QUEUE_SIZE",
    "Webhook",
    "Webhooks",
    "read_webhooks",
    "retry_after",
    "shown_url",
    "signature",
]

#: Most events waiting for one endpoint; past it, new ones are dropped for it (and counted).
QUEUE_SIZE = 1000
#: Most seconds the end of a run waits for the endpoints to take what is still queued.
DRAIN_S = 5.0
#: Most requests for one event: the first and its retries.
ATTEMPTS = 5
#: First and longest wait between the requests for one event, in seconds.
BACKOFF = (0.5, 8.0)
#: Most of an answer's body read (and thrown away) before its connection is closed instead.
MAX_ANSWER_BYTES = 64 * 1024
#: Longest ``Retry-After`` waited for; an endpoint asking for longer is not retried (its
#: events queue behind the wait, and the end of a run waits only DRAIN_S for them).
MAX_RETRY_AFTER_S = 60.0

T = TypeVar("T")
Record = Callable[[Event], Awaitable[None]]


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Orchestrator-Signature`` of *body*: ``sha256=`` and its HMAC-SHA256 in hex."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def shown_url(url: str) -> str:
    """*url* as records and warnings show it: without user, password, query and fragment
    (``${NAME}`` in it, as written, stays: its value is never shown)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


@dataclass(frozen=True)
class Webhook:
    """One endpoint of a plan's ``notify``, ready to send to: its secret read already."""

    url: str = field(repr=False)
    #: How records and warnings name it: the URL as written (``${NAME}`` not filled in),
    #: without user, password, query and fragment.
    shown: str = ""
    #: The event types it is sent; None: every one.
    events: frozenset[str] | None = None
    #: Seconds one request may take.
    timeout: float = 10.0
    secret: bytes | None = field(default=None, repr=False)

    def wants(self, event: Event) -> bool:
        """Whether *event* is sent here (a ``notification`` never is)."""
        if event.type == "notification":
            return False
        return self.events is None or event.type in self.events


def read_webhooks(loaded: LoadedPlan | None, environ: Mapping[str, str]) -> list[Webhook]:
    """The plan's ``notify`` endpoints, each one's secret read from *environ*, once.

    PlanError, located at the field, for a ``secret_env`` that is unset or empty (refused
    before anything starts, rather than deliveries that a receiver would reject) and for a
    URL that httpx cannot send to. The error names the variable, never a value.
    """
    if loaded is None:
        return []
    hooks: list[Webhook] = []
    issues: list[PlanIssue] = []
    for index, spec in enumerate(loaded.plan.notify):
        url, unset = _filled(spec.url, environ)
        problem = (
            f"uses ${{{unset}}}, which the orchestrator's environment does not set (or empty)"
            if unset
            else _url_problem(url)
        )
        if problem:
            issues.append(loaded.issue(("notify", index, "url"), problem))
        secret = environ.get(spec.secret_env) if spec.secret_env is not None else None
        if spec.secret_env is not None and not secret:
            issues.append(
                loaded.issue(
                    ("notify", index, "secret_env"),
                    f"{spec.secret_env} is not set in the orchestrator's environment (or empty)",
                )
            )
        hooks.append(_webhook(spec, url, secret))
    if issues:
        raise PlanError(issues)
    return hooks


def _filled(url: str, environ: Mapping[str, str]) -> tuple[str, str | None]:
    """*url* with each ``${NAME}`` filled in from *environ*, and the first name it does not
    set (or set empty), if any."""
    unset = [name for name in HEADER_VARIABLE.findall(url) if not environ.get(name)]
    filled = HEADER_VARIABLE.sub(lambda m: environ.get(m.group(1), ""), url)
    return filled, unset[0] if unset else None


def _url_problem(url: str) -> str | None:
    import httpx

    try:
        httpx.URL(url)
    except httpx.InvalidURL:
        return "not a URL httpx can send to"  # its reason would repeat the URL, filled in
    return None


def _webhook(spec: NotifySpec, url: str, secret: str | None) -> Webhook:
    return Webhook(
        url=url,
        shown=shown_url(spec.url),
        events=frozenset(spec.events) if spec.events is not None else None,
        timeout=spec.timeout,
        secret=secret.encode() if secret else None,
    )


@dataclass(frozen=True)
class _Queued:
    """An event waiting for an endpoint, with the body sent for it (its events.jsonl line)."""

    event: Event
    body: bytes


@dataclass(frozen=True)
class _Answer:
    """What one request got: its status (None: no answer) and, unless a 2xx, why it failed."""

    status: int | None
    message: str = ""
    #: Seconds the answer's ``Retry-After`` asked to wait before the next request.
    retry_after: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def worth_retrying(self) -> bool:
        if self.retry_after is not None and self.retry_after > MAX_RETRY_AFTER_S:
            return False
        return not self.delivered and (
            self.status is None or self.status == 429 or self.status >= 500
        )


class _Endpoint:
    """An endpoint while the run lasts: its queue, its worker's scope, and its counts."""

    def __init__(self, hook: Webhook, size: int) -> None:
        self.hook = hook
        self.url = hook.shown or shown_url(hook.url)
        self.send, self.receive = anyio.create_memory_object_stream[_Queued](size)
        self.size = size
        self.scope = anyio.CancelScope()
        self.finished = anyio.Event()
        #: Events taken into the queue; of those, delivered or failed (recorded so).
        self.queued = 0
        self.done = 0
        self.failed = 0
        #: Events dropped because the queue was full, and how many of those are recorded.
        self.overflowed = 0
        self.overflow_told = 0
        #: Events dropped when the run ended, recorded once counted.
        self.left = 0

    def close(self) -> None:
        self.send.close()
        self.receive.close()

    def warning(self) -> str | None:
        """The report's line when some events were not delivered here."""
        dropped = self.overflowed + self.left
        missed = self.failed + dropped
        if not missed:
            return None
        total = self.queued + self.overflowed
        return (
            f"notify: {missed} of {total} events were not delivered to {self.url} "
            f"({self.failed} failed, {dropped} dropped); see the notification events in "
            "events.jsonl"
        )


class Webhooks:
    """The run's webhooks: a queue and a delivery worker per endpoint.

    *record* is how a delivery's outcome is told (the run context's ``emit``). The run
    calls :meth:`offer` for every event, runs inside :meth:`deliver_during`, and calls
    :meth:`settle` once its last event is offered.
    """

    def __init__(self, hooks: Sequence[Webhook], *, run_id: str, record: Record) -> None:
        self.hooks = list(hooks)
        self.run_id = run_id
        self._record = record
        self._endpoints: list[_Endpoint] = []
        #: The first exception from *record* (a failing on_event handler): told at the end.
        self._failure: Exception | None = None

    def offer(self, event: Event) -> None:
        """Queue *event* for every endpoint that wants it; never waits. An endpoint whose
        queue is full drops it (recorded, and counted in the report's warnings)."""
        queued: _Queued | None = None
        for endpoint in self._endpoints:
            if not endpoint.hook.wants(event):
                continue
            queued = queued or _Queued(event, event.model_dump_json().encode())
            try:
                endpoint.send.send_nowait(queued)
            except anyio.WouldBlock:
                endpoint.overflowed += 1
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass  # settled: the run has sent its last event
            else:
                endpoint.queued += 1

    async def deliver_during(self, body: Callable[[], Awaitable[T]]) -> T:
        """Run *body* (the run) with a delivery worker per endpoint beside it.

        The workers stop when *body* ends: at once, unless :meth:`settle` let them finish
        first. *body*'s exception propagates as it is, not in an exception group.
        Cancellation: the workers are cancelled with *body*; requests in flight are abandoned.
        """
        if not self.hooks:
            return await body()
        self._endpoints = [_Endpoint(hook, QUEUE_SIZE) for hook in self.hooks]
        returned: list[T] = []
        raised: list[Exception] = []
        try:
            async with anyio.create_task_group() as tg:
                for endpoint in self._endpoints:
                    tg.start_soon(self._work, endpoint)
                try:
                    returned.append(await body())
                except Exception as exc:
                    raised.append(exc)  # raised below: a task group would wrap it
                finally:
                    for endpoint in self._endpoints:
                        endpoint.scope.cancel()
        finally:
            for endpoint in self._endpoints:
                endpoint.close()
        if raised:
            raise raised[0]
        return returned[0]

    async def settle(self, *, drain_s: float | None = None) -> list[str]:
        """Take no more events; wait up to *drain_s* (default :data:`DRAIN_S`) seconds for
        the queued ones to be delivered, then stop the workers and record what was not.

        Returns a line for the report's warnings per endpoint that missed events. A failing
        ``on_event`` handler (for a notification event) raises its own exception here.
        Cancellation: the wait ends; nothing more is recorded.
        """
        waited = DRAIN_S if drain_s is None else drain_s
        for endpoint in self._endpoints:
            endpoint.send.close()
        with anyio.move_on_after(waited):
            for endpoint in self._endpoints:
                await endpoint.finished.wait()
        for endpoint in self._endpoints:
            endpoint.scope.cancel()  # from here on, nothing is delivered
            endpoint.left = endpoint.queued - endpoint.done
        for endpoint in self._endpoints:
            await self._tell_overflow(endpoint)
            if endpoint.left:
                why = f"not delivered within {waited:g} s of the run's end"
                await self._tell(_dropped(self.run_id, endpoint.url, endpoint.left, why))
        if self._failure is not None:
            raise self._failure
        return [line for endpoint in self._endpoints if (line := endpoint.warning())]

    async def _work(self, endpoint: _Endpoint) -> None:
        """Deliver *endpoint*'s events in order until its queue is closed and empty."""
        try:
            with endpoint.scope:
                # A new client loads the CA bundle: not on the event loop's time.
                client = await anyio.to_thread.run_sync(_client)
                try:
                    async for queued in endpoint.receive:
                        await self._deliver(client, endpoint, queued)
                        await self._tell_overflow(endpoint)
                finally:
                    with anyio.CancelScope(shield=True):
                        await client.aclose()
        finally:
            endpoint.finished.set()

    async def _deliver(
        self, client: httpx.AsyncClient, endpoint: _Endpoint, queued: _Queued
    ) -> None:
        """Send one event, retried as the answers allow; record the outcome."""
        delivery = uuid.uuid4().hex
        made = 0

        async def attempt(number: int) -> _Answer:
            nonlocal made
            made = number
            return await _post(client, endpoint.hook, queued, delivery=delivery, attempt=number)

        answer = await retry_attempts(
            attempt,
            retries=ATTEMPTS - 1,
            should_retry=lambda answer: answer.worth_retrying,
            initial=BACKOFF[0],
            maximum=BACKOFF[1],
            wait_at_least=lambda answer: answer.retry_after,
        )
        endpoint.done += 1
        if not answer.delivered:
            endpoint.failed += 1
        event = queued.event
        await self._tell(
            Notification(
                run_id=self.run_id,
                url=endpoint.url,
                outcome="delivered" if answer.delivered else "failed",
                event=event.type,
                event_at=event.at,
                task_id=getattr(event, "task_id", None),
                delivery=delivery,
                attempts=made,
                status_code=answer.status,
                message=answer.message,
            )
        )

    async def _tell_overflow(self, endpoint: _Endpoint) -> None:
        """Record the events dropped for a full queue since last told, if any."""
        count = endpoint.overflowed - endpoint.overflow_told
        if count:
            endpoint.overflow_told = endpoint.overflowed
            why = f"the queue was full ({endpoint.size} events waiting)"
            await self._tell(_dropped(self.run_id, endpoint.url, count, why))

    async def _tell(self, notification: Notification) -> None:
        """Record *notification*; a failure is kept for :meth:`settle` (a worker must not
        raise: it would take the run down with it)."""
        if self._failure is not None:
            return
        try:
            await self._record(notification)
        except EventHandlerFailed as exc:
            self._failure = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        except Exception as exc:
            self._failure = exc


def _client() -> httpx.AsyncClient:
    """A client for one endpoint: no timeouts of its own (each request's is a cancel scope),
    no redirects followed, nothing from the orchestrator's environment (neither proxies nor
    a ~/.netrc password, which would be sent to the host a plan names)."""
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(None), follow_redirects=False, trust_env=False)


def _dropped(run_id: str, url: str, count: int, why: str) -> Notification:
    return Notification(run_id=run_id, url=url, outcome="dropped", dropped=count, message=why)


async def _post(
    client: httpx.AsyncClient, hook: Webhook, queued: _Queued, *, delivery: str, attempt: int
) -> _Answer:
    """One request for *queued*, bounded by the hook's timeout; its answer's body discarded."""
    import httpx

    headers = {
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
        "User-Agent": f"worktree-orchestrator/{__version__}",
        "X-Orchestrator-Event": queued.event.type,
        "X-Orchestrator-Delivery": delivery,
        "X-Orchestrator-Attempt": str(attempt),
        "X-Orchestrator-Run-Id": queued.event.run_id,
    }
    if hook.secret is not None:
        headers["X-Orchestrator-Signature"] = signature(hook.secret, queued.body)
    with anyio.move_on_after(hook.timeout):
        try:
            async with client.stream(
                "POST", hook.url, content=queued.body, headers=headers
            ) as response:
                await _discard(response)
                return _answer(response)
        except httpx.HTTPError as exc:
            return _Answer(None, _reason(exc))
    return _Answer(None, f"no answer within {hook.timeout:g} s")


async def _discard(response: httpx.Response) -> None:
    """Read and drop the answer's body, so that its connection can serve the next request;
    past MAX_ANSWER_BYTES, stop (the connection is closed instead)."""
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return


def _answer(response: httpx.Response) -> _Answer:
    status = response.status_code
    if 200 <= status < 300:
        return _Answer(status)
    message = f"HTTP {status} {response.reason_phrase}".rstrip()
    if 300 <= status < 400:
        message += " (redirects are not followed)"
    if status != 429 and status < 500:
        return _Answer(status, message)  # not retried, whatever it asks
    asked = retry_after(response.headers.get("retry-after"), datetime.now(UTC))
    if asked is not None and asked > MAX_RETRY_AFTER_S:
        message += f" (Retry-After {asked:.0f} s: longer than the {MAX_RETRY_AFTER_S:g} s waited)"
    return _Answer(status, message, asked)


def retry_after(value: str | None, now: datetime) -> float | None:
    """The seconds a ``Retry-After`` header's *value* asks to wait (RFC 9110: a number of
    seconds or an HTTP date), from *now*; None when absent or unreadable. A date in the past
    is 0."""
    if value is None:
        return None
    from email.utils import parsedate_to_datetime  # 10 ms at start-up, for a rare header

    value = value.strip()
    if value.isascii() and value.isdigit():
        digits = value.lstrip("0") or "0"
        # Past 12 digits, already past any bound a caller keeps: never converted whole.
        return float(int(digits)) if len(digits) <= 12 else 1e12
    try:
        when = parsedate_to_datetime(value[:64])
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # RFC 5322's "-0000": UTC, origin unknown
    return max(0.0, (when - now).total_seconds())


def _reason(exc: httpx.HTTPError) -> str:
    """Why a request got no answer, on one line: ``ConnectError: [Errno 111] ...``."""
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
