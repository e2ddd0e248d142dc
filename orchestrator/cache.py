"""The result cache: the same work on the same code, in the same environment, by the same agent.

Opt-in (``cache: true`` in a plan or a task), because agents are not deterministic: a hit
means "this was done before", not "this would come out the same". The key is the SHA-256 of

- the envelope's digest without its run id (the task, inputs, requirements, env, what its
  dependencies produced, ...),
- the commit the task starts from,
- the environment's digest (the interpreter the venv is made from; the requirements are in
  the envelope),
- the agent's digest (the command with ``{plan_dir}`` filled in, a fingerprint of each file
  it names, the agent's env; or the callable's name),

like Bazel's action key. Entries are files ``<state_dir>/cache/<key>.json``, each written
atomically, holding the sealed result that produced them. A hit is served only if that
result's branch still exists and holds its commit; otherwise it is a miss, not an error.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from envelopes import (
    MAX_ENVELOPE_BYTES,
    CachedFrom,
    HandoffEnvelope,
    LogFile,
    Metrics,
    TaskResult,
    Timings,
    digest,
    loads_bounded,
    read_logged,
    seal_result,
)

from ._fs import atomic_write, read_json
from .agents import Agent
from .repo import Repository
from .settings import RunSettings

__all__ = [
    "CacheEntry",
    "agent_digest",
    "cache_key",
    "clear_cache",
    "list_cache",
    "lookup",
    "reusable_results",
    "store",
    "usable",
    "workspace_of",
]

CACHE = "cache"


def _environment_digest() -> str:
    return digest(
        {"python": platform.python_version(), "implementation": platform.python_implementation()}
    )


def workspace_of(settings: RunSettings) -> dict[str, Any]:
    """The run's settings that make what an agent starts from, for :func:`agent_digest`:
    its ``hooks`` and ``copy`` (empty when it has neither)."""
    found: dict[str, Any] = {}
    if settings.hooks is not None:
        found["hooks"] = settings.hooks.model_dump(mode="json")
    if settings.copy_paths:
        found["copy"] = list(settings.copy_paths)
    return found


def agent_digest(agent: Agent, plan_dir: Path, workspace: Mapping[str, Any] | None = None) -> str:
    """What the cache key says about an agent: its kind's fingerprint (``Agent.fingerprint``),
    and, when the run has any, the *workspace* settings that make what the agent starts from
    (the plan's ``hooks`` and ``copy`` as written: a copied file's content is not in the key).

    A command is its command with ``{plan_dir}`` filled in, its env, and a fingerprint of the
    program and of each file the plan ships with it (an argument written ``{plan_dir}/...``),
    so that an edited agent script is another agent; a callable is its qualified name (its
    code is not fingerprinted). Blocking. Computed when a run starts and journaled, so that a
    later run compares with the agent as it was then."""
    fingerprint = agent.fingerprint(plan_dir)
    if not workspace:
        return fingerprint  # the key of a run without hooks or copies is as it always was
    return digest({"agent": fingerprint, "workspace": dict(workspace)})


def cache_key(envelope: HandoffEnvelope, base_commit: str | None, agent: str) -> str:
    """The task's cache key (see the module's docstring); *agent* is its :func:`agent_digest`."""
    work = envelope.model_copy(update={"run_id": None}).sha256()
    return digest(
        {
            "envelope": work,
            "base_commit": base_commit,
            "environment": _environment_digest(),
            "agent": agent,
        }
    )


@dataclass(frozen=True)
class CacheEntry:
    """One cached result: its key, what produced it, and when."""

    key: str
    path: Path
    task_id: str
    run_id: str
    created_at: str
    result_commit: str | None
    branch: str | None


def _entry_path(state_dir: Path, key: str) -> Path:
    return state_dir / CACHE / f"{key}.json"


async def lookup(
    repo: Repository | None, state_dir: Path, key: str
) -> tuple[TaskResult, str] | None:
    """The cached result for *key* and the run that produced it, if there is a usable one."""
    path = _entry_path(state_dir, key)
    try:
        data = await anyio.to_thread.run_sync(read_json, path)
        result = TaskResult.model_validate(data["result"])
        run_id = str(data["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no entry, or one that cannot be read: a miss
    return (result, run_id) if await usable(repo, result) else None


async def usable(repo: Repository | None, result: TaskResult) -> bool:
    """Whether *result*'s work is still there: its branch holds its commit (or it has none)."""
    commit, branch = result.provenance.result_commit, result.branch
    if commit is None:
        return True
    if repo is None or branch is None:
        return False
    held = await repo.git.run(
        "merge-base", "--is-ancestor", commit, f"refs/heads/{branch}", check=False
    )
    return held.returncode == 0  # else the branch was deleted or moved away


