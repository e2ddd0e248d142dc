"""Run settings: one frozen object, resolved once from defaults, plan and caller, same bounds
and wording whatever the source, journaled as one record and read back on resume."""

from __future__ import annotations

import ast
import json
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError

from envelopes import HandoffEnvelope, Plan, build_envelope
from orchestrator import OrchestratorError, PlanError, Workspace, orchestrate_parallel
from orchestrator.errors import SettingsError
from orchestrator.plan import validate_plan_data
from orchestrator.resume import recorded_run
from orchestrator.settings import RunSettings, plan_settings, resolve_settings, state_root

from .conftest import cli

ENGINE = Path(__file__).resolve().parent.parent / "orchestrator"


def plan(**top: Any) -> Plan:
    return Plan.model_validate(
        {"agents": {"a": {"command": ["true"]}}, "tasks": [{"id": "t", "task": "x"}], **top}
    )


class Counting:
    """A callable agent that counts how many of its tasks run at once (``peak``)."""

    def __init__(self) -> None:
        self.running = self.peak = 0

    async def __call__(self, envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await anyio.sleep(0.02)
        self.running -= 1
        return {}


def tasks_plan(n: int, concurrency: int) -> Plan:
    return Plan.model_validate(
        {
            "concurrency": concurrency,
            "defaults": {"worktree": False, "venv": False},
            "tasks": [{"id": f"t{i}", "agent": "a", "task": "x"} for i in range(n)],
        }
    )


def test_defaults_live_in_the_settings_class_only() -> None:
    settings = resolve_settings(None, {})
    assert settings == RunSettings()
    assert (settings.concurrency, settings.pool_size, settings.keep_worktrees) == (4, 4, "failed")
    assert (settings.kill_grace, settings.backoff, settings.base) == (2.0, (1.0, 30.0), "HEAD")


def test_the_plan_then_the_caller_win_and_none_means_not_given() -> None:
    p = plan(concurrency=3, keep_worktrees="always", fail_fast=True, base="main")
    from_plan = resolve_settings(p, {"concurrency": None, "keep_worktrees": None})
    assert (from_plan.concurrency, from_plan.keep_worktrees, from_plan.fail_fast) == (
        3,
        "always",
        True,
    )
    assert from_plan.base == "main"
    overridden = resolve_settings(p, {"concurrency": 7, "fail_fast": False, "base": "v1"})
    assert (overridden.concurrency, overridden.fail_fast, overridden.base) == (7, False, "v1")
    assert overridden.keep_worktrees == "always"


def test_agent_limits_merge_the_plans_agents_and_the_callers() -> None:
    p = Plan.model_validate(
        {
            "agents": {
                "a": {"command": ["true"], "max_concurrency": 2},
                "b": {"command": ["true"], "max_concurrency": 5},
            },
            "tasks": [{"id": "t", "agent": "a", "task": "x"}],
        }
    )
    assert plan_settings(p)["agent_limits"] == {"a": 2, "b": 5}
    settings = resolve_settings(p, {"agent_limits": {"b": 1, "c": 3}})
    assert settings.agent_limits == {"a": 2, "b": 1, "c": 3}


def test_a_settings_object_given_in_code_overrides_only_what_it_sets() -> None:
    p = plan(concurrency=3, keep_worktrees="always")
    settings = resolve_settings(p, {}, recorded=RunSettings(concurrency=9))
    assert (settings.concurrency, settings.keep_worktrees) == (9, "always")


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("concurrency", 0, "must be >= 1, found 0"),
        ("concurrency", 2000, "must be <= 1024, found 2000"),
        ("pool", -1, "must be >= 0, found -1"),
        (
            "keep_worktrees",
            "sometimes",
            "must be one of 'never', 'failed' or 'always', found 'sometimes'",
        ),
        ("venv_backend", "conda", "must be one of 'auto', 'uv' or 'stdlib', found 'conda'"),
        ("kill_grace", -1.0, "must be >= 0, found -1.0"),
        (
            "backoff",
            (5.0, 1.0),
            "the first wait must not be longer than the longest, found (5.0, 1.0)",
        ),
        ("executor", "mars", "must be one of 'local' or 'dask', found 'mars'"),
    ],
)
def test_a_bad_value_is_one_error_naming_the_setting(name: str, value: Any, reason: str) -> None:
    with pytest.raises(SettingsError) as caught:
        resolve_settings(None, {name: value})
    assert (caught.value.name, caught.value.reason) == (name, reason)
    assert str(caught.value) == f"{name}: {reason}"


