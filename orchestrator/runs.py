"""The runs of a repository: what each is (live, finished, interrupted), and resuming one."""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from envelopes import Plan

from ._fs import read_json
from .errors import OrchestratorError, PlanChanged, RunAlreadyFinished
from .journal import JOURNAL, JournalCorrupt, read_journal
from .locks import RunLock
from .recovery import replay

__all__ = ["PlanChanged", "RunAlreadyFinished", "RunInfo", "find_resumable", "list_runs"]

RunState = Literal["live", "finished", "interrupted", "superseded", "unknown"]


@dataclass
class RunInfo:
    """One run directory, as its journal and lock describe it."""

    run_id: str
    run_dir: Path
    state: RunState
    plan_name: str | None = None
    plan_sha256: str | None = None
    plan_file: str | None = None
    started_at: datetime | None = None
    last_activity: datetime | None = None
    total_tasks: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        """The row of ``orchestrator runs --json``."""
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "state": self.state,
            "plan_name": self.plan_name,
            "plan_file": self.plan_file,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "last_activity": self.last_activity.isoformat() if self.last_activity else None,
            "total_tasks": self.total_tasks,
            "counts": self.counts,
        }


def describe_run(run_dir: Path) -> RunInfo:
    """What *run_dir* holds. A run whose journal cannot be read is ``unknown``."""
    info = RunInfo(run_id=run_dir.name, run_dir=run_dir, state="unknown")
    journal = run_dir / JOURNAL
    with contextlib.suppress(OSError, ValueError):
        info.last_activity = datetime.fromtimestamp(
            max(p.stat().st_mtime for p in run_dir.iterdir()), UTC
        )
    try:
        record = replay(read_journal(journal), run_dir.name)
    except (OrchestratorError, JournalCorrupt, ValueError):
        if RunLock(run_dir).is_held():
            info.state = "live"
        return info
    settings = record.settings
    info.settings = settings
    info.plan_name = settings.get("plan_name")
    info.plan_sha256 = settings.get("plan_sha256")
    info.plan_file = settings.get("plan_file")
    with contextlib.suppress(KeyError, TypeError, ValueError):
        info.started_at = datetime.fromisoformat(settings["at"])
    info.counts = dict(Counter(r.status for r in record.results.values()))
    if record.finished:
        # The report counts every task, those never started (skipped, say) included.
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            report = read_json(run_dir / "report.json")
            info.counts = dict(Counter(str(r["status"]) for r in report["results"]))
    info.total_tasks = _total_tasks(run_dir)
    if RunLock(run_dir).is_held():
        info.state = "live"
    elif record.finished:
        info.state = "finished"
    elif record.superseded_by is not None:
        info.state = "superseded"  # run --resume --force started another run in its place
    else:
        info.state = "interrupted"
    return info


def _total_tasks(run_dir: Path) -> int | None:
    try:
        data = read_json(run_dir / "plan.json")
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("envelopes"), list):
        return len(data["envelopes"])
    try:
        from envelopes import expand_tasks

        return len(expand_tasks(Plan.model_validate(data)))
    except ValueError:
        return None


def list_runs(state_dir: Path) -> list[RunInfo]:
    """Every run under *state_dir*, oldest first."""
    runs = state_dir / "runs"
    if not runs.is_dir():
        return []
    infos = [describe_run(path) for path in runs.iterdir() if path.is_dir()]
    # A run id sorts by its start to the second; runs started within one second go by their
    # journal's start time.
    infos.sort(
        key=lambda i: (i.run_id[:15], i.started_at.timestamp() if i.started_at else 0.0, i.run_id)
    )
    return infos


def find_resumable(
    state_dir: Path, plan_sha256: str, plan_file: str | None, *, rerun: bool = False
) -> str | None:
    """The interrupted run of the plan with digest *plan_sha256* to go on with, or None
    (start a new run).

    When the plan's latest run finished, there is nothing to do (RunAlreadyFinished, naming
    it), unless *rerun*. Otherwise the latest interrupted run is resumed, if there is one. OrchestratorError when one cannot be resumed: it is
    still running, or the plan file changed since an interrupted run of it started.
    """
    runs = list_runs(state_dir)
    same = [r for r in runs if r.plan_sha256 == plan_sha256 and r.state != "superseded"]
    if same and same[-1].state == "finished" and not rerun:
        raise RunAlreadyFinished(same[-1].run_id, same[-1].run_dir)
    interrupted = [r for r in same if r.state == "interrupted"]
    if interrupted:
        return interrupted[-1].run_id
    live = [r for r in same if r.state == "live"]
    if live:
        raise OrchestratorError(f"run {live[-1].run_id} of this plan is still running")
    changed = [
        r
        for r in runs
        if plan_file is not None and r.plan_file == plan_file and r.state == "interrupted"
    ]
    if changed:
        raise PlanChanged(changed[-1].run_id)
    return None
