"""Webhooks (orchestrator/notify.py) against a real HTTP server on 127.0.0.1.

The server runs in a thread of the test, checks every signature with the function that
docs/agents.md shows receivers, and answers by path: 200, a flaky 503, a 429, 404, a redirect,
a slow endpoint, and a large answer. Runs go through ``orchestrate_parallel`` (under asyncio
and trio) and the CLI; what reached the server is compared with the run's events.jsonl.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import anyio
import pytest
from pydantic import TypeAdapter

from envelopes import (
    Event,
    HandoffEnvelope,
    Notification,
    NotifyEvent,
    Plan,
    Report,
    RunFinished,
    TaskFinished,
)
from orchestrator import PlanError, Workspace, orchestrate_parallel, verify_report
from orchestrator import notify as notify_module
from orchestrator.notify import (
    MAX_RETRY_AFTER_S,
    Webhook,
    Webhooks,
    read_webhooks,
    retry_after,
    shown_url,
    signature,
)
from orchestrator.plan import parse_plan, validate_plan_data
from orchestrator.retry import set_testing

from .conftest import LocalServer, MakeRepo, QuietHandler, cli, serving
from .test_docs import read_blocks, webhook_check

BACKENDS = ["asyncio", "trio"]
SECRET = "hook-secret-" + "q" * 24


@dataclass(frozen=True)
class Delivery:
    """A request the server received; ``signed`` is None when it carried no signature."""

    target: str
    headers: dict[str, str]
    body: bytes
    signed: bool | None
    at: float = field(default_factory=time.monotonic)

    @property
    def event(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


class HookServer(LocalServer):
    """The stand-in receiver: answers by path (ROUTES), records and checks what it gets."""

    def __init__(self) -> None:
        super().__init__(HookHandler)
        self.seen: list[Delivery] = []
        self.counts: Counter[str] = Counter()
        self.check = webhook_check()

    def url(self, target: str) -> str:
        return self.origin + target

    def to(self, target: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.seen if d.target == target]


class HookHandler(QuietHandler):
    server: HookServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        given = headers.get("x-orchestrator-signature")
        signed = None if given is None else self.server.check(body, given, SECRET)
        with self.server.lock:
            self.server.seen.append(Delivery(self.path, headers, body, signed))
            self.server.counts[self.path] += 1
            count = self.server.counts[self.path]
        route = ROUTES[self.path.split("?")[0]]
        status = 401 if signed is False else route(self, count)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            answer = b"x" * (1 << 20) if self.path == "/big" else b"ok"
            self.send_response(status)
            if status == 302:
                self.send_header("Location", "/ok")
            if status >= 300 and self.path in RETRY_AFTER:
                self.send_header("Retry-After", RETRY_AFTER[self.path])
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)


def _slow(handler: HookHandler, count: int) -> int:
    handler.server.release.wait(60)  # past the run's drain: the client gives up first
    return 200


ROUTES: dict[str, Callable[[HookHandler, int], int]] = {
    "/ok": lambda h, n: 204,
    "/big": lambda h, n: 200,
    "/flaky": lambda h, n: 503 if n <= 2 else 200,
    "/limited": lambda h, n: 429 if n == 1 else 200,
    "/gone": lambda h, n: 404,
    "/moved": lambda h, n: 302,
    "/slow": _slow,
    "/later": lambda h, n: 429 if n == 1 else 200,
    "/tomorrow": lambda h, n: 503,
}
#: The ``Retry-After`` of a route's failures.
#: (A redirect and a 404 ask for an hour: not retried anyway, so not said.)
RETRY_AFTER = {
    "/later": "1",
    "/tomorrow": "Fri, 31 Dec 9999 23:59:59 GMT",
    "/moved": "3600",
    "/gone": "3600",
}


@pytest.fixture
def server() -> Iterator[HookServer]:
    with serving(HookServer()) as srv:
        yield srv


@pytest.fixture
def hook_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    return SECRET


async def work(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    return {"id": envelope.task_id}


def plan_with(*hooks: dict[str, Any], tasks: int = 3) -> dict[str, Any]:
    """A plan of *tasks* callable-agent tasks (no worktree, no venv) and *hooks* as notify."""
    return {
        "notify": list(hooks),
        "defaults": {"worktree": False, "venv": False},
        "tasks": [{"id": f"t{i}", "agent": "w", "task": "t"} for i in range(tasks)],
    }


def run(
    repo: Path,
    plan: dict[str, Any],
    *,
    backend: str = "asyncio",
    on_event: Callable[[Event], Any] | None = None,
) -> Report:
    call = functools.partial(
        orchestrate_parallel, plan, repo=repo, agents={"w": work}, on_event=on_event
    )
    report: Report = anyio.run(call, backend=backend)
    return report


def logged(report: Report) -> list[Event]:
    """The run's events.jsonl, read back."""
    adapter: TypeAdapter[Event] = TypeAdapter(Event)
    lines = (Path(report.run_dir) / "events.jsonl").read_text().splitlines()
    return [adapter.validate_json(line) for line in lines]


