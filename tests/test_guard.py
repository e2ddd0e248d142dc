"""The repository guard: what an agent changes in the files that decide what git runs is put
back, through nothing the agent planted, and reported."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from envelopes import AgentInfo, Provenance, TaskResult, Timings, digest
from orchestrator import _git as git_module
from orchestrator import guard as guards
from orchestrator._git import Git
from orchestrator.errors import GitError
from orchestrator.guard import RepoGuard, moved_refs, ref_values
from orchestrator.results import Brief

from .conftest import MakeRepo, git, live_processes_with


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


def test_the_users_linked_config_replaced_again_is_put_back_as_the_link_again(
    common: Path,
) -> None:
    home = Path(os.environ["HOME"])
    guard = RepoGuard.snapshot(common)
    for _ in range(2):
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


def test_a_hook_put_back_keeps_its_mode_however_often_it_is_rewritten(common: Path) -> None:
    hook = common / "hooks" / "pre-commit"
    hook.chmod(0o755)
    guard = RepoGuard.snapshot(common)
    for _ in range(2):
        hook.write_text("#!/bin/sh\nevil\n")
        assert [c.what for c in guard.check()] == ["changed"]
        assert hook.read_text() == "#!/bin/sh\nexit 0\n"
        assert stat.S_IMODE(hook.stat().st_mode) == 0o755


def test_a_file_only_touched_is_not_a_change_and_a_later_change_is_still_put_back(
    common: Path,
) -> None:
    hook = common / "hooks" / "pre-commit"
    hook.chmod(0o755)
    guard = RepoGuard.snapshot(common)
    for path in (common / "config", hook):
        os.utime(path, (946684800, 946684800))  # same bytes, another status
    (common / "hooks" / "post-merge").write_text("#!/bin/sh\nevil\n")
    # The touched files are not reported; what follows them in the same check still is.
    assert [(c.path.name, c.what) for c in guard.check()] == [("post-merge", "added")]
    assert not (common / "hooks" / "post-merge").exists()
    (common / "config").write_text('[filter "x"]\n\tclean = evil\n')
    hook.write_text("#!/bin/sh\nevil\n")
    assert sorted(c.path.name for c in guard.check()) == ["config", "pre-commit"]
    assert (common / "config").read_text() == "[core]\n\tbare = false\n"
    assert hook.read_text() == "#!/bin/sh\nexit 0\n"
    assert stat.S_IMODE(hook.stat().st_mode) == 0o755


def test_a_config_replaced_by_a_link_to_the_same_bytes_is_put_back(
    common: Path, tmp_path: Path
) -> None:
    """A link is not the file: git would follow it to wherever the agent points it later."""
    guard = RepoGuard.snapshot(common)
    copy = tmp_path / "agent-owned-config"
    copy.write_bytes((common / "config").read_bytes())
    (common / "config").unlink()
    (common / "config").symlink_to(copy)
    assert [c.what for c in guard.check()] == ["changed"]
    assert not (common / "config").is_symlink()
    assert (common / "config").read_text() == "[core]\n\tbare = false\n"


def test_a_directory_planted_where_a_file_was_absent_is_removed_a_linked_one_only_unlinked(
    common: Path, tmp_path: Path
) -> None:
    guard = RepoGuard.snapshot(common)
    (common / "info" / "attributes").mkdir(parents=True)
    (common / "info" / "attributes" / "inner").write_text("x")
    elsewhere = tmp_path / "users-directory"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep me\n")
    (common / "hooks" / "post-checkout").symlink_to(elsewhere)
    found = {c.path.name: c.what for c in guard.check()}
    assert found == {"attributes": "added", "post-checkout": "added"}
    assert not (common / "info" / "attributes").exists()
    assert not os.path.lexists(common / "hooks" / "post-checkout")
    assert (elsewhere / "keep.txt").read_text() == "keep me\n"


def test_a_file_too_big_to_keep_is_removed_when_changed_not_emptied(common: Path) -> None:
    exclude = common / "info" / "exclude"
    exclude.parent.mkdir()
    exclude.write_bytes(b"#" * ((4 << 20) + 1))  # over what the guard keeps to put back
    guard = RepoGuard.snapshot(common)
    exclude.write_text("*\n")
    assert [c.what for c in guard.check()] == ["changed"]
    assert not exclude.exists()
    exclude.write_bytes(b"#" * ((4 << 20) + 1))
    guard = RepoGuard.snapshot(common)
    exclude.unlink()  # deleted: nothing to put back, nothing to remove
    assert [c.what for c in guard.check()] == ["deleted"]
    assert not exclude.exists()
    assert guard.check() == []


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


#: Run in a child: snapshot the guard, change the config, then check with the size of files
#: this process may write limited (RLIMIT_FSIZE: a write past it is cut short, the next
#: fails with EFBIG, as on a disk that fills up mid-write), and again without the limit.
_FULL_DISK_CHECK = """
import json, resource, signal, sys
from pathlib import Path
from orchestrator.guard import RepoGuard
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
common = Path(sys.argv[1])
guard = RepoGuard.snapshot(common)
(common / "config").write_text("[core]\\n\\tfsmonitor = evil\\n")
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
limited = [c.what for c in guard.check()]
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
print(json.dumps([limited, [c.what for c in guard.check()]]))
"""


def test_a_put_back_the_disk_takes_only_in_part_is_not_put_in_place_cut_short(
    common: Path,
) -> None:
    """The config to put back is larger than what may be written: the write is cut short.
    Nothing cut short takes the config's place, no temporary file stays, it is reported,
    and the next check puts it back whole."""
    config = "[core]\n\tbare = false\n" + "".join(f"# line {i:05}\n" for i in range(1000))
    (common / "config").write_text(config)
    child = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHECK, str(common)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    limited, unlimited = json.loads(child.stdout)
    assert limited == ["changed (and could not be put back: File too large)"]
    assert unlimited == ["changed"]
    assert (common / "config").read_text() == config
    assert sorted(os.listdir(common)) == ["config", "hooks"]


def test_put_back_beside_the_file_not_through_tmpdir(
    common: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))
    guard = RepoGuard.snapshot(common)
    (common / "config").write_text("[core]\n\tfsmonitor = evil\n")
    assert [c.what for c in guard.check()] == ["changed"]
    assert (common / "config").read_text() == "[core]\n\tbare = false\n"


def test_a_check_looks_at_each_file_once_and_a_hook_gone_and_back_is_still_watched(
    common: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check runs before every git command: it stats each watched file once (a hook is
    not looked at twice, as the snapshot's and as the directory's), and a hook planted
    after the snapshot, removed by a check and planted again, is removed again."""
    guard = RepoGuard.snapshot(common)
    seen: list[str] = []
    real = os.lstat

    def counting(path: str | os.PathLike[str], *args: object, **kwargs: object) -> os.stat_result:
        seen.append(os.fspath(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "lstat", counting)
    assert guard.check() == []
    assert len(seen) == len(set(seen)) and str(common / "hooks" / "pre-commit") in seen
    monkeypatch.setattr(os, "lstat", real)
    for _ in range(2):
        (common / "hooks" / "post-merge").write_text("#!/bin/sh\nevil\n")
        assert [(c.path.name, c.what) for c in guard.check()] == [("post-merge", "added")]
        assert not (common / "hooks" / "post-merge").exists()
    assert guard.check() == []


def test_a_repository_without_hooks_gets_none_planted(common: Path) -> None:
    shutil.rmtree(common / "hooks")
    guard = RepoGuard.snapshot(common)
    (common / "hooks").mkdir()
    (common / "hooks" / "post-checkout").write_text("#!/bin/sh\nevil\n")
    assert [(c.path.name, c.what) for c in guard.check()] == [("post-checkout", "added")]
    assert os.listdir(common / "hooks") == []


@pytest.mark.parametrize(
    ("xdg", "name"),
    [
        (None, ".config/git/config"),
        (None, ".config/git/attributes"),
        ("xdg", "xdg/git/config"),
        ("xdg", "xdg/git/attributes"),
        (None, "global.gitconfig"),
    ],
)
def test_each_of_the_users_own_git_files_is_watched(
    common: Path, monkeypatch: pytest.MonkeyPatch, xdg: str | None, name: str
) -> None:
    home = Path(os.environ["HOME"])
    if xdg is not None:
        monkeypatch.setenv("XDG_CONFIG_HOME", str(home / xdg))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / "global.gitconfig"))
    watched = home / name
    watched.parent.mkdir(parents=True, exist_ok=True)
    watched.write_text("[user]\n\tname = me\n")
    guard = RepoGuard.snapshot(common)
    watched.write_text('[filter "x"]\n\tclean = evil\n')
    assert [c.path for c in guard.check()] == [watched]
    assert watched.read_text() == "[user]\n\tname = me\n"


