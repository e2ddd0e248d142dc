"""The ``http`` kind (orchestrator/http_agent.py) against a real HTTP server on 127.0.0.1.

The server runs in a thread of the test and answers by path: a sync 200, a 202 polled until
done, a flaky 503, a slow endpoint, 429, 401, patches that apply, do not apply or try to
escape the worktree, bodies that are not an output, and an endpoint that checks a secret
header. Each case runs through ``orchestrate_parallel`` with a real repository (some under
asyncio and trio both), and its report must verify. Nothing asserts on seconds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import AgentInfo, AgentSpec, HandoffEnvelope, Plan, Report, build_envelope
from orchestrator import orchestrate_parallel, verify_report
from orchestrator.agents import KINDS, as_agent
from orchestrator.attempt import AttemptRequest
from orchestrator.http_agent import HttpAgent

from .conftest import LocalServer, MakeRepo, QuietHandler, git, serving

BACKENDS = ["asyncio", "trio"]

#: What the patch endpoints answer with; src/file0000.txt holds "line 0\n" (make_repo).
GOOD_PATCH = """\
diff --git a/src/file0000.txt b/src/file0000.txt
--- a/src/file0000.txt
+++ b/src/file0000.txt
@@ -1 +1 @@
-line 0
+line zero
diff --git a/REMOTE.txt b/REMOTE.txt
new file mode 100644
--- /dev/null
+++ b/REMOTE.txt
@@ -0,0 +1 @@
+made remotely
"""
STALE_PATCH = """\
diff --git a/src/file0001.txt b/src/file0001.txt
--- a/src/file0001.txt
+++ b/src/file0001.txt
@@ -1 +1 @@
-line one hundred
+line 101
"""
ESCAPING_PATCHES = {
    "parent": """\
diff --git a/../escaped.txt b/../escaped.txt
new file mode 100644
--- /dev/null
+++ b/../escaped.txt
@@ -0,0 +1 @@
+out
""",
    "absolute": """\
diff --git a//tmp/escaped.txt b//tmp/escaped.txt
new file mode 100644
--- /dev/null
+++ b//tmp/escaped.txt
@@ -0,0 +1 @@
+out
""",
    "git-dir": """\
diff --git a/.git/hooks/pre-commit b/.git/hooks/pre-commit
new file mode 100755
--- /dev/null
+++ b/.git/hooks/pre-commit
@@ -0,0 +1 @@
+#!/bin/sh
""",
    "beyond-symlink": """\
diff --git a/link b/link
new file mode 120000
--- /dev/null
+++ b/link
@@ -0,0 +1 @@
+/tmp
\\ No newline at end of file
diff --git a/link/escaped.txt b/link/escaped.txt
new file mode 100644
--- /dev/null
+++ b/link/escaped.txt
@@ -0,0 +1 @@
+out
""",
}


@dataclass
class Seen:
    """A request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class AgentServer(LocalServer):
    """The stand-in agent: answers by path (ROUTES), records what it was sent."""

    def __init__(self) -> None:
        super().__init__(Handler)
        self.seen: list[Seen] = []
        self.counts: Counter[str] = Counter()
        #: Set when the slow endpoint is asked.
        self.slow_asked = threading.Event()
        #: What /secret expects after "Bearer ".
        self.secret = ""
        #: What /patch answers with as its ``patch``.
        self.patch: Any = GOOD_PATCH

    @property
    def url(self) -> str:
        return self.origin

    def requests_to(self, path: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path == path]


