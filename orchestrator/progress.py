"""Showing a run: live progress on a terminal, one line per event otherwise, a summary table.

Built on the same events library users receive (``on_event``). rich is imported here only,
and this module only when a run starts, so ``orchestrator --help`` stays fast.
"""

from __future__ import annotations

import re
import sys
from collections import deque
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, ConsoleOptions, RenderableType
from rich.live import Live
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from envelopes import (
    AttemptFailed,
    Event,
    GroupDecided,
    MergeFinished,
    MergePredicted,
    Report,
    RunStarted,
    TaskFinished,
    TaskPhase,
    TaskResult,
    TaskRetrying,
    TaskSkipped,
    TaskStarted,
)

__all__ = [
    "LISTED",
    "LIVE_ROWS",
    "Progress",
    "SafeConsole",
    "listed_results",
    "not_needed",
    "outcome_line",
    "printable",
    "run_succeeded",
    "summary_table",
]

_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "timed_out": "yellow",
    "cancelled": "magenta",
    "skipped": "magenta",
    "running": "cyan",
    "waiting": "dim",
}


#: The statuses of a task that has finished (any other is a running task's phase).
_FINISHED = frozenset({"succeeded", "failed", "timed_out", "cancelled", "skipped", "cached"})

#: Most rows of the live table: the tasks that finished last, then the running ones. A table
#: of every task was rebuilt at each event: 1,000 tasks took 30 s of the event loop's time.
LIVE_ROWS = 30


#: What a terminal obeys rather than shows: C0 control characters but newline and tab, DEL,
#: C1 control characters, and the bidirectional overrides and isolates (which reorder what
#: is shown). An escape sequence from an agent (its error message, a path it made) could
#: otherwise recolour, move the cursor, retitle the window or, in some terminals, write the
#: clipboard of whoever reads the output.
_SHOWN_ESCAPED = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in (
        *range(0x00, 0x09),
        *range(0x0B, 0x20),
        *range(0x7F, 0xA0),
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    )
}
_CONTROL = re.compile("[" + "".join(re.escape(chr(c)) for c in _SHOWN_ESCAPED) + "]")


def printable(text: str) -> str:
    """*text* with each character a terminal would obey rather than show (an escape, a
    carriage return, a bidirectional override) written as ``\\xNN`` or ``\\uNNNN``."""
    return text.translate(_SHOWN_ESCAPED) if _CONTROL.search(text) else text


