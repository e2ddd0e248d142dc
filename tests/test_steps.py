"""Setup steps, checks and repair turns, end to end: a generated Python package with a real
pytest suite, agents that fix it, break it, or break it and then mend it when told why; real
git, real subprocesses, and reports that verify (and that fail to, once tampered with)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import ErrorInfo, Plan
from orchestrator import PlanError, orchestrate_parallel, verify_report
from orchestrator.plan import validate_plan_data
from orchestrator.prompts import Feedback, render_prompt
from orchestrator.steps import step_argv

from .conftest import MakeRepo, git, live_processes_with

PACKAGE = {
    "calc/__init__.py": "def add(a, b):\n    return a - b\n",
    "tests/test_calc.py": "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
}

#: An agent that changes ``add``: ``fix``, ``break``, or ``mend`` (break it on its first
#: turn, fix it when told which check failed). It writes the feedback it got as its output.
AGENT = """
import json, os, pathlib
envelope = json.load(open(os.environ["ORCHESTRATOR_ENVELOPE"]))
mode = envelope["inputs"]["mode"]
feedback = json.loads(os.environ.get("ORCHESTRATOR_FEEDBACK", "null"))
right = "def add(a, b):\\n    return a + b\\n"
wrong = "def add(a, b):\\n    return a * b\\n"
if mode == "marker":
    pathlib.Path(os.environ["MARKER"]).write_text("the agent ran")
elif mode == "fail-once" and os.environ["ORCHESTRATOR_ATTEMPT"] == "1":
    raise SystemExit(1)
else:
    fixed = mode == "fix" or (mode == "mend" and feedback and feedback["step"] == "tests")
    pathlib.Path("calc/__init__.py").write_text(right if fixed else wrong)
