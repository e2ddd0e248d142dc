"""orchestrator/journal.py: an append-only journal that survives a torn write.

(The run directory's lock is tested in tests/test_locks.py.)
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.errors import JournalCorrupt, RunDirError
from orchestrator.journal import Journal, RecordFile, read_journal


def opened(path: Path) -> Journal:
    journal = Journal(path)
    journal.open()
    return journal


def write_together(journal: Journal, n: int) -> None:
    """*n* writers of one record each, all at once."""

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(journal.write, {"type": "state", "n": i})

    anyio.run(main)


def test_records_are_on_disk_once_written(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = opened(path)
    anyio.run(journal.write, {"type": "run", "n": 1})
    assert read_journal(path).records == [{"type": "run", "n": 1}]
    journal.append({"type": "state", "n": 2})  # queued, not yet written
    assert len(read_journal(path).records) == 1
    anyio.run(journal.sync)
    assert [r["n"] for r in read_journal(path).records] == [1, 2]
    assert journal.fsyncs == 2
    journal.close()
    assert path.read_text().endswith("\n")


def test_writers_that_wait_together_share_one_fsync(tmp_path: Path) -> None:
    journal = opened(tmp_path / "journal.jsonl")
    flushes: list[int] = []
    journal.before_write = lambda: flushes.append(1)

    write_together(journal, 50)
    journal.close()
    contents = read_journal(tmp_path / "journal.jsonl")
    assert sorted(r["n"] for r in contents.records) == list(range(50))
    assert journal.fsyncs < 50
    assert len(flushes) == journal.fsyncs  # the run flushes its events before each write


def test_a_torn_last_line_is_skipped_and_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"type": "run"}\n{"type": "sta')
    contents = read_journal(path)
    assert contents.torn
    assert contents.records == [{"type": "run"}]
    journal = opened(path)  # a new session cuts the torn tail off
    anyio.run(journal.write, {"type": "resumed"})
    journal.close()
    contents = read_journal(path)
    assert not contents.torn
    assert contents.of_type("resumed") == [{"type": "resumed"}]
    assert path.read_bytes() == b'{"type": "run"}\n{"type":"resumed"}\n'


def test_a_last_full_line_that_is_garbage_is_a_torn_write(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"type": "run"}\n{"type": "st\x00\x00\n')
    contents = read_journal(path)
    assert contents.torn
    assert contents.records == [{"type": "run"}]


def test_damage_in_the_middle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"type": "run"}\nnot json\n{"type": "finished"}\n')
    with pytest.raises(JournalCorrupt, match="line 2 cannot be read"):
        read_journal(path)
    path.write_bytes(b'{"type": "run"}\n[1, 2]\n{"type": "finished"}\n')
    with pytest.raises(JournalCorrupt, match="line 2"):
        read_journal(path)


def test_no_journal_reads_as_empty(tmp_path: Path) -> None:
    contents = read_journal(tmp_path / "journal.jsonl")
    assert contents.records == [] and not contents.torn


def test_a_fifo_in_place_of_the_journal_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    os.mkfifo(path)
    with pytest.raises(RunDirError) as caught:
        read_journal(path)
    # One line that names the file once and says why.
    assert str(caught.value) == f"cannot read {path}: not a regular file"


def test_a_failed_write_leaves_whole_lines_and_takes_no_more(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = opened(path)
    anyio.run(journal.write, {"type": "run"})
    assert journal._fd is not None
    os.close(journal._fd)
    journal._fd = os.open(path, os.O_RDONLY)  # every write to it fails, as on a full disk
    with pytest.raises(RunDirError, match=f"cannot write {path}"):
        anyio.run(journal.write, {"type": "state"})
    with pytest.raises(RunDirError):
        anyio.run(journal.write, {"type": "state", "again": True})
    journal.close()
    assert path.read_text() == json.dumps({"type": "run"}, separators=(",", ":")) + "\n"
    assert read_journal(path).records == [{"type": "run"}]


def test_close_writes_what_was_queued(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = opened(path)
    journal.append({"type": "finished"})
    journal.close()
    journal.close()  # idempotent
    assert read_journal(path).records == [{"type": "finished"}]


def test_a_record_file_appends_records_found_again_by_offset(tmp_path: Path) -> None:
    path = tmp_path / "envelopes.jsonl"
    records = RecordFile(path)
    first, second = b'{"task_id":"a"}', '{"task_id":"b","t":"\u00e9"}'.encode()
    assert records.append(first) == 0
    assert records.append(second) == len(first) + 1
    records.close()
    # Opened again (a resumed run): it goes on at the end, after whatever is there.
    with path.open("ab") as f:
        f.write(b'{"torn')  # what a write cut short would leave
    again = RecordFile(path)
    offset = again.append(b"{}")
    again.close()
    again.close()  # idempotent
    data = path.read_bytes()
    assert data[offset : offset + 2] == b"{}"
    assert data[len(first) + 1 : len(first) + 1 + len(second)] == second
    assert again.records == 1


def test_a_record_file_is_never_a_link_or_a_fifo(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with pytest.raises(RunDirError, match=f"^cannot write {link}: "):
        RecordFile(link).append(b"{}")
    assert target.read_bytes() == b""
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(RunDirError, match=f"^cannot write {fifo}: "):
        RecordFile(fifo).append(b"{}")  # refused at once, not blocked on a reader


def test_a_record_file_on_a_full_disk_is_a_run_dir_error(tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    records = RecordFile(tmp_path / "envelopes.jsonl")
    records._fd = os.open("/dev/full", os.O_WRONLY)
    with pytest.raises(RunDirError, match=r"cannot write .*envelopes\.jsonl: "):
        records.append(b"{}")
    records.close()


def test_a_line_written_as_it_was_serialised_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = opened(path)
    anyio.run(journal.write_line, '{"type":"result","final":true,"result":{"a":"\u2028"}}')
    journal.close()
    assert read_journal(path).records == [
        {"type": "result", "final": True, "result": {"a": "\u2028"}}
    ]


def test_a_torn_line_longer_than_a_read_is_cut_off_whole(tmp_path: Path) -> None:
    """A result with a large output makes a long line: torn, all of it goes, however long,
    and the lines before it stay."""
    path = tmp_path / "journal.jsonl"
    whole = b'{"type":"run"}\n{"type":"state","n":2}\n'
    for torn in (b'{"type":"result","out":"' + b"x" * (3 << 20), b'{"t', b"\x00"):
        path.write_bytes(whole + torn)
        journal = opened(path)
        anyio.run(journal.write, {"type": "resumed"})
        journal.close()
        assert path.read_bytes() == whole + b'{"type":"resumed"}\n'
    # A journal that is nothing but a torn line is emptied, not left with a byte of it.
    path.write_bytes(b'{"type":"ru')
    opened(path).close()
    assert path.read_bytes() == b""


def test_a_line_that_is_not_an_object_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"type": "run"}\n[1, 2]\n{"type": "finished"}\n')
    with pytest.raises(JournalCorrupt) as caught:
        read_journal(path)
    assert str(caught.value) == f"{path}: line 2 cannot be read (not an object)"


def test_what_cannot_be_opened_or_read_is_one_line_naming_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reason as the system gives it (``Is a directory``), not a repr of the error."""
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"{}\n")
    with monkeypatch.context() as patched:
        patched.setattr(os, "read", lambda fd, n: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
        with pytest.raises(RunDirError) as read:
            read_journal(path)
    assert str(read.value) == f"cannot read {path}: I/O"
    a_dir = tmp_path / "run"
    a_dir.mkdir()
    missing = tmp_path / "gone" / "journal.jsonl"
    with pytest.raises(RunDirError) as opening:
        Journal(missing).open()
    assert str(opening.value) == f"cannot open {missing}: No such file or directory"
    with pytest.raises(RunDirError) as record:
        RecordFile(a_dir).append(b"{}")
    assert str(record.value) == f"cannot write {a_dir}: Is a directory"


def test_a_failed_write_says_why_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = opened(path)
    assert journal._fd is not None
    os.close(journal._fd)
    journal._fd = os.open(path, os.O_RDONLY)
    with pytest.raises(RunDirError) as caught:
        anyio.run(journal.write, {"type": "state"})
    assert str(caught.value) == f"cannot write {path}: Bad file descriptor"
    journal.close()


def test_a_failed_write_keeps_every_batch_written_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part of a batch on disk when the disk fills is cut off back to the end of the last
    whole batch, not to the start of the journal, nor left behind."""
    path = tmp_path / "journal.jsonl"
    journal = opened(path)
    for n in range(3):
        anyio.run(journal.write, {"type": "state", "n": n})
    before = path.read_bytes()
    write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        if fd == journal._fd:
            write(fd, bytes(data[:5]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(RunDirError, match="No space left on device"):
        anyio.run(journal.write, {"type": "state", "n": 3})
    monkeypatch.undo()
    journal.close()
    assert path.read_bytes() == before
    assert [r["n"] for r in read_journal(path).records] == [0, 1, 2]


def test_each_batch_is_fsynced_once_and_nothing_new_is_not_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durable means fsynced: one fsync a batch (counted at the system call, not by the
    journal), and a sync with nothing new queued does not touch the disk."""
    path = tmp_path / "journal.jsonl"
    journal = opened(path)
    synced: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd))[1])
    anyio.run(journal.sync)
    assert synced == [] and journal.fsyncs == 0
    anyio.run(journal.write, {"type": "run"})
    anyio.run(journal.write_line, '{"type":"state"}')
    assert synced == [journal._fd, journal._fd] and journal.fsyncs == 2
    anyio.run(journal.sync)
    assert len(synced) == 2
    journal.close()