class SafeConsole(Console):
    """A rich console for text from agents, plans and reports: what it prints of them is
    shown, never obeyed (:func:`printable`, before rich lays the text out, so that nothing of
    it is cropped), markup in it is text (``[link=...]`` makes no hyperlink), nothing in it
    is highlighted, and ``:name:`` stays text instead of becoming an emoji. rich's own
    colours and cursor moves are not text, and pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("emoji", False)
        kwargs.setdefault("markup", False)
        kwargs.setdefault("highlight", False)
        super().__init__(*args, **kwargs)

    def render(
        self, renderable: RenderableType, options: ConsoleOptions | None = None
    ) -> Iterable[Segment]:
        # Text and cells are escaped before they are measured and wrapped: "\x1b" is four
        # cells wide where the escape it stands for is none.
        if isinstance(renderable, str):
            renderable = printable(renderable)
        elif isinstance(renderable, Text) and _CONTROL.search(renderable.plain):
            renderable = _escaped(renderable)
        for segment in super().render(renderable, options):
            # What was not text before (a renderable of another kind), escaped as it is
            # written: rich's own control segments (cursor moves) are not text.
            if segment.control is None and _CONTROL.search(segment.text):
                yield Segment(printable(segment.text), segment.style)
            else:
                yield segment


def _escaped(text: Text) -> Text:
    """*text* with its characters escaped (:func:`printable`), each piece keeping its style."""
    escaped = text.blank_copy()
    # Cut at every span's ends, each piece is covered whole by each of its spans.
    for piece in text.divide(
        sorted({offset for span in text.spans for offset in (span.start, span.end)})
    ):
        start = len(escaped)
        escaped.append(printable(piece.plain))
        for span in piece.spans:
            if span.end > span.start:
                escaped.stylize(span.style, start, len(escaped))
    return escaped


class _Console(SafeConsole):
    """A console that goes quiet when its reader goes away, instead of exiting the process."""

    def on_broken_pipe(self) -> None:
        self.quiet = True


class Progress:
    """Receives events; draws a live table on a terminal, else writes a line per event.

    An event costs the same whatever the number of tasks: it updates the task's row and the
    counts. The live table is drawn by rich's own thread, eight times a second, from at most
    :data:`LIVE_ROWS` rows (its title counts them all).
    """

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.console = _Console(file=self.stream, highlight=False)
        self.live_mode = self.console.is_terminal if live is None else live
        #: The row (task, agent, status, time, commit) of each task the live table may show
        #: (running, or among the last LIVE_ROWS to finish), by task id: not every task's,
        #: which a run of 100,000 tasks would hold to its end.
        self.rows: dict[str, list[str]] = {}
        self.total = 0
        #: How many tasks have finished, and how many were told of.
        self.done = 0
        self._seen = 0
        self._finished: set[str] = set()
        self._running: dict[str, None] = {}  # in the order they started
        self._latest: deque[str] = deque(maxlen=LIVE_ROWS)  # the last to finish
        self._live: Live | None = None
        self.closed = False

    def __enter__(self) -> Progress:
        if self.live_mode:
            self._live = Live(
                console=self.console,
                refresh_per_second=8,
                transient=True,
                get_renderable=self._table,
                # What else the process prints meanwhile (a warning, a log line) is left
                # alone: rich's proxy would turn escape sequences in it into styles.
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def __call__(self, event: Event) -> None:
        line = self._record(event)
        if self.closed or self._live is not None:
            return  # the live table is drawn by its thread
        try:
            if line:
                # Plain text, written as it is (shown, never obeyed): rich's print took
                # 100 us a line, 30 s of a 100,000-task run's event loop.
                self.stream.write(printable(line) + "\n")
                self.stream.flush()
        except OSError:
            # The reader went away (`| head`, a closed terminal): progress is a courtesy, so
            # the run goes on without it rather than dying of a broken pipe.
            self.closed = True

    def _record(self, event: Event) -> str | None:
        if isinstance(event, RunStarted):
            self.total = event.total_tasks
            line = f"run {event.run_id}: {event.total_tasks} tasks from {event.base_commit or 'no repository'} (run dir {event.run_dir})"
            if event.resumed_tasks or event.orphans_killed:
                again = event.total_tasks - event.resumed_tasks
                line += (
                    f"; resumed: {event.resumed_tasks} kept, {again} to run again, "
                    f"{event.orphans_killed} orphaned agent process(es) killed"
                )
            return line
        if isinstance(event, TaskStarted):
            self._set(event.task_id, [event.task_id, event.agent, "running", "", ""])
            return f"task {event.task_id} started ({event.agent})"
        if isinstance(event, TaskPhase):
            phase = _phase_text(event)
            if event.task_id in self.rows:
                self.rows[event.task_id][2] = phase
            return f"task {event.task_id}: {phase}"
        if isinstance(event, AttemptFailed):
            return f"task {event.task_id} attempt {event.attempt} {event.status}: {_one_line(event.error.message)}"
        if isinstance(event, TaskRetrying):
            return (
                f"task {event.task_id} retrying (attempt {event.attempt}) in {event.wait_s:.1f} s"
            )
        if isinstance(event, TaskFinished):
            commit = (event.result_commit or "")[:10]
            self._set(
                event.task_id,
                [event.task_id, event.agent, event.status, f"{event.duration_s:.2f}s", commit],
            )
            why = f": {_one_line(event.error.message)}" if event.error else ""
            usage = event.usage
            cost = ""
            if usage is not None:
                tokens = usage.total_tokens or (usage.input_tokens or 0) + (
                    usage.output_tokens or 0
                )
                partial = usage.cost_source == "partial"
                told = spent(tokens, usage.cost_usd, at_least=partial)
                cost = f", {told}" if tokens or usage.cost_usd else ""
            return f"task {event.task_id} {event.status} in {event.duration_s:.2f} s, {event.attempts} attempt(s){cost}{' ' + commit if commit else ''}{why}"
        if isinstance(event, TaskSkipped):
            self._set(event.task_id, [event.task_id, event.agent, "skipped", "", ""])
            return f"task {event.task_id} skipped: {event.error.message}"
        if isinstance(event, GroupDecided):
            chosen = ", ".join(event.selected) or "none"
            return f"group {event.group} ({event.select}): selected {chosen}"
        if isinstance(event, MergePredicted):
            found = "; ".join(
                f"{c.left} x {c.right}: {', '.join(c.paths)}" for c in event.conflicts
            )
            return f"merge into {event.into}: {len(event.tasks)} result(s), " + (
                f"conflicts predicted: {found}" if found else "no conflict predicted"
            )
        if isinstance(event, MergeFinished):
            moved = f" -> {event.new_commit[:10]}" if event.new_commit else ""
            return f"merge into {event.into} {event.status}{moved}: {event.message}"
        return None

    def _set(self, task_id: str, row: list[str]) -> None:
        was_done = task_id in self._finished
        self._seen += not was_done and task_id not in self.rows
        self.rows[task_id] = row
        if row[2] in _FINISHED:
            if not was_done:
                self.done += 1
                self._finished.add(task_id)
            self._running.pop(task_id, None)
            gone = self._latest[0] if len(self._latest) == self._latest.maxlen else None
            self._latest.append(task_id)
            if gone is not None and gone not in self._running and gone not in self._latest:
                del self.rows[gone]  # (no longer shown: only counted)
        else:
            if was_done:
                self.done -= 1
                self._finished.discard(task_id)
            self._running[task_id] = None

    def _table(self) -> Table:
        """The live table. Called by rich's thread: it reads copies (each made in one step,
        under the GIL) of what the event loop's thread changes."""
        running = list(islice(list(self._running), LIVE_ROWS))
        room = LIVE_ROWS - len(running)
        finished = [t for t in dict.fromkeys(reversed(list(self._latest))) if t not in running]
        shown = finished[:room][::-1] + running
        rows = [row for t in shown if (row := self.rows.get(t)) is not None]
        hidden = self._seen - len(rows)
        title = f"{self.done}/{self.total} tasks finished"
        if hidden > 0:
            title += f" ({len(self._running)} running; {hidden} not shown)"
        table = Table(title=title, expand=False)
        for name in ("task", "agent", "status", "time", "commit"):
            table.add_column(name)
        for row in rows:
            # Text, never markup: ids, agents and messages are user and agent text
            # ("impl[claude]", "[/tmp/build]").
            table.add_row(
                Text(row[0]),
                Text(row[1]),
                Text(row[2], style=_STYLE.get(row[2], _STYLE["running"])),
                Text(row[3]),
                Text(row[4]),
            )
        return table


