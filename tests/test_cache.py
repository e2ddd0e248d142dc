"""The result cache: opt-in, keyed on the work, the code, the environment and the agent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import HandoffEnvelope, Plan, Report
from orchestrator import Workspace, orchestrate_parallel, verify_report
from orchestrator.agents import as_agent

from .conftest import MakeRepo, cli, git

CALLS: list[str] = []


async def write(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    CALLS.append(envelope.task_id)
    assert workspace.path is not None
    (workspace.path / f"{envelope.task_id}.txt").write_text(json.dumps(envelope.inputs))
    if envelope.inputs.get("fail"):
        raise RuntimeError("fails")
    return {"wrote": envelope.task_id}


def plan(cache: bool = True, **inputs: dict[str, Any]) -> Plan:
    return Plan.model_validate(
        {
            "cache": cache,
            "defaults": {"venv": False},
            "tasks": [
                {"id": "a", "agent": "w", "task": "t", "inputs": inputs.get("a", {})},
                {"id": "b", "agent": "w", "task": "t", "inputs": inputs.get("b", {})},
                {"id": "c", "agent": "w", "task": "t", "depends_on": ["a", "b"]},
            ],
        }
    )


def run(repo: Path, the_plan: Plan) -> Report:
    CALLS.clear()
    return anyio.run(lambda: orchestrate_parallel(the_plan, repo=repo, agents={"w": write}))


def verified(report: Report) -> bool:
    outcome = anyio.run(verify_report, Path(report.run_dir) / "report.json")
    return outcome.ok or pytest.fail(str(outcome.findings))


def test_a_second_run_of_the_same_plan_runs_no_agent(make_repo: MakeRepo) -> None:
    repo = make_repo()
    first = run(repo, plan())
    assert sorted(CALLS) == ["a", "b", "c"]
    second = run(repo, plan())
    assert CALLS == []
    assert [r.status for r in second.results] == ["cached"] * 3
    assert second.summary.cached == 3 and second.summary.successful == 3
    for old, new in zip(first.results, second.results, strict=True):
        assert new.provenance.result_commit == old.provenance.result_commit
        assert new.branch == old.branch  # the work stays on the branch that made it
        assert new.output == old.output and new.attempts == 0
        assert new.provenance.cached_from is not None
        assert new.provenance.cached_from.run_id == first.run_id
    assert verified(second)


def test_changing_one_tasks_inputs_reruns_it_and_what_depends_on_it(make_repo: MakeRepo) -> None:
    repo = make_repo()
    run(repo, plan())
    again = run(repo, plan(a={"n": 2}))
    # a changed; c depends on a, so what it is told (upstream) changed too; b did not.
    assert sorted(CALLS) == ["a", "c"]
    assert [r.status for r in again.results] == ["succeeded", "cached", "succeeded"]
    assert verified(again)


def test_a_deleted_branch_is_a_miss_not_an_error(make_repo: MakeRepo) -> None:
    repo = make_repo()
    first = run(repo, plan())
    branch = first.result("b").branch
    assert branch is not None
    git(repo, "branch", "-D", branch)
    again = run(repo, plan())
    # a is cached; b runs again, and so does c, which is told b's new result commit.
    assert sorted(CALLS) == ["b", "c"]
    assert again.result("b").status == "succeeded"
    assert verified(again)


def test_failures_are_not_cached_and_caching_is_off_by_default(make_repo: MakeRepo) -> None:
    repo = make_repo()
    run(repo, plan(b={"fail": True}))
    run(repo, plan(b={"fail": True}))
    assert sorted(CALLS) == ["a", "b"] or sorted(CALLS) == ["b"]
    assert "b" in CALLS  # a failure is never served from the cache
    run(repo, plan(cache=False))
    run(repo, plan(cache=False))
    assert sorted(CALLS) == ["a", "b", "c"]


def test_a_changed_agent_is_a_miss(make_repo: MakeRepo) -> None:
    repo = make_repo()
    run(repo, plan())

    async def other(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        CALLS.append(envelope.task_id)
        return {}

    CALLS.clear()
    anyio.run(lambda: orchestrate_parallel(plan(), repo=repo, agents={"w": other}))
    assert sorted(CALLS) == ["a", "b", "c"]


def test_cache_ls_and_clear(make_repo: MakeRepo, capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_repo()
    first = run(repo, plan())
    listed = cli(capsys, "cache", "ls", "--repo", str(repo), "--json")
    assert listed.code == 0
    rows = [json.loads(line) for line in listed.out.splitlines()]
    assert sorted(r["task_id"] for r in rows) == ["a", "b", "c"]
    assert {r["run_id"] for r in rows} == {first.run_id}
    cleared = cli(capsys, "cache", "clear", "--repo", str(repo))
    assert cleared.code == 0 and cleared.out.startswith("removed 3 cache entries")
    run(repo, plan())
    assert sorted(CALLS) == ["a", "b", "c"]
    assert cli(capsys, "cache", "ls", "--repo", str(repo)).out.endswith(
        "3 entries in " + str(repo / ".git" / "orchestrator" / "cache") + "\n"
    )


def test_the_agent_is_its_script_not_the_command_text(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two plans with the same `{plan_dir}/agent.py` command, different scripts: no hit."""
    import sys

    repo = make_repo()

    def plan_in(name: str, says: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        (where / "agent.py").write_text(
            "import json, os\n"
            f"open(os.environ['ORCHESTRATOR_OUTPUT'], 'w').write(json.dumps({{'by': {says!r}}}))\n"
        )
        plan = where / "plan.yaml"
        plan.write_text(
            f"repo: {json.dumps(str(repo))}\ncache: true\ndefaults: {{venv: false}}\n"
            f"agents: {{w: {{command: [{json.dumps(sys.executable)}, '{{plan_dir}}/agent.py']}}}}\n"
            "tasks:\n  - {id: t, agent: w, task: t}\n"
        )
        return plan

    def output(plan: Path) -> tuple[str, Any]:
        outcome = cli(capsys, "run", str(plan), "--json")
        assert outcome.code == 0, outcome.err
        (result,) = json.loads(outcome.out)["results"]
        return result["status"], result["output"]

    one, two = plan_in("one", "ONE"), plan_in("two", "TWO")
    assert output(one) == ("succeeded", {"by": "ONE"})
    assert output(two) == ("succeeded", {"by": "TWO"})
    assert output(one) == ("cached", {"by": "ONE"})
    (one.parent / "agent.py").write_text((one.parent / "agent.py").read_text() + "# edited\n")
    assert output(one) == ("succeeded", {"by": "ONE"})


def test_reusing_a_run_that_does_not_exist_is_refused_leaving_nothing(tmp_path: Path) -> None:
    from envelopes import build_envelope
    from orchestrator import OrchestratorError

    envelope = build_envelope("w", "t", task_id="a", worktree=False, venv=False)
    with pytest.raises(OrchestratorError, match=r"^no run nope in .* to reuse$"):
        anyio.run(
            lambda: orchestrate_parallel(
                [envelope], agents={"w": write}, state_dir=tmp_path, reuse="nope"
            )
        )
    assert list((tmp_path / "runs").iterdir()) == []


def test_hooks_and_copies_are_part_of_the_key(tmp_path: Path) -> None:
    """What a task's agent starts from is made by the plan's hooks and copies too: a run with
    other ones is other work. A run with neither keys as it always did."""
    from orchestrator.cache import agent_digest, workspace_of
    from orchestrator.settings import resolve_settings

    agent = as_agent(["python", "-c", "pass"])
    plain = resolve_settings(None, {})
    hooked = resolve_settings(None, {"hooks": {"after_create": "make"}})
    copying = resolve_settings(None, {"copy_paths": [".env"]})
    assert workspace_of(plain) == {}
    assert agent_digest(agent, tmp_path, workspace_of(plain)) == agent.fingerprint(tmp_path)
    keys = {agent_digest(agent, tmp_path, workspace_of(s)) for s in (plain, hooked, copying)}
    assert len(keys) == 3
