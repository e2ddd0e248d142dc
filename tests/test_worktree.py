"""Worktrees and the repository lock, against real repositories."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest

from envelopes import Plan, Report
from orchestrator import GitError, Repository, _fs, orchestrate_parallel, worktree
from orchestrator._fs import remove_entry, remove_tree
from orchestrator.sparse import write_patterns
from orchestrator.worktree import (
    MergeOutcome,
    Worktree,
    branch_tip,
    changed_paths,
    check_branch,
    commit_worktree,
    create_worktree,
    delete_if_unused,
    merge_worktree,
    remove_worktree,
    reset_worktree,
    restore_dot_git,
    untracked_paths,
)

from .conftest import MakeRepo, git, plumbing_commit

#: Documented in docs/architecture.md: git subprocesses per task with a worktree and a change.
GIT_CALLS_PER_TASK = 5
GIT_CALLS_PER_RUN = 8


#: A file name that is not UTF-8 (Latin-1 "café.txt"), as Python names it.
LATIN1_NAME = os.fsdecode(b"caf\xe9.txt")


def worktrees(repo: Path) -> int:
    return git(repo, "worktree", "list", "--porcelain").count("worktree ")


def branch_with(repo: Path, branch: str, files: dict[str, str], parent: str = "main") -> str:
    """Branch *branch*: a commit on *parent* with *files* written (no checkout touched)."""
    env = {**os.environ, "GIT_INDEX_FILE": str(repo / ".git" / "scratch-index")}
    for role in ("AUTHOR", "COMMITTER"):
        env |= {f"GIT_{role}_NAME": "T", f"GIT_{role}_EMAIL": "t@example.com"}
    commit = plumbing_commit(repo, env, git(repo, "rev-parse", parent), files, "change")
    git(repo, "branch", branch, commit)
    return commit


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


def test_a_failed_create_removes_what_a_dead_run_left_at_its_path(make_repo: MakeRepo) -> None:
    """`worktree add` refuses a path that holds files. What a dead run left there goes, with
    its entry (found by its .git file, or, that file gone, by the entry that points there),
    and so does the branch the create had made."""
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        entries = repo.common_dir / "worktrees"
        for name, dot_git in (("kept", True), ("lost", False)):
            left = repo.state_dir / "wt" / name
            git(repo_path, "worktree", "add", "--quiet", "--detach", str(left))
            if not dot_git:
                (left / ".git").unlink()
                # Other entries, being removed meanwhile: their gitdir cannot be read.
                for i in range(8):
                    (entries / f"going{i}" / "gitdir").mkdir(parents=True)
            with pytest.raises(GitError, match="already exists"):
                await create_worktree(repo, f"t/{name}", left, base)
            assert not left.exists()
            assert not (entries / name).exists()
        assert sorted(p.name for p in entries.iterdir()) == [f"going{i}" for i in range(8)]

    anyio.run(main)
    assert git(repo_path, "branch", "--list", "t/*") == ""


def test_a_branch_is_deleted_only_where_it_started(make_repo: MakeRepo) -> None:
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, base_tree = await repo.resolve_commit("HEAD")

        async def made(name: str) -> Worktree:
            return await create_worktree(repo, f"t/{name}", repo.state_dir / "wt" / name, base)

        assert await remove_worktree(repo, await made("kept")) is False  # by default
        moved = await made("moved")
        (moved.path / "new.txt").write_text("new\n")
        await commit_worktree(repo, moved, "result", base_tree=base_tree)
        assert await remove_worktree(repo, moved, delete_branch=True) is False
        assert await remove_worktree(repo, await made("unused"), delete_branch=True) is True
        # A task's clean-up once its worktree is gone (or kept): delete_if_unused.
        assert await delete_if_unused(repo, moved) is False
        assert await delete_if_unused(repo, await made("later")) is True
        assert repo.lock.acquisitions == 4 + 3 + 2

    anyio.run(main)
    branches = git(repo_path, "branch", "--list", "--format=%(refname:short)", "t/*")
    assert branches.splitlines() == ["t/kept", "t/moved"]


def test_a_worktree_that_cannot_be_deleted_is_still_unregistered(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worktree the agent made undeletable (as root, an immutable file; here every removal
    fails) loses its entry and its branch all the same: what cannot be deleted stays."""
    repo_path = make_repo()

    def cannot(parent_fd: int, name: str | bytes) -> None:
        raise PermissionError(f"cannot remove {name!r}")

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/x", repo.state_dir / "wt" / "x", base)
        monkeypatch.setattr(_fs, "remove_tree_at", cannot)
        assert await remove_worktree(repo, wt, delete_branch=True) is True
        assert (wt.path / "src").is_dir() and wt.admin_dir.is_dir()
        # A create at that path fails as git says, and takes its branch back.
        with pytest.raises(GitError, match="already exists"):
            await create_worktree(repo, "t/y", wt.path, base)

    anyio.run(main)
    assert git(repo_path, "branch", "--list", "t/*") == ""


