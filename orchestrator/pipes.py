"""Talking to a program over its stdin and stdout: non-blocking pipes, lines in, bytes out.

An agent that speaks a protocol on its standard streams (the Agent Client Protocol's JSON
lines) is started by :func:`orchestrator.process.run_command` with a pipe on each, and
:class:`Pipes` is how the orchestrator's side reads and writes them: without a thread, under
asyncio or trio alike (the descriptors are waited on with anyio), each line read bounded,
and every byte the program writes kept in its stdout log (a transcript for the report) up
to a limit, so that what it said can be audited as a command's output is.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import BinaryIO

import anyio
import anyio.lowlevel

__all__ = ["LineTooLong", "Pipes", "open_pipes"]

#: Most bytes of a program's output kept in its transcript (the rest is counted, not kept).
MAX_TRANSCRIPT_BYTES = 64 << 20

#: Most bytes read from the program at once.
CHUNK_BYTES = 1 << 16


class LineTooLong(Exception):
    """The program wrote a line longer than the reader's limit (nothing of it is returned)."""


class Pipes:
    """The orchestrator's ends of a program's stdin (written) and stdout (read, line by line).

    Made by :func:`open_pipes`; the program's ends are given to it as its streams, and
    :meth:`close` closes the orchestrator's once the program is done with.
    """

    def __init__(self, read_fd: int, write_fd: int, transcript: BinaryIO) -> None:
        self._read_fd: int | None = read_fd
        self._write_fd: int | None = write_fd
        self._transcript = transcript
        self._buffer = bytearray()
        self._eof = False
        #: Every byte read from the program so far (a stall watcher's measure of progress).
        self.received = 0

    async def send(self, data: bytes) -> None:
        """Write all of *data* to the program's stdin; BrokenPipeError when it closed it."""
        view = memoryview(data)
        while view:
            if self._write_fd is None:
                raise BrokenPipeError(errno.EPIPE, "the program's input is closed")
            try:
                written = os.write(self._write_fd, view)
            except BlockingIOError:
                await anyio.wait_writable(self._write_fd)
                continue
            view = view[written:]

    async def receive_line(self, limit: int) -> bytes | None:
        """The next line the program wrote, without its newline; None at the end of its output.

        LineTooLong when a line passes *limit* bytes: the rest of that line is then skipped,
        so that the next call reads the line after it. A last line without a newline is
        returned as a line.
        """
        skipping = False
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if skipping or len(line) > limit:
                    raise LineTooLong(f"a line of more than {limit} bytes")
                return line
            if len(self._buffer) > limit:
                self._buffer.clear()
                skipping = True
            if self._eof:
                line, skipped = bytes(self._buffer), skipping
                self._buffer.clear()
                if skipped:
                    raise LineTooLong(f"a line of more than {limit} bytes")
                return line or None
            await self._fill()

    async def _fill(self) -> None:
        """Read what the program has written (waiting for it), into the buffer and transcript.

        A checkpoint first: a program that writes without pause would otherwise keep the
        pipe always readable, and its reader would never let the event loop run (nor a
        timeout or a cancellation reach it)."""
        await anyio.lowlevel.checkpoint()
        if self._read_fd is None:
            self._eof = True
            return
        while True:
            try:
                chunk = os.read(self._read_fd, CHUNK_BYTES)
                break
            except BlockingIOError:
                await anyio.wait_readable(self._read_fd)
        if not chunk:
            self._eof = True
            return
        kept = MAX_TRANSCRIPT_BYTES - self.received
        if kept > 0:
            self._transcript.write(chunk[:kept])
            self._transcript.flush()
        self.received += len(chunk)
        self._buffer += chunk

    def close_input(self) -> None:
        """Close the program's stdin: it reads the end of its input."""
        if self._write_fd is not None:
            fd, self._write_fd = self._write_fd, None
            _close(fd)

    def close(self) -> None:
        """Close both of the orchestrator's ends and the transcript."""
        self.close_input()
        if self._read_fd is not None:
            fd, self._read_fd = self._read_fd, None
            _close(fd)
        with contextlib.suppress(OSError):
            self._transcript.close()


def _close(fd: int) -> None:
    """Close *fd*, first waking any task of the event loop that waits on it (if in one)."""
    with contextlib.suppress(anyio.NoEventLoopError):
        anyio.notify_closing(fd)
    os.close(fd)


def open_pipes(transcript: BinaryIO) -> tuple[Pipes, int, int]:
    """A :class:`Pipes` and the program's two ends: (pipes, its stdin, its stdout).

    The program's ends are to be handed to it and then closed here; the orchestrator's are
    non-blocking and not inherited by any child.
    """
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    for fd in (stdin_write, stdout_read):
        os.set_blocking(fd, False)
    return Pipes(stdout_read, stdin_write, transcript), stdin_read, stdout_write
