"""After an orchestrator died: what its journal says, and clearing what it left behind.

Used by resume (a run goes on where it stopped) and by ``gc`` (runs nobody will resume).
Everything here assumes the run is dead: its caller holds the run's lock, or found it free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from envelopes import TaskResult, ref_safe, seal_result

from ._fs import remove_tree
from ._git import LIST_REFS_TIMEOUT_S
from .errors import GitError, JournalCorrupt, OrchestratorError
from .journal import JournalContents
from .process import kill_tagged
from .repo import Repository
from .worktree import admin_dir_by_scan, admin_dir_from_file, drop_admin_dir

__all__ = ["RunRecord", "clear_task_leftovers", "kill_orphans", "replay"]

#: Where the branch of an interrupted task goes when it holds commits (the agent's own, or a
#: commit made just before the crash): out of refs/heads, so that the task's branch name is
#: free for its re-run, and never deleted by the orchestrator except by ``gc --branches``.
INTERRUPTED_REFS = "refs/orchestrator/interrupted"


@dataclass
class RunRecord:
    """What a journal says about a run: its settings, results, and where its tasks started."""

    settings: dict[str, Any]
    results: dict[str, TaskResult] = field(default_factory=dict)
    worktrees: dict[str, dict[str, Any]] = field(default_factory=dict)
    finished: bool = False
    superseded_by: str | None = None
    sessions: int = 1


def replay(contents: JournalContents, run_id: str) -> RunRecord:
    """The run as its journal records it; OrchestratorError if the journal has no run record."""
    runs = contents.of_type("run")
    if not runs:
        raise OrchestratorError(
            f"run {run_id} has no journal to resume from (it never got going, or an older "
            "orchestrator made it)"
        )
    record = RunRecord(settings=runs[0])
    for entry in contents.records:
        kind = entry.get("type")
        if kind == "result":
            # A record without its result is no result (ValidationError, a ValueError).
            result = TaskResult.model_validate(entry.get("result"))
            record.results[result.task_id] = result
        elif kind == "worktree":
            task = entry.get("task")
            if not isinstance(task, str):
                raise JournalCorrupt(f"run {run_id}'s journal has a worktree record without a task")
            record.worktrees[task] = entry
        elif kind == "finished":
            record.finished = True
        elif kind == "superseded":
            record.superseded_by = entry.get("by")
        elif kind == "resumed":
            record.sessions += 1
    return record


def carried_over(result: TaskResult) -> TaskResult:
    """*result* as a resumed run reports it: the same, marked ``resumed``, re-sealed."""
    return seal_result(result.model_copy(update={"resumed": True}))


def kill_orphans(run_id: str) -> int:
    """Kill the agent processes a dead orchestrator of *run_id* left running."""
    return kill_tagged(f"{run_id}/", prefix=True)


async def clear_task_leftovers(
    repo: Repository,
    state_dir: Path,
    run_id: str,
    task_id: str,
    worktree: Mapping[str, Any] | None,
    *,
    keep_branch: bool = False,
) -> list[str]:
    """Remove what an unfinished task of a dead run left: worktree, its entry, venv, branch.

    The branch is deleted when it still points where the task started (*worktree*, the
    journal's record of its worktree) or when no worktree was recorded (the crash came
    before the agent could run); a branch holding commits is moved under
    ``refs/orchestrator/interrupted/`` instead, so nothing is lost. Stale git lock files of
    the branch go too. With *keep_branch* (a finished task whose worktree the crash left
    behind), the branch is not touched. Returns what was done, one line each.
    """
    done: list[str] = []
    name = ref_safe(task_id)
    path = state_dir / "worktrees" / run_id / name
    venv = state_dir / "venvs" / run_id / name
    async with repo.lock.hold():
        admin = admin_dir_from_file(path) or admin_dir_by_scan(repo, path)
        if path.exists():
            await anyio.to_thread.run_sync(remove_tree, path, True)
            done.append(f"removed worktree {path}")
        if admin is not None and admin.exists():
            await drop_admin_dir(repo, admin)
            done.append(f"removed worktree entry {admin}")
        branch = f"orchestrator/{run_id}/{name}"
        ref = f"refs/heads/{branch}"
        lock = repo.common_dir / f"{ref}.lock"
        if lock.exists():
            lock.unlink(missing_ok=True)
            done.append(f"removed stale lock {lock}")
        tip = ""
        if not keep_branch:
            repo.git.unblock_ref(ref)  # a FIFO left there would block git for ever
            found = await repo.git.run(
                "rev-parse", "--verify", "--quiet", "--end-of-options", ref, check=False
            )
            tip = found.stdout.decode().strip()
        if tip:
            base = worktree.get("base_commit") if worktree else None
            if base is None or tip == base:
                await repo.git.run("update-ref", "-d", "--end-of-options", ref, tip)
                done.append(f"deleted branch {branch} (no work on it)")
            else:
                kept = await _free_interrupted_ref(repo, run_id, name)
                try:
                    await repo.git.run("update-ref", "--end-of-options", kept, tip, "")
                    await repo.git.run("update-ref", "-d", "--end-of-options", ref, tip)
                except GitError as exc:
                    raise OrchestratorError(
                        f"cannot move the interrupted branch {branch} aside: {exc}"
                    ) from exc
                done.append(f"moved branch {branch} (it holds commits) to {kept}")
    if venv.exists():
        await anyio.to_thread.run_sync(remove_tree, venv, True)
        done.append(f"removed venv {venv}")
    return done


async def _free_interrupted_ref(repo: Repository, run_id: str, name: str) -> str:
    out = await repo.git.out(
        "for-each-ref",
        "--format=%(refname)",
        f"{INTERRUPTED_REFS}/{run_id}/{name}/",
        timeout=LIST_REFS_TIMEOUT_S,
    )
    return f"{INTERRUPTED_REFS}/{run_id}/{name}/{len(out.split()) + 1}"
