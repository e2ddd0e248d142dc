"""The dask executor's benchmarks (``bench/run.py --only dask``), each against a baseline of
the same run:

- ``sleep``: tasks whose agent sleeps (I/O bound) on an embedded cluster of W workers with
  S slots each, at concurrency W x S: wall time from the run's start (``run_started``, the
  cluster up) to its last task's end, against the ideal (tasks x sleep / slots); the
  start-up (the cluster started and checked) and the closing (the cluster stopped, the
  report written) apart. The local executor's time for the same tasks is the baseline.
- ``bytes``: what travels per task on a repository of F files: the pickled job sent and the
  outcome brought back, for the first task on each worker (which pays for the base) and for
  the others, each against its own change's bundle (``git bundle create`` of its result
  commit less its start).
- ``noop``: per-task time of no-op command tasks (no worktree, no venv), dask executor
  (embedded cluster) against local executor, same tasks, same run of the script.
"""

from __future__ import annotations

import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import workloads


def _plan(repo: Path, tasks: list[dict[str, Any]], command: list[str]) -> dict[str, Any]:
    """A plan of *tasks*, each run by the agent *command*, without venvs."""
    return {
        "name": "bench-dask",
        "repo": str(repo),
        "defaults": {"venv": False},
        "agents": {"a": {"command": command}},
        "tasks": [{"agent": "a", "task": "bench", **t} for t in tasks],
    }


def _run(
    plan: dict[str, Any], executor: Any, state_dir: Path, concurrency: int
) -> tuple[Any, float, float, list[Any], float]:
    """Run *plan*: (report, start-up seconds, run seconds from the run's start to its last
    task's end, bound executors, seconds from then to the report: the executor's closing
    and the report's writing)."""
    import anyio

    from envelopes import Event, RunStarted, TaskFinished
    from orchestrator import orchestrate_parallel

    marks: dict[str, float] = {}

    def watch(event: Event) -> None:
        if isinstance(event, RunStarted):
            marks["started"] = time.perf_counter()
        elif isinstance(event, TaskFinished):
            marks["last"] = time.perf_counter()

    begin = time.perf_counter()
    report = anyio.run(
        lambda: orchestrate_parallel(
            plan, executor=executor, state_dir=state_dir, concurrency=concurrency, on_event=watch
        )
    )
    end = time.perf_counter()
    started = marks.get("started", begin)
    last = marks.get("last", end)
    bound = getattr(executor, "bound", [])
    return report, started - begin, last - started, bound, end - last


