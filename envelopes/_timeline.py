"""Check a result's timings against themselves: what the HTML report's timeline is drawn from.

A task's ``timings`` hold its totals per phase (``agent_s``) and, since they were recorded,
each stretch of each phase (``phases``, seconds from ``started_at``) and when it was queued
(``queued_at``). The timeline draws the stretches; ``verify`` checks here that they are the
totals the report states, that they lie within the task's run, in order, and that the task
was queued before it started (unless it ran on a Dask worker, whose clock is another's). Reports from before ``phases`` (none recorded) are not held to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, get_args

from ._result import PhaseName

__all__ = ["audit_timings"]

#: Rounding slack: every number is written rounded to the microsecond.
_EPSILON = 2e-6

_PHASES: tuple[str, ...] = get_args(PhaseName)


def audit_timings(raw: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """``(field, message)`` for each thing in result *raw*'s timings that does not hold."""
    timings = raw["timings"]
    started = datetime.fromisoformat(timings["started_at"])
    if datetime.fromisoformat(timings["finished_at"]) < started:
        yield "timings.finished_at", "before the task started"
    queued = timings.get("queued_at")
    # A task run on a Dask worker was queued by the coordinator's clock and started by the
    # worker's, which may differ by more than the wait.
    remote = any(a.get("worker") for a in raw.get("attempt_log", []))
    if queued is not None and not remote and datetime.fromisoformat(queued) > started:
        yield "timings.queued_at", "after the task started"
    phases = timings.get("phases") or []
    if not phases:
        return
    duration = timings["duration_s"]
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    previous = 0.0
    for i, span in enumerate(phases):
        where = f"timings.phases[{i}]"
        if span["end_s"] < span["start_s"]:
            yield where, f"ends ({span['end_s']}) before it starts ({span['start_s']})"
        if span["end_s"] > duration + _EPSILON:
            yield where, f"ends after the task ({span['end_s']} > {duration})"
        if span["start_s"] < previous - _EPSILON:
            yield where, "starts before the phase recorded before it"
        previous = span["start_s"]
        totals[span["name"]] = totals.get(span["name"], 0.0) + span["end_s"] - span["start_s"]
        counts[span["name"]] = counts.get(span["name"], 0) + 1
    for name in _PHASES:
        stated = timings.get(f"{name}_s") or 0.0
        found = totals.get(name, 0.0)
        if abs(stated - found) > _EPSILON * (counts.get(name, 0) + 1):
            yield (
                f"timings.{name}_s",
                f"is {stated}, its stretches in timings.phases add up to {round(found, 6)}",
            )
