"""Checked merges (orchestrator/mergecheck.py, and merge_results with ``check``): ``--check``
moves the target only when the combined tree passes the tasks' checks, ``--train`` keeps each
result only if the tree still passes, a crash mid-train leaves the target where it was, and
``verify`` holds the records and logs of the checks.

Every test runs real tasks (a callable agent writing files, each task's checks run on its own
result) in a real repository, then merges their report with real checks in real scratch
worktrees.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import (
    MergeRecord,
    Plan,
    Report,
    Step,
    audit_report,
    digest_without,
    load_report_json,
    report_digest,
    report_layout,
    seal_report,
)
from orchestrator import build_envelope, orchestrate_parallel, verify_report
from orchestrator.errors import MergeError
from orchestrator.mergeback import merge_results
from orchestrator.mergecheck import MergeCheckSettings, failed_steps
from orchestrator.report import report_bytes
from orchestrator.sandbox import SandboxLayout, bwrap_argv, find_bwrap

from .conftest import MakeRepo, cli, git, live_processes_with
from .test_merge import write_files

ROOT = Path(__file__).resolve().parent.parent

#: Fails when the tree holds more than one file under ``conflict/``: each task that writes one
#: passes alone, two of them together do not.
AT_MOST_ONE = Step(name="at-most-one", run='test "$(ls conflict 2>/dev/null | wc -l)" -le 1')


def run_tasks(
    repo: Path,
    tasks: dict[str, dict[str, str] | None],
    *,
    checks: list[Step] | None = None,
    env: dict[str, str] | None = None,
    **fields: Any,
) -> Report:
    """One run with a task per entry (writing those files, or failing: None), each with
    *checks* (default: AT_MOST_ONE)."""
    envelopes = [
        build_envelope(
            "w",
            f"write {task_id}",
            task_id=task_id,
            inputs={"files": files or {}, "fail": files is None},
            venv=False,
            checks=[AT_MOST_ONE] if checks is None else checks,
            env=env,
            **fields,
        )
        for task_id, files in tasks.items()
    ]
    report: Report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": write_files})
    )
    return report


def report_file(report: Report) -> Path:
    return Path(report.run_dir) / "report.json"


def checked(report: Report, *, train: bool = False, **options: Any) -> MergeRecord:
    """merge_results with checks, run from inside the report's repository."""
    settings = MergeCheckSettings(run_dir=Path(report.run_dir), train=train)
    with contextlib.chdir(report.repo or "."):
        record: MergeRecord = anyio.run(
            lambda: merge_results(report, into="main", check=settings, **options)
        )
    return record


def merge_cli(capsys: pytest.CaptureFixture[str], report: Report, *argv: str) -> Any:
    with contextlib.chdir(report.repo or "."):
        return cli(capsys, "merge", str(report_file(report)), "--into", "main", *argv)


def good(name: str) -> dict[str, str]:
    return {f"out/{name}.txt": f"from {name}\n"}


def bad(name: str) -> dict[str, str]:
    return {f"conflict/{name}.txt": f"from {name}\n"}


def leftovers(repo: Path) -> list[str]:
    """Scratch branches and worktrees of checked merges still in *repo*."""
    branches = git(repo, "for-each-ref", "--format=%(refname)", "refs/heads/").split()
    worktrees = git(repo, "worktree", "list", "--porcelain").split("\n")
    return [b for b in branches if "/_merge-" in b] + [w for w in worktrees if "_merge-" in w]


