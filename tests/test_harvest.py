"""orchestrator/harvest.py: the commit step, on a real worktree of a real repository."""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import HandoffEnvelope, build_envelope
from orchestrator import GitError
from orchestrator.harvest import Harvest, harvest
from orchestrator.repo import Repository
from orchestrator.secrets import Masker
from orchestrator.worktree import Worktree, create_worktree

from .conftest import MakeRepo, git

SECRET = "s3cr3t-token-value"


def harvest_after(
    make_repo: MakeRepo,
    tmp_path: Path,
    agent: Callable[[Worktree], Any],
    *,
    masker: Masker | None = None,
    **fields: Any,
) -> tuple[Path, Worktree, Harvest]:
    """Make a worktree, let *agent* work in it (a plain function), then harvest it."""
    root = make_repo()
    envelope: HandoffEnvelope = build_envelope("w", "Write things", task_id="t1", **fields)

    async def main() -> tuple[Worktree, Harvest]:
        repo = await Repository.open(root)
        base, tree = await repo.resolve_commit("HEAD")
        worktree = await create_worktree(repo, "task/t1", tmp_path / "wt", base)
        outcome = agent(worktree)
        if isinstance(outcome, Awaitable):
            await outcome
        harvested = await harvest(
            repo,
            worktree,
            envelope,
            run_id="run-1",
            envelope_sha256="0" * 64,
            base_tree=tree,
            masker=masker or Masker(),
        )
        return worktree, harvested

    worktree, harvested = anyio.run(main)
    return root, worktree, harvested