def _recording_executor(**options: Any) -> Any:
    from orchestrator import DaskExecutor

    class Recording(DaskExecutor):
        """Keeps each run's executor, and the size of what each dispatch sent and brought."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.bound: list[Any] = []

        def bind(self, ctx: Any) -> Any:
            run = super().bind(ctx)
            run.sizes = []
            submit, outcome = run._submit, run._outcome

            def sized_submit(job: Any, address: str, scatter: bool) -> Any:
                run.sizes.append(
                    {
                        "task": job.envelope.task_id,
                        "worker": address,
                        "sent": len(pickle.dumps(job)),
                        "base": job.bundle is not None,
                    }
                )
                return submit(job, address, scatter)

            async def sized_outcome(task: Any, future: Any, job: Any, *args: Any) -> Any:
                from orchestrator.remote import encode_outcome

                got = await outcome(task, future, job, *args)
                for row in reversed(run.sizes):
                    if row["task"] == job.envelope.task_id:
                        row["back"] = len(encode_outcome(got))  # the bytes that came back
                        break
                return got

            run._submit, run._outcome = sized_submit, sized_outcome
            self.bound.append(run)
            return run

    return Recording(**options)


def bench_sleep(tasks: int, seconds: float, workers: int, slots: int, work: Path) -> dict[str, Any]:
    from orchestrator import DaskExecutor

    repo = workloads.make_repo(work / "sleep-repo", 20)
    sleep = [sys.executable, "-c", f"import time; time.sleep({seconds})"]
    plan = _plan(repo, [{"id": f"s{i}"} for i in range(tasks)], sleep)
    executor = DaskExecutor(workers=workers, slots=slots)
    report, startup, run_s, _, closing = _run(plan, executor, work / "sleep-state", workers * slots)
    assert report.summary.successful == tasks, report.errors
    # The same tasks on this machine, as many at once: what the machine itself allows.
    local, _, local_s, _, _ = _run(plan, "local", work / "sleep-local", workers * slots)
    assert local.summary.successful == tasks, local.errors
    ideal = tasks * seconds / (workers * slots)
    return {
        "local_run_s": round(local_s, 3),
        "local_ratio": round(local_s / ideal, 3),
        "tasks": tasks,
        "sleep_s": seconds,
        "workers": workers,
        "slots": slots,
        "startup_s": round(startup, 3),
        "closing_s": round(closing, 3),
        "run_s": round(run_s, 3),
        "ideal_s": round(ideal, 3),
        "ratio": round(run_s / ideal, 3),
    }


def bench_bytes(files: int, tasks: int, work: Path) -> dict[str, Any]:
    repo = workloads.make_repo(work / "bytes-repo", files)
    script = work / "edit.py"
    script.write_text(
        "import os, pathlib\n"
        "t = os.environ['ORCHESTRATOR_TASK_ID']\n"
        "pathlib.Path(t + '.txt').write_text('changed by ' + t + '\\n' * 20)\n"
    )
    plan = _plan(repo, [{"id": f"e{i}"} for i in range(tasks)], [sys.executable, str(script)])
    executor = _recording_executor(workers=2, slots=2)
    report, _, _, bound, _ = _run(plan, executor, work / "bytes-state", 4)
    assert report.summary.successful == tasks, report.errors
    (run,) = bound
    own: dict[str, int] = {}
    for result in report.results:
        bundle = work / f"{result.task_id}.bundle"
        subprocess.run(
            [
                "git",
                "-C",
                str(repo),
                "bundle",
                "create",
                "-q",
                str(bundle),
                result.branch,
                f"^{result.provenance.base_commit}",
            ],
            check=True,
        )
        own[result.task_id] = bundle.stat().st_size
    first, later = [], []
    for row in run.sizes:
        row["own_bundle"] = own[row["task"]]
        row["shipped"] = row["sent"] + row.get("back", 0)
        # Independent tasks from the base: the one that carried the base to its worker is
        # that worker's first (the others sent there meanwhile wait for it there).
        (first if row["base"] else later).append(row)
    worst = max((r["shipped"] - 4096) / r["own_bundle"] for r in later) if later else 0.0
    return {
        "files": files,
        "tasks": tasks,
        "first_per_worker_bytes": [r["shipped"] for r in first],
        "later_median_bytes": int(statistics.median(r["shipped"] for r in later)) if later else 0,
        "own_bundle_median_bytes": int(statistics.median(r["own_bundle"] for r in later))
        if later
        else 0,
        "later_worst_ratio_less_4k": round(worst, 3),
    }


def bench_noop(tasks: int, work: Path) -> dict[str, Any]:
    from orchestrator import DaskExecutor

    repo = workloads.make_repo(work / "noop-repo", 20)
    noop = [sys.executable, "-c", "pass"]
    plan = _plan(repo, [{"id": f"n{i}", "worktree": False} for i in range(tasks)], noop)
    _, _, local_s, _, _ = _run(plan, "local", work / "noop-local", 4)
    _, startup, dask_s, _, _ = _run(plan, DaskExecutor(workers=2, slots=2), work / "noop-dask", 4)
    return {
        "tasks": tasks,
        "local_ms_per_task": round(local_s / tasks * 1000, 2),
        "dask_ms_per_task": round(dask_s / tasks * 1000, 2),
        "dask_startup_s": round(startup, 3),
        "ratio": round(dask_s / local_s, 2),
    }


def bench_dask(quick: bool) -> dict[str, Any]:
    """Every dask benchmark, in a scratch directory."""
    with tempfile.TemporaryDirectory(prefix="orchestrator-bench-dask-") as scratch:
        work = Path(scratch)
        if quick:
            sleep = bench_sleep(16, 0.5, 2, 4, work)
            size = bench_bytes(1000, 8, work)
            noop = bench_noop(16, work)
        else:
            sleep = bench_sleep(64, 2.0, 4, 4, work)
            size = bench_bytes(5000, 16, work)
            noop = bench_noop(64, work)
    return {"sleep": sleep, "bytes": size, "noop": noop}


def describe(result: dict[str, Any]) -> list[str]:
    s, b, n = result["sleep"], result["bytes"], result["noop"]
    return [
        f"dask sleep: {s['tasks']} tasks x {s['sleep_s']} s on {s['workers']} workers x "
        f"{s['slots']} slots: {s['run_s']} s after a {s['startup_s']} s start-up (and "
        f"{s['closing_s']} s closing), ideal "
        f"{s['ideal_s']} s: {s['ratio']}x (the local executor, same tasks and slots: "
        f"{s['local_run_s']} s, {s['local_ratio']}x)",
        f"dask bytes ({b['files']} files, {b['tasks']} tasks): first task per worker "
        f"{b['first_per_worker_bytes']} B; later ones median {b['later_median_bytes']} B "
        f"against their own change's bundle {b['own_bundle_median_bytes']} B; worst "
        f"(shipped - 4 KiB) / own bundle {b['later_worst_ratio_less_4k']}x",
        f"dask no-op ({n['tasks']} tasks): {n['dask_ms_per_task']} ms per task on dask "
        f"(after a {n['dask_startup_s']} s start-up), {n['local_ms_per_task']} ms local: "
        f"{n['ratio']}x",
    ]
