"""verify: a fresh report passes; any one change to it, its run directory or its commits fails.

One real run (a repository, four command agents, real venvs) is made once for the module;
tests that change the repository or the run directory work on a copy of it, tests that only
change the report write an edited copy of the report next to them.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import (
    LogFile,
    Plan,
    Report,
    canonical_json,
    digest,
    digest_without,
    report_digest,
    sha256_hex,
)
from orchestrator import ReportUnreadable, orchestrate_parallel, verify_report
from orchestrator.cli import main

from .conftest import MakeRepo, git

AGENT = """
import json, os, sys
task = os.environ["ORCHESTRATOR_TASK_ID"]
with open(os.path.join("out", task + ".txt"), "w", encoding="utf-8") as f:
    f.write(task + "\\n")
print("working on", task)
print("note from", task, file=sys.stderr)
output = {"task": task, "ratio": 0.1 + 0.2, "tiny": 1e-07, "text": "caf\\u00e9 \\u2713"}
with open(os.environ["ORCHESTRATOR_OUTPUT"], "w", encoding="utf-8") as f:
    json.dump(output, f)
"""

TASKS = {"alpha": "writer", "beta": "reviewer", "gamma": "writer", "delta": "reviewer"}
TARGET = "beta"  # the task most tests tamper with
OTHER = "gamma"


def plan_for(agent: Path, tasks: dict[str, str]) -> dict[str, Any]:
    return {
        "name": "verify-tests",
        "agents": {name: {"command": [sys.executable, str(agent)]} for name in set(tasks.values())},
        "tasks": [
            {"id": task_id, "agent": agent_name, "task": f"write {task_id}", "inputs": {"n": i}}
            for i, (task_id, agent_name) in enumerate(tasks.items())
        ],
    }


def layout(raw: dict[str, Any]) -> bytes:
    """The bytes the orchestrator writes for a report object (so that only the edit differs):
    version 2, written out here from docs/report-format.md, not taken from the code."""
    parts = []
    for key, value in raw.items():
        if key == "results" and value:
            lines = [json.dumps(r, separators=(",", ":"), ensure_ascii=False) for r in value]
            text = "[\n" + ",\n".join("    " + line for line in lines) + "\n  ]"
        else:
            text = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n  ")
        parts.append(f"  {json.dumps(key, ensure_ascii=False)}: {text}")
    return ("{\n" + ",\n".join(parts) + "\n}\n").encode("utf-8")


def reseal(raw: dict[str, Any], *, results: bool = True) -> None:
    """Recompute the outer digests, as a forger would, so that only inner checks remain."""
    if results:
        for result in raw["results"]:
            result["provenance"]["result_sha256"] = digest_without(
                result, "provenance", "result_sha256"
            )
    raw["report_sha256"] = report_digest(raw)


def result_of(raw: dict[str, Any], task_id: str) -> dict[str, Any]:
    return next(r for r in raw["results"] if r["task_id"] == task_id)


def verify_cli(capsys: pytest.CaptureFixture[str], *args: Path | str) -> tuple[int, list[str]]:
    """Run ``orchestrator verify ARGS`` in process: exit code and the finding lines."""
    code = main(["verify", *map(str, args)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out.splitlines()


def has_finding(lines: list[str], task_id: str | None, field: str) -> bool:
    marker = f"report.json: task {task_id}: {field}: " if task_id else f"report.json: {field}: "
    return any(marker in line for line in lines)


@dataclass(frozen=True)
class Produced:
    """The module's one real run."""

    repo: Path
    run_dir: Path
    report_path: Path
    report: Report


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> Produced:
    root = tmp_path_factory.mktemp("produced")
    with pytest.MonkeyPatch.context() as mp:
        # As conftest's fresh_machine_git, which is function-scoped: no git identity at all.
        (root / "gitconfig").write_text("")
        mp.setenv("GIT_CONFIG_GLOBAL", str(root / "gitconfig"))
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        for role in ("AUTHOR", "COMMITTER"):
            for what in ("NAME", "EMAIL"):
                mp.delenv(f"GIT_{role}_{what}", raising=False)
        mp.delenv("EMAIL", raising=False)
        # As conftest's make_repo and write_agent, which are function-scoped.
        repo = root / "repo"
        (repo / "src").mkdir(parents=True)
        (repo / "out").mkdir()
        (repo / "out" / ".keep").write_text("")
        for i in range(3):
            (repo / "src" / f"file{i:04d}.txt").write_text(f"line {i}\n")
        git(repo, "init", "--quiet", "--initial-branch=main")
        git(repo, "add", "--all")
        git(repo, "commit", "--quiet", "-m", "initial")
        agent = root / "agents" / "writer.py"
        agent.parent.mkdir()
        agent.write_text(textwrap.dedent(AGENT), encoding="utf-8")
        plan = Plan.model_validate(plan_for(agent, TASKS))
        report: Report = anyio.run(lambda: orchestrate_parallel(plan, repo=repo))
    assert report.summary.successful == len(TASKS), report.errors
    assert report.repo is not None
    return Produced(
        repo=Path(report.repo),
        run_dir=Path(report.run_dir),
        report_path=Path(report.run_dir) / "report.json",
        report=report,
    )


