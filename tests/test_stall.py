"""orchestrator/stall.py: a git command kept waiting for ever by what an agent planted in the
git directory (a FIFO, a link to a device) is found while it runs, stopped, and the planted
file removed; a slow command with nothing planted is left to finish."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import psutil
import pytest

from envelopes import Plan, Report
from orchestrator import orchestrate_parallel, stall
from orchestrator._git import Git
from orchestrator.errors import GitError
from orchestrator.guard import RepoGuard

from .conftest import MakeRepo, git, live_processes_with


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Looks every 0.05 s (then 0.1, 0.2...); yields the git directories searched, one
    entry per search."""
    monkeypatch.setattr(stall, "STALL_CHECK_S", 0.05)
    monkeypatch.setattr(stall, "STALL_MAX_S", 0.2)
    monkeypatch.setattr(stall, "END_GRACE_S", 0.3)
    searched: list[Path] = []
    real = stall.blocking_files

    def counting(common_dir: Path, *args: object, **kwargs: object) -> list[Path]:
        searched.append(common_dir)
        return real(common_dir, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stall, "blocking_files", counting)
    yield searched


def _object_path(repo: Path, revision: str) -> Path:
    oid = git(repo, "rev-parse", revision)
    return repo / ".git" / "objects" / oid[:2] / oid[2:]


def _runner(repo: Path) -> Git:
    runner = Git(repo)
    runner.common_dir = repo / ".git"
    return runner


# blocking_files