class Handler(QuietHandler):
    server: AgentServer

    def do_POST(self) -> None:
        self._handle("POST")

    def do_GET(self) -> None:
        self._handle("GET")

    def _handle(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.server.lock:
            self.server.seen.append(Seen(method, self.path, headers, body))
            self.server.counts[self.path] += 1
            count = self.server.counts[self.path]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            ROUTES[self.path](self, count)

    def reply(
        self, status: int, value: Any = None, *, text: str | None = None, **headers: str
    ) -> None:
        data = text.encode() if text is not None else json.dumps(value).encode()
        self.send_response(status)
        for name, header in headers.items():
            self.send_header(name.replace("_", "-"), header)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


USAGE = {"input_tokens": 120, "output_tokens": 30, "cost_usd": 0.25, "cost_source": "reported"}


def _sync(h: Handler, n: int) -> None:
    h.reply(200, {"result": "done remotely", "usage": USAGE})


def _start(h: Handler, n: int) -> None:
    h.reply(202, {"status": "queued"}, Location="jobs/7")  # relative to /start


def _job(h: Handler, n: int) -> None:
    if n == 1:
        h.reply(202, {"status": "running"})
    else:
        h.reply(200, {"result": "polled", "polls": n})


def _flaky(h: Handler, n: int) -> None:
    if n == 1:
        h.reply(503, text="busy, come back later")
    else:
        h.reply(200, {"result": "second time lucky"})


def _slow(h: Handler, n: int) -> None:
    h.server.slow_asked.set()
    h.server.release.wait(60)  # past any task's timeout: the client gives up first


def _forever(h: Handler, n: int) -> None:
    h.reply(202, {"status": "still running"}, Location="/forever")


def _limited(h: Handler, n: int) -> None:
    h.reply(429, text="slow down\nplease")


def _denied(h: Handler, n: int) -> None:
    h.reply(401, {"error": "bad key"})


def _patch(h: Handler, n: int) -> None:
    h.reply(200, {"result": "patched", "patch": h.server.patch})


def _list(h: Handler, n: int) -> None:
    h.reply(200, [1, 2])


def _huge(h: Handler, n: int) -> None:
    # Close-delimited (no Content-Length): the cap applies as the body is read.
    h.send_response(200)
    h.end_headers()
    chunk = b" " * (1 << 20)
    for _ in range(17):
        h.wfile.write(chunk)


def _gzip_bomb(h: Handler, n: int) -> None:
    import gzip

    body = gzip.compress(b" " * (64 << 20))  # 64 KiB on the wire, 64 MiB decoded
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Encoding", "gzip")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _secret(h: Handler, n: int) -> None:
    seen = h.headers.get("Authorization", "")
    if seen == f"Bearer {h.server.secret}":
        h.reply(200, {"result": "authorised", "echo": seen})  # a server that echoes it back
    else:
        h.reply(401, text=f"rejected: {seen}")


def _no_location(h: Handler, n: int) -> None:
    h.reply(202, {"status": "queued"})


def _elsewhere(h: Handler, n: int) -> None:
    h.reply(202, {}, Location=f"http://localhost:{h.server.server_port}/jobs/elsewhere")


def _job_elsewhere(h: Handler, n: int) -> None:
    h.reply(200, {"authorization": h.headers.get("Authorization")})


ROUTES: dict[str, Callable[[Handler, int], None]] = {
    "/sync": _sync,
    "/start": _start,
    "/jobs/7": _job,
    "/flaky": _flaky,
    "/slow": _slow,
    "/forever": _forever,
    "/limited": _limited,
    "/denied": _denied,
    "/patch": _patch,
    "/list": _list,
    "/huge": _huge,
    "/gzip-bomb": _gzip_bomb,
    "/secret": _secret,
    "/no-location": _no_location,
    "/elsewhere": _elsewhere,
    "/jobs/elsewhere": _job_elsewhere,
}


@pytest.fixture
def server() -> Iterator[AgentServer]:
    with serving(AgentServer()) as srv:
        yield srv


def run(
    repo: Path,
    url: str,
    *,
    backend: str = "asyncio",
    headers: dict[str, str] | None = None,
    **envelope: Any,
) -> Report:
    """One task for the agent at *url*, through ``orchestrate_parallel``; its report verified."""
    envelope.setdefault("venv", False)
    agent = {"http": {"url": url, "headers": headers or {}, "poll_interval": 0.01}}
    task = build_envelope("remote", "Do it remotely", task_id="t1", **envelope)
    call = functools.partial(orchestrate_parallel, [task], repo=repo, agents={"remote": agent})
    report: Report = anyio.run(call, backend=backend)
    verified = anyio.run(verify_report, Path(report.run_dir) / "report.json", backend=backend)
    assert verified.ok, verified
    return report


# answers


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_200_answer_is_the_output_and_its_usage_the_tasks(
    make_repo: MakeRepo, server: AgentServer, backend: str
) -> None:
    report = run(make_repo(), f"{server.url}/sync", backend=backend)
    [result] = report.results
    assert result.status == "succeeded", result.error
    assert result.output == {"result": "done remotely", "usage": USAGE}
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.cost_usd) == (120, 0.25)
    assert result.attempts == 1 and result.attempt_log[0].stdout is None  # no log files
    assert result.provenance.agent == AgentInfo(kind="http", command=[f"{server.url}/sync"])
    [seen] = server.requests_to("/sync")
    sent = json.loads(seen.body)
    assert (seen.method, sent["task_id"], sent["task"]) == ("POST", "t1", "Do it remotely")
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["x-orchestrator-task-id"] == "t1"
    assert seen.headers["x-orchestrator-run-id"] == report.run_id
    assert seen.headers["x-orchestrator-attempt"] == "1"