def notifications(report: Report) -> list[Notification]:
    return [e for e in logged(report) if isinstance(e, Notification)]


def verified(report: Report) -> None:
    outcome = anyio.run(verify_report, Path(report.run_dir) / "report.json")
    assert outcome.ok, outcome.findings


# the plan


def test_a_bad_notify_is_a_plan_error_at_its_line() -> None:
    text = """\
notify:
  - {url: "ftp://hooks.example/x", events: [task_done], secret_env: "HOOK SECRET"}
  - {url: "https://hooks.example/y", timeout: 0}
agents: {a: {command: ["true"]}}
tasks: [{agent: a, task: t}]
"""
    with pytest.raises(PlanError) as caught:
        parse_plan(text, file="plan.yaml")
    lines = [str(issue) for issue in caught.value.issues]
    assert lines[0].startswith("plan.yaml:2:6: notify[0].url: ")
    assert lines[1].startswith("plan.yaml:2:45: notify[0].events[0]: must be one of 'run_started'")
    assert lines[1].endswith(", found 'task_done'")
    assert lines[2:] == [
        "plan.yaml:2:57: notify[0].secret_env: 'HOOK SECRET' is not a variable name (letters, "
        "digits and _)",
        "plan.yaml:3:38: notify[1].timeout: must be > 0, found 0",
    ]


def test_a_plan_has_at_most_16_webhooks_each_with_a_host() -> None:
    hooks = [{"url": f"https://hooks.example/{i}"} for i in range(17)]
    with pytest.raises(PlanError, match=r"notify: must have at most 16 items, found 17"):
        parse_plan(json.dumps(plan_with(*hooks)), callable_agents=["w"])
    with pytest.raises(PlanError, match="names no host"):
        parse_plan(json.dumps(plan_with({"url": "https:///x"})), callable_agents=["w"])


def test_a_plan_without_notify_keeps_its_json_and_digest() -> None:
    plan = Plan.model_validate(plan_with() | {"agents": {"w": {"command": ["true"]}}})
    assert "notify" not in plan.model_dump(mode="json")


def test_webhooks_may_be_sent_every_event_but_notifications() -> None:
    kinds = {
        model.model_fields["type"].default
        for model in get_args(get_args(Event)[0])  # Annotated[Union[...], Field]
    }
    assert set(get_args(NotifyEvent)) == kinds - {"notification"}
    everything = Webhook("https://hooks.example/")
    assert everything.wants(TaskFinished.model_construct(type="task_finished"))
    assert not everything.wants(Notification.model_construct(type="notification"))
    chosen = Webhook("https://hooks.example/", events=frozenset({"run_finished"}))
    assert not chosen.wants(TaskFinished.model_construct(type="task_finished"))


def test_an_unset_secret_is_refused_with_the_variable_named_never_a_value() -> None:
    loaded = parse_plan(
        json.dumps(plan_with({"url": "https://hooks.example/", "secret_env": "HOOK_SECRET"})),
        callable_agents=["w"],
    )
    for environ in ({}, {"HOOK_SECRET": ""}):
        with pytest.raises(PlanError) as caught:
            read_webhooks(loaded, environ)
        [issue] = caught.value.issues
        assert issue.path == "notify[0].secret_env"
        assert issue.message == (
            "HOOK_SECRET is not set in the orchestrator's environment (or empty)"
        )
    [hook] = read_webhooks(loaded, {"HOOK_SECRET": SECRET})
    assert hook.secret == SECRET.encode() and SECRET not in repr(hook)


