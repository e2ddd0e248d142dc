"""Benchmarks of worktree-orchestrator, each against a baseline measured in the same run.

    python bench/run.py [--quick] [--only scheduler,cli] [--out bench-results.json]

Implemented so far (see docs/benchmarks.md; the shell-floor and seed comparisons and the
pool are issue 5's remaining parts):

- ``scheduler``: N in-process no-op callable tasks (``worktree: false, venv: false``) at
  concurrency 64, each N in a fresh process: wall time, time per task, peak RSS, and the
  P95 latency from "ready" (TaskQueued) to "started" (TaskStarted); the baseline is the same
  number of no-op coroutines in one anyio task group.
- ``cli``: ``python -m orchestrator --help`` against ``python -c pass``.

Prints a table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _child_scheduler(n: int) -> dict[str, Any]:
    """One scheduler measurement, in this (fresh) process."""
    import resource

    import anyio
    import anyio.lowlevel

    from envelopes import Event, HandoffEnvelope, TaskFinished, TaskQueued, TaskStarted
    from orchestrator import Workspace, build_envelope, orchestrate_parallel

    async def noop(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        return {}

    # "Ready to started": from the moment a task could start (queued, and a slot free) to
    # its start. With 10,000 tasks and 64 slots most wait for a slot; that wait is the
    # workload's, not the scheduler's, so a start is measured from the later of its queueing
    # and the end of the task whose slot it takes.
    queued: dict[str, float] = {}
    freed: deque[float] = deque()  # when a slot came free while tasks were waiting
    waiting = 0
    latencies: list[float] = []

    def watch(event: Event) -> None:
        nonlocal waiting
        now = time.perf_counter()
        if isinstance(event, TaskQueued):
            queued[event.task_id] = now
            waiting += 1
        elif isinstance(event, TaskStarted):
            waiting -= 1
            slot = freed.popleft() if freed else 0.0
            latencies.append(now - max(queued[event.task_id], slot))
        elif isinstance(event, TaskFinished) and waiting:
            freed.append(now)

    envelopes = [
        build_envelope("n", "t", task_id=f"n{i}", worktree=False, venv=False) for i in range(n)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = anyio.run(
            lambda: orchestrate_parallel(
                envelopes, agents={"n": noop}, state_dir=tmp, concurrency=64, on_event=watch
            )
        )
        wall = time.perf_counter() - start
    assert report.summary.successful == n

    async def baseline() -> None:
        async with anyio.create_task_group() as tg:
            limiter = anyio.CapacityLimiter(64)

            async def one() -> None:
                async with limiter:
                    await anyio.lowlevel.checkpoint()

            for _ in range(n):
                tg.start_soon(one)

    start = time.perf_counter()
    anyio.run(baseline)
    floor = time.perf_counter() - start
    latencies.sort()
    return {
        "n": n,
        "wall_s": round(wall, 4),
        "per_task_ms": round(1000 * wall / n, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "p95_ready_to_started_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 4),
        "baseline_wall_s": round(floor, 4),
        "ratio_to_baseline": round(wall / floor, 1) if floor else None,
    }


def bench_scheduler(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "_scheduler", str(n)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout))
    return rows


def _median_seconds(argv: list[str], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), (max(times) - min(times))


def bench_cli(repeats: int) -> dict[str, Any]:
    cli, cli_spread = _median_seconds([sys.executable, "-m", "orchestrator", "--help"], repeats)
    floor, floor_spread = _median_seconds([sys.executable, "-c", "pass"], repeats)
    return {
        "orchestrator_help_s": round(cli, 4),
        "orchestrator_help_spread_s": round(cli_spread, 4),
        "python_pass_s": round(floor, 4),
        "python_pass_spread_s": round(floor_spread, 4),
        "ratio": round(cli / floor, 1),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks, each against a baseline.")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--only", default="scheduler,cli", help="comma-separated benchmarks")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument(
        "--sizes",
        help="scheduler task counts, comma-separated (default 10000,100000; quick 1000,10000)",
    )
    parser.add_argument(
        "--repeats", type=int, help="cli: runs of each command (default 15; quick 5)"
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - {"scheduler", "cli"}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    results: dict[str, Any] = {"python": sys.version.split()[0], "quick": args.quick}
    if "scheduler" in only:
        sizes = [1_000, 10_000] if args.quick else [10_000, 100_000]
        if args.sizes:
            sizes = [int(n) for n in args.sizes.split(",")]
        results["scheduler"] = rows = bench_scheduler(sizes)
        print("scheduler (no-op callable tasks, concurrency 64):")
        print(f"  {'N':>7} {'wall s':>8} {'ms/task':>8} {'RSS MB':>7} {'P95 ms':>8} {'x floor':>8}")
        for r in rows:
            print(
                f"  {r['n']:>7} {r['wall_s']:>8} {r['per_task_ms']:>8} {r['peak_rss_mb']:>7} "
                f"{r['p95_ready_to_started_ms']:>8} {r['ratio_to_baseline']:>8}"
            )
        if len(rows) == 2:
            growth = rows[1]["wall_s"] / rows[0]["wall_s"]
            results["scheduler_growth"] = round(growth, 2)
            print(f"  {rows[1]['n']} / {rows[0]['n']} wall time: {growth:.2f}x")
    if "cli" in only:
        results["cli"] = c = bench_cli(args.repeats or (5 if args.quick else 15))
        print(
            f"cli start: orchestrator --help {c['orchestrator_help_s']} s, "
            f"python -c pass {c['python_pass_s']} s, ratio {c['ratio']}"
        )
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_scheduler":
        print(json.dumps(_child_scheduler(int(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
