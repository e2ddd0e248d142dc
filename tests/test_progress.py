"""The progress display: built on events, never the reason a run fails."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import pytest

from envelopes import ErrorInfo, RunStarted, TaskFinished, TaskStarted
from orchestrator.progress import Progress


def events() -> list:
    return [
        RunStarted(run_id="r", total_tasks=1, base_commit="abc", run_dir="/tmp/r"),
        TaskStarted(run_id="r", task_id="t", agent="a"),
        _finished("t", "failed", ErrorInfo(kind="exit_code", message="exited with code 1")),
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


def _run_of(tmp_path: Path, n: int, failing: set[str]) -> Any:
    import anyio

    from envelopes import HandoffEnvelope, build_envelope
    from orchestrator import Workspace, orchestrate_parallel

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, object]:
        if envelope.task_id in failing:
            raise RuntimeError(f"{envelope.task_id} broke")
        return {}

    envelopes = [
        build_envelope("w", "t", task_id=f"n{i:03d}", worktree=False, venv=False) for i in range(n)
    ]
    return anyio.run(
        lambda: orchestrate_parallel(
            envelopes, agents={"w": agent}, state_dir=tmp_path / "s", concurrency=1
        )
    )


def test_a_large_runs_table_lists_only_what_did_not_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 tasks, 5 failed: the closing table has their 5 rows (not 300), its caption says
    how many are not listed, and it reads no other task's result to say so."""
    from rich.console import Console

    from orchestrator.progress import LISTED, outcome_line, run_succeeded, summary_table

    from .test_results import count_models_made

    failing = {f"n{i:03d}" for i in (0, 1, 2, 3, 4)}
    report = _run_of(tmp_path, 300, failing)
    made = count_models_made(monkeypatch)
    console = Console(width=300, record=True)
    console.print(summary_table(report))
    assert not run_succeeded(report)
    text = console.export_text()
    rows = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    assert sorted(rows) == sorted(failing)
    assert f"295 of 300 tasks not listed (a run of more than {LISTED}" in " ".join(text.split())
    assert outcome_line(report) == "300 tasks: 295 succeeded, 5 failed"
    # The five failed results were read (they finished first: no longer kept as models),
    # and no other.
    assert len(made) == len(failing)


def test_a_large_run_that_succeeded_is_told_without_reading_a_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from orchestrator.progress import outcome_line, run_succeeded, summary_table

    from .test_results import count_models_made

    report = _run_of(tmp_path, 300, set())
    made = count_models_made(monkeypatch)
    console = Console(width=300, record=True)
    console.print(summary_table(report))
    assert run_succeeded(report)
    assert outcome_line(report) == "300 tasks: 300 succeeded"
    assert "300 of 300 tasks not listed" in " ".join(console.export_text().split())
    assert made == []


def test_a_large_runs_table_lists_at_most_its_limit(tmp_path: Path) -> None:
    from rich.console import Console

    from orchestrator.progress import LISTED, listed_results, summary_table

    failing = {f"n{i:03d}" for i in range(LISTED + 8)}
    report = _run_of(tmp_path, LISTED + 10, failing)
    listed = listed_results(report)
    assert [r.task_id for r in listed] == sorted(failing)[:LISTED]
    console = Console(width=300, record=True)
    console.print(summary_table(report))
    assert f"10 of {LISTED + 10} tasks not listed" in " ".join(console.export_text().split())
    # A run of at most LISTED tasks lists every one, those that succeeded too.
    small = _run_of(tmp_path / "small", 3, {"n001"})
    assert [r.task_id for r in listed_results(small)] == ["n000", "n001", "n002"]


def _started(task_id: str) -> TaskStarted:
    return TaskStarted(run_id="r", task_id=task_id, agent="a")


def _finished(
    task_id: str, status: str = "succeeded", error: ErrorInfo | None = None
) -> TaskFinished:
    return TaskFinished(
        run_id="r",
        task_id=task_id,
        agent="a",
        status=status,
        attempts=1,
        duration_s=0.5,
        result_commit=None,
        error=error,
    )


