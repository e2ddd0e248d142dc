"""Pipes to a program's stdin and stdout: lines read whole and bounded, what it wrote kept in
its transcript up to a limit, writes that wait for a full pipe, under asyncio and trio."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from orchestrator import pipes as pipes_module
from orchestrator.pipes import LineTooLong, Pipes, open_pipes

BACKENDS = ["asyncio", "trio"]


def make(tmp_path: Path) -> tuple[Pipes, int, int]:
    """Pipes whose "program" is the test itself: it reads *stdin*, writes *stdout*."""
    return open_pipes((tmp_path / "transcript").open("wb"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lines_are_read_whole_and_the_transcript_keeps_them(tmp_path: Path, backend: str) -> None:
    pipes, stdin, stdout = make(tmp_path)

    async def main() -> list[bytes | None]:
        os.write(stdout, b"first\nsec")
        lines = [await pipes.receive_line(100)]
        os.write(stdout, b"ond\nlast without newline")
        os.close(stdout)
        lines.append(await pipes.receive_line(100))
        lines.append(await pipes.receive_line(100))
        lines.append(await pipes.receive_line(100))
        return lines

    try:
        lines = anyio.run(main, backend=backend)
    finally:
        pipes.close()
        os.close(stdin)
    assert lines == [b"first", b"second", b"last without newline", None]
    assert (tmp_path / "transcript").read_bytes() == b"first\nsecond\nlast without newline"
    assert pipes.received == len(b"first\nsecond\nlast without newline")


def test_a_line_too_long_is_refused_and_skipped(tmp_path: Path) -> None:
    pipes, stdin, stdout = make(tmp_path)

    async def main() -> list[object]:
        seen: list[object] = []
        os.write(stdout, b"x" * 50 + b"\n" + b"ok\n" + b"y" * 30)
        os.close(stdout)
        for _ in range(3):
            try:
                seen.append(await pipes.receive_line(20))
            except LineTooLong:
                seen.append("too long")
        return seen

    try:
        seen = anyio.run(main)
    finally:
        pipes.close()
        os.close(stdin)
    assert seen == ["too long", b"ok", "too long"]


def test_a_long_line_never_makes_the_buffer_grow_past_the_limit(tmp_path: Path) -> None:
    """A program that writes one endless line costs the reader at most its limit in memory."""
    pipes, stdin, stdout = make(tmp_path)
    biggest = 0

    async def main() -> None:
        async with anyio.create_task_group() as tg:

            async def write() -> None:
                for _ in range(64):
                    await anyio.wait_writable(stdout)
                    os.write(stdout, b"z" * 4096)
                os.write(stdout, b"\nafter\n")
                os.close(stdout)

            tg.start_soon(write)
            with pytest.raises(LineTooLong):
                await pipes.receive_line(10_000)
            assert await pipes.receive_line(10_000) == b"after"

    fill = pipes._fill

    async def watched_fill() -> None:
        nonlocal biggest
        await fill()
        biggest = max(biggest, len(pipes._buffer))

    pipes._fill = watched_fill  # type: ignore[method-assign]
    try:
        anyio.run(main)
    finally:
        pipes.close()
        os.close(stdin)
    assert biggest <= 10_000 + pipes_module.CHUNK_BYTES
    assert pipes.received == 64 * 4096 + len(b"\nafter\n")


def test_the_transcript_stops_at_its_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipes_module, "MAX_TRANSCRIPT_BYTES", 10)
    pipes, stdin, stdout = make(tmp_path)

    async def main() -> None:
        os.write(stdout, b"0123456789abcdef\n")
        os.close(stdout)
        assert await pipes.receive_line(100) == b"0123456789abcdef"

    try:
        anyio.run(main)
    finally:
        pipes.close()
        os.close(stdin)
    assert (tmp_path / "transcript").read_bytes() == b"0123456789"
    assert pipes.received == 17


@pytest.mark.parametrize("backend", BACKENDS)
def test_send_waits_for_a_full_pipe_and_fails_once_the_input_is_closed(
    tmp_path: Path, backend: str
) -> None:
    pipes, stdin, stdout = make(tmp_path)
    data = b"q" * (1 << 20)  # more than a pipe holds: send must wait for the reader
    got = bytearray()

    async def main() -> None:
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                while len(got) < len(data):
                    await anyio.wait_readable(stdin)
                    got.extend(os.read(stdin, 1 << 16))

            tg.start_soon(read)
            await pipes.send(data)
        pipes.close_input()
        with pytest.raises(BrokenPipeError):
            await pipes.send(b"more")

    os.set_blocking(stdin, False)
    try:
        anyio.run(main, backend=backend)
    finally:
        pipes.close()
        os.close(stdin)
        os.close(stdout)
    assert bytes(got) == data
