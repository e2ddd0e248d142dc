"""The ``acp`` kind end to end: a real Agent Client Protocol agent (tests/fixtures/acp/agent.py,
written with the agent side of the ``agent-client-protocol`` package) run as a subprocess in
the task's worktree, driven through one prompt turn, its permission requests answered by the
plan's policy, its usage read; and the ways such an agent fails or misbehaves."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import AgentSpec, Plan
from orchestrator import orchestrate_parallel, verify_report
from orchestrator.acp_agent import AcpAgent, decide
from orchestrator.agents import as_agent
from orchestrator.plan import missing_programs, validate_plan_data
from orchestrator.sandbox import SandboxLayout, bwrap_argv, find_bwrap

from .conftest import MakeRepo, git, live_processes_with

AGENT = Path(__file__).parent / "fixtures" / "acp" / "agent.py"
BACKENDS = ["asyncio", "trio"]


def plan(mode: str = "edit", *, allow: list[str] | None = None, **task: Any) -> Plan:
    acp: dict[str, Any] = {"command": [sys.executable, str(AGENT)]}
    if allow is not None:
        acp["allow"] = allow
    return Plan.model_validate(
        {
            "agents": {"zed": {"acp": acp, "env": {"FAKE_ACP": mode}}},
            "defaults": {"venv": False},
            "tasks": [{"id": "greet", "agent": "zed", "task": "Write hello.txt", **task}],
        }
    )


def run(repo: Path, p: Plan, backend: str = "asyncio") -> Any:
    return anyio.run(lambda: orchestrate_parallel(p, repo=repo), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_acp_agent_does_one_turn_in_its_worktree(make_repo: MakeRepo, backend: str) -> None:
    repo = make_repo()
    report = run(repo, plan(), backend)
    result = report.results[0]
    assert result.status == "succeeded", result.error
    # The edit inside the worktree was granted, the one outside and the shell command not.
    assert result.output["result"].startswith("inside=yes outside=no shell=no")
    assert result.output["session_id"] == "sess-1"
    assert result.output["stop_reason"] == "end_turn"
    assert result.output["tool_calls"] == 2
    assert result.output["permissions"] == {
        "granted": 1,
        "refused": [
            {"kind": "edit", "title": "Write outside.txt"},
            {"kind": "execute", "title": "Run make"},
        ],
    }
    assert result.output["context"] == {"used": 1200, "size": 200000}
    # The file it was allowed to write is the task's commit; nothing was written outside.
    commit = result.provenance.result_commit
    assert git(repo, "show", f"{commit}:hello.txt") == "hello"
    assert not (repo.parent / "outside.txt").exists()
    usage = result.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (1000, 500, 1500)
    assert usage.cache_read_tokens == 20
    assert (usage.cost_usd, usage.cost_source, usage.session_id) == (0.25, "reported", "sess-1")
    assert result.provenance.agent.kind == "acp"
    assert result.provenance.prompt_sha256 is not None
    # The transcript of what the agent wrote is the task's stdout log, hashed in the report.
    assert result.provenance.stdout_sha256 is not None
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_the_plan_policy_decides_what_is_granted(make_repo: MakeRepo) -> None:
    repo = make_repo()
    report = run(repo, plan(allow=["execute"]))
    result = report.results[0]
    assert result.status == "succeeded", result.error
    # Edits are no longer allowed (the file is not written), shell commands are.
    assert result.output["result"].startswith("inside=no outside=no shell=yes")
    assert result.output["permissions"]["granted"] == 1


@pytest.mark.parametrize(
    ("mode", "kind", "words"),
    [
        ("max_turns", "turn_limit", "limit of model requests"),
        ("refusal", "agent_error", "refused"),
        ("auth", "auth", "session/new failed"),
        ("rate", "rate_limited", "Rate limit"),
        ("exit", "agent_error", "exited with code 3 without answering session/prompt: boom"),
        ("version", "agent_error", "ACP version 2"),
        ("huge", "agent_error", "more than 16 MiB"),
    ],
)
def test_an_acp_agent_failing_fails_its_task_with_a_kind(
    make_repo: MakeRepo, mode: str, kind: str, words: str
) -> None:
    report = run(make_repo(), plan(mode))
    result = report.results[0]
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.kind == kind
    assert words in result.error.message


def test_an_auth_failure_is_not_retried(make_repo: MakeRepo) -> None:
    report = run(make_repo(), plan("auth", retries=2))
    assert report.results[0].error.kind == "auth"
    assert report.results[0].attempts == 1


def test_lines_that_are_not_json_are_passed_over(make_repo: MakeRepo) -> None:
    report = run(make_repo(), plan("noise+edit"))
    assert report.results[0].status == "succeeded", report.results[0].error


def test_an_agent_that_lingers_after_its_turn_is_ended(make_repo: MakeRepo) -> None:
    """A turn that ended is the result, however the agent's process then had to be ended."""
    report = run(make_repo(), plan("edit+linger"))
    result = report.results[0]
    assert result.status == "succeeded", result.error
    assert live_processes_with(str(AGENT)) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_timeout_cancels_the_turn_then_ends_the_agent(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    marker = tmp_path / "cancelled.txt"
    monkeypatch.setenv("FAKE_ACP_MARKER", str(marker))
    report = run(make_repo(), plan("hang", timeout=3), backend)
    result = report.results[0]
    assert result.status == "timed_out"
    assert result.error.kind == "timeout"
    # The agent was sent session/cancel (and ended its turn) before its processes were ended.
    assert marker.read_text() == "cancelled\n"
    assert live_processes_with(str(AGENT)) == []


def test_cancelling_the_run_cancels_the_turn(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "cancelled.txt"
    monkeypatch.setenv("FAKE_ACP_MARKER", str(marker))
    repo = make_repo()

    async def main() -> None:
        with anyio.move_on_after(3):
            await orchestrate_parallel(plan("hang", timeout=60), repo=repo)

    anyio.run(main)
    assert marker.read_text() == "cancelled\n"
    assert live_processes_with(str(AGENT)) == []


def test_a_silent_agent_is_stalled(make_repo: MakeRepo) -> None:
    report = run(make_repo(), plan("silent", timeout=60, stall_timeout=2))
    result = report.results[0]
    assert result.status == "failed"
    assert result.error.kind == "stalled"
    assert live_processes_with(str(AGENT)) == []


def test_an_agent_that_cannot_start_is_a_spawn_failure(make_repo: MakeRepo) -> None:
    p = Plan.model_validate(
        {
            "agents": {"zed": {"acp": {"command": "/nonexistent/agent --acp"}}},
            "defaults": {"venv": False},
            "tasks": [{"id": "greet", "agent": "zed", "task": "x"}],
        }
    )
    result = run(make_repo(), p).results[0]
    assert result.status == "failed"
    assert result.error.kind == "spawn"


# The policy alone.

OPTIONS = [
    {"optionId": "a1", "kind": "allow_once"},
    {"optionId": "a2", "kind": "allow_always"},
    {"optionId": "r1", "kind": "reject_once"},
]
EDITS = frozenset({"edit", "delete", "move"})


@pytest.mark.parametrize(
    ("tool_call", "granted"),
    [
        ({"kind": "edit", "locations": [{"path": "a.txt"}]}, True),
        ({"kind": "edit", "locations": [{"path": "{wt}/src/a.txt"}]}, True),
        ({"kind": "edit", "locations": [{"path": "{wt}/../a.txt"}]}, False),
        ({"kind": "edit", "locations": [{"path": "/etc/passwd"}]}, False),
        ({"kind": "edit", "locations": [{"path": "a.txt"}, {"path": "/tmp/b"}]}, False),
        ({"kind": "edit", "locations": [{"path": "link/escape.txt"}]}, False),
        ({"kind": "edit", "locations": []}, False),  # a place it does not name is not checked
        ({"kind": "edit"}, False),
        ({"kind": "edit", "locations": [{"path": "a\0b"}]}, False),
        ({"kind": "edit", "locations": [{"path": 7}]}, False),
        ({"kind": "delete", "locations": [{"path": "a.txt"}]}, True),
        ({"kind": "read", "locations": [{"path": "a.txt"}]}, False),
        ({"kind": "execute", "title": "rm -rf /"}, False),
        ({"kind": "fetch"}, False),
        ({}, False),
    ],
)
def test_the_default_policy_allows_edits_inside_the_worktree_only(
    tmp_path: Path, tool_call: dict[str, Any], granted: bool
) -> None:
    worktree = tmp_path / "wt"
    worktree.mkdir()
    (worktree / "link").symlink_to(tmp_path)
    for location in tool_call.get("locations", []):
        if isinstance(location["path"], str):
            location["path"] = location["path"].replace("{wt}", str(worktree))
    got, outcome = decide(tool_call, OPTIONS, cwd=worktree, allow=EDITS)
    assert got is granted
    assert outcome == {"outcome": "selected", "optionId": "a1" if granted else "r1"}


def test_a_request_without_a_fitting_option_is_cancelled(tmp_path: Path) -> None:
    only_allow = [{"optionId": "a1", "kind": "allow_once"}]
    call = {"kind": "execute"}
    assert decide(call, only_allow, cwd=tmp_path, allow=EDITS) == (False, {"outcome": "cancelled"})
    assert decide(call, [], cwd=tmp_path, allow=frozenset({"execute"})) == (
        False,
        {"outcome": "cancelled"},
    )


# The plan's side.


def test_an_acp_entry_is_validated_and_its_program_checked(tmp_path: Path) -> None:
    spec = AgentSpec.model_validate({"acp": {"command": "gemini --experimental-acp"}})
    assert spec.acp is not None
    assert spec.acp.command == ["gemini", "--experimental-acp"]
    assert spec.acp.allow == ["edit", "delete", "move"]
    agent = as_agent(spec)
    assert isinstance(agent, AcpAgent)
    assert agent.info().kind == "acp"
    with pytest.raises(ValueError, match="exactly one of command, preset, http and acp"):
        AgentSpec.model_validate({"acp": {"command": ["x"]}, "command": ["y"]})
    with pytest.raises(ValueError, match="allow"):
        AgentSpec.model_validate({"acp": {"command": ["x"], "allow": ["everything"]}})
    with pytest.raises(ValueError, match="must not be empty"):
        AgentSpec.model_validate({"acp": {"command": [" "]}})
    data = {
        "agents": {"zed": {"acp": {"command": ["no-such-acp-agent"]}}},
        "tasks": [{"agent": "zed", "task": "x"}],
    }
    loaded = validate_plan_data(data, plan_dir=tmp_path)
    assert missing_programs(loaded) == [
        "agent zed: program 'no-such-acp-agent' is not on PATH, nor among its tasks' requirements"
    ]


def test_an_acp_agent_given_in_code_is_made_by_its_kind() -> None:
    agent = as_agent({"kind": "acp", "acp": {"command": ["x"], "allow": ["execute"]}})
    assert isinstance(agent, AcpAgent)
    assert agent.allow == frozenset({"execute"})
    assert isinstance(as_agent({"acp": {"command": ["x"]}}), AcpAgent)
    with pytest.raises(ValueError, match="sandbox"):
        as_agent({"acp": {"command": ["x"]}, "sandbox": "bwrap"})


def test_the_fingerprint_changes_with_the_policy(tmp_path: Path) -> None:
    one = AcpAgent(command=("x",), allow=frozenset({"edit"}))
    two = AcpAgent(command=("x",), allow=frozenset({"edit", "execute"}))
    assert one.fingerprint(tmp_path) != two.fingerprint(tmp_path)
    default = AcpAgent(command=("x",), allow=frozenset({"edit", "delete", "move"}))
    assert AcpAgent(command=("x",)).fingerprint(tmp_path) == default.fingerprint(tmp_path)


@pytest.mark.skipif(shutil.which("gemini") is None, reason="the Gemini CLI is not installed")
def test_the_real_gemini_cli_in_acp_mode_without_a_key_is_an_auth_failure(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemini CLI (checked with 0.61.0) speaks ACP with ``--acp``: our client gets through
    ``initialize`` and reads its refusal of ``session/new`` as ``auth``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI"):
        monkeypatch.delenv(name, raising=False)
    p = Plan.model_validate(
        {
            "agents": {"gem": {"acp": {"command": ["gemini", "--acp"]}}},
            "defaults": {"venv": False, "timeout": 120},
            "tasks": [{"id": "greet", "agent": "gem", "task": "Write hello.txt"}],
        }
    )
    result = run(make_repo(), p).results[0]
    assert result.status == "failed"
    assert result.error.kind == "auth", result.error
    assert live_processes_with(str(tmp_path / "home")) == []


def _bwrap_works() -> bool:
    bwrap = find_bwrap()
    if bwrap is None:
        return False
    probe = bwrap_argv(SandboxLayout(cwd=Path("/")), ["true"], bwrap=bwrap)
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _bwrap_works(), reason="bwrap is missing or cannot run here")
def test_a_sandboxed_acp_agent_talks_through_the_sandbox(make_repo: MakeRepo) -> None:
    """Its pipes go through bubblewrap; the file it was allowed to write is committed."""
    repo = make_repo()
    result = run(repo, plan(sandbox="bwrap")).results[0]
    assert result.status == "succeeded", result.error
    assert result.output["result"].startswith("inside=yes outside=no shell=no")
    assert git(repo, "show", f"{result.provenance.result_commit}:hello.txt") == "hello"


def test_an_agent_that_floods_its_output_still_ends_at_its_timeout(make_repo: MakeRepo) -> None:
    """Its pipe is never empty: the reader lets the event loop run between reads anyway, so
    that the timeout reaches it (and the other task of the run finishes meanwhile)."""
    p = Plan.model_validate(
        {
            "agents": {
                "zed": {
                    "acp": {"command": [sys.executable, str(AGENT)]},
                    "env": {"FAKE_ACP": "flood"},
                },
                "quick": {"command": [sys.executable, "-c", "pass"]},
            },
            "defaults": {"venv": False},
            "tasks": [
                {"id": "flood", "agent": "zed", "task": "x", "timeout": 3},
                {"id": "quick", "agent": "quick", "task": "y"},
            ],
        }
    )
    report = run(make_repo(), p)
    statuses = {r.task_id: r.status for r in report.results}
    assert statuses == {"flood": "timed_out", "quick": "succeeded"}
    assert live_processes_with(str(AGENT)) == []


def test_malformed_permission_requests_are_refused_not_fatal(make_repo: MakeRepo) -> None:
    result = run(make_repo(), plan("malformed+edit")).results[0]
    assert result.status == "succeeded", result.error
    refused = result.output["permissions"]["refused"]
    invalid = [r for r in refused if r["title"] == "a permission request that is not valid"]
    # The package's model salvages a wrong `kind` to none (then refused as kind `other`);
    # the other three do not validate at all.
    assert len(invalid) == 3
    assert {"kind": None, "title": None} in refused
    assert {"kind": "edit", "title": None} in refused  # the path of 200 000 parts
    assert result.output["result"].startswith("inside=yes outside=no shell=no")
