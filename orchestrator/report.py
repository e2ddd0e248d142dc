"""Building the results report and writing it atomically."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, overload

import anyio

from envelopes import (
    REPORT_SCHEMA,
    SUCCESSFUL,
    AgentSummary,
    GroupMember,
    GroupReport,
    Rates,
    Report,
    ReportError,
    SealedResults,
    Select,
    Summary,
    TaskResult,
    UsageTotals,
    json_line,
    report_chunks,
    report_layout,
    seal_report,
    usage_by_model,
    usage_totals,
)

from ._fs import atomic_write
from ._version import __version__
from .results import Brief

__all__ = ["ResultLines", "aggregate_results", "report_bytes", "report_pieces", "write_report"]

_STATUS_KEY = {
    "succeeded": "successful",
    "failed": "failed",
    "timed_out": "timeout",
    "cancelled": "cancelled",
    "skipped": "skipped",
    "cached": "successful",
}


def aggregate_results(
    results: Sequence[TaskResult],
    *,
    run_id: str,
    plan_name: str,
    plan_sha256: str,
    repo: str | None,
    base_ref: str | None,
    base_commit: str | None,
    run_dir: Path,
    started_at: datetime,
    finished_at: datetime,
    groups: Mapping[str, tuple[Select, list[str] | None]] | None = None,
    warnings: Sequence[str] = (),
    pricing: Mapping[str, Rates] | None = None,
    briefs: Sequence[Brief] | None = None,
) -> Report:
    """The sealed Report of a run: summary, per-agent counts, errors, groups, every result.

    *groups* gives each matrix group's ``select`` policy and, where the run decided it, its
    selected members; undecided, a group selects its succeeded members (``all``) or its
    first succeeded member in plan order (``first_success``). *pricing* is the rates the run
    estimated costs with, recorded so that ``verify`` can recompute them.

    *results* may be a :class:`~envelopes.SealedResults`, which the report then holds as it
    is; *briefs* (one per result, in order) are what the counts are made from, so that no
    result's model is made for them.
    """
    if briefs is None:
        briefs = [Brief.of(r) for r in results]
    elif len(briefs) != len(results):
        raise ValueError("aggregate_results needs a brief for each result")
    errors = [
        ReportError(task_id=b.task_id, agent=b.agent, kind=b.error.kind, message=b.error.message)
        for b in briefs
        if b.status not in SUCCESSFUL and b.error is not None
    ]
    report = Report(
        tool={"name": "worktree-orchestrator", "version": __version__},
        run_id=run_id,
        plan_name=plan_name,
        plan_sha256=plan_sha256,
        repo=repo,
        base_ref=base_ref,
        base_commit=base_commit,
        run_dir=str(run_dir),
        started_at=started_at,
        finished_at=finished_at,
        summary=_summary(briefs, started_at, finished_at),
        results=results if isinstance(results, SealedResults) else list(results),
        results_by_agent=_by_agent(briefs),
        errors=errors,
        groups=_groups(briefs, groups or {}),
        usage_by_model={
            model: UsageTotals.model_validate(totals)
            for model, totals in usage_by_model(
                {"usage": b.usage.model_dump(mode="json") if b.usage else None} for b in briefs
            ).items()
        },
        warnings=list(warnings),
        pricing=dict(pricing or {}),
    )
    return seal_report(report)


def _summary(briefs: Sequence[Brief], started_at: datetime, finished_at: datetime) -> Summary:
    counts = Counter(b.status for b in briefs)
    total = len(briefs)
    successful = counts["succeeded"] + counts["cached"]
    return Summary(
        total_tasks=total,
        successful=successful,
        failed=counts["failed"],
        timeout=counts["timed_out"],
        cancelled=counts["cancelled"],
        skipped=counts["skipped"],
        cached=counts["cached"],
        success_rate=round(100.0 * successful / total, 2) if total else 0.0,
        total_execution_time=round((finished_at - started_at).total_seconds(), 6),
        usage=_totals(briefs),
    )


def _by_agent(briefs: Sequence[Brief]) -> dict[str, AgentSummary]:
    by_agent: dict[str, AgentSummary] = {}
    theirs: dict[str, list[Brief]] = {}
    for brief in briefs:
        entry = by_agent.setdefault(
            brief.agent,
            AgentSummary(
                total=0,
                successful=0,
                failed=0,
                timeout=0,
                cancelled=0,
                skipped=0,
                cached=0,
                task_ids=[],
            ),
        )
        entry.total += 1
        key = _STATUS_KEY[brief.status]
        setattr(entry, key, getattr(entry, key) + 1)
        if brief.status == "cached":
            entry.cached += 1
        entry.task_ids.append(brief.task_id)
        theirs.setdefault(brief.agent, []).append(brief)
    for name, entry in by_agent.items():
        entry.usage = _totals(theirs[name])
    return by_agent


def _totals(briefs: Sequence[Brief]) -> UsageTotals | None:
    totals = usage_totals(b.usage.model_dump(mode="json") if b.usage else None for b in briefs)
    return UsageTotals.model_validate(totals) if totals is not None else None


def _groups(
    briefs: Sequence[Brief], groups: Mapping[str, tuple[Select, list[str] | None]]
) -> dict[str, GroupReport]:
    members: dict[str, list[GroupMember]] = {}
    for brief in briefs:
        if brief.group is not None:
            members.setdefault(brief.group, []).append(
                GroupMember(task_id=brief.task_id, status=brief.status)
            )
    reports: dict[str, GroupReport] = {}
    for name, group in members.items():
        select, decided = groups.get(name, ("all", None))
        if decided is None:
            succeeded = [m.task_id for m in group if m.status in SUCCESSFUL]
            decided = succeeded if select == "all" else succeeded[:1]
        reports[name] = GroupReport(select=select, members=group, selected=list(decided))
    return reports


#: A result's JSON line, by task id, with the result it is the line of (see
#: :func:`envelopes.sealed_result_line`): what a run already serialised, not done again.
ResultLines = Mapping[str, tuple[TaskResult, str]]


def report_bytes(report: Report, lines: ResultLines | None = None) -> bytes:
    """The report file's content (see :func:`report_pieces`)."""
    return b"".join(report_pieces(report, lines))


