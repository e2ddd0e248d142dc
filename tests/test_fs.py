"""orchestrator/_fs.py: atomic writes, plain writes, and files read as an agent may have left
them (a FIFO, a link, a huge log, deep JSON)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from envelopes import read_bounded
from envelopes._bounded import UnsafeFile
from orchestrator._fs import atomic_write, last_line, read_json, remove_entry, write_file
from orchestrator.errors import RunDirError


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def leftovers(directory: Path) -> list[str]:
    """Temporary files atomic_write may have left (``.<name>.<random>.tmp``)."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_makes_parents_and_a_file_others_can_read(tmp_path: Path) -> None:
    target = tmp_path / "runs" / "r1" / "report.json"
    atomic_write(target, b'{"ok": true}\n')
    assert target.read_bytes() == b'{"ok": true}\n'
    # mkstemp makes 0600; the file is for auditors: 0666 minus the umask.
    assert target.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert leftovers(target.parent) == []


def test_atomic_write_replaces_the_old_content_whole(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    target.write_bytes(b"old content that is longer than the new one\n")
    before = target.stat().st_ino
    atomic_write(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    # A rename into place, not a rewrite of the same file: a reader holding the old one
    # keeps reading the old bytes.
    assert target.stat().st_ino != before
    assert leftovers(tmp_path) == []


def test_atomic_write_replaces_a_planted_link_and_leaves_its_target_alone(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    target = tmp_path / "run" / "report.json"
    target.parent.mkdir()
    target.symlink_to(victim)
    atomic_write(target, b"report\n")
    assert not target.is_symlink()
    assert target.read_bytes() == b"report\n"
    assert victim.read_text() == "keep me\n"


def test_atomic_write_onto_a_directory_is_a_run_dir_error_and_leaves_no_temp(
    tmp_path: Path,
) -> None:
    target = tmp_path / "report.json"
    target.mkdir()
    (target / "inside").write_text("untouched\n")
    with pytest.raises(RunDirError) as caught:
        atomic_write(target, b"data")
    assert str(caught.value).startswith(f"cannot write {target}: ")
    assert isinstance(caught.value.__cause__, OSError)
    assert (target / "inside").read_text() == "untouched\n"
    assert leftovers(tmp_path) == []


def test_atomic_write_under_a_file_is_a_run_dir_error_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("a file where a directory should be\n")
    target = blocker / "r1" / "report.json"
    with pytest.raises(RunDirError, match=f"^cannot write {target}: "):
        atomic_write(target, b"data")
    assert blocker.read_text() == "a file where a directory should be\n"


def test_write_file_writes_and_replaces_without_making_directories(tmp_path: Path) -> None:
    target = tmp_path / "envelope.json"
    write_file(target, b"first, and long\n")
    write_file(target, b"second\n")
    assert target.read_bytes() == b"second\n"
    missing = tmp_path / "no-such-dir" / "envelope.json"
    with pytest.raises(RunDirError, match=f"^cannot write {missing}: No such file or directory$"):
        write_file(missing, b"x")
    assert not missing.parent.exists()


def test_last_line_is_the_last_non_blank_line_of_a_log(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    log.write_bytes(b"Traceback (most recent call last):\n  ...\nValueError: boom\n\n   \n")
    assert last_line(log) == "ValueError: boom"
    log.write_bytes(b"")
    assert last_line(log) == ""
    log.write_bytes(b"\n\n  \t\n")
    assert last_line(log) == ""
    assert last_line(tmp_path / "missing.log") == ""


def test_last_line_reads_only_the_tail_and_caps_the_line(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    with log.open("wb") as f:
        f.write(b"early line\n" * 200_000)  # 2.2 MB before the end
        f.write(b"x" * 1000 + b"\n")
    line = last_line(log)
    assert line == "x" * 300
    # Only the last *limit* bytes are read (here 9 y's and the newline): never "first".
    log.write_bytes(b"first\n" + b"y" * 50 + b"\n")
    assert last_line(log, limit=10) == "y" * 9


def test_last_line_replaces_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    log.write_bytes(b"ok\nbad \xff\xfe bytes\n")
    assert last_line(log) == "bad \ufffd\ufffd bytes"


def test_last_line_neither_blocks_on_a_fifo_nor_follows_a_link(tmp_path: Path) -> None:
    fifo = tmp_path / "stderr.log"
    os.mkfifo(fifo)
    assert last_line(fifo) == ""  # returns at once: a FIFO with no writer is never opened
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret line\n")
    link = tmp_path / "linked.log"
    link.symlink_to(secret)
    assert last_line(link) == ""


def test_read_json_reads_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "journal-entry.json"
    path.write_text('{"run": "r1", "tasks": [1, 2.5, null, true]}')
    assert read_json(path) == {"run": "r1", "tasks": [1, 2.5, None, True]}


def test_read_json_refuses_a_fifo_a_link_and_a_file_over_its_limit(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFile, match="is not a regular file"):
        read_json(fifo)
    real = tmp_path / "real.json"
    real.write_text('{"a": 1}')
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        read_json(link)
    big = tmp_path / "big.json"
    big.write_text("[" + "0," * 100 + "0]")
    with pytest.raises(UnsafeFile, match="is larger than 64 bytes"):
        read_json(big, limit=64)
    assert issubclass(UnsafeFile, OSError)


def test_an_unsafe_file_says_why_without_the_path_in_strerror(tmp_path: Path) -> None:
    """As the system's errors do: ``cannot read {path}: {exc.strerror}`` names it once."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFile) as caught:
        read_json(fifo)
    assert str(caught.value) == f"{fifo} is not a regular file"
    assert caught.value.strerror == "not a regular file"
    with pytest.raises(UnsafeFile) as caught:
        read_bounded("../x", 10, within=tmp_path)
    assert "leaves its directory" in str(caught.value)
    assert caught.value.strerror == str(caught.value)


def test_an_unsafe_file_survives_a_copy_and_a_pickle(tmp_path: Path) -> None:
    """As a Dask worker's error is sent back: with its message and its reason."""
    import copy
    import pickle

    for error in (UnsafeFile(tmp_path / "fifo", "not a regular file"), UnsafeFile(None, "why")):
        for again in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
            assert type(again) is UnsafeFile
            assert (str(again), again.strerror) == (str(error), error.strerror)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[" * 5000 + "]" * 5000, "nested more than"),
        ('{"x": NaN}', "NaN is not JSON"),
        ('{"x": ' + "9" * 500 + "}", "a number of 500 characters"),
        ('{"x": ', "Expecting value"),
    ],
    ids=["deep", "nan", "huge-number", "truncated"],
)
def test_read_json_refuses_json_an_agent_could_plant(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = tmp_path / "hostile.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=reason):
        read_json(path)


def test_remove_tree_goes_deeper_than_recursion_and_never_through_a_link(
    tmp_path: Path,
) -> None:
    from orchestrator._fs import remove_tree

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep\n")
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for _ in range(1500):
        os.mkdir("d", dir_fd=fd)
        below = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.symlink(outside, "link", dir_fd=fd)
    os.close(fd)
    (root / "top-link").symlink_to(outside)
    remove_tree(root)
    assert not root.exists() and (outside / "keep").read_text() == "keep\n"
    remove_tree(root)  # gone already: nothing
    (tmp_path / "file").write_text("x")
    remove_tree(tmp_path / "file")  # not a directory: unlinked
    assert not (tmp_path / "file").exists()


def test_sweep_puts_right_what_gits_walk_does_not_see(tmp_path: Path) -> None:
    from orchestrator._fs import UMASK, sweep_worktree

    root = tmp_path / "wt"
    (root / "src" / ".git").mkdir(parents=True)
    (root / "src" / ".git" / "config").write_text("[core]\n\tfsmonitor = touch x\n")
    (root / ".git").write_text("gitdir: somewhere\n")  # the worktree's own: kept
    (root / "lib").mkdir()
    os.mkfifo(root / "lib" / "pipe")
    (root / "lib" / "ok.txt").write_text("ok\n")
    (root / "open").mkdir(mode=0o777)
    (root / "open").chmod(0o777)
    (root / "link").symlink_to(tmp_path)
    root.chmod(0o1777)  # the top too
    done = sweep_worktree(root)
    assert sorted(done) == ["/", "lib/pipe", "open/", "src/.git"]
    assert (root / ".git").is_file() and (root / "lib" / "ok.txt").is_file()
    assert (root / "open").stat().st_mode & 0o777 == 0o777 & ~UMASK
    assert (root / "link").is_symlink()
    assert root.stat().st_mode & 0o7777 == 0o777 & ~UMASK
    assert sweep_worktree(root) == []


def test_climbing_back_checks_it_is_the_directory_it_came_from(tmp_path: Path) -> None:
    from orchestrator._fs import _identity, _up

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    a = os.open(tmp_path / "a", os.O_RDONLY)
    b = os.open(tmp_path / "a" / "b", os.O_RDONLY)
    try:
        os.close(_up(b, _identity(a)))
        # b moved under another directory while it was walked: its ".." is not a any more.
        os.rename(tmp_path / "a" / "b", tmp_path / "elsewhere" / "b")
        with pytest.raises(OSError, match="moved while it was walked"):
            _up(b, _identity(a))
    finally:
        os.close(a)
        os.close(b)


def test_remove_entry_removes_whatever_is_there_and_never_what_a_link_leads_to(
    tmp_path: Path,
) -> None:
    kept = tmp_path / "kept"
    (kept / "inside").mkdir(parents=True)
    entries = tmp_path / "entries"
    entries.mkdir()
    (entries / "file").write_text("x")
    (entries / "link").symlink_to(kept)
    os.mkfifo(entries / "fifo")
    (entries / "tree" / "deep").mkdir(parents=True)
    (entries / "tree" / "deep" / "file").write_text("x")
    (entries / "tree" / "out").symlink_to(kept)
    for name in ("file", "link", "fifo", "tree", "absent"):
        remove_entry(entries / name)
        assert not os.path.lexists(entries / name)
    assert (kept / "inside").is_dir()


def test_remove_entry_refuses_a_directory_reached_through_a_link(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    (kept / "tree" / "deep").mkdir(parents=True)
    (tmp_path / "via").symlink_to(kept)
    with pytest.raises(OSError):
        remove_entry(tmp_path / "via" / "tree")
    assert (kept / "tree" / "deep").is_dir()
