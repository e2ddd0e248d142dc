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


def _partial_attempt(raw: dict[str, Any]) -> None:
    result_of(raw, "p")["attempt_log"][0]["usage"]["cost_source"] = "partial"


def _before_attempt_usage(raw: dict[str, Any]) -> None:
    # As a result written before attempts recorded usage: its own estimate, recomputed.
    result = result_of(raw, "p")
    del result["attempt_log"][0]["usage"]
    result["usage"]["cost_usd"] = 0.001


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (_partial_attempt, "attempt_log[1].usage.cost_source", "reported or estimated, never"),
        (_before_attempt_usage, "usage.cost_usd", "expected 0.00315, found 0.001"),
        (_reprice, "attempt_log[1].usage.cost_usd", "expected 0.03015, found 0.00315"),
        (_drop_pricing, "attempt_log[1].usage.cost_usd", "records no rates for model 'm'"),
        (_attempt_cost, "attempt_log[1].usage.cost_usd", "expected 0.00315, found 0.001"),
        (_task_cost, "usage", "'cost_usd': 0.00315"),
    ],
    ids=[
        "partial attempt",
        "before attempt usage",
        "rates changed",
        "rates dropped",
        "attempt's estimate",
        "task's sum",
    ],
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


def test_an_attempts_partial_cost_is_flagged_in_one_sentence(priced: dict[str, Any]) -> None:
    from envelopes import audit_report

    raw = copy.deepcopy(priced)
    _partial_attempt(raw)
    reseal(raw)
    assert [str(f) for f in audit_report(raw) if f.field.endswith(".cost_source")] == [
        "task p: attempt_log[1].usage.cost_source: "
        "an attempt's cost is reported or estimated, never partial"
    ]


# crafted reports: the audit alone (envelopes), on reports no run made
#
# Each report is sealed as a forger would seal it and has the shape of a real one (it
# validates), so that what flags it is the audit's own cross-check, named in one line.

CRAFT_BASE = "b" * 40


def _oid(n: int) -> str:
    return f"{n:040x}"


def crafted_result(
    task_id: str,
    status: str = "succeeded",
    *,
    commit: str | None = None,
    base: str | None = CRAFT_BASE,
    group: str | None = None,
    depends_on: tuple[str, ...] = (),
    error_kind: str | None = None,
    checks: tuple[dict[str, Any], ...] = (),
    hooks: tuple[dict[str, Any], ...] = (),
) -> Any:
    """A sealed TaskResult as the orchestrator makes one, without a run."""
    from datetime import UTC, datetime

    from envelopes import AgentInfo, ErrorInfo, Provenance, TaskResult, Timings, seal_result

    if error_kind is None and status not in ("succeeded", "cached"):
        error_kind = "exit_code"
    error = ErrorInfo(kind=error_kind, message="no luck") if error_kind else None  # type: ignore[arg-type]
    output = {"task": task_id} if error is None else None
    info = AgentInfo(kind="command", command=["python", "agent.py"])
    at = datetime(2026, 11, 22, 5, 54, 31, tzinfo=UTC)
    result = TaskResult.model_validate(
        {
            "task_id": task_id,
            "agent": "coder",
            "status": status,
            "attempts": 0,
            "output": output,
            "error": error,
            "timings": Timings(started_at=at, finished_at=at, duration_s=0.0),
            "group": group,
            "depends_on": list(depends_on),
            "checks": list(checks),
            "hooks": list(hooks),
            "provenance": Provenance(
                envelope_sha256="e" * 64,
                base_commit=base,
                result_commit=commit,
                result_tree=_oid(0xEE) if commit else None,
                agent=info,
                agent_sha256=digest(info.model_dump(mode="json")),
                output_sha256=digest(output),
            ),
        }
    )
    return seal_result(result)


def crafted_report(results: list[Any], **options: Any) -> dict[str, Any]:
    """The JSON object of a sealed report of *results* (see orchestrator.report)."""
    from datetime import UTC, datetime

    from orchestrator.report import aggregate_results

    at = datetime(2026, 11, 22, 5, 54, 31, tzinfo=UTC)
    settings: dict[str, Any] = {
        "run_id": "20261122-055431-8c6b7f",
        "plan_name": "crafted",
        "plan_sha256": "a" * 64,
        "repo": None,
        "base_ref": "HEAD",
        "base_commit": CRAFT_BASE,
        "run_dir": Path("/nonexistent/run"),
        "started_at": at,
        "finished_at": at,
    }
    raw: dict[str, Any] = aggregate_results(results, **(settings | options)).to_json_dict()
    return raw


def audited(raw: dict[str, Any], *, run_dir: Path | None = None) -> list[str]:
    """The findings of the audit of *raw* in its written form (what a valid report reads
    back as: empty additions left out), re-sealed; as ``verify`` prints them."""
    from envelopes import audit_report

    written = Report.model_validate(raw).to_json_dict()  # the shape of a real report
    reseal(written)
    return [str(f) for f in audit_report(written, run_dir=run_dir)]


