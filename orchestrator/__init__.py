"""worktree-orchestrator: fan work out to many agents at once, each in its own git worktree
and virtualenv, and collect a results report with verifiable provenance.

What an application embedding the orchestrator needs is here: the three ways into a run
(``orchestrate_parallel``, ``resume_run``, ``run_events``), its settings, the agent protocol
for kinds of one's own, loading plans, verifying and merging reports, and the exceptions. The
engine's modules (``orchestrator.worktree``, ``orchestrator.subagent`` and the rest) are
importable, but they are its inner workings, not a promise.

The names below are imported on first use (PEP 562), so that ``orchestrator --help`` and the
other quick commands start without the engine, pydantic or anyio. Type checkers see ordinary
imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

if TYPE_CHECKING:
    from envelopes import build_envelope as build_envelope

    from .agents import Agent as Agent
    from .agents import AttemptOutcome as AttemptOutcome
    from .agents import AttemptRequest as AttemptRequest
    from .agents import Workspace as Workspace
    from .coordinator import orchestrate_parallel as orchestrate_parallel
    from .coordinator import resume_run as resume_run
    from .coordinator import run_events as run_events
    from .dask_executor import DaskExecutor as DaskExecutor
    from .errors import ExecutorError as ExecutorError
    from .errors import GitError as GitError
    from .errors import MergeError as MergeError
    from .errors import NotARepository as NotARepository
    from .errors import OrchestratorError as OrchestratorError
    from .errors import PlanError as PlanError
    from .errors import PlanIssue as PlanIssue
    from .errors import ReportUnreadable as ReportUnreadable
    from .errors import RunDirError as RunDirError
    from .errors import RunInUse as RunInUse
    from .errors import SettingsError as SettingsError
    from .errors import VenvError as VenvError
    from .events import RunEvents as RunEvents
    from .mergeback import merge_results as merge_results
    from .mergeback import record_merge as record_merge
    from .mergecheck import MergeCheckSettings as MergeCheckSettings
    from .plan import LoadedPlan as LoadedPlan
    from .plan import load_plan as load_plan
    from .repo import Repository as Repository
    from .settings import RunSettings as RunSettings
    from .verify import VerifyOutcome as VerifyOutcome
    from .verify import verify_report as verify_report

#: Where each public name lives.
_EXPORTS: dict[str, str] = {
    "build_envelope": "envelopes",
    "Agent": ".agents",
    "AttemptOutcome": ".agents",
    "AttemptRequest": ".agents",
    "Workspace": ".agents",
    "orchestrate_parallel": ".coordinator",
    "resume_run": ".coordinator",
    "run_events": ".coordinator",
    "DaskExecutor": ".dask_executor",
    "ExecutorError": ".errors",
    "GitError": ".errors",
    "MergeError": ".errors",
    "NotARepository": ".errors",
    "OrchestratorError": ".errors",
    "PlanError": ".errors",
    "PlanIssue": ".errors",
    "ReportUnreadable": ".errors",
    "RunDirError": ".errors",
    "RunInUse": ".errors",
    "SettingsError": ".errors",
    "VenvError": ".errors",
    "RunEvents": ".events",
    "merge_results": ".mergeback",
    "record_merge": ".mergeback",
    "MergeCheckSettings": ".mergecheck",
    "LoadedPlan": ".plan",
    "load_plan": ".plan",
    "Repository": ".repo",
    "RunSettings": ".settings",
    "VerifyOutcome": ".verify",
    "verify_report": ".verify",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Agent",
    "AttemptOutcome",
    "AttemptRequest",
    "DaskExecutor",
    "ExecutorError",
    "GitError",
    "LoadedPlan",
    "MergeCheckSettings",
    "MergeError",
    "NotARepository",
    "OrchestratorError",
    "PlanError",
    "PlanIssue",
    "ReportUnreadable",
    "Repository",
    "RunDirError",
    "RunEvents",
    "RunInUse",
    "RunSettings",
    "SettingsError",
    "VenvError",
    "VerifyOutcome",
    "Workspace",
    "__version__",
    "build_envelope",
    "load_plan",
    "merge_results",
    "orchestrate_parallel",
    "record_merge",
    "resume_run",
    "run_events",
    "verify_report",
]
