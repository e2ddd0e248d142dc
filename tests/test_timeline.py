"""A task's timings as the report records them, phase by phase: what the HTML page's timeline
is drawn from, recorded by a real run and checked by ``verify``."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import anyio

from envelopes import HandoffEnvelope, audit_report, build_envelope
from envelopes._timeline import audit_timings
from orchestrator import Workspace, orchestrate_parallel, verify_report

from .conftest import MakeRepo


async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    assert workspace.path is not None
    (workspace.path / f"{envelope.task_id}.txt").write_text("x\n")
    if envelope.task == "fail":
        raise RuntimeError("failed on purpose")
    return {}


def _run(make_repo: MakeRepo) -> tuple[Path, dict[str, Any]]:
    repo = make_repo()
    envelopes = [
        build_envelope("a", "write", task_id="first", venv=False),
        build_envelope("a", "fail", task_id="flaky", venv=False, retries=1),
        build_envelope("a", "write", task_id="second", venv=False, depends_on=["first"]),
    ]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"a": agent}, concurrency=2)
    )
    path = Path(report.run_dir) / "report.json"
    return path, json.loads(path.read_text())


def test_a_run_records_each_phase_queue_time_and_slot(make_repo: MakeRepo) -> None:
    path, raw = _run(make_repo)
    by_id = {r["task_id"]: r for r in raw["results"]}
    for result in raw["results"]:
        timings = result["timings"]
        assert timings["queued_at"] <= timings["started_at"]
        assert timings["slot"] in (0, 1)  # concurrency 2
        names = [p["name"] for p in timings["phases"]]
        assert names[0] == "worktree" and "agent" in names and "commit" in names
        for phase in timings["phases"]:
            assert 0 <= phase["start_s"] <= phase["end_s"] <= timings["duration_s"]
        assert list(audit_timings(result)) == []
    # One agent stretch per attempt; the totals are the stretches added up.
    flaky = by_id["flaky"]["timings"]
    agent_spans = [p for p in flaky["phases"] if p["name"] == "agent"]
    assert len(agent_spans) == 2
    total = sum(p["end_s"] - p["start_s"] for p in agent_spans)
    assert abs(total - flaky["agent_s"]) < 1e-5
    # A dependent is queued only once its dependency finished.
    assert by_id["second"]["timings"]["queued_at"] >= by_id["first"]["timings"]["finished_at"]
    assert anyio.run(verify_report, path).ok


def test_verify_names_timings_that_do_not_add_up(make_repo: MakeRepo) -> None:
    _, raw = _run(make_repo)
    result = raw["results"][0]

    def findings(change: Any) -> list[tuple[str, str]]:
        changed = copy.deepcopy(result)
        change(changed["timings"])
        return list(audit_timings(changed))

    def longer(t: dict[str, Any]) -> None:
        t["phases"][-1]["end_s"] = t["duration_s"] + 1

    def backwards(t: dict[str, Any]) -> None:
        t["phases"][0]["end_s"] = t["phases"][0]["start_s"] - 0.5

    def reordered(t: dict[str, Any]) -> None:
        t["phases"].reverse()

    def total(t: dict[str, Any]) -> None:
        t["agent_s"] += 0.25

    def queued_late(t: dict[str, Any]) -> None:
        t["queued_at"] = t["finished_at"]

    assert findings(longer)[0][0] == f"timings.phases[{len(result['timings']['phases']) - 1}]"
    assert "ends after the task" in findings(longer)[0][1]
    assert any("before it starts" in m for _, m in findings(backwards))
    assert any("before the phase recorded before it" in m for _, m in findings(reordered))
    assert findings(total) == [
        (
            "timings.agent_s",
            f"is {result['timings']['agent_s'] + 0.25}, its stretches in timings.phases add up "
            f"to {round(result['timings']['agent_s'], 6)}",
        )
    ]
    assert findings(queued_late) == [("timings.queued_at", "after the task started")]
    # Through the whole audit too (the seal is broken as well, and said so).
    raw["results"][0]["timings"]["agent_s"] += 0.25
    fields = {f.field for f in audit_report(raw)}
    assert "timings.agent_s" in fields and "provenance.result_sha256" in fields


def test_reports_from_before_phases_are_not_held_to_them(make_repo: MakeRepo) -> None:
    _, raw = _run(make_repo)
    result = raw["results"][0]
    for name in ("phases", "queued_at", "slot"):
        del result["timings"][name]
    assert list(audit_timings(result)) == []
