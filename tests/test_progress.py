"""The progress display: built on events, never the reason a run fails."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from envelopes import ErrorInfo, RunStarted, TaskFinished, TaskStarted
from orchestrator.progress import Progress


def events() -> list:
    return [
        RunStarted(run_id="r", total_tasks=1, base_commit="abc", run_dir="/tmp/r"),
        TaskStarted(run_id="r", task_id="t", agent="a"),
        TaskFinished(
            run_id="r",
            task_id="t",
            agent="a",
            status="failed",
            attempts=1,
            duration_s=0.5,
            result_commit=None,
            error=ErrorInfo(kind="exit_code", message="exited with code 1"),
        ),
    ]


def test_one_line_per_event_off_a_terminal(tmp_path) -> None:
    log = tmp_path / "log"
    with log.open("w") as stream, Progress(stream) as progress:
        for event in events():
            progress(event)
    lines = log.read_text().splitlines()
    assert lines == [
        "run r: 1 tasks from abc (run dir /tmp/r)",
        "task t started (a)",
        "task t failed in 0.50 s, 1 attempt(s): exited with code 1",
    ]


def test_a_reader_that_goes_away_does_not_end_the_run() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = os.fdopen(write_end, "w", buffering=1)
    with Progress(stream) as progress:
        for event in events():
            progress(event)  # a broken pipe must neither raise nor exit
    assert progress.console.quiet or progress.closed
    with contextlib.suppress(BrokenPipeError):
        stream.close()


def test_graph_group_and_merge_events_have_their_lines(tmp_path) -> None:
    from envelopes import GroupDecided, MergeConflict, MergeFinished, MergePredicted, TaskSkipped

    log = tmp_path / "log"
    with log.open("w") as stream, Progress(stream) as progress:
        progress(
            TaskSkipped(
                run_id="r",
                task_id="d",
                agent="a",
                error=ErrorInfo(kind="dependency", message="dependency b failed"),
            )
        )
        progress(GroupDecided(run_id="r", group="g", select="first_success", selected=["g[x]"]))
        progress(
            MergePredicted(
                run_id="r",
                into="main",
                tasks=["b", "c"],
                conflicts=[MergeConflict(left="b", right="c", paths=["x.txt"])],
            )
        )
        progress(
            MergeFinished(
                run_id="r", into="main", status="conflict", new_commit=None, message="b x c"
            )
        )
    assert log.read_text().splitlines() == [
        "task d skipped: dependency b failed",
        "group g (first_success): selected g[x]",
        "merge into main: 2 result(s), conflicts predicted: b x c: x.txt",
        "merge into main conflict: b x c",
    ]
    assert progress.rows["d"][2] == "skipped"


def test_the_summary_shows_what_each_task_and_the_run_spent(tmp_path: Path) -> None:
    import anyio
    from rich.console import Console

    from envelopes import HandoffEnvelope, build_envelope
    from orchestrator import Workspace, orchestrate_parallel
    from orchestrator.progress import summary_table

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, object]:
        usage = {"a": {"input_tokens": 1500, "output_tokens": 500, "cost_usd": 0.42}}
        return {"usage": usage.get(envelope.task_id)}

    envelopes = [build_envelope("w", t, task_id=t, worktree=False, venv=False) for t in "ab"]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, agents={"w": agent}, state_dir=tmp_path / "s")
    )
    console = Console(width=200, record=True)
    console.print(summary_table(report))
    text = console.export_text()
    title = " ".join(text.split("┏")[0].split())
    assert title.endswith("; spent 2.0k tokens, $0.42")
    [row] = [line for line in text.splitlines() if "│ a " in line]
    assert "2.0k tokens, $0.42" in row


def test_a_cost_known_only_in_part_is_shown_as_a_lower_bound(tmp_path: Path) -> None:
    import anyio
    from rich.console import Console

    from envelopes import HandoffEnvelope, build_envelope
    from orchestrator import Workspace, orchestrate_parallel
    from orchestrator.progress import summary_table

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, object]:
        if envelope.task_id == "b":
            return {"usage": {"input_tokens": 100}}  # tokens, but no cost
        return {"usage": {"input_tokens": 1500, "output_tokens": 500, "cost_usd": 0.42}}

    envelopes = [build_envelope("w", t, task_id=t, worktree=False, venv=False) for t in "ab"]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, agents={"w": agent}, state_dir=tmp_path / "s")
    )
    console = Console(width=200, record=True)
    console.print(summary_table(report))
    title = " ".join(console.export_text().split("┏")[0].split())
    assert title.endswith("; spent 2.1k tokens, at least $0.42")


def test_a_finished_line_says_what_the_task_spent(tmp_path) -> None:
    from envelopes import Usage

    log = tmp_path / "log"
    finished = TaskFinished(
        run_id="r",
        task_id="t",
        agent="claude",
        status="succeeded",
        attempts=1,
        duration_s=2.0,
        result_commit="ab" * 20,
        error=None,
        usage=Usage(input_tokens=12_000, output_tokens=345, cost_usd=0.1234),
    )
    partial = finished.model_copy(
        update={"usage": Usage(input_tokens=10, cost_usd=0.5, cost_source="partial")}
    )
    with log.open("w") as stream, Progress(stream) as progress:
        progress(finished)
        progress(partial)
    assert log.read_text().splitlines() == [
        "task t succeeded in 2.00 s, 1 attempt(s), 12.3k tokens, $0.12 ababababab",
        "task t succeeded in 2.00 s, 1 attempt(s), 10 tokens, at least $0.50 ababababab",
    ]