def test_check_refuses_to_move_a_target_whose_combined_tree_fails(
    make_repo: MakeRepo, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo()
    report = run_tasks(repo, {"a": bad("a"), "b": bad("b")})
    assert report.summary.successful == 2  # each passes its checks alone
    before = git(repo, "rev-parse", "main")
    outcome = merge_cli(capsys, report, "--check")
    assert outcome.code == 1
    assert git(repo, "rev-parse", "main") == before
    assert "required check at-most-one (exit code 1) failed on the combined tree" in outcome.err
    assert "checked the combined tree" in outcome.out and "recorded in" in outcome.out
    (record,) = load_report_json(report_file(report))[1].merge
    assert record.status == "check_failed" and record.mode == "check"
    assert record.new_commit is None and all(t.merge_commit is None for t in record.tasks)
    (check,) = record.checks
    assert not check.passed and check.task_id is None
    assert [(c.name, c.exit_code, c.turn) for c in check.checks] == [("at-most-one", 1, 1)]
    assert check.checks[0].stdout is not None
    assert check.checks[0].stdout.path == "logs/merge-1/a.check-at-most-one.1.stdout"
    assert anyio.run(verify_report, report_file(report)).ok
    assert leftovers(repo) == []


def test_check_moves_a_target_whose_combined_tree_passes(
    make_repo: MakeRepo, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo()
    report = run_tasks(repo, {"a": good("a"), "b": bad("b")})
    before = git(repo, "rev-parse", "main")
    outcome = merge_cli(capsys, report, "--check")
    assert outcome.code == 0, outcome.err
    after = git(repo, "rev-parse", "main")
    assert after != before and "its checks passed" in outcome.out
    (record,) = load_report_json(report_file(report))[1].merge
    assert record.status == "merged" and record.mode == "check"
    assert [c.commit for c in record.checks] == [after] and record.checks[0].passed
    assert anyio.run(verify_report, report_file(report)).ok
    assert leftovers(repo) == []


def test_a_dry_run_checks_and_moves_nothing(make_repo: MakeRepo) -> None:
    repo = make_repo()
    report = run_tasks(repo, {"a": bad("a"), "b": bad("b")})
    before = git(repo, "rev-parse", "main")
    record = checked(report, dry_run=True)
    assert record.status == "check_failed" and record.message.startswith("dry run: ")
    passing = run_tasks(repo, {"c": good("c")})
    record = checked(passing, dry_run=True)
    assert record.status == "skipped" and record.checks[0].passed
    assert git(repo, "rev-parse", "main") == before


def test_train_merges_three_of_five_and_names_the_two_that_break_the_tree(
    make_repo: MakeRepo, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo()
    tasks = {"t0": bad("t0"), "t1": bad("t1"), "t2": good("t2"), "t3": bad("t3")}
    report = run_tasks(repo, {**tasks, "t4": good("t4")})
    assert report.summary.successful == 5
    before = git(repo, "rev-parse", "main")
    outcome = merge_cli(capsys, report, "--train")
    assert outcome.code == 0, outcome.err
    left = [line for line in outcome.out.splitlines() if line.startswith("left out")]
    assert [line.split(":")[0] for line in left] == ["left out t1", "left out t3"]
    assert "required check at-most-one (exit code 1) failed on main + t0 + t1" in left[0]
    (record,) = load_report_json(report_file(report))[1].merge
    assert record.status == "merged" and record.mode == "train"
    assert [t.task_id for t in record.tasks] == ["t0", "t2", "t4"]
    assert [e.task_id for e in record.left_out] == ["t1", "t3"]
    assert [(c.task_id, c.passed) for c in record.checks] == [
        ("t0", True),
        ("t1", False),
        ("t2", True),
        ("t3", False),
        ("t4", True),
    ]
    after = git(repo, "rev-parse", "main")
    assert record.new_commit == after and record.old_commit == before
    assert git(repo, "ls-tree", "-r", "--name-only", "main", "conflict", "out").split() == [
        "conflict/t0.txt",
        "out/t2.txt",
        "out/t4.txt",
    ]
    # One move, at the end.
    assert git(repo, "rev-list", "--count", "--first-parent", f"{before}..main") == "3"
    assert len(git(repo, "reflog", "show", "--format=%H", "refs/heads/main").split()) == 2
    assert anyio.run(verify_report, report_file(report)).ok
    assert leftovers(repo) == []


def test_a_train_leaves_out_a_failed_task_and_what_contains_a_result_left_out(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo()
    first = run_tasks(repo, {"a": bad("a"), "b": bad("b"), "broken": None})
    assert [r.status for r in first.results] == ["succeeded", "succeeded", "failed"]
    record = checked(first, train=True)
    assert record.status == "merged"
    reasons = {e.task_id: e.reason for e in record.left_out}
    assert reasons["broken"] == "it did not succeed (status failed)"
    assert "failed on main + a + b" in reasons["b"]
    assert "broken" not in {t.task_id for t in record.tasks}


def test_a_dependent_of_a_result_left_out_is_left_out_unchecked(make_repo: MakeRepo) -> None:
    repo = make_repo()
    envelopes = [
        build_envelope("w", "a", task_id="a", inputs={"files": bad("a")}, venv=False),
        build_envelope("w", "b", task_id="b", inputs={"files": bad("b")}, venv=False),
        build_envelope(
            "w", "c", task_id="c", inputs={"files": good("c")}, venv=False, depends_on=["b"]
        ),
    ]
    envelopes = [e.model_copy(update={"checks": [AT_MOST_ONE]}) for e in envelopes]
    report: Report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": write_files})
    )
    record = checked(report, train=True)
    assert [e.task_id for e in record.left_out] == ["b", "c"]
    assert record.left_out[1].reason == "it contains the result of b, which was left out"
    assert [c.task_id for c in record.checks] == ["a", "b"]


def test_a_train_where_nothing_can_be_kept_moves_nothing(
    make_repo: MakeRepo, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo()
    report = run_tasks(repo, {"a": bad("a"), "b": bad("b")})
    # main gains a file of its own under conflict/: neither result passes on it any more.
    (repo / "conflict").mkdir()
    (repo / "conflict" / "main.txt").write_text("main\n")
    git(repo, "add", "conflict")
    git(repo, "commit", "--quiet", "-m", "main's own")
    git(repo, "checkout", "--quiet", "--detach")
    before = git(repo, "rev-parse", "main")
    outcome = merge_cli(capsys, report, "--train")
    assert outcome.code == 1
    assert "nothing merged; left out 2: a, b; main not changed" in outcome.err
    assert git(repo, "rev-parse", "main") == before
    (record,) = load_report_json(report_file(report))[1].merge
    assert record.status == "check_failed" and record.new_commit is None
    assert anyio.run(verify_report, report_file(report)).ok


def test_a_report_whose_tasks_have_no_checks_is_bad_input(
    make_repo: MakeRepo, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo()
    report = run_tasks(repo, {"a": good("a")}, checks=[])
    for flag in ("--check", "--train"):
        outcome = merge_cli(capsys, report, flag)
        assert outcome.code == 2
        assert "none of the tasks to merge (a) has a required check" in outcome.err
    optional = run_tasks(
        repo, {"b": good("b")}, checks=[Step(name="lint", run="true", required=False)]
    )
    with pytest.raises(MergeError, match="has a required check"):
        checked(optional)


def test_an_envelope_that_does_not_match_the_report_is_not_run(make_repo: MakeRepo) -> None:
    repo = make_repo()
    report = run_tasks(repo, {"a": good("a")})
    path = Path(report.run_dir) / "envelopes" / "a.json"
    data = json.loads(path.read_text())
    data["checks"][0]["run"] = "touch /tmp/pwned-by-a-report"
    path.write_text(json.dumps(data))
    with pytest.raises(MergeError, match="does not match the report's envelope_sha256"):
        checked(report)
    path.unlink()
    with pytest.raises(MergeError, match="cannot read its envelope"):
        checked(report)


def test_a_check_named_alike_runs_once_and_the_same_command_named_otherwise_twice(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo()
    same = run_tasks(repo, {"a": good("a"), "b": good("b")})
    record = checked(same)
    assert [(c.name, c.stdout.path if c.stdout else None) for c in record.checks[0].checks] == [
        ("at-most-one", "logs/merge-1/a.check-at-most-one.1.stdout")
    ]
    envelopes = [
        build_envelope("w", "c", task_id="c", inputs={"files": good("c")}, venv=False),
        build_envelope("w", "d", task_id="d", inputs={"files": good("d")}, venv=False),
    ]
    renamed = AT_MOST_ONE.model_copy(update={"name": "one-at-most"})
    envelopes = [
        envelopes[0].model_copy(update={"checks": [AT_MOST_ONE]}),
        envelopes[1].model_copy(update={"checks": [renamed]}),
    ]
    report: Report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": write_files})
    )
    record = checked(report)
    assert [c.name for c in record.checks[0].checks] == ["at-most-one", "one-at-most"]


def test_steps_run_with_their_tasks_environment_and_placeholders(make_repo: MakeRepo) -> None:
    repo = make_repo()
    probe = Step(
        name="probe",
        run='test "$WHO" = "{task_id}" && test "$PWD" = {worktree} && test -n "$ORCHESTRATOR_ENVELOPE"',
    )
    setup = Step(name="prepare", run="touch prepared")
    needs_setup = Step(name="prepared", run="test -e prepared")
    report = run_tasks(
        repo, {"a": good("a")}, checks=[probe, needs_setup], env={"WHO": "a"}, setup=[setup]
    )
    assert report.summary.successful == 1, report.results[0].error
    record = checked(report)
    assert record.status == "merged", record.message
    assert [(c.phase, c.name) for c in record.checks[0].checks] == [
        ("setup", "prepare"),
        ("check", "probe"),
        ("check", "prepared"),
    ]


def test_a_checked_venv_is_made_as_the_tasks_asked(make_repo: MakeRepo) -> None:
    repo = make_repo()
    in_venv = Step(name="in-venv", run='test -x "$VIRTUAL_ENV/bin/python"')
    envelope = build_envelope("w", "a", task_id="a", inputs={"files": good("a")}, checks=[in_venv])
    report: Report = anyio.run(
        lambda: orchestrate_parallel([envelope], repo=repo, agents={"w": write_files})
    )
    assert report.summary.successful == 1, report.results[0].error
    record = checked(report)
    assert record.status == "merged" and record.checks[0].passed
    assert not list((repo / ".git" / "orchestrator" / "venvs").glob("*/_merge-*"))


def test_verify_catches_a_changed_check_record_and_a_deleted_log(
    make_repo: MakeRepo, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo()
    report = run_tasks(repo, {"a": bad("a"), "b": bad("b"), "c": good("c")})
    assert merge_cli(capsys, report, "--train").code == 0
    path = report_file(report)
    raw, _ = load_report_json(path)
    assert audit_report(raw, run_dir=path.parent) == []

    def resealed(change: Any) -> list[str]:
        copy = json.loads(json.dumps(raw))
        change(copy["merge"][0])
        copy["report_sha256"] = report_digest(copy)
        return [str(f) for f in audit_report(copy, run_dir=path.parent)]

    def passed(merge: dict[str, Any]) -> None:
        merge["checks"][1]["checks"][0]["passed"] = True
        merge["checks"][1]["passed"] = True

    assert any("checks[1].checks[0].passed" in f for f in resealed(passed))

    def exit_zero(merge: dict[str, Any]) -> None:
        merge["checks"][1]["checks"][0].update(exit_code=0, passed=True)
        merge["checks"][1]["passed"] = True

    assert any("its check passed, but it is left out" in f for f in resealed(exit_zero))

    def smuggled(merge: dict[str, Any]) -> None:
        merge["checks"][0]["passed"] = False
        merge["checks"][0]["checks"][0].update(exit_code=1, passed=False)

    assert any("no passing check of that tree" in f for f in resealed(smuggled))

    def unchecked(merge: dict[str, Any]) -> None:
        del merge["mode"]

    assert any("no check mode" in f for f in resealed(unchecked))
    log = Path(raw["merge"][0]["checks"][0]["checks"][0]["stdout"]["path"])
    (path.parent / log).unlink()
    findings = [str(f) for f in anyio.run(verify_report, path).findings]
    assert any("merge[0].checks[0].checks[0].stdout" in f for f in findings), findings


def test_an_old_merge_record_reads_and_hashes_as_it_did(make_repo: MakeRepo) -> None:
    repo = make_repo()
    report = run_tasks(repo, {"a": good("a")}, checks=[])
    with contextlib.chdir(repo):
        record = anyio.run(lambda: merge_results(report, into="main"))
    data = record.model_dump(mode="json")
    assert not {"mode", "checks", "left_out"} & set(data)
    assert MergeRecord.model_validate(data) == record


def hanging_report(repo: Path, tmp_path: Path) -> tuple[Report, Path, Path]:
    """Four passing results whose check, once *trigger* exists, touches *marker* and sleeps
    on every tree holding t2's result (never in the tasks' own runs: no trigger then)."""
    trigger, marker = tmp_path / "trigger", tmp_path / "marker"
    hang = Step(
        name="hang",
        run='if [ -e "$TRIGGER" ] && [ -e out/t2.txt ]; then touch "$MARKER"; sleep 60; fi',
    )
    tasks = {f"t{i}": good(f"t{i}") for i in range(4)}
    env = {"TRIGGER": str(trigger), "MARKER": str(marker)}
    report = run_tasks(repo, tasks, checks=[AT_MOST_ONE, hang], env=env)
    assert report.summary.successful == 4
    trigger.touch()
    return report, trigger, marker


def no_process_left(marker: Path) -> bool:
    deadline = time.monotonic() + 15
    while live_processes_with(str(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return live_processes_with(str(marker)) == []


def test_a_cancelled_check_removes_its_scratch_worktree(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    report, _, marker = hanging_report(repo, tmp_path)
    before = git(repo, "rev-parse", "main")
    settings = MergeCheckSettings(run_dir=Path(report.run_dir), train=True)

    async def main() -> None:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:

                async def cancel_once_hanging() -> None:
                    while not marker.exists():  # noqa: ASYNC110 (the check is another process)
                        await anyio.sleep(0.02)
                    tg.cancel_scope.cancel()

                tg.start_soon(cancel_once_hanging)
                await merge_results(report, into="main", repo=repo, check=settings)

    anyio.run(main)
    assert git(repo, "rev-parse", "main") == before
    assert leftovers(repo) == []
    assert not list((repo / ".git" / "orchestrator" / "worktrees").glob("*/_merge-*"))
    assert no_process_left(marker)


def test_a_crash_mid_train_leaves_the_target_untouched(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    report, trigger, marker = hanging_report(repo, tmp_path)
    before = git(repo, "rev-parse", "main")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "orchestrator", "merge", str(report_file(report))]
    proc = subprocess.Popen(
        [*command, "--into", "main", "--train"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the train never reached t2"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert git(repo, "rev-parse", "main") == before
    assert load_report_json(report_file(report))[1].merge == []
    assert no_process_left(marker)  # the lifeline ends the check the orchestrator left
    trigger.unlink()
    record = checked(report, train=True)
    assert record.status == "merged" and git(repo, "rev-parse", "main") == record.new_commit


def writer_plan(
    tmp_path: Path, tasks: dict[str, dict[str, str]], *, defaults: dict[str, Any], **plan: Any
) -> Plan:
    """A plan of command agents writing ``inputs.files``, no venvs, AT_MOST_ONE checked."""
    agent = tmp_path / "agent.py"
    agent.write_text(
        "import json, os, pathlib\n"
        "e = json.load(open(os.environ['ORCHESTRATOR_ENVELOPE']))\n"
        "for rel, text in e['inputs']['files'].items():\n"
        "    p = pathlib.Path(rel); p.parent.mkdir(parents=True, exist_ok=True); p.write_text(text)\n"
        "json.dump({}, open(os.environ['ORCHESTRATOR_OUTPUT'], 'w'))\n"
    )
    return Plan.model_validate(
        {
            "agents": {"w": {"command": [sys.executable, str(agent)]}},
            "defaults": {"venv": False, "checks": [AT_MOST_ONE.model_dump()], **defaults},
            "tasks": [
                {"id": name, "agent": "w", "task": name, "inputs": {"files": files}}
                for name, files in tasks.items()
            ],
            **plan,
        }
    )


def test_the_plans_merge_checks_and_trains_at_the_end_of_a_run(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    tasks = {"a": bad("a"), "b": bad("b"), "c": good("c")}
    merge = {"into": "main", "check": True, "train": True}
    plan = writer_plan(tmp_path, tasks, defaults={}, merge=merge)
    report: Report = anyio.run(lambda: orchestrate_parallel(plan, repo=repo))
    (record,) = report.merge
    assert record.status == "merged" and record.mode == "train"
    assert [e.task_id for e in record.left_out] == ["b"]
    assert git(repo, "rev-parse", "main") == record.new_commit
    assert anyio.run(verify_report, report_file(report)).ok


def _bwrap_works() -> bool:
    bwrap = find_bwrap()
    if bwrap is None:
        return False
    probe = bwrap_argv(SandboxLayout(cwd=Path("/")), ["true"], bwrap=bwrap)
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif(not _bwrap_works(), reason="bwrap is missing or cannot run here")
def test_a_sandboxed_tasks_checks_run_in_its_sandbox(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    outside = tmp_path / "outside"
    outside.mkdir()
    # In the sandbox the repository's own checkout is hidden and the scratch worktree writable.
    probe = f"touch made && ! test -e {{repo_root}}/src/file0000.txt && ! touch {outside}/x"
    plan = writer_plan(
        tmp_path,
        {"a": good("a")},
        defaults={"sandbox": "bwrap", "checks": [{"name": "sandboxed", "run": probe}]},
    )
    report: Report = anyio.run(lambda: orchestrate_parallel(plan, repo=repo))
    assert report.summary.successful == 1, report.results[0].error
    record = checked(report)
    assert record.status == "merged", record.message
    assert not (outside / "x").exists()


def test_failed_steps_says_which_and_how() -> None:
    from envelopes import CheckResult, MergeCheck

    def step(name: str, **fields: Any) -> CheckResult:
        values = {"phase": "check", "turn": 1, "command": ["x"], "passed": False}
        values |= {"required": True, "duration_s": 0.0, "exit_code": 1} | fields
        return CheckResult(name=name, **values)

    check = MergeCheck(
        commit="a" * 40,
        passed=False,
        checks=[
            step("tests"),
            step("slow", exit_code=None, timed_out=True),
            step("venv", phase="setup", exit_code=None),
            step("lint", required=False),
            step("ok", exit_code=0, passed=True),
        ],
    )
    assert failed_steps(check) == (
        "required check tests (exit code 1), check slow (timed out), "
        "setup step venv (could not start)"
    )


def test_the_seal_covers_the_checks(make_repo: MakeRepo) -> None:
    repo = make_repo()
    report = run_tasks(repo, {"a": good("a")})
    record = checked(report)
    sealed = seal_report(report.model_copy(update={"merge": [record]}))
    raw = json.loads(report_layout(sealed.to_json_dict()))
    raw["merge"][0]["checks"][0]["checks"][0]["duration_s"] = 99.0
    findings = [str(f) for f in audit_report(raw)]
    assert any(f.startswith("report_sha256") for f in findings)


def test_a_report_from_elsewhere_is_never_checked(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check runs what the envelopes name: a report and envelopes sent from elsewhere (here:
    the run's directory moved out of the repository, as a stranger's files would be) run
    nothing, whatever their digests say."""
    repo = make_repo()
    report = run_tasks(repo, {"a": good("a")})
    sent = tmp_path / "sent"
    shutil.move(report.run_dir, sent)
    before = git(repo, "rev-parse", "main")
    with contextlib.chdir(repo):
        outcome = cli(capsys, "merge", str(sent / "report.json"), "--into", "main", "--check")
    assert outcome.code == 2
    assert "checks only a run made in this repository" in outcome.err
    assert git(repo, "rev-parse", "main") == before
    assert not (sent / "logs" / "merge-1").exists()


def test_a_copy_of_the_report_with_its_results_pointed_elsewhere_is_not_checked(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run id and the envelopes' digests are public (branch names, commit trailers): a
    report naming this run, but results it did not make, runs none of the run's checks."""
    repo = make_repo()
    report = run_tasks(repo, {"a": good("a")})
    raw = json.loads(report_file(report).read_text())
    other = git(repo, "commit-tree", "-p", "main", "-m", "not the agent's", "main^{tree}")
    result = raw["results"][0]
    result["provenance"]["result_commit"] = other
    result["provenance"]["result_tree"] = git(repo, "rev-parse", "main^{tree}")
    result["branch"] = None
    result["provenance"]["result_sha256"] = digest_without(result, "provenance", "result_sha256")
    forged = seal_report(Report.model_validate(raw))
    sent = tmp_path / "report.json"
    sent.write_bytes(report_bytes(forged))
    with contextlib.chdir(repo):
        outcome = cli(capsys, "merge", str(sent), "--into", "main", "--check", "--dry-run")
    assert outcome.code == 2
    assert "is not the one" in outcome.err


def test_a_combined_tree_is_checked_under_the_strictest_isolation_of_its_tasks() -> None:
    """The tree holds every task's code: a sandboxed task's check must not run unsandboxed
    because another task, unsandboxed, names the same check."""
    from envelopes import Limits
    from orchestrator.mergecheck import strictest

    trusted = build_envelope("w", "t", network=True, limits=Limits(memory_mb=900, cpu_s=60))
    boxed = build_envelope("w", "u", sandbox="bwrap", limits=Limits(memory_mb=500))
    strict = strictest([trusted, boxed])
    assert strict["sandbox"] == "bwrap"
    assert strict["network"] is False
    assert strict["limits"] == Limits(memory_mb=500, cpu_s=60)
    assert strict["inherit_env"] is False
    assert strictest([trusted])["sandbox"] == "none"