def report_pieces(report: Report, lines: ResultLines | None = None) -> Iterator[bytes]:
    """The report file's content in pieces, a result each, in its schema's layout (see
    :func:`envelopes.report_layout`). A result whose line is in *lines* (for that very
    result object) is not serialised again."""
    if report.schema_ != REPORT_SCHEMA:
        yield report_layout(report.to_json_dict())
        return
    head = report.model_dump(mode="json", by_alias=True, exclude={"results"})
    raw: dict[str, Any] = {}
    for name, field in Report.model_fields.items():
        key = field.alias or name
        if name == "results":
            raw[key] = None
        elif key in head:
            raw[key] = head[key]
    if isinstance(report.results, SealedResults):
        yield from report_chunks(raw, report.results.lines)
    else:
        yield from report_chunks(raw, _LinesOf(report.results, lines or {}))


class _LinesOf(Sequence[str]):
    """The JSON lines of *results*, made as they are read."""

    def __init__(self, results: Sequence[TaskResult], lines: ResultLines) -> None:
        self._results = results
        self._lines = lines

    def __len__(self) -> int:
        return len(self._results)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        result = self._results[index]
        known = self._lines.get(result.task_id)
        if known is not None and known[0] is result:
            return known[1]
        return json_line(result.model_dump(mode="json"))


async def write_report(
    report: Report, path: Path, *copies: Path, lines: ResultLines | None = None
) -> Path:
    """Write *report* to *path* (and each of *copies*) atomically; return *path*.

    Atomic: temp file, fsync, rename, fsync of the directory. Written a result at a time,
    never whole in memory; each result's line is taken from *lines* where it is there.
    """
    for target in (path, *copies):
        await anyio.to_thread.run_sync(atomic_write, target, report_pieces(report, lines))
    return path