def test_a_url_httpx_cannot_send_to_is_refused_when_the_run_starts() -> None:
    loaded = parse_plan(
        json.dumps(plan_with({"url": "http://hooks.example:abc/"})), callable_agents=["w"]
    )
    with pytest.raises(PlanError, match=r"notify\[0\]\.url: not a URL httpx can send to"):
        read_webhooks(loaded, {})


def test_the_docs_show_the_error_of_an_unset_secret_as_it_is() -> None:
    blocks = [b for b in read_blocks() if b.doc == "agents.md"]
    [plan] = [b for b in blocks if b.lang == "yaml" and b.text.startswith("notify:")]
    [shown] = [
        b
        for b in blocks
        if b.lang == "text" and b.text.startswith("plan.yaml:") and "notify" in b.text
    ]
    loaded = parse_plan(plan.text, file="plan.yaml")
    with pytest.raises(PlanError) as caught:
        read_webhooks(loaded, {})
    assert [str(issue) for issue in caught.value.issues] == shown.text.splitlines()


def test_urls_are_shown_without_credentials_query_and_fragment() -> None:
    url = "https://user:pa55@hooks.example:8443/a%20b/c?token=t0k#frag"
    assert shown_url(url) == "https://hooks.example:8443/a%20b/c"
    assert shown_url("http://[::1]:8080/x?y") == "http://[::1]:8080/x"


def test_the_signature_is_the_hmac_sha256_of_the_body() -> None:
    # RFC 4231, test case 2.
    expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    assert signature(b"Jefe", b"what do ya want for nothing?") == f"sha256={expected}"


# delivering


@pytest.mark.parametrize("backend", BACKENDS)
def test_events_are_delivered_signed_in_order_and_recorded(
    make_repo: MakeRepo, server: HookServer, hook_secret: str, backend: str
) -> None:
    chosen = ["task_finished", "run_finished"]
    plan = plan_with(
        {"url": server.url("/ok"), "secret_env": "HOOK_SECRET"},
        {"url": server.url("/ok?second=1"), "events": chosen},
    )
    told: list[Event] = []
    report = run(make_repo(), plan, backend=backend, on_event=told.append)
    events = logged(report)
    assert told == events  # the caller is told of deliveries too
    sent = [e for e in events if not isinstance(e, Notification)]
    lines = (Path(report.run_dir) / "events.jsonl").read_bytes().splitlines()
    assert [d.body for d in server.to("/ok")] == [e.model_dump_json().encode() for e in sent]
    assert [d.body for d in server.to("/ok")] == [
        line for line in lines if b'"notification"' not in line
    ]
    assert all(d.signed for d in server.to("/ok"))
    second = server.to("/ok?second=1")
    assert [d.event["type"] for d in second] == ["task_finished"] * 3 + ["run_finished"]
    assert all(d.signed is None for d in second)  # no secret_env: unsigned
    for delivery in server.to("/ok") + second:
        headers = delivery.headers
        assert headers["content-type"] == "application/json"
        assert headers["x-orchestrator-event"] == delivery.event["type"]
        assert headers["x-orchestrator-run-id"] == report.run_id == delivery.event["run_id"]
        assert headers["x-orchestrator-attempt"] == "1"
    ids = [d.headers["x-orchestrator-delivery"] for d in server.to("/ok") + second]
    assert len(set(ids)) == len(ids)
    records = notifications(report)
    assert len(records) == len(sent) + 4
    assert {(r.outcome, r.status_code, r.attempts) for r in records} == {("delivered", 204, 1)}
    assert {r.url for r in records} == {server.url("/ok")}  # the query is not recorded
    assert {r.delivery for r in records} == set(ids)
    assert isinstance(events[-1], Notification) and report.warnings == []
    assert all(SECRET not in p.read_text() for p in Path(report.run_dir).rglob("*.json*"))
    verified(report)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flaky_or_rate_limited_endpoint_is_retried_and_keeps_its_order(
    make_repo: MakeRepo, server: HookServer, backend: str
) -> None:
    chosen = ["task_finished", "run_finished"]
    plan = plan_with(
        {"url": server.url("/flaky"), "events": chosen},
        {"url": server.url("/limited"), "events": chosen},
    )
    report = run(make_repo(), plan, backend=backend)
    expected = [e.model_dump_json().encode() for e in logged(report) if e.type in chosen]
    for target, failures in (("/flaky", 2), ("/limited", 1)):
        got = server.to(target)
        first = got[: failures + 1]
        assert len({d.headers["x-orchestrator-delivery"] for d in first}) == 1  # one delivery
        assert [d.headers["x-orchestrator-attempt"] for d in first] == [
            str(n) for n in range(1, failures + 2)
        ]
        assert [d.body for d in got[failures:]] == expected  # in order, each once delivered
        records = [r for r in notifications(report) if r.url == server.url(target)]
        assert [r.attempts for r in records] == [failures + 1] + [1] * (len(expected) - 1)
        assert {r.outcome for r in records} == {"delivered"}
    assert report.warnings == []


