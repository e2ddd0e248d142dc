"""The benchmark baselines do the work they claim and leave the repository clean (no timing)."""

from __future__ import annotations

import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import git

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import workloads  # noqa: E402


def branches(repo: Path, kind: str) -> list[str]:
    """The task branches a baseline of *kind* (``floor``, ``seed``) left in *repo*."""
    return git(
        repo, "for-each-ref", "--format=%(refname:short)", f"refs/heads/bench/{kind}/"
    ).split()


def assert_results_committed(repo: Path, kind: str, n: int) -> None:
    """Each of the *n* task branches is one commit on main adding only its result file."""
    names = branches(repo, kind)
    assert sorted(int(name.rsplit("/", 1)[1]) for name in names) == list(range(1, n + 1))
    for name in names:
        i = name.rsplit("/", 1)[1]
        assert git(repo, "rev-list", "--count", f"main..{name}") == "1"
        assert git(repo, "rev-parse", f"{name}~1") == git(repo, "rev-parse", "main")
        changed = git(repo, "diff-tree", "--no-commit-id", "--name-only", "-r", name)
        assert changed.split() == [f"result-{i}.txt"]
        assert git(repo, "show", f"{name}:result-{i}.txt") == "done"


def assert_clean(repo: Path, work: Path) -> None:
    """Only the main worktree is left, and no venv."""
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert not (repo / ".git" / "worktrees").exists() or not any(
        (repo / ".git" / "worktrees").iterdir()
    )
    assert not list(work.rglob("pyvenv.cfg"))


def failing_command(tmp_path: Path) -> str:
    """An executable that says why it fails, on stderr."""
    script = tmp_path / "fails"
    script.write_text("#!/bin/sh\necho 'no venv today' >&2\nexit 3\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_make_repo_commits_the_files_on_main_without_an_identity(tmp_path: Path) -> None:
    repo = workloads.make_repo(tmp_path / "repo", 20)
    assert repo == (tmp_path / "repo").resolve()
    assert len(git(repo, "ls-files").splitlines()) == 20
    assert git(repo, "rev-list", "--count", "HEAD") == "1"
    assert git(repo, "branch", "--show-current") == "main"
    assert git(repo, "config", "gc.auto") == "0"
    assert git(repo, "status", "--porcelain") == ""


def test_make_repo_is_deterministic(tmp_path: Path) -> None:
    one = workloads.make_repo(tmp_path / "one", 120)
    two = workloads.make_repo(tmp_path / "two", 120)
    assert git(one, "rev-parse", "HEAD^{tree}") == git(two, "rev-parse", "HEAD^{tree}")
    assert len(git(one, "ls-tree", "--name-only", "HEAD").split()) == 3


def test_shell_floor_commits_each_result_and_cleans_up(tmp_path: Path) -> None:
    repo = workloads.make_repo(tmp_path / "repo", 20)
    work = tmp_path / "work"
    seconds = workloads.shell_floor(repo, 3, 2, work, keep_branches=True)
    assert isinstance(seconds, float) and seconds > 0
    assert_results_committed(repo, "floor", 3)
    assert_clean(repo, work)


def test_shell_floor_deletes_its_branches_by_default(tmp_path: Path) -> None:
    repo = workloads.make_repo(tmp_path / "repo", 5)
    work = tmp_path / "work"
    workloads.shell_floor(repo, 2, 2, work)
    assert branches(repo, "floor") == []
    assert git(repo, "branch", "--format=%(refname:short)") == "main"
    assert_clean(repo, work)


def test_naive_seed_commits_each_result_and_cleans_up(tmp_path: Path) -> None:
    repo = workloads.make_repo(tmp_path / "repo", 20)
    work = tmp_path / "work"
    stats: dict[str, int] = {}
    seconds = workloads.naive_seed(repo, 2, work, keep_branches=True, stats=stats)
    assert isinstance(seconds, float) and seconds > 0
    assert stats["worktree_retries"] >= 0
    assert_results_committed(repo, "seed", 2)
    assert_clean(repo, work)


@pytest.mark.parametrize(
    ("run", "prefix", "broken"),
    [
        (lambda repo, work: workloads.shell_floor(repo, 2, 2, work), "floor", "uv_binary"),
        (lambda repo, work: workloads.naive_seed(repo, 2, work), "seed", "base_python"),
    ],
    ids=["shell_floor", "naive_seed"],
)
def test_a_failing_workload_says_why_and_cleans_up(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    run: Callable[[Path, Path], float],
    prefix: str,
    broken: str,
) -> None:
    """The venv tool it needs fails: the workload raises with its message and leaves nothing."""
    repo = workloads.make_repo(tmp_path / "repo", 5)
    work = tmp_path / "work"
    # Written once: rewritten per task, one task's shell could read it truncated and exit 0.
    command = failing_command(tmp_path)
    monkeypatch.setattr(workloads, broken, lambda: command)
    with pytest.raises(RuntimeError, match="no venv today"):
        run(repo, work)
    assert branches(repo, prefix) == []
    assert_clean(repo, work)


def test_a_command_that_fails_raises_with_its_stderr(tmp_path: Path) -> None:
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(RuntimeError, match="not a git repository"):
        workloads.shell_floor(tmp_path / "nowhere", 1, 1, tmp_path / "work")


def test_median_spread() -> None:
    assert workloads.median_spread([3.0, 1.0, 2.0]) == (2.0, 2.0)
    assert workloads.median_spread([1.5]) == (1.5, 0.0)
    with pytest.raises(ValueError):
        workloads.median_spread([])
