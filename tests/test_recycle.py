"""Catching a used pool slot up to a commit (orchestrator/recycle.py), on real repositories.

Each test lends a slot, leaves a mess in it the way an agent could, lends it again, and
compares every file, directory, link and mode the borrower finds with a fresh ``git worktree
add`` of the same commit. The attacks: an index forged to hide a change, links out of the
worktree where untracked and tracked files were, and a listing too large to hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import Repository, recycle
from orchestrator.pool import WorktreePool
from orchestrator.recycle import private_index, remove_entries
from orchestrator.worktree import Worktree

from .conftest import MakeRepo, git

Mess = Callable[[Path], None]


def snapshot(root: Path) -> dict[str, Any]:
    """Everything under *root* but ``.git``: each path's kind, exec bits and content."""
    seen: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not (rel == Path(".") and d == ".git")]
        for name in dirnames + filenames:
            if rel == Path(".") and name == ".git":
                continue
            path = Path(dirpath, name)
            info = path.lstat()
            key = (rel / name).as_posix()
            if stat.S_ISLNK(info.st_mode):
                seen[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                seen[key] = ("dir",)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                seen[key] = ("file", info.st_mode & 0o111, digest)
    return seen


def fresh_checkout(repo: Path, commit: str, where: Path) -> dict[str, Any]:
    git(repo, "worktree", "add", "--quiet", "--detach", str(where), commit)
    try:
        return snapshot(where)
    finally:
        git(repo, "worktree", "remove", "--force", str(where))


def lend(repo_path: Path, mess: Mess | None, commits: list[str]) -> list[dict[str, Any]]:
    """Lend one pool slot once per commit of *commits*; *mess* runs in it after each task.

    Returns what each borrower found in the slot (its snapshot, its index's view, whether
    the private index was used).
    """
    found: list[dict[str, Any]] = []

    async def main() -> None:
        repo = await Repository.open(repo_path)
        pool = WorktreePool(repo, size=1)
        try:
            for i, commit in enumerate(commits):
                branch = f"orchestrator/test/t{i}"
                worktree = await pool.borrow(branch, commit) or await pool.create(branch, commit)
                assert worktree is not None
                status = git(worktree.path, "status", "--porcelain", "--ignored", "-uall")
                found.append({"files": snapshot(worktree.path), "status": status})
                if mess is not None and i < len(commits) - 1:  # none left behind
                    mess(worktree.path)
                await pool.give_back(worktree)
        finally:
            pool.close()
            repo.lock.close()

    anyio.run(main)
    return found


@pytest.mark.parametrize("file_mode", [None, "false"])
def test_every_kind_of_leftover_is_gone_for_the_next_borrower(
    make_repo: MakeRepo, tmp_path: Path, file_mode: str | None
) -> None:
    """Whatever the repository says of exec bits: with ``core.fileMode`` off (set by hand,
    or by a clone onto a file system without them) git does not see a mode changed, and a
    borrowed slot must still have the modes of a fresh checkout."""
    repo = make_repo(
        files=6,
        extra={".gitignore": "*.log\nbuild/\n", "docs/a.md": "a\n", "docs/b.md": "b\n"},
    )
    if file_mode is not None:
        git(repo, "config", "core.fileMode", file_mode)
    (repo / "link").symlink_to("src/file0000.txt")
    (repo / "tool.sh").write_text("#!/bin/sh\n")
    (repo / "tool.sh").chmod(0o755)
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", "link and tool")
    base = git(repo, "rev-parse", "HEAD")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("not the worktree's\n")

    def mess(root: Path) -> None:
        (root / "src/file0000.txt").write_text("changed\n")
        (root / "src/file0001.txt").write_text("line 9\n")  # same size, other content
        (root / "src/file0002.txt").chmod(0o755)
        (root / "src/file0003.txt").unlink()
        (root / "tool.sh").chmod(0o644)
        (root / "link").unlink()
        (root / "link").write_text("a file where a link was\n")
        (root / "src/file0004.txt").unlink()
        (root / "src/file0004.txt").symlink_to(outside / "precious.txt")  # a link out
        os.rename(root / "docs", root / "docs.moved")
        (root / "docs").symlink_to(outside)  # a tracked directory become a link out
        (root / "src/file0005.txt").unlink()
        (root / "src/file0005.txt").mkdir()  # a file become a directory
        (root / "src/file0005.txt/inner").write_text("x\n")
        (root / "untracked.txt").write_text("u\n")
        (root / "debug.log").write_text("ignored\n")
        (root / "build/deep").mkdir(parents=True)
        (root / "build/deep/out.bin").write_bytes(b"\0" * 10)
        (root / "emptydir/deeper").mkdir(parents=True)
        (root / "escape").symlink_to(outside)  # an untracked link out
        (root / "dangling").symlink_to("no-such-file")  # a link to nothing
        (root / "src-again").symlink_to("src")  # a link to a directory of the worktree
        git(root, "init", "--quiet", "nested")
        (root / "nested/inner.txt").write_text("in a nested repository\n")

    borrowed = lend(repo, mess, [base, base, base])
    expected = fresh_checkout(repo, base, tmp_path / "fresh")
    for seen in borrowed:
        assert seen["files"] == expected
        assert seen["status"] == ""
    # Nothing outside the worktree was touched through the links.
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    assert (outside / "precious.txt").read_text() == "not the worktree's\n"


def forge_index_entry(index: Path, name: str, worktree: Path) -> None:
    """Give *name*'s entry in the (version 2) *index* the stat data of the file now there,
    keeping its blob: what an agent that wants a change hidden from git would write."""
    data = bytearray(index.read_bytes())
    signature, version, count = struct.unpack(">4sLL", data[:12])
    assert signature == b"DIRC" and version == 2
    offset = 12
    for _ in range(count):
        flags = struct.unpack(">H", data[offset + 60 : offset + 62])[0]
        length = flags & 0xFFF
        path = bytes(data[offset + 62 : offset + 62 + length])
        if path == name.encode():
            info = os.lstat(worktree / name)
            fields = (
                int(info.st_ctime),
                info.st_ctime_ns % 10**9,
                int(info.st_mtime),
                info.st_mtime_ns % 10**9,
                info.st_dev & 0xFFFFFFFF,
                info.st_ino & 0xFFFFFFFF,
            )
            struct.pack_into(">6L", data, offset, *fields)
            struct.pack_into(">L", data, offset + 36, info.st_size)
        offset += (62 + length + 8) & ~7
    body = bytes(data[:-20])
    index.write_bytes(body + hashlib.sha1(body).digest())


def test_an_index_forged_to_hide_a_change_does_not_hide_it(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo(files=3)
    base = git(repo, "rev-parse", "HEAD")

    def mess(root: Path) -> None:
        (root / "src/file0001.txt").write_text("line 9\n")  # the same size
        admin = Path((root / ".git").read_text().strip().removeprefix("gitdir: "))
        # Seconds later than the index was written: not racily clean for git.
        os.utime(admin / "index", (2**31 - 10, 2**31 - 10))
        forge_index_entry(admin / "index", "src/file0001.txt", root)
        os.utime(admin / "index", (2**31 - 10, 2**31 - 10))
        assert git(root, "status", "--porcelain") == ""  # hidden from the worktree's index

    first, second = lend(repo, mess, [base, base])
    assert second["files"] == first["files"] == fresh_checkout(repo, base, tmp_path / "f")


def test_a_slot_moves_to_another_commit_writing_only_what_differs(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo(files=4, extra={"a/b": "b\n", "gone/x": "x\n"})
    old = git(repo, "rev-parse", "HEAD")
    git(repo, "rm", "--quiet", "-r", "a", "gone", "src/file0001.txt")
    (repo / "a").write_text("a file where a directory was\n")
    (repo / "src/file0000.txt").write_text("new content\n")
    (repo / "new/deep").mkdir(parents=True)
    (repo / "new/deep/n.txt").write_text("n\n")
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", "moved on")
    new = git(repo, "rev-parse", "HEAD")

    def mess(root: Path) -> None:
        (root / "src/file0002.txt").write_text("dirty\n")
        (root / "left.txt").write_text("left\n")

    borrowed = lend(repo, mess, [old, new, old, new])
    fresh_old = fresh_checkout(repo, old, tmp_path / "old")
    fresh_new = fresh_checkout(repo, new, tmp_path / "new")
    assert [b["files"] for b in borrowed] == [fresh_old, fresh_new, fresh_old, fresh_new]
    assert all(b["status"] == "" for b in borrowed)


async def catch_up_then_reset(repo: Repository, worktree: Worktree) -> tuple[bool, dict[str, Any]]:
    """Catch the slot up (whether its private index was used), write it whole, and what
    it then holds."""
    index = private_index(worktree.path)
    used = await recycle.catch_up(repo, worktree, index)
    await recycle.reset_whole(repo, worktree, index)
    return used, snapshot(worktree.path)


async def caught_up_and_reset(
    repo: Repository, worktree: Worktree
) -> tuple[bool, dict[str, Any], str]:
    """:func:`catch_up_then_reset` (what the pool does: catch up, then the slot written
    whole and its private index made anew), and what ``git status`` then says."""
    used, files = await catch_up_then_reset(repo, worktree)
    return used, files, git(worktree.path, "status", "--porcelain")


def catch_up_once(
    repo_path: Path,
    mess: Mess,
    steps: Callable[[Repository, Worktree], Awaitable[Any]],
    *,
    sparse: tuple[str, ...] | None = None,
) -> Any:
    """Make a slot (holding the directories *sparse*, None: all), mess it up, then run
    *steps* on it (the slot given back first)."""

    async def main() -> Any:
        repo = await Repository.open(repo_path)
        pool = WorktreePool(repo, size=1)
        base = git(repo_path, "rev-parse", "HEAD")
        tree = git(repo_path, "rev-parse", "HEAD^{tree}")
        try:
            worktree = await pool.create("orchestrator/test/a", base, tree, sparse)
            assert worktree is not None
            mess(worktree.path)
            return await steps(repo, worktree)
        finally:
            pool.close()
            repo.lock.close()

    return anyio.run(main)


def test_a_catch_up_runs_three_git_commands_however_big_the_mess(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    repo = make_repo(files=200)
    trace = tmp_path / "trace2"
    trace.mkdir()
    monkeypatch.setenv("GIT_TRACE2_EVENT", str(trace))

    def mess(root: Path) -> None:
        for i in range(0, 200, 3):
            (root / f"src/file{i:04d}.txt").write_text("changed\n")
        for i in range(50):
            (root / f"new{i}.txt").write_text("new\n")

    async def steps(repo: Repository, worktree: Worktree) -> tuple[int, bool]:
        tree = git(worktree.path, "rev-parse", "HEAD^{tree}")
        for old in trace.iterdir():
            old.unlink()
        before = repo.git.calls
        used = await recycle.catch_up(repo, worktree, private_index(worktree.path), tree)
        return repo.git.calls - before, used

    calls, used = catch_up_once(repo, mess, steps)
    assert used
    # The two halves of one walk, and one checkout of what changed. The private index's tree
    # was noted when it was written; a run passes the start's tree, which it knows.
    assert calls == 3
    commands: list[str] = []
    for path in trace.iterdir():
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "cmd_name":
                commands.append(event["name"])
    assert sorted(commands) == ["checkout-index", "diff-files", "ls-files"]
    # No status, reset, clean or add: nothing walks the tree a second time.


def test_without_a_private_index_the_slot_is_written_whole(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo(files=3)

    def mess(root: Path) -> None:
        (root / "src/file0001.txt").write_text("line 9\n")
        admin = Path((root / ".git").read_text().strip().removeprefix("gitdir: "))
        os.utime(admin / "index", (2**31 - 10, 2**31 - 10))
        forge_index_entry(admin / "index", "src/file0001.txt", root)
        os.utime(admin / "index", (2**31 - 10, 2**31 - 10))
        private_index(root).unlink()

    used, files = catch_up_once(repo, mess, catch_up_then_reset)
    assert not used
    base = git(repo, "rev-parse", "HEAD")
    assert files == fresh_checkout(repo, base, tmp_path / "fresh")


def test_a_listing_too_large_to_hold_falls_back(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    repo = make_repo(files=3)
    monkeypatch.setattr(recycle, "LISTING_LIMIT", 64)

    def mess(root: Path) -> None:
        for i in range(20):
            (root / f"untracked-file-with-a-long-name-{i}.txt").write_text("u\n")

    used, files, status = catch_up_once(repo, mess, caught_up_and_reset)
    assert used is False
    base = git(repo, "rev-parse", "HEAD")
    assert files == fresh_checkout(repo, base, tmp_path / "fresh") and status == ""


def test_removal_never_goes_through_a_link(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    (root / "via").symlink_to(outside)
    with pytest.raises(OSError):
        remove_entries(root, [b"via/keep.txt"])
    for bad in (b"../outside/keep.txt", b"a//b", b"./x"):
        with pytest.raises(OSError, match="refusing"):
            remove_entries(root, [bad])
    remove_entries(root, [b"via"])  # the link itself goes
    assert not (root / "via").exists() and (outside / "keep.txt").is_file()
    (root / "d/e").mkdir(parents=True)
    (root / "d/e/f").write_text("f\n")
    remove_entries(root, [b"d/", b"missing"])
    assert list(root.iterdir()) == []


# The first attempt changes a tracked file, forges the worktree's index to hide the change,
# and fails; the second reports what it found. The forging is forge_index_entry's, inlined.
FORGER = """
import hashlib, os, pathlib, struct, sys

attempt = os.environ["ORCHESTRATOR_ATTEMPT"]
name = "src/file0001.txt"
if attempt == "1":
    pathlib.Path(name).write_text("line 9\\n")
    admin = pathlib.Path(pathlib.Path(".git").read_text().strip().removeprefix("gitdir: "))
    index = admin / "index"
    data = bytearray(index.read_bytes())
    count = struct.unpack(">L", data[8:12])[0]
    offset = 12
    for _ in range(count):
        length = struct.unpack(">H", data[offset + 60 : offset + 62])[0] & 0xFFF
        if bytes(data[offset + 62 : offset + 62 + length]) == name.encode():
            info = os.lstat(name)
            struct.pack_into(
                ">6L", data, offset, int(info.st_ctime), info.st_ctime_ns % 10**9,
                int(info.st_mtime), info.st_mtime_ns % 10**9, info.st_dev & 0xFFFFFFFF,
                info.st_ino & 0xFFFFFFFF,
            )
            struct.pack_into(">L", data, offset + 36, info.st_size)
        offset += (62 + length + 8) & ~7
    body = bytes(data[:-20])
    index.write_bytes(body + hashlib.sha1(body).digest())
    os.utime(index, (2**31 - 10, 2**31 - 10))
    sys.exit(1)
pathlib.Path(os.environ["ORCHESTRATOR_OUTPUT"]).write_text(
    '{"found": "' + pathlib.Path(name).read_text().strip() + '"}'
)
"""


@pytest.mark.parametrize("pool", [0, 1])
def test_a_retry_starts_from_the_base_whatever_the_index_says(
    make_repo: MakeRepo, tmp_path: Path, pool: int
) -> None:
    from envelopes import Plan
    from orchestrator import orchestrate_parallel

    repo = make_repo(files=3)
    agent = tmp_path / "forger.py"
    agent.write_text(FORGER)
    plan = Plan.model_validate(
        {
            "agents": {"f": {"command": [sys.executable, str(agent)]}},
            "tasks": [{"id": "t", "agent": "f", "task": "t", "venv": False, "retries": 1}],
        }
    )
    report = anyio.run(lambda: orchestrate_parallel(plan, repo=repo, pool=pool))
    [result] = report.results
    assert result.status == "succeeded", result.error
    assert result.output == {"found": "line 1"}  # the base's, not the first attempt's


def test_what_gits_walk_never_reports_is_gone_too(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo(files=3, extra={".env": "A=1\n", "lib/x.py": "x\n"})
    base = git(repo, "rev-parse", "HEAD")
    marker = tmp_path / "PWNED"

    def mess(root: Path) -> None:
        # A repository planted in a tracked directory, whose config the next agent's git
        # would obey (core.fsmonitor runs a program at every status).
        git(root, "init", "--quiet", "src")
        git(root / "src", "config", "core.fsmonitor", f"touch {marker}")
        (root / ".env").unlink()
        os.mkfifo(root / ".env")  # a FIFO where a file was: its reader would block
        os.mkfifo(root / "lib" / "pipe")
        (root / "lib").chmod(0o777)
        deep = root / "deep"
        deep.mkdir()
        fd = os.open(deep, os.O_RDONLY)
        for _ in range(1200):  # deeper than Python's recursion limit
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = below
        os.close(fd)

    borrowed = lend(repo, mess, [base, base, base])
    expected = fresh_checkout(repo, base, tmp_path / "fresh")
    for seen in borrowed:
        assert seen["files"] == expected
        assert seen["status"] == ""
    assert not marker.exists()


def test_an_index_rewritten_beside_the_slot_is_not_trusted(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """Without a sandbox an agent can reach its slot's private index too; the pool notices,
    within its run, that the index is not the one it left."""
    repo = make_repo(files=3)
    base = git(repo, "rev-parse", "HEAD")

    def mess(root: Path) -> None:
        path = root / "src/file0001.txt"
        path.write_text("line 9\n")
        # Dated an hour back: older than the index, the entry is not "racily clean", and
        # git takes its stat data at their word.
        hour_ago = path.stat().st_mtime_ns - 3600 * 10**9
        os.utime(path, ns=(hour_ago, hour_ago))
        index = private_index(root)
        forge_index_entry(index, "src/file0001.txt", root)
        note = index.with_suffix(".tree")
        tree, key, *_ = note.read_text().split()
        info = os.lstat(index)
        note.write_text(f"{tree} {key} {info.st_size} {info.st_mtime_ns} {info.st_ino}\n")

    # Rewritten after a fresh slot's task, and after a recycled one's.
    first, second, third = lend(repo, mess, [base, base, base])
    fresh = fresh_checkout(repo, base, tmp_path / "f")
    assert third["files"] == second["files"] == first["files"] == fresh


@pytest.mark.parametrize(
    "config",
    [("core.ignoreStat", "true"), ("core.trustctime", "false"), ("core.checkStat", "minimal")],
)
def test_the_repositorys_stat_settings_do_not_hide_a_change(
    make_repo: MakeRepo, tmp_path: Path, config: tuple[str, str]
) -> None:
    repo = make_repo(files=3)
    git(repo, "config", *config)
    base = git(repo, "rev-parse", "HEAD")

    def mess(root: Path) -> None:
        path = root / "src/file0001.txt"
        info = path.stat()
        path.write_text("line 9\n")  # the same size, its times put back
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))

    first, second, third = lend(repo, mess, [base, base, base])
    expected = fresh_checkout(repo, base, tmp_path / "f")
    assert first["files"] == second["files"] == third["files"] == expected


def test_removal_opens_nothing_on_the_way_that_is_not_a_directory(tmp_path: Path) -> None:
    """A root that is a link or a file, or a directory on an entry's way that is a FIFO, is
    refused without being opened as what it is not (a FIFO opened to read would block)."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("keep\n")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OSError):
        remove_entries(tmp_path / "link", [b"keep.txt"])
    assert (real / "keep.txt").is_file()
    (tmp_path / "file").write_text("a file\n")
    with pytest.raises(NotADirectoryError):
        remove_entries(tmp_path / "file", [])
    os.mkfifo(real / "pipe")
    with pytest.raises(NotADirectoryError):
        remove_entries(real, [b"pipe/x"])
    assert sorted(p.name for p in real.iterdir()) == ["keep.txt", "pipe"]


def test_an_entry_already_gone_does_not_stop_the_removal_of_the_others(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "z.txt").write_text("z\n")
    remove_entries(root, [b"a-gone", b"d/gone-too", b"d/", b"z.txt"])
    assert list(root.iterdir()) == []


def test_only_the_trailing_slash_of_a_directory_entry_is_taken_off(tmp_path: Path) -> None:
    """The entries named are removed, whatever their names end with, and nothing else: a
    file beside them whose name is theirs cut short stays."""
    root = tmp_path / "root"
    (root / "dirX" / "in").mkdir(parents=True)
    for name in ("fileX", "file", "dir", "name.", "name.X"):
        (root / name).write_text(name + "\n")
    remove_entries(root, [b"fileX", b"dirX/", b"name.X"])
    assert sorted(p.name for p in root.iterdir()) == ["dir", "file", "name."]


def test_a_slot_whose_task_removed_both_indexes_is_written_whole(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo(files=3)

    def mess(root: Path) -> None:
        (root / "src/file0001.txt").write_text("changed\n")
        (root / "new.txt").write_text("new\n")
        admin = Path((root / ".git").read_text().strip().removeprefix("gitdir: "))
        (admin / "index").unlink()
        private_index(root).unlink()

    used, files, status = catch_up_once(repo, mess, caught_up_and_reset)
    assert used is False
    base = git(repo, "rev-parse", "HEAD")
    assert files == fresh_checkout(repo, base, tmp_path / "fresh") and status == ""


@pytest.mark.parametrize("step", ["catch_up", "reset_whole", "reset_whole_detached"])
def test_a_slot_pointed_at_another_repository_is_made_pristine_from_its_own(
    make_repo: MakeRepo, tmp_path: Path, step: str
) -> None:
    """The slot's ``.git`` file rewritten to name another repository (and, but for a reset
    on a branch, its ``commondir`` too): the orchestrator's git still works on the slot's own
    admin directory and repository, and the other repository is not touched.

    (A borrow puts ``commondir`` back before either step: git 2.39 resolves a worktree's
    HEAD branch through that file whatever ``GIT_COMMON_DIR`` says. A catch-up, and a reset
    of a detached HEAD, resolve no branch.)"""
    repo = make_repo(files=3)
    decoy = make_repo(files=1, name="decoy")  # whose index lacks two of the slot's files
    (decoy / "src/file0000.txt").write_text("the decoy's\n")
    git(decoy, "commit", "--quiet", "-am", "decoy")
    decoy_index = (decoy / ".git/index").read_bytes()

    def mess(root: Path) -> None:
        (root / "src/file0001.txt").write_text("changed\n")
        (root / "new.txt").write_text("new\n")
        admin = Path((root / ".git").read_text().strip().removeprefix("gitdir: "))
        (root / ".git").write_text(f"gitdir: {decoy / '.git'}\n")
        if step != "reset_whole":
            (admin / "commondir").write_text(f"{decoy / '.git'}\n")
        if step == "reset_whole_detached":
            (admin / "HEAD").write_text(git(repo, "rev-parse", "HEAD") + "\n")

    async def steps(repo: Repository, worktree: Worktree) -> dict[str, Any]:
        index = private_index(worktree.path)
        if step == "catch_up":
            assert await recycle.catch_up(repo, worktree, index)
        else:
            await recycle.reset_whole(repo, worktree, index)
        return snapshot(worktree.path)

    files = catch_up_once(repo, mess, steps)
    base = git(repo, "rev-parse", "HEAD")
    assert files == fresh_checkout(repo, base, tmp_path / "fresh")
    assert (decoy / ".git/index").read_bytes() == decoy_index
    assert git(decoy, "status", "--porcelain") == ""


def test_a_sparse_slot_is_caught_up_from_its_private_index_again_and_again(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """Caught up, written whole, caught up again: each time the cone's files exactly, and
    each catch-up (the start's tree known) with its three git commands: the private index
    stays usable for the slot's sparse set, and knows its tree."""
    repo = make_repo(files=3, extra={"docs/a.md": "a\n", "top.txt": "top\n"})
    base = git(repo, "rev-parse", "HEAD")
    tree = git(repo, "rev-parse", "HEAD^{tree}")

    def mess(root: Path) -> None:
        (root / "src/file0000.txt").write_text("changed\n")
        (root / "top.txt").write_text("changed too\n")
        (root / "new.txt").write_text("new\n")
        (root / "docs").mkdir(exist_ok=True)
        (root / "docs/a.md").write_text("written where the cone has nothing\n")
        (root / "other/deep").mkdir(parents=True, exist_ok=True)

    async def steps(repo: Repository, worktree: Worktree) -> list[tuple[Any, ...]]:
        index = private_index(worktree.path)
        seen: list[tuple[Any, ...]] = []
        for how in ("catch_up", "catch_up", "reset_whole", "catch_up"):
            if seen:
                mess(worktree.path)
            before = repo.git.calls
            if how == "catch_up":
                used = await recycle.catch_up(repo, worktree, index, tree)
                seen.append((how, used, repo.git.calls - before, snapshot(worktree.path)))
            else:
                await recycle.reset_whole(repo, worktree, index, tree)
                seen.append((how, None, None, snapshot(worktree.path)))
        return seen

    seen = catch_up_once(repo, mess, steps, sparse=("src",))
    full = fresh_checkout(repo, base, tmp_path / "fresh")
    cone = {p: v for p, v in full.items() if ("/" not in p and v != ("dir",)) or p == "src"}
    cone |= {p: v for p, v in full.items() if p.startswith("src/")}
    assert sorted(cone) == ["src", *(f"src/file000{i}.txt" for i in range(3)), "top.txt"]
    assert [s[3] for s in seen] == [cone] * 4
    assert [s[:3] for s in seen] == [
        ("catch_up", True, 3),
        ("catch_up", True, 3),
        ("reset_whole", None, None),
        ("catch_up", True, 3),
    ]


def test_a_sparse_slot_moved_to_another_commit_gets_that_commits_cone_and_nothing_else(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """A sparse slot caught up to a commit that changes files in its cone and out of it (a
    dependent task starts from its dependencies' merge): the new commit's cone exactly; what
    changed outside the cone is not written."""
    repo = make_repo(files=3, extra={"docs/a.md": "a\n", "top.txt": "top\n"})
    git(repo, "checkout", "--quiet", "-b", "next")
    (repo / "src/file0000.txt").write_text("changed in the cone\n")
    (repo / "src/added.txt").write_text("added in the cone\n")
    (repo / "docs/a.md").write_text("changed outside it\n")
    (repo / "docs/b.md").write_text("added outside it\n")
    (repo / "top.txt").write_text("a top-level file changed\n")
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", "next")
    new, new_tree = git(repo, "rev-parse", "HEAD"), git(repo, "rev-parse", "HEAD^{tree}")
    git(repo, "checkout", "--quiet", "main")

    async def steps(repo: Repository, worktree: Worktree) -> tuple[bool, dict[str, Any]]:
        moved = dataclasses.replace(worktree, base_commit=new)
        used = await recycle.catch_up(repo, moved, private_index(worktree.path), new_tree)
        return used, snapshot(worktree.path)

    used, files = catch_up_once(repo, lambda root: None, steps, sparse=("src",))
    full = fresh_checkout(repo, new, tmp_path / "fresh")
    cone = {p: v for p, v in full.items() if ("/" not in p and v != ("dir",)) or p == "src"}
    cone |= {p: v for p, v in full.items() if p.startswith("src/")}
    assert used
    assert files == cone


def renote(index: Path) -> None:
    """Write the note on the private *index* again for the index as it is now: what the
    orchestrator itself would have noted had it written the index so."""
    note = index.with_suffix(".tree")
    tree, key, *_ = note.read_text().split()
    info = os.lstat(index)
    note.write_text(f"{tree} {key} {info.st_size} {info.st_mtime_ns} {info.st_ino}\n")


def age_entry(index: Path, name: str, seconds: int) -> None:
    """Move the ctime of *name*'s entry in the (version 2) *index* *seconds* back, and the
    index's own times as many on: as if the file had been checked out that long before the
    index was written (git then takes the entry's stat data at its word: not racily clean)."""
    data = bytearray(index.read_bytes())
    count = struct.unpack(">L", data[8:12])[0]
    offset = 12
    for _ in range(count):
        length = struct.unpack(">H", data[offset + 60 : offset + 62])[0] & 0xFFF
        if bytes(data[offset + 62 : offset + 62 + length]) == name.encode():
            ctime = struct.unpack(">L", data[offset : offset + 4])[0]
            struct.pack_into(">L", data, offset, ctime - seconds)
        offset += (62 + length + 8) & ~7
    body = bytes(data[:-20])
    index.write_bytes(body + hashlib.sha1(body).digest())
    later = os.lstat(index).st_mtime_ns + seconds * 10**9
    os.utime(index, ns=(later, later))


@pytest.mark.parametrize("config", [("core.trustctime", "false"), ("core.checkStat", "minimal")])
def test_the_repositorys_stat_settings_do_not_hide_a_change_git_would_not_read(
    make_repo: MakeRepo, tmp_path: Path, config: tuple[str, str]
) -> None:
    """A file written again with its old size and times, seconds after its checkout (so that
    only its ctime tells, and git reads no content): still found changed, whatever the
    repository says about ctime and stat checks."""
    repo = make_repo(files=3)
    git(repo, "config", *config)

    def mess(root: Path) -> None:
        path = root / "src/file0001.txt"
        info = path.stat()
        path.write_text("line 9\n")  # the same size, its times put back
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
        index = private_index(root)
        age_entry(index, "src/file0001.txt", 10)
        renote(index)

    async def steps(repo: Repository, worktree: Worktree) -> tuple[bool, dict[str, Any]]:
        used = await recycle.catch_up(repo, worktree, private_index(worktree.path))
        return used, snapshot(worktree.path)

    used, files = catch_up_once(repo, mess, steps)
    assert used
    assert files == fresh_checkout(repo, git(repo, "rev-parse", "HEAD"), tmp_path / "fresh")


def test_a_private_index_git_cannot_read_makes_the_catch_up_give_up(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo(files=3)

    def mess(root: Path) -> None:
        (root / "src/file0001.txt").write_text("changed\n")
        index = private_index(root)
        index.write_bytes(b"DIRC" + b"\xff" * 60)  # noted as it is now, but no index
        renote(index)

    used, files = catch_up_once(repo, mess, catch_up_then_reset)
    assert used is False
    assert files == fresh_checkout(repo, git(repo, "rev-parse", "HEAD"), tmp_path / "fresh")


def test_what_the_sweep_cannot_put_right_fails_the_catch_up_with_its_error(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leftover the sweep cannot remove (as root, only an immutable file is one) raises
    its OSError, which the pool turns into the slot's removal."""
    repo = make_repo(files=3)

    def cannot(root: Path) -> list[str]:
        raise PermissionError(f"cannot put {root} right")

    async def steps(repo: Repository, worktree: Worktree) -> None:
        monkeypatch.setattr(recycle, "sweep_worktree", cannot)
        with pytest.raises(PermissionError, match="cannot put"):
            await recycle.catch_up(repo, worktree, private_index(worktree.path))

    catch_up_once(repo, lambda root: None, steps)


@pytest.mark.parametrize(("size", "used"), [(256, True), (257, False)])
def test_a_note_is_read_up_to_its_bound_and_no_further(
    make_repo: MakeRepo, size: int, used: bool
) -> None:
    """The note on a private index is a line of a hundred-odd bytes; one longer than 256
    bytes (whatever its words) is not read, and the slot is written whole instead."""
    repo = make_repo(files=3)

    def mess(root: Path) -> None:
        note = private_index(root).with_suffix(".tree")
        words = note.read_text().split()
        note.write_text(" ".join(words).ljust(size - 1) + "\n")

    async def steps(repo: Repository, worktree: Worktree) -> bool:
        return await recycle.catch_up(repo, worktree, private_index(worktree.path))

    assert catch_up_once(repo, mess, steps) is used


def test_a_private_index_changed_since_its_note_is_not_trusted(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """Across processes only the note's stat data vouch for the private index: one rewritten
    since (to hide a change) makes the catch-up give up, and the change is not hidden."""
    repo = make_repo(files=3)

    def mess(root: Path) -> None:
        (root / "src/file0001.txt").write_text("line 9\n")  # the same size
        forge_index_entry(private_index(root), "src/file0001.txt", root)

    async def steps(repo: Repository, worktree: Worktree) -> tuple[bool, dict[str, Any]]:
        index = private_index(worktree.path)
        used = await recycle.catch_up(repo, worktree, index)
        if not used:
            await recycle.reset_whole(repo, worktree, index)
        return used, snapshot(worktree.path)

    used, files = catch_up_once(repo, mess, steps)
    assert used is False
    assert files == fresh_checkout(repo, git(repo, "rev-parse", "HEAD"), tmp_path / "fresh")


def test_a_private_index_noted_without_its_tree_is_used_and_one_naming_no_tree_is_not(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """Recorded without its tree (the caller did not know it), a private index is used all
    the same (git says which tree it holds); a note naming something that is not an object
    id is not trusted."""
    repo = make_repo(files=3)
    base = git(repo, "rev-parse", "HEAD")

    def mess(root: Path) -> None:
        (root / "src/file0001.txt").write_text("changed\n")

    async def steps(repo: Repository, worktree: Worktree) -> list[tuple[bool, dict[str, Any]]]:
        index = private_index(worktree.path)
        seen = []
        for tree in (None, "not-a-tree"):
            await recycle.record(worktree, index)
            note = index.with_suffix(".tree")
            words = note.read_text().split()
            assert words[0] == "-"
            note.write_text(" ".join([tree or "-", *words[1:]]) + "\n")
            mess(worktree.path)
            used = await recycle.catch_up(repo, worktree, index)
            if not used:
                await recycle.reset_whole(repo, worktree, index)
            seen.append((used, snapshot(worktree.path)))
        return seen

    fresh = fresh_checkout(repo, base, tmp_path / "fresh")
    assert catch_up_once(repo, lambda root: None, steps) == [(True, fresh), (False, fresh)]


def test_a_note_that_is_not_text_is_not_trusted(make_repo: MakeRepo) -> None:
    repo = make_repo(files=3)

    def mess(root: Path) -> None:
        private_index(root).with_suffix(".tree").write_bytes(b"\xff\xfe not a note\n")

    async def steps(repo: Repository, worktree: Worktree) -> bool:
        return await recycle.catch_up(repo, worktree, private_index(worktree.path))

    assert catch_up_once(repo, mess, steps) is False


def test_after_a_catch_up_both_indexes_know_the_files_written(make_repo: MakeRepo) -> None:
    """The files checked out again are recorded with their new stat data: the worktree's
    index sees no change without refreshing, and a second catch-up with nothing changed
    since only walks the tree (two git commands, nothing checked out)."""
    repo = make_repo(files=20)

    def mess(root: Path) -> None:
        for i in range(0, 20, 2):
            (root / f"src/file{i:04d}.txt").write_text("changed\n")

    async def steps(repo: Repository, worktree: Worktree) -> tuple[list[int], str]:
        tree = git(worktree.path, "rev-parse", "HEAD^{tree}")
        index = private_index(worktree.path)
        calls = []
        for _ in range(2):
            before = repo.git.calls
            assert await recycle.catch_up(repo, worktree, index, tree)
            calls.append(repo.git.calls - before)
        # Seconds later: git takes the index's stat data at its word (not racily clean).
        admin_index = worktree.admin_dir / "index"
        later = os.lstat(admin_index).st_mtime_ns + 10 * 10**9
        os.utime(admin_index, ns=(later, later))
        return calls, git(worktree.path, "diff-files", "--name-only")

    calls, changed = catch_up_once(repo, mess, steps)
    assert changed == ""
    assert calls == [3, 2]


def test_a_private_index_that_is_a_link_or_for_another_sparse_set_is_not_used(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo(files=3)

    def mess(root: Path) -> None:
        index = private_index(root)
        elsewhere = index.with_name("elsewhere.index")
        os.rename(index, elsewhere)
        index.symlink_to(elsewhere)
        renote(index)  # noted as the link is now

    async def steps(repo: Repository, worktree: Worktree) -> list[bool]:
        index = private_index(worktree.path)
        linked = await recycle.catch_up(repo, worktree, index)
        index.unlink()
        os.rename(index.with_name("elsewhere.index"), index)
        renote(index)
        sparse = dataclasses.replace(worktree, sparse=("src",))
        return [linked, await recycle.catch_up(repo, sparse, index)]

    assert catch_up_once(repo, mess, steps) == [False, False]


def test_a_private_index_git_cannot_make_a_tree_of_makes_the_catch_up_give_up(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """Noted without its tree, an index naming an object the repository does not have (git
    cannot say which tree it holds) is not used: the slot is written whole."""
    repo = make_repo(files=3)

    def mess(root: Path) -> None:
        index = private_index(root)
        missing = "0123456789abcdef0123456789abcdef01234567"
        env = {**os.environ, "GIT_INDEX_FILE": str(index)}
        subprocess.run(
            ["git", "-C", str(root), "update-index", "--add", "--cacheinfo", f"100644,{missing},x"],
            check=True,
            env=env,
        )
        note = index.with_suffix(".tree")
        note.write_text(" ".join(["-", *note.read_text().split()[1:]]) + "\n")
        renote(index)

    used, files = catch_up_once(repo, mess, catch_up_then_reset)
    assert used is False
    assert files == fresh_checkout(repo, git(repo, "rev-parse", "HEAD"), tmp_path / "fresh")


def test_a_slot_noted_without_its_tree_moves_from_what_its_private_index_holds(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """The tree a catch-up starts from is the private index's, not the one the task staged in
    the worktree's own index (``git add``): the slot moves to another commit all the same."""
    repo = make_repo(files=3)
    (repo / "src/file0000.txt").write_text("the next commit's\n")
    git(repo, "commit", "--quiet", "-am", "next")
    new = git(repo, "rev-parse", "HEAD")

    def mess(root: Path) -> None:
        (root / "src/file0000.txt").write_text("staged by the task\n")
        git(root, "add", "src/file0000.txt")

    async def steps(repo: Repository, worktree: Worktree) -> tuple[bool, dict[str, Any]]:
        index = private_index(worktree.path)
        note = index.with_suffix(".tree")
        note.write_text(" ".join(["-", *note.read_text().split()[1:]]) + "\n")
        renote(index)
        moved = dataclasses.replace(worktree, base_commit=new)
        return await recycle.catch_up(repo, moved, index), snapshot(worktree.path)

    git(repo, "checkout", "--quiet", "--detach", "HEAD~1")  # the slot is made there
    used, files = catch_up_once(repo, mess, steps)
    assert used
    assert files == fresh_checkout(repo, new, tmp_path / "fresh")


def test_exec_bits_are_found_kept_here_once_per_file_system(tmp_path: Path) -> None:
    from orchestrator import recycle

    slot = tmp_path / "slot"
    slot.mkdir()
    recycle._EXEC_BITS.pop(os.stat(slot).st_dev, None)
    assert recycle.exec_bits_kept(slot)  # this machine's file systems keep them
    assert os.stat(slot).st_dev in recycle._EXEC_BITS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot"]  # its probe removed
    assert not recycle.exec_bits_kept(tmp_path / "gone" / "slot")


def test_exec_bits_are_probed_beside_the_slot_and_only_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe file is made in the directory above the slot (its file system, not the
    temporary directory's), and a second slot on that file system is not probed again."""
    import tempfile

    probed: list[Any] = []
    make = tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        probed.append(kwargs.get("dir"))
        return make(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(recycle, "_EXEC_BITS", {})
    pool = tmp_path / "pool"
    for name in ("one", "two"):
        (pool / name).mkdir(parents=True)
        assert recycle.exec_bits_kept(pool / name)
    assert probed == [pool]