def test_a_4xx_or_a_redirect_fails_the_delivery_without_a_retry(
    make_repo: MakeRepo, server: HookServer
) -> None:
    plan = plan_with(
        {"url": server.url("/gone"), "events": ["task_finished"]},
        {"url": server.url("/moved"), "events": ["run_finished"]},
        {"url": server.url("/big"), "events": ["run_finished"]},
    )
    report = run(make_repo(), plan)
    assert report.summary.successful == 3  # a webhook never fails the run
    assert len(server.to("/gone")) == 3 and len(server.to("/moved")) == 1
    records = {r.url: r for r in notifications(report)}
    gone, moved = records[server.url("/gone")], records[server.url("/moved")]
    assert (gone.outcome, gone.status_code, gone.attempts) == ("failed", 404, 1)
    assert gone.message == "HTTP 404 Not Found" and gone.event == "task_finished"
    assert gone.task_id in {"t0", "t1", "t2"}
    assert (moved.outcome, moved.status_code) == ("failed", 302)
    assert moved.message == "HTTP 302 Found (redirects are not followed)"
    assert records[server.url("/big")].outcome == "delivered"  # its answer cut, not read
    assert report.warnings == [
        f"notify: 3 of 3 events were not delivered to {server.url('/gone')} (3 failed, 0 "
        "dropped); see the notification events in events.jsonl",
        f"notify: 1 of 1 events were not delivered to {server.url('/moved')} (1 failed, 0 "
        "dropped); see the notification events in events.jsonl",
    ]
    on_disk = json.loads((Path(report.run_dir) / "report.json").read_text())
    assert on_disk["warnings"] == report.warnings
    verified(report)


def test_a_retry_waits_what_retry_after_asks_and_a_wait_too_long_is_not_made(
    make_repo: MakeRepo, server: HookServer
) -> None:
    set_testing(False)  # the waits as in production (the conftest puts testing back after)
    plan = plan_with(
        {"url": server.url("/later"), "events": ["run_finished"]},
        {"url": server.url("/tomorrow"), "events": ["run_finished"]},
        tasks=1,
    )
    report = run(make_repo(), plan)
    records = {r.url: r for r in notifications(report)}
    later, tomorrow = records[server.url("/later")], records[server.url("/tomorrow")]
    assert (later.outcome, later.attempts) == ("delivered", 2)
    first, second = server.to("/later")
    # Asked for 1 s; the backoff alone would have waited 0.5 to 1 s.
    assert second.at - first.at >= 1.0
    # Asked for a wait of years: one request, failed at once, and the message says why.
    assert (tomorrow.outcome, tomorrow.attempts, tomorrow.status_code) == ("failed", 1, 503)
    assert len(server.to("/tomorrow")) == 1
    assert tomorrow.message.startswith("HTTP 503 Service Unavailable (Retry-After ")
    assert tomorrow.message.endswith(f" s: longer than the {MAX_RETRY_AFTER_S:g} s waited)")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("-3", None),
        ("1.5", None),
        ("\u0663", None),  # a digit, but not an ASCII one
        ("Sun, 06 Dec 2026 12:01:00 GMT", 60.0),
        ("Sun, 06 Dec 2026 11:00:00 GMT", 0.0),  # in the past: now
        ("Sun, 06 Dec 2026 12:01:00 -0000", 60.0),
        ("Sun, 06 Dec 99999 12:01:00 GMT", None),
        ("soon", None),
        ("", None),
        ("0000000000000120", 120.0),  # leading zeros: still 120
        ("9" * 400, 1e12),  # past any bound, never converted whole
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value: str | None, seconds: float | None) -> None:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    assert retry_after(value, now) == seconds


