"""Garbage collection: what dead runs left behind, and old runs nobody needs.

A run is live while an orchestrator holds its lock (see locks.py); ``gc`` never touches a
live run. Of the others it removes:

- always: orphans. Agent processes still running, worktrees and venvs the run's report does
  not name as kept (left by a crash, or made by an orchestrator that died before writing
  one), their worktree entries, the unheld lock file, temp files, stale git lock files of the
  run's branches;
- when the run is older than the limit (its last activity): the run directory, and the
  worktrees and venvs its report kept for inspection;
- the pool's worktrees and venvs (orchestrator/pool.py) that no live run holds and that were
  last given back longer ago than the limit;
- with ``branches``: the task branches (and interrupted refs) of runs whose report is gone or
  older than the limit. A branch named by a report that is kept is never deleted.

Then ``git worktree prune`` drops the entries of worktrees whose directories are gone.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio

from envelopes import ref_safe

from ._fs import read_json, remove_tree
from ._git import LIST_REFS_TIMEOUT_S
from .errors import OrchestratorError, RunInUse
from .journal import JOURNAL, read_journal
from .locks import LOCK, RunLock
from .pool import collect_pool
from .process import find_tagged
from .recovery import INTERRUPTED_REFS, kill_orphans
from .repo import Repository
from .runs import RunInfo, describe_run
from .worktree import admin_dir_by_scan, admin_dir_from_file, drop_admin_dir

__all__ = ["GcOutcome", "collect_garbage", "parse_age"]

_AGE = re.compile(r"(\d+)\s*([smhdw]?)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 86400}


def parse_age(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``90s``, ``2w`` (a bare number is days); ValueError otherwise."""
    found = _AGE.fullmatch(text.strip())
    if not found:
        raise ValueError(f"not an age: {text!r} (use e.g. 7d, 12h, 30m)")
    return timedelta(seconds=int(found.group(1)) * _UNITS[found.group(2)])


@dataclass
class GcOutcome:
    """What :func:`collect_garbage` did (or, dry, would do), one line each."""

    done: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    dry_run: bool = False