def test_the_envelope_sent_is_the_one_on_disk_its_secrets_masked(
    make_repo: MakeRepo, server: AgentServer
) -> None:
    report = run(make_repo(), f"{server.url}/sync", env={"API_TOKEN": "tok-" + "x" * 20})
    [seen] = server.requests_to("/sync")
    on_disk = (Path(report.run_dir) / "envelopes" / "t1.json").read_bytes()
    assert seen.body == on_disk
    assert json.loads(seen.body)["env"]["API_TOKEN"] == "***"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_202_answer_is_polled_at_its_relative_location_until_done(
    make_repo: MakeRepo, server: AgentServer, backend: str
) -> None:
    report = run(make_repo(), f"{server.url}/start", backend=backend)
    [result] = report.results
    assert result.status == "succeeded", result.error
    assert result.output == {"result": "polled", "polls": 2}
    assert [s.method for s in server.requests_to("/jobs/7")] == ["GET", "GET"]


def test_a_202_without_a_location_fails_the_attempt(
    make_repo: MakeRepo, server: AgentServer
) -> None:
    [result] = run(make_repo(), f"{server.url}/no-location").results
    assert result.status == "failed"
    assert result.error is not None and result.error.kind == "agent_error"
    assert "202 without a Location" in result.error.message


def test_a_location_on_another_origin_is_not_polled(
    make_repo: MakeRepo, server: AgentServer
) -> None:
    """Polling another origin would fetch, from where the orchestrator runs, what the endpoint
    chose (a cloud metadata address, say) into the task's output: refused, headers unsent."""
    headers = {"Authorization": "Bearer ${ORIGIN_TOKEN}"}
    env = {"ORIGIN_TOKEN": "for-this-origin-only"}
    [result] = run(make_repo(), f"{server.url}/elsewhere", headers=headers, env=env).results
    assert result.status == "failed" and result.error is not None
    assert result.error.kind == "agent_error"
    assert "to poll another origin" in result.error.message and "refused" in result.error.message
    [posted] = server.requests_to("/elsewhere")
    assert posted.headers["authorization"] == "Bearer for-this-origin-only"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flaky_agent_is_retried_as_the_task_says(
    make_repo: MakeRepo, server: AgentServer, backend: str
) -> None:
    [result] = run(make_repo(), f"{server.url}/flaky", backend=backend, retries=1).results
    assert result.status == "succeeded", result.error
    assert result.output == {"result": "second time lucky"}
    assert [a.status for a in result.attempt_log] == ["failed", "succeeded"]
    first = result.attempt_log[0].error
    assert first is not None and first.kind == "agent_error"
    assert first.message.endswith("HTTP 503 Service Unavailable: busy, come back later")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_slow_agent_times_out(make_repo: MakeRepo, server: AgentServer, backend: str) -> None:
    [result] = run(make_repo(), f"{server.url}/slow", backend=backend, timeout=0.5).results
    assert result.status == "timed_out"
    assert result.error is not None and result.error.kind == "timeout"


def test_the_timeout_bounds_the_polls_too(make_repo: MakeRepo, server: AgentServer) -> None:
    [result] = run(make_repo(), f"{server.url}/forever", timeout=0.5).results
    assert result.status == "timed_out"
    assert len(server.requests_to("/forever")) > 1