def test_an_endpoint_that_never_answers_is_retried_then_failed(make_repo: MakeRepo) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    plan = plan_with({"url": f"http://127.0.0.1:{port}/x", "events": ["run_finished"]})
    report = run(make_repo(), plan)
    [record] = notifications(report)
    assert (record.outcome, record.attempts, record.status_code) == ("failed", 5, None)
    assert record.message.startswith("ConnectError")
    assert len(report.warnings) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_slow_endpoint_holds_the_run_up_only_for_the_drain(
    make_repo: MakeRepo, server: HookServer, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notify_module, "DRAIN_S", 0.3)
    plan = plan_with({"url": server.url("/slow"), "events": ["task_finished"], "timeout": 60})
    began = time.monotonic()
    report = run(make_repo(), plan, backend=backend)
    assert time.monotonic() - began < 30  # the endpoint holds each request for 60 s
    assert report.summary.successful == 3
    [record] = notifications(report)
    assert (record.outcome, record.dropped) == ("dropped", 3)
    assert record.message == "not delivered within 0.3 s of the run's end"
    assert report.warnings == [
        f"notify: 3 of 3 events were not delivered to {server.url('/slow')} (0 failed, 3 "
        "dropped); see the notification events in events.jsonl"
    ]
    assert isinstance(logged(report)[-2], RunFinished)
    verified(report)


def test_events_past_a_full_queue_are_dropped_and_counted(
    make_repo: MakeRepo, server: HookServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notify_module, "DRAIN_S", 0.3)
    monkeypatch.setattr(notify_module, "QUEUE_SIZE", 2)
    plan = plan_with({"url": server.url("/slow"), "timeout": 60}, tasks=5)
    report = run(make_repo(), plan)
    offered = [e for e in logged(report) if not isinstance(e, Notification)]
    records = notifications(report)
    assert {r.outcome for r in records} == {"dropped"}
    full = [r for r in records if r.message == "the queue was full (2 events waiting)"]
    assert full and sum(r.dropped for r in full) >= len(offered) - 3
    assert sum(r.dropped for r in records) == len(offered)  # every event accounted for
    [warning] = report.warnings
    assert warning.startswith(f"notify: {len(offered)} of {len(offered)} events were not")