def test_what_would_block_git_is_found_and_nothing_else(tmp_path: Path) -> None:
    common = tmp_path / "git"
    (common / "objects" / "ab").mkdir(parents=True)
    (common / "refs" / "heads").mkdir(parents=True)
    (common / "orchestrator" / "runs").mkdir(parents=True)
    (common / "modules" / "sub" / "orchestrator").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "fifo")
    (outside / "file").write_text("x")
    (outside / "dir").mkdir()
    os.mkfifo(common / "objects" / "ab" / "cdef")  # a FIFO
    (common / "refs" / "heads" / "linked").symlink_to(outside / "fifo")  # a link to one
    (common / "logs").symlink_to("/dev/zero")  # a link to a device
    os.mknod(common / "device", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # a device (root)
    os.mkfifo(common / "modules" / "sub" / "orchestrator" / "deep")  # not the engine's own
    # Not blocking: what git makes, a socket (cannot be opened), links to a file or a
    # directory, a dangling link; the engine's own directory is not git's to read.
    (common / "HEAD").write_text("ref: refs/heads/main\n")
    (common / "refs" / "heads" / "file-link").symlink_to(outside / "file")
    (common / "refs" / "dir-link").symlink_to(outside / "dir")
    (common / "refs" / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(common / "orchestrator" / "runs" / "own-fifo")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(common / "fsmonitor--daemon.ipc"))
        found = stall.blocking_files(common)
    assert sorted(found) == sorted(
        [
            common / "objects" / "ab" / "cdef",
            common / "refs" / "heads" / "linked",
            common / "logs",
            common / "device",
            common / "modules" / "sub" / "orchestrator" / "deep",
        ]
    )
    # Paths named besides the directory are looked at themselves.
    also = [outside / "fifo", outside / "file", tmp_path / "absent"]
    assert stall.blocking_files(tmp_path / "no-such-dir", also) == [outside / "fifo"]


def test_at_most_so_many_entries_are_looked_at(tmp_path: Path) -> None:
    common = tmp_path / "git"
    common.mkdir()
    for i in range(10):
        os.mkfifo(common / f"f{i}")
    assert len(stall.blocking_files(common)) == 10
    assert len(stall.blocking_files(common, limit=4)) == 4
    assert stall.blocking_files(common, limit=0) == []


def test_a_sweep_lists_again_only_the_directories_changed_since_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = tmp_path / "git"
    for name in ("objects/ab", "objects/cd", "refs/heads", "orchestrator/runs"):
        (common / name).mkdir(parents=True)
    (tmp_path / "target").write_text("a ref\n")
    (common / "refs" / "heads" / "link").symlink_to(tmp_path / "target")
    listed: list[str] = []
    real = os.scandir

    def counting(path: str) -> object:
        listed.append(os.path.relpath(path, common))
        return real(path)

    monkeypatch.setattr(stall.os, "scandir", counting)
    sweep = stall.Sweep(common, racy_s=0.0)  # (the clock's tick is the next test's)
    assert sweep() == []
    assert sorted(listed) == [".", "objects", "objects/ab", "objects/cd", "refs", "refs/heads"]
    listed.clear()
    assert sweep() == [] and listed == []  # nothing changed: nothing listed
    # A FIFO made, in a directory whose modification time is then set back.
    info = os.stat(common / "objects" / "ab")
    os.mkfifo(common / "objects" / "ab" / "planted")
    os.utime(common / "objects" / "ab", ns=(info.st_atime_ns, info.st_mtime_ns))
    assert sweep() == [common / "objects" / "ab" / "planted"] and listed == ["objects/ab"]
    # Found again while it is there; a new directory is listed through its parent.
    listed.clear()
    (common / "refs" / "heads" / "new").mkdir()
    os.mkfifo(common / "refs" / "heads" / "new" / "fifo")
    os.mkfifo(common / "orchestrator" / "runs" / "fifo")  # the engine's own: never looked at
    assert sorted(sweep()) == [common / "refs" / "heads" / "new" / "fifo"]
    assert sorted(listed) == ["refs/heads", "refs/heads/new"]
    # What a link leads to is looked at again, its directory unchanged.
    listed.clear()
    (tmp_path / "target").unlink()
    os.mkfifo(tmp_path / "target")
    assert common / "refs" / "heads" / "link" in sweep() and listed == []
    (common / "refs" / "heads" / "link").unlink()
    # A directory gone is forgotten; one made again in its place is listed.
    (common / "refs" / "heads" / "new" / "fifo").unlink()
    (common / "refs" / "heads" / "new").rmdir()
    assert sweep() == []
    (common / "refs" / "heads" / "new").mkdir()
    os.mkfifo(common / "refs" / "heads" / "new" / "again")
    assert sweep() == [common / "refs" / "heads" / "new" / "again"]


def test_a_first_sweep_finds_links_to_fifos_and_follows_no_link_to_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = tmp_path / "git"
    (common / "refs").mkdir(parents=True)
    (common / "objects").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "fifo")
    (common / "refs" / "to-fifo").symlink_to(outside / "fifo")
    (common / "refs" / "dangling").symlink_to(tmp_path / "nowhere")
    (common / "refs" / "to-dir").symlink_to(outside)  # git may follow it; the sweep does not
    os.mkfifo(common / "objects" / "planted")
    assert sorted(stall.Sweep(common)()) == [
        common / "objects" / "planted",
        common / "refs" / "to-fifo",
    ]
    with socket.socket(socket.AF_UNIX) as listener:  # a socket cannot be opened: not found
        listener.bind(str(common / "objects" / "fsmonitor--daemon.ipc"))
        assert len(stall.Sweep(common)()) == 2
    # A directory that cannot be listed or looked at (gone meanwhile) is passed over, the
    # rest is not, whichever comes first.
    real_scandir, real_lstat = os.scandir, os.lstat
    everything = {"refs": common / "refs" / "to-fifo", "objects": common / "objects" / "planted"}
    for gone, kept in (("refs", "objects"), ("objects", "refs")):

        def failing(path: str, gone: str = gone) -> object:
            if str(path).endswith(gone):
                raise FileNotFoundError(path)
            return real_scandir(path)

        def vanished(path: str, gone: str = gone) -> os.stat_result:
            if str(path).endswith(gone):
                raise FileNotFoundError(path)
            return real_lstat(path)

        with monkeypatch.context() as patched:
            patched.setattr(stall.os, "scandir", failing)
            assert stall.Sweep(common)() == [everything[kept]]
            assert stall.blocking_files(common) == [everything[kept]]
        with monkeypatch.context() as patched:
            patched.setattr(stall.os, "lstat", vanished)
            assert stall.Sweep(common)() == [everything[kept]]