def test_remove_never_deletes_an_admin_dir_outside_the_repository(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """A Worktree read back from a record an agent could edit may name any directory."""
    repo_path = make_repo()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "worktrees").mkdir(parents=True)

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/x", repo.state_dir / "wt" / "x", base)
        forged = Worktree(wt.path, wt.branch, base, admin_dir=elsewhere / "worktrees" / "x")
        forged.admin_dir.mkdir()
        assert await remove_worktree(repo, forged, delete_branch=True) is True
        assert forged.admin_dir.is_dir() and wt.admin_dir.is_dir()

    anyio.run(main)


def test_commit_of_a_worktree_whose_agent_committed_everything(make_repo: MakeRepo) -> None:
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, base_tree = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/c", repo.state_dir / "wt" / "c", base)
        (wt.path / "new.txt").write_text("new\n")
        git(wt.path, "add", "--all")
        git(wt.path, "commit", "--quiet", "-m", "the agent's own")
        own = git(wt.path, "rev-parse", "HEAD")
        tree = git(wt.path, "rev-parse", "HEAD^{tree}")
        assert await commit_worktree(repo, wt, "nothing left", base_tree=base_tree) == (
            own,
            tree,
            True,
        )

    anyio.run(main)


def test_reset_undoes_what_the_agent_hid_from_git(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index entry marked skip-worktree hides its file's change from `reset --hard`; an
    index deleted is made again; a leftover the sweep cannot remove is a GitError."""
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/r", repo.state_dir / "wt" / "r", base)
        changed = wt.path / "src" / "file0000.txt"
        git(wt.path, "update-index", "--skip-worktree", "src/file0000.txt")
        changed.write_text("hidden change\n")
        await reset_worktree(repo, wt)
        assert changed.read_text() == "line 0\n"
        (wt.admin_dir / "index").unlink()
        changed.write_text("changed again\n")
        await reset_worktree(repo, wt)
        assert changed.read_text() == "line 0\n"
        assert await changed_paths(repo, wt) == []

        def cannot(root: Path) -> list[str]:
            raise PermissionError(f"cannot put {root} right")

        monkeypatch.setattr(worktree, "sweep_worktree", cannot)
        with pytest.raises(GitError) as caught:
            await reset_worktree(repo, wt)
        error = caught.value
        assert (error.command, error.returncode, error.stderr) == (
            ["worktree"],
            1,
            f"fatal: cannot reset {wt.path}: cannot put {wt.path} right",
        )

    anyio.run(main)


def test_reset_of_a_sparse_worktree_keeps_it_sparse(make_repo: MakeRepo) -> None:
    repo_path = make_repo(extra={"a/x.txt": "x\n", "b/y.txt": "y\n"})

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/s", repo.state_dir / "wt" / "s", base, ("a",))
        assert not (wt.path / "b").exists()
        (wt.path / "a" / "x.txt").write_text("changed\n")
        (wt.path / "b").mkdir()
        (wt.path / "b" / "new.txt").write_text("outside the cone\n")
        await reset_worktree(repo, wt)
        assert (wt.path / "a" / "x.txt").read_text() == "x\n"
        assert not (wt.path / "b").exists()
        assert await changed_paths(repo, wt) == []

    anyio.run(main)


def test_untracked_paths_are_the_new_files_a_commit_would_take(make_repo: MakeRepo) -> None:
    """Whatever the agent did to its .git file and admin files: another repository, where
    the same names are tracked or ignored, is never asked."""
    repo_path = make_repo(extra={".gitignore": "*.log\n"})
    other = make_repo(extra={"new.txt": "tracked there\n"})
    (other / ".git" / "info").mkdir(exist_ok=True)
    (other / ".git" / "info" / "exclude").write_text("*\n")

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/u", repo.state_dir / "wt" / "u", base)
        for name in ("new.txt", "deep/er/new.txt", LATIN1_NAME, "two\nlines.txt", "x.log"):
            (wt.path / name).parent.mkdir(parents=True, exist_ok=True)
            (wt.path / name).write_text("new\n")
        (wt.path / "src" / "file0000.txt").write_text("changed, tracked\n")
        (wt.path / ".git").write_text(f"gitdir: {other / '.git'}\n")
        (wt.admin_dir / "commondir").write_text(f"{other / '.git'}\n")
        assert await untracked_paths(repo, wt) == {
            "new.txt",
            "deep/er/new.txt",
            LATIN1_NAME,
            "two\nlines.txt",
        }

    anyio.run(main)


def test_check_branch_tells_the_agents_commits_from_another_process_moves(
    make_repo: MakeRepo,
) -> None:
    repo_path = make_repo()
    older = git(repo_path, "rev-parse", "HEAD")
    git(repo_path, "commit", "--quiet", "--allow-empty", "-m", "the base")
    lone = git(repo_path, "commit-tree", "-m", "lone", "main^{tree}")  # not on the base

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/b", repo.state_dir / "wt" / "b", base)
        assert await check_branch(repo, wt, base) is None
        for i in range(2):  # the agent's own commits, in its worktree
            (wt.path / f"new{i}.txt").write_text("new\n")
            git(wt.path, "add", "--all")
            git(wt.path, "commit", "--quiet", "-m", f"agent {i}")
        own = await branch_tip(repo, wt)
        assert own == git(wt.path, "rev-parse", "HEAD")
        assert await check_branch(repo, wt, own) is None
        moved = f"branch t/b was moved to {lone} by another process"
        git(repo_path, "update-ref", "refs/heads/t/b", lone)
        assert await check_branch(repo, wt, lone) == moved
        # The agent's own reset to a commit without the base (unrelated, or older): its
        # reflog has it.
        for commit in (lone, older):
            git(wt.path, "reset", "--quiet", "--hard", commit)
            assert await check_branch(repo, wt, commit) == (
                f"branch t/b was moved to {commit}, which does not contain its base"
            )
        # A reflog too large to read (16 MiB) is not trusted.
        log = wt.admin_dir / "logs" / "HEAD"
        log.write_bytes(b"x" * (16 << 20) + b"\n" + log.read_bytes())
        assert await check_branch(repo, wt, older) == (
            f"branch t/b was moved to {older} by another process"
        )
        # A reflog the agent wrote itself, or removed: not the agent's doing.
        for text in (b"garbage\n", b"0 caf\xe9 x\n", f"0\t{lone} x\n".encode(), b""):
            log.write_bytes(text)
            assert await check_branch(repo, wt, lone) == moved
        log.unlink()
        assert await check_branch(repo, wt, lone) == moved

    anyio.run(main)


def test_branch_tip_reads_a_loose_ref_or_asks_git(make_repo: MakeRepo) -> None:
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/tip", repo.state_dir / "wt" / "tip", base)
        assert await branch_tip(repo, wt) == base
        calls = repo.git.calls
        (wt.path / "new.txt").write_text("new\n")
        git(wt.path, "add", "--all")
        git(wt.path, "commit", "--quiet", "-m", "agent")
        tip = git(repo_path, "rev-parse", "t/tip")
        assert await branch_tip(repo, wt) == tip
        assert repo.git.calls == calls  # the loose ref, read
        git(repo_path, "pack-refs", "--all", "--prune")
        loose = repo.common_dir / "refs" / "heads" / "t" / "tip"
        assert not loose.exists()
        assert await branch_tip(repo, wt) == tip
        assert repo.git.calls == calls + 1
        # A loose ref that is not an id (an agent wrote it): git is asked, and refuses it.
        loose.parent.mkdir(exist_ok=True)
        loose.write_bytes(b"\xff" * 40 + b"\n")
        with pytest.raises(GitError, match="refs/heads/t/tip"):
            await branch_tip(repo, wt)

    anyio.run(main)


def test_changed_paths_are_what_git_add_all_would_stage(make_repo: MakeRepo) -> None:
    """Whatever the agent wrote in its .git file. (Its commondir is put back before: git
    reads refs where that file says, whatever GIT_COMMON_DIR says.)"""
    repo_path = make_repo(files=4, extra={".gitignore": "*.log\n"})
    other = make_repo(extra={"a": "tracked there\n"})

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/ch", repo.state_dir / "wt" / "ch", base)
        (wt.path / "src" / "file0000.txt").write_text("changed\n")
        (wt.path / "src" / "file0001.txt").unlink()
        git(wt.path, "rm", "--quiet", "src/file0002.txt")  # staged already: not listed
        git(wt.path, "mv", "src/file0003.txt", "moved.txt")
        for name in ("a", "new/dir/deep.txt", LATIN1_NAME, "two\nlines.txt", "x.log"):
            (wt.path / name).parent.mkdir(parents=True, exist_ok=True)
            (wt.path / name).write_text("new\n")
        (wt.path / ".git").write_text(f"gitdir: {other / '.git'}\n")
        assert sorted(await changed_paths(repo, wt)) == sorted(
            [
                "a",
                LATIN1_NAME,
                "moved.txt",
                "new/dir/deep.txt",
                "src/file0000.txt",
                "src/file0001.txt",
                "two\nlines.txt",
            ]
        )

    anyio.run(main)


def test_changed_paths_leave_out_a_submodule_the_agent_moved(make_repo: MakeRepo) -> None:
    """A submodule's commit is not the agent's to change: its worktree never checks one out."""
    repo_path = make_repo()
    head = git(repo_path, "rev-parse", "HEAD")
    git(repo_path, "update-index", "--add", "--cacheinfo", f"160000,{head},sub")
    git(repo_path, "commit", "--quiet", "-m", "a submodule")

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/sub", repo.state_dir / "wt" / "sub", base)
        git(wt.path / "sub", "init", "--quiet")
        git(wt.path / "sub", "commit", "--quiet", "--allow-empty", "-m", "moved")
        (wt.path / "new.txt").write_text("new\n")
        assert await changed_paths(repo, wt) == ["new.txt"]

    anyio.run(main)


def test_a_commit_of_more_changes_than_can_be_listed_is_a_git_error(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """commit_worktree left to list the changes itself refuses when they are more than the
    bounded listing holds (the bound made 1 KiB here): nothing is committed."""
    monkeypatch.setattr(worktree, "MAX_STATUS_BYTES", 1024)
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, tree = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/many", repo.state_dir / "wt" / "many", base)
        for i in range(200):
            (wt.path / f"file-{i:03d}.txt").write_text("x")
        assert await changed_paths(repo, wt) is None
        with pytest.raises(GitError, match="more changed paths than"):
            await commit_worktree(repo, wt, "many", base_tree=tree)
        assert git(repo_path, "rev-parse", "refs/heads/t/many") == base

    anyio.run(main)


def test_commit_takes_the_paths_given_literally_on_the_tip_given(make_repo: MakeRepo) -> None:
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, base_tree = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/lit", repo.state_dir / "wt" / "lit", base)
        # A change undone is no change.
        (wt.path / "src" / "file0000.txt").write_text("changed\n")
        (wt.path / "src" / "file0000.txt").write_text("line 0\n")
        assert await commit_worktree(
            repo, wt, "m", base_tree=base_tree, paths=["src/file0000.txt"]
        ) == (base, base_tree, False)
        for name in ("*.txt", "other.txt", ":(glob)x", LATIN1_NAME):
            (wt.path / name).write_text("new\n")
        commit, tree, changed = await commit_worktree(
            repo, wt, "only the star", base_tree=base_tree, paths=["*.txt", ":(glob)x", LATIN1_NAME]
        )
        assert changed and git(repo_path, "rev-parse", "t/lit") == commit
        assert git(repo_path, "ls-tree", "--name-only", tree).splitlines() == [
            "*.txt",
            ":(glob)x",
            '"caf\\351.txt"',
            "src",
        ]
        assert git(repo_path, "log", "-1", "--format=%P %an %s", commit) == (
            f"{base} worktree-orchestrator only the star"
        )
        # A tip read before someone else moved the branch: the commit fails, the branch
        # stays where it was moved.
        (wt.path / "later.txt").write_text("later\n")
        git(repo_path, "update-ref", "refs/heads/t/lit", base)
        with pytest.raises(GitError, match="update-ref"):
            await commit_worktree(repo, wt, "late", base_tree=base_tree, parent=commit)
        assert git(repo_path, "rev-parse", "t/lit") == base

    anyio.run(main)


def test_a_file_replaced_keeping_size_and_mtime_is_committed(make_repo: MakeRepo) -> None:
    """Whatever the repository's config says of stat data (core.trustctime, core.checkStat),
    a file put in another's place with its size and modification time is a change."""
    repo_path = make_repo()
    git(repo_path, "config", "core.trustctime", "false")
    git(repo_path, "config", "core.checkStat", "minimal")

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, base_tree = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/stat", repo.state_dir / "wt" / "stat", base)
        changed = wt.path / "src" / "file0000.txt"
        # An old modification time, recorded in the index (so that git has no reason to
        # look at the file again), and given to the file put in its place.
        old = (1 << 30, 1 << 30)
        os.utime(changed, old)
        git(wt.path, "update-index", "--refresh")
        (wt.path / "new").write_text("line X\n")
        os.utime(wt.path / "new", old)
        (wt.path / "new").replace(changed)
        commit, _, made = await commit_worktree(repo, wt, "same size", base_tree=base_tree)
        assert made and git(repo_path, "show", f"{commit}:src/file0000.txt") == "line X"

    anyio.run(main)


def test_the_crash_points_of_create_and_commit(make_repo: MakeRepo) -> None:
    """ORCHESTRATOR_CRASH_AT, the power cuts tests/test_resume.py recovers from: after the
    worktree's entry is made and before its files are written; after the commit is made and
    before the branch is moved to it."""
    repo_path = make_repo()
    script = textwrap.dedent(
        """
        import sys, anyio
        from orchestrator import Repository
        from orchestrator.worktree import commit_worktree, create_worktree

        async def main():
            repo = await Repository.open(sys.argv[1])
            base, tree = await repo.resolve_commit("HEAD")
            wt = await create_worktree(repo, "t/crash", repo.state_dir / "wt" / "c", base)
            (wt.path / "new.txt").write_text("new")
            await commit_worktree(repo, wt, "never on the branch", base_tree=tree)

        anyio.run(main)
        """
    )

    def crash_at(point: str) -> None:
        crashed = subprocess.run(
            [sys.executable, "-c", script, str(repo_path)],
            env={**os.environ, "ORCHESTRATOR_CRASH_AT": point},
            capture_output=True,
            check=False,
        )
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr

    slot = repo_path / ".git" / "orchestrator" / "wt" / "c"
    crash_at("worktree")
    assert worktrees(repo_path) == 2 and os.listdir(slot) == [".git"]
    git(repo_path, "worktree", "remove", "--force", str(slot))
    git(repo_path, "branch", "--delete", "--force", "t/crash")
    crash_at("commit")
    assert git(repo_path, "rev-parse", "t/crash") == git(repo_path, "rev-parse", "main")
    assert (slot / "new.txt").is_file()


def test_commit_of_a_sparse_worktree_takes_what_the_agent_made_outside_its_cone(
    make_repo: MakeRepo,
) -> None:
    repo_path = make_repo(extra={"a/x.txt": "x\n", "b/y.txt": "y\n"})

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, base_tree = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/sp", repo.state_dir / "wt" / "sp", base, ("a",))
        (wt.path / "a" / "x.txt").write_text("changed\n")
        (wt.path / "c").mkdir()
        (wt.path / "c" / "new.txt").write_text("new\n")
        _, tree, changed = await commit_worktree(repo, wt, "sparse", base_tree=base_tree)
        assert changed
        assert git(repo_path, "ls-tree", "-r", "--name-only", tree).splitlines() == [
            "a/x.txt",
            "b/y.txt",
            "c/new.txt",
            *(f"src/file000{i}.txt" for i in range(3)),
        ]

    anyio.run(main)


def _admin_files(admin: Path) -> dict[str, bytes]:
    """What a worktree's admin directory says of it: its HEAD, gitdir and commondir."""
    return {name: (admin / name).read_bytes() for name in ("HEAD", "gitdir", "commondir")}


def test_restore_puts_back_what_the_agent_pointed_elsewhere(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo_path = make_repo()
    other = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/rd", repo.state_dir / "wt" / "rd", base)
        admin = wt.admin_dir
        pristine = _admin_files(admin)
        assert await restore_dot_git(wt) == []
        (admin / "commondir").write_text(f"{other / '.git'}\n")
        assert await restore_dot_git(wt) == [str(admin / "commondir")]
        # HEAD may move in the agent's own right: put back, not reported.
        git(wt.path, "checkout", "--quiet", "-b", "agent-branch")
        (admin / "config.worktree").symlink_to(tmp_path / "nowhere")
        os.mkfifo(tmp_path / "fifo")
        (admin / "index").unlink()
        (admin / "index").symlink_to(tmp_path / "fifo")
        (admin / "gitdir").write_text(f"{other / '.git'}\n")
        (admin / "commondir").unlink()
        (admin / "commondir").symlink_to(other / ".git")
        (wt.path / ".git").write_text(f"gitdir: {other / '.git'}\n")
        assert await restore_dot_git(wt) == [
            str(admin / "index"),
            str(admin / "gitdir"),
            str(admin / "commondir"),
        ]
        assert _admin_files(admin) == pristine
        assert (wt.path / ".git").read_text() == f"gitdir: {admin}\n"
        assert not os.path.lexists(admin / "config.worktree")
        assert not os.path.lexists(admin / "index")
        # An index that is a FIFO goes too; a .git that is a link is replaced.
        os.mkfifo(admin / "index")
        (wt.path / ".git").unlink()
        (wt.path / ".git").symlink_to(admin)
        assert await restore_dot_git(wt) == [str(admin / "index")]
        assert (wt.path / ".git").read_text() == f"gitdir: {admin}\n"
        # A repository of the agent's own in place of the .git file is refused.
        (wt.path / ".git").unlink()
        git(wt.path, "init", "--quiet")
        with pytest.raises(GitError) as refused:
            await restore_dot_git(wt)
        assert (refused.value.command, refused.value.returncode, refused.value.stderr) == (
            ["worktree"],
            1,
            f"fatal: the agent replaced {wt.path / '.git'} with a repository of its own",
        )
        # An admin directory gone: nothing can be put back.
        remove_tree(wt.path / ".git")
        remove_tree(admin)
        with pytest.raises(GitError) as caught:
            await restore_dot_git(wt)
        assert caught.value.command == ["worktree"] and caught.value.returncode == 1
        assert caught.value.stderr.startswith(f"fatal: cannot restore {wt.path / '.git'}: ")

    anyio.run(main)


def test_admin_files_an_agent_made_directories_are_put_back_and_its_work_committed(
    make_repo: MakeRepo,
) -> None:
    """An agent that put a directory where git keeps its worktree's index, HEAD, gitdir,
    commondir or per-worktree config does not make the task fail: each is put back (the
    index made anew by git), and what it changed in the worktree is committed."""
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, tree = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/dirs", repo.state_dir / "wt" / "dirs", base)
        admin = wt.admin_dir
        pristine = _admin_files(admin)
        (wt.path / "work.txt").write_text("the agent's work\n")
        for name in ("index", "HEAD", "gitdir", "commondir", "config.worktree"):
            remove_entry(admin / name)
            (admin / name / "deep").mkdir(parents=True)
            (admin / name / "deep" / "file").write_text("x")
        assert await restore_dot_git(wt) == [
            str(admin / "index"),
            str(admin / "gitdir"),
            str(admin / "commondir"),
        ]
        assert _admin_files(admin) == pristine
        assert not os.path.lexists(admin / "index")
        assert not os.path.lexists(admin / "config.worktree")
        commit, _, changed = await commit_worktree(repo, wt, "m", base_tree=tree)
        assert changed and git(repo_path, "show", f"{commit}:work.txt") == "the agent's work"

    anyio.run(main)


def test_an_admin_directory_made_a_link_is_refused_and_nothing_it_leads_to_touched(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/ln", repo.state_dir / "wt" / "ln", base)
        elsewhere = tmp_path / "elsewhere"
        (elsewhere / "index" / "deep").mkdir(parents=True)
        (elsewhere / "HEAD").write_text("precious\n")
        moved = wt.admin_dir.with_name("moved")
        wt.admin_dir.rename(moved)
        wt.admin_dir.symlink_to(elsewhere)
        with pytest.raises(GitError) as refused:
            await restore_dot_git(wt)
        assert refused.value.stderr == f"fatal: {wt.admin_dir} was made a link"
        # What the task's error says, and the exit status a git refusing it would give.
        assert str(refused.value) == f"git worktree: fatal: {wt.admin_dir} was made a link"
        assert refused.value.returncode == 1
        assert (elsewhere / "index" / "deep").is_dir()
        assert (elsewhere / "HEAD").read_text() == "precious\n"
        assert sorted(p.name for p in elsewhere.iterdir()) == ["HEAD", "index"]

    anyio.run(main)


def test_a_commit_message_is_utf8_whatever_encoding_the_repository_is_configured_for(
    make_repo: MakeRepo,
) -> None:
    """A repository configured for Latin-1 commit messages (i18n.commitEncoding) would have
    the orchestrator's UTF-8 messages labelled Latin-1, and shown as mojibake by any tool
    that honours the label."""
    repo_path = make_repo()
    git(repo_path, "config", "i18n.commitEncoding", "ISO-8859-1")
    git(repo_path, "config", "i18n.logOutputEncoding", "ISO-8859-1")

    async def main() -> str:
        repo = await Repository.open(repo_path)
        base, tree = await repo.resolve_commit("HEAD")
        wt = await create_worktree(repo, "t/enc", repo.state_dir / "wt" / "enc", base)
        (wt.path / "new.txt").write_text("x\n")
        commit, _, _ = await commit_worktree(repo, wt, "café: naïve résumé", base_tree=tree)
        # And the orchestrator reads logs as UTF-8 whatever the output encoding set.
        assert await repo.git.out("log", "-1", "--format=%s", commit) == "café: naïve résumé"
        return commit

    commit = anyio.run(main)
    raw = subprocess.run(
        ["git", "-C", str(repo_path), "cat-file", "commit", commit],
        capture_output=True,
        check=True,
    ).stdout
    assert b"\nencoding " not in raw.split(b"\n\n", 1)[0]
    assert raw.endswith("café: naïve résumé\n".encode())


def test_create_takes_a_branch_a_dead_slot_still_names(make_repo: MakeRepo) -> None:
    """A pool slot left by a dead run of the same task still has the branch checked out
    (its HEAD names it) after the branch itself was deleted."""
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        dead = await create_worktree(repo, "t/again", repo.state_dir / "a" / "b" / "dead", base)
        git(repo_path, "update-ref", "-d", "refs/heads/t/again")
        wt = await create_worktree(repo, "t/again", repo.state_dir / "c" / "d" / "new", base)
        assert (wt.path / "src" / "file0000.txt").read_text() == "line 0\n"
        assert git(wt.path, "status", "--porcelain") == ""
        assert dead.path.is_dir()

    anyio.run(main)


def test_a_create_cancelled_while_writing_the_files_leaves_nothing(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        with anyio.CancelScope() as scope:

            def cancelled(admin_dir: Path, sparse: tuple[str, ...] | None) -> None:
                write_patterns(admin_dir, sparse)
                anyio.from_thread.run_sync(scope.cancel)

            monkeypatch.setattr(worktree, "write_patterns", cancelled)
            await create_worktree(repo, "t/c", repo.state_dir / "wt" / "c", base)
        assert scope.cancelled_caught
        assert not (repo.state_dir / "wt" / "c").exists()

    anyio.run(main)
    assert worktrees(repo_path) == 1
    assert git(repo_path, "branch", "--list", "t/*") == ""


def test_a_create_whose_git_file_names_no_admin_dir_leaves_nothing(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when something rewrote the new .git file before it was read: the entry that
    points at the path is found and removed, with the directory and the branch."""
    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        path = repo.state_dir / "wt" / "n"
        monkeypatch.setattr(worktree, "admin_dir_from_file", lambda path: None)
        with pytest.raises(GitError) as caught:
            await create_worktree(repo, "t/n", path, base)
        error = caught.value
        assert (error.command, error.returncode, error.stderr) == (
            ["worktree", "add"],
            0,
            f"fatal: {path}/.git names no admin directory",
        )
        assert not path.exists()

    anyio.run(main)
    assert worktrees(repo_path) == 1
    assert git(repo_path, "branch", "--list", "t/*") == ""


def test_a_create_that_fails_while_writing_the_files_leaves_nothing(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo_path = make_repo()

    def cannot(admin_dir: Path, sparse: tuple[str, ...] | None) -> None:
        raise OSError(f"cannot write the patterns in {admin_dir}")

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, _ = await repo.resolve_commit("HEAD")
        monkeypatch.setattr(worktree, "write_patterns", cannot)
        with pytest.raises(OSError, match="cannot write the patterns"):
            await create_worktree(repo, "t/w", repo.state_dir / "wt" / "w", base)
        assert not (repo.state_dir / "wt" / "w").exists()

    anyio.run(main)
    assert worktrees(repo_path) == 1
    assert git(repo_path, "branch", "--list", "t/*") == ""


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


def test_merge_outcomes_say_what_happened(make_repo: MakeRepo) -> None:
    repo_path = make_repo()
    git(repo_path, "checkout", "--quiet", "--detach")  # main is not checked out anywhere
    base = git(repo_path, "rev-parse", "main")
    ours = branch_with(repo_path, "ours", {"café.txt": "ours\n", LATIN1_NAME: "ours\n"})
    branch_with(repo_path, "theirs", {"café.txt": "theirs\n", LATIN1_NAME: "theirs\n"})
    a = branch_with(repo_path, "a", {"a.txt": "a\n"})
    b = branch_with(repo_path, "b", {"b.txt": "b\n"})

    async def main() -> None:
        repo = await Repository.open(repo_path)
        # Conflicting names as they are, not as git quotes them ("caf\303\251.txt").
        assert await merge_worktree(repo, "theirs", "ours") == MergeOutcome(
            False, None, ["café.txt", "caf\ufffd.txt"], "merging theirs into ours conflicts"
        )
        gone = "branch 'nope' does not exist"
        assert await merge_worktree(repo, "a", "nope") == MergeOutcome(False, None, [], gone)
        assert await merge_worktree(repo, "nope", "main") == MergeOutcome(False, None, [], gone)
        # A range names two revisions, no branch.
        gone = "branch 'main..a' does not exist"
        assert await merge_worktree(repo, "a", "main..a") == MergeOutcome(False, None, [], gone)
        assert await merge_worktree(repo, "main..a", "main") == MergeOutcome(False, None, [], gone)
        first = await merge_worktree(repo, "a", "main", message="take a")
        assert first == MergeOutcome(True, first.commit, [], "merged a into main")
        second = await merge_worktree(repo, "b", "main")
        assert second == MergeOutcome(True, second.commit, [], "merged b into main")
        assert second.commit == git(repo_path, "rev-parse", "main")
        assert git(repo_path, "rev-parse", f"{second.commit}^1") == first.commit

    anyio.run(main)
    assert git(repo_path, "rev-parse", "ours") == ours
    log = git(repo_path, "log", "--first-parent", "--format=%s %P", "main~2..main")
    assert log.splitlines() == [
        f"Merge branch 'b' into main {git(repo_path, 'rev-parse', 'main^1')} {b}",
        f"take a {base} {a}",
    ]


def test_merge_into_a_branch_checked_out_in_a_linked_worktree(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo_path = make_repo()
    git(repo_path, "checkout", "--quiet", "--detach")  # the main checkout is clean, at main
    checkout = tmp_path / "main-checkout"
    git(repo_path, "worktree", "add", "--quiet", str(checkout), "main")
    base = git(repo_path, "rev-parse", "main")
    branch_with(repo_path, "a", {"a.txt": "a\n"})
    branch_with(repo_path, "latin1", {LATIN1_NAME: "theirs\n"})

    async def main() -> None:
        repo = await Repository.open(repo_path)
        (checkout / "src" / "file0001.txt").write_text("uncommitted\n")
        assert await merge_worktree(repo, "a", "main") == MergeOutcome(
            False,
            None,
            [],
            f"branch 'main' is checked out in {checkout} with uncommitted changes;"
            " commit or stash them first",
        )
        git(checkout, "checkout", "--quiet", "--", ".")
        # An untracked file where the merge writes one: nothing changes, and git says why.
        (checkout / LATIN1_NAME).write_text("mine\n")
        assert await merge_worktree(repo, "latin1", "main") == MergeOutcome(
            False,
            None,
            [],
            f"cannot update the checkout of main in {checkout}: error: Untracked working tree"
            " file 'caf\ufffd.txt' would be overwritten by merge.",
        )
        assert git(repo_path, "rev-parse", "main") == base
        # An untracked file out of the merge's way does not stop it; the checkout moves along.
        merged = await merge_worktree(repo, "a", "main")
        assert merged.merged and merged.commit == git(checkout, "rev-parse", "HEAD")

    anyio.run(main)
    assert (checkout / LATIN1_NAME).read_text() == "mine\n"
    assert (checkout / "a.txt").read_text() == "a\n"
    assert git(checkout, "status", "--porcelain", "--untracked-files=no") == ""
    assert git(repo_path, "status", "--porcelain") == ""  # the main checkout not touched


def test_a_target_moved_during_a_merge_is_left_where_it_was_moved(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo_path = make_repo()
    git(repo_path, "checkout", "--quiet", "--detach")
    checkout = tmp_path / "main-checkout"
    git(repo_path, "worktree", "add", "--quiet", str(checkout), "main")
    branch_with(repo_path, "a", {"a.txt": "a\n"})
    # Another process's commit on main (the same files), made as the merge takes the lock.
    other = git(repo_path, "commit-tree", "-p", "main", "-m", "other", "main^{tree}")

    async def main() -> None:
        repo = await Repository.open(repo_path)
        hold = repo.lock.hold

        @contextlib.asynccontextmanager
        async def moved_meanwhile() -> AsyncIterator[None]:
            git(repo_path, "update-ref", "refs/heads/main", other)
            async with hold():
                yield

        repo.lock.hold = moved_meanwhile  # type: ignore[method-assign]
        with pytest.raises(GitError, match="update-ref refs/heads/main"):
            await merge_worktree(repo, "a", "main")

    anyio.run(main)
    assert git(repo_path, "rev-parse", "main") == other
    # The checkout, moved along before the ref, is put back.
    assert not (checkout / "a.txt").exists()
    assert git(checkout, "status", "--porcelain") == ""


def test_merging_unrelated_histories_is_an_error(make_repo: MakeRepo) -> None:
    repo_path = make_repo()
    main = git(repo_path, "rev-parse", "main")
    lone = git(repo_path, "commit-tree", "-m", "lone", "main^{tree}")
    git(repo_path, "branch", "lone", lone)

    async def main_() -> None:
        repo = await Repository.open(repo_path)
        with pytest.raises(GitError) as caught:
            await merge_worktree(repo, "lone", "main")
        error = caught.value
        assert (error.command, error.returncode, error.stderr.splitlines()[-1]) == (
            ["merge-tree", main, lone],
            128,
            "fatal: refusing to merge unrelated histories",
        )

    anyio.run(main_)
    assert git(repo_path, "rev-parse", "main") == main


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
