"""How a run ends: the report written everywhere asked, the plan's merge done or skipped and
recorded, the journal's last word, the run's empty directories gone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio

from envelopes import HandoffEnvelope, Plan, build_envelope, load_report_file
from orchestrator import Workspace, orchestrate_parallel, verify_report

from .conftest import MakeRepo, git


async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    if envelope.inputs.get("fail"):
        raise RuntimeError("failing as told")
    if workspace.path is not None:
        (workspace.path / f"{envelope.task_id}.txt").write_text("made\n")
    return {}


def test_the_report_is_written_to_the_run_and_to_every_copy(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    out = tmp_path / "elsewhere.json"
    envelopes = [build_envelope("a", "x", task_id="t", venv=False)]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"a": agent}, report_path=out)
    )
    run_dir = Path(report.run_dir)
    assert out.read_bytes() == (run_dir / "report.json").read_bytes()
    assert load_report_file(out)[1] == report
    journal = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    assert journal[-1]["type"] == "finished"
    assert journal[-1]["report_sha256"] == report.report_sha256
    # Nothing of the run is left in the state directory but its run directory.
    state = run_dir.parent.parent
    assert not (state / "worktrees" / report.run_id).exists()
    assert not (state / "venvs" / report.run_id).exists()
    assert not (run_dir / "lock").exists()


def _plan(*tasks: dict[str, Any]) -> Plan:
    return Plan.model_validate(
        {
            "defaults": {"venv": False},
            "merge": {"into": "main"},
            "tasks": [{"agent": "a", "task": "x", **t} for t in tasks],
        }
    )


def test_the_plans_merge_is_recorded_merged_when_everything_succeeded(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo()
    git(repo, "branch", "-M", "main")
    report = anyio.run(
        lambda: orchestrate_parallel(
            _plan({"id": "one"}, {"id": "two"}), repo=repo, agents={"a": agent}
        )
    )
    [record] = report.merge
    assert record.status == "merged" and record.into == "main"
    assert git(repo, "rev-parse", "main") == record.new_commit
    assert {"one.txt", "two.txt"} <= set(git(repo, "ls-tree", "--name-only", "main").split())
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_the_plans_merge_is_recorded_skipped_when_a_task_failed(make_repo: MakeRepo) -> None:
    repo = make_repo()
    git(repo, "branch", "-M", "main")
    before = git(repo, "rev-parse", "main")
    report = anyio.run(
        lambda: orchestrate_parallel(
            _plan({"id": "ok"}, {"id": "bad", "inputs": {"fail": True}}),
            repo=repo,
            agents={"a": agent},
        )
    )
    [record] = report.merge
    assert record.status == "skipped"
    assert record.message == "1 of 2 tasks did not succeed; nothing was merged"
    assert git(repo, "rev-parse", "main") == before
    _, on_disk, _ = load_report_file(Path(report.run_dir) / "report.json")
    assert on_disk.merge == report.merge


def test_a_git_failure_during_the_plans_merge_refuses_it_and_keeps_the_run(
    make_repo: MakeRepo, monkeypatch: Any
) -> None:
    from orchestrator import closing
    from orchestrator.errors import GitError

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise GitError(["merge-tree"], 128, "fatal: the object store is not readable")

    monkeypatch.setattr(closing, "merge_results", broken)
    repo = make_repo()
    git(repo, "branch", "-M", "main")
    before = git(repo, "rev-parse", "main")
    report = anyio.run(
        lambda: orchestrate_parallel(_plan({"id": "one"}), repo=repo, agents={"a": agent})
    )
    assert report.summary.successful == 1
    [record] = report.merge
    assert record.status == "refused" and "object store is not readable" in (record.message or "")
    assert git(repo, "rev-parse", "main") == before
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok
