"""Showing a run: live progress on a terminal, one line per event otherwise, a summary table.

Built on the same events library users receive (``on_event``). rich is imported here only,
and this module only when a run starts, so ``orchestrator --help`` stays fast.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from envelopes import (
    AttemptFailed,
    GroupDecided,
    MergeFinished,
    MergePredicted,
    Report,
    RunStarted,
    TaskFinished,
    TaskRetrying,
    TaskSkipped,
    TaskStarted,
)
from envelopes._events import Event

__all__ = ["Progress", "summary_table"]

_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "timed_out": "yellow",
    "cancelled": "magenta",
    "skipped": "magenta",
    "running": "cyan",
    "waiting": "dim",
}


class _Console(Console):
    """A console that goes quiet when its reader goes away, instead of exiting the process."""

    def on_broken_pipe(self) -> None:
        self.quiet = True


class Progress:
    """Receives events; draws a live table on a terminal, else writes a line per event."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.console = _Console(file=self.stream, highlight=False)
        self.live_mode = self.console.is_terminal if live is None else live
        self.rows: dict[str, list[str]] = {}
        self.total = 0
        self._live: Live | None = None
        self.closed = False

    def __enter__(self) -> Progress:
        if self.live_mode:
            self._live = Live(
                self._table(), console=self.console, refresh_per_second=8, transient=True
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def __call__(self, event: Event) -> None:
        line = self._record(event)
        if self.closed:
            return
        try:
            if self._live is not None:
                self._live.update(self._table())
            elif line:
                self.console.print(line, markup=False, soft_wrap=True)
        except OSError:
            # The reader went away (`| head`, a closed terminal): progress is a courtesy, so
            # the run goes on without it rather than dying of a broken pipe.
            self.closed = True

    def _record(self, event: Event) -> str | None:
        if isinstance(event, RunStarted):
            self.total = event.total_tasks
            return f"run {event.run_id}: {event.total_tasks} tasks from {event.base_commit or 'no repository'} (run dir {event.run_dir})"
        if isinstance(event, TaskStarted):
            self.rows[event.task_id] = [event.task_id, event.agent, "running", "", ""]
            return f"task {event.task_id} started ({event.agent})"
        if isinstance(event, AttemptFailed):
            return f"task {event.task_id} attempt {event.attempt} {event.status}: {event.error.message}"
        if isinstance(event, TaskRetrying):
            return (
                f"task {event.task_id} retrying (attempt {event.attempt}) in {event.wait_s:.1f} s"
            )
        if isinstance(event, TaskFinished):
            commit = (event.result_commit or "")[:10]
            self.rows[event.task_id] = [
                event.task_id,
                event.agent,
                event.status,
                f"{event.duration_s:.2f}s",
                commit,
            ]
            why = f": {event.error.message}" if event.error else ""
            return f"task {event.task_id} {event.status} in {event.duration_s:.2f} s, {event.attempts} attempt(s){' ' + commit if commit else ''}{why}"
        if isinstance(event, TaskSkipped):
            self.rows[event.task_id] = [event.task_id, event.agent, "skipped", "", ""]
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

    def _table(self) -> Table:
        done = sum(1 for row in self.rows.values() if row[2] not in ("running",))
        table = Table(title=f"{done}/{self.total} tasks finished", expand=False)
        for name in ("task", "agent", "status", "time", "commit"):
            table.add_column(name)
        for row in self.rows.values():
            table.add_row(row[0], row[1], f"[{_STYLE.get(row[2], '')}]{row[2]}[/]", row[3], row[4])
        return table


def summary_table(report: Report) -> Table:
    """The closing table: one row per task, then the totals."""
    s = report.summary
    table = Table(
        title=f"run {report.run_id}: {s.successful}/{s.total_tasks} succeeded in {s.total_execution_time:.2f} s"
    )
    for name in ("task", "agent", "status", "tries", "time", "commit"):
        table.add_column(name, no_wrap=True)
    table.add_column("error", overflow="fold")
    for r in report.results:
        table.add_row(
            r.task_id,
            r.agent,
            f"[{_STYLE.get(r.status, '')}]{r.status}[/]",
            str(r.attempts),
            f"{r.timings.duration_s:.2f}s",
            (r.provenance.result_commit or "")[:10],
            r.error.message if r.error else "",
        )
    return table
