"""envelopes/_bounded.py's hash_file: hashlib.file_digest on a safely opened file, capped."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from envelopes._bounded import UnsafeFile, _Capped, hash_file


@pytest.mark.parametrize("size", [0, 1, 1 << 18, (1 << 18) + 1, 3 << 20])
def test_digest_and_size_of_a_whole_file(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert hash_file(tmp_path / "f", 4 << 20) == (hashlib.sha256(data).hexdigest(), size)
    assert hash_file("f", size, within=tmp_path) == (hashlib.sha256(data).hexdigest(), size)


def test_a_file_over_the_cap_is_read_one_byte_past_it_and_no_further(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    (tmp_path / "f").write_bytes(data)
    for limit in (0, 9, (1 << 18) - 1, (1 << 20) - 1):
        found = hash_file(tmp_path / "f", limit)
        assert found == (hashlib.sha256(data[: limit + 1]).hexdigest(), limit + 1)


def test_the_size_is_what_was_read_not_what_stat_says() -> None:
    """A file whose stat says 0 bytes (this process's environment, in /proc) is still capped."""
    path = Path("/proc/self/environ")
    if not path.exists() or os.stat(path).st_size != 0:
        pytest.skip("needs Linux's /proc")
    digest, size = hash_file(path, 4)
    assert size == 5
    assert len(digest) == 64


def test_the_cap_has_no_way_round(tmp_path: Path) -> None:
    """file_digest may read a descriptor directly: the capped reader offers none."""
    (tmp_path / "f").write_bytes(b"x" * 100)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        capped = _Capped(fd, 10)
        with pytest.raises(OSError):
            capped.fileno()
        assert hashlib.file_digest(capped, "sha256").hexdigest() == (
            hashlib.sha256(b"x" * 10).hexdigest()
        )
        assert capped.size == 10
    finally:
        os.close(fd)


def test_a_link_or_a_fifo_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "fifo"):
        with pytest.raises(UnsafeFile):
            hash_file(tmp_path / name, 10)
        with pytest.raises(UnsafeFile):
            hash_file(name, 10, within=tmp_path)
