"""orchestrator/journal.py: an append-only journal that survives a torn write.

(The run directory's lock is tested in tests/test_locks.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from orchestrator.errors import JournalCorrupt, RunDirError
from orchestrator.journal import Journal, RecordFile, read_journal


def opened(path: Path) -> Journal:
    journal = Journal(path)
    journal.open()
    return journal


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

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(journal.write, {"type": "state", "n": n})

    anyio.run(main)
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
    with pytest.raises(RunDirError, match="cannot read"):
        read_journal(path)


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