@dataclass(frozen=True)
class RunCopy:
    """A copy of the produced repository (with its run directory inside the git dir)."""

    repo: Path
    run_dir: Path
    report: Path

    def args(self) -> list[Path | str]:
        return [self.report, "--repo", self.repo, "--run-dir", self.run_dir]


@pytest.fixture
def run_copy(produced: Produced, tmp_path: Path) -> RunCopy:
    repo = tmp_path / "repo"
    shutil.copytree(produced.repo, repo, symlinks=True)
    run_dir = repo / produced.run_dir.relative_to(produced.repo)
    return RunCopy(repo=repo, run_dir=run_dir, report=run_dir / "report.json")


def raw_report(produced: Produced) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(produced.report_path.read_text(encoding="utf-8"))
    return raw


# a fresh report


def test_fresh_report_verifies_in_code(produced: Produced) -> None:
    outcome = anyio.run(verify_report, produced.report_path)
    assert outcome.ok, outcome.findings
    assert outcome.checked_commits == len(TASKS)
    assert outcome.report.report_sha256 == produced.report.report_sha256
    assert [r.task_id for r in outcome.report.results] == list(TASKS)


def test_fresh_report_verifies_on_the_command_line(
    produced: Produced, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = verify_cli(capsys, produced.report_path)
    assert code == 0
    assert lines == [
        f"{produced.report_path}: OK ({len(TASKS)} results, {len(TASKS)} commits checked, "
        "every digest recomputed)"
    ]


def test_file_is_exactly_the_layout_the_orchestrator_writes(produced: Produced) -> None:
    data = produced.report_path.read_bytes()
    assert data == layout(json.loads(data))
    assert "café ✓".encode() in data  # UTF-8 as is, so one changed byte can break a character


def test_a_copy_of_the_run_verifies_before_any_change(
    run_copy: RunCopy, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = verify_cli(capsys, *run_copy.args())
    assert code == 0, lines


def test_a_copy_of_the_report_verifies_before_any_change(
    produced: Produced, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edited = tmp_path / "report.json"
    edited.write_bytes(layout(raw_report(produced)))
    assert verify_cli(capsys, edited)[0] == 0


# one change to the report


@dataclass(frozen=True)
class Tamper:
    name: str
    change: Callable[[dict[str, Any]], None]
    task_id: str | None
    field: str
    resealable: bool = True


def _set(*path: str | int, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        node: Any = result_of(raw, TARGET)
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _set_from_other(*path: str | int) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        source: Any = result_of(raw, OTHER)
        node: Any = result_of(raw, TARGET)
        for key in path[:-1]:
            source, node = source[key], node[key]
        assert node[path[-1]] != source[path[-1]]
        node[path[-1]] = source[path[-1]]

    return change


def _bump_summary(key: str) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        raw["summary"][key] += 1

    return change


def _duplicate(raw: dict[str, Any]) -> None:
    raw["results"].append(copy.deepcopy(result_of(raw, TARGET)))


def _drop(raw: dict[str, Any]) -> None:
    raw["results"].remove(result_of(raw, TARGET))


def _set_report_base(raw: dict[str, Any]) -> None:
    raw["base_commit"] = result_of(raw, TARGET)["provenance"]["result_commit"]


def _add_error(raw: dict[str, Any]) -> None:
    raw["errors"].append(
        {"task_id": TARGET, "agent": "reviewer", "kind": "exit_code", "message": ""}
    )


def _by_agent(raw: dict[str, Any]) -> None:
    raw["results_by_agent"]["writer"]["successful"] -= 1


def _change_report_sha(raw: dict[str, Any]) -> None:
    raw["report_sha256"] = digest("tampered")


DIGESTS = [
    "envelope_sha256",
    "output_sha256",
    "env_sha256",
    "agent_sha256",
    "stdout_sha256",
    "stderr_sha256",
    "result_sha256",
]

TAMPERS = [
    Tamper(
        "output value", _set("output", "task", value="tampered"), TARGET, "provenance.output_sha256"
    ),
    Tamper("output number", _set("output", "ratio", value=0.3), TARGET, "provenance.output_sha256"),
    Tamper(
        "output key added", _set("output", "extra", value=None), TARGET, "provenance.output_sha256"
    ),
    Tamper("status failed", _set("status", value="failed"), TARGET, "status"),
    Tamper("status timed_out", _set("status", value="timed_out"), TARGET, "status"),
    *[
        Tamper(d, _set("provenance", d, value=digest("tampered")), TARGET, f"provenance.{d}")
        for d in DIGESTS
    ],
    Tamper("report_sha256", _change_report_sha, None, "report_sha256", resealable=False),
    *[
        Tamper(f"summary.{key}", _bump_summary(key), None, f"summary.{key}")
        for key in ("total_tasks", "successful", "failed", "timeout", "cancelled", "success_rate")
    ],
    Tamper("results_by_agent", _by_agent, None, "results_by_agent"),
    Tamper("errors", _add_error, None, "errors"),
    Tamper("attempts", _set("attempts", value=2), TARGET, "attempts"),
    Tamper(
        "error on a success",
        _set("error", value={"kind": "exit_code", "message": "x", "paths": []}),
        TARGET,
        "error",
    ),
    Tamper("duplicated result", _duplicate, TARGET, "results"),
    Tamper("dropped result", _drop, None, "summary.total_tasks"),
    Tamper(
        "result_tree",
        _set_from_other("provenance", "result_tree"),
        TARGET,
        "provenance.result_tree",
    ),
    Tamper("result_commit", _set_from_other("provenance", "result_commit"), TARGET, "branch"),
    Tamper("branch", _set_from_other("branch"), TARGET, "branch"),
    Tamper(
        "provenance.base_commit",
        _set("provenance", "base_commit", value="0" * 40),
        TARGET,
        "provenance.base_commit",
    ),
    Tamper("report base_commit", _set_report_base, "alpha", "provenance.base_commit"),
    Tamper("envelope entry", _set_from_other("envelope"), TARGET, "envelope.task_id"),
    Tamper(
        "log entry", _set_from_other("attempt_log", 0, "stdout"), TARGET, "provenance.stdout_sha256"
    ),
]


@pytest.mark.parametrize(
    ("tamper", "resealed"),
    [
        pytest.param(t, resealed, id=f"{t.name}-{'resealed' if resealed else 'as-is'}")
        for t in TAMPERS
        for resealed in (False, True)
        if t.resealable or not resealed
    ],
)
def test_any_one_change_to_the_report_fails_naming_the_field(
    produced: Produced,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tamper: Tamper,
    resealed: bool,
) -> None:
    raw = raw_report(produced)
    before = json.loads(json.dumps(raw))
    tamper.change(raw)
    if resealed:
        reseal(raw, results=tamper.field != "provenance.result_sha256")
    edited = tmp_path / "report.json"
    edited.write_bytes(layout(raw))
    code, lines = verify_cli(capsys, edited)
    assert code == 1
    assert has_finding(lines, tamper.task_id, tamper.field), lines
    if not resealed:
        # A seal gives it away too. Version 2: a result changed in place, its own seal; the
        # rest of the report, or which results it holds, the report's (which covers each
        # result through its result_sha256).
        old = {r["task_id"]: r for r in before["results"]}
        for result in raw["results"]:
            if result["task_id"] in old and result != old[result["task_id"]]:
                assert has_finding(lines, result["task_id"], "provenance.result_sha256"), lines
        seals = [r["provenance"]["result_sha256"] for r in raw["results"]]
        if {**raw, "results": seals} != {
            **before,
            "results": [r["provenance"]["result_sha256"] for r in before["results"]],
        }:
            assert has_finding(lines, None, "report_sha256"), lines
    outcome = anyio.run(verify_report, edited)
    assert (tamper.task_id, tamper.field) in {(f.task_id, f.field) for f in outcome.findings}


@pytest.mark.parametrize("digest_name", DIGESTS)
def test_a_changed_digest_is_reported_as_expected_vs_found(
    produced: Produced, tmp_path: Path, capsys: pytest.CaptureFixture[str], digest_name: str
) -> None:
    raw = raw_report(produced)
    prov = result_of(raw, TARGET)["provenance"]
    original, forged = prov[digest_name], digest("forged")
    prov[digest_name] = forged
    edited = tmp_path / "report.json"
    edited.write_bytes(layout(raw))
    _, lines = verify_cli(capsys, edited)
    line = next(line for line in lines if f"task {TARGET}: provenance.{digest_name}: " in line)
    assert f"expected '{original}', found '{forged}'" in line


# one change to the repository


def _branch_and_commit(produced: Produced, task_id: str = TARGET) -> tuple[str, str]:
    result = produced.report.result(task_id)
    assert result.branch is not None and result.provenance.result_commit is not None
    return result.branch, result.provenance.result_commit


def test_deleted_task_branch_fails(
    produced: Produced, run_copy: RunCopy, capsys: pytest.CaptureFixture[str]
) -> None:
    branch, _ = _branch_and_commit(produced)
    git(run_copy.repo, "branch", "--quiet", "-D", branch)
    code, lines = verify_cli(capsys, *run_copy.args())
    assert code == 1
    assert has_finding(lines, TARGET, "branch"), lines
    assert any(f"branch {branch} does not exist" in line for line in lines)
    assert len(lines) == 1  # the commit itself is still there: only the branch is missing


def test_deleted_task_branch_and_pruned_commit_fails(
    produced: Produced, run_copy: RunCopy, capsys: pytest.CaptureFixture[str]
) -> None:
    branch, commit = _branch_and_commit(produced)
    git(run_copy.repo, "branch", "--quiet", "-D", branch)
    git(run_copy.repo, "reflog", "expire", "--expire=now", "--all")
    git(run_copy.repo, "gc", "--quiet", "--prune=now")
    assert (
        subprocess.run(
            ["git", "-C", str(run_copy.repo), "cat-file", "-e", commit], capture_output=True
        ).returncode
        != 0
    )
    code, lines = verify_cli(capsys, *run_copy.args())
    assert code == 1
    assert has_finding(lines, TARGET, "provenance.result_commit"), lines


@pytest.mark.parametrize("content", [False, True], ids=["message-only", "content-too"])
def test_rewritten_commit_fails(
    produced: Produced,
    run_copy: RunCopy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bool,
) -> None:
    branch, commit = _branch_and_commit(produced)
    worktree = tmp_path / "amend"
    git(run_copy.repo, "worktree", "add", "--quiet", str(worktree), branch)
    if content:
        (worktree / "out" / f"{TARGET}.txt").write_text("rewritten\n")
        git(worktree, "add", "--all")
    git(worktree, "commit", "--quiet", "--amend", "-m", "rewritten history")
    git(run_copy.repo, "worktree", "remove", str(worktree))
    assert git(run_copy.repo, "rev-parse", f"refs/heads/{branch}") != commit
    code, lines = verify_cli(capsys, *run_copy.args())
    assert code == 1
    assert has_finding(lines, TARGET, "branch"), lines
    assert any(f"which does not contain {commit}" in line for line in lines)


def test_task_branch_reset_to_base_fails(
    produced: Produced, run_copy: RunCopy, capsys: pytest.CaptureFixture[str]
) -> None:
    branch, _ = _branch_and_commit(produced)
    assert produced.report.base_commit is not None
    git(run_copy.repo, "branch", "--force", branch, produced.report.base_commit)
    code, lines = verify_cli(capsys, *run_copy.args())
    assert code == 1 and has_finding(lines, TARGET, "branch"), lines


def test_commit_added_on_top_of_a_task_branch_is_not_a_finding(
    produced: Produced, run_copy: RunCopy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    branch, commit = _branch_and_commit(produced)
    worktree = tmp_path / "continue"
    git(run_copy.repo, "worktree", "add", "--quiet", str(worktree), branch)
    (worktree / "out" / "more.txt").write_text("continuing the work\n")
    git(worktree, "add", "--all")
    git(worktree, "commit", "--quiet", "-m", "continue the work")
    git(run_copy.repo, "worktree", "remove", str(worktree))
    head = git(run_copy.repo, "rev-parse", f"refs/heads/{branch}")
    assert head != commit and git(run_copy.repo, "rev-parse", f"{head}^") == commit
    code, lines = verify_cli(capsys, *run_copy.args())
    assert code == 0, lines


# one change to the run directory


def _log_path(produced: Produced, run_copy: RunCopy, stream: str) -> Path:
    entry: LogFile | None = getattr(produced.report.result(TARGET).attempt_log[-1], stream)
    assert entry is not None
    return run_copy.run_dir / entry.path


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
@pytest.mark.parametrize("how", ["appended", "same-size", "deleted"])
def test_edited_log_file_fails(
    produced: Produced,
    run_copy: RunCopy,
    capsys: pytest.CaptureFixture[str],
    stream: str,
    how: str,
) -> None:
    path = _log_path(produced, run_copy, stream)
    data = path.read_bytes()
    assert data  # the agent wrote to both streams
    field = f"attempt_log[1].{stream}"
    if how == "appended":
        path.write_bytes(data + b"one more line\n")
        fields = [f"{field}.sha256", f"{field}.size"]
    elif how == "same-size":
        path.write_bytes(bytes([data[0] ^ 0x01]) + data[1:])
        fields = [f"{field}.sha256"]
    else:
        path.unlink()
        fields = [field]
    code, lines = verify_cli(capsys, *run_copy.args())
    assert code == 1
    for name in fields:
        assert has_finding(lines, TARGET, name), lines


def _envelope_path(produced: Produced, run_copy: RunCopy, task_id: str = TARGET) -> Path:
    entry = produced.report.result(task_id).envelope
    assert entry is not None
    return run_copy.run_dir / entry.path


@pytest.mark.parametrize(
    ("how", "fields"),
    [
        ("task-changed", ["envelope.sha256", "provenance.envelope_sha256"]),
        ("reformatted", ["envelope.sha256"]),
        ("other-task", ["envelope.sha256", "provenance.envelope_sha256", "envelope.task_id"]),
        ("not-json", ["envelope.sha256"]),
        ("deleted", ["envelope"]),
    ],
)
def test_edited_envelope_file_fails(
    produced: Produced,
    run_copy: RunCopy,
    capsys: pytest.CaptureFixture[str],
    how: str,
    fields: list[str],
) -> None:
    path = _envelope_path(produced, run_copy)
    envelope = json.loads(path.read_bytes())
    if how == "task-changed":
        envelope["task"] = "something else"
        path.write_bytes(json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode())
    elif how == "reformatted":
        path.write_text(json.dumps(envelope, indent=2))
    elif how == "other-task":
        shutil.copyfile(_envelope_path(produced, run_copy, OTHER), path)
    elif how == "not-json":
        path.write_bytes(path.read_bytes()[:-1])
    else:
        path.unlink()
    code, lines = verify_cli(capsys, *run_copy.args())
    assert code == 1
    for name in fields:
        assert has_finding(lines, TARGET, name), lines


def test_plan_file_in_the_run_directory_matches_plan_sha256(produced: Produced) -> None:
    plan_file = produced.run_dir / "plan.json"
    assert sha256_hex(plan_file.read_bytes()) == produced.report.plan_sha256


def test_edited_plan_file_fails(
    produced: Produced, run_copy: RunCopy, capsys: pytest.CaptureFixture[str]
) -> None:
    plan_file = run_copy.run_dir / "plan.json"
    plan = json.loads(plan_file.read_bytes())
    plan["tasks"][0]["task"] = "something else"
    plan_file.write_bytes(canonical_json(plan))
    code, lines = verify_cli(capsys, *run_copy.args())
    assert code == 1
    assert has_finding(lines, None, "plan_sha256"), lines


# single changed bytes


def test_single_byte_flips_never_pass(
    produced: Produced, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = produced.report_path.read_bytes()
    positions = [i for i, byte in enumerate(data) if byte not in b" \t\r\n"]
    rng = random.Random(20261122)
    sample = sorted(rng.sample(positions, 320))
    flipped_path = tmp_path / "report.json"
    codes: Counter[int | str] = Counter()
    wrong: list[str] = []
    for position in sample:
        flipped = bytearray(data)
        flipped[position] ^= rng.choice((0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40))
        flipped_path.write_bytes(flipped)
        outcome: int | str
        try:
            outcome = main(["verify", str(flipped_path)])
        except Exception as exc:  # a crash is as wrong as a pass; collect them all
            outcome = type(exc).__name__
        capsys.readouterr()
        codes[outcome] += 1
        if outcome not in (1, 2):
            context = bytes(flipped[max(0, position - 30) : position + 10])
            wrong.append(f"byte {position} -> {outcome}: {context!r}")
    assert wrong == []
    assert codes[1] > 0 and codes[2] > 0  # both kinds were exercised


@pytest.mark.parametrize(
    ("original", "changed"),
    [
        (b"0.30000000000000004", b"0.30000000000000005"),  # parses to the same float
        (b"1e-07", b"1E-07"),  # same number, other spelling
        (b'\n  "run_id"', b'\n \t"run_id"'),  # whitespace only
    ],
    ids=["float-last-digit", "exponent-case", "indent"],
)
def test_a_byte_change_that_keeps_every_value_still_fails(
    produced: Produced,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    original: bytes,
    changed: bytes,
) -> None:
    data = produced.report_path.read_bytes()
    assert original in data
    edited_data = data.replace(original, changed, 1)
    assert sum(a != b for a, b in zip(data, edited_data, strict=True)) == 1
    assert json.loads(edited_data) == json.loads(data)  # every digest still matches
    edited = tmp_path / "report.json"
    edited.write_bytes(edited_data)
    code, lines = verify_cli(capsys, edited)
    assert code == 1
    assert has_finding(lines, None, "<file>"), lines


# reports that cannot be read


def _real_report_with(produced: Produced, change: Callable[[dict[str, Any]], None]) -> bytes:
    raw = raw_report(produced)
    change(raw)
    return layout(raw)


def _without_results(raw: dict[str, Any]) -> None:
    del raw["results"]


def _bad_status(raw: dict[str, Any]) -> None:
    raw["results"][0]["status"] = "exploded"


def _unknown_key(raw: dict[str, Any]) -> None:
    raw["signed_by"] = "nobody"


def _duplicate_top_key(data: bytes) -> bytes:
    return data.replace(b"{\n", b'{\n  "run_id": "other",\n', 1)


def _duplicate_nested_key(data: bytes) -> bytes:
    # Same key, same value: the parsed object is unchanged, only the duplicate gives it away.
    field = b'"status":"succeeded",'  # in a result's line (version 2)
    start = data.index(field)
    return data[:start] + field + data[start:]


UNREADABLE: dict[str, Callable[[Produced], bytes | None]] = {
    "missing": lambda p: None,
    "empty": lambda p: b"",
    "not-json": lambda p: b"this is not JSON\n",
    "truncated": lambda p: p.report_path.read_bytes()[:-10],
    "not-utf8": lambda p: b'{"schema": "\xff\xfe"}',
    "array": lambda p: b"[]",
    "null": lambda p: b"null",
    "string": lambda p: b'"worktree-orchestrator/report/v1"',
    "empty-object": lambda p: b"{}",
    "other-schema": lambda p: b'{"schema": "worktree-orchestrator/report/v2"}',
    "envelope": lambda p: p.run_dir.joinpath("envelopes", f"{TARGET}.json").read_bytes(),
    "plan": lambda p: p.run_dir.joinpath("plan.json").read_bytes(),
    "no-results": lambda p: _real_report_with(p, _without_results),
    "bad-status": lambda p: _real_report_with(p, _bad_status),
    "unknown-key": lambda p: _real_report_with(p, _unknown_key),
    "duplicate-key": lambda p: _duplicate_top_key(p.report_path.read_bytes()),
    "duplicate-nested-key": lambda p: _duplicate_nested_key(p.report_path.read_bytes()),
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_or_not_a_report_exits_2(
    produced: Produced, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = tmp_path / "report.json"
    content = UNREADABLE[name](produced)
    if content is not None:
        path.write_bytes(content)
    if name.startswith("duplicate"):
        assert content is not None and json.loads(content)  # valid JSON apart from that
    code = main(["verify", str(path)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.startswith("orchestrator: ") and "Traceback" not in captured.err
    with pytest.raises(ReportUnreadable):
        anyio.run(verify_report, path)


def test_a_directory_is_not_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("orchestrator: ")


@pytest.mark.parametrize(
    "path",
    [
        ("report_sha256",),
        ("results", 0, "provenance", "result_sha256"),
        ("results", 0, "provenance", "env_sha256"),
        ("results", 0, "output"),
        ("results", 0, "error"),
        ("results", 0, "envelope"),
        ("results", 0, "attempt_log"),
        ("results", 0, "attempt_log", 0, "stdout"),
    ],
    ids=lambda p: ".".join(map(str, p)),
)
def test_a_report_missing_a_defaulted_field_fails_cleanly(
    produced: Produced,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    path: tuple[str | int, ...],
) -> None:
    raw = raw_report(produced)
    node: Any = raw
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    edited = tmp_path / "report.json"
    edited.write_bytes(layout(raw))
    code, _ = verify_cli(capsys, edited)
    assert code in (1, 2)


# other repositories


@pytest.mark.parametrize("how", ["mirror", "clone"])
def test_verify_with_repo_pointing_at_a_clone_after_the_original_moved(
    make_repo: MakeRepo,
    write_agent: Callable[[str, str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    how: str,
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("writer", AGENT)
    plan = Plan.model_validate(plan_for(agent, {"one": "writer", "two": "writer"}))
    report: Report = anyio.run(lambda: orchestrate_parallel(plan, repo=repo))
    assert report.summary.successful == 2 and report.repo is not None
    relative = (Path(report.run_dir) / "report.json").relative_to(report.repo)
    clone = tmp_path / "elsewhere" / ("mirror.git" if how == "mirror" else "clone")
    if how == "mirror":
        git(repo, "clone", "--quiet", "--mirror", str(repo), str(clone))
    else:
        git(repo, "clone", "--quiet", str(repo), str(clone))
        git(
            clone,
            "fetch",
            "--quiet",
            "origin",
            "+refs/heads/orchestrator/*:refs/heads/orchestrator/*",
        )
    moved = tmp_path / "moved"
    Path(report.repo).rename(moved)
    report_path = moved / relative
    assert not Path(report.run_dir).exists()

    code, lines = verify_cli(capsys, report_path)
    assert code == 1 and has_finding(lines, None, "repo"), lines

    code, lines = verify_cli(capsys, report_path, "--repo", clone)
    assert code == 0, lines
    outcome = anyio.run(lambda: verify_report(report_path, repo=clone))
    assert outcome.ok and outcome.checked_commits == 2


def test_report_printed_by_run_json_verifies(
    make_repo: MakeRepo,
    write_agent: Callable[[str, str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("writer", AGENT)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan_for(agent, {"one": "writer"})))
    assert main(["run", str(plan_file), "--repo", str(repo), "--json"]) == 0
    saved = tmp_path / "saved" / "report.json"
    saved.parent.mkdir()
    saved.write_text(capsys.readouterr().out, encoding="utf-8")
    code, lines = verify_cli(capsys, saved)
    assert code == 0, lines


def test_a_report_written_before_usage_existed_still_verifies(tmp_path: Path) -> None:
    """A run directory made by the orchestrator before usage, prompt digests and usage totals
    were added (commit 2af9da6): its report reads back in its written form and verifies."""
    import shutil

    from envelopes import audit_report, load_report_file

    run_dir = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "reports" / "before-usage", run_dir)
    raw, report, source = load_report_file(run_dir / "report.json")
    assert "usage_by_model" not in raw and "usage" not in raw["summary"]
    assert report.results[0].usage is None
    assert audit_report(raw, run_dir=run_dir, source=source) == []
    outcome = anyio.run(verify_report, run_dir / "report.json")
    assert outcome.ok, [str(f) for f in outcome.findings]


def test_a_report_written_before_attempts_recorded_usage_still_verifies(tmp_path: Path) -> None:
    """A run of the orchestrator when a task's usage was its last attempt's, with an
    estimated cost (commit d46139c): no attempt carries usage, the report records no rates,
    and it verifies as it was written."""
    from envelopes import audit_report, load_report_file

    run_dir = tmp_path / "run"
    fixture = Path(__file__).parent / "fixtures" / "reports" / "before-attempt-usage"
    shutil.copytree(fixture, run_dir)
    raw, report, source = load_report_file(run_dir / "report.json")
    assert "pricing" not in raw
    assert all("usage" not in a for r in raw["results"] for a in r["attempt_log"])
    assert report.result("est").usage is not None
    assert report.result("est").usage.cost_source == "estimated"
    assert audit_report(raw, run_dir=run_dir, source=source) == []


@pytest.fixture(scope="module")
def priced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run whose agents report tokens but no cost, priced by the run's rates."""
    from envelopes import HandoffEnvelope, Rates, build_envelope
    from orchestrator import Workspace

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        return {"usage": {"input_tokens": 1000, "output_tokens": 10, "model": "m"}}

    state = tmp_path_factory.mktemp("priced")
    tasks = [build_envelope("a", "x", task_id=t, worktree=False, venv=False) for t in ("p", "q")]
    report = anyio.run(
        lambda: orchestrate_parallel(
            tasks,
            agents={"a": agent},
            state_dir=state,
            pricing={"m": Rates(input=3.0, output=15.0)},
        )
    )
    raw: dict[str, Any] = json.loads((Path(report.run_dir) / "report.json").read_text())
    return raw


def _reprice(raw: dict[str, Any]) -> None:
    raw["pricing"]["m"]["input"] = 30.0


def _drop_pricing(raw: dict[str, Any]) -> None:
    del raw["pricing"]


def _attempt_cost(raw: dict[str, Any]) -> None:
    result_of(raw, "p")["attempt_log"][0]["usage"]["cost_usd"] = 0.001


def _task_cost(raw: dict[str, Any]) -> None:
    result_of(raw, "p")["usage"]["cost_usd"] = 0.001


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (_reprice, "attempt_log[1].usage.cost_usd", "expected 0.03015, found 0.00315"),
        (_drop_pricing, "attempt_log[1].usage.cost_usd", "records no rates for model 'm'"),
        (_attempt_cost, "attempt_log[1].usage.cost_usd", "expected 0.00315, found 0.001"),
        (_task_cost, "usage", "'cost_usd': 0.00315"),
    ],
    ids=["rates changed", "rates dropped", "attempt's estimate", "task's sum"],
)
def test_an_estimated_cost_is_recomputed_from_the_reports_rates(
    priced: dict[str, Any], change: Callable[[dict[str, Any]], None], field: str, message: str
) -> None:
    from envelopes import audit_report

    raw = copy.deepcopy(priced)
    assert raw["pricing"] == {
        "m": {"input": 3.0, "output": 15.0, "cache_read": None, "cache_write": None}
    }
    assert audit_report(raw) == []
    change(raw)
    reseal(raw)
    found = [f for f in audit_report(raw) if f.task_id == "p" and f.field == field]
    assert found and message in found[0].message, audit_report(raw)