def test_an_entry_gone_while_it_is_sorted_is_passed_over() -> None:
    class Gone:
        name = path = "gone"

        def is_dir(self, follow_symlinks: bool = True) -> bool:
            raise FileNotFoundError(self.path)

    listed = stall._Listed(None)
    found: list[Path] = []
    stall._sort(Gone(), listed, found, top=False)  # type: ignore[arg-type]
    assert found == [] and listed.directories == listed.links == []


def test_a_sweep_is_bounded_within_a_directory_too(tmp_path: Path) -> None:
    common = tmp_path / "git"
    (common / "objects").mkdir(parents=True)
    for i in range(10):
        os.mkfifo(common / "objects" / f"f{i}")
    assert len(stall.Sweep(common)()) == 10
    assert len(stall.Sweep(common, limit=4)()) == 3  # objects/ is the first of the 4


def test_a_directory_changed_within_the_clock_s_tick_is_listed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a file system whose clock ticks coarsely, a FIFO made in the tick of the last
    listing leaves the directory's times as they were: one changed within racy_s of a
    sweep is listed at the next whatever its times say."""
    common = tmp_path / "git"
    common.mkdir()
    listed: list[str] = []
    real = os.scandir

    def counting(path: str) -> object:
        listed.append(path)
        return real(path)

    monkeypatch.setattr(stall.os, "scandir", counting)
    sweep = stall.Sweep(common, racy_s=3600.0)  # every change is "just now"
    sweep()
    sweep()
    assert listed == [str(common), str(common)]


def test_the_guard_removes_a_fifo_left_before_the_run_and_says_so(make_repo: MakeRepo) -> None:
    repo = make_repo()
    left = repo / ".git" / "objects" / "info" / "commit-graph"
    left.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(left)
    guard = RepoGuard.snapshot(repo / ".git")
    assert not left.exists()
    [change] = guard.changes
    assert change.path == left
    assert len(guard.unblamed()) == 1
    # One made later is found by the sweep after an attempt, and blamed on it.
    os.mkfifo(left)
    now = time.time()
    blamed = guard.blame(now - 5, now)
    assert len(guard.changes) == 2 and guard.changes[1] in blamed
    assert guard.changes[1].path == left and not left.exists()


# held_blocking


def test_open_named_fifos_and_devices_are_found_pipes_null_and_random_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "held"
    os.mkfifo(fifo)
    keep = os.open(fifo, os.O_RDWR)  # so that the child's open does not block
    script = (
        "import os, sys, time\n"
        "a = os.open(sys.argv[1], os.O_RDONLY)\n"
        "b = os.open('/dev/zero', os.O_RDONLY)\n"
        "c = os.open(os.devnull, os.O_RDONLY)\n"
        "d = os.open('/dev/urandom', os.O_RDONLY)\n"
        "e = os.open('/dev/random', os.O_RDONLY)\n"
        "print(a, b, c, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(fifo)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as child:
        try:
            assert child.stdout is not None
            a, b, _ = (int(n) for n in child.stdout.readline().split())
            held = stall.held_blocking([999_999_999, child.pid])  # one gone: no matter
            assert held == {(child.pid, a, str(fifo)), (child.pid, b, "/dev/zero")}
            # A descriptor closed while they are looked at is passed over.
            real = os.readlink

            def closing(path: str) -> str:
                if path == f"/proc/{child.pid}/fd/{a}":
                    raise FileNotFoundError(path)
                return real(path)

            monkeypatch.setattr(stall.os, "readlink", closing)
            assert stall.held_blocking([child.pid]) == {(child.pid, b, "/dev/zero")}
        finally:
            child.kill()
            child.wait()
            os.close(keep)
    assert stall.held_blocking([child.pid]) == set()  # gone: nothing, no error


# release


def test_release_lets_blocked_processes_go_and_removes_only_what_is_inside(
    tmp_path: Path,
) -> None:
    root = tmp_path / "git"
    root.mkdir()
    inside, read, outside = root / "fifo", root / "read", tmp_path / "outside-fifo"
    for fifo in (inside, read, outside):
        os.mkfifo(fifo)
    link = root / "link"
    link.symlink_to(outside)
    # One process blocked opening a FIFO to read it, one to write it, one through the link.
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    reader = subprocess.Popen(["cat", str(read)], **quiet)
    writer = subprocess.Popen(["sh", "-c", f"echo x > {inside}"], **quiet)
    through = subprocess.Popen(["cat", str(link)], **quiet)
    try:
        for process in (reader, writer, through):  # each blocked opening its FIFO
            while stall.waiting_on_fifo([process.pid]) != {process.pid}:
                assert process.poll() is None
                time.sleep(0.01)
        stall.release([inside, read, link], root)
        for process in (reader, writer, through):
            process.wait(timeout=30)
    finally:
        for process in (reader, writer, through):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert not inside.exists() and not read.exists() and not link.is_symlink()
    assert stat.S_ISFIFO(os.lstat(outside).st_mode)  # what a link points at stays
    os.mkfifo(inside)
    # Outside the root: let go of, never removed; what follows it in the list still is.
    assert list(stall.release([outside, inside], root)) == [inside]
    assert stat.S_ISFIFO(os.lstat(outside).st_mode) and not inside.exists()
    stall.release([tmp_path / "absent", root / "absent", tmp_path], root)  # no error


# watching a git command


def test_a_command_blocked_on_a_planted_object_is_let_go_and_the_fifo_removed(
    make_repo: MakeRepo, quick: list[Path]
) -> None:
    """git, let go of, reads the FIFO's end: an empty object, which it reports itself."""
    repo = make_repo()
    planted = _object_path(repo, "HEAD:src/file0000.txt")
    oid = git(repo, "rev-parse", "HEAD:src/file0000.txt")
    planted.unlink()
    os.mkfifo(planted)
    runner = _runner(repo)
    with pytest.raises(GitError, match=f"Not a valid object name {oid}") as caught:
        anyio.run(lambda: runner.run("cat-file", "-p", oid))
    assert caught.value.command == ["cat-file", "-p", oid]
    assert not planted.exists()  # removed: the next command does not block on it
    assert live_processes_with(str(repo)) == []
    assert quick and set(quick) == {repo / ".git"}
    # The same through read(), whose own timeout is far off.
    os.mkfifo(planted)
    with pytest.raises(GitError, match="Not a valid object name"):
        anyio.run(lambda: runner.read("cat-file", "-p", oid, stdin=b"", limit=1 << 10, timeout=600))
    assert not planted.exists()
    assert live_processes_with(str(repo)) == []