def test_changes_become_one_commit_with_the_runs_trailers(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    def agent(worktree: Worktree) -> None:
        (worktree.path / "new.txt").write_text("new\n")
        (worktree.path / "src" / "file0001.txt").unlink()

    root, _worktree, harvested = harvest_after(make_repo, tmp_path, agent)
    assert harvested.committed and harvested.refused is None and harvested.error is None
    commit = harvested.result_commit
    assert commit is not None and git(root, "rev-parse", "refs/heads/task/t1") == commit
    assert git(root, "rev-parse", f"{commit}^{{tree}}") == harvested.result_tree
    changed = git(root, "diff-tree", "--no-commit-id", "--name-status", "-r", f"{commit}^", commit)
    assert changed.splitlines() == ["A\tnew.txt", "D\tsrc/file0001.txt"]
    assert harvested.changed == ["new.txt", "src/file0001.txt"]  # what dependents are told
    assert git(root, "log", "-1", "--format=%B", commit) == (
        f"w: Write things [task t1]\n\nOrchestrator-Run: run-1\nEnvelope-SHA256: {'0' * 64}"
    )


def test_no_change_is_no_commit(make_repo: MakeRepo, tmp_path: Path) -> None:
    root, worktree, harvested = harvest_after(make_repo, tmp_path, lambda wt: None)
    assert not harvested.committed and harvested.changed == []
    assert harvested.result_commit == worktree.base_commit == git(root, "rev-parse", "HEAD")


def test_the_agents_own_commits_are_kept(make_repo: MakeRepo, tmp_path: Path) -> None:
    def agent(worktree: Worktree) -> None:
        (worktree.path / "own.txt").write_text("own\n")
        identity = ["-c", "user.name=Agent", "-c", "user.email=agent@example.com"]
        subprocess.run(["git", "-C", str(worktree.path), "add", "own.txt"], check=True)
        subprocess.run(
            ["git", "-C", str(worktree.path), *identity, "commit", "-qm", "agent's own"],
            check=True,
        )
        (worktree.path / "after.txt").write_text("after\n")

    root, _worktree, harvested = harvest_after(make_repo, tmp_path, agent)
    assert harvested.refused is None and harvested.committed
    log = git(root, "log", "--format=%s", "refs/heads/task/t1").splitlines()
    assert log == ["w: Write things [task t1]", "agent's own", "initial"]
    assert harvested.changed is None  # its own commits changed what only git can tell


def test_a_file_holding_a_secret_is_left_out_and_refused(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    def agent(worktree: Worktree) -> None:
        (worktree.path / "config.txt").write_text(f"token = {SECRET}\n")
        (worktree.path / "fine.txt").write_text("fine\n")

    masker = Masker.for_env({"API_TOKEN": SECRET})
    root, _worktree, harvested = harvest_after(make_repo, tmp_path, agent, masker=masker)
    assert harvested.refused is not None and harvested.refused.kind == "secret_leak"
    assert harvested.refused.paths == ["config.txt"]
    commit = harvested.result_commit
    assert commit is not None
    names = git(root, "diff-tree", "--no-commit-id", "--name-only", "-r", f"{commit}^", commit)
    assert names.splitlines() == ["fine.txt"]


def test_a_secret_may_be_committed_when_the_plan_says_so(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    def agent(worktree: Worktree) -> None:
        (worktree.path / "config.txt").write_text(f"token = {SECRET}\n")

    masker = Masker.for_env({"API_TOKEN": SECRET})
    _, _, harvested = harvest_after(
        make_repo, tmp_path, agent, masker=masker, allow_secrets_in_commit=True
    )
    assert harvested.refused is None and harvested.committed


def test_a_secret_in_the_agents_own_commit_takes_nothing(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    def agent(worktree: Worktree) -> None:
        identity = ["-c", "user.name=Agent", "-c", "user.email=agent@example.com"]
        subprocess.run(
            [
                "git",
                "-C",
                str(worktree.path),
                *identity,
                "commit",
                "-qm",
                f"uses {SECRET}",
                "--allow-empty",
            ],
            check=True,
        )

    masker = Masker.for_env({"API_TOKEN": SECRET})
    root, worktree, harvested = harvest_after(make_repo, tmp_path, agent, masker=masker)
    assert harvested.refused is not None and harvested.refused.kind == "secret_leak"
    assert harvested.result_commit is None and not harvested.committed
    # The branch is back at its base.
    assert git(root, "rev-parse", "refs/heads/task/t1") == worktree.base_commit


@pytest.mark.parametrize("how", ["staged", "committed"])
def test_the_agents_own_changes_too_large_to_check_for_secrets_take_nothing(
    make_repo: MakeRepo, tmp_path: Path, how: str
) -> None:
    """With secrets to look for, what the agent staged or committed itself is read to check
    it, up to twice max_commit_mb: 4 MiB of it, with max_commit_mb 1, fails the task with
    too_large (nothing taken) instead of being read whole into memory."""

    def agent(worktree: Worktree) -> None:
        (worktree.path / "big.txt").write_text("line\n" * (4 << 18))  # 5 MiB of lines
        run = ["git", "-C", str(worktree.path), "-c", "user.name=A", "-c", "user.email=a@a"]
        subprocess.run([*run, "add", "big.txt"], check=True)
        if how == "committed":
            subprocess.run([*run, "commit", "-qm", "big"], check=True)

    masker = Masker.for_env({"API_TOKEN": SECRET})
    root, worktree, harvested = harvest_after(
        make_repo, tmp_path, agent, masker=masker, max_commit_mb=1
    )
    assert harvested.refused is not None and harvested.refused.kind == "too_large"
    assert "cannot be checked for secrets" in harvested.refused.message
    assert harvested.result_commit is None and not harvested.committed
    assert git(root, "rev-parse", "refs/heads/task/t1") == worktree.base_commit


def test_a_secret_in_a_diff_too_large_to_read_whole_is_told_as_a_secret(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """What was read of a diff too large to check is still looked at: a secret at its start
    fails the task as secret_leak, not as too_large."""

    def agent(worktree: Worktree) -> None:
        (worktree.path / "big.txt").write_text(SECRET + "\n" + "line\n" * (4 << 18))
        run = ["git", "-C", str(worktree.path), "-c", "user.name=A", "-c", "user.email=a@a"]
        subprocess.run([*run, "add", "big.txt"], check=True)

    masker = Masker.for_env({"API_TOKEN": SECRET})
    _, _, harvested = harvest_after(make_repo, tmp_path, agent, masker=masker, max_commit_mb=1)
    assert harvested.refused is not None and harvested.refused.kind == "secret_leak"
    assert harvested.result_commit is None and not harvested.committed


def test_changes_over_the_size_limit_take_nothing(make_repo: MakeRepo, tmp_path: Path) -> None:
    def agent(worktree: Worktree) -> None:
        (worktree.path / "big.bin").write_bytes(b"\0" * (1024 * 1024 + 1))
        (worktree.path / "small.txt").write_text("small\n")

    root, worktree, harvested = harvest_after(make_repo, tmp_path, agent, max_commit_mb=1)
    assert harvested.refused is not None and harvested.refused.kind == "too_large"
    assert harvested.refused.paths[0] == "big.bin"
    assert harvested.result_commit is None
    assert git(root, "rev-parse", "refs/heads/task/t1") == worktree.base_commit
    assert (worktree.path / "big.bin").exists()  # the worktree keeps it


def test_more_changes_than_can_be_listed_take_nothing_and_leave_no_lock(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent that leaves more files than the bounded listing holds (millions, for the real
    bound; 2,000 under a bound of 4 KiB here) fails its task with too_large: nothing is
    committed, the orchestrator never holds the whole listing, and the stopped `git status`
    leaves no index.lock behind for the next borrower."""
    from orchestrator import worktree as worktrees

    monkeypatch.setattr(worktrees, "MAX_STATUS_BYTES", 4096)

    def agent(worktree: Worktree) -> None:
        many = worktree.path / "many"
        many.mkdir()
        for i in range(2000):
            (many / f"file-{i:05d}.txt").write_text("x")

    root, worktree, harvested = harvest_after(make_repo, tmp_path, agent)
    assert harvested.refused is not None and harvested.refused.kind == "too_large"
    assert "more changed paths than" in harvested.refused.message
    assert harvested.result_commit is None and not harvested.committed
    assert git(root, "rev-parse", "refs/heads/task/t1") == worktree.base_commit
    assert not (worktree.admin_dir / "index.lock").exists()
    # The same worktree, with fewer files, is listed and committed as usual.
    for extra in sorted((worktree.path / "many").iterdir())[10:]:
        extra.unlink()

    async def again() -> list[str] | None:
        from orchestrator.worktree import changed_paths

        repo = await Repository.open(root)
        return await changed_paths(repo, worktree)

    assert len(anyio.run(again) or []) == 10


def test_a_listing_stopped_at_the_timeout_leaves_no_index_lock(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """A FIFO as .gitignore blocks `git status` forever while it holds the index: stopped at
    the task's timeout, it leaves no index.lock for the slot's next task (git takes no
    optional lock: the orchestrator's git runs with GIT_OPTIONAL_LOCKS=0)."""
    import os

    from orchestrator.worktree import changed_paths

    def agent(worktree: Worktree) -> None:
        (worktree.path / "new.txt").write_text("new\n")
        os.mkfifo(worktree.path / ".gitignore")

    root, worktree, _ = harvest_after(make_repo, tmp_path, agent, timeout=1)
    assert not (worktree.admin_dir / "index.lock").exists()

    async def listed() -> object:
        return await changed_paths(await Repository.open(root), worktree, timeout=0.5)

    with pytest.raises(GitError, match="did not finish within"):
        anyio.run(listed)
    assert not (worktree.admin_dir / "index.lock").exists()


def test_a_branch_moved_by_someone_else_is_put_back_and_refused(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    def agent(worktree: Worktree) -> None:
        root = worktree.admin_dir.parent.parent.parent
        other = git(root, "commit-tree", "-m", "elsewhere", f"{worktree.base_commit}^{{tree}}")
        git(root, "update-ref", "refs/heads/task/t1", other)
        (worktree.path / "work.txt").write_text("work\n")

    root, worktree, harvested = harvest_after(make_repo, tmp_path, agent)
    assert harvested.refused is not None and harvested.refused.kind == "tamper"
    assert harvested.refused.paths == ["refs/heads/task/t1"]
    commit = harvested.result_commit
    assert commit is not None  # the worktree is committed on the base, for the record
    assert git(root, "rev-parse", f"{commit}^") == worktree.base_commit
