"""The ``orchestrator`` command: exit codes, what it prints, and the report it leaves behind.

Most commands run in-process through ``orchestrator.cli.main``; the demo and Ctrl-C run
``python -m orchestrator`` as a real subprocess, as a user would.
"""

from __future__ import annotations

import ast
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from envelopes import REPORT_SCHEMA
from orchestrator import __version__
from orchestrator.cli import main

from .conftest import MakeRepo, Outcome, cli, git, live_processes_with, task_worktrees

WriteAgent = Callable[[str, str], Path]

# Writes out/<task id>.txt with the task's text, reports what it wrote as its output, and
# exits with the code given in its inputs (0 by default).
WRITER = """
import json, os, pathlib, sys
task_id = os.environ["ORCHESTRATOR_TASK_ID"]
envelope = json.loads(pathlib.Path(os.environ["ORCHESTRATOR_ENVELOPE"]).read_text())
pathlib.Path("out", task_id + ".txt").write_text(envelope["task"] + "\\n")
output = {"wrote": "out/" + task_id + ".txt", "venv": os.environ.get("VIRTUAL_ENV")}
pathlib.Path(os.environ["ORCHESTRATOR_OUTPUT"]).write_text(json.dumps(output))
sys.exit(envelope["inputs"].get("exit", 0))
"""


def exits(capsys: pytest.CaptureFixture[str], *argv: str) -> Outcome:
    """Run a command that argparse ends with SystemExit."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    assert isinstance(exc.value.code, int)
    return Outcome(exc.value.code, out, err)


def write_plan(path: Path, agent: Path, tasks: list[dict[str, Any]], **top: Any) -> Path:
    """A plan file next to a repository called "repo" (JSON is YAML: no quoting to get wrong)."""
    plan = {
        "name": "cli-test",
        "repo": "repo",
        "agents": {"w": {"command": [sys.executable, str(agent)]}},
        "tasks": tasks,
        **top,
    }
    path.write_text(json.dumps(plan, indent=2))
    return path


def one_task_plan(tmp_path: Path, agent: Path) -> Path:
    """The smallest plan that makes a commit: one task "one", no venv."""
    return write_plan(
        tmp_path / "plan.yaml",
        agent,
        [{"id": "one", "agent": "w", "task": "t"}],
        defaults={"venv": False},
    )


def printed_report(out: str) -> Path:
    [line] = [line for line in out.splitlines() if line.startswith("report: ")]
    return Path(line.removeprefix("report: "))


@pytest.fixture
def repo(make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository called "repo" with an empty out/ directory; the cwd is tmp_path."""
    monkeypatch.chdir(tmp_path)
    return make_repo(name="repo", extra={"out/.keep": ""})


@pytest.fixture
def writer(write_agent: WriteAgent) -> Path:
    return write_agent("writer", WRITER)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert exits(capsys, "--version") == Outcome(0, f"worktree-orchestrator {__version__}\n", "")


