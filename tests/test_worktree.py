"""Worktrees and the repository lock, against real repositories."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from envelopes import Plan, Report
from orchestrator import GitError, Repository, orchestrate_parallel
from orchestrator.worktree import (
    commit_worktree,
    create_worktree,
    merge_worktree,
    remove_worktree,
    reset_worktree,
)

from .conftest import MakeRepo, git

#: Documented in docs/architecture.md: git subprocesses per task with a worktree and a change.
GIT_CALLS_PER_TASK = 8
GIT_CALLS_PER_RUN = 7


def worktrees(repo: Path) -> int:
    return git(repo, "worktree", "list", "--porcelain").count("worktree ")


def test_many_concurrent_creates_and_removes_never_fail(make_repo: MakeRepo) -> None:
    repo_path = make_repo(files=50)

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        made: list = []

        async def one(i: int) -> None:
            made.append(await create_worktree(repo, f"t/{i}", repo.state_dir / "wt" / str(i), base))

        async with anyio.create_task_group() as tg:
            for i in range(48):
                tg.start_soon(one, i)
        assert worktrees(repo_path) == 49
        assert all((w.path / "src" / "file0049.txt").is_file() for w in made)
        async with anyio.create_task_group() as tg:
            for w in made:
                tg.start_soon(lambda w=w: remove_worktree(repo, w, delete_branch=True))
        assert repo.lock.acquisitions == 96

    anyio.run(main)
    assert worktrees(repo_path) == 1
    assert git(repo_path, "branch", "--list", "t/*") == ""
    subprocess.run(
        ["git", "-C", str(repo_path), "fsck", "--strict"], check=True, capture_output=True
    )


def test_failed_create_leaves_nothing_behind(make_repo: MakeRepo) -> None:
    repo_path = make_repo()
    git(repo_path, "branch", "taken")

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        with pytest.raises(GitError, match="already exists"):
            await create_worktree(repo, "taken", repo.state_dir / "wt" / "x", base)
        assert not (repo.state_dir / "wt" / "x").exists()

    anyio.run(main)
    assert worktrees(repo_path) == 1
    assert git(repo_path, "rev-parse", "taken") == git(repo_path, "rev-parse", "HEAD")


def test_commit_reset_and_no_change(make_repo: MakeRepo) -> None:
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, base_tree = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/commit", repo.state_dir / "wt" / "c", base)
        assert await commit_worktree(repo, wt, "nothing", base_tree=base_tree) == (
            base,
            base_tree,
            False,
        )
        (wt.path / "new.txt").write_text("new\n")
        (wt.path / "src" / "file0000.txt").unlink()
        commit, tree, changed = await commit_worktree(
            repo, wt, "agent: change [task c]", base_tree=base_tree
        )
        assert changed and commit != base
        assert git(repo_path, "rev-parse", "t/commit") == commit
        assert git(repo_path, "rev-parse", f"{commit}^{{tree}}") == tree
        assert git(repo_path, "log", "-1", "--format=%s", commit) == "agent: change [task c]"
        # reset brings back the base: no change, no untracked or ignored file.
        (wt.path / "junk").write_text("x")
        await reset_worktree(repo, wt)
        assert not (wt.path / "junk").exists() and not (wt.path / "new.txt").exists()
        assert (wt.path / "src" / "file0000.txt").exists()
        assert git(repo_path, "rev-parse", "t/commit") == base

    anyio.run(main)


def test_merge_worktree(make_repo: MakeRepo) -> None:
    repo_path = make_repo()
    git(repo_path, "checkout", "--quiet", "--detach")  # main is not checked out anywhere

    def branch_with(name: str, path: str, text: str) -> None:
        git(repo_path, "branch", name, "main")
        git(repo_path, "checkout", "--quiet", name)
        (repo_path / path).write_text(text)
        git(
            repo_path, "commit", "--quiet", "-am" if (repo_path / path).exists() else "-m", "change"
        )
        git(repo_path, "add", "--all")
        git(repo_path, "commit", "--quiet", "--allow-empty", "-m", "change")
        git(repo_path, "checkout", "--quiet", "--detach")

    branch_with("a", "src/file0000.txt", "from a\n")
    branch_with("b", "src/file0001.txt", "from b\n")
    branch_with("c", "src/file0000.txt", "from c\n")

    async def main() -> None:
        repo = await Repository.open(repo_path)
        first = await merge_worktree(repo, "a", "main")
        assert first.merged and first.commit is not None
        second = await merge_worktree(repo, "b", "main")
        assert second.merged
        before = git(repo_path, "rev-parse", "main")
        conflict = await merge_worktree(repo, "c", "main")
        assert not conflict.merged and conflict.conflicts == ["src/file0000.txt"]
        assert git(repo_path, "rev-parse", "main") == before
        missing = await merge_worktree(repo, "nope", "main")
        assert not missing.merged and "does not exist" in missing.message

    anyio.run(main)
    assert git(repo_path, "show", "main:src/file0000.txt") == "from a"
    assert git(repo_path, "show", "main:src/file0001.txt") == "from b"
    assert git(repo_path, "rev-list", "--count", "--merges", "main") == "2"


def test_merge_into_checked_out_branch(make_repo: MakeRepo) -> None:
    repo_path = make_repo()
    git(repo_path, "branch", "feature")
    git(repo_path, "worktree", "add", "--quiet", str(repo_path.parent / "feature-wt"), "feature")
    feature_wt = repo_path.parent / "feature-wt"
    (feature_wt / "feature.txt").write_text("feature\n")
    git(feature_wt, "add", "--all")
    git(feature_wt, "commit", "--quiet", "-m", "feature")

    async def main() -> None:
        repo = await Repository.open(repo_path)
        (repo_path / "src" / "file0002.txt").write_text("uncommitted\n")
        dirty = await merge_worktree(repo, "feature", "main")
        assert not dirty.merged and "uncommitted changes" in dirty.message
        git(repo_path, "checkout", "--quiet", "--", ".")
        clean = await merge_worktree(repo, "feature", "main")
        assert clean.merged

    anyio.run(main)
    # The checkout of main moved along with its ref: clean, and the merged file is there.
    assert (repo_path / "feature.txt").read_text() == "feature\n"
    assert git(repo_path, "status", "--porcelain") == ""


def test_git_calls_per_task_stay_bounded(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    repo_path = make_repo()
    agent = write_agent(
        "touch", "import os\nopen(os.environ['ORCHESTRATOR_TASK_ID'] + '.txt', 'w').write('x')\n"
    )
    n = 6
    plan = Plan.model_validate(
        {
            "agents": {"t": {"command": [sys.executable, str(agent)]}},
            "defaults": {"venv": False},
            "tasks": [{"id": f"t{i}", "agent": "t", "task": "touch"} for i in range(n)],
        }
    )

    async def main() -> tuple[int, Report]:
        repo = await Repository.open(repo_path)
        before = repo.git.calls
        report = await orchestrate_parallel(plan, repo=repo, pool=0)  # new worktrees only
        return repo.git.calls - before, report

    calls, report = anyio.run(main)
    assert report.summary.successful == n
    # Opening the repository is the caller's here; what is left per run is resolving the base
    # and reading the identity once.
    assert calls <= GIT_CALLS_PER_RUN + GIT_CALLS_PER_TASK * n, calls
