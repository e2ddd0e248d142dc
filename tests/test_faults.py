"""orchestrator/_faults.py: ``ORCHESTRATOR_CRASH_AT=<point>:<n>`` kills the process at the
*n*-th arrival at *point*, and nothing else does anything.

The module reads the variable once, at import, so every case runs in a fresh interpreter. The
crash tests that use it on whole runs are in tests/test_resume.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.journal import read_journal

ROOT = Path(__file__).resolve().parent.parent


def python(code: str, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    """Run *code* in a fresh interpreter with ``ORCHESTRATOR_CRASH_AT`` set to *crash_at*."""
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_CRASH_AT"}
    if crash_at is not None:
        env["ORCHESTRATOR_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def arrive(points: list[str], crash_at: str | None) -> subprocess.CompletedProcess[str]:
    """Reach *points* in order, printing ``<i> <point>`` before each arrival, then ``survived``.

    The first line is what ``armed`` says of each point name.
    """
    return python(
        f"""
        import json
        from orchestrator._faults import armed, crash_point
        names = ["worktree", "commit", "report", "journal"]
        print(json.dumps({{name: armed(name) for name in names}}), flush=True)
        for i, point in enumerate({points!r}, start=1):
            print(i, point, flush=True)
            crash_point(point)
        print("survived", flush=True)
        """,
        crash_at,
    )


def arrivals(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The arrivals a run printed (``survived`` included), without the ``armed`` line."""
    return done.stdout.splitlines()[1:]


def armed_names(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [name for name, on in json.loads(done.stdout.splitlines()[0]).items() if on]


EVERY_POINT = ["worktree", "commit", "report", "journal"] * 3


@pytest.mark.parametrize("crash_at", [None, ""], ids=["unset", "empty"])
def test_unset_nothing_is_armed_and_every_point_is_passed(crash_at: str | None) -> None:
    done = arrive(EVERY_POINT, crash_at)
    assert done.returncode == 0, done.stderr
    assert armed_names(done) == []
    assert arrivals(done) == [f"{i} {p}" for i, p in enumerate(EVERY_POINT, 1)] + ["survived"]


@pytest.mark.parametrize("nth", [1, 2, 5])
def test_the_nth_arrival_kills_with_sigkill_and_not_an_earlier_one(nth: int) -> None:
    done = arrive(["commit"] * 6, f"commit:{nth}")
    assert done.returncode == -signal.SIGKILL
    # The n-th arrival was announced, and nothing after it ran.
    assert arrivals(done) == [f"{i} commit" for i in range(1, nth + 1)]
    assert done.stderr == ""


def test_other_points_neither_kill_nor_count() -> None:
    points = ["worktree", "commit", "journal", "worktree", "report", "commit", "journal"]
    done = arrive(points, "commit:2")
    assert done.returncode == -signal.SIGKILL
    assert armed_names(done) == ["commit"]
    assert arrivals(done)[-1] == "6 commit"  # the second commit, after four other arrivals

    never = arrive(EVERY_POINT, "gc:1")  # a point no code reaches
    assert never.returncode == 0 and arrivals(never)[-1] == "survived"
    assert armed_names(never) == []


def test_a_point_reached_fewer_than_n_times_never_kills() -> None:
    done = arrive(["report"] * 3, "report:4")
    assert done.returncode == 0, done.stderr
    assert armed_names(done) == ["report"]  # armed from the start, whatever n is
    assert arrivals(done)[-1] == "survived"


@pytest.mark.parametrize("crash_at", ["journal", "journal:"], ids=["no-colon", "empty-n"])
def test_without_n_the_first_arrival_kills(crash_at: str) -> None:
    done = arrive(["worktree", "journal", "journal"], crash_at)
    assert done.returncode == -signal.SIGKILL
    assert arrivals(done) == ["1 worktree", "2 journal"]


@pytest.mark.parametrize("crash_at", ["commit:0", "commit:-1"])
def test_an_n_below_one_is_never_reached(crash_at: str) -> None:
    done = arrive(["commit"] * 4, crash_at)
    assert done.returncode == 0, done.stderr
    assert arrivals(done)[-1] == "survived"


@pytest.mark.parametrize("crash_at", ["commit:x", "commit:1:2"])
def test_an_n_that_is_no_number_fails_at_the_point_not_at_import(crash_at: str) -> None:
    # The import, and arrivals at other points, go on as if unset: the value is only read
    # as a number once the armed point is reached, and then it raises instead of killing.
    done = arrive(["worktree", "report", "commit", "journal"], crash_at)
    assert done.returncode == 1
    assert armed_names(done) == ["commit"]
    assert arrivals(done) == ["1 worktree", "2 report", "3 commit"]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: invalid literal for int() with base 10: ")


def test_report_point_dies_after_the_temp_file_and_before_the_rename(tmp_path: Path) -> None:
    done = python(
        f"""
        from pathlib import Path
        from orchestrator._fs import atomic_write
        run = Path({str(tmp_path)!r})
        atomic_write(run / "plan.json", b"{{}}")  # not a report: not a crash point
        atomic_write(run / "report.json", b'{{"new": true}}')
        print("survived")
        """,
        "report:1",
    )
    assert done.returncode == -signal.SIGKILL
    assert done.stdout == ""
    assert (tmp_path / "plan.json").read_bytes() == b"{}"
    assert not (tmp_path / "report.json").exists()  # the old report (none) is what readers see
    (temp,) = [p for p in tmp_path.iterdir() if p.name != "plan.json"]
    assert temp.name.startswith(".report.json.") and temp.read_bytes() == b'{"new": true}'


def test_journal_point_leaves_half_a_line_as_a_power_cut_would(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    done = python(
        f"""
        import anyio
        from pathlib import Path
        from orchestrator.journal import Journal
        journal = Journal(Path({str(path)!r}))
        journal.open()
        anyio.run(journal.write, {{"type": "run", "n": 1}})
        anyio.run(journal.write, {{"type": "state", "n": 2}})
        print("survived")
        """,
        "journal:2",
    )
    assert done.returncode == -signal.SIGKILL
    assert done.stdout == ""
    contents = read_journal(path)
    assert contents.records == [{"type": "run", "n": 1}]  # the first write was whole
    assert contents.torn
    second = b'{"type":"state","n":2}\n'
    assert path.read_bytes() == b'{"type":"run","n":1}\n' + second[: len(second) // 2]
