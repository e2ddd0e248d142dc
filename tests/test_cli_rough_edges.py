"""The rough edges a new user hit (issue 11), each as it was reported, each failing before.

Markup in agent text, matrix ids swallowed by rich, a `first_success` group that could never
exit 0, `runs` leaving out skipped tasks, `validate` counting unexpanded tasks and not warning
of a missing agent program, a finished run's lock file, no warning for a dirty checkout,
repeated `--tasks` flags, a dry run saying it recorded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import MakeRepo, cli, git

FAIL_WITH_MARKUP = (
    "import sys\nprint('error in [/tmp/build] and [bold]x[/]', file=sys.stderr)\nsys.exit(1)\n"
)


def plan_file(tmp_path: Path, agents: dict[str, str], tasks: list[dict[str, Any]]) -> Path:
    specs = {}
    for name, source in agents.items():
        script = tmp_path / f"{name}.py"
        script.write_text(source)
        specs[name] = {"command": [sys.executable, str(script)]}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"agents": specs, "defaults": {"venv": False}, "tasks": tasks}))
    return path


@pytest.fixture
def repo(make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = make_repo()
    monkeypatch.chdir(path)
    return path


def test_agent_text_with_brackets_is_shown_as_text(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Edges 1 and 2: a traceback (MarkupError) and `doc-signer[editor]` shown as `doc-signer`."""
    plan = plan_file(
        tmp_path,
        {"editor": FAIL_WITH_MARKUP, "ok": "pass\n"},
        [
            {"id": "doc-signer", "agent": "ok", "task": "t", "matrix": {"agent": ["editor", "ok"]}},
        ],
    )
    outcome = cli(capsys, "run", str(plan))
    assert outcome.code == 1
    assert "Traceback" not in outcome.out + outcome.err
    assert "doc-signer[editor]" in outcome.out and "doc-signer[ok]" in outcome.out
    assert "[/tmp/build]" in outcome.out and "[bold]x[/]" in outcome.out
    # Where to look, for the failed task: its kept worktree and its stderr log.
    assert "worktree: " in outcome.out and "stderr: " in outcome.out