def _one_line(message: str) -> str:
    """A message's first line, for a line of progress (a failed check's message goes on with
    its output's last lines, which the summary table and the report show)."""
    first, _, rest = message.partition("\n")
    return f"{first} (+{rest.count(chr(10)) + 1} lines)" if rest else first


def _phase_text(event: TaskPhase) -> str:
    """``setup``, ``agent``, ``checks`` or ``repair 1/2``, as a running task's status shows."""
    if event.phase == "repair":
        return f"repair {event.repair}/{event.repairs}"
    return event.phase


#: A run of at most this many tasks has a row for each in the closing table; a larger one has
#: rows for the first this many of its tasks that did not succeed (each task is in the report):
#: a table of 100,000 rows takes minutes to print and says less than its title.
LISTED = 50


def not_needed(result: TaskResult) -> bool:
    """A ``first_success`` group's member cancelled because another member succeeded."""
    return result.error is not None and result.error.kind == "not_needed"


def _not_needed_ids(report: Report) -> list[str]:
    # The report's errors are its results that did not succeed and have an error: the tasks
    # not needed are those of kind not_needed, found without reading every result.
    return [e.task_id for e in report.errors if e.kind == "not_needed"]


def run_succeeded(report: Report) -> bool:
    """Every task succeeded, or was not needed (its group's winner succeeded)."""
    s = report.summary
    return s.successful + len(_not_needed_ids(report)) == s.total_tasks


def outcome_line(report: Report) -> str:
    """``3 tasks: 2 succeeded, 1 not needed, 1 failed``: every status that occurred.

    Made from the report's counts, and from the results of the tasks not needed only (a run
    of 100,000 tasks reads no other result for it)."""
    s = report.summary
    counts = {
        "succeeded": s.successful - s.cached,
        "cached": s.cached,
        "failed": s.failed,
        "timed out": s.timeout,
        "cancelled": s.cancelled,
        "skipped": s.skipped,
    }
    for task_id in _not_needed_ids(report):
        counts[report.result(task_id).status.replace("_", " ")] -= 1
        counts["not needed"] = counts.get("not needed", 0) + 1
    order = ["succeeded", "cached", "not needed", "failed", "timed out", "cancelled", "skipped"]
    parts = [f"{counts[k]} {k}" for k in order if counts.get(k)]
    total = s.total_tasks
    return f"{total} task{'s' if total != 1 else ''}: " + (", ".join(parts) or "none")


def listed_results(report: Report, limit: int = LISTED) -> list[TaskResult]:
    """The results the closing table has a row for: every one of a run of at most *limit*
    tasks; else the first *limit* that did not succeed (and were needed), in run order."""
    if report.summary.total_tasks <= limit:
        return list(report.results)
    failed = [e.task_id for e in report.errors if e.kind != "not_needed"]
    return [report.result(task_id) for task_id in failed[:limit]]