def test_a_rate_limited_agent_is_retried_then_fails_rate_limited(
    make_repo: MakeRepo, server: AgentServer
) -> None:
    [result] = run(make_repo(), f"{server.url}/limited", retries=1).results
    assert result.status == "failed"
    assert result.attempts == 2
    assert result.error is not None and result.error.kind == "rate_limited"
    assert result.error.message.endswith("HTTP 429 Too Many Requests: slow down please")


def test_an_unauthorised_agent_is_not_retried(make_repo: MakeRepo, server: AgentServer) -> None:
    [result] = run(make_repo(), f"{server.url}/denied", retries=3).results
    assert result.status == "failed"
    assert result.attempts == 1
    assert result.error is not None and result.error.kind == "auth"
    assert "HTTP 401 Unauthorized" in result.error.message


def test_an_agent_that_cannot_be_reached_is_an_agent_error(make_repo: MakeRepo) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once it is closed
    [result] = run(make_repo(), f"http://127.0.0.1:{port}/run").results
    assert result.status == "failed"
    assert result.error is not None and result.error.kind == "agent_error"
    assert result.error.message.startswith(f"POST http://127.0.0.1:{port}/run: ConnectError")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/list", "the answer must be a JSON object, found list"),
        ("/huge", "the answer is larger than 16 MiB"),
    ],
)
def test_an_answer_that_is_not_an_output_is_invalid_output(
    make_repo: MakeRepo, server: AgentServer, path: str, reason: str
) -> None:
    [result] = run(make_repo(), f"{server.url}{path}").results
    assert result.status == "failed"
    assert result.error is not None and result.error.kind == "invalid_output"
    assert result.error.message.endswith(reason)


# patches


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_patch_that_applies_is_committed_on_the_tasks_branch(
    make_repo: MakeRepo, server: AgentServer, backend: str
) -> None:
    repo = make_repo()
    [result] = run(repo, f"{server.url}/patch", backend=backend).results
    assert result.status == "succeeded", result.error
    commit = result.provenance.result_commit
    assert commit is not None and result.branch is not None
    assert git(repo, "rev-parse", result.branch) == commit
    assert git(repo, "show", f"{commit}:src/file0000.txt") == "line zero"
    assert git(repo, "show", f"{commit}:REMOTE.txt") == "made remotely"
    changed = git(repo, "diff", "--name-only", f"{commit}~1", commit).splitlines()
    assert changed == ["REMOTE.txt", "src/file0000.txt"]
    assert git(repo, "show", "main:src/file0000.txt") == "line 0"  # the checkout is untouched


def test_a_patch_that_does_not_apply_fails_naming_the_file(
    make_repo: MakeRepo, server: AgentServer
) -> None:
    server.patch = STALE_PATCH
    [result] = run(make_repo(), f"{server.url}/patch").results
    assert result.status == "failed"
    assert result.error is not None and result.error.kind == "patch"
    assert "src/file0001.txt" in result.error.message
    assert result.error.message.startswith("the patch does not apply: patch failed:")
    assert result.error.paths == ["src/file0001.txt"]
    assert result.output is None


@pytest.mark.parametrize("case", sorted(ESCAPING_PATCHES))
def test_a_patch_reaching_outside_the_worktree_is_refused(
    make_repo: MakeRepo, server: AgentServer, tmp_path: Path, case: str
) -> None:
    server.patch = ESCAPING_PATCHES[case]
    repo = make_repo()
    [result] = run(repo, f"{server.url}/patch").results
    assert result.status == "failed"
    assert result.error is not None and result.error.kind == "patch"
    assert any(w in result.error.message for w in ("invalid path", "beyond a symbolic link"))
    # Nothing of it was applied: no escaped file anywhere, no hook, no link committed.
    assert not [p for p in tmp_path.rglob("escaped.txt")]
    assert not (Path("/tmp") / "escaped.txt").exists()
    assert not (repo / ".git" / "hooks" / "pre-commit").exists()
    commit = result.provenance.result_commit
    if commit is not None:
        assert git(repo, "diff", "--name-only", "main", commit) == ""