def test_a_first_success_group_whose_winner_succeeded_exits_0(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Edge 3: the losing member was `cancelled` (not_needed) and made the run exit 1."""
    slow = "import time\ntime.sleep(5)\n"
    plan = plan_file(
        tmp_path,
        {"fast": "pass\n", "slow": slow},
        [
            {
                "id": "impl",
                "agent": "fast",
                "task": "t",
                "matrix": {"agent": ["fast", "slow"]},
                "select": "first_success",
            },
            {"id": "other", "agent": "fast", "task": "t"},
        ],
    )
    outcome = cli(capsys, "run", str(plan))
    assert outcome.code == 0, outcome
    assert "3 tasks: 2 succeeded, 1 not needed" in outcome.out


def test_runs_counts_every_status_and_validate_counts_expanded_tasks(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Edges 4 and 5: `runs` left out the skipped task; `validate` said 3 tasks for 4."""
    plan = plan_file(
        tmp_path,
        {"ok": "pass\n", "bad": "import sys\nsys.exit(1)\n"},
        [
            {"id": "a", "agent": "bad", "task": "t"},
            {"id": "b", "agent": "ok", "task": "t", "depends_on": ["a"]},
            {"id": "m", "agent": "ok", "task": "t", "matrix": {"inputs.n": [1, 2]}},
        ],
    )
    validated = cli(capsys, "validate", str(plan))
    assert validated.code == 0
    assert "OK, 4 tasks (2 matrix members: m[1], m[2]), 2 agents" in validated.out
    cli(capsys, "run", str(plan))
    listed = cli(capsys, "runs", "--json")
    [info] = [json.loads(line) for line in listed.out.splitlines()]
    assert info["counts"] == {"failed": 1, "skipped": 1, "succeeded": 2}


def test_validate_warns_of_an_agent_program_found_nowhere(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Edge 7: every task failed at run time instead."""
    path = tmp_path / "plan.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "agents": {
                    "gone": {"command": ["no-such-agent-program", "-p"]},
                    "pkg": {"command": ["pytest", "-q"]},
                    "file": {"command": ["./missing.py"]},
                },
                "tasks": [
                    {"id": "a", "agent": "gone", "task": "t"},
                    {"id": "b", "agent": "pkg", "task": "t", "requirements": ["pytest>=8"]},
                    {"id": "c", "agent": "file", "task": "t"},
                ],
            }
        )
    )
    outcome = cli(capsys, "validate", str(path))
    assert outcome.code == 0
    assert outcome.err.splitlines() == [
        f"{path}: warning: agent file: program ./missing.py does not exist",
        f"{path}: warning: agent gone: program 'no-such-agent-program' is not on PATH, "
        "nor among its tasks' requirements",
    ]


def test_a_finished_run_leaves_no_lock_and_a_dirty_checkout_is_warned_of(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Edges 6 and 8."""
    plan = plan_file(tmp_path, {"ok": "pass\n"}, [{"id": "a", "agent": "ok", "task": "t"}])
    (repo / "src" / "file0000.txt").write_text("work in progress\n")
    outcome = cli(capsys, "run", str(plan))
    assert outcome.code == 0
    base = git(repo, "rev-parse", "HEAD")
    [warning] = [line for line in outcome.err.splitlines() if line.startswith("warning:")]
    assert warning == (
        f"warning: {repo} has 1 uncommitted or untracked change(s); the tasks start from "
        f"commit {base[:12]} and do not see them"
    )
    [run_dir] = (repo / ".git" / "orchestrator" / "runs").iterdir()
    assert not (run_dir / "lock").exists()
    collected = cli(capsys, "gc")
    assert "stale lock" not in collected.out


def test_repeated_tasks_flags_add_up_and_a_dry_run_records_nothing(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Edge 9: `--tasks b --tasks c` merged only c; a dry run said it recorded."""
    writes = (
        "import os, pathlib\npathlib.Path(os.environ['ORCHESTRATOR_TASK_ID']).write_text('x')\n"
    )
    plan = plan_file(
        tmp_path, {"w": writes}, [{"id": t, "agent": "w", "task": "t"} for t in ("a", "b", "c")]
    )
    cli(capsys, "run", str(plan))
    [run_dir] = (repo / ".git" / "orchestrator" / "runs").iterdir()
    report = str(run_dir / "report.json")
    dry = cli(
        capsys, "merge", report, "--into", "main", "--tasks", "b", "--tasks", "c", "--dry-run"
    )
    assert dry.code == 0
    assert "dry run: nothing recorded" in dry.out and "recorded in" not in dry.out.replace(
        "nothing recorded in", ""
    )
    done = cli(capsys, "merge", report, "--into", "main", "--tasks", "b", "--tasks", "c")
    assert done.code == 0
    merged = json.loads(Path(report).read_text())["merge"][-1]
    assert [t["task_id"] for t in merged["tasks"]] == ["b", "c"]
    # Nothing left to merge: a dry run says so, and still records nothing.
    again = cli(capsys, "merge", report, "--into", "main", "--tasks", "b", "--dry-run")
    assert again.code == 0 and "nothing recorded" in again.out
    assert len(json.loads(Path(report).read_text())["merge"]) == 1


def test_a_resume_says_what_it_kept_killed_and_ran_again_and_its_own_time(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """Edge 5: a resumed run's summary gave the time since the first start and nothing else."""
    from .test_resume import crash_at, orchestrator, write_plan

    repo = make_repo()
    plan, _ = write_plan(tmp_path, repo, seconds=0.2)
    crash_at(plan, "commit:6", cwd=tmp_path)
    time.sleep(1.1)  # downtime: the summary tells it from this run's own time
    resumed = orchestrator("run", str(plan), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    [started] = [line for line in resumed.stderr.splitlines() if line.startswith("run ")]
    assert "; resumed: " in started and " kept, " in started and " to run again, " in started
    assert "orphaned agent process(es) killed" in started
    title = " ".join(resumed.stdout.split("┏")[0].split())  # the table's title, unwrapped
    assert "12 tasks: 12 succeeded in " in title
    assert "(resumed; " in title and " since it first started)" in title


def test_a_run_asks_git_about_its_repository_once(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small run's start is mostly fixed costs: the dirty-checkout warning and the run's own
    check of the repository each opened it and resolved its base (ten git processes before
    the first task's own). Counted with a `git` on PATH that writes down its arguments."""
    import shutil

    real = shutil.which("git")
    log = tmp_path / "git.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "git"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    plan = plan_file(tmp_path, {"ok": "pass\n"}, [{"id": "a", "agent": "ok", "task": "t"}])
    (repo / "src" / "file0000.txt").write_text("work in progress\n")
    outcome = cli(capsys, "run", str(plan))
    assert outcome.code == 0
    assert any(line.startswith("warning:") for line in outcome.err.splitlines())
    commands = [_subcommand(line.split()) for line in log.read_text().splitlines()]
    # Before the task's own (its worktree): for the warning, the top directory and the base
    # (one rev-parse) and the status; for the run, the repository (one rev-parse), its base
    # and tree (one cat-file), and every ref at the start (the guard's record).
    assert commands[:6] == [
        "rev-parse",
        "status",
        "rev-parse",
        "cat-file",
        "for-each-ref",
        "update-ref",
    ], commands


@pytest.mark.parametrize("base", ["HEAD~1..HEAD", "^HEAD", "HEAD^@"])
def test_a_base_that_is_not_one_commit_gets_no_dirty_warning_and_a_one_line_refusal(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], base: str
) -> None:
    """The warning asks git about the base without --verify: a range or an exclusion gives
    it more than a commit to say, and no warning is made of it; the run refuses the base."""
    git(repo, "commit", "-q", "--allow-empty", "-m", "second")
    plan = plan_file(tmp_path, {"ok": "pass\n"}, [{"id": "a", "agent": "ok", "task": "t"}])
    (repo / "src" / "file0000.txt").write_text("work in progress\n")
    outcome = cli(capsys, "run", str(plan), "--base", base)
    assert outcome.code == 2
    assert not any(line.startswith("warning:") for line in outcome.err.splitlines())
    assert "Traceback" not in outcome.err
    assert repr(base) in outcome.err


@pytest.mark.parametrize("base", ["main\nHEAD", "main\x00x", "main\x7f"])
def test_a_base_with_a_control_character_is_refused_before_git_sees_it(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], base: str
) -> None:
    plan = plan_file(tmp_path, {"ok": "pass\n"}, [{"id": "a", "agent": "ok", "task": "t"}])
    data = yaml.safe_load(plan.read_text())
    plan.write_text(json.dumps({**data, "base": base}))
    outcome = cli(capsys, "run", str(plan))
    assert outcome.code == 2
    assert outcome.err.splitlines() == [
        f"{plan}:1:{outcome.err.split(':')[2]}: base: holds a control character (a newline, "
        "a NUL...), which no git revision has"
    ]
    if "\x00" not in base:  # (no command line holds a NUL)
        given = cli(capsys, "run", str(plan_file(tmp_path, {"ok": "pass\n"}, [])), "--base", base)
        assert given.code == 2


def _subcommand(args: list[str]) -> str:
    """The git subcommand of a command line, past git's own options (``-C dir``, ``-c x=y``,
    ``--git-dir=...``)."""
    while args and args[0].startswith("-"):
        args = args[2:] if args[0] in ("-C", "-c") else args[1:]
    return args[0] if args else ""