def test_a_looping_link_for_the_users_config_is_watched_as_a_link(common: Path) -> None:
    home = Path(os.environ["HOME"])
    (home / ".gitconfig").unlink()
    (home / ".gitconfig").symlink_to(home / ".gitconfig")  # ELOOP: no file it leads to
    guard = RepoGuard.snapshot(common)
    (home / ".gitconfig").unlink()
    (home / ".gitconfig").write_text("[core]\n\tfsmonitor = evil\n")
    assert [c.path.name for c in guard.check()] == [".gitconfig"]
    assert os.readlink(home / ".gitconfig") == str(home / ".gitconfig")


def test_a_change_is_blamed_on_an_attempt_within_a_second_of_it_and_no_further(
    common: Path,
) -> None:
    """The file's ctime and the attempt's clock may differ by up to a second."""
    guard = RepoGuard.snapshot(common)
    with (common / "config").open("a") as f:
        f.write("# changed\n")
    [change] = guard.check()
    at = change.changed_at
    assert guard.blame(at + 1.5, at + 3.0) == []  # started later
    assert guard.blame(at - 3.0, at - 1.5) == []  # finished earlier
    assert guard.unblamed() != []
    assert guard.blame(at + 1.0, at + 3.0) == [change]  # started a second after
    assert guard.blame(at - 3.0, at - 1.0) == [change]  # finished a second before
    assert guard.blame(at, at) == [change]
    assert guard.unblamed() == []


