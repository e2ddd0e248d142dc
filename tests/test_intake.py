"""What a run is given, checked before anything is made: plan forms, agent table, repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import HandoffEnvelope, Plan, build_envelope
from orchestrator import OrchestratorError, PlanError, Repository, Workspace
from orchestrator.intake import agent_table, normalise, take_in
from orchestrator.plan import LoadedPlan

from .conftest import MakeRepo, git


async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    return {}


PLAN = {
    "agents": {"a": {"command": ["true"]}},
    "tasks": [{"id": "one", "agent": "a", "task": "x"}, {"id": "two", "agent": "a", "task": "y"}],
}


def test_every_plan_form_gives_the_same_envelopes() -> None:
    plan = Plan.model_validate(PLAN)
    forms: list[Any] = [plan, PLAN, LoadedPlan(plan, None, Path.cwd())]
    for form in forms:
        loaded, envelopes = normalise(form, {})
        assert loaded is not None and loaded.plan == plan
        assert [e.task_id for e in envelopes] == ["one", "two"]
    envelopes = [build_envelope("a", "x", task_id="e1"), build_envelope("a", "y", task_id="e2")]
    loaded, same = normalise(envelopes, {})
    assert loaded is None and same == envelopes


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ([], "tasks: no tasks to run"),
        (
            [build_envelope("a", "x", task_id="t"), build_envelope("a", "y", task_id="t")],
            "tasks: duplicate task id 't'",
        ),
        (
            [build_envelope("a", "x", task_id="t", depends_on=["t"])],
            "depends_on",
        ),
    ],
)
def test_bad_envelope_lists_are_plan_errors(given: list[HandoffEnvelope], message: str) -> None:
    with pytest.raises(PlanError) as caught:
        normalise(given, {})
    assert message in str(caught.value.issues[0])


def test_a_list_of_something_else_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="expected HandoffEnvelope, got dict"):
        normalise([{"task_id": "t"}], {})  # type: ignore[list-item]


def test_a_plan_naming_a_callable_agent_needs_it_given() -> None:
    data = {"tasks": [{"id": "t", "agent": "code", "task": "x"}]}
    with pytest.raises(PlanError, match="agent 'code' is not defined"):
        normalise(data, {})
    loaded, envelopes = normalise(data, {"code": agent})
    assert loaded is not None and envelopes[0].agent == "code"


def test_agents_given_in_code_win_and_missing_ones_are_named() -> None:
    plan = Plan.model_validate(PLAN)
    _, envelopes = normalise(plan, {})
    table = agent_table(plan, {"a": agent}, envelopes)
    assert table["a"].info().kind == "callable"
    other = [build_envelope("b", "x", task_id="t1"), build_envelope("c", "x", task_id="t2")]
    with pytest.raises(PlanError) as caught:
        agent_table(None, {}, other)
    assert [i.message for i in caught.value.issues] == [
        "agent 'b' is not defined",
        "agent 'c' is not defined",
    ]


def test_take_in_opens_the_repository_and_resolves_the_base_once(make_repo: MakeRepo) -> None:
    repo = make_repo()
    head = git(repo, "rev-parse", "HEAD")
    git(repo, "tag", "v1")
    git(repo, "commit", "--allow-empty", "-m", "later")

    async def main() -> None:
        intake = await take_in(PLAN, repo=repo, agents=None, overrides={"base": "v1"})
        try:
            assert intake.repository is not None and intake.owns_repository
            assert intake.base_commit == head and intake.settings.base == "v1"
            assert intake.plan_sha256 == intake.plan_sha256  # stable
        finally:
            intake.close()
        repository = await Repository.open(repo)
        try:
            shared = await take_in(PLAN, repo=repository, agents=None, overrides={})
            assert shared.repository is repository and not shared.owns_repository
            assert shared.base_commit == git(repo, "rev-parse", "HEAD") != head
        finally:
            repository.lock.close()

    anyio.run(main)


def test_tasks_needing_a_worktree_need_a_repository(tmp_path: Path) -> None:
    envelopes = [build_envelope("a", "x", task_id="w1")]
    with pytest.raises(OrchestratorError, match="tasks w1 need a worktree"):
        anyio.run(lambda: take_in(envelopes, repo=None, agents={"a": agent}, overrides={}))


def test_a_bad_setting_is_refused_before_the_repository_is_opened(tmp_path: Path) -> None:
    from orchestrator.errors import SettingsError

    with pytest.raises(SettingsError):
        anyio.run(
            lambda: take_in(
                PLAN, repo=tmp_path / "not-a-repo", agents=None, overrides={"concurrency": 0}
            )
        )


def test_secret_values_are_masked_in_the_plan_as_hashed() -> None:
    data = {**PLAN, "defaults": {"env": {"API_TOKEN": "s3cr3t-value"}, "worktree": False}}
    intake = anyio.run(lambda: take_in(data, repo=None, agents=None, overrides={}))
    assert b"s3cr3t-value" not in intake.plan_bytes


def test_a_sandboxed_dependent_may_not_install_its_worktree_outside_the_sandbox() -> None:
    """install_project runs the project's build backend unsandboxed: on a task that starts
    from other agents' (sandboxed) work, that would run their code outside the sandbox."""
    from envelopes import build_envelope
    from orchestrator.intake import unsafe_installs

    first = build_envelope("a", "t", task_id="first", sandbox="bwrap")
    risky = [
        build_envelope(
            "a", "t", task_id="two", sandbox="bwrap", depends_on=["first"], install_project=True
        ),
        build_envelope(
            "a",
            "t",
            task_id="three",
            sandbox="bwrap",
            depends_on=["first"],
            requirements=["-e {worktree}"],
        ),
    ]
    fine = [
        build_envelope("a", "t", task_id="four", sandbox="bwrap", install_project=True),
        build_envelope("a", "t", task_id="five", depends_on=["first"], install_project=True),
    ]
    issues = unsafe_installs([first, *risky, *fine])
    assert [i.path for i in issues] == ["tasks.two", "tasks.three"]
    assert "install in a setup step instead" in issues[0].message