def test_a_patch_that_is_not_text_is_invalid_output(
    make_repo: MakeRepo, server: AgentServer
) -> None:
    server.patch = ["not", "a", "diff"]
    [result] = run(make_repo(), f"{server.url}/patch").results
    assert result.error is not None and result.error.kind == "invalid_output"
    assert result.error.message == "patch must be a string, found list"


def test_a_patch_holding_a_header_value_is_not_applied(
    make_repo: MakeRepo, server: AgentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = "v" + secrets.token_hex(12)
    monkeypatch.setenv("REMOTE_BADGE", value)
    server.patch = GOOD_PATCH.replace("+made remotely", f"+{value}")
    repo = make_repo()
    [result] = run(repo, f"{server.url}/patch", headers={"X-Badge": "${REMOTE_BADGE}"}).results
    assert result.error is not None and result.error.kind == "secret_leak"
    assert result.error.message == (
        "the patch holds the value of an http header: it was not applied"
    )
    assert _files_holding(repo / ".git", value) == []


def test_a_patch_needs_a_worktree(make_repo: MakeRepo, server: AgentServer) -> None:
    repo = make_repo()
    [result] = run(repo, f"{server.url}/patch", worktree=False).results
    assert result.error is not None and result.error.kind == "patch"
    assert result.error.message == "the answer carries a patch, but the task has no worktree"
    assert git(repo, "status", "--porcelain") == ""


# headers and secrets


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_header_secret_reaches_the_server_and_nothing_else(
    make_repo: MakeRepo, server: AgentServer, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """The variable's name does not look secret: the kind masks what it filled in itself."""
    server.secret = "s3cr3t-" + secrets.token_hex(12)
    monkeypatch.setenv("REMOTE_BADGE", server.secret)
    repo = make_repo()
    headers = {"Authorization": "Bearer ${REMOTE_BADGE}"}
    report = run(repo, f"{server.url}/secret", backend=backend, headers=headers)
    [result] = report.results
    assert result.status == "succeeded", result.error
    assert result.output == {"result": "authorised", "echo": "***"}  # echoed back, masked
    assert _files_holding(repo / ".git", server.secret) == []
    assert server.secret not in git(repo, "log", "--all", "-p")


def test_a_header_secret_echoed_in_an_error_is_masked(
    make_repo: MakeRepo, server: AgentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.secret = "the-expected-one"
    wrong = "w" + secrets.token_hex(12)
    monkeypatch.setenv("REMOTE_BADGE", wrong)
    repo = make_repo()
    headers = {"Authorization": "Bearer ${REMOTE_BADGE}"}
    [result] = run(repo, f"{server.url}/secret", headers=headers).results
    assert result.error is not None and result.error.kind == "auth"
    assert result.error.message.endswith("HTTP 401 Unauthorized: rejected: ***")
    assert _files_holding(repo / ".git", wrong) == []


def test_a_header_naming_an_unset_variable_fails_the_attempt(
    make_repo: MakeRepo, server: AgentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    headers = {"X-Key": "${NOT_SET_ANYWHERE}"}
    [result] = run(make_repo(), f"{server.url}/sync", headers=headers).results
    assert result.error is not None and result.error.kind == "spawn"
    assert result.error.message == (
        "http header X-Key uses ${NOT_SET_ANYWHERE}, which the agent's environment does not set"
    )
    assert server.requests_to("/sync") == []


def _files_holding(root: Path, text: str) -> list[Path]:
    """Files under *root* (a run's state and the repository's objects) holding *text*."""
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink() and text.encode() in path.read_bytes():
                found.append(path)
    return found


# through a plan


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plans_http_agent(
    make_repo: MakeRepo, server: AgentServer, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    server.secret = "plan-" + secrets.token_hex(12)
    monkeypatch.setenv("AGENT_TOKEN", server.secret)
    repo = make_repo()
    plan = Plan.model_validate(
        {
            "agents": {
                "remote": {
                    "http": {
                        "url": f"{server.url}/secret",
                        "headers": {"Authorization": "Bearer ${AGENT_TOKEN}"},
                        "poll_interval": 0.01,
                    }
                },
                "patcher": {"http": {"url": f"{server.url}/patch"}},
            },
            "defaults": {"venv": False},
            "tasks": [
                {"id": "ask", "agent": "remote", "task": "Ask"},
                {"id": "change", "agent": "patcher", "task": "Change"},
            ],
        }
    )
    report: Report = anyio.run(
        functools.partial(orchestrate_parallel, plan, repo=repo), backend=backend
    )
    results = {r.task_id: r for r in report.results}
    assert results["ask"].status == "succeeded", results["ask"].error
    assert results["change"].status == "succeeded", results["change"].error
    commit = results["change"].provenance.result_commit
    assert git(repo, "show", f"{commit}:REMOTE.txt") == "made remotely"
    assert results["ask"].provenance.agent.command == [f"{server.url}/secret"]
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json", backend=backend).ok
    assert _files_holding(repo / ".git", server.secret) == []


# the kind itself


def test_an_http_agent_cannot_be_sandboxed(make_repo: MakeRepo, server: AgentServer) -> None:
    report = run(make_repo(), f"{server.url}/sync", sandbox="bwrap")
    [result] = report.results
    assert result.error is not None and result.error.kind == "spawn"
    assert result.error.message == "agent 'remote' runs in this process: it cannot be sandboxed"
    assert result.attempts == 0
    assert server.requests_to("/sync") == []


def test_cancelling_an_attempt_propagates(server: AgentServer, tmp_path: Path) -> None:
    agent = HttpAgent(url=f"{server.url}/slow")
    request = _request(tmp_path, build_envelope("remote", "t", task_id="t1", venv=False))

    async def main() -> bool:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_once_asked() -> None:
                    await anyio.to_thread.run_sync(server.slow_asked.wait)
                    scope.cancel()

                tg.start_soon(cancel_once_asked)
                await agent.run_attempt(request)
                raise AssertionError("the attempt was not cancelled")
        return scope.cancelled_caught

    for backend in BACKENDS:
        server.slow_asked.clear()
        assert anyio.run(main, backend=backend)


def _request(tmp_path: Path, envelope: HandoffEnvelope) -> AttemptRequest:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    return AttemptRequest(
        envelope=envelope,
        attempt=1,
        run_id="run-1",
        cwd=tmp_path,
        worktree=None,
        venv=None,
        env={},
        envelope_path=run_dir / "envelope.json",
        output_path=run_dir / "output.json",
        stdout_path=run_dir / "stdout",
        stderr_path=run_dir / "stderr",
        run_dir=run_dir,
        state_dir=tmp_path,
        plan_dir=tmp_path,
        repo=None,
        kill_grace=0.5,
        lifeline=None,
    )


def test_the_kind_is_in_the_table_and_selected_by_http() -> None:
    options = {"http": {"url": "https://agents.example/run", "headers": {"X-Key": "${K}"}}}
    expected = HttpAgent(url="https://agents.example/run", headers={"X-Key": "${K}"})
    assert KINDS["http"](options) == expected
    assert as_agent(options) == expected
    assert as_agent({"kind": "http", **options}) == expected
    assert as_agent(AgentSpec.model_validate(options)) == expected
    assert (expected.in_process, expected.writes_logs, dict(expected.env)) == (True, False, {})


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"http": {"url": "ftp://x/run"}}, "url"),
        ({"http": {"url": "https://user:pw@x/run"}}, "must not hold credentials"),
        ({"http": {"url": "https://x/run", "headers": {"Bad Name": "v"}}}, "not a valid header"),
        ({"http": {"url": "https://x/run", "headers": {"Host": "v"}}}, "set by the client"),
        ({"http": {"url": "https://x/run", "headers": {"X": "a\r\nB: c"}}}, "line break"),
        ({"http": {"url": "https://x/run", "poll_interval": 0}}, "poll_interval"),
        ({"http": {"url": "https://x/run"}, "sandbox": "bwrap"}, "only a plan's agents entry"),
        ({"http": {"url": "https://x/run"}, "command": ["p"]}, "exactly one of"),
    ],
)
def test_options_the_kind_refuses(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        as_agent(options)


@pytest.mark.parametrize(
    "header",
    [
        {"Authorization": "Bearer abc123"},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"Proxy-Authorization": "Bearer abc"},
        {"Cookie": "session=abc123"},
        {"X-Api-Key": "k-123"},
        {"Private-Token": "glpat-123"},
        {"X-Client-Secret": "s3cret"},
        {"Authorization": "Bearer sk-${SUFFIX}"},  # half of it written in the plan
    ],
)
def test_a_credential_header_written_in_the_plan_is_a_plan_error(
    header: dict[str, str], tmp_path: Path
) -> None:
    """plan.json (in the run directory) keeps what the plan says: a credential must come
    from the environment. The error names the header and the way, never the value."""
    from orchestrator import PlanError
    from orchestrator.plan import load_plan

    [(name, value)] = header.items()
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "agents:\n"
        "  remote:\n"
        "    http:\n"
        "      url: https://agents.example/run\n"
        f"      headers: {{{name}: '{value}'}}\n"
        "tasks:\n"
        "  - {id: t, agent: remote, task: x, venv: false}\n"
    )
    with pytest.raises(PlanError) as caught:
        load_plan(plan)
    message = str(caught.value)
    assert "plan.yaml:5:" in message and "agents.remote.http.headers" in message
    assert f"{name} holds a credential written in the plan" in message
    assert "write it as ${NAME}, a variable of the agent's environment" in message
    assert value.split()[-1].split("=")[-1] not in message