def step(
    name: str,
    *,
    exit_code: int | None = 0,
    passed: bool | None = None,
    required: bool = True,
    turn: int = 1,
    phase: str = "check",
    timed_out: bool = False,
    stdout: dict[str, Any] | None = None,
    stderr: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A check (or setup step, or hook) record; ``passed`` as its exit code says unless given."""
    return {
        "name": name,
        "phase": phase,
        "turn": turn,
        "command": ["make", name],
        "exit_code": exit_code,
        "passed": (exit_code == 0 and not timed_out) if passed is None else passed,
        "required": required,
        "timed_out": timed_out,
        "duration_s": 0.5,
        "stdout": stdout,
        "stderr": stderr,
    }


def merged_report(*, failed: str | None = None) -> dict[str, Any]:
    """Results a, b and c (one failed if named), and a record of a and b merged into main:
    old commit, then a merge commit for each."""
    results = [
        crafted_result(t, "failed" if t == failed else "succeeded", commit=_oid(i))
        for i, t in enumerate(("a", "b", "c"), start=1)
    ]
    raw = crafted_report(results)
    raw["merge"] = [
        {
            "into": "main",
            "status": "merged",
            "old_commit": CRAFT_BASE,
            "new_commit": _oid(0xB2),
            "tasks": [
                {"task_id": "a", "result_commit": _oid(1), "merge_commit": _oid(0xA1)},
                {"task_id": "b", "result_commit": _oid(2), "merge_commit": _oid(0xB2)},
            ],
            "conflicts": [],
            "message": "",
            "at": raw["finished_at"],
        }
    ]
    return raw


def test_a_crafted_report_with_a_consistent_merge_record_audits_clean() -> None:
    assert audited(merged_report()) == []
    raw = merged_report()
    # A result the target already held has no merge commit: the chain skips it.
    raw["merge"][0]["tasks"][1]["merge_commit"] = None
    raw["merge"][0]["new_commit"] = _oid(0xA1)
    assert audited(raw) == []


def _merge_of(raw: dict[str, Any]) -> dict[str, Any]:
    merge: dict[str, Any] = raw["merge"][0]
    return merge


MERGE_TAMPERS: dict[str, tuple[Callable[[dict[str, Any]], None], list[str]]] = {
    "other result commit": (
        lambda m: m["tasks"][1].update(result_commit=_oid(3)),
        [f"task b: merge[0].result_commit: expected '{_oid(2)}', found '{_oid(3)}'"],
    ),
    "task not in the report": (
        lambda m: m["tasks"][1].update(task_id="ghost"),
        ["merge[0]: task ghost is not in the report"],
    ),
    "listed twice": (
        lambda m: m["tasks"].insert(1, dict(m["tasks"][0], merge_commit=None)),
        ["task a: merge[0]: listed 2 times"],
    ),
    "no new commit": (
        lambda m: m.update(new_commit=None),
        ["merge[0]: a merged record without its old and new commit"],
    ),
    "no old commit": (
        lambda m: m.update(old_commit=None),
        ["merge[0]: a merged record without its old and new commit"],
    ),
    "new commit not the end of the chain": (
        lambda m: m.update(new_commit=_oid(0xA1)),
        [f"merge[0].new_commit: expected '{_oid(0xB2)}', found '{_oid(0xA1)}'"],
    ),
    "no merge commit but moved": (
        lambda m: [e.update(merge_commit=None) for e in m["tasks"]],
        [f"merge[0].new_commit: expected '{CRAFT_BASE}', found '{_oid(0xB2)}'"],
    ),
}


@pytest.mark.parametrize("name", list(MERGE_TAMPERS))
def test_a_merge_record_that_disagrees_with_the_results_is_flagged(name: str) -> None:
    change, expected = MERGE_TAMPERS[name]
    raw = merged_report()
    change(_merge_of(raw))
    assert audited(raw) == expected


def test_a_merged_record_of_a_failed_task_is_flagged_but_not_a_conflict() -> None:
    raw = merged_report(failed="b")
    assert audited(raw) == ["task b: merge[0]: merged, but the task's status is failed"]
    # A task the report does not hold, listed first, hides none of those after it.
    ghost = {"task_id": "ghost", "result_commit": _oid(7), "merge_commit": None}
    _merge_of(raw)["tasks"].insert(0, ghost)
    assert audited(raw) == [
        "merge[0]: task ghost is not in the report",
        "task b: merge[0]: merged, but the task's status is failed",
    ]
    # A record that did not merge (a conflict) may name any task, and has no commits to chain.
    raw = merged_report(failed="b")
    _merge_of(raw).update(status="conflict", new_commit=None)
    assert audited(raw) == []


def checked_merge(mode: str) -> dict[str, Any]:
    """A checked merge of a and b: each tree checked and passed (``check``: one check of the
    tree of both; ``train``: one for each result added)."""
    raw = merged_report()
    merge = _merge_of(raw)
    merge["mode"] = mode
    if mode == "check":
        merge["checks"] = [
            {"task_id": None, "commit": _oid(0xB2), "passed": True, "checks": [step("test")]}
        ]
    else:
        merge["checks"] = [
            {"task_id": t, "commit": c, "passed": True, "checks": [step("test")]}
            for t, c in (("a", _oid(0xA1)), ("b", _oid(0xB2)))
        ]
    merge["left_out"] = []
    return raw


def _fail_check(number: int) -> Callable[[dict[str, Any]], None]:
    def change(merge: dict[str, Any]) -> None:
        merge["checks"][number].update(passed=False, checks=[step("test", exit_code=1)])

    return change


def _train_left_out_b(merge: dict[str, Any]) -> None:
    # b's check failed and b was left out: the target moved to a's merge only.
    _fail_check(1)(merge)
    merge["tasks"].pop()
    merge["new_commit"] = _oid(0xA1)
    merge["left_out"] = [{"task_id": "b", "reason": "its check failed"}]


CHECKED_TAMPERS: dict[str, tuple[str, Callable[[dict[str, Any]], None], list[str]]] = {
    "consistent check": ("check", lambda m: None, []),
    "consistent train": ("train", lambda m: None, []),
    "train leaving out a failed check": ("train", _train_left_out_b, []),
    "no mode, checks": (
        "check",
        lambda m: m.update(mode=None),
        ["merge[0].mode: checks recorded, but no check mode"],
    ),
    "no mode, left out only": (
        "train",
        lambda m: m.update(mode=None, checks=[], left_out=[{"task_id": "c", "reason": "x"}]),
        ["merge[0].mode: checks recorded, but no check mode"],
    ),
    "no mode, check_failed": (
        "check",
        lambda m: m.update(mode=None, checks=[], status="check_failed", new_commit=None, tasks=[]),
        ["merge[0].mode: checks recorded, but no check mode"],
    ),
    "step passed with exit code 1": (
        "check",
        lambda m: m["checks"][0]["checks"].append(step("lint", exit_code=1, passed=True)),
        ["merge[0].checks[0].checks[1].passed: expected False, found True"],
    ),
    "step passed though timed out": (
        "train",
        lambda m: m["checks"][1]["checks"].append(step("lint", timed_out=True, passed=True)),
        ["task b: merge[0].checks[1].checks[1].passed: expected False, found True"],
    ),
    "step failed with exit code 0": (
        "train",
        lambda m: m["checks"][0]["checks"].append(step("lint", passed=False, required=False)),
        ["task a: merge[0].checks[0].checks[1].passed: expected True, found False"],
    ),
    "check passed though a required step failed": (
        "train",
        lambda m: m["checks"][0]["checks"].append(step("lint", exit_code=2)),
        ["task a: merge[0].checks[0].passed: expected False, found True"],
    ),
    "an optional step failed": (
        "train",
        lambda m: m["checks"][0]["checks"].append(step("lint", exit_code=2, required=False)),
        [],
    ),
    "check failed though its steps passed": (
        "check",
        lambda m: m["checks"][0].update(passed=False),
        [
            "merge[0].checks[0].passed: expected True, found False",
            f"merge[0].checks: merged into {_oid(0xB2)}, but no passing check of that tree",
        ],
    ),
    "left out, not in the report": (
        "train",
        lambda m: m["left_out"].append({"task_id": "ghost", "reason": "x"}),
        ["merge[0].left_out: task ghost is not in the report"],
    ),
    "left out and merged": (
        "train",
        lambda m: (
            m["left_out"].append({"task_id": "c", "reason": "x"})
            or m["left_out"].append({"task_id": "a", "reason": "x"})
        ),
        [
            "task a: merge[0].left_out: left out, but listed among the tasks merged",
            "task a: merge[0].checks: its check passed, but it is left out",
        ],
    ),
    "check mode, moved to an unchecked tree": (
        "check",
        lambda m: m["checks"][0].update(commit=_oid(0xA1)),
        [f"merge[0].checks: merged into {_oid(0xB2)}, but no passing check of that tree"],
    ),
    "check mode, nothing moved": (
        "check",
        lambda m: m.update(tasks=[], new_commit=CRAFT_BASE, checks=[]),
        [],
    ),
    "check mode, a conflict before any check": (
        "check",
        lambda m: m.update(status="conflict", new_commit=None, checks=[]),
        [],
    ),
    "train, nothing to check": (
        "train",
        lambda m: m.update(tasks=[], new_commit=CRAFT_BASE, checks=[]),
        [],
    ),
    "check mode, check_failed with no failed check": (
        "check",
        lambda m: m.update(status="check_failed"),
        ["merge[0].checks: check_failed, but no check failed"],
    ),
    "check mode, check_failed as recorded": (
        "check",
        lambda m: _fail_check(0)(m) or m.update(status="check_failed"),
        [],
    ),
    "train, merged as an unchecked tree": (
        "train",
        lambda m: m["checks"][1].update(commit=_oid(0xA1)),
        [f"task b: merge[0].checks: merged as {_oid(0xB2)}, but no passing check of that tree"],
    ),
    "train, checked as another task": (
        "train",
        lambda m: m["checks"][1].update(task_id="c"),
        [
            f"task b: merge[0].checks: merged as {_oid(0xB2)}, but no passing check of that tree",
        ],
    ),
    "train, failed check not left out": (
        "train",
        lambda m: (
            _fail_check(1)(m)
            or m["tasks"][1].update(merge_commit=None)
            or m.update(new_commit=_oid(0xA1))
        ),
        ["task b: merge[0].checks: its check failed, but it is not left out"],
    ),
    "train, check_failed with a result merged": (
        "train",
        lambda m: (
            _train_left_out_b(m)
            or m.update(status="check_failed", new_commit=None, old_commit=CRAFT_BASE)
        ),
        ["merge[0].checks: check_failed, but a result was merged"],
    ),
    "train, check_failed with a new commit": (
        "train",
        lambda m: (
            [_fail_check(i)(m) for i in (0, 1)]
            and m.update(
                status="check_failed",
                tasks=[],
                left_out=[{"task_id": t, "reason": "x"} for t in ("a", "b")],
            )
        ),
        ["merge[0].checks: check_failed, but a result was merged"],
    ),
}


@pytest.mark.parametrize("name", list(CHECKED_TAMPERS))
def test_a_checked_merge_agrees_with_its_checks(name: str) -> None:
    """What a checked merge did (moved, left out, failed) is what its recorded checks say."""
    mode, change, expected = CHECKED_TAMPERS[name]
    raw = checked_merge(mode)
    change(_merge_of(raw))
    assert audited(raw) == expected


def grouped_report(select: str) -> dict[str, Any]:
    """Members g[a] (failed), g[b] and g[c] (succeeded) of group g, and a task outside it."""
    results = [
        crafted_result("g[a]", "failed", group="g"),
        crafted_result("g[b]", group="g"),
        crafted_result("g[c]", group="g"),
        crafted_result("solo"),
    ]
    return crafted_report(results, groups={"g": (select, None)})


def _group(raw: dict[str, Any]) -> dict[str, Any]:
    group: dict[str, Any] = raw["groups"]["g"]
    return group


GROUP_TAMPERS: dict[str, tuple[str, Callable[[dict[str, Any]], None], list[str]]] = {
    "all, as made": ("all", lambda raw: None, []),
    "first_success, as made": ("first_success", lambda raw: None, []),
    "member not in the report": (
        "all",
        lambda raw: _group(raw)["members"].append({"task_id": "ghost", "status": "failed"}),
        [
            "groups.g: member ghost is not in the report",
            "groups.g.members: expected ['g[a]', 'g[b]', 'g[c]'], "
            "found ['g[a]', 'g[b]', 'g[c]', 'ghost']",
        ],
    ),
    "member status": (
        "all",
        lambda raw: _group(raw)["members"][0].update(status="succeeded"),
        [
            "task g[a]: groups.g.status: expected 'failed', found 'succeeded'",
            "groups.g.selected: expected ['g[a]', 'g[b]', 'g[c]'], found ['g[b]', 'g[c]']",
        ],
    ),
    "member of another group": (
        "all",
        lambda raw: _group(raw)["members"].append({"task_id": "solo", "status": "succeeded"}),
        [
            "task solo: group: listed in group g but its result says None",
            "groups.g.members: expected ['g[a]', 'g[b]', 'g[c]'], "
            "found ['g[a]', 'g[b]', 'g[c]', 'solo']",
            "groups.g.selected: expected ['g[b]', 'g[c]', 'solo'], found ['g[b]', 'g[c]']",
        ],
    ),
    "member whose result names another group": (
        "all",
        lambda raw: (
            result_of(raw, "solo").update(group="h"),
            _group(raw)["members"].append({"task_id": "solo", "status": "succeeded"}),
        ),
        [
            "task solo: group: listed in group g but its result says 'h'",
            "groups.g.members: expected ['g[a]', 'g[b]', 'g[c]'], "
            "found ['g[a]', 'g[b]', 'g[c]', 'solo']",
            "groups.g.selected: expected ['g[b]', 'g[c]', 'solo'], found ['g[b]', 'g[c]']",
        ],
    ),
    "member not in the report listed first": (
        "all",
        lambda raw: (
            _group(raw)["members"].insert(0, {"task_id": "ghost", "status": "failed"}),
            _group(raw)["members"][1].update(status="succeeded"),
        ),
        [
            "groups.g: member ghost is not in the report",
            "task g[a]: groups.g.status: expected 'failed', found 'succeeded'",
            "groups.g.members: expected ['g[a]', 'g[b]', 'g[c]'], "
            "found ['g[a]', 'g[b]', 'g[c]', 'ghost']",
            "groups.g.selected: expected ['g[a]', 'g[b]', 'g[c]'], found ['g[b]', 'g[c]']",
        ],
    ),
    "member left out": (
        "all",
        lambda raw: _group(raw)["members"].pop(0),
        ["groups.g.members: expected ['g[a]', 'g[b]', 'g[c]'], found ['g[b]', 'g[c]']"],
    ),
    "all, one selected": (
        "all",
        lambda raw: _group(raw).update(selected=["g[b]"]),
        ["groups.g.selected: expected ['g[b]', 'g[c]'], found ['g[b]']"],
    ),
    "first_success, two selected": (
        "first_success",
        lambda raw: _group(raw).update(selected=["g[b]", "g[c]"]),
        ["groups.g.selected: first_success selects one succeeded member, found ['g[b]', 'g[c]']"],
    ),
    "first_success, a failed member selected": (
        "first_success",
        lambda raw: _group(raw).update(selected=["g[a]"]),
        ["groups.g.selected: first_success selects one succeeded member, found ['g[a]']"],
    ),
    "first_success, the other succeeded member": (
        "first_success",
        lambda raw: _group(raw).update(selected=["g[c]"]),
        [],
    ),
    "first_success, none selected": (
        "first_success",
        lambda raw: _group(raw).update(selected=[]),
        ["groups.g.selected: a member succeeded but none is selected"],
    ),
}


@pytest.mark.parametrize("name", list(GROUP_TAMPERS))
def test_a_group_agrees_with_its_members_results(name: str) -> None:
    select, change, expected = GROUP_TAMPERS[name]
    raw = grouped_report(select)
    change(raw)
    assert audited(raw) == expected


def test_a_first_success_group_with_no_success_selects_nothing() -> None:
    results = [crafted_result(f"g[{x}]", "failed", group="g") for x in "ab"]
    raw = crafted_report(results, groups={"g": ("first_success", None)})
    assert audited(raw) == []


def with_checks(
    *checks: dict[str, Any], status: str = "succeeded", kind: str | None = None
) -> dict[str, Any]:
    return crafted_report([crafted_result("t", status, error_kind=kind, checks=checks)])


def with_hooks(
    *hooks: dict[str, Any], status: str = "succeeded", kind: str | None = None
) -> dict[str, Any]:
    return crafted_report([crafted_result("t", status, error_kind=kind, hooks=hooks)])


STEP_CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "checks passed": (with_checks(step("lint"), step("test", phase="setup")), []),
    "a check passed with exit code 1": (
        with_checks(step("lint", exit_code=1, passed=True)),
        ["task t: checks[0].passed: expected False, found True"],
    ),
    "a check passed though it timed out": (
        with_checks(step("lint"), step("test", timed_out=True, passed=True)),
        ["task t: checks[1].passed: expected False, found True"],
    ),
    "a check failed with exit code 0": (
        with_checks(step("lint", passed=False, required=False)),
        ["task t: checks[0].passed: expected True, found False"],
    ),
    "succeeded past a failed required check": (
        with_checks(step("lint", exit_code=1), step("test", exit_code=1)),
        ["task t: status: succeeded, but its required lint, test did not pass"],
    ),
    "succeeded past a failed optional check": (
        with_checks(step("lint", exit_code=1, required=False)),
        [],
    ),
    "a check failed on an earlier turn only": (
        with_checks(step("test", exit_code=1), step("test", turn=2)),
        [],
    ),
    "failed with kind check, the last turn's check passed": (
        with_checks(step("test", exit_code=1), step("test", turn=2), status="failed", kind="check"),
        ["task t: error: failed with kind check, but every required step of its last turn passed"],
    ),
    "failed with kind setup, every step passed": (
        with_checks(step("deps", phase="setup"), status="failed", kind="setup"),
        ["task t: error: failed with kind setup, but every required step of its last turn passed"],
    ),
    "failed with kind check, as recorded": (
        with_checks(step("test", exit_code=1), status="failed", kind="check"),
        [],
    ),
    "failed with another kind, every check passed": (
        with_checks(step("test"), status="failed", kind="exit_code"),
        [],
    ),
    "hooks passed": (with_hooks(step("after_create", phase="hook")), []),
    "a hook passed with exit code 1": (
        with_hooks(step("after_create", phase="hook", exit_code=1, passed=True, required=False)),
        ["task t: hooks[0].passed: expected False, found True"],
    ),
    "succeeded past a failed required hook": (
        with_hooks(step("before_run", phase="hook", exit_code=1)),
        ["task t: status: succeeded, but its hook before_run did not pass"],
    ),
    "succeeded past two failed required hooks": (
        with_hooks(
            step("after_create", phase="hook", exit_code=1),
            step("before_run", phase="hook", exit_code=1),
        ),
        ["task t: status: succeeded, but its hook after_create, before_run did not pass"],
    ),
    "succeeded past a failed optional hook": (
        with_hooks(step("after_run", phase="hook", exit_code=1, required=False)),
        [],
    ),
    "a required hook failed on an earlier turn only": (
        with_hooks(
            step("before_run", phase="hook", exit_code=1),
            step("before_run", phase="hook", turn=2),
            step("after_run", phase="hook", turn=3, exit_code=1, required=False),
        ),
        [],
    ),
    "failed with kind hook, every required hook passed": (
        with_hooks(
            step("before_run", phase="hook"),
            step("after_run", phase="hook", exit_code=1, required=False),
            status="failed",
            kind="hook",
        ),
        ["task t: error: failed with kind hook, but every required hook of its last turn passed"],
    ),
    "failed with kind hook, as recorded": (
        with_hooks(step("before_run", phase="hook", exit_code=1), status="failed", kind="hook"),
        [],
    ),
}


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_a_tasks_status_agrees_with_its_checks_and_hooks(name: str) -> None:
    """Each step's ``passed`` is what its exit code says; a succeeded task passed its required
    checks and hooks of its last turn; one failed for them did not."""
    raw, expected = STEP_CASES[name]
    assert audited(copy.deepcopy(raw)) == expected


def started_report(*, base: str | None, depends_on: tuple[str, ...]) -> dict[str, Any]:
    """a and b done (b, and b2 with the same result, from a's result), members g[x] and
    g[y] of group g, and c, which started from *base* after *depends_on*."""
    results = [
        crafted_result("a", commit=_oid(1)),
        crafted_result("b", commit=_oid(2), base=_oid(1), depends_on=("a",)),
        crafted_result("g[x]", "failed", group="g"),
        crafted_result("g[y]", commit=_oid(3), group="g"),
        crafted_result("n", commit=None),
        crafted_result("b2", commit=_oid(2), base=_oid(1), depends_on=("a",)),
        crafted_result("c", commit=_oid(4), base=base, depends_on=depends_on),
    ]
    return crafted_report(results, groups={"g": ("all", None)})


START_CASES: dict[str, tuple[str | None, tuple[str, ...], list[str]]] = {
    "from the run's base": (CRAFT_BASE, (), []),
    "from elsewhere, no dependency": (
        _oid(9),
        (),
        [f"task c: provenance.base_commit: expected '{CRAFT_BASE}', found '{_oid(9)}'"],
    ),
    "from its dependency's result": (_oid(2), ("b",), []),
    "from the run's base, after a dependency": (
        CRAFT_BASE,
        ("b",),
        [f"task c: provenance.base_commit: expected '{_oid(2)}', found '{CRAFT_BASE}'"],
    ),
    "from a group's selected member": (_oid(3), ("g",), []),
    "from the run's base, after a group": (
        CRAFT_BASE,
        ("g",),
        [f"task c: provenance.base_commit: expected '{_oid(3)}', found '{CRAFT_BASE}'"],
    ),
    "after a dependency with no commit": (CRAFT_BASE, ("n",), []),
    "after one result named twice": (_oid(2), ("b", "b"), []),
    "after several: a merge, checked in git": (_oid(9), ("a", "b"), []),
    "after two results of one commit": (
        CRAFT_BASE,
        ("b", "b2"),
        [f"task c: provenance.base_commit: expected '{_oid(2)}', found '{CRAFT_BASE}'"],
    ),
    "after a task not in the report": (
        _oid(2),
        ("b", "ghost"),
        ["task c: depends_on: names tasks not in the report: ['ghost']"],
    ),
}


@pytest.mark.parametrize("name", list(START_CASES))
def test_a_task_started_from_the_base_or_its_dependencies_results(name: str) -> None:
    base, depends_on, expected = START_CASES[name]
    assert audited(started_report(base=base, depends_on=depends_on)) == expected


def _logged(run_dir: Path, name: str, data: bytes, **extra: Any) -> dict[str, Any]:
    (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / name).write_bytes(data)
    return {"path": name, "sha256": sha256_hex(data), "size": len(data), **extra}


def test_the_logs_of_steps_and_merge_checks_are_hashed_in_the_run_directory(
    tmp_path: Path,
) -> None:
    """With the run directory, every step's logs (checks, hooks, a merge's checks) are what
    they recorded, and only an envelope may be a record of envelopes.jsonl."""
    run_dir = tmp_path / "run"
    plan = _logged(run_dir, "plan.json", b"{}")
    records = _logged(run_dir, "envelopes.jsonl", b'{"task_id":"t"}\n')
    lint = step("lint", stdout=_logged(run_dir, "logs/t.lint.stdout", b"lint ok\n"))
    lint["stderr"] = {**records, "offset": 0}  # a log that claims to be an envelope's record
    hook = step("before_run", phase="hook", stdout=_logged(run_dir, "logs/t.hook.stdout", b"h"))
    hook["stderr"] = {"path": "logs/t.hook.stderr", "sha256": "0" * 64, "size": 0}
    results = [crafted_result(t, commit=_oid(i)) for i, t in enumerate("abc", start=1)]
    results.append(crafted_result("t", checks=(lint,), hooks=(hook,)))
    raw = crafted_report(results, plan_sha256=plan["sha256"])
    result_of(raw, "t")["envelope"] = {**records, "path": "envelopes/t.json", "offset": 0}
    raw["merge"] = checked_merge("train")["merge"]
    merge_step = raw["merge"][0]["checks"][1]["checks"][0]
    merge_step["stdout"] = _logged(run_dir, "merge/1.stdout", b"tested\n")
    merge_step["stderr"] = _logged(run_dir, "merge/1.stderr", b"")
    (run_dir / "merge" / "1.stdout").write_bytes(b"Tested\n")
    recorded, found = sha256_hex(b"tested\n"), sha256_hex(b"Tested\n")
    assert audited(raw, run_dir=run_dir) == [
        "task t: envelope.offset: only an envelope is a record (of envelopes.jsonl), "
        "not 'envelopes/t.json'",
        "task t: checks[0].stderr.offset: only an envelope is a record (of envelopes.jsonl), "
        "not 'envelopes.jsonl'",
        f"task t: hooks[0].stderr: cannot read 'logs/t.hook.stderr' in {run_dir}: "
        "No such file or directory",
        f"task b: merge[0].checks[1].checks[0].stdout.sha256: expected '{recorded}', "
        f"found '{found}'",
    ]


def _envelope_records(run_dir: Path, *envelopes: dict[str, Any]) -> list[dict[str, Any]]:
    """Write *envelopes* as the records of envelopes.jsonl, one a line; their LogFile entries."""
    entries, data = [], b""
    for envelope in envelopes:
        record = canonical_json(envelope)
        entries.append(
            {
                "path": "envelopes.jsonl",
                "sha256": sha256_hex(record),
                "size": len(record),
                "offset": len(data),
            }
        )
        data += record + b"\n"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "envelopes.jsonl").write_bytes(data)
    return entries


def _with_envelope(
    raw: dict[str, Any], task_id: str, entry: dict[str, Any], envelope: dict[str, Any]
) -> None:
    result = result_of(raw, task_id)
    result["envelope"] = entry
    result["provenance"]["envelope_sha256"] = digest(envelope)


def test_an_envelope_record_of_another_task_is_flagged(tmp_path: Path) -> None:
    """Each record of envelopes.jsonl is read at its offset: a result pointing at another
    task's record, sealed and hashed as that record, still names the wrong task."""
    run_dir = tmp_path / "run"
    plan = _logged(run_dir, "plan.json", b"{}")
    envelopes = [{"task_id": "t", "task": "do t"}, {"task_id": "u", "task": "do u"}]
    for_t, for_u = _envelope_records(run_dir, *envelopes)
    raw = crafted_report([crafted_result("t"), crafted_result("u")], plan_sha256=plan["sha256"])
    _with_envelope(raw, "t", for_t, envelopes[0])
    _with_envelope(raw, "u", for_u, envelopes[1])
    assert audited(raw, run_dir=run_dir) == []
    _with_envelope(raw, "t", for_u, envelopes[1])
    assert audited(raw, run_dir=run_dir) == ["task t: envelope.task_id: expected 'u', found 't'"]


def told(*checks: Any) -> dict[str, Any]:
    return {"task_id": "t", "task": "do t", "checks": list(checks)}


AS_TOLD_CASES: dict[str, tuple[dict[str, Any], list[dict[str, Any]], str, list[str]]] = {
    "every required check passed": (
        told(
            {"name": "lint"}, {"name": "test", "required": True}, {"name": "x", "required": False}
        ),
        [step("lint"), step("test")],
        "succeeded",
        [],
    ),
    "a required check not recorded": (
        told({"name": "lint"}, {"name": "test"}),
        [step("lint")],
        "succeeded",
        ["test"],
    ),
    "no check recorded": (
        told({"name": "lint"}, {"name": "test"}),
        [],
        "succeeded",
        ["lint, test"],
    ),
    "passed on an earlier turn only": (
        told({"name": "lint"}, {"name": "test"}),
        [step("lint"), step("test"), step("lint", turn=2)],
        "succeeded",
        ["test"],
    ),
    "passed only as a setup step": (
        told({"name": "test"}),
        [step("test", phase="setup")],
        "succeeded",
        ["test"],
    ),
    "recorded, but not passed": (
        told({"name": "test"}),
        [step("test", exit_code=1, required=False)],
        "succeeded",
        ["test"],
    ),
    "a failed task is not held to them": (told({"name": "test"}), [], "failed", []),
    "checks that are not a list": ({"task_id": "t", "checks": "test"}, [], "succeeded", []),
    "a check that is not an object": (told("test", {"name": "lint"}), [], "succeeded", ["lint"]),
}


@pytest.mark.parametrize("name", list(AS_TOLD_CASES))
def test_a_succeeded_task_passed_the_checks_its_envelope_names(name: str, tmp_path: Path) -> None:
    """The envelope file says what the run was told to check: check records rewritten or
    dropped from the report do not hide a required check that did not pass."""
    envelope, checks, status, missing = AS_TOLD_CASES[name]
    run_dir = tmp_path / "run"
    plan = _logged(run_dir, "plan.json", b"{}")
    entry = _logged(run_dir, "envelopes/t.json", canonical_json(envelope))
    raw = crafted_report([crafted_result("t", status, checks=tuple(checks))])
    raw["plan_sha256"] = plan["sha256"]
    _with_envelope(raw, "t", entry, envelope)
    expected = [
        f"task t: checks: succeeded without passing its required {names} "
        "(as its envelope names them) on its last turn"
        for names in missing
    ]
    assert audited(raw, run_dir=run_dir) == expected
    # Without the run directory, nothing says what the run was told.
    assert audited(raw) == []


def test_a_result_from_before_attempt_usage_is_not_held_to_rates_it_has_none_of(
    priced: dict[str, Any],
) -> None:
    from envelopes import audit_report

    raw = copy.deepcopy(priced)
    for result in raw["results"]:
        del result["attempt_log"][0]["usage"]
    del raw["pricing"]
    reseal(raw)
    assert [str(f) for f in audit_report(raw)] == []


def _without(*path: str | int) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        node: Any = raw
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return change


def _attempts_as_float(raw: dict[str, Any]) -> None:
    raw["results"][0]["attempts"] = 0.0  # pydantic takes it as 0; the orchestrator writes 0


def _exploded(raw: dict[str, Any]) -> None:
    raw["results"][0]["status"] = "exploded"


NOT_A_REPORT: dict[str, tuple[bytes | Callable[[dict[str, Any]], None] | None, str]] = {
    "missing": (None, "cannot read {path}: No such file or directory"),
    "not JSON": (b"not JSON\n", "{path} is not JSON: Expecting value: line 1 column 1 (char 0)"),
    "number out of range": (b'{"x": 1e999}', "{path} is not JSON: number 1e999 is out of range"),
    "no schema": (b"[]", "{path} is not a worktree-orchestrator report (no report schema tag)"),
    "duplicate key": (b'{"schema": 1, "schema": 2}', "duplicate key 'schema' in a JSON object"),
    "bad status": (_exploded, "{path} is not a valid report: results.0.status: Input should be"),
    "a result's error left out": (
        _without("results", 0, "error"),
        "{path} is not a complete report: results[0].error is missing or not in its written form",
    ),
    "a count left out": (
        _without("summary", "skipped"),
        "{path} is not a complete report: summary.skipped is missing or not in its written form",
    ),
    "groups left out": (
        _without("groups"),
        "{path} is not a complete report: groups is missing or not in its written form",
    ),
    "a nested default left out": (
        _without("results", 0, "provenance", "agent", "program"),
        "{path} is not a complete report: results[0].provenance.agent.program is missing or "
        "not in its written form",
    ),
    "a number coerced": (
        _attempts_as_float,
        "{path} is not a complete report: results[0].attempts is missing or not in its "
        "written form",
    ),
}


@pytest.mark.parametrize("name", list(NOT_A_REPORT))
def test_what_is_not_a_report_as_written_says_why_in_one_line(tmp_path: Path, name: str) -> None:
    from envelopes import NotAReport, load_report_json

    content, message = NOT_A_REPORT[name]
    path = tmp_path / "report.json"
    if callable(content):
        raw = crafted_report([crafted_result("t")])
        content(raw)
        reseal(raw, results=False)
        content = layout(raw)
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(NotAReport) as caught:
        load_report_json(path)
    assert str(caught.value).startswith(message.format(path=path)), caught.value


def test_a_report_larger_than_the_cap_is_not_read(tmp_path: Path) -> None:
    from envelopes import NotAReport, load_report_json

    path = tmp_path / "report.json"
    path.write_bytes(layout(crafted_report([crafted_result("t")])))
    assert load_report_json(path)[1].results[0].task_id == "t"
    with pytest.raises(NotAReport, match=f"^cannot read {path}: larger than 100 bytes$"):
        load_report_json(path, max_bytes=100)


def test_an_empty_report_audits_clean_in_its_written_layout() -> None:
    from envelopes import audit_report, report_layout

    raw = crafted_report([])
    assert audited(raw) == []
    assert report_layout(raw) == layout(raw)
    assert '  "results": [],' in report_layout(raw).decode()
    assert audit_report(raw, source=layout(raw)) == []


def test_every_status_twice_is_counted_twice() -> None:
    statuses = ["succeeded", "cached", "failed", "timed_out", "cancelled", "skipped"]
    kinds = {"timed_out": "timeout", "cancelled": "cancelled", "skipped": "dependency"}
    results = [
        crafted_result(f"{status}-{i}", status, error_kind=kinds.get(status))
        for status in statuses
        for i in (1, 2)
    ]
    raw = crafted_report(results)
    assert raw["results_by_agent"]["coder"]["cached"] == 2
    assert raw["summary"]["timeout"] == 2
    assert audited(raw) == []


def _attempted(
    raw: dict[str, Any],
    status: str,
    *,
    stdout: dict[str, Any] | None = None,
    error_kind: str | None = None,
) -> dict[str, Any]:
    """Give the one result of *raw* one attempt that ended *status* (its logs: *stdout*)."""
    result: dict[str, Any] = raw["results"][0]
    at = result["timings"]["started_at"]
    error = {"kind": error_kind, "message": "no luck", "paths": []} if error_kind else None
    result["attempt_log"] = [
        {
            "number": 1,
            "status": status,
            "started_at": at,
            "finished_at": at,
            "duration_s": 0.0,
            "exit_code": None,
            "error": error,
            "stdout": stdout,
            "stderr": None,
        }
    ]
    result["attempts"] = 1
    result["provenance"]["stdout_sha256"] = stdout["sha256"] if stdout else None
    return result


ATTEMPT_CASES: dict[str, tuple[str, str | None, str, list[str]]] = {
    "as its last attempt": ("succeeded", None, "succeeded", []),
    "succeeded after its attempt failed": (
        "succeeded",
        None,
        "failed",
        ["task t: status: expected 'failed', found 'succeeded'"],
    ),
    "failed by its attempt's kind, though the attempt succeeded": (
        "failed",
        "exit_code",
        "succeeded",
        ["task t: status: expected 'succeeded', found 'failed'"],
    ),
    "cancelled after its attempt": ("cancelled", "cancelled", "succeeded", []),
    "failed its checks after its attempt": ("failed", "check", "succeeded", []),
}


@pytest.mark.parametrize("name", list(ATTEMPT_CASES))
def test_a_tasks_status_is_its_last_attempts_unless_decided_after(name: str) -> None:
    status, kind, attempt, expected = ATTEMPT_CASES[name]
    raw = crafted_report([crafted_result("t", status, error_kind=kind)])
    _attempted(raw, attempt)
    assert audited(raw) == expected


def test_a_failed_task_without_an_error_is_flagged() -> None:
    raw = crafted_report([crafted_result("t", "failed")])
    raw["results"][0]["error"] = None
    raw["errors"] = []
    assert audited(raw) == ["task t: error: a failed task carries no error"]


def test_the_prompt_beside_the_last_attempts_log_hashes_to_prompt_sha256(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan = _logged(run_dir, "plan.json", b"{}")
    prompt = _logged(run_dir, "logs/t.1.prompt", b"write t\n")
    raw = crafted_report([crafted_result("t")], plan_sha256=plan["sha256"])
    stdout = _logged(run_dir, "logs/t.1.stdout", b"done\n")
    result = _attempted(raw, "succeeded", stdout=stdout)
    result["provenance"]["prompt_sha256"] = prompt["sha256"]
    assert audited(raw, run_dir=run_dir) == []
    (run_dir / "logs" / "t.1.prompt").write_bytes(b"write u\n")
    found = sha256_hex(b"write u\n")
    assert audited(raw, run_dir=run_dir) == [
        f"task t: provenance.prompt_sha256: expected '{found}', found '{prompt['sha256']}'"
    ]
    (run_dir / "logs" / "t.1.prompt").unlink()
    assert audited(raw, run_dir=run_dir) == [
        "task t: provenance.prompt_sha256: cannot read logs/t.1.prompt: No such file or directory"
    ]
    # No prompt digest, or no log to find it beside: nothing to check.
    del result["provenance"]["prompt_sha256"]
    assert audited(raw, run_dir=run_dir) == []
    result["provenance"]["prompt_sha256"] = prompt["sha256"]
    _attempted(raw, "succeeded")
    assert audited(raw, run_dir=run_dir) == []


def test_the_worktree_held_the_sparse_cone_its_envelope_asked_for(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    plan = _logged(run_dir, "plan.json", b"{}")
    envelope = {"task_id": "t", "task": "do t", "sparse": ["src"]}
    entry = _logged(run_dir, "envelopes/t.json", canonical_json(envelope))
    raw = crafted_report([crafted_result("t")], plan_sha256=plan["sha256"])
    _with_envelope(raw, "t", entry, envelope)
    result_of(raw, "t")["provenance"]["sparse"] = ["src"]
    assert audited(raw, run_dir=run_dir) == []
    result_of(raw, "t")["provenance"]["sparse"] = ["src", "docs"]
    assert audited(raw, run_dir=run_dir) == [
        "task t: provenance.sparse: expected ['src'], found ['src', 'docs']"
    ]
    # A task with no worktree (no base commit) had no cone to hold.
    result_of(raw, "t")["provenance"]["base_commit"] = None
    assert audited(raw, run_dir=run_dir) == []


def test_a_run_directory_without_its_plan_is_flagged(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert audited(crafted_report([crafted_result("t")]), run_dir=run_dir) == [
        f"plan_sha256: cannot read {run_dir / 'plan.json'}: No such file or directory"
    ]


def test_an_environment_digest_without_an_environment_is_flagged() -> None:
    raw = crafted_report([crafted_result("t")])
    assert raw["results"][0]["provenance"]["environment"] is None
    raw["results"][0]["provenance"]["env_sha256"] = digest("forged")
    assert audited(raw) == [
        f"task t: provenance.env_sha256: expected '{digest(None)}', found '{digest('forged')}'"
    ]


def test_the_upstream_results_an_envelope_names_are_the_dependencies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The envelope file says which results a task was handed: its dependencies' (a group's
    selected members), as the report has them."""
    run_dir = tmp_path / "run"
    plan = _logged(run_dir, "plan.json", b"{}")
    raw = started_report(base=_oid(2), depends_on=("b",))
    raw["plan_sha256"] = plan["sha256"]

    def hand(upstream: Any) -> None:
        envelope = {"task_id": "c", "task": "do c", "upstream": upstream}
        entry = _logged(run_dir, "envelopes/c.json", canonical_json(envelope))
        _with_envelope(raw, "c", entry, envelope)

    hand({"b": {"result_commit": _oid(2), "output": {}}})
    assert audited(raw, run_dir=run_dir) == []
    hand({"b": {"result_commit": _oid(1)}})
    assert audited(raw, run_dir=run_dir) == [
        f"task c: envelope.upstream: expected {{'b': '{_oid(2)}'}}, found {{'b': '{_oid(1)}'}}"
    ]
    hand({"b": {"result_commit": _oid(2)}, "a": {"result_commit": _oid(1)}})
    assert audited(raw, run_dir=run_dir) == [
        f"task c: envelope.upstream: expected {{'b': '{_oid(2)}'}}, "
        f"found {{'a': '{_oid(1)}', 'b': '{_oid(2)}'}}"
    ]
    # An envelope that names no upstream at all is the envelope check's to report.
    hand(None)
    assert audited(raw, run_dir=run_dir) == []
    # Without a run directory no file is read, not even one the working directory holds.
    hand({"b": {"result_commit": _oid(1)}})
    monkeypatch.chdir(run_dir)
    assert audited(raw) == []


def test_an_estimate_for_a_model_with_an_empty_name_uses_that_names_rates() -> None:
    """The run estimates a cost from the rates of the model its usage names, ``""`` too (see
    envelopes.with_estimated_cost); the audit recomputes it from the same rates."""
    from envelopes import Rates, Usage, seal_result, with_estimated_cost

    pricing = {"": Rates(input=3.0, output=15.0)}
    usage = with_estimated_cost(Usage(input_tokens=1000, output_tokens=10, model=""), pricing)
    assert usage is not None and usage.cost_source == "estimated"
    result = seal_result(crafted_result("t").model_copy(update={"usage": usage}))
    raw = crafted_report([result], pricing=pricing)
    assert audited(raw) == []
    raw["results"][0]["usage"]["cost_usd"] = 1.0
    assert audited(raw)[0] == "task t: usage.cost_usd: expected 0.00315, found 1.0"


def test_a_timing_that_does_not_hold_names_its_task() -> None:
    raw = crafted_report([crafted_result("s"), crafted_result("t")])
    timings = result_of(raw, "t")["timings"]
    timings["finished_at"] = "2026-11-22T05:54:30Z"
    assert audited(raw) == ["task t: timings.finished_at: before the task started"]


def test_a_succeeded_task_with_an_error_is_flagged() -> None:
    raw = crafted_report([crafted_result("t")])
    raw["results"][0]["error"] = {"kind": "exit_code", "message": "no luck", "paths": []}
    assert audited(raw) == ["task t: error: a succeeded task carries an error"]


def test_a_result_without_dependencies_started_from_no_upstream_task() -> None:
    """``upstream_tasks``: a result's dependencies in order, a group as its selected members."""
    from envelopes import upstream_tasks

    assert upstream_tasks({"task_id": "t"}, {}) == []
    groups = {"g": {"selected": ["b", "c"]}}
    assert upstream_tasks({"depends_on": ["g", "a", "b"]}, groups) == ["b", "c", "a"]


def test_a_re_formatted_report_file_is_flagged_in_one_line() -> None:
    from envelopes import audit_report, report_layout

    raw = Report.model_validate(crafted_report([crafted_result("t")])).to_json_dict()
    reseal(raw)
    assert audit_report(raw, source=report_layout(raw)) == []
    assert [str(f) for f in audit_report(raw, source=json.dumps(raw).encode())] == [
        "<file>: the file's bytes differ from the layout the orchestrator writes "
        "(re-formatted or edited)"
    ]


def test_usage_by_model_is_the_results_usage_added_up(priced: dict[str, Any]) -> None:
    from envelopes import audit_report

    raw = copy.deepcopy(priced)
    raw["usage_by_model"]["m"]["input_tokens"] += 1
    reseal(raw)
    assert [f.field for f in audit_report(raw)] == ["usage_by_model"]


def test_an_agent_left_out_of_results_by_agent_is_a_finding() -> None:
    raw = crafted_report([crafted_result("t")])
    del raw["results_by_agent"]["coder"]
    assert [line.split(": expected")[0] for line in audited(raw)] == ["results_by_agent"]
