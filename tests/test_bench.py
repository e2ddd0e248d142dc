"""The benchmark script runs and reports what it says (no timing is asserted: see docs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_runs_small_and_writes_its_numbers(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    ran = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--sizes",
            "20,40",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    results = json.loads(out.read_text())
    assert [row["n"] for row in results["scheduler"]] == [20, 40]
    for row in results["scheduler"]:
        assert row["wall_s"] > 0 and row["baseline_wall_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["p95_ready_to_started_ms"] >= 0
    assert results["cli"]["ratio"] > 0
    assert "scheduler (no-op callable tasks, concurrency 64):" in ran.stdout


def test_an_unknown_benchmark_is_refused() -> None:
    ran = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--only", "nope"],
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 2
    assert ran.stderr.splitlines()[-1].endswith("unknown benchmark(s): nope")