def summary_table(report: Report, *, wall_s: float | None = None) -> Table:
    """The closing table: the title says what became of the tasks, then a row for each task
    (a run of more than :data:`LISTED` tasks: each task that did not succeed, up to that many;
    its caption says how many are not listed).

    *wall_s* is how long this invocation took: a resumed run's report counts from the run's
    first start, downtime included, and the title then says both. A task that did not
    succeed names, under its error, where to look: its worktree when it was kept, and its last
    attempt's stderr log.
    """
    s = report.summary
    took = f"{s.total_execution_time:.2f} s"
    if wall_s is not None and s.total_execution_time > wall_s + 1.0:  # a resumed run
        took = f"{wall_s:.2f} s (resumed; {s.total_execution_time:.2f} s since it first started)"
    title = f"run {report.run_id}: {outcome_line(report)} in {took}"
    total = s.usage
    if total is not None:
        tokens = total.total_tokens or total.input_tokens + total.output_tokens
        # A cost is told when at least one task said what it cost (or part of it), as a
        # lower bound when some task's is not known.
        known = total.cost_unknown < total.tasks or total.cost_usd > 0
        cost = total.cost_usd if known else None
        title += f"; spent {spent(tokens, cost, at_least=total.cost_unknown > 0)}"
    listed = listed_results(report)
    unlisted = s.total_tasks - len(listed)
    caption = None
    if unlisted:
        caption = (
            f"{unlisted} of {s.total_tasks} tasks not listed (a run of more than {LISTED} "
            f"lists only the tasks that did not succeed, at most {LISTED}); the report has each"
        )
    table = Table(title=Text(title), caption=Text(caption) if caption else None)
    spending = total is not None
    checked = any(r.checks for r in listed)
    columns: tuple[str, ...] = ("task", "agent", "status", "tries", "time")
    columns += ("checks",) if checked else ()
    columns += ("spent", "commit") if spending else ("commit",)
    for name in columns:
        table.add_column(name, no_wrap=True)
    table.add_column("error", overflow="fold")
    run_dir = Path(report.run_dir)
    for r in listed:
        table.add_row(*_row(r, run_dir, checked=checked, spending=spending))
    return table


def _row(r: TaskResult, run_dir: Path, *, checked: bool, spending: bool) -> list[str | Text]:
    status = "not needed" if not_needed(r) else r.status
    lines = [r.error.message] if r.error else []
    if not r.succeeded and not not_needed(r):
        if r.worktree:
            lines.append(f"worktree: {r.worktree}")
        last = r.attempt_log[-1] if r.attempt_log else None
        if last is not None and last.stderr is not None and last.stderr.size:
            lines.append(f"stderr: {run_dir / last.stderr.path}")
    return [
        Text(r.task_id),
        Text(r.agent),
        Text(status, style=_STYLE.get(r.status, "") if status != "not needed" else "dim"),
        str(r.attempts),
        f"{r.timings.duration_s:.2f}s",
        *((_checks_of(r),) if checked else ()),
        *((_spent_of(r),) if spending else ()),
        (r.provenance.result_commit or "")[:10],
        Text("\n".join(lines)),
    ]


def spent(tokens: int | None, cost_usd: float | None, *, at_least: bool = False) -> str:
    """What a task or a run spent, as the tables show it: ``12.3k tokens, $0.42``; with
    *at_least*, the cost is what is known of it (``at least $0.42``)."""
    parts = []
    if tokens:
        parts.append(f"{tokens / 1000:.1f}k tokens" if tokens >= 1000 else f"{tokens} tokens")
    if cost_usd is not None:
        parts.append(f"{'at least ' if at_least else ''}${cost_usd:.2f}")
    return ", ".join(parts)


def _checks_of(result: TaskResult) -> str:
    """``2/3``: of the last turn's required checks, how many passed (a setup step that
    failed shows as ``setup failed``); empty for a task with none."""
    if not result.checks:
        return ""
    last = max(c.turn for c in result.checks)
    turn = [c for c in result.checks if c.turn == last]
    if any(c.phase == "setup" and c.required and not c.passed for c in turn):
        return "setup failed"
    required = [c for c in turn if c.phase == "check" and c.required]
    return f"{sum(c.passed for c in required)}/{len(required)}"


def _spent_of(result: TaskResult) -> str:
    usage = result.usage
    if usage is None:
        return ""
    tokens = usage.total_tokens or (usage.input_tokens or 0) + (usage.output_tokens or 0)
    return spent(tokens, usage.cost_usd, at_least=usage.cost_source == "partial")
