"""worktree-orchestrator: fan work out to many agents at once, each in its own git worktree
and virtualenv, and collect a results report with verifiable provenance.

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

    from .agents import CallableAgent as CallableAgent
    from .agents import CommandAgent as CommandAgent
    from .agents import Workspace as Workspace
    from .context import RunContext as RunContext
    from .coordinator import RunEvents as RunEvents
    from .coordinator import orchestrate_parallel as orchestrate_parallel
    from .coordinator import resume_run as resume_run
    from .coordinator import run_events as run_events
    from .errors import GitError as GitError
    from .errors import MergeError as MergeError
    from .errors import OrchestratorError as OrchestratorError
    from .errors import PlanError as PlanError
    from .errors import PlanIssue as PlanIssue
    from .errors import ReportUnreadable as ReportUnreadable
    from .errors import RunDirError as RunDirError
    from .errors import VenvError as VenvError
    from .mergeback import merge_results as merge_results
    from .mergeback import record_merge as record_merge
    from .plan import LoadedPlan as LoadedPlan
    from .plan import load_plan as load_plan
    from .repo import NotARepository as NotARepository
    from .repo import Repository as Repository
    from .report import aggregate_results as aggregate_results
    from .report import write_report as write_report
    from .subagent import run_subagent as run_subagent
    from .venv import Venv as Venv
    from .venv import setup_virtualenv as setup_virtualenv
    from .verify import VerifyOutcome as VerifyOutcome
    from .verify import verify_report as verify_report
    from .worktree import MergeOutcome as MergeOutcome
    from .worktree import Worktree as Worktree
    from .worktree import commit_worktree as commit_worktree
    from .worktree import create_worktree as create_worktree
    from .worktree import merge_worktree as merge_worktree
    from .worktree import remove_worktree as remove_worktree
    from .worktree import reset_worktree as reset_worktree

#: Where each public name lives.
_EXPORTS: dict[str, str] = {
    "build_envelope": "envelopes",
    "CallableAgent": ".agents",
    "CommandAgent": ".agents",
    "Workspace": ".agents",
    "RunContext": ".context",
    "RunEvents": ".coordinator",
    "orchestrate_parallel": ".coordinator",
    "resume_run": ".coordinator",
    "run_events": ".coordinator",
    "GitError": ".errors",
    "MergeError": ".errors",
    "OrchestratorError": ".errors",
    "PlanError": ".errors",
    "PlanIssue": ".errors",
    "ReportUnreadable": ".errors",
    "RunDirError": ".errors",
    "VenvError": ".errors",
    "merge_results": ".mergeback",
    "record_merge": ".mergeback",
    "LoadedPlan": ".plan",
    "load_plan": ".plan",
    "NotARepository": ".repo",
    "Repository": ".repo",
    "aggregate_results": ".report",
    "write_report": ".report",
    "run_subagent": ".subagent",
    "Venv": ".venv",
    "setup_virtualenv": ".venv",
    "VerifyOutcome": ".verify",
    "verify_report": ".verify",
    "MergeOutcome": ".worktree",
    "Worktree": ".worktree",
    "commit_worktree": ".worktree",
    "create_worktree": ".worktree",
    "merge_worktree": ".worktree",
    "remove_worktree": ".worktree",
    "reset_worktree": ".worktree",
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
    "CallableAgent",
    "CommandAgent",
    "GitError",
    "LoadedPlan",
    "MergeError",
    "MergeOutcome",
    "NotARepository",
    "OrchestratorError",
    "PlanError",
    "PlanIssue",
    "ReportUnreadable",
    "Repository",
    "RunContext",
    "RunDirError",
    "RunEvents",
    "Venv",
    "VenvError",
    "VerifyOutcome",
    "Workspace",
    "Worktree",
    "__version__",
    "aggregate_results",
    "build_envelope",
    "commit_worktree",
    "create_worktree",
    "load_plan",
    "merge_results",
    "merge_worktree",
    "orchestrate_parallel",
    "record_merge",
    "remove_worktree",
    "reset_worktree",
    "resume_run",
    "run_events",
    "run_subagent",
    "setup_virtualenv",
    "verify_report",
    "write_report",
]