def _result(task_id: str, branch: str | None, commit: str | None) -> TaskResult:
    stamp = datetime.now(UTC)
    info = AgentInfo(kind="callable", qualname="agent")
    return TaskResult(
        task_id=task_id,
        agent="a",
        status="succeeded" if commit else "failed",
        attempts=1,
        output={},
        timings=Timings(started_at=stamp, finished_at=stamp, duration_s=0.0),
        branch=branch,
        provenance=Provenance(
            envelope_sha256="e" * 64,
            base_commit="b" * 40,
            result_commit=commit,
            agent=info,
            agent_sha256=digest(info.model_dump(mode="json")),
            output_sha256=digest({}),
        ),
    )


def test_refs_moved_during_a_run_by_no_task_of_it_are_reported(make_repo: MakeRepo) -> None:
    repo = make_repo()
    base = git(repo, "rev-parse", "main")
    for ref in ("refs/heads/a-stable", "refs/heads/gone", "refs/heads/orchestrator/r/mine"):
        git(repo, "update-ref", ref, base)
    git(repo, "commit", "--allow-empty", "-q", "-m", "second")
    second = git(repo, "rev-parse", "main")
    git(repo, "update-ref", "refs/heads/main", base)
    before = anyio.run(ref_values, Git(repo))
    assert before == {
        "refs/heads/a-stable": base,
        "refs/heads/gone": base,
        "refs/heads/main": base,
        "refs/heads/orchestrator/r/mine": base,
    }
    git(repo, "update-ref", "refs/heads/main", second)  # moved
    git(repo, "update-ref", "-d", "refs/heads/gone")  # deleted
    git(repo, "update-ref", "refs/heads/new", second)  # created
    git(repo, "update-ref", "refs/heads/orchestrator/r/mine", second)  # the run's own
    git(repo, "update-ref", "refs/orchestrator/r/x", second)  # the orchestrator's
    git(repo, "update-ref", "refs/heads/orchestrator/r/kept", second)
    git(repo, "update-ref", "refs/heads/orchestrator/r/moved", base)
    after = anyio.run(ref_values, Git(repo))
    results = [
        _result("failed", None, None),  # no branch, no result: nothing to compare
        _result("nobranch", None, second),
        _result("noresult", "orchestrator/r/none", None),
        _result("kept", "orchestrator/r/kept", second),
        _result("moved", "orchestrator/r/moved", second),
        _result("deleted", "orchestrator/r/deleted", second),
    ]
    assert moved_refs(before, after, results) == [
        f"refs/heads/gone was deleted during the run (was {base})",
        f"refs/heads/main moved during the run from {base} to {second}; no task of it moved it",
        f"refs/heads/new was created during the run (at {second}); no task of it made it",
        f"branch orchestrator/r/moved of task moved points at {base}, "
        f"not at its result {second}: moved by another process",
        f"branch orchestrator/r/deleted of task deleted points at None, "
        f"not at its result {second}: moved by another process",
    ]
    assert moved_refs(after, after, results[:4]) == []
    # What a run keeps of its results (orchestrator/results.py) says the same.
    briefs = [Brief.of(r) for r in results]
    assert moved_refs(before, after, briefs) == moved_refs(before, after, results)