def test_the_live_table_shows_the_latest_and_the_running_tasks_and_counts_them_all(
    tmp_path: Path,
) -> None:
    """1,000 tasks, 990 finished, 10 running: 30 rows (the last 20 to finish, then the 10
    running), and a title that counts every task."""
    import io

    from orchestrator.progress import LIVE_ROWS

    progress = Progress(io.StringIO(), live=False)
    progress(RunStarted(run_id="r", total_tasks=1000, base_commit=None, run_dir="/x"))
    for i in range(1000):
        progress(_started(f"t{i:04d}"))
        if i < 990:
            progress(_finished(f"t{i:04d}", "failed" if i == 989 else "succeeded"))
    assert progress.done == 990
    table = progress._table()
    shown = list(table.columns[0].cells)
    assert len(shown) == LIVE_ROWS
    assert [str(t) for t in shown] == [f"t{i:04d}" for i in range(970, 1000)]
    assert [str(s) for s in table.columns[2].cells][-11:] == ["failed"] + ["running"] * 10
    assert table.title == "990/1000 tasks finished (10 running; 970 not shown)"
    # Only the rows it may show are kept (the last LIVE_ROWS to finish, and the running
    # ones): not one per task of the run.
    assert len(progress.rows) == LIVE_ROWS + 10
    # A task seen finished again (a resumed run's event) is not counted twice, nor is a
    # task started again; one that started again is running again.
    progress(_finished("t0000"))
    assert progress.done == 990
    progress(_started("t0001"))
    assert progress.done == 989
    assert progress._table().title == "989/1000 tasks finished (11 running; 970 not shown)"
    assert len(progress.rows) == LIVE_ROWS + 11


def test_an_event_does_not_draw_the_live_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The live table is drawn by rich's thread: the event loop's thread never builds it,
    so an event costs the same at the 10th task and the 100,000th."""
    import io
    import threading

    built_here: list[str] = []
    built_there = threading.Event()
    real = Progress._table

    def counted(self: Progress) -> Any:
        if threading.current_thread() is threading.main_thread():
            built_here.append("x")
        else:
            built_there.set()
        return real(self)

    monkeypatch.setattr(Progress, "_table", counted)
    with Progress(io.StringIO(), live=True) as progress:
        built_here.clear()  # the first drawing, when the table appears
        progress(RunStarted(run_id="r", total_tasks=3000, base_commit=None, run_dir="/x"))
        for i in range(3000):
            progress(_started(f"t{i}"))
            progress(_finished(f"t{i}"))
        before_exit = list(built_here)
        # And it is drawn: rich's thread makes it (eight times a second).
        assert built_there.wait(timeout=30)
    assert before_exit == []
    assert progress.done == 3000


def test_a_large_runs_table_leaves_out_the_tasks_not_needed() -> None:
    """Members of a first_success group cancelled because another won are not failures: a
    large run's table lists the failed task, not them."""
    from types import SimpleNamespace

    from envelopes import ReportError
    from orchestrator.progress import listed_results

    def error(task_id: str, kind: str) -> ReportError:
        return ReportError(task_id=task_id, agent="a", kind=kind, message="m")

    results = {t: SimpleNamespace(task_id=t) for t in ("g[a]", "g[b]", "x")}
    report = SimpleNamespace(
        summary=SimpleNamespace(total_tasks=60),
        errors=[error("g[a]", "not_needed"), error("x", "exit_code"), error("g[b]", "not_needed")],
        result=results.__getitem__,
    )
    assert [r.task_id for r in listed_results(report)] == ["x"]  # type: ignore[arg-type]


HOSTILE = "boom :smile: \x1b[31mred\x1b]0;title\x07 \x1b]52;c;cHduZWQ=\x1b\\ \x9b2J \u202eevil\x7f"


def test_printable_shows_what_a_terminal_would_obey() -> None:
    from orchestrator.progress import printable

    assert printable("a\x1b[2Jb\tc\nd") == "a\\x1b[2Jb\tc\nd"
    assert printable("\x9b\x7f\x00\u202e\u2066") == "\\x9b\\x7f\\x00\\u202e\\u2066"
    plain = "plain text, é, 日本, [b]x[/b] :smile:"
    assert printable(plain) is plain