@pytest.mark.parametrize(
    "header",
    [
        {"Authorization": "Bearer ${AGENT_TOKEN}"},
        {"Authorization": "${AUTHORIZATION}"},
        {"Cookie": "session=${SESSION}; csrf=${CSRF}"},
        {"X-Api-Key": "${API_KEY}"},
        {"X-Request-Source": "orchestrator"},  # not a credential's name
    ],
)
def test_a_credential_header_taken_from_the_environment_is_fine(header: dict[str, str]) -> None:
    spec = AgentSpec.model_validate({"http": {"url": "https://x/run", "headers": header}})
    assert spec.http is not None and spec.http.headers == header


def test_a_plans_http_entry_takes_no_preset_options() -> None:
    with pytest.raises(ValueError, match="program, model and args go with a preset"):
        AgentSpec.model_validate({"http": {"url": "https://x/run"}, "model": "m"})


def test_info_and_fingerprint_hold_no_header_value(tmp_path: Path) -> None:
    agent = HttpAgent(url="https://agents.example/run", headers={"Authorization": "Bearer ${T}"})
    assert agent.info() == AgentInfo(kind="http", command=["https://agents.example/run"])
    same = HttpAgent(url="https://agents.example/run", headers={"Authorization": "Bearer ${T}"})
    assert agent.fingerprint(tmp_path) == same.fingerprint(tmp_path)
    others = [
        HttpAgent(url="https://agents.example/other", headers=dict(agent.headers)),
        HttpAgent(url=agent.url, headers={"Authorization": "Token ${T}"}),
        HttpAgent(url=agent.url, headers=dict(agent.headers), env={"A": "1"}),
    ]
    assert len({agent.fingerprint(tmp_path), *(o.fingerprint(tmp_path) for o in others)}) == 4


def test_a_compressed_answer_is_refused_before_it_is_decoded(
    make_repo: MakeRepo, server: AgentServer
) -> None:
    [result] = run(make_repo(), f"{server.url}/gzip-bomb").results
    assert result.status == "failed" and result.error is not None
    assert result.error.kind == "invalid_output"
    assert "gzip-encoded" in result.error.message


def test_a_refused_literal_credential_is_not_repeated_by_the_error_given_in_code() -> None:
    """Validated in code (not from a plan file), pydantic's own error text would show it."""
    headers = {"Authorization": "Bearer sekrit-literal-123"}
    for validate in (
        lambda: AgentSpec.model_validate(
            {"http": {"url": "https://a.example", "headers": headers}}
        ),
        lambda: Plan.model_validate(
            {
                "agents": {"a": {"http": {"url": "https://a.example", "headers": headers}}},
                "tasks": [],
            }
        ),
    ):
        with pytest.raises(ValueError, match="Authorization") as caught:
            validate()
        assert "sekrit-literal-123" not in str(caught.value)
