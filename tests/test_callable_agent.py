"""orchestrator/callable_agent.py: one attempt of an async function, in this process."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import anyio
import pytest

from envelopes import AgentInfo, HandoffEnvelope, build_envelope
from orchestrator.agents import AgentFunction, AttemptOutcome, CallableAgent, Workspace

from .test_command_agent import request_for


def envelope_of(**fields: Any) -> HandoffEnvelope:
    return build_envelope("a", "do it", task_id="t1", worktree=False, venv=False, **fields)


def attempt(function: AgentFunction, tmp_path: Path, **fields: Any) -> AttemptOutcome:
    request = request_for(tmp_path, envelope_of(**fields))
    return anyio.run(CallableAgent(function=function).run_attempt, request)


def test_what_it_returns_is_its_output_as_json_reads_it_back(tmp_path: Path) -> None:
    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> Mapping[str, Any]:
        return MappingProxyType({"b": (1, 2), "a": envelope.task_id})

    outcome = attempt(agent, tmp_path)
    assert outcome == AttemptOutcome(status="succeeded", output={"a": "t1", "b": [1, 2]})


def test_it_works_in_the_workspace_the_request_describes(tmp_path: Path) -> None:
    seen: list[Workspace] = []

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> None:
        seen.append(workspace)

    request = request_for(tmp_path, envelope_of())
    outcome = anyio.run(CallableAgent(function=agent).run_attempt, request)
    assert (outcome.status, outcome.output) == ("succeeded", None)
    [workspace] = seen
    assert (
        workspace.task_id,
        workspace.run_id,
        workspace.path,
        workspace.venv,
        workspace.output_path,
        workspace.envelope_path,
        workspace.env,
    ) == ("t1", request.run_id, None, None, request.output_path, request.envelope_path, request.env)
    assert not request.stdout_path.exists()  # no log files of its own


def test_returning_none_reads_the_output_file(tmp_path: Path) -> None:
    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> None:
        await anyio.Path(workspace.output_path).write_text(json.dumps({"from": "file"}))

    assert attempt(agent, tmp_path).output == {"from": "file"}


def test_an_output_file_that_is_not_an_object_fails(tmp_path: Path) -> None:
    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> None:
        await anyio.Path(workspace.output_path).write_text("[1]")

    outcome = attempt(agent, tmp_path)
    assert outcome.status == "failed" and outcome.error is not None
    assert (outcome.error.kind, outcome.error.message) == (
        "invalid_output",
        "output must be a JSON object, found list",
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, 2], "agent returned list, not a mapping"),
        ({"x": {1, 2}}, "output is not JSON-serialisable"),
        ({"x": math.nan}, "output is not JSON-serialisable"),
    ],
    ids=["list", "set", "nan"],
)
def test_what_json_cannot_hold_fails(tmp_path: Path, value: Any, message: str) -> None:
    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> Any:
        return value

    outcome = attempt(agent, tmp_path)
    assert (outcome.status, outcome.output) == ("failed", None)
    assert outcome.error is not None and outcome.error.kind == "invalid_output"
    assert outcome.error.message.startswith(message)


def test_an_exception_fails_the_attempt_not_the_run(tmp_path: Path) -> None:
    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> None:
        raise ValueError("no such thing")

    outcome = attempt(agent, tmp_path)
    assert outcome.status == "failed" and outcome.error is not None
    assert (outcome.error.kind, outcome.error.message) == (
        "agent_exception",
        "ValueError: no such thing",
    )


def test_a_function_that_awaits_too_long_times_out(tmp_path: Path) -> None:
    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> None:
        await anyio.sleep(60)

    outcome = attempt(agent, tmp_path, timeout=0.2)
    assert outcome.status == "timed_out" and outcome.error is not None
    assert (outcome.error.kind, outcome.error.message) == ("timeout", "timed out after 0.2 s")


def test_a_cancelled_attempt_propagates_the_cancellation(tmp_path: Path) -> None:
    started = anyio.Event()
    ended: list[str] = []

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> None:
        started.set()
        try:
            await anyio.sleep(60)
        finally:
            ended.append("cleaned up")

    request = request_for(tmp_path, envelope_of())

    async def main() -> None:
        async with anyio.create_task_group() as group:

            async def run() -> None:
                await CallableAgent(function=agent).run_attempt(request)
                ended.append("returned")

            group.start_soon(run)
            await started.wait()
            group.cancel_scope.cancel()

    anyio.run(main)
    assert ended == ["cleaned up"]


def test_what_it_tells_the_lifecycle_and_the_cache() -> None:
    async def one(envelope: HandoffEnvelope, workspace: Workspace) -> None:
        return None

    async def two(envelope: HandoffEnvelope, workspace: Workspace) -> None:
        return None

    agent = CallableAgent(function=one)
    assert (agent.in_process, agent.writes_logs, dict(agent.env)) == (True, False, {})
    qualname = f"{__name__}.test_what_it_tells_the_lifecycle_and_the_cache.<locals>.one"
    assert agent.info() == AgentInfo(kind="callable", qualname=qualname)
    assert agent.info("/usr/bin/ignored") == agent.info()
    assert agent.fingerprint(Path("/a")) == agent.fingerprint(Path("/b"))
    assert agent.fingerprint(Path("/a")) != CallableAgent(function=two).fingerprint(Path("/a"))


def test_from_options_wants_one_async_function() -> None:
    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> None:
        return None

    def sync_agent(envelope: HandoffEnvelope, workspace: Workspace) -> None:
        return None

    assert CallableAgent.from_options({"function": agent}) == CallableAgent(function=agent)
    with pytest.raises(TypeError, match="must be an async function"):
        CallableAgent.from_options({"function": sync_agent})
    with pytest.raises(TypeError, match="must be an async function"):
        CallableAgent.from_options({})
    with pytest.raises(ValueError, match="takes only a function, not retries"):
        CallableAgent.from_options({"function": agent, "retries": 3})