async def store(state_dir: Path, key: str, run_id: str, result: TaskResult) -> None:
    """Remember *result* (a success) under *key*."""
    data = {
        "key": key,
        "run_id": run_id,
        "task_id": result.task_id,
        "created_at": datetime.now(UTC).isoformat(),
        "result": result.model_dump(mode="json"),
    }
    payload = (json.dumps(data, indent=1) + "\n").encode()
    await anyio.to_thread.run_sync(atomic_write, _entry_path(state_dir, key), payload)


def cached_result(
    earlier: TaskResult,
    *,
    envelope: HandoffEnvelope,
    envelope_file: LogFile,
    key: str,
    run_id: str,
    started: datetime,
    clock: float,
    queued_at: datetime | None = None,
) -> TaskResult:
    """This run's ``cached`` result, from *earlier* (produced by run *run_id*)."""
    provenance = earlier.provenance.model_copy(
        update={
            "envelope_sha256": envelope.sha256(),
            "stdout_sha256": None,
            "stderr_sha256": None,
            "commands": [],
            "cached_from": CachedFrom(run_id=run_id, task_id=earlier.task_id, key=key),
        }
    )
    result = earlier.model_copy(
        update={
            "task_id": envelope.task_id,
            "agent": envelope.agent,
            "status": "cached",
            "attempts": 0,
            "exit_code": None,
            "error": None,
            "usage": None,  # spent by the run that produced it, not by this one
            "timings": Timings(
                started_at=started,
                finished_at=datetime.now(UTC),
                duration_s=round(time.monotonic() - clock, 6),
                queued_at=queued_at,
            ),
            "metrics": Metrics(),
            "worktree": None,
            "envelope": envelope_file,
            "attempt_log": [],
            "group": envelope.group,
            "depends_on": envelope.depends_on,
            "resumed": False,
            "provenance": provenance,
        }
    )
    return seal_result(result)


def list_cache(state_dir: Path) -> list[CacheEntry]:
    """Every entry, oldest first (unreadable files are skipped)."""
    directory = state_dir / CACHE
    entries: list[CacheEntry] = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            data: dict[str, Any] = read_json(path)
            result = data["result"]
            entries.append(
                CacheEntry(
                    key=data["key"],
                    path=path,
                    task_id=data["task_id"],
                    run_id=data["run_id"],
                    created_at=data["created_at"],
                    result_commit=result["provenance"]["result_commit"],
                    branch=result["branch"],
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(entries, key=lambda e: e.created_at)


def clear_cache(state_dir: Path) -> int:
    """Remove every entry; how many there were."""
    directory = state_dir / CACHE
    removed = 0
    for path in directory.glob("*.json") if directory.is_dir() else []:
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def reusable_results(
    run_dir: Path, results: Mapping[str, TaskResult], agents: Mapping[str, str]
) -> dict[str, tuple[TaskResult, str]]:
    """The successes of the run in *run_dir*, by the cache key of the work that made them.

    For a new run that reuses what still matches from an interrupted one (``run --resume
    --force``): a task of the new run whose key is here gets that result, as ``cached``.
    *agents* holds the :func:`agent_digest` of that run's own agents, by name.
    """
    out: dict[str, tuple[TaskResult, str]] = {}
    for result in results.values():
        if not result.succeeded or result.envelope is None:
            continue
        try:
            entry = result.envelope
            data = read_logged(
                entry.path,
                size=entry.size,
                offset=entry.offset,
                limit=MAX_ENVELOPE_BYTES,
                within=run_dir,
            )
            envelope = HandoffEnvelope.model_validate(loads_bounded(data))
        except (OSError, ValueError):
            continue
        agent = agents.get(envelope.agent)
        if agent is not None:
            key = cache_key(envelope, result.provenance.base_commit, agent)
            out[key] = (result, run_dir.name)
    return out
