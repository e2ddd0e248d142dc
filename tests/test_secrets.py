"""Masking: which values are secret, and replacing them in text, JSON values and log files."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import pytest

from envelopes._bounded import UnsafeFile
from envelopes._secrets import is_secret_name, masked_env, masked_plan
from orchestrator.secrets import Masker


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("ANTHROPIC_API_KEY", True),
        ("GITHUB_TOKEN", True),
        ("db_password", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("GOOGLE_APPLICATION_CREDENTIALS", True),
        ("GIT_AUTHOR_NAME", False),
        ("PATH", False),
        ("HOME", False),
    ],
)
def test_names_that_look_secret(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_declared_names_are_secret_whatever_they_look_like() -> None:
    assert is_secret_name("PLAIN", ["PLAIN"])
    assert masked_env({"PLAIN": "v", "OTHER": "w"}, ["PLAIN"]) == {"PLAIN": "***", "OTHER": "w"}


def test_the_plan_is_masked_at_every_level_in_both_env_forms() -> None:
    plan = {
        "defaults": {"env": {"API_TOKEN": "a", "X": "1"}, "secrets": ["X"]},
        "agents": {"w": {"command": ["w"], "env": {"set": {"MINE": "m"}}, "secrets": ["MINE"]}},
        "tasks": [{"id": "t", "agent": "w", "task": "t", "env": {"DEPLOY_KEY": "d", "Y": "y"}}],
    }
    masked = masked_plan(plan)
    assert masked["defaults"]["env"] == {"API_TOKEN": "***", "X": "***"}
    assert masked["agents"]["w"]["env"] == {"set": {"MINE": "***"}}
    assert masked["tasks"][0]["env"] == {"DEPLOY_KEY": "***", "Y": "y"}
    assert plan["defaults"]["env"]["API_TOKEN"] == "a"  # the plan itself is not changed


def test_short_values_are_not_masked_and_longer_ones_first() -> None:
    masker = Masker.for_env(
        {"API_TOKEN": "sk-abcdefgh", "LONG_TOKEN": "sk-abcdefgh-longer", "OTHER_KEY": "true"},
        [],
    )
    assert masker.values == ("sk-abcdefgh-longer", "sk-abcdefgh")
    assert masker.text("a sk-abcdefgh-longer b sk-abcdefgh true") == "a *** b *** true"
    assert masker.value({"sk-abcdefgh": ["x sk-abcdefgh"], "n": 1}) == {"***": ["x ***"], "n": 1}
    assert not Masker.for_env({"PATH": "/usr/bin:/bin"}, [])


def test_a_log_file_is_masked_across_chunk_boundaries(tmp_path: Path) -> None:
    masker = Masker.for_env({"API_TOKEN": "sk-0123456789abcdef"}, [])
    log = tmp_path / "log"
    # The secret straddles the 1 MiB chunk the masker reads at a time.
    log.write_bytes(b"x" * ((1 << 20) - 7) + b"sk-0123456789abcdef" + b"y" * 10)
    assert masker.mask_file(log)
    assert log.read_bytes() == b"x" * ((1 << 20) - 7) + b"***" + b"y" * 10
    assert not masker.mask_file(log)  # nothing left: not rewritten


#: Run in a child: mask a log with the size of files this process may write limited
#: (RLIMIT_FSIZE: the write past it is cut short, as on a disk that fills up mid-write).
_MASK_WITH_A_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from orchestrator.secrets import Masker
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
masker = Masker.for_env({"API_TOKEN": "sk-0123456789abcdef"}, [])
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    print(masker.mask_file(Path(sys.argv[1])))
except OSError as exc:
    print(exc.strerror)
"""


