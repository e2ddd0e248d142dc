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
            "--quick",
            "--sizes",
            "20,40",
            "--repeats",
            "1",
            "--files",
            "30",
            "--tasks",
            "2,4",
            "--requirement-tasks",
            "3",
            "--large-files",
            "100",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr
    results = json.loads(out.read_text())
    assert [row["n"] for row in results["scheduler"]] == [20, 40]
    for row in results["scheduler"]:
        assert row["wall_s"] > 0 and row["baseline_wall_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["p95_ready_to_started_ms"] >= 0
    assert results["cli"]["ratio"] > 0
    assert "scheduler (no-op callable tasks, concurrency 64):" in ran.stdout
    # The worktree comparison: each N against the shell floor, the seed at the smallest N.
    rows = results["worktrees"]
    assert [(r["files"], r["n"], r["c"]) for r in rows] == [(30, 2, 8), (30, 4, 8)]
    for row in rows:
        for kind in ("floor", "orchestrator", "orchestrator_second_run", "library"):
            assert row[kind]["median_s"] > 0 and row[kind]["runs"] == 1
        assert row["ratio_orchestrator_to_floor"] > 0
    assert rows[0]["ratio_naive_to_orchestrator"] > 0 and "naive" not in rows[1]
    # The smallest N once more, served by a resident process (orchestrator serve).
    assert rows[0]["served"]["runs"] == 1 and rows[0]["ratio_served_to_floor"] > 0
    assert "served" not in rows[1]
    # The large repository (here small): first run against the floor, per-task costs
    # against git status, with the pool warm and one at a time.
    large = results["large"]
    assert (large["files"], large["n"], large["c"]) == (100, 8, 4)
    for key in ("ratio_first_run_to_floor", "ratio_per_task_to_status", "per_task_own_c1_s"):
        assert large[key] > 0, key
    # Shared requirements: the set is installed once; the other venvs are lent or synced.
    requirements = results["requirements"]
    assert requirements["installer_runs"] == 1
    assert requirements["per_task_venv_median_s"] > 0 and requirements["ratio"] > 0
    # The dask executor: each measure against its baseline of the same run.
    dask = results["dask"]
    assert dask["sleep"]["ratio"] > 0 and dask["sleep"]["startup_s"] > 0
    assert len(dask["bytes"]["first_per_worker_bytes"]) == 2
    assert dask["bytes"]["own_bundle_median_bytes"] > 0
    assert dask["noop"]["local_ms_per_task"] > 0 and dask["noop"]["dask_ms_per_task"] > 0
    # Scale: verify's git processes do not grow with the results; validate's sizes both ran.
    scale = results["scale"]
    assert [r["n"] for r in scale["verify"]["rows"]] == [200, 2_000]
    assert all(r["ok"] and r["git_processes"] <= 5 for r in scale["verify"]["rows"])
    assert [r["n"] for r in scale["validate"]["rows"]] == [1_000, 10_000]
    assert all(r["max_rss_mb"] > 0 for r in scale["validate"]["rows"])
    # The peer: parallel-orchestra from PyPI against the orchestrator, both merging into
    # main (skipped, saying why, where it cannot be installed).
    peer = results["peer"]
    assert "skipped" in peer or (
        peer["orchestrator_s"] > 0 and peer["peer_s"] > 0 and peer["served_s"] > 0
    ), peer
    # Merge of disjoint results: no merge-tree, a git process per result and a constant.
    merge = scale["merge"]["rows"]
    assert [r["n"] for r in merge] == [32, 128]
    assert all(r["merge_trees"] == 0 and r["git_processes"] <= r["n"] + 16 for r in merge)
    assert all(r["status"] == "skipped" for r in merge)  # a dry run that would merge


def test_an_unknown_benchmark_is_refused() -> None:
    ran = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--only", "nope"],
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 2
    assert ran.stderr.splitlines()[-1].endswith("unknown benchmark(s): nope")
