"""The Markdown summary of a report: what a pull request comment or a CI step shows, checked
line by line, with what agents wrote made inert."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio

from envelopes import HandoffEnvelope, Report, build_envelope
from orchestrator import Workspace, orchestrate_parallel
from orchestrator.audit.markdown import inert, render_markdown

from .conftest import MakeRepo, cli

PAYLOAD = "<img src=x onerror=alert(1)> | **bold** [x](javascript:alert(1)) `tick`\n# head"


async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    if envelope.task == "fail":
        raise RuntimeError(PAYLOAD)
    assert workspace.path is not None
    (workspace.path / f"{envelope.task_id}.txt").write_text(envelope.task)
    return {"done": True}


def mixed_run(make_repo: MakeRepo) -> tuple[Path, Report]:
    repo = make_repo()
    envelopes = [
        build_envelope("a", "write", task_id="good", venv=False),
        build_envelope("a", "fail", task_id="bad", venv=False),
        build_envelope("b", "write", task_id="after-bad", venv=False, depends_on=["bad"]),
    ]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"a": agent, "b": agent})
    )
    return repo, report


def commit(result: Any) -> str:
    found = result.provenance.result_commit
    return f"`{found[:10]}`" if found else ""


def test_a_mixed_run_reads_line_by_line(make_repo: MakeRepo) -> None:
    _, report = mixed_run(make_repo)
    good, bad, skipped = report.results
    wall = (report.finished_at - report.started_at).total_seconds()
    assert report.base_commit is not None and good.provenance.result_commit is not None
    lines = render_markdown(report, verified="OK").splitlines()
    assert lines == [
        f"## Run {report.run_id}: envelopes",
        "",
        f"- Repository: {inert(report.repo)}",
        f"- Plan digest: `{report.plan_sha256[:16]}`",
        f"- Base commit: `{report.base_commit[:12]}`",
        f"- Started: {report.started_at.isoformat(timespec='seconds')}, wall time {wall:.1f} s",
        "- Verified when this summary was made: OK",
        "",
        "**3 task(s)**: 1 succeeded, 1 failed, 1 skipped",
        "",
        "### Agents",
        "",
        "| Agent | Tasks | Succeeded | Failed | Timed out | Cancelled | Skipped | Spent |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        "| a | 2 | 1 | 1 | 0 | 0 | 0 |  |",
        "| b | 1 | 0 | 0 | 0 | 0 | 1 |  |",
        "",
        "### Tasks",
        "",
        "| Task | Agent | Status | Tries | Time | Commit | Error |",
        "|---|---|---|---:|---:|---|---|",
        f"| good | a | succeeded | 1 | {good.timings.duration_s:.2f} s | {commit(good)} |  |",
        f"| bad | a | failed | 1 | {bad.timings.duration_s:.2f} s | {commit(bad)} "
        "| agent&#95;exception |",
        f"| after-bad | b | skipped | 0 | {skipped.timings.duration_s:.2f} s |  | dependency |",
        "",
        "### Failures",
        "",
        f"- **bad** (failed, agent&#95;exception): {inert(bad.error.message if bad.error else '')}",
        "- **after-bad** (skipped, dependency): dependency bad failed",
    ]


def test_what_an_agent_wrote_cannot_become_markup(make_repo: MakeRepo) -> None:
    _, report = mixed_run(make_repo)
    text = render_markdown(report)
    failure = next(line for line in text.splitlines() if line.startswith("- **bad**"))
    # Shown, inert: no tag, no link, no code span, no emphasis, no cell, no heading.
    for raw in ("<img", "](", "`tick`", "**bold**", " | ", "\n# head", "javascript:"):
        assert raw not in failure
    assert "&#60;img src&#61;x onerror&#61;alert&#40;1&#41;&#62;" in failure
    assert "&#124;" in failure and "&#35; head" in failure  # the line break is a space
    assert len(inert("x" * 1000)) == 200 and inert("x" * 1000).endswith("…")
    assert inert("a\x00b\x1b[31mc\u0085d") == "a b &#91;31mc d"


def test_the_command_prints_it_verified(make_repo: MakeRepo, capsys: Any) -> None:
    repo, report = mixed_run(make_repo)
    path = Path(report.run_dir) / "report.json"
    out = cli(capsys, "report", str(path), "--markdown", "--repo", str(repo))
    assert out.code == 0, out.err
    assert "- Verified when this summary was made: OK, " in out.out
    assert "commit(s) checked, every digest recomputed" in out.out
    data = json.loads(path.read_text())
    data["results"][0]["attempts"] = 7  # its seal no longer matches
    path.write_text(json.dumps(data))
    out = cli(capsys, "report", str(path), "--markdown", "--repo", str(repo))
    assert out.code == 0 and " finding(s)**, the first: " in out.out
    (Path(report.run_dir) / "bad.json").write_text("{not json")
    out = cli(capsys, "report", str(Path(report.run_dir) / "bad.json"), "--markdown")
    assert out.code == 2 and len(out.err.strip().splitlines()) == 1


def test_a_cell_shows_no_bidirectional_override() -> None:
    """U+202E and its kin reorder what is shown after them (a file name that reads as
    something else): in a cell they are spaces, as control characters are."""
    assert inert("run\u202egpj-exe") == "run gpj-exe"
    assert inert("a\u2066b\u2069c\x1b[31m") == "a b c &#91;31m"
