"""The run journal: what makes a run survive its orchestrator's death.

``journal.jsonl`` in the run directory is append-only: one JSON object a line, each a fact
the orchestrator relies on (the run's settings, a task's state change, a task's result, the
run's end). A line is written and fsynced before the orchestrator acts on it, with group
commit: the first writer to reach the disk writes every line queued so far with one fsync, and
the writers behind it find their lines already durable. A process that dies mid-write leaves a
torn last line, which :func:`read_journal` ignores.

The run directory's lock, held while an orchestrator works on the run, is
:class:`orchestrator.locks.RunLock`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from envelopes import ENVELOPE_RECORDS, loads_bounded, read_bounded

from ._faults import armed, crash_point
from .errors import JournalCorrupt, RunDirError

__all__ = [
    "ENVELOPES",
    "Journal",
    "JournalContents",
    "JournalCorrupt",
    "RecordFile",
    "read_journal",
]

JOURNAL = "journal.jsonl"
#: The envelopes of a run's tasks that need no file of their own (see RecordFile).
ENVELOPES = ENVELOPE_RECORDS


@dataclass
class JournalContents:
    """What a journal says: its records in order, and whether its last line was torn."""

    records: list[dict[str, Any]] = field(default_factory=list)
    torn: bool = False

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        """The records whose ``type`` is *kind*, in order."""
        return [r for r in self.records if r.get("type") == kind]


#: Largest journal read back (100,000 tasks write a few hundred MB).
MAX_JOURNAL_BYTES = 8 << 30


def read_journal(path: Path) -> JournalContents:
    """Read a journal; a torn last line is skipped, any other unreadable line is JournalCorrupt."""
    try:
        # A regular file (an agent without a sandbox could have put a FIFO there), whole.
        data = read_bounded(path, MAX_JOURNAL_BYTES)
    except FileNotFoundError:
        return JournalContents()
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {exc.strerror or exc}") from exc
    contents = JournalContents()
    lines = data.split(b"\n")
    # A complete journal ends with a newline, so the last element is empty; anything else
    # there is a line the writer did not finish.
    if lines[-1]:
        contents.torn = True
    for number, line in enumerate(lines[:-1], start=1):
        try:
            record = loads_bounded(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            if number == len(lines) - 1 and not lines[-1]:
                # The last full line is garbage: a write torn inside the line (a crash
                # between the write of a partial line and a later one cannot happen: lines
                # are written whole, so this is the tail of a torn write).
                contents.torn = True
                break
            raise JournalCorrupt(f"{path}: line {number} cannot be read ({exc})") from None
        contents.records.append(record)
    return contents


class Journal:
    """Appends records to ``journal.jsonl``; :meth:`sync` makes them durable (group commit)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._pending: list[bytes] = []
        self._queued = 0
        self._durable = 0
        self._lock = anyio.Lock()
        self._size = 0
        self._broken: RunDirError | None = None
        self.fsyncs = 0
        #: Called (in the event loop) before each group write: the run flushes its events.
        self.before_write: Callable[[], None] | None = None

    def open(self) -> None:
        """Open the journal for appending, cutting off a torn last line first."""
        try:
            existed = self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            data_end = os.lseek(fd, 0, os.SEEK_END)
            # Drop a torn tail so that the next record starts on a line of its own.
            whole = _whole_lines_end(fd, data_end)
            if whole < data_end:
                os.ftruncate(fd, whole)
            if not existed:
                _fsync_dir(self.path.parent)
            self._size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            raise RunDirError(f"cannot open {self.path}: {exc.strerror or exc}") from exc
        self._fd = fd

    def append(self, record: dict[str, Any]) -> None:
        """Queue *record*; it is on disk once :meth:`sync` (or :meth:`write`) returns."""
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
        self._pending.append(line.encode())
        self._queued += 1

    def append_line(self, line: str) -> None:
        """Queue a record already serialised (one line of JSON, as :meth:`append` makes it,
        without its newline); it is on disk once :meth:`sync` returns."""
        self._pending.append(line.encode() + b"\n")
        self._queued += 1

    async def write(self, record: dict[str, Any]) -> None:
        """Append *record* and wait until it is on disk."""
        self.append(record)
        await self.sync()

    async def write_line(self, line: str) -> None:
        """Append a record already serialised (one line of JSON, as :meth:`append` makes
        it, without its newline) and wait until it is on disk."""
        self.append_line(line)
        await self.sync()

    async def sync(self) -> None:
        """Wait until every record queued so far is on disk.

        Group commit: whoever gets the lock writes everything queued, with one fsync; those
        who waited behind it find their records already durable. The write is shielded from
        cancellation, so a record is never half written by a cancelled task.
        """
        wanted = self._queued
        if self._durable >= wanted or self._fd is None:
            return
        async with self._lock:
            if self._durable >= wanted:
                return
            if self.before_write is not None:
                self.before_write()
            lines, self._pending = self._pending, []
            upto = self._queued
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._write, b"".join(lines))
            self._durable = upto

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        if self._broken is not None:
            raise self._broken
        try:
            view = memoryview(data)
            if armed("journal") and len(view) > 1:
                # Half a line on disk, then death: the torn line a power cut leaves.
                os.write(self._fd, view[: len(view) // 2])
                os.fsync(self._fd)
                crash_point("journal")
                view = view[len(view) // 2 :]
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
            self.fsyncs += 1
            self._size += len(data)
        except OSError as exc:
            # Cut off what part of the batch got written, so that the journal still ends
            # with a whole line, and write nothing more: lines after a hole would make the
            # journal unreadable in the middle.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            self._broken = RunDirError(f"cannot write {self.path}: {exc.strerror or exc}")
            raise self._broken from exc

    def close(self) -> None:
        """Close the file (records queued and not synced are written first)."""
        if self._fd is None:
            return
        if self._pending:
            with contextlib.suppress(RunDirError):
                self._write(b"".join(self._pending))
            self._pending = []
            self._durable = self._queued
        os.close(self._fd)
        self._fd = None


class RecordFile:
    """Appends records to one file of the run (``envelopes.jsonl``), each its bytes and a
    newline, to be found again by offset and size (a result's ``envelope`` entry).

    For what a task would otherwise write as a file of its own when nothing outside this
    process reads it: one ``write`` in the event loop instead of a file made per task. No
    fsync, as for those files: a crash of the process loses nothing written (it is in the
    page cache), and a result naming a record is journaled after the record is written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.records = 0

    def append(self, data: bytes) -> int:
        """Write *data* and a newline at the end of the file; the offset it starts at.
        RunDirError when the file cannot be written."""
        try:
            if self._fd is None:
                # Not through a link, nor into a FIFO (which would block) an agent put there.
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise OSError(errno.EINVAL, "not a regular file")
                self._fd = fd
            # Where the end is now (one writer: the run's lock is held), not where this
            # process last wrote: a write cut short by a full disk leaves its part behind.
            offset = os.lseek(self._fd, 0, os.SEEK_END)
            view = memoryview(data + b"\n")
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise RunDirError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self.records += 1
        return offset

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _whole_lines_end(fd: int, end: int) -> int:
    """Where the whole lines of the first *end* bytes of *fd* end: after the last newline,
    or 0. Read back from the end a MiB at a time: a torn line can be longer than that (a
    result with a large output)."""
    while end > 0:
        start = max(0, end - (1 << 20))
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
