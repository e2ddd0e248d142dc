"""Benchmarks of scale (``bench/run.py --only scale``), each compared within the same run:

- ``verify``: ``verify_report`` of a report of N results (made with ``git fast-import``: one
  commit per result on its own branch above a base, and a sealed report naming them), for
  two sizes: time per result at the larger against the smaller (flat is 1.0), and the git
  processes each runs (the commit and ancestry checks: at most 5 whatever N).
- ``validate``: ``orchestrator validate`` of a plan of N tasks (YAML), each size in a fresh
  process: wall time and peak RSS, and the larger's time against the smaller's per task.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import workloads

RUN_ID = "20260101-000000-bench0"


def _synthetic_report(repo: Path, n: int) -> Path:
    """A repository with a base commit and *n* result commits on their branches (one
    ``fast-import``), and a sealed report of them in its run directory."""
    import anyio

    from envelopes import (
        AgentInfo,
        Provenance,
        TaskResult,
        Timings,
        canonical_json,
        digest,
        seal_result,
        sha256_hex,
    )
    from orchestrator.report import aggregate_results, write_report

    workloads._git(repo, "init", "-q", "-b", "main")
    now = int(time.time())
    lines = ["reset refs/heads/main", "commit refs/heads/main", "mark :1"]
    lines += [f"committer bench <b@b> {now} +0000", "data 4", "base"]
    lines += ["M 644 inline README", "data 6", "hello", ""]
    for i in range(n):
        branch = f"refs/heads/orchestrator/{RUN_ID}/t{i}"
        body = f"result {i}\n"
        lines += [f"commit {branch}", f"mark :{i + 2}"]
        lines += [f"committer bench <b@b> {now} +0000", f"data {len('r')}", "r", "from :1"]
        lines += [f"M 644 inline t{i}.txt", f"data {len(body)}", body]
    marks = repo / "marks"
    subprocess.run(
        ["git", "fast-import", "--quiet", f"--export-marks={marks}"],
        cwd=repo,
        input="\n".join(lines) + "\n",
        text=True,
        check=True,
    )
    ids = dict(line.split() for line in marks.read_text().splitlines())
    base = ids[":1"]
    trees = workloads._git(
        repo, "log", "--no-walk=unsorted", "--format=%H %T", "--branches=orchestrator/*"
    )
    tree_of = dict(line.split() for line in trees.splitlines())
    run_dir = repo / ".git" / "orchestrator" / "runs" / RUN_ID
    run_dir.mkdir(parents=True)
    plan = canonical_json({"envelopes": []})
    (run_dir / "plan.json").write_bytes(plan)
    agent = AgentInfo(kind="callable", qualname="bench.noop")
    stamp = datetime.now(UTC)
    results = []
    for i in range(n):
        commit = ids[f":{i + 2}"]
        result = TaskResult(
            task_id=f"t{i}",
            agent="a",
            status="succeeded",
            attempts=0,
            output={},
            timings=Timings(started_at=stamp, finished_at=stamp, duration_s=0.0),
            branch=f"orchestrator/{RUN_ID}/t{i}",
            provenance=Provenance(
                envelope_sha256="0" * 64,
                base_commit=base,
                result_commit=commit,
                result_tree=tree_of[commit],
                agent=agent,
                agent_sha256=digest(agent.model_dump(mode="json")),
                output_sha256=digest({}),
            ),
        )
        results.append(seal_result(result))
    report = aggregate_results(
        results,
        run_id=RUN_ID,
        plan_name="bench",
        plan_sha256=sha256_hex(plan),
        repo=str(repo),
        base_ref="main",
        base_commit=base,
        run_dir=run_dir,
        started_at=stamp,
        finished_at=stamp,
    )
    return anyio.run(write_report, report, run_dir / "report.json")


def _child_verify(n: int, work: str) -> dict[str, Any]:
    """Verify a synthetic report of *n* results, in this (fresh) process."""
    import anyio

    from orchestrator import Repository, verify_report

    repo = Path(work) / f"verify-{n}"
    repo.mkdir(parents=True)
    path = _synthetic_report(repo, n)

    async def measure() -> tuple[float, int, bool]:
        repository = await Repository.open(repo)
        calls = repository.git.calls
        start = time.perf_counter()
        outcome = await verify_report(path, repo=repository)
        took = time.perf_counter() - start
        return took, repository.git.calls - calls, outcome.ok

    anyio.run(measure)  # once to warm up (imports, schemas, the page cache)
    took, calls, ok = anyio.run(measure)
    return {"n": n, "verify_s": round(took, 3), "git_processes": calls, "ok": ok}


def bench_verify(sizes: list[int], work: Path) -> dict[str, Any]:
    return _per_result("_verify", "verify_s", sizes, work)


def _per_result(child: str, seconds: str, sizes: list[int], work: Path) -> dict[str, Any]:
    """Each size measured by *child* in a fresh process; the time per result (its
    *seconds* over its ``n``) at the largest size against the smallest."""
    rows = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, child, str(n), str(work)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout))
    per = [r[seconds] / r["n"] for r in (rows[0], rows[-1])]
    return {"rows": rows, "per_result_ratio": round(per[1] / per[0], 2) if per[0] else None}


def _child_merge(n: int, work: str) -> dict[str, Any]:
    """``merge_results(..., dry_run=True)`` of a synthetic report of *n* disjoint results
    into ``main`` (their base), in this (fresh) process: the time, the git processes, and
    how many of them were ``merge-tree`` (predicting and building)."""
    import anyio

    import orchestrator.merge as merge_module
    from envelopes import load_report_json
    from orchestrator import Repository
    from orchestrator.mergeback import merge_results

    repo = Path(work) / f"merge-{n}"
    repo.mkdir(parents=True)
    path = _synthetic_report(repo, n)
    workloads._git(repo, "reset", "-q", "--hard")  # main's checkout as it should be
    _, report = load_report_json(path)
    merges = 0
    real = merge_module.merge_trees

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal merges
        merges += 1
        return await real(*args, **kwargs)

    import orchestrator.mergeback as mergeback_module

    mergeback_module.merge_trees = counted  # type: ignore[assignment]

    async def measure() -> tuple[float, int, str]:
        repository = await Repository.open(repo)
        calls = repository.git.calls
        start = time.perf_counter()
        record = await merge_results(report, into="main", repo=repository, dry_run=True)
        took = time.perf_counter() - start
        repository.lock.close()
        return took, repository.git.calls - calls, record.status

    anyio.run(measure)  # once to warm up
    merges = 0
    took, calls, status = anyio.run(measure)
    return {
        "n": n,
        "merge_s": round(took, 3),
        "git_processes": calls,
        "merge_trees": merges,
        "status": status,
    }


def bench_merge(sizes: list[int], work: Path) -> dict[str, Any]:
    return _per_result("_merge", "merge_s", sizes, work)


def bench_validate(sizes: list[int], work: Path) -> dict[str, Any]:
    import yaml

    rows = []
    for n in sizes:
        plan = {
            "name": "big",
            "agents": {"a": {"command": ["true"]}},
            "defaults": {"venv": False, "worktree": False},
            "tasks": [{"id": f"t{i}", "agent": "a", "task": f"do thing {i}"} for i in range(n)],
        }
        path = work / f"plan-{n}.yaml"
        path.write_text(yaml.safe_dump(plan))
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "_validate", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - start
        rss = json.loads(out.stdout)["max_rss_mb"]
        rows.append({"n": n, "validate_s": round(wall, 2), "max_rss_mb": rss})
    per = [r["validate_s"] / r["n"] for r in (rows[0], rows[-1])]
    return {"rows": rows, "per_task_ratio": round(per[1] / per[0], 2)}


def _child_validate(path: str) -> dict[str, Any]:
    from orchestrator.cli import main

    with open("/dev/null", "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            code = main(["validate", path])
        finally:
            sys.stdout = stdout
    assert code == 0, code
    return {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


if __name__ == "__main__":
    if sys.argv[1] == "_verify":
        print(json.dumps(_child_verify(int(sys.argv[2]), sys.argv[3])))
    elif sys.argv[1] == "_merge":
        print(json.dumps(_child_merge(int(sys.argv[2]), sys.argv[3])))
    elif sys.argv[1] == "_validate":
        print(json.dumps(_child_validate(sys.argv[2])))