async def collect_garbage(
    repo: Repository,
    *,
    older_than: timedelta = timedelta(days=7),
    branches: bool = False,
    dry_run: bool = False,
) -> GcOutcome:
    """Remove what runs of *repo* that are not live left behind; see the module docstring.

    Each run is cleaned while gc holds its lock, so a run that comes alive meanwhile (a
    resume) is either refused by that lock or skipped by gc, never cleaned under its feet.
    """
    outcome = GcOutcome(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    state = repo.state_dir
    now = datetime.now(UTC)
    runs_dir = state / "runs"
    infos = (
        [describe_run(p) for p in sorted(runs_dir.iterdir()) if p.is_dir()]
        if runs_dir.is_dir()
        else []
    )
    run_ids = {info.run_id for info in infos}
    old_runs = {
        info.run_id for info in infos if info.state != "live" and _is_old(info, now, older_than)
    }
    # Branches that reports (and journals) of the runs that stay name: never deleted, even
    # in the namespace of a run that goes (a cached result keeps its first run's branch).
    protected = {b for info in infos if info.run_id not in old_runs for b in _named_branches(info)}
    for info in infos:
        lock = RunLock(info.run_dir)
        # A finished run leaves no lock file: one there now is its dead owner's (taking the
        # lock below makes one, which goes again, unreported).
        stale = (info.run_dir / LOCK).exists()
        if dry_run:
            if info.state == "live" or lock.is_held():
                outcome.kept.append(f"run {info.run_id}: live, left alone")
                continue
        else:
            try:
                lock.acquire()
            except RunInUse:
                outcome.kept.append(f"run {info.run_id}: live, left alone")
                continue
        try:
            outcome.done += await _clean_run(repo, info, info.run_id in old_runs, dry_run)
            if branches and (
                info.run_id in old_runs or not (info.run_dir / "report.json").exists()
            ):
                outcome.done += await _delete_branches(repo, info.run_id, protected, dry_run)
            if info.run_id in old_runs:
                outcome.done.append(f"{verb} run directory {info.run_dir}")
                if not dry_run:
                    await anyio.to_thread.run_sync(remove_tree, info.run_dir, True)
            elif stale:
                outcome.done.append(f"{verb} stale lock {info.run_dir / LOCK}")
                if not dry_run:
                    lock.remove()  # last, and while held: see RunLock.acquire
            elif not dry_run:
                lock.remove()  # the one taking the lock just made
        finally:
            lock.release()
    # Worktrees, venvs and branches of runs whose run directory is gone altogether.
    for kind in ("worktrees", "venvs"):
        base = state / kind
        for path in sorted(base.iterdir()) if base.is_dir() else []:
            # A run makes its run directory before anything else: one that exists now
            # (a run that started while gc works) is not an orphan.
            if path.name not in run_ids and not (runs_dir / path.name).exists():
                outcome.done += await _clear_dirs(repo, path.name, set(), dry_run)
    if branches:
        for run_id in await _branch_runs(repo):
            if run_id not in run_ids and not (runs_dir / run_id).exists():
                outcome.done += await _delete_branches(repo, run_id, protected, dry_run)
    # The pool's worktrees and venvs that no live run holds, idle for longer than the limit.
    outcome.done += await collect_pool(repo, idle_for=older_than.total_seconds(), dry_run=dry_run)
    if not dry_run:
        await repo.git.run("worktree", "prune")
    outcome.done.append(f"{'would run' if dry_run else 'ran'} git worktree prune")
    return outcome


def _is_old(info: RunInfo, now: datetime, older_than: timedelta) -> bool:
    last = info.last_activity
    if last is None:
        with contextlib.suppress(OSError):
            last = datetime.fromtimestamp(info.run_dir.stat().st_mtime, UTC)
    return last is not None and now - last > older_than


def _named_branches(info: RunInfo) -> set[str]:
    """The branches a run's report, or else its journal, names for its results."""
    named: set[str] = set()
    try:
        report = read_json(info.run_dir / "report.json")
        named |= {r["branch"] for r in report["results"] if r.get("branch")}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with contextlib.suppress(OrchestratorError, ValueError):
        contents = read_journal(info.run_dir / JOURNAL)
        for record in contents.of_type("result"):
            branch = record.get("result", {}).get("branch")
            if isinstance(branch, str):
                named.add(branch)
    return named


async def _clean_run(repo: Repository, info: RunInfo, old: bool, dry_run: bool) -> list[str]:
    """A dead run's orphans: agent processes, worktrees and venvs its report does not keep."""
    done: list[str] = []
    kept_paths = set() if old else _kept_worktrees(info)
    for pid, tag in await anyio.to_thread.run_sync(find_tagged, f"{info.run_id}/"):
        done.append(f"{'would kill' if dry_run else 'killed'} agent process {pid} ({tag})")
    if not dry_run:
        await anyio.to_thread.run_sync(kill_orphans, info.run_id)
    done += await _clear_dirs(repo, info.run_id, kept_paths, dry_run)
    for path in info.run_dir.glob(".*.tmp"):
        done.append(f"{'would remove' if dry_run else 'removed'} {path}")
        if not dry_run:
            path.unlink(missing_ok=True)
    return done


def _kept_worktrees(info: RunInfo) -> set[Path]:
    """The worktrees the run's report names as kept (for the user to look at)."""
    try:
        report = read_json(info.run_dir / "report.json")
        return {Path(r["worktree"]) for r in report["results"] if r.get("worktree")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


async def _clear_dirs(repo: Repository, run_id: str, kept: set[Path], dry_run: bool) -> list[str]:
    """Remove *run_id*'s worktrees (with their entries and stale locks) and venvs, but *kept*."""
    done: list[str] = []
    verb = "would remove" if dry_run else "removed"
    worktrees = repo.state_dir / "worktrees" / run_id
    venvs = repo.state_dir / "venvs" / run_id
    kept_names = {p.name for p in kept}
    for path in sorted(worktrees.iterdir()) if worktrees.is_dir() else []:
        if path in kept:
            continue
        done.append(f"{verb} worktree {path}")
        if dry_run:
            continue
        async with repo.lock.hold():
            admin = admin_dir_from_file(path) or admin_dir_by_scan(repo, path)
            await anyio.to_thread.run_sync(remove_tree, path, True)
            await drop_admin_dir(repo, admin)
    for path in sorted(venvs.iterdir()) if venvs.is_dir() else []:
        if path.name in kept_names:
            continue
        if path.is_dir() and not path.is_symlink():
            done.append(f"{verb} venv {path}")
            if not dry_run:
                await anyio.to_thread.run_sync(remove_tree, path, True)
        else:  # an installer's log, left by a crash during an install
            done.append(f"{verb} {path}")
            if not dry_run:
                path.unlink(missing_ok=True)
    for lock in sorted(
        (repo.common_dir / "refs" / "heads" / "orchestrator" / run_id).glob("*.lock")
    ):
        done.append(f"{verb} stale lock {lock}")
        if not dry_run:
            lock.unlink(missing_ok=True)
    if not dry_run:
        for directory in (worktrees, venvs):
            with contextlib.suppress(OSError):  # gone already, or holds what is kept
                directory.rmdir()
    return done


async def _branch_runs(repo: Repository) -> set[str]:
    out = await repo.git.out(
        "for-each-ref",
        "--format=%(refname)",
        "refs/heads/orchestrator/",
        f"{INTERRUPTED_REFS}/",
        timeout=LIST_REFS_TIMEOUT_S,
    )
    runs: set[str] = set()
    for ref in out.split():
        parts = ref.removeprefix("refs/heads/orchestrator/").removeprefix(f"{INTERRUPTED_REFS}/")
        runs.add(parts.split("/", 1)[0])
    return runs


async def _delete_branches(
    repo: Repository, run_id: str, protected: set[str], dry_run: bool
) -> list[str]:
    """Delete the task branches and interrupted refs of *run_id*, except *protected* ones."""
    if not run_id or "/" in run_id or run_id != ref_safe(run_id):
        raise OrchestratorError(f"not a run id: {run_id!r}")
    out = await repo.git.out(
        "for-each-ref",
        "--format=%(refname) %(objectname)",
        f"refs/heads/orchestrator/{run_id}/",
        f"{INTERRUPTED_REFS}/{run_id}/",
        timeout=LIST_REFS_TIMEOUT_S,
    )
    done: list[str] = []
    lines = [
        line.split()
        for line in out.splitlines()
        if line.strip() and line.split()[0].removeprefix("refs/heads/") not in protected
    ]
    for ref, _ in lines:
        done.append(f"{'would delete' if dry_run else 'deleted'} {ref.removeprefix('refs/heads/')}")
    if lines and not dry_run:
        script = "".join(f"delete {ref} {oid}\n" for ref, oid in lines)
        await repo.git.run("update-ref", "--stdin", stdin=script.encode())
    return done
