"""A full disk and a read-only state directory: one clear line naming the path, nothing lost.

The disk is real: a small tmpfs mounted for the test. Mounting needs root (CAP_SYS_ADMIN);
where that is not available the tests are skipped, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.journal import read_journal

from .conftest import MakeRepo


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, mounted for the test."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def orchestrator(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_plan(tmp_path: Path, repo: Path) -> Path:
    plan = tmp_path / "plan.yaml"
    # Its log fills the disk; it does not mind when its own writes fail (the orchestrator's
    # do, and those are what this test is about).
    noisy = (
        "import json, os\n"
        "try:\n    os.write(1, b'x' * 20000)\nexcept OSError:\n    pass\n"
        "open(os.environ['ORCHESTRATOR_OUTPUT'], 'w').write(json.dumps({'ok': 1}))\n"
    )
    tasks = "".join(f"  - {{id: t{i}, agent: w, task: t}}\n" for i in range(8))
    plan.write_text(
        f"repo: {json.dumps(str(repo))}\nconcurrency: 2\ndefaults: {{venv: false}}\n"
        f"agents: {{w: {{command: [{json.dumps(sys.executable)}, '-c', {json.dumps(noisy)}]}}}}\n"
        f"tasks:\n{tasks}"
    )
    return plan


def test_a_full_disk_is_one_line_naming_the_path_and_loses_nothing(
    make_repo: MakeRepo, tmp_path: Path, small_disk: Path
) -> None:
    repo = make_repo()
    plan = write_plan(tmp_path, repo)
    state = small_disk / "state"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (512 * 1024 - 96 * 1024))  # leave about 96 KiB
    full = orchestrator("run", str(plan), "--state-dir", str(state), cwd=tmp_path)
    assert full.returncode == 1
    last = full.stderr.splitlines()[-1]
    assert last.startswith(f"orchestrator: cannot write {state}/"), full.stderr
    assert last.endswith(": No space left on device")
    assert "Traceback" not in full.stderr
    (run_dir,) = (state / "runs").iterdir()
    journal = read_journal(run_dir / "journal.jsonl")  # readable: at most a torn last line
    done_before = {
        r["result"]["task_id"]
        for r in journal.of_type("result")
        if r["result"]["status"] == "succeeded"
    }
    # Room again: the run goes on, and every task is in its report once. (An agent whose own
    # write hit the full disk may have failed for real: that failure is kept, as any is.)
    filler.unlink()
    resumed = orchestrator(
        "resume",
        run_dir.name,
        "--repo",
        str(repo),
        "--state-dir",
        str(state),
        "--json",
        cwd=tmp_path,
    )
    assert resumed.returncode in (0, 1), resumed.stderr
    report = json.loads(resumed.stdout)
    assert [r["task_id"] for r in report["results"]] == [f"t{i}" for i in range(8)]
    for result in report["results"]:
        if result["task_id"] in done_before:
            assert (result["status"], result["resumed"]) == ("succeeded", True)
        if result["error"] is not None:
            assert result["error"]["kind"] != "internal", result["error"]  # all ran again
    verified = orchestrator("verify", str(run_dir / "report.json"), cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout


def test_a_read_only_state_directory_is_one_line(
    make_repo: MakeRepo, tmp_path: Path, small_disk: Path
) -> None:
    repo = make_repo()
    plan = write_plan(tmp_path, repo)
    (small_disk / "state").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    refused = orchestrator("run", str(plan), "--state-dir", str(small_disk / "state"), cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"orchestrator: cannot create the run directory {small_disk}/state/runs/"
        + refused.stderr.split("/state/runs/")[1].split(":")[0]
        + ": Read-only file system"
    ]
    assert not os.listdir(small_disk / "state")