def test_the_plan_and_the_caller_get_the_same_bound_and_wording() -> None:
    with pytest.raises(PlanError) as from_plan:
        validate_plan_data(
            {
                "agents": {"a": {"command": ["true"]}},
                "tasks": [{"task": "x", "agent": "a"}],
                "concurrency": 2000,
            }
        )
    with pytest.raises(SettingsError) as from_caller:
        resolve_settings(None, {"concurrency": 2000})
    assert from_plan.value.issues[0].message == from_caller.value.reason


def test_settings_are_frozen_and_unknown_ones_refused() -> None:
    settings = RunSettings()
    with pytest.raises(ValidationError):
        settings.concurrency = 8  # type: ignore[misc]
    with pytest.raises(TypeError, match="unknown setting 'concurency'"):
        resolve_settings(None, {"concurency": 2})


def test_the_journal_form_reads_back_as_the_same_settings() -> None:
    settings = resolve_settings(
        None,
        {"concurrency": 3, "pool": 0, "backoff": (0.5, 2.0), "agent_limits": {"a": 1}},
    )
    form = settings.journal_form()
    assert json.loads(json.dumps(form)) == form
    assert "state_dir" not in form
    assert RunSettings.from_journal(form) == settings
    # An older journal's "options" record: what it lacks takes the defaults.
    old = RunSettings.from_journal({"concurrency": 2, "backoff": [1.0, 30.0], "unknown": 1})
    assert (old.concurrency, old.keep_worktrees) == (2, "failed")


def test_state_root_prefers_the_repository_then_the_option_then_the_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert state_root(tmp_path / "git" / "orchestrator", "x") == tmp_path / "git" / "orchestrator"
    assert state_root(None, "x") == tmp_path / "x"
    assert state_root(None, None) == tmp_path / ".orchestrator"


def test_a_bad_api_value_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    envelopes = [build_envelope("a", "x", task_id="t", worktree=False, venv=False)]

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        return {}

    with pytest.raises(SettingsError, match="concurrency: must be <= 1024, found 5000"):
        anyio.run(
            lambda: orchestrate_parallel(
                envelopes, agents={"a": agent}, state_dir=tmp_path / "state", concurrency=5000
            )
        )
    assert not (tmp_path / "state").exists()
    assert issubclass(SettingsError, OrchestratorError)


def test_the_concurrency_in_force_is_the_resolved_one(tmp_path: Path) -> None:
    """The plan says 3, the caller 1: at most one task ever runs at once."""
    agent = Counting()
    p = tasks_plan(6, concurrency=3)
    state = tmp_path / "state"
    report = anyio.run(
        lambda: orchestrate_parallel(p, agents={"a": agent}, state_dir=state, concurrency=1)
    )
    assert report.summary.successful == 6 and agent.peak == 1
    agent = Counting()
    report = anyio.run(lambda: orchestrate_parallel(p, agents={"a": agent}, state_dir=state))
    assert report.summary.successful == 6 and agent.peak == 3
    journal = (state / "runs" / report.run_id / "journal.jsonl").read_text().splitlines()
    record = json.loads(journal[0])
    assert record["type"] == "run" and record["settings"]["concurrency"] == 3
    assert recorded_run(state / "runs" / report.run_id, report.run_id).settings.concurrency == 3


def test_a_cli_value_out_of_bounds_is_exit_2_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(
        "defaults: {worktree: false, venv: false}\n"
        "agents: {a: {command: ['true']}}\n"
        "tasks: [{id: t, agent: a, task: x}]\n"
    )
    for option, value, reason in [
        ("--concurrency", "2000", "must be <= 1024, found 2000"),
        ("--pool", "-3", "must be >= 0, found -3"),
        (
            "--keep-worktrees",
            "sometimes",
            "must be one of 'never', 'failed' or 'always', found 'sometimes'",
        ),
        ("--venv-backend", "conda", "must be one of 'auto', 'uv' or 'stdlib', found 'conda'"),
    ]:
        outcome = cli(capsys, "run", str(plan_file), f"{option}={value}")
        assert outcome.code == 2, outcome
        assert outcome.err.strip().splitlines()[-1] == f"orchestrator: {option}: {reason}"
    assert not (tmp_path / ".orchestrator").exists()


def _literal_defaults(tree: ast.AST) -> list[tuple[str, int]]:
    """(name, line) of every parameter or field given a literal default in *tree*."""
    watched = {"concurrency", "kill_grace", "backoff", "keep_worktrees", "pool", "venv_backend"}
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id in watched
            and isinstance(node.value, ast.Constant | ast.Tuple)
            and not (isinstance(node.value, ast.Constant) and node.value.value is None)
        ):
            found.append((node.target.id, node.lineno))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(
                node.args.defaults
            )
            defaults += list(node.args.kw_defaults)
            for arg, default in zip(args, defaults, strict=True):
                if (
                    arg.arg in watched
                    and isinstance(default, ast.Constant | ast.Tuple)
                    and not (isinstance(default, ast.Constant) and default.value is None)
                ):
                    found.append((arg.arg, node.lineno))
    return found


