"""The peer comparison of issue 17 (``bench/run.py --only peer``): 16 tasks that each write
a file, concurrency 4, merged into ``main``, run by ``orchestrator run`` and by
parallel-orchestra (PyPI), each with the same stand-in ``claude``.

No model is reachable here, so ``claude`` is a stand-in that writes the file its prompt
names and prints what Claude Code prints headless (the project's own fixture of its
``stream-json`` output, ``tests/fixtures/presets/claude-code/success.jsonl``): the
orchestrator drives it through its ``claude-code`` preset (prompt on stdin), the peer with
``claude --dangerously-skip-permissions --agent A -p PROMPT``. What is compared is what
each tool costs around its agents: worktrees, commits, the merge back, the report.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import workloads

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "presets" / "claude-code" / "success.jsonl"
TASKS = 16
CONCURRENCY = 4

STAND_IN = """#!{python}
import os, re, sys
args = sys.argv[1:]
prompt = ""
if "-p" in args:
    i = args.index("-p")
    if i + 1 < len(args) and not args[i + 1].startswith("--"):
        prompt = args[i + 1]
if not prompt:
    prompt = sys.stdin.read()
name = re.search(r"write (t[0-9]+)", prompt)
if name:
    with open(name.group(1) + ".txt", "w") as f:
        f.write(name.group(1) + "\\n")
with open({fixture!r}) as f:
    sys.stdout.write(f.read())
"""


def _install_peer(work: Path) -> Path | str:
    """parallel-orchestra installed into a directory of its own (its one dependency,
    PyYAML, is the orchestrator's too); or why it could not be."""
    target = work / "peer-site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            "parallel-orchestra==0.1.4",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1] if lines else f"pip exited {done.returncode}"
    return target


def _repo(path: Path) -> Path:
    repo = workloads.make_repo(path, 20)
    return repo


def _ours(repo: Path, env: dict[str, str]) -> float:
    tasks = "".join(
        f"  - {{id: t{i:02d}, agent: claude, task: 'write t{i:02d}'}}\n" for i in range(TASKS)
    )
    plan = repo.parent / f"{repo.name}-plan.yaml"
    plan.write_text(
        f"repo: {json.dumps(str(repo))}\nconcurrency: {CONCURRENCY}\n"
        "agents:\n  claude: {preset: claude-code}\n"
        "defaults: {venv: false}\n"
        "merge: {into: main}\n"
        f"tasks:\n{tasks}"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(plan)],
        cwd=repo.parent,
        env=env,  # cold (workloads.cold) or finding a resident process (workloads.resident)
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"orchestrator run failed: {done.stderr[-2000:]}")
    return took


def _peer(repo: Path, site: Path, stand_in: Path, env: dict[str, str]) -> float | str:
    """The peer's wall time on *repo*; or, when it fails, its last line of error (its own
    failures are not the benchmark's: on CI machines it has lost a race with itself writing
    its run state, and git worktree add has failed under it)."""
    tasks = "".join(
        f"  - id: t{i:02d}\n    agent: w\n    read_only: false\n    prompt: 'write t{i:02d}'\n"
        for i in range(TASKS)
    )
    manifest = repo / "po-manifest.md"
    manifest.write_text(
        f'---\npo_plan_version: "0.1"\nname: "bench"\ncwd: "."\n\ntasks:\n{tasks}---\n'
    )
    (repo / ".gitignore").write_text("po-manifest.md\n.po-worktrees/\n.claude/\n")
    workloads._git(repo, "add", ".gitignore")
    workloads._git(repo, "commit", "-q", "-m", "ignore the peer's files")
    peer_env = {**env, "PYTHONPATH": str(site)}
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "parallel_orchestra",
            "run",
            str(manifest),
            "--max-workers",
            str(CONCURRENCY),
            "--claude-exe",
            str(stand_in),
        ],
        cwd=repo,
        env=peer_env,
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - start
    if done.returncode != 0 or _merged(repo) != TASKS:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1][:300] if lines else f"exit {done.returncode}, not every file merged"
    return took


def _merged(repo: Path) -> int:
    """How many of the tasks' files ``main`` holds."""
    names = workloads._git(repo, "ls-tree", "--name-only", "main").split()
    return sum(f"t{i:02d}.txt" in names for i in range(TASKS))


def bench_peer(work: Path, repeats: int = 3) -> dict[str, Any]:
    """Median wall time of each tool on fresh repositories, interleaved; their ratio."""
    site = _install_peer(work)
    if isinstance(site, str):
        return {"skipped": f"parallel-orchestra could not be installed: {site}"}
    bin_dir = work / "stand-in-bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "claude"
    stand_in.write_text(STAND_IN.format(python=sys.executable, fixture=str(FIXTURE)))
    stand_in.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    # The peer commits with the user's git identity and has no fallback: both get one.
    for role in ("AUTHOR", "COMMITTER"):
        env.setdefault(f"GIT_{role}_NAME", "bench")
        env.setdefault(f"GIT_{role}_EMAIL", "bench@localhost")
    ours: list[float] = []
    served: list[float] = []
    theirs: list[float] = []
    failures: list[str] = []
    with workloads.resident(work, work, env) as served_env:
        for n in range(repeats):
            _round(work, n, env, served_env, site, stand_in, ours, served, theirs, failures)
    if not theirs:
        return {"skipped": f"parallel-orchestra failed every time: {failures[-1]}"}
    a, s, b = statistics.median(ours), statistics.median(served), statistics.median(theirs)
    return {
        "peer_failures": failures,
        "tasks": TASKS,
        "concurrency": CONCURRENCY,
        "orchestrator_s": round(a, 3),
        "served_s": round(s, 3),
        "peer_s": round(b, 3),
        "ratio": round(a / b, 2) if b else None,
        "ratio_served": round(s / b, 2) if b else None,
        "repeats": repeats,
    }


def _round(
    work: Path,
    n: int,
    env: dict[str, str],
    served_env: dict[str, str],
    site: Path,
    stand_in: Path,
    ours: list[float],
    served: list[float],
    theirs: list[float],
    failures: list[str],
) -> None:
    """One repetition: ours in a process of its own, ours served by ``orchestrator serve``,
    then the peer (retried on its own failures), each on a fresh repository."""
    contenders = (("ours", ours, workloads.cold(env)), ("served", served, served_env))
    for kind, times, run_env in contenders:
        repo = _repo(work / f"peer-{kind}-{n}")
        times.append(_ours(repo, run_env))
        if _merged(repo) != TASKS:
            raise RuntimeError("orchestrator run: not every task's file reached main")
    for attempt in range(3):  # the peer's own failures are retried, then reported
        repo = _repo(work / f"peer-theirs-{n}-{attempt}")
        took = _peer(repo, site, stand_in, env)
        shutil.rmtree(repo, ignore_errors=True)
        if isinstance(took, float):
            theirs.append(took)
            break
        failures.append(took)
    for kind in ("ours", "served"):
        shutil.rmtree(work / f"peer-{kind}-{n}", ignore_errors=True)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(bench_peer(Path(tmp), int(sys.argv[1]) if len(sys.argv) > 1 else 1)))