@pytest.mark.parametrize("backend", BACKENDS)
def test_offering_never_waits_and_settling_is_bounded(
    server: HookServer, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Webhooks object alone, as the run drives it: 10 events offered at once to an
    endpoint that never answers in time and has room for 2."""
    monkeypatch.setattr(notify_module, "QUEUE_SIZE", 2)
    recorded: list[Event] = []

    async def record(event: Event) -> None:
        recorded.append(event)

    async def main() -> list[str]:
        webhooks = Webhooks([Webhook(server.url("/slow"), timeout=60)], run_id="r", record=record)

        async def body() -> list[str]:
            for n in range(10):
                webhooks.offer(
                    RunFinished(run_id="r", report_path=f"{n}", successful=0, total_tasks=0)
                )
            return await webhooks.settle(drain_s=0.2)

        return await webhooks.deliver_during(body)

    [warning] = anyio.run(main, backend=backend)
    assert "10 of 10 events were not delivered" in warning
    assert all(isinstance(e, Notification) and e.outcome == "dropped" for e in recorded)
    assert sum(e.dropped for e in recorded if isinstance(e, Notification)) == 10


def test_a_failing_handler_on_a_notification_stops_the_run_with_its_own_exception(
    make_repo: MakeRepo, server: HookServer
) -> None:
    class HandlerBug(Exception):
        pass

    def handler(event: Event) -> None:
        if isinstance(event, Notification):
            raise HandlerBug(event.outcome)

    plan = plan_with({"url": server.url("/ok"), "events": ["task_finished"]})
    repo = make_repo()
    with pytest.raises(HandlerBug, match="delivered"):
        run(repo, plan, on_event=handler)
    [run_dir] = (repo / ".git" / "orchestrator" / "runs").iterdir()
    assert json.loads((run_dir / "report.json").read_text())["summary"]["successful"] == 3
    journal = (run_dir / "journal.jsonl").read_text().splitlines()
    assert json.loads(journal[-1])["type"] == "finished"


# the CLI


def write_plan(path: Path, url: str) -> Path:
    path.write_text(
        'agents: {ok: {command: ["true"]}}\n'
        "defaults: {worktree: false, venv: false}\n"
        "notify:\n"
        f'  - {{url: "{url}", events: [run_finished], secret_env: HOOK_SECRET}}\n'
        "tasks: [{id: a, agent: ok, task: t}]\n"
    )
    return path


def test_the_cli_refuses_an_unset_secret_before_anything_runs(
    make_repo: MakeRepo,
    server: HookServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HOOK_SECRET", raising=False)
    repo = make_repo()
    plan = write_plan(tmp_path / "plan.yaml", server.url("/ok"))
    column = plan.read_text().splitlines()[3].index("secret_env") + 1
    outcome = cli(capsys, "run", str(plan), "--repo", str(repo))
    assert outcome.code == 2
    assert outcome.err.splitlines() == [
        f"{plan}:4:{column}: notify[0].secret_env: HOOK_SECRET is not set in the "
        "orchestrator's environment (or empty)"
    ]
    assert not (repo / ".git" / "orchestrator" / "runs").exists()  # no run was started
    assert server.to("/ok") == []


def test_the_cli_prints_what_was_not_delivered_and_the_run_still_succeeds(
    make_repo: MakeRepo,
    server: HookServer,
    hook_secret: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = write_plan(tmp_path / "plan.yaml", server.url("/gone?token=t0k"))
    outcome = cli(capsys, "run", str(plan), "--repo", str(make_repo()))
    assert outcome.code == 0, outcome.err
    url = server.url("/gone")
    assert (
        f"warning: notify: 1 of 1 events were not delivered to {url} (1 failed, 0 dropped)"
        in outcome.out
    )
    assert "t0k" not in outcome.out and hook_secret not in outcome.out + outcome.err
    [delivery] = server.to("/gone?token=t0k")
    assert delivery.signed is True


def test_a_secret_part_of_a_url_is_written_as_a_variable_and_never_recorded(
    tmp_path: Path,
) -> None:
    data = {
        "notify": [{"url": "https://hooks.example/services/${HOOK_PATH_TOKEN}?x=1"}],
        "agents": {"a": {"command": ["x"]}},
        "tasks": [{"agent": "a", "task": "t"}],
    }
    loaded = validate_plan_data(data, plan_dir=tmp_path)
    [hook] = read_webhooks(loaded, {"HOOK_PATH_TOKEN": "T0KEN-abc"})
    assert hook.url == "https://hooks.example/services/T0KEN-abc?x=1"
    assert hook.shown == "https://hooks.example/services/${HOOK_PATH_TOKEN}"
    assert "T0KEN" not in repr(hook)
    with pytest.raises(PlanError, match=r"uses \$\{HOOK_PATH_TOKEN\}, which the orchestrator"):
        read_webhooks(loaded, {})


def test_a_url_with_a_password_is_refused_without_being_repeated(tmp_path: Path) -> None:
    data = {
        "notify": [{"url": "https://user:hunter2@hooks.example/x"}],
        "agents": {"a": {"command": ["x"]}},
        "tasks": [{"agent": "a", "task": "t"}],
    }
    with pytest.raises(PlanError, match="must not hold a user or password") as caught:
        validate_plan_data(data, plan_dir=tmp_path)
    assert "hunter2" not in str(caught.value)