@pytest.mark.parametrize("command", [[], ["run"], ["validate"], ["verify"], ["schema"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    outcome = exits(capsys, *command, "--help")
    assert (outcome.code, outcome.err) == (0, "")
    assert outcome.out.startswith(f"usage: orchestrator {' '.join(command)}".rstrip())


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    out = exits(capsys, "--help").out
    for command in ("run", "validate", "verify", "schema"):
        assert f"    {command} " in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    outcome = exits(capsys)
    assert (outcome.code, outcome.out) == (2, "")
    assert (
        outcome.err.splitlines()[-1]
        == "orchestrator: error: the following arguments are required: COMMAND"
    )


@pytest.mark.parametrize("argv", [["run"], ["run", "plan.yaml", "--demo"]], ids=["neither", "both"])
def test_run_needs_a_plan_or_the_demo(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    outcome = cli(capsys, *argv)
    assert outcome == Outcome(2, "", "orchestrator: run needs a PLAN file, or --demo (not both)\n")
    assert list(tmp_path.iterdir()) == []


def test_run_a_plan_then_verify_its_report(
    repo: Path, writer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(
        tmp_path / "plan.yaml",
        writer,
        [{"id": "first", "agent": "w", "task": "write one"}, {"agent": "w", "task": "write two"}],
    )
    outcome = cli(capsys, "run", str(plan))
    assert outcome.code == 0, outcome.err

    report_path = printed_report(outcome.out)
    run_dir = report_path.parent
    assert report_path.name == "report.json"
    assert (
        run_dir.parent
        == Path(git(repo, "rev-parse", "--absolute-git-dir")) / "orchestrator" / "runs"
    )
    assert f"verify: orchestrator verify {report_path}" in outcome.out.splitlines()
    # The summary table: a title with the tally, then one row per task.
    assert f"run {run_dir.name}: 2 tasks: 2 succeeded in " in outcome.out
    rows = [line for line in outcome.out.splitlines() if "succeeded" in line and "│" in line]
    assert [row.split("│")[1].strip() for row in rows] == ["first", "task-002"]
    # Progress goes to stderr, so that stdout holds only the result.
    assert "task first started (w)" in outcome.err

    report = json.loads(report_path.read_text())
    assert report["schema"] == REPORT_SCHEMA
    assert report["summary"]["total_tasks"] == report["summary"]["successful"] == 2
    by_id = {r["task_id"]: r for r in report["results"]}
    assert by_id["task-002"]["output"]["wrote"] == "out/task-002.txt"
    assert by_id["task-002"]["output"]["venv"] is not None  # a real venv, by default
    # Each task's change is a commit on its own branch; no worktree is left (all succeeded).
    branch = f"orchestrator/{run_dir.name}/task-002"
    assert by_id["task-002"]["branch"] == branch
    assert git(repo, "show", f"{branch}:out/task-002.txt") == "write two"
    assert task_worktrees(repo) == []

    verified = cli(capsys, "verify", str(report_path))
    assert verified.code == 0, verified
    assert verified.out.startswith(f"{report_path}: OK (2 results, ")


def test_a_failing_task_exits_1_and_the_report_is_still_sound(
    repo: Path, writer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(
        tmp_path / "plan.yaml",
        writer,
        [
            {"id": "good", "agent": "w", "task": "write"},
            {"id": "bad", "agent": "w", "task": "write, then fail", "inputs": {"exit": 3}},
        ],
        defaults={"venv": False},
    )
    outcome = cli(capsys, "run", str(plan))
    assert outcome.code == 1, outcome.err
    # The first cell: a wrapped path in the error column may end in "bad" too.
    [bad_row] = [line for line in outcome.out.splitlines() if line.startswith("│ bad ")]
    assert "failed" in bad_row and "exited with code 3" in bad_row
    report = json.loads(printed_report(outcome.out).read_text())
    assert {r["task_id"]: r["status"] for r in report["results"]} == {
        "good": "succeeded",
        "bad": "failed",
    }
    assert report["summary"]["failed"] == 1
    # keep_worktrees defaults to "failed": the failed task's worktree stays for inspection.
    worktrees = git(repo, "worktree", "list", "--porcelain")
    assert len(task_worktrees(repo)) == 1
    assert f"branch refs/heads/orchestrator/{report['run_id']}/bad" in worktrees
    assert cli(capsys, "verify", str(printed_report(outcome.out))).code == 0


def test_json_prints_the_report_on_stdout(
    repo: Path, writer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = one_task_plan(tmp_path, writer)
    outcome = cli(capsys, "run", str(plan), "--json")
    assert outcome.code == 0, outcome.err
    report = json.loads(outcome.out)
    assert report["schema"] == REPORT_SCHEMA
    assert [r["task_id"] for r in report["results"]] == ["one"]
    on_disk = Path(report["run_dir"]) / "report.json"
    assert json.loads(on_disk.read_text()) == report


def test_out_writes_the_report_there(
    repo: Path, writer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = one_task_plan(tmp_path, writer)
    out = tmp_path / "results.json"
    outcome = cli(capsys, "run", str(plan), "--out", str(out))
    assert outcome.code == 0, outcome.err
    assert printed_report(outcome.out) == out
    report = json.loads(out.read_text())
    assert json.loads((Path(report["run_dir"]) / "report.json").read_text()) == report
    assert cli(capsys, "verify", str(out)).code == 0


def test_keep_worktrees_option_overrides_the_plan(
    repo: Path, writer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(
        tmp_path / "plan.yaml",
        writer,
        [{"id": "one", "agent": "w", "task": "t"}],
        defaults={"venv": False},
        keep_worktrees="never",
    )
    assert cli(capsys, "run", str(plan), "--keep-worktrees", "always").code == 0
    assert len(task_worktrees(repo)) == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "orchestrator: --concurrency: must be >= 1, found 0"),
        ("-2", "orchestrator: --concurrency: must be >= 1, found -2"),
        ("2000", "orchestrator: --concurrency: must be <= 1024, found 2000"),
        ("many", "orchestrator run: error: argument --concurrency: not an integer: 'many'"),
    ],
)
def test_concurrency_must_be_a_positive_integer(
    value: str,
    message: str,
    repo: Path,
    writer: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = write_plan(tmp_path / "plan.yaml", writer, [{"id": "one", "agent": "w", "task": "t"}])
    argv = ("run", str(plan), f"--concurrency={value}")
    # A non-integer is argparse's to refuse; an integer out of bounds the run settings'.
    outcome = exits(capsys, *argv) if value == "many" else cli(capsys, *argv)
    assert (outcome.code, outcome.out) == (2, "")
    assert outcome.err.splitlines()[-1] == message
    assert not (repo / ".git" / "orchestrator" / "runs").exists()
    assert not (repo / ".git" / "orchestrator").exists()


def test_schema_prints_every_document(capsys: pytest.CaptureFixture[str]) -> None:
    outcome = cli(capsys, "schema")
    assert outcome.code == 0
    schemas = json.loads(outcome.out)
    assert set(schemas) == {"plan", "envelope", "report"}
    assert {name: s["title"] for name, s in schemas.items()} == {
        "plan": "Plan",
        "envelope": "HandoffEnvelope",
        "report": "Report",
    }


def test_schema_prints_one_document(capsys: pytest.CaptureFixture[str]) -> None:
    outcome = cli(capsys, "schema", "report")
    assert outcome.code == 0
    schema = json.loads(outcome.out)
    assert schema["title"] == "Report"
    assert {"schema", "run_id", "summary", "results", "report_sha256"} <= set(schema["properties"])


def test_schema_of_an_unknown_document(capsys: pytest.CaptureFixture[str]) -> None:
    outcome = exits(capsys, "schema", "results")
    assert (outcome.code, outcome.out) == (2, "")
    assert "invalid choice: 'results'" in outcome.err.splitlines()[-1]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "orchestrator: cannot read {path}: No such file or directory"),
        (
            "not json at all\n",
            "orchestrator: {path} is not JSON: Expecting value: line 1 column 1 (char 0)",
        ),
        (
            '{"results": []}\n',
            "orchestrator: {path} is not a worktree-orchestrator report (no report schema tag)",
        ),
        (
            "[1, 2]\n",
            "orchestrator: {path} is not a worktree-orchestrator report (no report schema tag)",
        ),
        (
            json.dumps({"schema": REPORT_SCHEMA, "results": []}),
            "orchestrator: {path} is not a valid report: run_id: Field required",
        ),
    ],
    ids=["missing", "not-json", "not-a-report", "json-array", "tagged-but-invalid"],
)
def test_verify_unreadable_report(
    content: str | None, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    outcome = cli(capsys, "verify", str(path))
    assert outcome == Outcome(2, "", expected.format(path=path) + "\n")


def test_verify_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outcome = cli(capsys, "verify", str(tmp_path))
    assert (outcome.code, outcome.out) == (2, "")
    assert len(outcome.err.splitlines()) == 1
    assert outcome.err.startswith(f"orchestrator: cannot read {tmp_path}: ")


def test_verify_names_what_was_changed(
    repo: Path, writer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = one_task_plan(tmp_path, writer)
    outcome = cli(capsys, "run", str(plan), "--json")
    report = json.loads(outcome.out)
    report["results"][0]["output"]["wrote"] = "out/other.txt"
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(report))
    verified = cli(capsys, "verify", str(tampered))
    assert verified.code == 1
    findings = verified.out.splitlines()
    assert findings and all(line.startswith(f"{tampered}: ") for line in findings)
    prefix = f"{tampered}: task one: provenance.output_sha256: expected "
    assert any(line.startswith(prefix) for line in findings), findings
    assert verified.err == f"{len(findings)} finding(s)\n"


# Real subprocesses: the demo and Ctrl-C.


def orchestrator(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
def test_demo_in_an_empty_directory_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = tmp_path / "empty"
    where.mkdir()
    demo_repo = where / "orchestrator-demo"

    first = orchestrator("run", "--demo", cwd=where)
    assert first.returncode == 0, first.stderr
    assert f"demo repository: {demo_repo} (created)" in first.stderr.splitlines()
    assert "5 tasks: 5 succeeded" in first.stdout
    report = json.loads(printed_report(first.stdout).read_text())
    # test-slugify started from add-slugify's result, and tested what it added.
    by_id = {r["task_id"]: r for r in report["results"]}
    assert (
        by_id["test-slugify"]["provenance"]["base_commit"]
        == by_id["add-slugify"]["provenance"]["result_commit"]
    )
    [config] = [r for r in report["results"] if r["task_id"] == "write-config"]
    assert any(p.startswith("tomli-w==") for p in config["provenance"]["environment"]["packages"])
    assert cli(capsys, "verify", str(printed_report(first.stdout))).code == 0

    second = orchestrator("run", "--demo", cwd=where)
    assert second.returncode == 0, second.stderr
    assert f"demo repository: {demo_repo}" in second.stderr.splitlines()
    assert printed_report(second.stdout) != printed_report(first.stdout)
    assert cli(capsys, "verify", str(printed_report(second.stdout))).code == 0
    assert sorted(p.name for p in where.iterdir()) == ["orchestrator-demo"]


@pytest.mark.parametrize(
    ("signum", "code_expected", "last_line"),
    [
        (
            signal.SIGINT,
            130,
            "orchestrator: interrupted; running tasks were stopped and cleaned up "
            "(partial report in the run directory)",
        ),
        (
            signal.SIGTERM,
            143,
            "orchestrator: stopped by SIGTERM; running tasks were stopped and cleaned up "
            "(partial report in the run directory)",
        ),
    ],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_or_sigterm_stops_agents_cleans_up_and_exits(
    repo: Path,
    write_agent: WriteAgent,
    tmp_path: Path,
    signum: int,
    code_expected: int,
    last_line: str,
) -> None:
    marker = f"ctrl-c-{uuid.uuid4().hex}"
    started = tmp_path / "started"
    started.mkdir()
    sleeper = write_agent(
        "sleeper",
        """
        import os, pathlib, sys, time
        pathlib.Path("partial.txt").write_text("partial work")
        pathlib.Path(sys.argv[1], os.environ["ORCHESTRATOR_TASK_ID"]).touch()
        time.sleep(30)
        """,
    )
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        json.dumps(
            {
                "repo": "repo",
                "agents": {"s": {"command": [sys.executable, str(sleeper), str(started), marker]}},
                "tasks": [{"id": f"s{i}", "agent": "s", "task": "sleep"} for i in range(2)],
            }
        )
    )
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "run", str(plan)],
            cwd=tmp_path,
            stdout=out,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        while len(list(started.iterdir())) < 2:
            assert process.poll() is None, (tmp_path / "stderr").read_text()
            assert time.monotonic() < deadline, "the agents never started"
            time.sleep(0.05)
        process.send_signal(signum)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    stderr = (tmp_path / "stderr").read_text()
    assert code == code_expected, stderr
    assert stderr.splitlines()[-1] == last_line
    assert live_processes_with(marker) == []
    assert task_worktrees(repo) == []
    assert not list((repo / ".git").rglob("*.lock"))
    [run_dir] = (repo / ".git" / "orchestrator" / "runs").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert {r["task_id"]: r["status"] for r in report["results"]} == {
        "s0": "cancelled",
        "s1": "cancelled",
    }
    assert report["summary"]["cancelled"] == 2
    for kind in ("worktrees", "venvs"):
        assert not (repo / ".git" / "orchestrator" / kind / run_dir.name).exists()
    # Nothing is lost: each cancelled task's partial work is committed on its branch.
    for result in report["results"]:
        assert git(repo, "show", f"{result['branch']}:partial.txt") == "partial work"


def test_out_in_a_missing_directory_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("agents: {a: {command: [x]}}\ntasks: [{agent: a, task: t}]\n")
    outcome = cli(capsys, "run", str(plan), "--out", str(tmp_path / "missing" / "r.json"))
    assert outcome == Outcome(
        2, "", f"orchestrator: --out: {tmp_path / 'missing'} is not a directory\n"
    )


def test_an_error_line_shows_escape_sequences_instead_of_obeying_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A path (or a report's text) in an error line may hold an escape sequence: it is shown
    as ``\\x1b``, never written to the terminal."""
    from .conftest import cli

    outcome = cli(capsys, "verify", str(tmp_path / "r\x1b]0;pwned\x07.json"))
    assert outcome.code == 2
    assert "\x1b" not in outcome.err and "\x07" not in outcome.err
    assert "r\\x1b]0;pwned\\x07.json" in outcome.err


def test_gc_shows_what_an_agent_named_instead_of_obeying_it(
    capsys: pytest.CaptureFixture[str], make_repo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc's lines name process tags and branches, which an agent may have chosen."""
    from orchestrator import gc
    from orchestrator.gc import GcOutcome

    from .conftest import cli

    async def collected(*args: object, **kwargs: object) -> GcOutcome:
        return GcOutcome(
            done=["killed 4242 (run/t\x1b]52;c;cHduZWQ=\x07)"], kept=["branch \u202eevil"]
        )

    monkeypatch.setattr(gc, "collect_garbage", collected)
    outcome = cli(capsys, "gc", "--repo", str(make_repo()))
    assert outcome.code == 0
    assert "\x1b" not in outcome.out and "\u202e" not in outcome.out
    assert "killed 4242 (run/t\\x1b]52;c;cHduZWQ=\\x07)" in outcome.out
    assert "kept: branch \\u202eevil" in outcome.out


def _entry_in_a_process(tmp_path: Path, prelude: str, argv: list[str]) -> subprocess.Popen[str]:
    script = tmp_path / "entry.py"
    script.write_text(f"{prelude}\nfrom orchestrator.cli import entry\nentry({argv!r})\n")
    return subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_the_process_exit_runs_atexit_handlers_and_keeps_the_commands_status_and_output(
    tmp_path: Path,
) -> None:
    """The entry ends the process without the interpreter's teardown (0.1 to 0.2 s): what a
    command printed, its status and the atexit handlers are all still there."""
    marker = tmp_path / "atexit-ran"
    prelude = (
        f"import atexit, pathlib\natexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')"
    )
    process = _entry_in_a_process(tmp_path, prelude, ["schema", "plan"])
    out, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (0, "")
    assert json.loads(out)["title"] == "Plan"  # all of it, flushed
    assert marker.read_text() == "yes"
    # A failing command's status is the process's; its one line of error is all there.
    process = _entry_in_a_process(tmp_path, "", ["verify", str(tmp_path / "none.json")])
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2 and err.startswith("orchestrator: ") and err.endswith("\n")


def test_the_process_freezes_what_its_command_imported_and_collects_the_rest(
    tmp_path: Path, repo: Path, writer: Path
) -> None:
    """The console script imports a run's modules before it starts and freezes them (no
    collection walks them again), the collector on again for what the run makes; the run
    is as before."""
    plan = one_task_plan(tmp_path, writer)
    seen = tmp_path / "gc-state"
    # gc.get_objects() leaves out what is frozen: the run's own function is not in it, a
    # function made after the freeze is.
    prelude = (
        "import atexit, gc, pathlib, sys\n"
        "def state():\n"
        "    from orchestrator.coordinator import orchestrate_parallel\n"
        "    def made_later(): pass\n"
        "    ids = {id(o) for o in gc.get_objects()}\n"
        f"    pathlib.Path({str(seen)!r}).write_text(repr((gc.isenabled(),"
        " id(orchestrate_parallel) in ids, id(made_later) in ids)))\n"
        "atexit.register(state)"
    )
    process = _entry_in_a_process(tmp_path, prelude, ["run", str(plan)])
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "1 succeeded" in out
    enabled, run_function_collectable, later_collectable = ast.literal_eval(seen.read_text())
    assert enabled and not run_function_collectable and later_collectable


def test_ctrl_c_while_the_command_is_being_imported_is_one_line_and_exit_130(
    tmp_path: Path,
) -> None:
    """A Ctrl-C in the first few hundred milliseconds, while the run's modules are imported
    (signalled here when the coordinator is first imported): the one-line message and exit
    130, as for a Ctrl-C at any later point, not a traceback."""
    prelude = (
        "import os, signal, sys\n"
        "class Interrupting:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'orchestrator.coordinator':\n"
        "            sys.meta_path.remove(self)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Interrupting())"
    )
    process = _entry_in_a_process(tmp_path, prelude, ["run", str(tmp_path / "plan.yaml")])
    _, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (130, "orchestrator: interrupted\n")


def test_main_in_a_caller_s_process_leaves_its_collector_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Freezing is the console script's: a program that calls ``main`` keeps its collector
    as it was (nothing of its own frozen, the collector still off if it turned it off)."""
    import gc

    before = gc.get_freeze_count()
    gc.disable()
    try:
        # verify: a command whose modules the console script imports up front.
        outcome = cli(capsys, "verify", str(tmp_path / "none.json"))
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert outcome.code == 2
    assert gc.get_freeze_count() == before


def test_the_process_exit_waits_for_a_thread_still_working(tmp_path: Path) -> None:
    """A thread of the embedding program still running when the command returns is not cut
    short: the usual exit, which waits for it, is taken."""
    done = tmp_path / "thread-done"
    prelude = (
        "import pathlib, threading, time\n"
        "def work():\n"
        "    time.sleep(0.5)\n"
        f"    pathlib.Path({str(done)!r}).write_text('done')\n"
        "threading.Thread(target=work).start()"
    )
    process = _entry_in_a_process(tmp_path, prelude, ["--version"])
    process.communicate(timeout=60)
    assert process.returncode == 0
    assert done.read_text() == "done"


def test_a_run_of_command_agents_imports_no_library_it_does_not_use(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """Jinja2 (a preset's prompt), httpx (HTTP agents, webhooks) and tenacity (a retry) are
    imported when a run first needs them: a run of command agents that succeed, none."""
    repo = make_repo()
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "repo": str(repo),
                "agents": {"ok": {"command": ["sh", "-c", "echo x > out.txt"]}},
                "defaults": {"venv": False},
                "tasks": [{"id": "a", "agent": "ok", "task": "t"}],
            }
        )
    )
    code = (
        "import sys\nfrom orchestrator.cli import main\ncode = main(['run', sys.argv[1]])\n"
        "print(sorted(m for m in ('jinja2', 'httpx', 'tenacity') if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(plan)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_the_process_exit_skips_the_interpreters_teardown(tmp_path: Path) -> None:
    """What the fast exit saves: an object's finaliser, which the interpreter's teardown
    would run, is not run (the atexit handlers still are)."""
    marker = tmp_path / "finalised"
    prelude = (
        "import pathlib\n"
        "class Finalised:\n"
        "    def __del__(self):\n"
        f"        pathlib.Path({str(marker)!r}).write_text('torn down')\n"
        "kept = Finalised()"
    )
    # (Not --version: argparse ends that one with SystemExit, the usual exit.)
    process = _entry_in_a_process(tmp_path, prelude, ["schema", "plan"])
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and json.loads(out)  # the whole output, flushed
    assert not marker.exists()


@pytest.mark.parametrize("closed", ["1", "2"])
def test_a_command_with_its_output_closed_exits_without_a_traceback(closed: str) -> None:
    """stdout or stderr closed before Python started is None in sys: nothing to flush."""
    done = subprocess.run(
        ["sh", "-c", f'exec "$0" -m orchestrator schema plan {closed}>&-', sys.executable],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "Traceback" not in done.stdout + done.stderr