def test_a_blocked_write_let_go_of_leaves_no_lock_and_the_guard_keeps_the_change(
    make_repo: MakeRepo, quick: list[Path]
) -> None:
    """git opens a reflog to append to it while it holds the ref's lock: let go of, its
    write is refused, and it removes the lock as it ends."""
    repo = make_repo()
    logs = repo / ".git" / "logs" / "refs" / "heads"
    logs.mkdir(parents=True, exist_ok=True)
    runner = _runner(repo)
    runner.guard = RepoGuard.snapshot(repo / ".git")
    os.mkfifo(logs / "victim")
    made = os.lstat(logs / "victim").st_ctime
    try:  # its write went to the FIFO's reader (ours), or was refused: either is git's
        anyio.run(
            lambda: runner.run(
                "-c", "core.logAllRefUpdates=always", "update-ref", "refs/heads/victim", "HEAD"
            )
        )
    except GitError as exc:
        assert exc.command[-3:] == ["update-ref", "refs/heads/victim", "HEAD"]
    assert not (logs / "victim").exists()
    assert list((repo / ".git").rglob("*.lock")) == []
    assert live_processes_with(str(repo)) == []
    [change] = runner.guard.changes
    assert change.path == logs / "victim" and change.changed_at == made
    assert change.what == "made a FIFO or a device (git would wait on it for ever)"
    assert runner.guard.unblamed() == [
        f"{logs / 'victim'} made a FIFO or a device (git would wait on it for ever) during "
        "the run, when no agent of it was running, and was put back"
    ]