def test_no_engine_module_re_defaults_a_setting() -> None:
    """A run setting has one default, in RunSettings: anywhere else it is "not given"."""
    offenders = {
        path.name: found
        for path in sorted(ENGINE.glob("*.py"))
        if path.name != "settings.py"
        and (found := _literal_defaults(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert offenders == {}


def test_the_fallback_state_directory_is_named_once() -> None:
    named = [
        path.name
        for path in ENGINE.glob("*.py")
        if '".orchestrator"' in path.read_text(encoding="utf-8")
    ]
    assert named == ["settings.py"]


def test_a_resume_goes_on_with_the_settings_its_run_started_with(tmp_path: Path) -> None:
    """Whichever way a run is resumed, its journaled settings replace the plan's; the caller's
    keywords still win."""
    from envelopes import Event, TaskFinished
    from orchestrator import resume_run

    agent = Counting()
    p = tasks_plan(8, concurrency=4)
    state = tmp_path / "state"

    async def interrupted() -> str:
        run_id = ""
        with anyio.CancelScope() as scope:

            def stop(event: Event) -> None:
                nonlocal run_id
                run_id = event.run_id
                if isinstance(event, TaskFinished):
                    scope.cancel()

            await orchestrate_parallel(
                p, agents={"a": agent}, state_dir=state, concurrency=1, on_event=stop
            )
        return run_id

    for resume in ("keywords", "resume_run", "override"):
        run_id = anyio.run(interrupted)
        agent.running = agent.peak = 0
        if resume == "keywords":
            report = anyio.run(
                partial(
                    orchestrate_parallel, p, agents={"a": agent}, state_dir=state, resume=run_id
                )
            )
            assert agent.peak == 1  # the run's concurrency, not the plan's 4
        elif resume == "resume_run":
            report = anyio.run(partial(resume_run, run_id, agents={"a": agent}, state_dir=state))
            assert agent.peak == 1
        else:
            report = anyio.run(
                partial(resume_run, run_id, agents={"a": agent}, state_dir=state, concurrency=3)
            )
            assert agent.peak == 3
        assert report.run_id == run_id and report.summary.successful == 8


def test_a_state_dir_in_a_settings_object_is_where_the_run_goes(tmp_path: Path) -> None:
    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        return {}

    envelopes = [build_envelope("a", "x", task_id="t", worktree=False, venv=False)]
    settings = RunSettings(state_dir=tmp_path / "chosen")
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, agents={"a": agent}, settings=settings)
    )
    assert Path(report.run_dir).parent.parent == tmp_path / "chosen"


def test_a_venv_backend_that_cannot_be_had_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator import VenvError
    from orchestrator import venv as venv_module

    monkeypatch.setattr(venv_module, "_uv_binary", lambda: None)

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        return {}

    envelopes = [build_envelope("a", "x", task_id="t", worktree=False, venv=False)]
    with pytest.raises(VenvError):
        anyio.run(
            lambda: orchestrate_parallel(
                envelopes, agents={"a": agent}, state_dir=tmp_path / "s", venv_backend="uv"
            )
        )
    assert not (tmp_path / "s" / "runs").exists() or not any((tmp_path / "s" / "runs").iterdir())


def test_an_agents_max_concurrency_has_the_concurrency_bound(tmp_path: Path) -> None:
    data = {
        "agents": {"a": {"command": ["true"], "max_concurrency": 5000}},
        "tasks": [{"agent": "a", "task": "x"}],
    }
    with pytest.raises(PlanError, match=r"agents\.a\.max_concurrency: must be <= 1024, found 5000"):
        validate_plan_data(data)


def test_a_plans_pricing_estimates_what_an_agent_did_not_report(tmp_path: Path) -> None:
    """The estimate itself is tests/test_usage.py's; here, the plan's rates reach it."""

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        return {"usage": {"input_tokens": 2_000_000, "model": "m"}}

    p = Plan.model_validate(
        {
            "pricing": {"m": {"input": 3.0, "output": 15.0}},
            "budget": {"max_cost_usd": 6},
            "concurrency": 1,
            "defaults": {"worktree": False, "venv": False},
            "tasks": [{"id": f"t{i}", "agent": "a", "task": "x"} for i in range(3)],
        }
    )
    report = anyio.run(
        lambda: orchestrate_parallel(p, agents={"a": agent}, state_dir=tmp_path / "s")
    )
    first = report.results[0]
    assert first.usage is not None and first.usage.cost_usd == 6.0
    assert first.usage.cost_source == "estimated"
    # The estimate counts against the budget: 6.0 spent after the first task.
    assert [r.status for r in report.results] == ["succeeded", "skipped", "skipped"]
