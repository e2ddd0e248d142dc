"""How a run ends: its report aggregated and written, the plan's ``merge`` done and recorded,
the webhooks given a few seconds to take the last events, the journal told the run finished,
and the run's empty directories removed.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio

from envelopes import (
    MergeFinished,
    MergeRecord,
    MergeSpec,
    Report,
    RunFinished,
    Select,
    seal_report,
)

from .context import RunContext
from .errors import GitError, MergeError
from .events import emit_run_event
from .guard import moved_refs, ref_values
from .mergeback import merge_results
from .mergecheck import MergeCheckSettings
from .notify import Webhooks
from .report import aggregate_results, write_report
from .workspace import hook_warnings

__all__ = [
    "ReportPlan",
    "journal_finished",
    "merge_at_end",
    "run_finished",
    "settle_webhooks",
    "write_final_report",
]


@dataclass
class ReportPlan:
    """What the report says of the run beyond its results, and where it is written."""

    plan_name: str
    plan_sha256: str
    started: datetime
    #: ``report.json`` in the run directory.
    file: Path
    #: Where else the report is written (``--out``).
    copies: list[Path] = field(default_factory=list)
    #: Each ``first_success`` group: its selection rule and winner (None while undecided).
    groups: dict[str, tuple[Select, list[str] | None]] = field(default_factory=dict)
    #: Every ref as the run started, to report the ones an agent moved (docs/security.md).
    refs_before: dict[str, str] = field(default_factory=dict)
    #: What the run itself has to say (its budget spent, say).
    warnings: list[str] = field(default_factory=list)


async def write_final_report(ctx: RunContext, task_ids: Sequence[str], plan: ReportPlan) -> Report:
    """Aggregate the results of *task_ids* (in ``ctx.results``, in report order) into the
    sealed report, write it, and tidy the run's directories.

    Made from what the run kept of each result (its line and its brief, see
    orchestrator/results.py): no result's model is made, except those whose ignored hooks
    the warnings name.
    """
    results = ctx.results.sealed(task_ids)
    briefs = ctx.results.briefs(task_ids)
    hooked = (results[i] for i, brief in enumerate(briefs) if brief.ignored_hooks)
    warnings = [*plan.warnings, *hook_warnings(hooked)]
    if ctx.repo is not None and plan.refs_before:
        with anyio.CancelScope(shield=True):
            try:
                warnings += moved_refs(plan.refs_before, await ref_values(ctx.repo.git), briefs)
            except GitError as exc:
                # The report is written whatever: without this check, saying why.
                warnings.append(f"the refs that moved during the run could not be listed: {exc}")
    if ctx.repo is not None and ctx.guarding and ctx.repo.git.guard is not None:
        warnings += await anyio.to_thread.run_sync(ctx.repo.git.guard.unblamed)
    report = aggregate_results(
        results,
        briefs=briefs,
        run_id=ctx.run_id,
        plan_name=plan.plan_name,
        plan_sha256=plan.plan_sha256,
        repo=str(ctx.repo.root) if ctx.repo else None,
        base_ref=ctx.base_ref,
        base_commit=ctx.base_commit,
        run_dir=ctx.run_dir,
        started_at=plan.started,
        finished_at=datetime.now(UTC),
        groups=plan.groups,
        warnings=warnings,
        pricing=ctx.settings.pricing,
    )
    await write_report(report, plan.file, *plan.copies)
    await _tidy(ctx)
    return report


async def merge_at_end(
    ctx: RunContext, report: Report, spec: MergeSpec, plan: ReportPlan
) -> Report:
    """The plan's ``merge``: when every task succeeded, merge the results; record the outcome.

    Members of a ``first_success`` group cancelled because another member won count as
    done. With ``check``, the tasks' required checks run on the combined tree first; with
    ``train``, the results are merged one at a time, each kept only if the combined tree
    still passes, and the tasks that did not succeed are left out rather than stopping the
    merge (see orchestrator/mergeback.py). The report is already on disk without the record,
    so a failure or cancellation here loses nothing; it is written again with the record.
    """
    assert ctx.repo is not None
    unfinished = [
        r
        for r in report.results
        if not r.succeeded and not (r.error is not None and r.error.kind == "not_needed")
    ]
    check = None
    if spec.check or spec.train:
        check = MergeCheckSettings(
            run_dir=ctx.run_dir,
            train=bool(spec.train),
            plan_dir=ctx.plan_dir,
            venv_backend=ctx.venv_backend,
            base_env=ctx.base_env,
            kill_grace=ctx.settings.kill_grace,
            lifeline=ctx.lifeline,
        )
    if unfinished and not spec.train:
        total = len(report.results)
        record = MergeRecord(
            into=spec.into,
            status="skipped",
            message=f"{len(unfinished)} of {total} tasks did not succeed; nothing was merged",
            at=datetime.now(UTC),
        )
        await emit_run_event(ctx, _merge_finished(ctx, record))
    else:
        try:
            record = await merge_results(
                report,
                into=spec.into,
                tasks=spec.tasks,
                repo=ctx.repo,
                on_event=lambda event: emit_run_event(ctx, event),
                check=check,
            )
        except (MergeError, GitError) as exc:
            # A git failure on the way (not one of the merge's own outcomes, which it records
            # itself) refuses the merge: the run's results stand, and the report says why.
            record = MergeRecord(
                into=spec.into, status="refused", message=str(exc)[:2000], at=datetime.now(UTC)
            )
            await emit_run_event(ctx, _merge_finished(ctx, record))
    report = seal_report(report.model_copy(update={"merge": [*report.merge, record]}))
    with anyio.CancelScope(shield=True):
        await write_report(report, plan.file, *plan.copies)
    return report


def run_finished(ctx: RunContext, report: Report, plan: ReportPlan) -> RunFinished:
    """The run's last event: where its report is, and how it went."""
    return RunFinished(
        run_id=ctx.run_id,
        report_path=str(plan.copies[0] if plan.copies else plan.file),
        successful=report.summary.successful,
        total_tasks=report.summary.total_tasks,
    )