def test_a_masked_log_the_disk_takes_only_in_part_does_not_replace_the_log(
    tmp_path: Path,
) -> None:
    """Masking fails rather than put a log cut short in the log's place: the masked copy
    (10,004 bytes) may grow to 9,999, so its last write is the one cut short."""
    log = tmp_path / "log"
    content = b"sk-0123456789abcdef\n" + b"x" * 10_000
    log.write_bytes(content)
    child = subprocess.run(
        [sys.executable, "-c", _MASK_WITH_A_FULL_DISK, str(log), "9999"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert child.stdout.strip() == "File too large"
    assert log.read_bytes() == content
    assert os.listdir(tmp_path) == ["log"]


def test_a_masked_log_keeps_its_mode(tmp_path: Path) -> None:
    masker = Masker.for_env({"API_TOKEN": "sk-0123456789abcdef"}, [])
    log = tmp_path / "log"
    log.write_text("token sk-0123456789abcdef")
    log.chmod(0o600)
    assert masker.mask_file(log)
    assert log.read_text() == "token ***"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_a_log_replaced_by_a_link_is_not_followed(tmp_path: Path) -> None:
    masker = Masker.for_env({"API_TOKEN": "sk-0123456789abcdef"}, [])
    target = tmp_path / "elsewhere"
    target.write_text("sk-0123456789abcdef")
    log = tmp_path / "log"
    os.symlink(target, log)
    with pytest.raises(UnsafeFile):
        masker.mask_file(log)
    assert target.read_text() == "sk-0123456789abcdef"


def test_values_at_the_shortest_length_are_masked_and_one_shorter_are_not() -> None:
    masker = Masker.for_env(
        {
            "API_TOKEN": "12345678",  # MIN_SECRET_LENGTH
            "OTHER_TOKEN": "abcdefg",  # one shorter
            "PLAIN": "xyz",  # declared: MIN_DECLARED_LENGTH
            "ALSO_PLAIN": "pq",  # declared, one shorter
            "NOT_DECLARED": "uvwxy",
        },
        ["PLAIN", "ALSO_PLAIN"],
    )
    assert masker.values == ("12345678", "xyz")
    assert masker.text("12345678 abcdefg xyz pq uvwxy") == "*** abcdefg *** pq uvwxy"


def test_a_declared_value_shorter_than_a_secret_looking_ones_minimum_is_masked() -> None:
    masker = Masker.for_env({"DB_NAME": "prod-db", "DEPLOY_KEY": "k-1234"}, ["DB_NAME"])
    assert masker.values == ("prod-db",)
    assert masker.text("connecting to prod-db with k-1234") == "connecting to *** with k-1234"


def test_values_of_one_length_are_masked_in_one_order_whatever_the_environment() -> None:
    """Two values can overlap in a text ("abcdefgh" and "cdefghij" in "abcdefghij"): which
    is masked first decides what is left, so the order must not depend on a set's."""
    values = [f"{c}-secret-{c}" for c in "fbdaec"]
    masker = Masker.for_env({f"K{i}_TOKEN": v for i, v in enumerate(values)}, [])
    assert masker.values == tuple(sorted(values))
    overlapping = Masker.for_env({"A_TOKEN": "abcdefgh", "B_TOKEN": "cdefghij"}, [])
    assert overlapping.text("abcdefghij") == "***ij"


def test_found_in_finds_any_one_of_the_values() -> None:
    masker = Masker.for_env({"A_TOKEN": "first-secret", "B_TOKEN": "second-secret"}, [])
    assert masker.found_in(b"a line with second-secret in it")
    assert masker.found_in(b"first-secret")
    assert not masker.found_in(b"first-secre second-secre")
    assert not Masker().found_in(b"anything")


def test_a_masker_without_values_leaves_a_log_alone(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("API_TOKEN=whatever\n")
    inode = log.stat().st_ino
    assert not Masker().mask_file(log)
    assert log.stat().st_ino == inode
    assert Masker().value({"k": ["v"]}) == {"k": ["v"]}


CHUNK = 1 << 20  # what the masker reads at a time


@pytest.mark.parametrize(
    "start",
    [CHUNK - 18, CHUNK - 1, CHUNK],
    ids=["all-but-last-byte-before", "first-byte-before", "at-the-chunk"],
)
def test_a_secret_cut_anywhere_by_a_chunk_is_masked(tmp_path: Path, start: int) -> None:
    secret = b"sk-0123456789abcdef"  # 19 bytes: at CHUNK - 18 only its last byte is after
    masker = Masker.for_env({"API_TOKEN": secret.decode()}, [])
    log = tmp_path / "log"
    log.write_bytes(b"x" * start + secret + b"y" * 10)
    assert masker.mask_file(log)
    assert log.read_bytes() == b"x" * start + b"***" + b"y" * 10
    # Found first elsewhere, the one across the chunk is masked when the file is rewritten.
    log.write_bytes(secret + b"x" * (start - len(secret)) + secret + b"y" * 10)
    assert masker.mask_file(log)
    assert log.read_bytes() == b"***" + b"x" * (start - len(secret)) + b"***" + b"y" * 10


def test_a_log_holding_only_part_of_a_secret_is_not_rewritten(tmp_path: Path) -> None:
    masker = Masker.for_env({"API_TOKEN": "XXXXXXXXXXXX"}, [])  # a placeholder-like value
    log = tmp_path / "log"
    log.write_text("XXXXXXXX and XXXXXXXXXXX\n")
    inode = log.stat().st_ino
    assert not masker.mask_file(log)
    assert log.stat().st_ino == inode
    assert log.read_text() == "XXXXXXXX and XXXXXXXXXXX\n"


@pytest.mark.parametrize("secret", ["X", "sk-0123456789abcdef"], ids=["one-byte", "long"])
def test_masking_streams_a_large_log_in_bounded_memory(tmp_path: Path, secret: str) -> None:
    masker = Masker((secret,))  # a one-byte value is for the API only: for_env needs three
    log = tmp_path / "log"
    log.write_bytes(b"." * (16 * CHUNK))
    tracemalloc.start()
    try:
        assert not masker.mask_file(log)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * CHUNK  # half the file: other threads' allocations leave room
    with log.open("ab") as f:
        f.write(secret.encode())
    tracemalloc.start()
    try:
        assert masker.mask_file(log)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * CHUNK
    assert log.stat().st_size == 16 * CHUNK + 3


def test_a_masked_log_is_rewritten_beside_itself_readable_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not through TMPDIR: it may be another file system (no rename across) or not exist."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))
    masker = Masker.for_env({"API_TOKEN": "sk-0123456789abcdef"}, [])
    log = tmp_path / "logs" / "t.attempt-1.stdout"
    log.parent.mkdir()
    log.write_text("token sk-0123456789abcdef\n")
    log.chmod(0o644)
    assert masker.mask_file(log)
    assert log.read_text() == "token ***\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o644
    assert os.listdir(log.parent) == [log.name]


@pytest.mark.parametrize("temp_removed", [False, True], ids=["temp-left", "temp-removed"])
def test_a_masking_that_fails_leaves_the_log_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, temp_removed: bool
) -> None:
    """The disk fills as the masked copy is made durable (fsync, where a delayed write
    fails): the error is the disk's, the log is as it was (it is not half masked) and
    nothing is left beside it, even when something else already removed the copy. (A write
    cut short: test_a_masked_log_the_disk_takes_only_in_part_does_not_replace_the_log.)"""
    masker = Masker.for_env({"API_TOKEN": "sk-0123456789abcdef"}, [])
    log = tmp_path / "logs" / "t.attempt-1.stdout"
    log.parent.mkdir()
    log.write_text("token sk-0123456789abcdef\n")
    real_fsync = os.fsync

    def disk_full(fd: int) -> None:
        if temp_removed:
            for name in os.listdir(log.parent):
                if name != log.name:
                    os.unlink(log.parent / name)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as raised:
        masker.mask_file(log)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert raised.value.errno == errno.ENOSPC
    assert log.read_text() == "token sk-0123456789abcdef\n"
    assert os.listdir(log.parent) == [log.name]