def test_an_agents_escape_sequences_are_shown_not_obeyed(tmp_path: Path) -> None:
    """An error message is the agent's text: neither the progress lines nor the closing table
    pass its escape sequences (colour, window title, clipboard write) or its bidirectional
    override to the terminal, and ``:smile:`` stays text. rich's own colours still pass."""
    import io

    import anyio

    from envelopes import ErrorInfo, HandoffEnvelope, build_envelope
    from orchestrator import Workspace, orchestrate_parallel
    from orchestrator.progress import SafeConsole, summary_table

    lines = io.StringIO()
    Progress(lines, live=False)(
        _finished("t", "failed", ErrorInfo(kind="exit_code", message=HOSTILE))
    )
    line = lines.getvalue()
    assert "\x1b" not in line and "\x9b" not in line and "\u202e" not in line
    assert "\\x1b]52;c;cHduZWQ=" in line and ":smile:" in line and "\\u202eevil" in line

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, object]:
        raise RuntimeError(HOSTILE)

    envelopes = [build_envelope("w", "t", task_id="t", worktree=False, venv=False)]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, agents={"w": agent}, state_dir=tmp_path / "s")
    )
    screen = io.StringIO()
    SafeConsole(file=screen, force_terminal=True, color_system="truecolor", width=400).print(
        summary_table(report)
    )
    shown = screen.getvalue()
    assert "\\x1b]0;title" in shown and "\x1b]0;" not in shown and "\x1b]52" not in shown
    assert "\x9b" not in shown and "\u202e" not in shown and ":smile:" in shown
    assert "\x1b[" in shown  # rich's own styling (the red "failed") is still there


def test_lines_are_written_plain_not_rendered_by_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    """In CI (no terminal) each event is one line written as it is: rich's print took about
    100 us a line, most of what 300,000 events of a 100,000-task run cost."""
    import io

    stream = io.StringIO()
    progress = Progress(stream, live=False)

    def rendered(*args: object, **kwargs: object) -> None:
        raise AssertionError("a progress line went through rich")

    monkeypatch.setattr(progress.console, "print", rendered)
    progress(_started("t1"))
    progress(_finished("t1", "failed"))
    assert stream.getvalue().splitlines() == [
        "task t1 started (a)",
        "task t1 failed in 0.50 s, 1 attempt(s)",
    ]


def test_escaped_text_is_laid_out_whole_and_markup_in_it_is_text() -> None:
    """Escaping comes before rich measures and wraps: at 50 columns an error message holding
    colour codes loses none of its words (escaped after layout, "\\x1b" took four cells the
    layout had not counted and the line's end was cropped). Markup in a plain cell ("a plan
    named fix [/api]", a link) is shown, neither obeyed nor an error."""
    import io

    from rich.table import Table
    from rich.text import Text

    from orchestrator.progress import SafeConsole

    message = "check failed \x1b[31mFAILED\x1b[0m tests/test_math.py::test_add line 12 end"
    table = Table()
    table.add_column("error", overflow="fold")
    table.add_row(Text(message, style="red"))
    table.add_row("[link=https://evil.example]click[/link] fix [/api]")
    screen = io.StringIO()
    SafeConsole(file=screen, force_terminal=True, color_system="truecolor", width=50).print(table)
    SafeConsole(file=screen, width=30).print(f"merge into main: conflict ({message})")
    shown = screen.getvalue()
    assert "\x1b]8;" not in shown and "\x1b[31mFAILED" not in shown
    # rich's own styling (real escapes, not text) out, then the table's frame and spaces.
    text = re.sub("\x1b\\[[0-9;]*m", "", shown)
    flat = "".join(
        "".join(c for c in line if c not in "│┃┏┓┗┛┡┩└┘━─ ") for line in text.splitlines()
    )
    assert flat.count("\\x1b[31mFAILED\\x1b[0mtests/test_math.py::test_addline12end") == 2
    assert "[link=https://evil.example]click[/link]fix[/api]" in flat


def test_the_live_table_leaves_what_else_is_printed_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich's Live proxies stdout and stderr by default, turning escape sequences in what the
    process prints meanwhile into styles; the progress table does not."""
    import io
    import sys

    from orchestrator import progress as progresses

    monkeypatch.setattr(progresses._Console, "is_terminal", property(lambda self: True))
    before = (sys.stdout, sys.stderr)
    with Progress(io.StringIO(), live=True):
        assert (sys.stdout, sys.stderr) == before


def test_an_escaped_texts_styles_stay_on_their_characters() -> None:
    from rich.text import Text

    from orchestrator.progress import _escaped

    text = Text("ab\x1bcd ef", style="dim")
    text.stylize("bold", 0, 4)
    text.stylize("red", 2, 7)
    escaped = _escaped(text)
    assert escaped.plain == "ab\\x1bcd ef" and escaped.style == "dim"
    spans = [(s.start, s.end, str(s.style)) for s in escaped.spans]
    assert spans == [(0, 2, "bold"), (2, 7, "bold"), (2, 7, "red"), (7, 10, "red")]