def test_every_line_written_is_on_disk_when_its_write_returns(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = opened(path)
    for n in range(4):
        anyio.run(journal.write_line, json.dumps({"type": "state", "n": n}))
        assert [r["n"] for r in read_journal(path).records] == list(range(n + 1))
    anyio.run(journal.write, {"type": "finished"})
    assert read_journal(path).records[-1] == {"type": "finished"}
    journal.close()


def test_records_queued_before_the_journal_opens_are_written_once_it_is(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    anyio.run(journal.write, {"type": "early"})  # not open yet: queued, no error
    assert not path.exists()
    journal.open()
    anyio.run(journal.write, {"type": "run"})
    journal.close()
    assert read_journal(path).records == [{"type": "early"}, {"type": "run"}]


def test_close_writes_every_queued_record_and_later_ones_are_dropped_quietly(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.jsonl"
    journal = opened(path)
    journal.append({"type": "state", "n": 1})
    journal.append({"type": "state", "n": 2})
    journal.close()
    assert [r["n"] for r in read_journal(path).records] == [1, 2]
    # A late event after the run closed its journal: nothing written, nothing raised.
    journal.append({"type": "late"})
    anyio.run(journal.sync)
    anyio.run(journal.write, {"type": "later"})
    assert [r["n"] for r in read_journal(path).records] == [1, 2]


def test_a_record_is_written_with_its_characters_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = opened(path)
    anyio.run(journal.write, {"type": "state", "who": "Zoë ✓"})
    journal.close()
    assert path.read_bytes() == '{"type":"state","who":"Zoë ✓"}\n'.encode()


def test_the_files_are_private_to_the_process_and_appended_to(tmp_path: Path) -> None:
    """Mode 0644 (less the umask), opened for appending, and closed in every process the
    orchestrator starts (an agent must not inherit a descriptor of the journal)."""
    import fcntl
    import stat

    journal = opened(tmp_path / "journal.jsonl")
    records = RecordFile(tmp_path / "envelopes.jsonl")
    records.append(b"{}")
    umask = os.umask(0)
    os.umask(umask)
    for fd, path in ((journal._fd, journal.path), (records._fd, records.path)):
        assert fd is not None
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~umask
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
    journal.close()
    records.close()


def test_a_new_journal_is_made_durable_in_its_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import orchestrator.journal as module

    synced: list[Path] = []
    monkeypatch.setattr(module, "_fsync_dir", synced.append)
    opened(tmp_path / "journal.jsonl").close()
    assert synced == [tmp_path]
    opened(tmp_path / "journal.jsonl").close()  # it exists now: its name is already durable
    assert synced == [tmp_path]


def test_a_record_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    """A FIFO with a reader at the other end opens at once: it is still refused, and its
    descriptor closed."""
    fifo = tmp_path / "envelopes.jsonl"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        records = RecordFile(fifo)
        with pytest.raises(RunDirError) as caught:
            records.append(b"{}")
        assert str(caught.value) == f"cannot write {fifo}: not a regular file"
        assert records._fd is None
        assert os.read(reader, 10) == b""
    finally:
        os.close(reader)


def test_a_record_file_counts_its_records(tmp_path: Path) -> None:
    records = RecordFile(tmp_path / "envelopes.jsonl")
    for _ in range(3):
        records.append(b"{}")
    assert records.records == 3
    records.close()


def test_a_newline_at_the_start_of_a_read_is_found(tmp_path: Path) -> None:
    """The torn tail is looked for a MiB at a time: a line ending exactly where such a read
    starts still ends the whole lines."""
    path = tmp_path / "journal.jsonl"
    whole = b'{"type":"run"}\n'
    path.write_bytes(whole + b"x" * ((1 << 20) - 1))  # the last MiB starts at whole's "\n"
    opened(path).close()
    assert path.read_bytes() == whole


def test_writers_behind_a_batch_that_wrote_their_lines_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: a writer that finds its line written by the batch ahead of it returns
    without writing or fsyncing an empty batch."""
    journal = opened(tmp_path / "journal.jsonl")
    calls: list[str] = []
    write, fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, data: (calls.append("write"), write(fd, data))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), fsync(fd))[1])

    write_together(journal, 50)
    journal.close()
    fsyncs = [i for i, call in enumerate(calls) if call == "fsync"]
    assert fsyncs and all(calls[i - 1] == "write" for i in fsyncs), calls
    assert len(read_journal(tmp_path / "journal.jsonl").records) == 50


def test_a_write_cancelled_while_its_batch_is_written_still_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch is written whole even if its writer is cancelled meanwhile (the write is
    shielded), and counted as written: a sync after it has nothing left to do."""
    journal = opened(tmp_path / "journal.jsonl")
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.2)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    async def main() -> None:
        with anyio.move_on_after(0.05):
            await journal.write({"type": "state"})
        before = journal.fsyncs
        await journal.sync()
        assert journal.fsyncs == before == 1

    anyio.run(main)
    journal.close()
    assert read_journal(tmp_path / "journal.jsonl").records == [{"type": "state"}]


def test_a_short_write_is_continued_until_the_batch_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.jsonl"
    journal = opened(path)
    write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, bytes(data[:7])))
    anyio.run(journal.write, {"type": "state", "n": 1, "text": "a longer record"})
    monkeypatch.undo()
    journal.close()
    assert read_journal(path).records == [{"type": "state", "n": 1, "text": "a longer record"}]


@pytest.mark.parametrize(
    "task_id", ["t1", "build.web-2", "m[py=3.12,os=linux]", 'q"uote', "back\\slash", "é", "a\nb"]
)
def test_a_state_line_is_the_json_of_its_record_whatever_the_task_id(
    tmp_path: Path, task_id: str
) -> None:
    """The journal's state lines (three a task) are written without json.dumps where the id
    needs no escaping: they read back as the same records either way."""
    from types import SimpleNamespace

    from orchestrator.context import RunContext

    journal = Journal(tmp_path / "journal.jsonl")
    journal.open()
    RunContext.journal_move(SimpleNamespace(journal=journal), task_id, "running")  # type: ignore[arg-type]
    anyio.run(journal.sync)
    journal.close()
    line = (tmp_path / "journal.jsonl").read_bytes()
    record = {"type": "state", "task": task_id, "state": "running"}
    assert line == (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