def test_git_reading_a_device_without_end_is_stopped(
    make_repo: MakeRepo, quick: list[Path]
) -> None:
    """A link to /dev/zero where git reads a file: the link is removed at the first look,
    but what already opened it reads on; holding the device at two looks, it is stopped."""
    repo = make_repo()
    link = repo / ".git" / "objects" / "info" / "commit-graph"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to("/dev/zero")
    runner = _runner(repo)
    with pytest.raises(GitError, match="waited for ever on /dev/zero") as caught:
        anyio.run(lambda: runner.run("-c", f"alias.graph=!cat {link} > /dev/null", "graph"))
    assert caught.value.returncode == -15
    assert not link.is_symlink() and os.path.exists("/dev/zero")  # the link, not the device
    assert live_processes_with(str(link)) == []


def test_a_fifo_behind_a_link_to_a_directory_stops_git_without_being_found(
    make_repo: MakeRepo, quick: list[Path], tmp_path: Path
) -> None:
    """git follows a link to a directory where the search does not: the process is seen
    blocked opening a FIFO (its wait channel) at two looks, and stopped."""
    repo = make_repo()
    oid = git(repo, "rev-parse", "HEAD:src/file0000.txt")
    objects = repo / ".git" / "objects" / oid[:2]
    elsewhere = tmp_path / "elsewhere"
    objects.rename(elsewhere)
    objects.symlink_to(elsewhere)
    (elsewhere / oid[2:]).unlink()
    os.mkfifo(elsewhere / oid[2:])
    runner = _runner(repo)
    with pytest.raises(GitError, match="not one found in the git directory") as caught:
        anyio.run(lambda: runner.run("cat-file", "-p", oid))
    assert caught.value.returncode == -15
    assert stat.S_ISFIFO(os.lstat(elsewhere / oid[2:]).st_mode)  # not found: left
    assert live_processes_with(str(repo)) == []