def test_a_fifo_among_the_refs_fails_their_listing_at_its_timeout(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """for-each-ref opens every loose ref: one made a FIFO (by an agent, in the shared
    refs/) would block it for ever."""
    monkeypatch.setattr(git_module, "LIST_REFS_TIMEOUT_S", 0.5)
    repo = make_repo()
    fifo = repo / ".git" / "refs" / "heads" / "planted"
    os.mkfifo(fifo)
    with pytest.raises(GitError, match=r"did not finish within 0\.5 s") as caught:
        anyio.run(ref_values, Git(repo))
    assert caught.value.command[0] == "for-each-ref"
    assert live_processes_with(str(repo)) == []
    # Knowing the git directory, the error names what blocked git, and says what to do.
    runner = Git(repo)
    runner.common_dir = repo / ".git"
    (repo / ".git" / "logs" / "refs" / "heads").mkdir(parents=True, exist_ok=True)
    os.mkfifo(repo / ".git" / "logs" / "refs" / "heads" / "planted-log")
    (repo / ".git" / "refs" / "tags").mkdir(exist_ok=True)
    (repo / ".git" / "refs" / "tags" / "linked").symlink_to(fifo)
    (repo / ".git" / "refs" / "tags" / "dangling").symlink_to(repo / "nowhere")
    with pytest.raises(GitError) as caught:
        anyio.run(ref_values, runner)
    named = str(caught.value).split("which git blocks on: ")[1].split("; ")[0].split(", ")
    assert sorted(named) == sorted(
        [
            str(fifo),
            str(repo / ".git" / "refs" / "tags" / "linked"),
            str(repo / ".git" / "logs" / "refs" / "heads" / "planted-log"),
        ]
    )
    assert str(caught.value).endswith("remove them (nothing is stored in a FIFO)")
    assert "did not finish within 0.5 s" in caught.value.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # named, not removed: the user's to see


def test_a_shared_file_made_a_fifo_is_put_back_as_it_last_was(make_repo: MakeRepo) -> None:
    """packed-refs and HEAD are read by every git command: one made a FIFO would block each
    for ever. They change for good reasons (not put back then), but one made anything other
    than a regular file is put back as it last was, and the change told."""
    repo = make_repo()
    git(repo, "branch", "packed")
    git(repo, "pack-refs", "--all")
    common = repo / ".git"
    started = time.time()
    guard = RepoGuard.snapshot(common)
    packed = (common / "packed-refs").read_bytes()
    head = (common / "HEAD").read_bytes()
    assert b"refs/heads/packed" in packed
    # A change for a good reason is kept, not put back: the later content is what counts.
    git(repo, "branch", "-D", "packed")
    (common / "packed-refs").chmod(0o640)  # kept as it last was: its mode too
    assert guard.check() == []
    packed = (common / "packed-refs").read_bytes()
    assert b"refs/heads/packed" not in packed
    (common / "packed-refs").unlink()
    os.mkfifo(common / "packed-refs")
    (common / "HEAD").unlink()
    changes = guard.check()
    assert sorted((c.path.name, c.what) for c in changes) == [
        ("HEAD", "deleted"),
        ("packed-refs", "made something other than a regular file"),
    ]
    assert stat.S_ISREG(os.lstat(common / "packed-refs").st_mode)
    assert (common / "packed-refs").read_bytes() == packed
    assert (common / "HEAD").read_bytes() == head
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    # Again, alone (HEAD as it should be), and through a link: put back each time.
    for bad in ("fifo", "link"):
        (common / "packed-refs").unlink()
        if bad == "fifo":
            os.mkfifo(common / "packed-refs")
        else:
            (common / "packed-refs").symlink_to(common / "HEAD")
        assert [(c.path.name, c.what) for c in guard.check()] == [
            ("packed-refs", "made something other than a regular file")
        ]
        assert not (common / "packed-refs").is_symlink()
        assert (common / "packed-refs").read_bytes() == packed
        assert stat.S_IMODE(os.lstat(common / "packed-refs").st_mode) == 0o640
    # A directory in packed-refs' place goes too; no packed-refs at all is no change.
    (common / "packed-refs").unlink()
    assert guard.check() == []
    (common / "packed-refs").mkdir()
    assert [c.path.name for c in guard.check()] == ["packed-refs"]
    assert not (common / "packed-refs").exists()  # never seen again as a file: removed
    # Each change is the agent's that ran when it was made, or told as no one's.
    changes = guard.blame(started, time.time())
    assert [c.path.name for c in changes] == ["HEAD", "packed-refs"] * 1 + ["packed-refs"] * 3
    assert guard.unblamed() == []


def test_a_symbolic_link_head_is_left_and_an_unreadable_shared_file_is_no_error(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo()
    common = repo / ".git"
    (common / "HEAD").unlink()
    (common / "HEAD").symlink_to("refs/heads/main")  # as core.preferSymlinkRefs makes it
    git(repo, "pack-refs", "--all")
    monkeypatch.setattr(guards, "_MAX_SHARED", 10)  # packed-refs now too big to keep
    guard = RepoGuard.snapshot(common)
    assert guard.check() == []
    assert (common / "HEAD").is_symlink()
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    # packed-refs is still watched behind such a HEAD (never kept: too big, so removed).
    (common / "packed-refs").unlink()
    os.mkfifo(common / "packed-refs")
    assert [c.path.name for c in guard.check()] == ["packed-refs"]
    assert not (common / "packed-refs").exists()


def test_what_blocks_a_listing_of_refs_is_named_five_at_most_packed_refs_too(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(git_module, "LIST_REFS_TIMEOUT_S", 0.5)
    repo = make_repo()
    common = repo / ".git"
    runner = Git(repo)
    runner.common_dir = common
    git(repo, "pack-refs", "--all")
    (common / "packed-refs").unlink()
    os.mkfifo(common / "packed-refs")  # read by every ref listing
    for n in range(5):
        os.mkfifo(common / "refs" / "heads" / f"fifo{n}")

    def named() -> tuple[list[str], str]:
        with pytest.raises(GitError) as caught:
            anyio.run(ref_values, runner)
        assert caught.value.returncode == -9  # still the timeout git was killed at
        listed = str(caught.value).split("which git blocks on: ")[1].split("; ")[0]
        return listed.removesuffix(" ...").split(", "), listed

    six, listed = named()
    assert len(six) == 5 and listed.endswith(" ...")  # six found: the first five named
    assert six[0] == str(common / "packed-refs")
    (common / "refs" / "heads" / "fifo0").unlink()
    five, listed = named()
    assert len(five) == 5 and not listed.endswith(" ...")


def test_at_most_so_many_entries_are_looked_at_for_what_blocks_git(make_repo: MakeRepo) -> None:
    from orchestrator.guard import _not_regular

    repo = make_repo()
    common = repo / ".git"
    for ref in common.joinpath("refs").rglob("*"):
        if ref.is_file():
            ref.unlink()  # no loose ref left: the FIFO is the only entry
    os.mkfifo(common / "refs" / "heads" / "only")
    assert _not_regular(common, limit=1) == [common / "refs" / "heads" / "only"]
    assert _not_regular(common, limit=0) == []
    (common / "refs" / "heads" / "regular").write_text("x\n")
    assert len(_not_regular(common, limit=2)) == 1
    assert _not_regular(common) == [common / "refs" / "heads" / "only"]
