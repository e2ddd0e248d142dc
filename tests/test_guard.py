"""The repository guard: what an agent changes in the files that decide what git runs is put
back, through nothing the agent planted, and reported."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from orchestrator.guard import RepoGuard


@pytest.fixture
def common(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    (home / "dotfiles").mkdir(parents=True)
    (home / "dotfiles" / "gitconfig").write_text("[user]\n\tname = me\n")
    (home / ".gitconfig").symlink_to(home / "dotfiles" / "gitconfig")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    git_dir = tmp_path / "repo" / ".git"
    (git_dir / "hooks").mkdir(parents=True)
    (git_dir / "hooks" / "pre-commit").write_text("#!/bin/sh\nexit 0\n")
    (git_dir / "config").write_text("[core]\n\tbare = false\n")
    return git_dir


def test_changes_are_put_back_and_reported_once(common: Path) -> None:
    guard = RepoGuard.snapshot(common)
    config = (common / "config").read_bytes()
    with (common / "config").open("a") as f:
        f.write('[filter "x"]\n\tclean = evil\n')
    (common / "hooks" / "post-checkout").write_text("#!/bin/sh\nevil\n")
    (common / "hooks" / "pre-commit").unlink()
    found = {c.path.name: c.what for c in guard.check()}
    assert found == {"config": "changed", "post-checkout": "added", "pre-commit": "deleted"}
    assert (common / "config").read_bytes() == config
    assert not (common / "hooks" / "post-checkout").exists()
    assert (common / "hooks" / "pre-commit").read_text() == "#!/bin/sh\nexit 0\n"
    assert guard.check() == []


def test_a_link_planted_where_the_guard_writes_is_not_followed(
    common: Path, tmp_path: Path
) -> None:
    """A fixed temporary name once let an agent delete .git/config and crash the run."""
    guard = RepoGuard.snapshot(common)
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    for name in (".config.orchestrator-restore", ".config.restore"):
        (common / name).symlink_to(victim)
    with (common / "config").open("a") as f:
        f.write("# changed\n")
    assert [c.what for c in guard.check()] == ["changed"]
    assert (common / "config").read_text() == "[core]\n\tbare = false\n"
    assert victim.read_text() == "keep me\n"


def test_the_users_own_linked_config_is_watched_and_its_link_kept(common: Path) -> None:
    home = Path(os.environ["HOME"])
    guard = RepoGuard.snapshot(common)
    (home / "dotfiles" / "gitconfig").write_text('[filter "x"]\n\tclean = evil\n')
    assert [c.path.name for c in guard.check()] == ["gitconfig"]
    assert (home / "dotfiles" / "gitconfig").read_text() == "[user]\n\tname = me\n"
    (home / ".gitconfig").unlink()
    (home / ".gitconfig").write_text("[core]\n\tfsmonitor = evil\n")
    assert [c.path.name for c in guard.check()] == [".gitconfig"]
    assert os.readlink(home / ".gitconfig") == str(home / "dotfiles" / "gitconfig")


def test_blame_takes_the_ctime_an_agent_cannot_set_back(common: Path) -> None:
    guard = RepoGuard.snapshot(common)
    with (common / "config").open("a") as f:
        f.write("# changed\n")
    os.utime(common / "config", (946684800, 946684800))  # 2000-01-01
    now = time.time()
    assert [c.path.name for c in guard.blame(now - 5, now + 5)] == ["config"]
    assert guard.unblamed() == []


def test_a_change_that_cannot_be_put_back_is_reported_and_leaves_nothing_behind(
    common: Path,
) -> None:
    guard = RepoGuard.snapshot(common)
    (common / "config").unlink()
    (common / "config").mkdir()  # no file can be renamed over a directory, even by root
    [change] = guard.check()
    assert change.what == "changed (and could not be put back: Is a directory)"
    assert sorted(os.listdir(common)) == ["config", "hooks"]
    # Reported again at the next check, as long as it is there, and still nothing left.
    assert [c.what for c in guard.check()] == [change.what]
    assert sorted(os.listdir(common)) == ["config", "hooks"]