async def settle_webhooks(
    ctx: RunContext, report: Report, plan: ReportPlan, webhooks: Webhooks
) -> Report:
    """Give the webhooks a few seconds to take the run's last events (``notify.DRAIN_S``);
    when some endpoint missed events, the report says so in its ``warnings``, written again.

    Cancellation: the wait ends, and the report stays as it was written.
    """
    warnings = await webhooks.settle()
    if not warnings:
        return report
    report = seal_report(report.model_copy(update={"warnings": [*report.warnings, *warnings]}))
    with anyio.CancelScope(shield=True):
        await write_report(report, plan.file, *plan.copies)
    return report


async def journal_finished(ctx: RunContext, report: Report) -> None:
    """The journal's last record: the run finished, with *report*'s digest (shielded: a run
    whose report is written is not left looking interrupted)."""
    if ctx.journal is None:
        return
    with anyio.CancelScope(shield=True):
        await ctx.journal.write(
            {
                "type": "finished",
                "at": datetime.now(UTC).isoformat(),
                "report_sha256": report.report_sha256,
            }
        )
        ctx.finished = True


def _merge_finished(ctx: RunContext, record: MergeRecord) -> MergeFinished:
    return MergeFinished(
        run_id=ctx.run_id,
        into=record.into,
        status=record.status,
        new_commit=record.new_commit,
        message=record.message,
    )


async def _tidy(ctx: RunContext) -> None:
    """Remove this run's empty worktree and venv directories."""

    def tidy() -> None:
        for kind in ("worktrees", "venvs"):
            path = ctx.state_dir / kind / ctx.run_id
            try:
                path.rmdir()
            except OSError:
                if path.exists() and not any(path.iterdir()):
                    shutil.rmtree(path, ignore_errors=True)

    await anyio.to_thread.run_sync(tidy)