output = {"feedback": feedback, "attempt": os.environ["ORCHESTRATOR_ATTEMPT"]}
json.dump(output, open(os.environ["ORCHESTRATOR_OUTPUT"], "w"))
"""

PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]


def plan(tmp_path: Path, *tasks: dict[str, Any], **defaults: Any) -> Plan:
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    return Plan.model_validate(
        {
            "agents": {"coder": {"command": [sys.executable, str(agent)]}},
            "defaults": {
                "venv": False,
                "checks": [
                    {"name": "tests", "run": PYTEST, "timeout": 120},
                    {"name": "lint", "run": "exit 7", "required": False},
                ],
                **defaults,
            },
            "tasks": [{"agent": "coder", "task": "Make add add", **task} for task in tasks],
        }
    )


def run(repo: Path, p: Plan) -> Any:
    return anyio.run(lambda: orchestrate_parallel(p, repo=repo))


def verified(report: Any) -> Any:
    return anyio.run(verify_report, Path(report.run_dir) / "report.json")


def test_a_correct_change_passes_its_checks(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo(0, extra=PACKAGE)
    report = run(repo, plan(tmp_path, {"id": "good", "inputs": {"mode": "fix"}}))
    result = report.results[0]
    assert result.status == "succeeded", result.error
    assert [(c.name, c.phase, c.turn, c.passed, c.required) for c in result.checks] == [
        ("tests", "check", 1, True, True),
        ("lint", "check", 1, False, False),  # not required: the task succeeds anyway
    ]
    tests = result.checks[0]
    assert tests.exit_code == 0 and tests.command == PYTEST and tests.duration_s > 0
    log = Path(report.run_dir) / tests.stdout.path
    assert "1 passed" in log.read_text()
    assert result.checks[1].command == ["/bin/sh", "-c", "exit 7"]
    assert result.checks[1].exit_code == 7
    assert result.timings.checks_s is not None
    message = git(repo, "log", "-1", "--format=%B", result.provenance.result_commit)
    assert "Checks: tests passed, lint failed (not required)" in message
    assert verified(report).ok


def test_a_change_that_breaks_the_tests_fails_with_kind_check(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo(0, extra=PACKAGE)
    report = run(repo, plan(tmp_path, {"id": "bad", "inputs": {"mode": "break"}}))
    result = report.results[0]
    assert result.status == "failed"
    assert result.error.kind == "check"
    assert result.error.message.startswith("check step tests failed with exit code 1: ")
    assert "1 failed" in result.error.message  # the last lines of its output
    assert result.output is None
    # The commit is made either way: the branch shows what failed.
    commit = result.provenance.result_commit
    assert "a * b" in git(repo, "show", f"{commit}:calc/__init__.py")
    assert "Checks: tests failed, lint failed (not required)" in git(
        repo, "log", "-1", "--format=%B", commit
    )
    assert verified(report).ok


def test_a_repair_turn_is_told_why_and_mends_it(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo(0, extra=PACKAGE)
    report = run(
        repo, plan(tmp_path, {"id": "mend", "inputs": {"mode": "mend"}}, repair_attempts=2)
    )
    result = report.results[0]
    assert result.status == "succeeded", result.error
    assert result.attempts == 2
    assert [a.repair for a in result.attempt_log] == [None, True]
    assert [(c.name, c.turn, c.passed) for c in result.checks] == [
        ("tests", 1, False),
        ("lint", 1, False),
        ("tests", 2, True),
        ("lint", 2, False),
    ]
    told = result.output["feedback"]
    assert told["kind"] == "check" and told["step"] == "tests" and told["exit_code"] == 1
    assert told["attempt"] == 1
    assert "assert 6 == 5" in told["output_tail"]
    assert result.output["attempt"] == "2"
    # The repair turn kept the first turn's worktree: the fix is one commit on the base.
    assert "a + b" in git(repo, "show", f"{result.provenance.result_commit}:calc/__init__.py")
    assert verified(report).ok


def test_repair_turns_run_out(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo(0, extra=PACKAGE)
    report = run(repo, plan(tmp_path, {"inputs": {"mode": "break"}}, repair_attempts=2))
    result = report.results[0]
    assert result.status == "failed" and result.error.kind == "check"
    assert result.attempts == 3
    assert [a.repair for a in result.attempt_log] == [None, True, True]
    assert max(c.turn for c in result.checks) == 3


def test_a_failed_setup_step_fails_the_task_before_its_agent(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "ran.txt"
    monkeypatch.setenv("MARKER", str(marker))
    repo = make_repo(0, extra=PACKAGE)
    setup = [
        {"name": "ok", "run": "echo preparing"},
        {"name": "deps", "run": "echo cannot install >&2; exit 3"},
        {"name": "never", "run": "echo never"},
    ]
    report = run(repo, plan(tmp_path, {"inputs": {"mode": "marker"}, "setup": setup}))
    result = report.results[0]
    assert result.status == "failed"
    assert result.error == ErrorInfo(
        kind="setup", message="setup step deps failed with exit code 3: cannot install"
    )
    assert not marker.exists()  # the agent never ran
    assert [(c.name, c.phase, c.passed) for c in result.checks] == [
        ("ok", "setup", True),
        ("deps", "setup", False),
    ]
    assert result.attempt_log[0].stdout is None  # no agent, no agent logs
    assert verified(report).ok


def test_setup_runs_again_before_a_retry_from_a_clean_worktree(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo(0, extra=PACKAGE)
    setup = [{"name": "prepare", "run": "echo {task_id} > prepared.txt"}]
    report = run(
        repo,
        plan(tmp_path, {"id": "flaky", "inputs": {"mode": "fail-once"}, "setup": setup}, retries=1),
    )
    result = report.results[0]
    assert result.status == "failed"  # the second attempt wrote nothing: `add` still wrong
    assert [(c.phase, c.turn) for c in result.checks if c.phase == "setup"] == [
        ("setup", 1),
        ("setup", 2),
    ]
    assert git(repo, "show", f"{result.provenance.result_commit}:prepared.txt") == "flaky"


def test_a_check_that_runs_too_long_is_ended(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo(0, extra=PACKAGE)
    slow = {"name": "slow", "run": "echo start; sleep 600 # step-timeout-marker", "timeout": 1}
    p = plan(tmp_path, {"inputs": {"mode": "fix"}}, checks=[slow])
    result = run(repo, p).results[0]
    assert result.status == "failed"
    assert result.error.kind == "check"
    assert result.error.message.startswith("check step slow timed out: start")
    assert result.checks[0].timed_out and not result.checks[0].passed
    assert live_processes_with("step-timeout-marker") == []


def test_placeholders_are_filled_in_quoted_for_the_shell(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo(0, name="a repo with spaces", extra=PACKAGE)
    checks = [
        {"name": "shell", "run": "test -f {worktree}/calc/__init__.py && echo {task_id}"},
        {"name": "argv", "run": [sys.executable, "-c", "print('{repo_root}')"]},
    ]
    result = run(repo, plan(tmp_path, {"id": "ph", "inputs": {"mode": "fix"}}, checks=checks))
    assert result.results[0].status == "succeeded", result.results[0].error
    shell, argv = result.results[0].checks
    assert shell.passed
    assert "'" in shell.command[2]  # the worktree's path, quoted
    assert argv.command[2] == f"print('{repo}')"
    assert step_argv(
        Plan.model_validate(
            {
                "tasks": [
                    {"agent": "a", "task": "t", "checks": [{"name": "n", "run": "${HOME} {{x}}"}]}
                ]
            }
        )
        .tasks[0]
        .checks[0],  # type: ignore[index]
        {"worktree": "/w"},
    ) == ["/bin/sh", "-c", "${HOME} {x}"]  # {{x}} is the text {x}


def test_verify_catches_a_changed_check_and_a_deleted_check_log(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo(0, extra=PACKAGE)
    report = run(repo, plan(tmp_path, {"id": "bad", "inputs": {"mode": "break"}}))
    path = Path(report.run_dir) / "report.json"
    data = json.loads(path.read_text())
    data["results"][0]["checks"][0]["passed"] = True
    data["results"][0]["checks"][0]["exit_code"] = 0
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(data))
    outcome = anyio.run(verify_report, tampered)
    fields = {f.field for f in outcome.findings}
    assert "provenance.result_sha256" in fields  # the result's seal
    assert "error" in fields  # a check failure whose required checks all passed
    (Path(report.run_dir) / report.results[0].checks[0].stdout.path).unlink()
    outcome = anyio.run(verify_report, path)
    assert any(f.field == "checks[0].stdout" for f in outcome.findings)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"name": "t", "run": "pytest {wat}"}, "unknown placeholder {wat}"),
        ({"name": "t", "run": ["pytest", "{repo}"]}, "unknown placeholder {repo}"),
        ({"name": "t", "run": ""}, "must not be empty"),
        ({"name": "t", "run": []}, "must not be empty"),
        ({"name": "t", "run": 7}, "must be a string"),
        ({"name": "t", "run": ["a", 1]}, "must be a string"),
        ({"name": "bad name", "run": "x"}, "should match pattern"),
        ({"name": "t", "run": "x", "timeout": 0}, "must be > 0"),
    ],
)
def test_bad_steps_are_plan_errors_at_their_place(
    tmp_path: Path, step: dict[str, Any], message: str
) -> None:
    data = {
        "agents": {"a": {"command": ["x"]}},
        "tasks": [{"agent": "a", "task": "t", "checks": [step]}],
    }
    with pytest.raises(PlanError, match=message) as caught:
        validate_plan_data(data, plan_dir=tmp_path)
    assert str(caught.value.issues[0]).startswith("tasks[0].checks[0]")


def test_two_steps_of_one_name_are_a_plan_error(tmp_path: Path) -> None:
    steps = [{"name": "t", "run": "a"}, {"name": "t", "run": "b"}]
    data = {
        "agents": {"a": {"command": ["x"]}},
        "defaults": {"setup": steps},
        "tasks": [{"agent": "a", "task": "t"}],
    }
    with pytest.raises(PlanError, match="two steps are named 't'"):
        validate_plan_data(data, plan_dir=tmp_path)


def test_feedback_is_text_with_its_parts_for_a_template() -> None:
    error = ErrorInfo(kind="check", message="check step tests failed with exit code 1")
    feedback = Feedback.of_check(error, attempt=1, step="tests", exit_code=1, output_tail="E boom")
    assert feedback == "check: check step tests failed with exit code 1"
    assert feedback.parts()["output_tail"] == "E boom"
    from envelopes import build_envelope

    envelope = build_envelope("a", "do it", prompt="{{ feedback.step }}/{{ feedback.exit_code }}")
    assert render_prompt(envelope, attempt=2, feedback=feedback) == "tests/1"
    default = render_prompt(build_envelope("a", "do it"), attempt=2, feedback=feedback)
    assert "the\ncheck `tests` failed on them (exit code 1)" in default
    assert "E boom" in default


def test_each_phase_is_told_and_the_summary_counts_checks(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    from rich.console import Console

    from envelopes import TaskPhase
    from orchestrator.progress import summary_table

    repo = make_repo(0, extra=PACKAGE)
    phases: list[str] = []

    def seen(event: Any) -> None:
        if isinstance(event, TaskPhase):
            phases.append(f"{event.phase}:{event.attempt}:{event.repair}/{event.repairs}")

    setup = [{"name": "prepare", "run": "true"}]
    p = plan(
        tmp_path, {"id": "mend", "inputs": {"mode": "mend"}, "setup": setup}, repair_attempts=2
    )
    report = anyio.run(lambda: orchestrate_parallel(p, repo=repo, on_event=seen))
    assert phases == [
        "setup:1:None/2",
        "agent:1:None/2",
        "checks:1:None/2",
        "repair:2:1/2",
        "checks:2:None/2",
    ]
    console = Console(width=200, record=True)
    console.print(summary_table(report))
    text = console.export_text()
    assert "checks" in text.splitlines()[2] and "1/1" in text


@pytest.mark.parametrize(
    ("run", "filled"),
    [
        ("find . -name '*.py' -exec echo {} +", "find . -name '*.py' -exec echo {} +"),
        ("awk '{print $1}' {worktree}/x", "awk '{print $1}' '/w t'/x"),
        ("echo {{worktree}} ${HOME}", "echo {worktree} ${HOME}"),
        ("echo {worktree} {plan_dir}", "echo '/w t/{plan_dir}' /p"),  # one pass
    ],
)
def test_placeholders_leave_other_braces_alone(run: str, filled: str) -> None:
    step = (
        Plan.model_validate(
            {"tasks": [{"agent": "a", "task": "t", "checks": [{"name": "n", "run": run}]}]}
        )
        .tasks[0]
        .checks[0]
    )  # type: ignore[index]
    values = {"worktree": "/w t/{plan_dir}", "plan_dir": "/p"}
    if "{plan_dir}" not in run:
        values["worktree"] = "/w t"
    assert step_argv(step, values) == ["/bin/sh", "-c", filled]


def test_a_step_gets_no_output_path(make_repo: MakeRepo, tmp_path: Path) -> None:
    """A step's output is its logs: the agent's output file is not offered to it (a secret
    written there would stay in the run directory unmasked)."""
    repo = make_repo(0, extra=PACKAGE)
    checks = [{"name": "probe", "run": 'test -z "$ORCHESTRATOR_OUTPUT" && echo none'}]
    report = run(repo, plan(tmp_path, {"id": "p", "inputs": {"mode": "fix"}}, checks=checks))
    result = report.results[0]
    assert result.status == "succeeded", result.error
    logs = Path(report.run_dir) / "logs"
    assert not list(logs.glob("*.output"))


def test_verify_holds_a_succeeded_task_to_the_checks_its_envelope_names(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """A failed task made "succeeded" in a resealed report, its check records dropped, is
    caught: its envelope file (hashed) says which checks it had to pass."""
    from envelopes import Report, TaskResult, seal_report, seal_result
    from orchestrator.report import report_bytes

    repo = make_repo(0, extra=PACKAGE)
    report = run(repo, plan(tmp_path, {"id": "bad", "inputs": {"mode": "break"}}))
    raw = json.loads((Path(report.run_dir) / "report.json").read_text())
    result = raw["results"][0]
    result.update(status="succeeded", error=None, checks=[])
    forged = Report.model_validate(
        {**raw, "results": [seal_result(TaskResult.model_validate(result))]}
    )
    out = tmp_path / "forged.json"
    out.write_bytes(report_bytes(seal_report(forged)))
    outcome = anyio.run(lambda: verify_report(out, run_dir=report.run_dir))
    assert any(
        f.field == "checks" and "without passing its required tests" in f.message
        for f in outcome.findings
    ), outcome.findings


def test_verify_holds_check_records_to_the_commit_trailer(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """Check records rewritten to passing, in a resealed report, disagree with the result
    commit's Checks trailer, which is git's, not the report's."""
    from envelopes import Report, TaskResult, seal_report, seal_result
    from orchestrator.report import report_bytes

    repo = make_repo(0, extra=PACKAGE)
    report = run(repo, plan(tmp_path, {"id": "bad", "inputs": {"mode": "break"}}))
    raw = json.loads((Path(report.run_dir) / "report.json").read_text())
    result = raw["results"][0]
    for check in result["checks"]:
        check.update(exit_code=0, passed=True)
    result.update(status="succeeded", error=None)
    forged = Report.model_validate(
        {**raw, "results": [seal_result(TaskResult.model_validate(result))]}
    )
    out = tmp_path / "forged.json"
    out.write_bytes(report_bytes(seal_report(forged)))
    outcome = anyio.run(lambda: verify_report(out, run_dir=report.run_dir, repo=repo))
    assert any(
        f.field == "checks"
        and "Checks trailer says 'tests failed, lint failed (not required)'" in f.message
        for f in outcome.findings
    ), outcome.findings