def test_a_long_command_is_not_stopped_for_a_fifo_it_does_not_open(
    make_repo: MakeRepo, quick: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO planted while a long checkout runs is let go of and removed; the checkout,
    not blocked on it, runs to its end."""
    repo = make_repo()
    planted = repo / ".git" / "planted"
    done = repo / "done"
    counting = stall.blocking_files

    def looking(*args: object, **kwargs: object) -> list[Path]:
        if len(quick) == 1:
            os.mkfifo(planted)
        if len(quick) == 4:
            done.touch()  # the command ends after the fourth look
        return counting(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stall, "blocking_files", looking)
    runner = _runner(repo)
    runner.guard = RepoGuard.snapshot(repo / ".git")
    wait = f"!while [ ! -e {done} ]; do sleep 0.01; done; echo done"
    result = anyio.run(lambda: runner.run("-c", f"alias.long={wait}", "long"))
    assert result.returncode == 0 and result.stdout == b"done\n"
    assert len(quick) >= 4
    assert not planted.exists()
    assert [c.path for c in runner.guard.changes] == [planted]


def test_input_larger_than_a_pipe_does_not_keep_git_from_being_looked_at(
    make_repo: MakeRepo, quick: list[Path]
) -> None:
    """git blocked before it read its input all (more than a pipe holds): the input is
    written beside the wait, which still looks, and lets git go."""
    repo = make_repo()
    oid = git(repo, "rev-parse", "HEAD:src/file0000.txt")
    planted = _object_path(repo, "HEAD:src/file0000.txt")
    planted.unlink()
    os.mkfifo(planted)
    runner = _runner(repo)
    many = (oid + "\n").encode() * 5000  # 205 KB
    result = anyio.run(lambda: runner.run("cat-file", "--batch", stdin=many, check=False))
    assert quick and not planted.exists()
    # Let go of, git read an empty object, and said so; then went on with its input.
    assert b"is empty" in result.stderr and result.stdout.count(b" missing\n") >= 1
    assert live_processes_with(str(repo)) == []


def test_release_removes_only_what_still_blocks(tmp_path: Path) -> None:
    """Found a FIFO, then (another look having removed it) a ref git wrote there: kept;
    so is a link that now leads to a file."""
    root = tmp_path / "git"
    root.mkdir()
    ref = root / "ref"
    ref.write_text("0" * 40 + "\n")
    link = root / "link"
    link.symlink_to(ref)
    assert stall.release([ref, link], root) == {}
    assert ref.read_text() == "0" * 40 + "\n" and link.is_symlink()


def test_a_command_holding_a_fifo_outside_is_stopped_and_the_fifo_left(
    make_repo: MakeRepo, quick: list[Path], tmp_path: Path
) -> None:
    """Nothing in the git directory: git's own processes are found holding a FIFO open
    at two looks in a row (one planted, then removed by another command's watch)."""
    repo = make_repo()
    fifo = tmp_path / "outside"
    os.mkfifo(fifo)
    keep = os.open(fifo, os.O_RDWR)  # a writer stays: the reader waits for ever
    runner = _runner(repo)
    try:
        with pytest.raises(GitError, match=f"waited for ever on {fifo}"):
            anyio.run(lambda: runner.run("-c", f"alias.hold=!cat {fifo}", "hold"))
    finally:
        os.close(keep)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # not the git directory's: left
    assert live_processes_with(str(fifo)) == []


def test_a_slow_command_with_nothing_planted_is_left_to_finish(
    make_repo: MakeRepo, quick: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo()
    done = repo / "done"
    counting = stall.blocking_files

    def looking(*args: object, **kwargs: object) -> list[Path]:
        if len(quick) == 3:
            done.touch()  # the command ends after the third look
        return counting(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stall, "blocking_files", looking)
    waits: list[float] = []  # each wait's deadline, as the watch sets it

    class Recording:
        def __getattr__(self, name: str) -> object:
            return getattr(anyio, name)

        def move_on_after(self, delay: float) -> anyio.CancelScope:
            waits.append(delay)
            return anyio.move_on_after(delay)

    monkeypatch.setattr(stall, "anyio", Recording())
    runner = _runner(repo)
    wait = f"!while [ ! -e {done} ]; do sleep 0.01; done; echo done"
    result = anyio.run(lambda: runner.run("-c", f"alias.slow={wait}", "slow"))
    assert result.returncode == 0 and result.stdout == b"done\n"
    assert len(quick) >= 3  # looked three times: found nothing each time
    # Twice as long each time, up to the longest (0.2 s here).
    assert waits[:4] == [0.05, 0.1, 0.2, 0.2]
    # A command that ends before the first look is never looked at.
    quick.clear()
    monkeypatch.setattr(stall, "STALL_CHECK_S", 600.0)
    anyio.run(lambda: runner.run("rev-parse", "HEAD"))
    assert quick == []


def test_an_agent_planting_a_fifo_fails_its_task_and_the_run_goes_on(
    make_repo: MakeRepo, quick: list[Path]
) -> None:
    """An unsandboxed agent makes a FIFO where every git command reads (the commit graph):
    the guard's sweep after its attempt finds it, removes it, and fails the task (kind
    tamper); the run goes on and no git command ever blocks on it."""
    repo = make_repo()
    plant = (
        'd=$(git rev-parse --git-common-dir) && mkfifo "$d/objects/info/commit-graph" '
        "&& echo x > planted.txt && sleep 1.5"
    )
    plan = Plan.model_validate(
        {
            "agents": {
                "evil": {"command": ["sh", "-c", plant]},
                "good": {"command": ["sh", "-c", "sleep 0.3 && echo y > good.txt"]},
            },
            "defaults": {"venv": False},
            # One at a time, the next starting over a second after the FIFO was made: the
            # guard blames the agents that ran when a file changed, give or take a second.
            "concurrency": 1,
            "tasks": [
                {"id": "evil", "agent": "evil", "task": "t"},
                {"id": "good", "agent": "good", "task": "t"},
                {"id": "after", "agent": "good", "task": "t", "depends_on": ["good"]},
            ],
        }
    )
    report: Report = anyio.run(lambda: orchestrate_parallel(plan, repo=repo))
    by_id = {r.task_id: r for r in report.results}
    error = by_id["evil"].error
    assert by_id["evil"].status == "failed" and error is not None
    assert error.kind == "tamper"
    graph = repo / ".git" / "objects" / "info" / "commit-graph"
    assert error.paths == [str(graph)]
    assert error.message == (
        f"{graph} made a FIFO or a device (git would wait on it for ever) while this task's "
        "agent ran, and was put back"
    )
    assert by_id["good"].status == by_id["after"].status == "succeeded"
    assert not graph.exists() and report.warnings == []
    assert live_processes_with(str(repo)) == []


def test_a_kept_update_blocked_on_a_fifo_is_let_go_long_before_its_timeout(
    make_repo: MakeRepo, quick: list[Path]
) -> None:
    """The run's kept update-ref, blocked reading a ref made a FIFO after the ref's files
    were checked, would hold every ref update of the run until its 60 s timeout."""
    repo = make_repo()
    head = git(repo, "rev-parse", "HEAD")
    git(repo, "branch", "victim", head)
    fifo = repo / ".git" / "refs" / "heads" / "victim"
    fifo.unlink()
    os.mkfifo(fifo)
    runner = Git(repo)  # no common_dir: the ref's files are not checked before git is asked
    outcome: list[GitError | bool] = []

    async def main() -> None:
        with anyio.fail_after(30):
            async with runner.kept():
                try:
                    outcome.append(await runner.update_ref("refs/heads/victim", head, head))
                except GitError as exc:
                    outcome.append(exc)
                assert await runner.update_ref("refs/heads/other", head, "")

    anyio.run(main)
    # Let go of, git read the ref's end (an empty ref) and refused the update at once.
    [first] = outcome
    assert isinstance(first, GitError) and "reference broken" in str(first)
    assert not fifo.exists() or stat.S_ISREG(os.lstat(fifo).st_mode)
    assert git(repo, "rev-parse", "refs/heads/other") == head
    assert list((repo / ".git").rglob("*.lock")) == []
    assert live_processes_with(str(repo)) == []
    assert quick  # found by a look, not by the timeout


@pytest.mark.parametrize(
    ("case", "ended_by"), [("ignores-term", -signal.SIGKILL), ("one-gone", -signal.SIGTERM)]
)
def test_a_stop_terminates_then_kills_and_a_member_gone_is_no_error(
    case: str, ended_by: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """git removes its lock files on SIGTERM and ends; what does not end is killed after
    the grace; a member of the family gone before it is stopped is passed over."""
    monkeypatch.setattr(stall, "END_GRACE_S", 0.2)
    marker = str(tmp_path / case)
    env = {**os.environ, "STALL_TEST_MARK": marker}  # (its children inherit it)
    if case == "ignores-term":
        argv, size = ["sh", "-c", "trap '' TERM; sleep 60 & wait; sleep 60"], 2
    else:
        argv, size = ["sleep", "60"], 1

    async def main() -> int | None:
        async with await anyio.open_process(["sleep", "60"], env=env) as ended:
            gone = psutil.Process(ended.pid)
            ended.kill()
            await ended.wait()  # reaped: its psutil.Process now stands for no process
        async with await anyio.open_process(argv, env=env) as process:
            with anyio.fail_after(30):
                for _ in range(3000):  # until all of it has started
                    family = stall._family(process.pid)
                    if len(family) == size:
                        break
                    await anyio.sleep(0.01)
                await stall._stop(process, [gone, *family] if case == "one-gone" else family)
                return await process.wait()

    assert anyio.run(main) == ended_by
    assert live_processes_with(marker) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_signalling_a_child_that_has_exited_leaves_its_status_to_anyio(signum: int) -> None:
    """A child that exited but was not reaped yet (a zombie) is not reaped by the signal
    sent to it: its exit status stays its own (Popen's send_signal would reap it, and
    asyncio would then say 255). With the command line's watcher (a pidfd read in the
    event loop's thread, as on Python 3.12): 3.11's default reaps in a thread of its own."""
    from orchestrator.process import reaping_by_pidfd

    async def main() -> int:
        # The child exits when its input closes: not while open_process lets the loop run
        # (which would reap it then).
        read, write = os.pipe()
        try:
            process = await anyio.open_process(["sh", "-c", "read line; exit 3"], stdin=read)
        finally:
            os.close(read)
        async with process:
            # The event loop held (no await) until the child is a zombie: nothing reaps it.
            os.close(write)
            _until_zombie(process.pid)
            stall.signal_child(process, signum)
            return await process.wait()

    async def live() -> int:
        async with await anyio.open_process(["sleep", "60"]) as process:
            stall.signal_child(process, signum)
            return await process.wait()

    with reaping_by_pidfd() as by_pidfd:
        if not by_pidfd and sys.version_info < (3, 12):
            pytest.skip("no pidfd here: a thread reaps each child")
        assert anyio.run(main) == 3
        assert anyio.run(live) == -signum  # a child that runs gets it


class _Dying:
    """A stand-in for a member of a family being stopped: alive for *looks* looks, then a
    zombie; counts the looks."""

    def __init__(self, looks: int, pid: int = 2**22 + 1, *, gone: bool = False) -> None:
        self.pid, self.left, self.looks, self.gone = pid, looks, 0, gone

    def terminate(self) -> None:
        pass

    kill = terminate

    def is_running(self) -> bool:
        if self.gone:
            raise psutil.NoSuchProcess(self.pid)
        self.looks += 1
        self.left -= 1
        return True

    def status(self) -> str:
        return psutil.STATUS_RUNNING if self.left >= 0 else psutil.STATUS_ZOMBIE


def test_a_stop_waits_for_the_rest_of_the_family_to_be_gone() -> None:
    """A SIGKILL is delivered, not waited for: a stop returns once every member it killed
    is gone or a zombie (looked at until then), the process itself once reaped."""
    dying = _Dying(looks=5)

    async def main() -> int | None:
        async with await anyio.open_process(["sleep", "60"]) as process:
            family = stall._family(process.pid)
            await stall._stop(process, [*family, dying])  # type: ignore[list-item]
            return process.returncode

    assert anyio.run(main) == -signal.SIGTERM
    assert dying.looks == 6  # alive at five looks, a zombie at the sixth


def test_what_is_alive_is_running_and_no_zombie() -> None:
    """A process that runs is alive; a zombie, one gone, or one psutil cannot look at is
    not (nothing more to wait for)."""
    running = subprocess.Popen(["sleep", "60"])
    ended = subprocess.Popen(["true"])
    try:
        _until_zombie(ended.pid)
        assert stall._alive(psutil.Process(running.pid))
        zombie = psutil.Process(ended.pid)
        assert not stall._alive(zombie)
        ended.wait()
        assert not stall._alive(zombie)  # now gone
        assert not stall._alive(_Dying(looks=1, gone=True))  # type: ignore[arg-type]
    finally:
        running.kill()
        running.wait()
        ended.wait()


def _until_zombie(pid: int) -> None:
    for _ in range(100_000):
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return
    pytest.fail("the child never exited")
